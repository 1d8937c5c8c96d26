"""EpochAwareOptunaSearch and the private Ray / Optuna fields it relies on (no Ray cluster).

These tests drive the searcher the way Tune does (suggest, results, completion, a
restore) on a real Optuna study in SQLite, and read the study back through Optuna's
public API. When a Ray or Optuna upgrade removes or renames a private field, they fail
with PrivateFieldGone naming the field (see tune/searcher.py OptunaInternals).
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from conftest import study_states
from tune.searcher import EpochAwareOptunaSearch, OptunaInternals, PrivateFieldGone
from tune.space import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_T = 4


def _searcher(db, name="s"):
    return EpochAwareOptunaSearch(
        space=load_space("broad"), metric="objective", mode="max", max_t=MAX_T,
        sampler=optuna.samplers.RandomSampler(seed=0), study_name=name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{db}"))


def _stored(db, name="s") -> dict:
    """The study as a fresh process sees it (public API only): Ray trial id -> FrozenTrial."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return {t.user_attrs.get("ray_trial_id", f"#{t.number}"): t for t in study.get_trials(deepcopy=True)}


def test_adapter_reads_every_private_field_it_relies_on(tmp_path):
    """Each private field, exercised for real: a define-by-run suggest fills OptunaSearch's
    trial map with an optuna.Trial whose storage id reaches the stored trial; report, tell
    PRUNED and a FAIL written straight to the storage all land in the study."""
    db = tmp_path / "study.db"
    s = _searcher(db)
    ot = s.internals
    ot.check()
    cfg = s.suggest("t1")
    assert cfg["arch"] in ("dae", "vae", "contrastive", "hybrid", "mlp") and "lr" in cfg
    assert set(ot.trials) == {"t1"} and isinstance(ot.trials["t1"], optuna.Trial)
    assert ot.completed == set()
    assert isinstance(ot.study, optuna.Study) and isinstance(ot.storage, optuna.storages.BaseStorage)
    trial = ot.trials["t1"]
    frozen = ot.stored(trial)
    assert ot.storage_id(frozen) == ot.storage_id(trial)
    assert frozen.state == TrialState.RUNNING and frozen.params == {k: v for k, v in cfg.items()}
    assert frozen.user_attrs["ray_trial_id"] == "t1"
    trial.report(0.4, 1)
    ot.tell(trial, state=TrialState.PRUNED)
    assert ot.stored(trial).state == TrialState.PRUNED and ot.stored(trial).intermediate_values == {1: 0.4}

    s.suggest("t2")
    [waiting] = [t for t in ot.unfinished() if ot.storage_id(t) == ot.storage_id(ot.trials["t2"])]
    ot.mark_failed(waiting, "orphaned_by_restore")
    got = _stored(db)["t2"]
    assert got.state == TrialState.FAIL and got.system_attrs["orphaned_by_restore"] is True
    assert ot.unfinished() == []


def test_hooks_keep_an_honest_study(tmp_path):
    """ASHA-stopped -> PRUNED with its last value as the final intermediate; full length or
    early-stopped -> COMPLETE; errored -> FAIL; a second completion is ignored."""
    db = tmp_path / "study.db"
    s = _searcher(db)
    for tid in ("stopped", "full", "early", "errored", "no_result"):
        s.suggest(tid)
    s.on_trial_result("stopped", {"epoch": 1, "objective": 0.3})
    s.on_trial_complete("stopped", {"epoch": 2, "objective": 0.5})
    for e in range(1, MAX_T + 1):
        s.on_trial_result("full", {"epoch": e, "objective": 0.1 * e})
    s.on_trial_complete("full", {"epoch": MAX_T, "objective": 0.4})
    s.on_trial_complete("early", {"epoch": 2, "objective": 0.7, "stopped_early": True})
    s.on_trial_complete("errored", {"epoch": 1, "objective": 0.2}, error=True)
    s.on_trial_complete("no_result", None)
    s.on_trial_complete("full", {"epoch": MAX_T, "objective": 0.99})   # ignored
    s.on_trial_result("full", {"epoch": MAX_T + 1, "objective": 0.99})  # ignored
    st = _stored(db)
    assert st["stopped"].state == TrialState.PRUNED and st["stopped"].intermediate_values == {1: 0.3, 2: 0.5}
    assert st["stopped"].user_attrs["epochs_run"] == 2
    assert st["full"].state == TrialState.COMPLETE and st["full"].value == pytest.approx(0.4)
    assert set(st["full"].intermediate_values) == set(range(1, MAX_T + 1))
    assert st["early"].state == TrialState.COMPLETE and st["early"].value == pytest.approx(0.7)
    assert st["errored"].state == TrialState.FAIL
    assert st["no_result"].state == TrialState.PRUNED
    assert s.internals.completed == set(st)


def _restored(*trials) -> dict:
    """A restored Tune trial list as SweepSearchGenerator hands it to reconcile."""
    return {t: {"trial_id": t, "status": "RUNNING", "config": {}} for t in trials}


