"""tune.export.trial_table on fake Tune results (no Ray cluster): every status branch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from tune.export import trial_table
from tune.trials import TRIAL_STATUSES

SW = SimpleNamespace(search_epochs=4, metric="balanced_accuracy", population=1)


@dataclass
class FakeResult:
    """The attributes of ray.tune.Result that trial_table reads."""

    metrics: dict | None
    config: dict | None = field(default_factory=lambda: {"arch": "dae", "lr": 1e-3})
    error: Exception | None = None
    path: str = "/sweep/ray_results/x/fallback_id"


def _m(tid, epoch, best, last=None, **kw):
    return {"trial_id": tid, "epoch": epoch, "best_objective": best, "objective": best if last is None else last,
            "best_epoch": max(1, epoch - 1), "hostname": "node1", "node_ip": "10.0.0.1", "time_total_s": 1.5, **kw}


def test_every_status_branch():
    grid = [
        FakeResult(_m("full", 4, 0.60, 0.55)),                                   # ran all search_epochs
        FakeResult(_m("early", 2, 0.70, stopped_early=True)),                   # patience stopped it
        FakeResult(_m("asha", 2, 0.50)),                                        # stopped by ASHA at a rung
        FakeResult(_m("err", 1, 0.90), error=RuntimeError("CUDA out of memory\ntraceback...")),
        FakeResult({}, config=None, path="/sweep/ray_results/x/never_reported"),  # no result at all
    ]
    df = trial_table(grid, SW).set_index("trial_id")
    assert df.loc["full", "status"] == "completed" and not df.loc["full", "early_stopped"]
    assert df.loc["early", "status"] == "completed" and df.loc["early", "early_stopped"]
    assert df.loc["asha", "status"] == "stopped_by_asha"
    assert df.loc["err", "status"] == "errored" and df.loc["err", "error"] == "CUDA out of memory"
    # the trial id falls back to the trial directory's name (the status of a trial that never
    # reported is not pinned here: trial_table counts it as stopped, which is questionable)
    assert df.loc["never_reported", "epochs_run"] == 0 and df.loc["never_reported", "status"] in TRIAL_STATUSES
    assert df.loc["full", "epochs_run"] == 4 and df.loc["asha", "epochs_run"] == 2
    assert df.loc["full", "best_objective"] == 0.60 and df.loc["full", "last_objective"] == 0.55
    assert df.loc["full", "param.arch"] == "dae" and df.loc["full", "node"] == "node1"
    assert df.loc["full", "wall_seconds"] == 1.5 and df.loc["full", "best_epoch"] == 3


def test_rows_sorted_by_best_value_missing_last():
    grid = [FakeResult(_m("b", 4, 0.5)), FakeResult({}, path="/r/none"), FakeResult(_m("a", 4, 0.8)),
            FakeResult(_m("c", 2, 0.6))]
    df = trial_table(grid, SW)
    assert list(df["trial_id"]) == ["a", "c", "b", "none"]
    assert math.isnan(df["best_objective"].iloc[-1])


def test_epoch_count_against_search_epochs():
    """A trial that reported more epochs than asked (a resumed run) is completed; one fewer is not."""
    df = trial_table([FakeResult(_m("over", 5, 0.5)), FakeResult(_m("under", 3, 0.5))], SW).set_index("trial_id")
    assert df.loc["over", "status"] == "completed" and df.loc["under", "status"] == "stopped_by_asha"


# ----------------------------------------------------------------------------- the defaults as the first trial

def _sweep_like(space: dict, base: dict | None = None):
    """(space, base) as a sweep holds them."""
    from tune.space import parse_space
    from xfer.config import ALL_ARCH_PARAMS, TrainConfig
    flat = {k: v for k, v in TrainConfig().to_flat().items() if k not in ALL_ARCH_PARAMS}
    return parse_space(space), {**flat, **(base or {})}


def test_default_point_is_the_shipped_defaults_within_the_space():
    from tune.space import BROAD_SPACE, parse_space
    from tune.configure import default_point
    from xfer.config import ALL_ARCH_PARAMS, ARCH_PARAMS, TrainConfig

    point = default_point(*_sweep_like(BROAD_SPACE))
    d = TrainConfig().to_flat()
    assert point == {k: d[k] for k in BROAD_SPACE if k not in ALL_ARCH_PARAMS or k in ARCH_PARAMS[d["arch"]]}
    # the command line's values are the defaults of its sweep
    assert default_point(*_sweep_like(BROAD_SPACE, {"lr": 1e-3}))["lr"] == 1e-3
    # a space that cannot produce the defaults enqueues nothing
    narrow = {**BROAD_SPACE, "lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}}
    assert default_point(*_sweep_like(narrow)) is None
    parse_space(BROAD_SPACE)  # unchanged


def test_without_a_test_line_self_training_and_the_joint_basis_leave_the_space():
    from tune.space import load_space
    from tune.configure import transductive_space

    space = load_space(None)
    assert transductive_space(space, True) is space
    plain = transductive_space(space, False)
    assert "lambda_pseudo" not in plain.params and "pseudo_fraction" not in plain.params
    assert plain.params["peak_repr"].kind == "fixed" and plain.params["peak_repr"].value == "lsi"


# ----------------------------------------------------------------------------- where trials ran, what failed

def test_node_ids_record_every_node_a_trial_reported_from():
    import pandas as pd

    moved = FakeResult(_m("moved", 4, 0.6, node_id="n2"))
    moved.metrics_dataframe = pd.DataFrame({"epoch": [1, 2, 3, 4], "node_id": ["n1", "n1", "n2", "n2"]})
    still = FakeResult(_m("still", 4, 0.5, node_id="n1"))
    df = trial_table([moved, still], SW).set_index("trial_id")
    assert df.loc["moved", "node_id"] == "n2" and df.loc["moved", "node_ids"] == "n1;n2"
    assert df.loc["still", "node_ids"] == "n1"


def test_error_column_names_the_exception_not_rays_header():
    from tune.trials import error_line

    ray_err = RuntimeError("\x1b[36mray::ImplicitFunc.restore()\x1b[39m (pid=1169, ip=10.0.0.2)\n"
                           "  File \"trainable.py\", line 547, in restore\n    raise ValueError(\n"
                           "ValueError: Could not recover from checkpoint as it does not exist on storage anymore.")
    assert error_line(ray_err).startswith("ValueError: Could not recover from checkpoint")
    assert error_line(RuntimeError("CUDA out of memory\ntraceback...")) == "CUDA out of memory"
    assert error_line(KeyError()) == "KeyError"


def test_storage_settings(tmp_path, monkeypatch):
    from types import SimpleNamespace as NS

    from tune.configure import _check_storage
    from tune.tuner import _train_storage

    monkeypatch.chdir(tmp_path)
    assert _check_storage(None) == "" and _check_storage("") == ""
    assert _check_storage("rel/results") == str(tmp_path / "rel" / "results")      # absolute for every node
    sw = NS(storage_uri="s3://b/sweeps?endpoint_override=h:1&scheme=http", output=tmp_path)
    assert _train_storage(sw) == "s3://b/sweeps_train?endpoint_override=h:1&scheme=http"
    assert _train_storage(NS(storage_uri="", output=tmp_path)) == str(tmp_path / "ray_train")


# ----------------------------------------------------------------------------- checkpoint policy

def _walk(policy, improved_at, epochs, write_s=0.01, epoch_s=0.5):
    """Epochs at which `policy` checkpoints a trial of `epochs` epochs improving at `improved_at`."""
    saved = []
    for e in range(1, epochs + 1):
        if policy.due({"epoch": e, "improved": e in improved_at, "epoch_seconds": epoch_s}, last=e == epochs):
            policy.saved(e, write_s)
            saved.append(e)
    return saved


def test_checkpoint_policy_fixed_interval_rungs_and_end():
    from tune.trainable import CheckpointPolicy

    # 5 epochs after the last checkpoint; ASHA rungs 2 4 8 get one only after a new best epoch
    assert _walk(CheckpointPolicy(5, rungs=(2, 4, 8)), improved_at={1, 3, 6, 7}, epochs=12) == [2, 4, 8, 12]
    assert _walk(CheckpointPolicy(5, rungs=(2, 4, 8)), improved_at={1}, epochs=12) == [2, 7, 12]
    assert _walk(CheckpointPolicy(5, rungs=(2, 4, 8)), improved_at=set(), epochs=12) == [5, 10, 12]


def test_checkpoint_policy_auto_interval_follows_the_cost():
    from tune.trainable import CheckpointPolicy

    p = CheckpointPolicy(0)                              # auto: 5 until a write was timed
    assert _walk(p, set(), 5, write_s=0.1, epoch_s=0.5) == [5]
    assert p.every == 4                                  # 0.1 s / (5 % of 0.5 s) = 4 epochs
    p = CheckpointPolicy(0)
    _walk(p, set(), 5, write_s=10.0, epoch_s=0.1)
    assert p.every == p.max_every                        # never more epochs than a failure may cost
    p = CheckpointPolicy(0)
    _walk(p, set(), 5, write_s=1e-4, epoch_s=1.0)
    assert p.every == 1                                  # cheap writes: every epoch


def test_checkpoint_policy_keeps_the_best_weights_wherever_asha_stops():
    """Wherever ASHA stops a trial (a rung) or the trial ends, its last checkpoint holds its best
    epoch (the sweep exports the best trial's best weights from its last checkpoint)."""
    import random

    from tune.trainable import CheckpointPolicy

    rng = random.Random(0)
    rungs, epochs = (3, 6, 12, 24), 30
    for _ in range(200):
        improved = {e for e in range(1, epochs + 1) if rng.random() < 0.3}
        for stop in (*rungs, epochs):
            p = CheckpointPolicy(rng.choice([0, 1, 5, 25]), rungs=rungs)
            saved = _walk(p, improved, stop, write_s=rng.uniform(0.001, 1), epoch_s=rng.uniform(0.05, 2))
            best = max((e for e in improved if e <= stop), default=0)
            if stop == epochs or best:
                assert saved and saved[-1] >= best, (stop, improved, saved)


def _ray_judged_epochs(after_warmup: bool, warm_from: int, rungs=(3, 6, 12, 24), max_t: int = 30) -> tuple:
    """(epochs at which Ray's scheduler recorded the trial at a rung, epochs it said STOP) for one
    trial reporting every epoch beside rivals that set high cutoffs (so a judged trial is stopped
    unless it reports well)."""
    from ray.tune.schedulers import TrialScheduler

    from tune.searcher import AfterWarmupASHA

    class _T:
        def __init__(self, tid):
            self.trial_id = tid

    s = AfterWarmupASHA(time_attr="epoch", metric="objective", mode="max", max_t=max_t, grace_period=rungs[0],
                        reduction_factor=2, after_warmup=after_warmup)
    rivals = [_T(f"r{i}") for i in range(4)]
    me = _T("me")
    for t in (*rivals, me):
        s.on_trial_add(None, t)
    for t in rivals:
        for e in range(1, max_t):
            s.on_trial_result(None, t, {"epoch": e, "objective": 0.9, "warmup": 1.0})
    judged, stops = [], []
    for e in range(1, max_t + 1):
        before = sum("me" in rec for _, rec in s._trial_info["me"]._rungs)
        a = s.on_trial_result(None, me, {"epoch": e, "objective": 0.1, "warmup": min(1.0, e / warm_from)})
        if sum("me" in rec for _, rec in s._trial_info["me"]._rungs) > before:
            judged.append(e)
        if a == TrialScheduler.STOP:
            stops.append(e)
    return judged, stops


def test_asha_after_warmup_judges_a_trial_only_once_warmed_and_the_policy_knows_when():
    """`--asha_after_warmup`: Ray's scheduler neither judges nor stops a trial while its warm-up
    is on; CheckpointPolicy.judged predicts the epochs at which it is judged (where it may be
    stopped, so where its best weights must be in storage), with and without the option."""
    from tune.trainable import CheckpointPolicy

    for after in (False, True):
        for warm_from in (1, 5, 6, 11, 20, 29):
            judged, stops = _ray_judged_epochs(after, warm_from)
            p = CheckpointPolicy(0, rungs=(3, 6, 12, 24), clock="after_warmup" if after else "epochs")
            # before max_t (there the trial ends anyway, and its last epoch always checkpoints)
            mine = [e for e in range(1, 30) if p.judged(e, min(1.0, e / warm_from) >= 1.0)]
            assert mine == judged, (after, warm_from, mine, judged)
            if after:
                assert all(e >= warm_from for e in judged + stops), (warm_from, judged, stops)
            assert not stops or stops[0] == judged[0]  # a poor trial goes at its first judgment
    assert _ray_judged_epochs(False, 11)[0] == [3, 6, 12, 24]
    assert _ray_judged_epochs(True, 11)[0][0] == 11          # between rungs: recorded at rung 6


def _ray_adapted_judgements(warmup_epochs: int, rungs=(3, 6, 12, 24), max_t: int = 30) -> tuple:
    """(epochs at which the sweep's default scheduler, `--rungs adapted`, recorded a trial with this
    warm-up at a rung, epochs it said STOP, epochs whose report had an eligible objective) for one
    poor trial reporting every epoch as xfer.training reports it, beside rivals that set high cutoffs."""
    from ray.tune.schedulers import TrialScheduler

    from tune.searcher import make_scheduler
    from xfer.losses import warmup_factor
    from xfer.training import adapted_epochs

    class _T:
        def __init__(self, tid):
            self.trial_id = tid

    s = make_scheduler("asha", "adapted", max_t, rungs[0], 2)
    s.set_search_properties("objective", "max")
    rivals = [_T(f"r{i}") for i in range(4)]
    me = _T("me")
    for t in (*rivals, me):
        s.on_trial_add(None, t)
    for t in rivals:
        for e in range(1, max_t):
            s.on_trial_result(None, t, {"epoch": e, "adapted_epochs": e, "objective": 0.9})
    judged, stops, eligible = [], [], []
    for e in range(1, max_t + 1):
        warm = warmup_factor(e - 1, warmup_epochs)
        if warm >= 1.0 or e == max_t:
            eligible.append(e)
        before = sum("me" in rec for _, rec in s._trial_info["me"]._rungs)
        a = s.on_trial_result(None, me, {"epoch": e, "adapted_epochs": adapted_epochs(e, warmup_epochs),
                                         "objective": 0.1, "warmup": warm})
        if sum("me" in rec for _, rec in s._trial_info["me"]._rungs) > before:
            judged.append(e)
        if a == TrialScheduler.STOP:
            stops.append(e)
            break
    return judged, stops, eligible


def test_adapted_rungs_judge_every_trial_after_the_same_epochs_past_its_own_warmup():
    """The default rung clock: a trial is judged at rung r after r epochs with its adaptation fully
    on, whatever its searched warm-up, so never before it has an objective value (an eligible
    epoch); CheckpointPolicy.judged predicts those epochs (where its best weights must be stored)."""
    from tune.trainable import CheckpointPolicy
    from xfer.training import adapted_epochs

    for w in (0, 1, 4, 10, 20, 26, 29):
        judged, stops, eligible = _ray_adapted_judgements(w)
        assert judged == [w + r for r in (3, 6, 12, 24) if w + r < 30][:1], (w, judged)  # a poor trial goes at once
        assert all(e in eligible for e in judged + stops), (w, judged, eligible)
        p = CheckpointPolicy(0, rungs=(3, 6, 12, 24), clock="adapted")
        mine = [e for e in range(1, 30) if p.judged(adapted_epochs(e, w), e > w)]
        assert mine[:1] == judged, (w, mine, judged)
        assert mine == [w + r for r in (3, 6, 12, 24) if w + r < 30]


def test_checkpoint_policy_keeps_the_best_weights_wherever_asha_after_warmup_stops():
    import random

    from tune.trainable import CheckpointPolicy

    rng = random.Random(1)
    rungs, epochs = (3, 6, 12, 24), 30
    for _ in range(200):
        warm_from = rng.randint(1, 25)
        improved = {e for e in range(warm_from, epochs + 1) if rng.random() < 0.3} | {warm_from}
        ref = CheckpointPolicy(0, rungs=rungs, clock="after_warmup")
        may_stop = [e for e in range(1, epochs + 1) if ref.judged(e, e >= warm_from)]
        for stop in (*may_stop, epochs):
            p = CheckpointPolicy(rng.choice([0, 1, 5, 25]), rungs=rungs, clock="after_warmup")
            saved = []
            for e in range(1, stop + 1):
                m = {"epoch": e, "improved": e in improved, "epoch_seconds": 0.5, "warmup": 1.0 if e >= warm_from else 0.5}
                if p.due(m, last=e == epochs):
                    p.saved(e, rng.uniform(0.001, 1))
                    saved.append(e)
            best = max((e for e in improved if e <= stop), default=0)
            assert saved and saved[-1] >= best, (warm_from, stop, improved, saved)


def _scheduler_with_rivals(clock: str, max_t: int, rivals_value: float):
    from tune.searcher import make_scheduler

    class _T:
        def __init__(self, tid):
            self.trial_id = tid

    s = make_scheduler("asha", clock, max_t, 3, 2)
    s.set_search_properties("objective", "max")
    rivals, me = [_T(f"r{i}") for i in range(4)], _T("me")
    for t in (*rivals, me):
        s.on_trial_add(None, t)
    for i, t in enumerate(rivals):
        for e in range(1, max_t):
            s.on_trial_result(None, t, {"epoch": e, "adapted_epochs": e, "objective": rivals_value + 0.01 * i,
                                        "warmup": 1.0})
    return s, me


def test_reports_held_back_leave_every_asha_decision_where_it_was():
    """A trial that reports only the epochs ReportGate sends (every 5th, or as time allows, plus
    the epochs ASHA judges, its checkpoints and its end) gets from Ray's scheduler the same rung
    records, with the same values, and the same STOP epoch as one reporting every epoch, on each
    rung clock; the epochs held back reach the searcher in the next report's `curve`."""
    import random

    from ray.tune.schedulers import TrialScheduler

    from tune.trainable import CheckpointPolicy, ReportGate
    from xfer.losses import warmup_factor
    from xfer.training import adapted_epochs

    rng = random.Random(3)
    max_t, rungs = 30, (3, 6, 12, 24)
    for clock in ("adapted", "after_warmup", "epochs"):
        for _ in range(40):
            w = rng.randint(0, 12)
            values = [rng.uniform(0.3, 0.7) for _ in range(max_t)]
            every, level = rng.choice([0, 2, 5, 50]), rng.uniform(0.3, 0.7)
            runs = []
            for gated in (False, True):
                s, me = _scheduler_with_rivals(clock, max_t, level)
                policy = CheckpointPolicy(0, rungs, clock=clock)
                gate = ReportGate(every, seconds=3600.0)    # auto: no second passes in this test
                sent, must, curve, stop = [], [], [], None
                for e in range(1, max_t + 1):
                    warm = warmup_factor(e - 1, w)
                    m = {"epoch": e, "adapted_epochs": adapted_epochs(e, w), "warmup": warm,
                         "objective": values[e - 1], "improved": False, "epoch_seconds": 0.1}
                    last = e == max_t
                    write = policy.due(m, last)
                    if last or write or policy.judged_now:
                        must.append(e)
                    if gated and not gate.send(e, last or write or policy.judged_now):
                        gate.hold(e, m["objective"])
                        continue
                    curve += gate.sent(e) + [[e, m["objective"]]]
                    sent.append(e)
                    if write:
                        policy.saved(e, 0.05)                # a write of half an epoch: every 10 epochs
                    if s.on_trial_result(None, me, m) == TrialScheduler.STOP:
                        stop = e
                        break
                records = {r: rec.get("me") for r, rec in s._trial_info["me"]._rungs if "me" in rec}
                runs.append((records, stop, curve, sent, must))
            (rec_a, stop_a, curve_a, sent_a, _), (rec_b, stop_b, curve_b, sent_b, must) = runs
            assert rec_a == rec_b and stop_a == stop_b, (clock, w, every, rec_a, rec_b, stop_a, stop_b)
            assert curve_a == curve_b                      # every objective reaches the searcher
            assert set(must) <= set(sent_b) <= set(sent_a)
            if every in (0, 50):                           # only the epochs that must go: rungs, checkpoints, end
                assert sent_b == must and len(sent_b) <= len(rungs) + 4, sent_b


def test_a_report_carries_its_trials_values_at_the_best_epoch():
    """trials.csv's values at the best epoch come from the trial's last report (each report carries
    them as at_best/...), not from the history of reports, which may skip the best epoch."""
    from tune.export import _at_best_epoch
    from tune.trainable import at_best

    best = {"epoch": 7, "objective": 0.6, "sel/agreement": 0.6, "sel/entropy": -0.2, "peak_val_balanced_accuracy": 0.7,
            "loss/total": 1.0}
    m = {"epoch": 12, "best_epoch": 7, "sel/agreement": 0.5, **at_best(best, "balanced_accuracy")}

    class _R:
        metrics_dataframe = None

    got = _at_best_epoch(_R(), m)
    assert got == {"sel/agreement": 0.6, "sel/entropy": -0.2, "peak_val_balanced_accuracy": 0.7}
