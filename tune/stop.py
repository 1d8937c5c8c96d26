"""A clean stop of a sweep's driver on SIGTERM, the signal a scheduler sends before it kills a job
(SLURM at its time limit (`#SBATCH --signal`) or on `scancel`, Kubernetes on an eviction; each
sends SIGKILL a grace period later: SLURM's KillWait, 30 s by default).

While `tuner.fit()` runs, SIGTERM asks Ray Tune to stop the way SIGINT (Ctrl+C) does: Tune ends
its loop, writes the sweep's experiment state one last time (what `Tuner.restore` reads) and
stops the trials' actors; fit() then returns an unfinished ResultGrid. The driver
(tune.driver.run) skips the export and scoring of the unfinished sweep, shuts Ray down (a local
cluster's processes end with it) and raises `SweepStopped`; `xfer tune` prints how to resume and
exits with 143 (128 + SIGTERM, what a shell reports for a process SIGTERM killed).

Tune (2.60) listens for SIGINT and SIGUSR1 inside its loop (ray.tune.tune._setup_signal_catching)
and has no public call that stops a running fit(): the SIGTERM handler here calls the handler Tune
installed for SIGUSR1. A SIGTERM that comes before Tune has installed it (while the Tuner is made
or restored) is held until it has, then delivered as SIGUSR1. Without this handler, SIGTERM
reaches the failure-signal handler of Ray's core worker, which prints a stack and aborts the
driver (SIGABRT, status 134) with no last save and no resume hint (measured with ray 2.60). The
handler is set once Ray is up (ray.init sets Ray's own): a SIGTERM before then (the data being
prepared, Ray starting) ends the driver with nothing to resume. SIGINT is left to Tune as before.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
_TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.analysis.experiment_analysis")


class SweepStopped(Exception):
    """The sweep's driver stopped on a signal before the sweep finished; its state is saved and
    `xfer tune --resume --output_folder <output>` finishes it."""

    def __init__(self, output, signum: int = signal.SIGTERM):
        self.output = output
        self.signum = signum
        super().__init__(f"stopped on {signal.Signals(signum).name} before the sweep finished; "
                         f"resume with: {self.resume_command}")

    @property
    def resume_command(self) -> str:
        return f"xfer tune --resume --output_folder {self.output}"


class TermStop:
    """Context manager around `tuner.fit()`: SIGTERM stops the fit as SIGINT would
    (`requested` tells afterwards whether it came). Outside the main thread (where Python cannot
    set signal handlers) it does nothing."""

    def __init__(self, quiet: bool = True):
        self.quiet = quiet              # mute Tune's own interrupt messages (its resume hint is Tuner.restore)
        self.requested = False
        self._active = False
        self._previous = None
        self._usr1_before = None
        self._done = threading.Event()
        self._levels: dict[str, int] = {}

    def __enter__(self) -> "TermStop":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._usr1_before = signal.getsignal(signal.SIGUSR1)
        self._previous = signal.signal(signal.SIGTERM, self._on_term)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._active:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._active = False
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def _tune_handler(self):
        """The handler Tune's loop installed for SIGUSR1 (the one that ends the loop), or None."""
        h = signal.getsignal(signal.SIGUSR1)
        return h if callable(h) and h is not self._usr1_before else None

    def _on_term(self, signum, frame) -> None:
        if self.requested:
            return  # already stopping: a second SIGTERM (SLURM's at the time limit) changes nothing
        self.requested = True
        log.warning("SIGTERM: stopping the sweep (saving its state, stopping the trials)")
        if self.quiet:
            # Tune's own messages on the stop (its resume hint names Tuner.restore; the
            # unfinished trials as an error; no metrics yet for a trial just started):
            # `xfer tune` prints its own resume line
            for name in _TUNE_LOGGERS:
                lg = logging.getLogger(name)
                self._levels.setdefault(name, lg.level)
                lg.setLevel(logging.CRITICAL)
        h = self._tune_handler()
        if h is not None:
            h(signal.SIGUSR1, frame)
        else:
            threading.Thread(target=self._deliver_later, name="xfer-sigterm", daemon=True).start()

    def _deliver_later(self) -> None:
        """Until fit() returns: once Tune's loop has installed its handler, send this process
        SIGUSR1 (run by the main thread, as every signal handler)."""
        while not self._done.wait(0.05):
            if self._tune_handler() is not None:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