def test_restore_fails_trials_proposed_after_the_snapshot(tmp_path):
    db = tmp_path / "study.db"
    s = _searcher(db)
    s.suggest("t1")
    s.on_trial_complete("t1", {"epoch": MAX_T, "objective": 0.5})
    s.suggest("t2")                       # known to the snapshot, still running
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("t3")                       # proposed after the snapshot: orphaned by a restore
    r = _searcher(db)
    r.restore(str(tmp_path / "searcher.pkl"))
    r.reconcile(_restored("t1", "t2"))
    st = _stored(db)
    assert st["t1"].state == TrialState.COMPLETE
    assert st["t2"].state == TrialState.RUNNING and "orphaned_by_restore" not in st["t2"].system_attrs
    assert st["t3"].state == TrialState.FAIL and st["t3"].system_attrs["orphaned_by_restore"] is True
    assert set(r.internals.trials) == {"t1", "t2"} and r.internals.completed == {"t1"}
    r.on_trial_complete("t2", {"epoch": MAX_T, "objective": 0.6})
    assert _stored(db)["t2"].state == TrialState.COMPLETE


def test_restore_trusts_the_trial_list_over_an_older_searcher_snapshot(tmp_path):
    """The trial list is newer than the searcher's snapshot (they reach storage separately):
    a Ray trial the snapshot does not know gets its Optuna trial back by its tag, and is
    told when it ends, instead of being failed as an orphan."""
    db = tmp_path / "study.db"
    s = _searcher(db)
    s.suggest("t1")
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("t2")                       # in the restored trial list, not in the searcher snapshot
    r = _searcher(db)
    r.restore(str(tmp_path / "searcher.pkl"))
    r.reconcile(_restored("t1", "t2"))
    assert set(r.internals.trials) == {"t1", "t2"} and "orphaned_by_restore" not in _stored(db)["t2"].system_attrs
    r.on_trial_complete("t2", {"epoch": MAX_T, "objective": 0.7})
    assert _stored(db)["t2"].state == TrialState.COMPLETE and _stored(db)["t2"].value == pytest.approx(0.7)


def test_restore_readopts_trials_that_finished_after_the_snapshot(tmp_path):
    """A trial proposed and finished between the last snapshot and a crash is finished in the
    study but unknown to the restored Tune state, which proposes a replacement: the
    replacement gets that trial back (same parameters, first result kept), so the study
    still holds one result per trial."""
    db = tmp_path / "study.db"
    s = _searcher(db)
    s.suggest("t1")
    s.save(str(tmp_path / "searcher.pkl"))
    lost = s.suggest("t2")                # after the snapshot, and finished before the crash
    s.on_trial_result("t2", {"epoch": 1, "objective": 0.3})
    s.on_trial_complete("t2", {"epoch": 2, "objective": 0.45})
    r = _searcher(db)
    r.restore(str(tmp_path / "searcher.pkl"))
    r.reconcile(_restored("t1"))
    again = r.suggest("t9")               # Tune's replacement for the trial it lost
    assert again == lost                  # fixed and searched parameters alike
    r.suggest("t10")                      # later proposals are new Optuna trials again
    assert r.internals.trials["t9"].number == s.internals.trials["t2"].number
    assert r.internals.trials["t10"].number not in (r.internals.trials["t9"].number, 0)
    r.on_trial_result("t9", {"epoch": 1, "objective": 0.9})
    r.on_trial_complete("t9", {"epoch": 2, "objective": 0.99})
    st = _stored(db)
    assert st["t2"].state == TrialState.PRUNED and st["t2"].value == 0.45  # the first result stands
    assert st["t2"].intermediate_values == {1: 0.3, 2: 0.45}
    finished = [t for t in st.values() if t.state.is_finished()]
    assert len(finished) == 1 and len(st) == 3  # t2 (finished), t1 and t10 (running)
    # a second restore whose searcher snapshot lost the re-adoption: t9 finds its trial by its parameters
    q = _searcher(db)
    q.restore(str(tmp_path / "searcher.pkl"))
    q.reconcile({"t1": {"config": {}}, "t9": {"config": again}, "t10": {"config": {}}})
    assert q.internals.trials["t9"].number == s.internals.trials["t2"].number and q._readopt == []


# ----------------------------------------------------------------------------- the search generator

N, SLOTS = 6, 3


def _generator(db):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from tune.searcher import SweepSearchGenerator

    g = SweepSearchGenerator(ConcurrencyLimiter(_searcher(db), max_concurrent=SLOTS))
    g.add_configurations([tune.Experiment("sweep", lambda config: None, num_samples=N)])
    return g


def _snapshot(g, trials: dict, where):
    """What TuneController.save_to_dir writes: the trial list, then the search generator's state."""
    import json

    where.mkdir()
    (where / "experiment_state-s.json").write_text(json.dumps({"trial_data": [t.get_json_state() for t in trials.values()]}))
    g.save_to_dir(str(where), session_str="s")


def _finish(g, trial, value):
    from ray.tune.experiment import Trial

    g.on_trial_complete(trial.trial_id, {"epoch": MAX_T, "objective": value})
    trial.set_status(Trial.TERMINATED)


@pytest.mark.parametrize("trial_list,generator,searcher", [
    (t, gen, srch) for t in ("old", "new") for gen in ("old", "new") for srch in ("old", "new")])
