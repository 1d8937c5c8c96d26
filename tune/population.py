"""Sweeps on populations (`xfer tune --population P`): the parts that need no Ray.

A population is P configurations of one shape (xfer.config.shape_of) that one trial trains as
one batched model (xfer.training.fit_population). Each member is still one Optuna trial and is
judged on its own:

    ask_population  P Optuna trials at once: the first samples the whole space, the others
                    keep its shape (its non-member settings, enqueued as fixed parameters)
                    and sample their scalars; with TPE's constant liar the running members
                    count as already scored, so a batch holds no near-duplicates
    RungBoard       asynchronous successive halving over members (ASHA, Li et al. 2020):
                    at each rung a member continues only if its objective is in the top
                    1/reduction_factor of the values members recorded at that rung so far;
                    Ray's AsyncHyperBandScheduler rule, member by member, across populations
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xfer.config import MEMBER_KEYS

from .space import SearchSpace


def shape_params(params: dict) -> dict:
    """The parameters of a trial that decide its population's shape (all but the members' scalars)."""
    return {k: v for k, v in params.items() if k not in MEMBER_KEYS}


def ask_population(study, space: SearchSpace, size: int, first: dict | None = None) -> list[tuple[Any, dict]]:
    """`size` new Optuna trials of one shape, as (trial, its parameters). `first`: fixed parameters
    of the first member (e.g. the shipped defaults), enqueued whole."""
    out = []
    for i in range(size):
        if i == 0 and first:
            study.enqueue_trial(dict(first), skip_if_exists=False)
        elif i > 0:
            study.enqueue_trial(shape_params(out[0][1]), skip_if_exists=False)
        trial = study.ask()
        out.append((trial, space(trial)))
    return out


class RungBoard:
    """ASHA over population members. Rungs are counted on a member's clock (`adapted_epochs` by
    default: epochs with the adaptation fully on). `judge(key, t, value)` is called with each of
    a member's epochs before its last; at the highest rung <= t where the member was not yet
    recorded, its value is compared with the (1 - 1/rf) quantile of the values recorded there
    before it, then recorded (Ray 2.60's ASHA, `_Bracket.on_result`; tests/test_population_sweep.py
    checks the decisions against it). A member stopped once stays stopped (a population
    restored from an older checkpoint asks again). The state is plain JSON (`state`, `load`)."""

    def __init__(self, rungs, reduction_factor: int):
        self.rungs = sorted({int(r) for r in rungs}, reverse=True)
        self.rf = float(reduction_factor)
        self.recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.stopped: dict[str, int] = {}   # member key -> the rung it was stopped at

    def judge(self, key: str, t: int, value: float | None) -> bool:
        """True: stop the member now."""
        key = str(key)
        if key in self.stopped:
            return True
        for r in self.rungs:
            rec = self.recorded[r]
            if t < r or key in rec:
                continue
            stop = False
            if value is not None and math.isfinite(value):
                if rec:
                    cutoff = float(np.nanpercentile(list(rec.values()), (1 - 1 / self.rf) * 100))
                    stop = value < cutoff
                rec[key] = float(value)
            if stop:
                self.stopped[key] = r
            return stop
        return False

    def state(self) -> dict:
        return {"rungs": self.rungs, "rf": self.rf, "recorded": {str(r): v for r, v in self.recorded.items()},
                "stopped": dict(self.stopped)}

    @classmethod
    def load(cls, state: dict) -> "RungBoard":
        b = cls(state["rungs"], int(state["rf"]))
        b.recorded = {int(r): {str(k): float(v) for k, v in rec.items()} for r, rec in state["recorded"].items()}
        b.stopped = {str(k): int(v) for k, v in state["stopped"].items()}
        return b
