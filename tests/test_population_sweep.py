"""Sweeps on populations, the parts without Ray: the members' ASHA (RungBoard) and how a
population is proposed (ask_population)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from tune.population import RungBoard, ask_population, shape_params
from tune.space import load_space
from xfer.config import MEMBER_KEYS


def test_rung_board_decides_as_rays_asha():
    """The same results, member by member, get the same decisions as Ray's own bracket."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class T:
        def __init__(self, i):
            self.trial_id = str(i)

    rng = np.random.default_rng(0)
    ray_bracket, board = _Bracket(5, 20, 2, 0), RungBoard([5, 10, 20], 2)
    alive = {i: True for i in range(24)}
    stops = 0
    for t in range(1, 20):  # Ray's scheduler stops every trial at max_t itself, without the bracket
        for i in range(24):
            if not alive[i]:
                continue
            value = float(rng.normal(i / 24, 0.2))
            ray_stop = ray_bracket.on_result(T(i), t, value) == TrialScheduler.STOP
            assert board.judge(str(i), t, value) == ray_stop, (t, i)
            if ray_stop:
                alive[i], stops = False, stops + 1
    assert stops > 5
    again = RungBoard.load(board.state())
    assert again.state() == board.state()
    dead = next(k for k in board.stopped)
    assert again.judge(dead, 3, 10.0)  # a member stopped once stays stopped (a restore asks again)


def test_a_member_without_a_value_is_neither_judged_nor_recorded():
    b = RungBoard([2], 2)
    assert not b.judge("a", 2, None) and b.recorded[2] == {}
    assert not b.judge("a", 3, 0.5) and b.recorded[2] == {"a": 0.5}


def test_ask_population_keeps_one_shape_and_varies_the_scalars(tmp_path):
    space = load_space("broad")
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, constant_liar=True)
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    first = {k: p.value if p.kind == "fixed" else None for k, p in space.params.items()}
    for _ in range(3):
        pop = ask_population(study, space, 4)
        shapes = [shape_params(p) for _, p in pop]
        assert all(s == shapes[0] for s in shapes), shapes
        scalars = [{k: v for k, v in p.items() if k in MEMBER_KEYS} for _, p in pop]
        assert len({tuple(sorted(s.items())) for s in scalars}) == 4  # no two members alike
        for t, _ in pop:
            study.tell(t, float(np.random.default_rng(t.number).random()))
    assert len(study.trials) == 12 and first
    defaults = {"arch": "dae", "lr": 3e-4}
    pop = ask_population(study, space, 2, first=defaults)
    assert pop[0][1]["arch"] == "dae" and pop[0][1]["lr"] == pytest.approx(3e-4) and pop[1][1]["arch"] == "dae"


def _search(tmp_path, n_members=6, size=2):
    from tune.searcher import PopulationSearch

    return PopulationSearch(load_space("centred"), size=size, n_members=n_members, study_name="s",
                            storage_url=f"sqlite:///{tmp_path / 's.db'}", seed=0, n_startup_trials=2,
                            first={"lr": 3e-4}, max_t=4)


def _finish(search, rid, statuses):
    cfg_n = search.owned[rid]
    for i, n in enumerate(cfg_n):
        search.on_trial_result(rid, {f"m{i}/epoch": 1, f"m{i}/objective": 0.1 * (n + 1)})
    search.on_trial_complete(rid, {f"m{i}/status": st for i, st in enumerate(statuses)})


def test_population_search_tells_each_member_on_its_own(tmp_path):
    s = _search(tmp_path)
    a, b, c = s.suggest("a"), s.suggest("b"), s.suggest("c")
    assert [len(x["population"]) for x in (a, b, c)] == [2, 2, 2] and s.suggest("d") == s.FINISHED
    assert a["population"][0]["lr"] == pytest.approx(3e-4)  # the defaults first
    _finish(s, "a", ["finished", "halted"])
    _finish(s, "b", ["stopped_early", "diverged"])
    states = {t.number: t.state.name for t in s.study.trials}
    assert states == {0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE", 3: "FAIL", 4: "RUNNING", 5: "RUNNING"}
    assert s.study.trials[0].intermediate_values == {1: pytest.approx(0.1)}
    assert s.study.trials[1].user_attrs == {"ray_trial_id": "a", "member": 1}


def test_population_search_reconciles_with_the_restored_trial_list(tmp_path):
    """Restored from a snapshot that knew only population a: b (finished after it) is handed to the
    first new trial Tune asks for, c (unfinished) is marked orphaned, and no member is proposed twice."""
    s = _search(tmp_path)
    for rid in "abc":
        s.suggest(rid)
    _finish(s, "a", ["finished", "finished"])
    _finish(s, "b", ["finished", "halted"])
    fresh = _search(tmp_path)          # the restarted driver's searcher, same study
    fresh.reconcile({"a": {"config": {}}})
    assert fresh.owned == {"a": [0, 1]} and fresh._readopt == [[2, 3]]
    states = {t.number: t.state.name for t in fresh.study.trials}
    assert states[4] == states[5] == "FAIL"
    again = fresh.suggest("x")
    assert again["numbers"] == [2, 3] and fresh.owned["x"] == [2, 3]
    new = fresh.suggest("y")
    assert len(new["population"]) == 2 and new["numbers"] == [6, 7] and fresh.suggest("z") == fresh.FINISHED
    _finish(fresh, "x", ["finished", "finished"])   # a re-run keeps the first results
    assert {t.number: t.state.name for t in fresh.study.trials}[3] == "PRUNED"