def test_a_restore_from_snapshots_of_different_moments_accounts_for_every_trial(tmp_path, trial_list, generator,
                                                                                  searcher):
    """Tune uploads the trial list, the generator (count, limiter) and the searcher as separate
    files; a driver killed between uploads restores them from different moments. Every mix
    ends with exactly N Ray trials and N Optuna trials COMPLETE, the rest FAIL as orphans, none
    RUNNING, and no finished trial told twice. (Ray's own restore, measured before this
    generator: N+1 trials and one Optuna trial RUNNING forever for the (new, old, new) mix.)"""
    import json
    import shutil

    from ray.tune.experiment import Trial

    db = tmp_path / "study.db"
    g = _generator(db)
    trials = {}

    def propose():
        t = g.next_trial()
        assert t is not None
        t.set_status(Trial.RUNNING)
        trials[t.trial_id] = t
        return t

    t1, t2, t3 = propose(), propose(), propose()
    _finish(g, t1, 0.1)
    _snapshot(g, trials, tmp_path / "old")
    t4 = propose()
    _finish(g, t2, 0.2)
    propose()                                                    # t5
    _snapshot(g, trials, tmp_path / "new")
    _finish(g, t3, 0.3)                                          # after the last snapshot: the study knows
    t6 = propose()
    _finish(g, t4, 0.4)
    _finish(g, t6, 0.6)                                          # proposed and finished after it
    first = {t.number: t.value for t in _finished(db)}
    mix = tmp_path / "mix"                                       # the driver dies here
    mix.mkdir()
    shutil.copy(tmp_path / trial_list / "experiment_state-s.json", mix)
    shutil.copy(tmp_path / generator / "search_gen_state-s.json", mix)
    shutil.copy(tmp_path / searcher / "searcher-state-s.pkl", mix)

    r = _generator(db)                                           # Tuner.restore: the generator as first built
    r.restore_from_dir(str(mix))
    restored = [json.loads(js) for js, _ in json.loads((mix / "experiment_state-s.json").read_text())["trial_data"]]
    ray_trials = len(restored)
    for st in restored:                                          # Tune resumes the unfinished ones
        if st["status"] != "TERMINATED":
            _finish(r, trials[st["trial_id"]], 0.9)
    while (t := r.next_trial()) is not None:                     # and asks for the rest
        ray_trials += 1
        t.set_status(Trial.RUNNING)
        _finish(r, t, 0.5)
    assert r.is_finished() and ray_trials == N
    st = study_states(db)
    assert st.get("COMPLETE") == N and set(st) <= {"COMPLETE", "FAIL"}, st
    assert all(t.system_attrs.get("orphaned_by_restore") for t in _all(db) if t.state == TrialState.FAIL)
    assert all(v == first[num] for num, v in ((t.number, t.value) for t in _finished(db)) if num in first)


def _all(db):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{db}").get_trials(deepcopy=True)


def _finished(db):
    return [t for t in _all(db) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


@pytest.mark.parametrize("field", OptunaInternals.SEARCHER_FIELDS)
def test_a_missing_ray_field_is_named(tmp_path, field):
    s = _searcher(tmp_path / "study.db")
    s.suggest("t1")
    delattr(s, field)
    with pytest.raises(PrivateFieldGone, match=rf"OptunaSearch\.{field} is gone \(ray .*, optuna .*\)"):
        s.internals.check()


def test_a_missing_optuna_field_is_named(tmp_path):
    s = _searcher(tmp_path / "study.db")
    s.suggest("t1")
    trial = s.internals.trials["t1"]
    del trial._trial_id
    with pytest.raises(PrivateFieldGone, match=r"optuna\.Trial\._trial_id is gone"):
        s.internals.stored(trial)
    del s.internals.study._storage
    with pytest.raises(PrivateFieldGone, match=r"optuna\.Study\._storage is gone"):
        s.internals.check()


def test_a_missing_field_at_construction_fails_before_any_trial(tmp_path, monkeypatch):
    from ray.tune.search.optuna import OptunaSearch

    def init_without_trials(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._ot_trials
    original = OptunaSearch.__init__
    monkeypatch.setattr(OptunaSearch, "__init__", init_without_trials)
    with pytest.raises(PrivateFieldGone, match=r"_ot_trials is gone"):
        _searcher(tmp_path / "study.db")


def test_tune_keeps_as_many_trials_pending_as_the_sweep_has_slots(tmp_path):
    """Tune starts at most TUNE_MAX_PENDING_TRIALS_PG trials ahead of the cluster; for a searcher
    other than its random one its default is 1, a new trial one at a time as slots free up. Ray
    2.60 takes the ConcurrencyLimiter's limit (the sweep's slots) instead; this fails when an
    upgrade changes that, so the sweep can set the variable itself."""
    import os

    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import ConcurrencyLimiter

    from tune.searcher import SweepSearchGenerator

    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ
    gen = SweepSearchGenerator(ConcurrencyLimiter(_searcher(tmp_path / "study.db"), max_concurrent=7))
    assert _get_max_pending_trials(gen) == 7
