"""tune/final_model.py: which trials a sweep's best_model.pt averages (same footing, the rules,
the guard against the shipped defaults' trial), on trial tables and a scorer whose answers are
known; tests/test_tune.py runs it inside real sweeps."""

from __future__ import annotations

import pandas as pd
import pytest

from tune import final_model as fm

DEFAULTS = {"lr": 3e-4, "arch": "dae", "use_cdann": True}


def _table(rows):
    """trials.csv rows, best first: (trial_id, best_objective, epochs_run, lr)."""
    df = pd.DataFrame([{"trial_id": t, "best_objective": v, "epochs_run": e, "early_stopped": False,
                        "best_epoch": min(e, 3), "param.lr": lr, "param.arch": "dae", "param.use_cdann": True}
                       for t, v, e, lr in rows])
    return df.sort_values("best_objective", ascending=False).reset_index(drop=True)


class Scorer:
    """An average's objective: a fixed value per set of members (default: the mean of theirs)."""

    def __init__(self, table, values=None):
        self.v = dict(zip(table["trial_id"], table["best_objective"]))
        self.values = values or {}
        self.calls = 0

    def probs(self, trial_id, ckpt):
        return None

    def n_cells(self):
        return 400

    def objective(self, members):
        self.calls += 1
        key = frozenset(r["trial_id"] for r, _ in members)
        return self.values.get(key, sum(self.v[t] for t in key) / len(key))


def _choose(table, rule="greedy", k=4, scheduler="asha", values=None, objective="agreement", missing=()):
    return fm.choose(table, objective=objective, rule=rule, k=k, scheduler=scheduler, search_epochs=10,
                     defaults_point=DEFAULTS, predictor_of=lambda tid: None if tid in missing else {"id": tid},
                     scorer=Scorer(table, values))


def _ids(final):
    return [r["trial_id"] for r, _ in final.members]


def test_the_pool_is_the_trials_that_ran_their_whole_budget():
    # b was stopped by ASHA at epoch 4 with the highest value: judged on fewer epochs, not a member
    t = _table([("a", 0.60, 10, 1e-3), ("b", 0.70, 4, 2e-3), ("c", 0.58, 10, 3e-4), ("d", 0.50, 10, 5e-4)])
    f = _choose(t, rule="top", k=2)
    assert _ids(f) == ["a", "c"] and not f.guarded
    assert _ids(_choose(t, rule="top", k=2, scheduler="fifo")) == ["b", "a"]   # FIFO: every trial ran it all
    stopped_only = _table([("a", 0.6, 4, 1e-3), ("b", 0.7, 3, 2e-3)])
    assert _ids(_choose(stopped_only, rule="best")) == ["b"]                   # none finished: the ranked ones


def test_greedy_adds_trials_while_the_average_improves_and_stops_at_k():
    t = _table([("a", 0.60, 10, 1e-3), ("b", 0.59, 10, 2e-3), ("c", 0.58, 10, 3e-4), ("d", 0.57, 10, 5e-4)])
    values = {frozenset("ab"): 0.595, frozenset("ac"): 0.63, frozenset("ad"): 0.61,
              frozenset("acb"): 0.62, frozenset("acd"): 0.64, frozenset("acdb"): 0.66}
    f = _choose(t, values=values)
    assert _ids(f) == ["a", "c", "d", "b"] and f.objective == pytest.approx(0.66) and f.rule == "greedy"
    assert _ids(_choose(t, values=values, k=2)) == ["a", "c"]
    values[frozenset("acd")] = 0.62
    assert _ids(_choose(t, values=values)) == ["a", "c"]                       # no addition raises 0.63


def test_within_se_keeps_the_trials_within_one_standard_error_of_the_best():
    # SE of 0.6 over 400 cells: sqrt(0.24 / 400) = 0.0245
    t = _table([("a", 0.60, 10, 1e-3), ("b", 0.58, 10, 2e-3), ("c", 0.57, 10, 3e-4), ("d", 0.50, 10, 5e-4)])
    assert _ids(_choose(t, rule="within_se")) == ["a", "b"]


def test_the_guard_returns_the_defaults_trial_instead_of_a_lower_average():
    t = _table([("a", 0.60, 10, 1e-3), ("c", 0.58, 10, 3e-4), ("b", 0.55, 10, 2e-3)])   # c: the defaults
    f = _choose(t, rule="top", k=3)                                            # mean 0.577 < 0.58
    assert _ids(f) == ["c"] and f.guarded and f.objective == pytest.approx(0.58)
    assert f.defaults["trial_id"] == "c" and "defaults" in f.notes[-1]
    assert not _choose(t, rule="top", k=2).guarded                             # mean 0.59 >= 0.58
    # the defaults' trial stopped by ASHA still guards (its value is what it reached)
    t = _table([("a", 0.60, 10, 1e-3), ("c", 0.65, 4, 3e-4)])
    f = _choose(t, rule="best")
    assert _ids(f) == ["c"] and f.guarded


def test_other_objectives_return_the_best_trial_alone_and_say_why():
    t = _table([("a", 0.60, 10, 1e-3), ("b", 0.59, 10, 2e-3)])
    f = fm.choose(t, objective="iwcv", rule="greedy", k=4, scheduler="asha", search_epochs=10,
                  defaults_point=DEFAULTS, predictor_of=lambda tid: {"id": tid}, scorer=None)
    assert _ids(f) == ["a"] and f.rule == "best" and "iwcv" in f.notes[0]


def test_trials_without_a_checkpoint_are_skipped():
    t = _table([("a", 0.60, 10, 1e-3), ("b", 0.59, 10, 2e-3), ("c", 0.58, 10, 3e-4)])
    assert _ids(_choose(t, rule="top", k=2, missing={"a"})) == ["b", "c"]
    assert _choose(t, rule="top", missing={"a", "b", "c"}) is None


def test_describe_is_what_best_params_records():
    t = _table([("a", 0.60, 10, 1e-3), ("c", 0.58, 10, 3e-4)])
    d = _choose(t, rule="top", k=2).describe()
    assert d["rule"] == "top" and [m["trial_id"] for m in d["members"]] == ["a", "c"]
    assert d["defaults_trial"] == {"trial_id": "c", "value": 0.58} and d["guarded"] is False
