"""A compact progress display for `xfer tune` / `xfer demo`, in place of Ray Tune's status tables.

`SweepProgress` is a Ray Tune `Callback` (it runs in the driver) that shows

- the trials: completed, stopped by ASHA, errored, running and pending, out of the sweep's
  `n_trials` (a trial that ended is classified by `tune.trials.trial_status`, the rule
  trials.csv uses); once the driver stops the sweep on a signal (SIGTERM, Ctrl+C: tune.stop,
  `note_stop`), the trials it cut short are counted as interrupted and the final line says so;
- the best trial so far: its best objective value, trial id, best epoch and main parameters
  (arch, divergence, the λ weights);
- the elapsed time and an estimate of the time left (see `SweepProgress.eta`);
- once, a trial Tune created but could not start for PENDING_NOTE_S seconds (it waits for its
  resources): what it needs and what the cluster has free.

In a terminal it is a small `rich` panel redrawn in place (`rich.live.Live`, at most
`refresh_per_second` times a second); lines printed meanwhile (a trial that ended, log
records, Ray's messages) appear above it. Otherwise (a pipe, a file, a SLURM log) it writes
plain lines without ANSI codes: one status line every `interval_s` seconds, one line when a
trial ends and a final summary line.

The display never breaks a sweep: an exception inside a hook is caught and logged once (a
failing rich display falls back to plain lines). The callback is pickled with the Tuner's
RunConfig (tuner.pkl, which `Tuner.restore` reads): the console, the live display and the
output stream are created lazily and never pickled.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import weakref
from typing import Callable, TextIO

from ray.tune import Callback

from .trials import trial_status

log = logging.getLogger(__name__)

PLAIN_INTERVAL_S = 30.0
PENDING_NOTE_S = 60.0  # a trial still PENDING (created, not started: waiting for its resources) this long is named
LABELS = {"completed": "completed", "stopped_by_asha": "stopped by ASHA", "errored": "errored"}
_ENDED = "TERMINATED"
_ERROR = "ERROR"
_RUNNING = "RUNNING"
_PENDING = "PENDING"

_ACTIVE: "set[SweepProgress]" = set()
_ALL: "weakref.WeakSet[SweepProgress]" = weakref.WeakSet()
STATUSES = ("completed", "stopped_by_asha", "errored", "interrupted", "running", "pending")


def close_all() -> None:
    """Stop every live display still drawn (the driver calls it when fit() returns or raises,
    so a sweep that dies before Tune's on_experiment_end leaves the terminal as it was)."""
    for p in list(_ACTIVE):
        p.close()


def note_stop(why: str) -> None:
    """The driver is stopping the sweep on a signal (`why`: "SIGTERM", "Ctrl+C (SIGINT)"; tune.stop.CleanStop
    calls this before Tune ends its loop): every display in this process counts the trials it started that
    have not ended as interrupted, not as stopped by ASHA, and its final line says the sweep was stopped."""
    for p in list(_ALL):
        p.stopped_by = why


def free_text() -> str:
    """The cluster's free CPUs and GPUs now, of its totals ("0 of 2 CPU, 0 of 0 GPU"; Ray's GCS, from the driver)."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))


def needs_text(trial) -> str:
    """What a Tune trial asks for (its placement group's bundles, summed): "2 CPU, 1 GPU"."""
    from .ray_start import resources_text

    pgf = getattr(trial, "placement_group_factory", None) or getattr(trial, "_default_placement_group_factory", None)
    if pgf is None:
        return "?"
    return resources_text({k: v for k, v in pgf.required_resources.items() if v > 0}, keys=())


def hms(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _safe(hook):
    """A hook that never raises: the first failure is logged (with its traceback), later ones
    are not; a failing rich display falls back to plain lines."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a display must never stop a sweep
            if not self._failed:
                self._failed = True
                log.warning("progress display: %s failed (%s: %s); the sweep goes on", hook.__name__,
                            type(e).__name__, e, exc_info=True)
            if self._rich_on:
                self.close()
                self._rich_on = False
            return None

    return wrapper


class SweepProgress(Callback):
    """Tune callback drawing the sweep's progress (see the module docstring).

    n_trials, search_epochs: the sweep's; objective: the label of the ranking objective;
    name: the sweep's name; mode: "auto" (rich when the stream is a terminal), "rich" or
    "plain"; interval_s: seconds between plain status lines; stream: where to write (default:
    sys.stdout at the time of writing); clock: seconds, monotonic (tests inject one).
    """

    def __init__(self, n_trials: int, search_epochs: int, objective: str = "objective", name: str = "sweep", *,
                 mode: str = "auto", interval_s: float = PLAIN_INTERVAL_S, refresh_per_second: float = 2.0,
                 stream: TextIO | None = None, clock: Callable[[], float] | None = None, unit: str = "trials"):
        if mode not in ("auto", "rich", "plain"):
            raise ValueError(f"mode must be auto, rich or plain, not {mode!r}")
        self.n_trials, self.search_epochs, self.objective, self.name = n_trials, search_epochs, objective, name
        self.mode, self.interval_s, self.refresh_per_second = mode, interval_s, refresh_per_second
        self._stream, self._clock = stream, clock
        self.unit = unit                          # "populations" in a population sweep (xfer tune --population)
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        """Runtime state: none of it survives pickling."""
        self._t0: float | None = None
        self._last_line = self._last_draw = float("-inf")
        self._ended: dict[str, str] = {}          # trial id -> completed / stopped_by_asha / errored
        self._epochs_seen: dict[str, int] = {}    # trial id -> last epoch whose time was counted
        self._epoch_seconds = 0.0
        self._epoch_count = 0
        self._slots = 0                           # the most trials seen running at once
        self._trials: list = []
        self._failed = False
        self._rich_on: bool | None = None         # decided at the first output
        self._console = self._live = None
        self._log_streams: list = []
        self._pending_since: dict[str, float] = {}  # trial id -> when it was first seen PENDING
        self._pending_named: set[str] = set()       # trials named as pending too long (once each)
        self._started: set[str] = set()             # trials that ran in this driver (not a resume's finished ones)
        self.stopped_by: str | None = None          # the signal the driver stops the sweep on (note_stop)
        _ALL.add(self)

    def __getstate__(self) -> dict:
        keep = ("n_trials", "search_epochs", "objective", "name", "mode", "interval_s", "refresh_per_second", "unit")
        state = {k: self.__dict__[k] for k in keep if k in self.__dict__}
        clock = self._clock
        state["_clock"] = clock if clock in (None, time.monotonic, time.time, time.perf_counter) else None
        return state

    def __setstate__(self, state: dict) -> None:
        self.unit = "trials"  # a display pickled before populations
        self.__dict__.update(state)
        self._stream = None
        self._reset()

    def now(self) -> float:
        return (self._clock or time.monotonic)()

    def _start(self) -> None:
        if self._t0 is None:
            self._t0 = self.now()

    def elapsed(self) -> float:
        return 0.0 if self._t0 is None else self.now() - self._t0

    # ------------------------------------------------------------------ what is shown

    def status_of(self, trial) -> str:
        """completed / stopped_by_asha / errored for a trial that ended, interrupted for one that ran in
        this driver and was cut short by the stop on a signal (it continues on --resume), else running /
        pending. Tune calls on_trial_complete before it marks the trial TERMINATED, hence `_ended`;
        a resumed sweep's finished trials come back TERMINATED / ERROR."""
        tid = trial.trial_id
        if tid in self._ended:
            return self._ended[tid]
        if trial.status == _ERROR:
            return "errored"
        if self.stopped_by and tid in self._started:
            return "interrupted"
        if trial.status == _ENDED:
            return trial_status(trial.last_result or {}, self.search_epochs, errored=False)
        return "running" if trial.status == _RUNNING else "pending"

    def counts(self, trials=None) -> dict:
        """{completed, stopped_by_asha, errored, interrupted, running, pending}: pending counts the trials
        not yet created as well, so the six add up to n_trials (or more, should Tune run more);
        interrupted is 0 unless the sweep was stopped on a signal."""
        trials = self._trials if trials is None else trials
        c = dict.fromkeys(STATUSES, 0)
        for t in trials:
            c[self.status_of(t)] += 1
        c["pending"] += max(0, self.n_trials - len(trials))
        return c

    def best(self, trials=None):
        """(value, trial) of the best trial that has not errored (as best_params.json ranks:
        the trial's `best_objective`, its objective at its best epoch), or None."""
        trials = self._trials if trials is None else trials
        found = None
        for t in trials:
            v = (t.last_result or {}).get("best_objective")
            if v is None or self.status_of(t) == "errored":
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if v == v and (found is None or v > found[0]):
                found = (v, t)
        return found

    def eta(self, trials=None) -> float | None:
        """Seconds left, estimated from the epochs still to run: each pending trial is expected
        to run as many epochs as the trials that ended ran on average (ASHA stops most early;
        `search_epochs` until one has ended) and each running trial that many less the epochs
        it has run (at least one more). The sum times the mean epoch time (Tune's
        `time_this_iter_s`, averaged over every epoch reported in this run of the driver),
        divided by the trials that can run at once (the most seen running at once, at most the
        trials left). None ("?") until an epoch has been timed; 0 once no trial is running or
        pending."""
        trials = self._trials if trials is None else trials
        c = self.counts(trials)
        if c["running"] + c["pending"] == 0:
            return 0.0
        if not self._epoch_count:
            return None
        done = [int((t.last_result or {}).get("epoch", 0) or 0) for t in trials
                if self.status_of(t) in ("completed", "stopped_by_asha")]
        expected = sum(done) / len(done) if done else float(self.search_epochs)
        left = c["pending"] * expected
        for t in trials:
            if self.status_of(t) == "running":
                ran = int((t.last_result or {}).get("epoch", 0) or 0)
                left += max(expected - ran, 1.0)
        slots = min(max(self._slots, c["running"], 1), c["running"] + c["pending"])
        return left * (self._epoch_seconds / self._epoch_count) / slots

    def _params(self, config: dict, rich: bool) -> list[str]:
        if "population" in config:  # a population (xfer tune --population): its shape, its size
            first = (config["population"] or [{}])[0]
            return [f"{k} {first[k]}" if rich else f"{k}={first[k]}" for k in ("arch", "divergence") if k in first] \
                + [f"{len(config['population'])} members"]
        out = [f"{k} {config[k]}" if rich else f"{k}={config[k]}" for k in ("arch", "divergence") if k in config]
        for k, v in config.items():
            if k.startswith("lambda_"):
                v = f"{v:.3g}" if isinstance(v, float) else v
                out.append(f"λ_{k[7:]} {v}" if rich else f"{k}={v}")
        return out

    def _best_text(self, rich: bool = False) -> str:
        b = self.best()
        if b is None:
            return "none yet"
        v, t = b
        ep = (t.last_result or {}).get("best_epoch")
        at = f", epoch {ep}" if ep else ""
        return f"{self.objective} {v:.4f}: trial {t.trial_id}{at} ({', '.join(self._params(t.config or {}, rich))})"

    def _counts_text(self, c: dict) -> str:
        return (f"{c['completed']} completed, {c['stopped_by_asha']} stopped by ASHA, {c['errored']} errored, "
                f"{c['running']} running, {c['pending']} pending (of {self.n_trials})")

    def _time_text(self) -> str:
        left = self.eta()
        return f"elapsed {hms(self.elapsed())}, left {'?' if left is None else '~' + hms(left)}"

    def status_line(self) -> str:
        return f"sweep '{self.name}': {self._counts_text(self.counts())} | best {self._best_text()} | {self._time_text()}"

    def final_line(self) -> str:
        c = self.counts()
        ended = c["completed"] + c["stopped_by_asha"] + c["errored"]
        if self.stopped_by:  # the sweep is unfinished: its state is saved, --resume finishes it
            cut = f", {c['interrupted']} interrupted" if c["interrupted"] else ""
            rest = c["running"] + c["pending"]
            return (f"sweep '{self.name}' stopped by {self.stopped_by} after {hms(self.elapsed())}: {ended} of "
                    f"{self.n_trials} {self.unit} ended ({c['completed']} completed, {c['stopped_by_asha']} stopped "
                    f"by ASHA, {c['errored']} errored){cut}{f', {rest} not started' if rest else ''} | "
                    f"best {self._best_text()}")
        word = "finished" if c["running"] + c["pending"] == 0 else "ended"
        rest = f", {c['running']} running, {c['pending']} pending" if c["running"] + c["pending"] else ""
        return (f"sweep '{self.name}' {word}: {ended} of {self.n_trials} {self.unit} ({c['completed']} completed, "
                f"{c['stopped_by_asha']} stopped by ASHA, {c['errored']} errored{rest}) in {hms(self.elapsed())} | "
                f"best {self._best_text()}")

    def renderable(self):
        """The rich panel (also what a test renders)."""
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        c = self.counts()
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        # Text objects, not markup strings: the panel is also redrawn inside print(markup=False)
        grid.add_row(self.unit, Text.from_markup(
            f"[green]{c['completed']} completed[/]  [yellow]{c['stopped_by_asha']} stopped by ASHA[/]  "
            f"[red]{c['errored']} errored[/]  "
            + (f"[magenta]{c['interrupted']} interrupted by {self.stopped_by}[/]  " if c["interrupted"] else "")
            + f"[cyan]{c['running']} running[/]  {c['pending']} pending  "
            f"[dim](of {self.n_trials})[/]"))
        grid.add_row("best", Text(self._best_text(rich=True)))   # and a value is never read as markup
        grid.add_row("time", Text(self._time_text()))
        return Panel(grid, title=Text(f"xfer tune: {self.name}"), title_align="left", expand=False)

    # ------------------------------------------------------------------ output

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _use_rich(self) -> bool:
        if self._rich_on is None:
            if self.mode == "auto":
                isatty = getattr(self._out(), "isatty", None)
                self._rich_on = bool(isatty and isatty())
            else:
                self._rich_on = self.mode == "rich"
        return self._rich_on

    def _line(self, text: str, live: bool = True) -> None:
        """One line: above the live panel (rich), or written and flushed (plain)."""
        if self._use_rich():
            if live:
                self._ensure_live()
            elif self._console is None:
                self._console = self._make_console()
            self._console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            out = self._out()
            out.write(text + "\n")
            out.flush()

    def _ensure_live(self) -> None:
        if self._live is not None:
            return
        from rich.live import Live

        own_terminal = self._stream is None
        self._console = self._console or self._make_console()
        err_tty = own_terminal and getattr(sys.stderr, "isatty", lambda: False)()
        self._live = Live(self.renderable(), console=self._console, auto_refresh=False, transient=False,
                          redirect_stdout=own_terminal, redirect_stderr=err_tty, vertical_overflow="visible")
        self._live.start(refresh=True)
        _ACTIVE.add(self)
        if err_tty:
            self._route_logs(sys.stderr)

    def _make_console(self):
        from rich.console import Console

        if self._stream is None:
            return Console()  # sys.stdout; rich detects the terminal's size and colours
        return Console(file=self._stream, force_terminal=True, width=160)  # a stream has no width of its own

    def _route_logs(self, proxy) -> None:
        """Log handlers keep the stream they were made with: point those writing to the terminal
        at the live display's proxy, so records appear above the panel instead of tearing it."""
        terminal = {id(s) for s in (sys.__stderr__, sys.__stdout__, getattr(proxy, "rich_proxied_file", None)) if s}
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for lg in loggers:
            for h in lg.handlers:
                if type(h) is logging.StreamHandler and id(h.stream) in terminal:
                    self._log_streams.append((h, h.setStream(proxy)))

    def _draw(self, force: bool = False) -> None:
        now = self.now()
        if self._use_rich():
            if force or now - self._last_draw >= 1.0 / max(self.refresh_per_second, 1e-3):
                self._ensure_live()
                self._live.update(self.renderable(), refresh=True)
                self._last_draw = now
        elif force or now - self._last_line >= self.interval_s:
            self._line(self.status_line())
            self._last_line = now

    def _stop_live(self) -> None:
        for h, old in reversed(self._log_streams):
            try:
                h.setStream(old)
            except Exception:  # noqa: BLE001
                pass
        self._log_streams = []
        if self._live is not None:
            try:
                self._live.update(self.renderable(), refresh=True)
            except Exception:  # noqa: BLE001
                pass
            self._live.stop()
            self._live = None
        _ACTIVE.discard(self)

    def close(self) -> None:
        """Stop the live display (idempotent); the panel's last state stays on screen."""
        try:
            self._stop_live()
        except Exception as e:  # noqa: BLE001
            log.debug("progress display: close failed: %s", e)

    # ------------------------------------------------------------------ Tune's hooks

    def _see(self, trials) -> None:
        self._start()
        if trials is not None:
            self._trials = trials
        running = sum(1 for t in self._trials if self.status_of(t) == "running")
        self._slots = max(self._slots, running)
        self._note_pending()

    def _note_pending(self) -> None:
        """Name, once, each trial PENDING for PENDING_NOTE_S seconds or more (Tune made it but cannot
        start it: its resources are not free), with what it needs and what is free."""
        now = self.now()
        for t in self._trials:
            tid = t.trial_id
            if t.status != _PENDING or tid in self._ended:
                self._pending_since.pop(tid, None)
                continue
            waited = now - self._pending_since.setdefault(tid, now)
            if waited >= PENDING_NOTE_S and tid not in self._pending_named:
                self._pending_named.add(tid)
                self._line(self.pending_line(t, waited))

    def pending_line(self, trial, waited: float) -> str:
        try:
            free = free_text()
        except Exception as e:  # noqa: BLE001 - the line still names the trial
            free = f"unknown ({type(e).__name__})"
        return f"trial {trial.trial_id} pending for {waited:.0f} s: needs {needs_text(trial)}; free: {free}"

    @_safe
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._start()
        if self._use_rich():
            self._draw(force=True)
        else:
            self._line(f"sweep '{self.name}': {self.n_trials} {self.unit} of up to {self.search_epochs} epochs; "
                       f"progress every {self.interval_s:g} s and when a trial ends")
            self._last_line = self.now()

    @_safe
    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.add(trial.trial_id)
        self._see(trials)
        if self._use_rich():
            self._draw()

    @_safe
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._started.add(trial.trial_id)
        self._see(trials)
        epoch = int(result.get("epoch", 0) or 0)
        secs = result.get("time_this_iter_s")
        if epoch > self._epochs_seen.get(trial.trial_id, 0) and isinstance(secs, (int, float)) and secs >= 0:
            self._epoch_seconds += float(secs)
            self._epoch_count += 1
        self._epochs_seen[trial.trial_id] = max(epoch, self._epochs_seen.get(trial.trial_id, 0))
        self._draw()

    def _ended_line(self, trial, status: str, detail: str = "") -> None:
        m = trial.last_result or {}
        epochs = int(m.get("epoch", 0) or 0)
        c = self.counts()
        done = c["completed"] + c["stopped_by_asha"] + c["errored"]
        what = LABELS[status]
        if status == "completed" and m.get("stopped_early") and epochs < self.search_epochs:
            what = "completed (stopped early by its own patience)"
        best = m.get("best_objective")
        best = f", best {self.objective} {float(best):.4f}" if isinstance(best, (int, float)) else ""
        self._line(f"trial {trial.trial_id} {what} after {epochs}/{self.search_epochs} epochs{best}{detail}"
                   f" [{done}/{self.n_trials} done]")

    @_safe
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._see(trials)
        status = trial_status(trial.last_result or {}, self.search_epochs, errored=False)
        if self.stopped_by and status != "completed":
            # ended by the stop: a Ctrl+C in a terminal reaches the trials' processes too (one process
            # group), whose loops end with their last report; Tune runs them again on --resume
            self._ended[trial.trial_id] = "interrupted"
            return
        self._ended[trial.trial_id] = status
        self._ended_line(trial, status)
        self._draw(force=self._use_rich())

    @_safe
    def on_trial_error(self, iteration, trials, trial, **info):
        self._see(trials)
        self._ended[trial.trial_id] = "errored"
        self._ended_line(trial, "errored", self._error_of(trial))
        self._draw(force=self._use_rich())

    @_safe
    def on_trial_recover(self, iteration, trials, trial, **info):
        self._see(trials)
        self._line(f"trial {trial.trial_id} failed{self._error_of(trial)}; retrying "
                   f"(failure {trial.num_failures} of at most {trial.max_failures + 1})")

    @staticmethod
    def _error_of(trial) -> str:
        try:
            err = trial.get_error()
        except Exception:  # noqa: BLE001 - the error file may be unreadable; the line still says it failed
            err = None
        if err is None:
            return ""
        from .trials import error_line

        return f": {error_line(err)}"

    @_safe
    def on_step_end(self, iteration, trials, **info):
        self._see(trials)
        self._draw()

    @_safe
    def on_experiment_end(self, trials, **info):
        self._see(trials)
        if self._use_rich():
            self._stop_live()
        self._line(self.final_line(), live=False)
