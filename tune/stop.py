"""A clean stop of a sweep's driver on SIGTERM, the signal a scheduler sends before it kills a job
(SLURM at its time limit (`#SBATCH --signal`) or on `scancel`, Kubernetes on an eviction; each
sends SIGKILL a grace period later: SLURM's KillWait, 30 s by default), and on Ctrl+C (SIGINT).

While `tuner.fit()` runs, either signal asks Ray Tune to stop: Tune ends its loop, writes the
sweep's experiment state one last time (what `Tuner.restore` reads) and stops the trials' actors;
fit() then returns an unfinished ResultGrid. The driver (tune.driver.run) skips the export and
scoring of the unfinished sweep (a partial sweep exported as if finished would be a wrong answer:
trials cut short counted as stopped by ASHA, a final model from whatever had ended), shuts Ray
down (a local cluster's processes end with it) and raises `SweepStopped`; `xfer tune` prints how
to resume and exits with 128 + the signal: 143 on SIGTERM, 130 on Ctrl+C (what a shell reports
for a process the signal killed). A second Ctrl+C stops at once, without the last save, as Tune's
own second Ctrl+C does; a second SIGTERM (SLURM's at the time limit) changes nothing.

Tune (2.60) listens for SIGINT and SIGUSR1 inside its loop (ray.tune.tune._setup_signal_catching)
and has no public call that stops a running fit(): the handler here calls the handler Tune
installed for SIGUSR1, and sets TUNE_DISABLE_SIGINT_HANDLER while it is active so that SIGINT
stays with it (Tune's own SIGINT handler would end the loop without the driver knowing, and the
driver would export the unfinished sweep). A signal that comes before Tune has installed its
handler (while the Tuner is made or restored) is held until it has, then delivered as SIGUSR1.
Without this handler, SIGTERM reaches the failure-signal handler of Ray's core worker, which
prints a stack and aborts the driver (SIGABRT, status 134) with no last save and no resume hint
(measured with ray 2.60). CleanStop is set once Ray is up (ray.init sets Ray's own handler).

Before that (the cluster checked, the data ingested and prepared, Ray starting) `EarlyStop` takes
both signals: the driver stops at once (inside ray.init the signal is held until it returns, then
Ray is shut down) and `SweepStopped` says whether `--resume` can go on: it can once the sweep's
settings (sweep.json) are written, or when the driver was itself a resume; else the command is
run again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from xfer.sweep_files import SETTINGS_FILE

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.analysis.experiment_analysis")
_TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


def _take_signals(handler) -> dict[int, object]:
    """SIGTERM and SIGINT to `handler`; the handlers they had (for _give_back_signals)."""
    return {s: signal.signal(s, handler) for s in SIGNALS}


def _give_back_signals(previous: dict[int, object], handler) -> None:
    """The handlers `_take_signals` replaced, where `handler` still holds the signal (ray.init may
    have installed its own meanwhile, which stays)."""
    for s, h in previous.items():
        if signal.getsignal(s) == handler:
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def signal_text(signum: int) -> str:
    """How a message names the signal: "SIGTERM", "Ctrl+C (SIGINT)"."""
    name = signal.Signals(signum).name
    return "Ctrl+C (SIGINT)" if signum == signal.SIGINT else name


class SweepStopped(Exception):
    """The sweep's driver stopped on a signal before the sweep finished; its state is saved and
    `xfer tune --resume --output_folder <output>` finishes it (resumable), or nothing was saved yet
    and the command is run again. started: Tune's loop had begun."""

    def __init__(self, output, signum: int = signal.SIGTERM, started: bool = True, resumable: bool = True):
        self.output = output
        self.signum = signum
        self.started = started
        self.resumable = resumable
        when = "before the sweep finished" if started else "before any trial started"
        if resumable:
            text = f"stopped by {signal_text(signum)} {when}; resume with: {self.resume_command}"
        else:
            text = (f"stopped by {signal_text(signum)} before the sweep started: nothing to resume yet (no "
                    f"{Path(output) / SETTINGS_FILE}); run the command again")
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        """128 + the signal, what a shell reports for a process it killed: 143 (SIGTERM), 130 (SIGINT)."""
        return 128 + int(self.signum)

    @property
    def resume_command(self) -> str:
        return f"xfer tune --resume --output_folder {self.output}"


