"""ASHA replayed: Ray Tune's AsyncHyperBandScheduler rule, as a class the replays share
(asha_savings, asha_after_warmup, sweep_design_replay). asha_savings checks it against Ray's own
scheduler on random report sequences (`check_against_ray`)."""

from __future__ import annotations

import numpy as np


class Asha:
    """Ray Tune's AsyncHyperBandScheduler (ray/tune/schedulers/async_hyperband.py, Ray 2.60) with
    one bracket and stop_last_trials=True, mode max: the same rungs, cutoff and order of checks."""

    def __init__(self, grace: int, rf: float, max_t: int):
        self.rf, self.max_t = rf, max_t
        n = int(np.log(max_t / grace) / np.log(rf) + 1)
        self.rungs = [(grace * rf ** k, {}) for k in reversed(range(n))]  # highest first, as Ray's

    @property
    def milestones(self) -> list:
        return sorted(m for m, _ in self.rungs)

    def _cutoff(self, recorded: dict):
        return np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100) if recorded else None

    def _bracket(self, tid: str, t: int, value: float) -> bool:
        for milestone, recorded in self.rungs:
            if t < milestone or tid in recorded:
                continue
            cutoff = self._cutoff(recorded)
            stop = cutoff is not None and value < cutoff
            recorded[tid] = value
            return stop
        return False

    def on_result(self, tid: str, t: int, value: float) -> bool:
        """True: stop the trial (at max_t always, without recording, as Ray)."""
        return True if t >= self.max_t else self._bracket(tid, t, value)

    def on_complete(self, tid: str, t: int, value: float) -> None:
        self._bracket(tid, t, value)