class CleanStop:
    """Context manager around `tuner.fit()`: SIGTERM and SIGINT stop the fit with its state saved
    (see the module docstring). `signum` tells afterwards which signal came (None: none);
    `on_stop(signal_text)` runs once, in the handler, before Tune is asked to stop (the progress
    display's final line says why the sweep ended). Outside the main thread (where Python cannot
    set signal handlers) it does nothing."""

    def __init__(self, quiet: bool = True, on_stop: Callable[[str], None] | None = None):
        self.quiet = quiet              # mute Tune's own interrupt messages (its resume hint is Tuner.restore)
        self.on_stop = on_stop
        self.signum: int | None = None
        self._active = False
        self._previous: dict[int, object] = {}
        self._env_before: str | None = None
        self._usr1_before = None
        self._done = threading.Event()
        self._levels: dict[str, int] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "CleanStop":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._usr1_before = signal.getsignal(signal.SIGUSR1)
        self._previous = _take_signals(self._on_signal)
        self._env_before = os.environ.get(_TUNE_SIGINT_ENV)
        os.environ[_TUNE_SIGINT_ENV] = "1"  # read by Tune's loop as it starts: SIGINT stays with _on_signal
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._active:
            _give_back_signals(self._previous, self._on_signal)
            if self._env_before is None:
                os.environ.pop(_TUNE_SIGINT_ENV, None)
            else:
                os.environ[_TUNE_SIGINT_ENV] = self._env_before
            self._active = False
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def _tune_handler(self):
        """The handler Tune's loop installed for SIGUSR1 (the one that ends the loop), or None."""
        h = signal.getsignal(signal.SIGUSR1)
        return h if callable(h) and h is not self._usr1_before else None

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl+C: stop now, without the last save
                raise KeyboardInterrupt
            return  # a second SIGTERM (SLURM's at the time limit) changes nothing
        self.signum = signum
        text = signal_text(signum)
        log.warning("%s: stopping the sweep (saving its state, stopping the trials)%s", text,
                    "; Ctrl+C again stops at once, without saving" if signum == signal.SIGINT else "")
        if self.quiet:
            # Tune's own messages on the stop (its resume hint names Tuner.restore; the
            # unfinished trials as an error; no metrics yet for a trial just started):
            # `xfer tune` prints its own resume line
            for name in _TUNE_LOGGERS:
                lg = logging.getLogger(name)
                self._levels.setdefault(name, lg.level)
                lg.setLevel(logging.CRITICAL)
        if self.on_stop is not None:
            try:
                self.on_stop(text)
            except Exception as e:  # noqa: BLE001 - a display must never keep the sweep from stopping
                log.debug("on_stop failed: %s", e)
        h = self._tune_handler()
        if h is not None:
            h(signal.SIGUSR1, frame)
        else:
            threading.Thread(target=self._deliver_later, name="xfer-stop", daemon=True).start()

    def _deliver_later(self) -> None:
        """Until fit() returns: once Tune's loop has installed its handler, send this process
        SIGUSR1 (run by the main thread, as every signal handler)."""
        while not self._done.wait(0.05):
            if self._tune_handler() is not None:
                os.kill(os.getpid(), signal.SIGUSR1)
                return


class EarlyStopped(Exception):
    """A signal came before Tune's loop (EarlyStop)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal_text(signum))


class EarlyStop:
    """Context manager around the driver's work before Tune's loop: SIGTERM or SIGINT raises
    EarlyStopped at once, or, inside `held()` (ray.init, which must not be cut halfway), as soon as
    the block ends. On exit the handlers it replaced are back, except where something inside (ray.init)
    installed its own. Outside the main thread it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._held = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "EarlyStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = _take_signals(self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        _give_back_signals(self._previous, self._on_signal)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping before any trial started", signal_text(signum))
        if not self._held:
            raise EarlyStopped(self.signum)

    @contextmanager
    def held(self):
        """A signal inside the block waits for its end (then EarlyStopped)."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self.signum is not None:
            raise EarlyStopped(self.signum)
