"""Ray Tune sweeps on a local cluster (num_cpus=2): pruning, accounting, outputs, resume after SIGKILL.

Each sweep runs `xfer tune` in a subprocess (its own Ray cluster, shut down when it exits),
so a killed driver cannot take pytest with it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import SMALL_MODEL, study_states

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

XFER = [sys.executable, "-m", "xfer.cli"]
FIX = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k in ("hidden_dim", "latent_dim", "proj_hidden", "batch_size")]
FIX += ["--set=n_layers=1", "--set=n_components=16", "--set=disc_hidden=64", "--set=cls_hidden=32"]


@pytest.fixture(scope="module")
def store(tiny_store):
    return tiny_store


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "XFER_NODE_CACHE": os.environ.get("XFER_NODE_CACHE", "")
            or str(Path(os.environ.get("TMPDIR", "/tmp")) / "xfer_test_node_cache")}


def _tune_args(store, out, *extra, test=True):
    args = ["tune", "--store", str(store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--output_folder", str(out), "--num_cpus", "2", "--cpus_per_trial", "1", "--space", "broad", *FIX, *extra]
    if test:
        args += ["--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK"]
    return args


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, store):
    out = tmp_path_factory.mktemp("smoke") / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--n_trials", "6", "--search_epochs", "4", "--grace_period", "1",
                                         "--reduction_factor", "2", "--set=warmup_epochs=1",
                                         "--tensorboard"), env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_smoke_sweep_prunes_and_accounts_for_every_trial(smoke):
    out, r = smoke
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 6 and df["trial_id"].is_unique                     # more trials than the 2 slots
    assert (df["status"] == "errored").sum() == 0 and df["error"].isna().all()
    assert pd.read_parquet(out / "trials.parquet").shape[0] == 6
    assert {"param.arch", "param.lr", "best_objective", "node", "wall_seconds"} <= set(df.columns)
    # Each status agrees with the epochs the trial ran: a completed trial ran all 4 search epochs
    # (patience 20 cannot stop a 4-epoch trial early); ASHA (grace 1, reduction factor 2, its rungs
    # counting the epochs after the 1-epoch warm-up) stops a trial only at a rung, after epoch 2
    # or 3, each time with an objective value to judge it by.
    completed, stopped = df[df["status"] == "completed"], df[df["status"] == "stopped_by_asha"]
    assert len(completed) >= 1 and len(stopped) >= 1 and len(completed) + len(stopped) == 6
    assert (completed["epochs_run"] == 4).all() and not completed["early_stopped"].any()
    assert set(stopped["epochs_run"]) <= {2, 3}
    assert (df["best_epoch"] >= 2).all() and (df["best_epoch"] <= df["epochs_run"]).all()
    assert df["best_objective"].notna().all()
    # Optuna study, trial by trial (joined on the Ray trial id the searcher tags): ASHA-stopped
    # trials are PRUNED with their last value as the last intermediate, completed ones COMPLETE
    # with it as the value; the epochs and the searched parameters are the trial's. (Tune hands
    # the result that ends a trial to on_trial_complete only, so a completed trial's last epoch
    # is its value, not an intermediate.)
    import optuna
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'optuna_study.db'}")
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in study.get_trials()}
    assert len(study.get_trials()) == 6 and set(by_ray_id) == set(df["trial_id"])
    for _, row in df.iterrows():
        t = by_ray_id[row["trial_id"]]
        last = row["last_objective"]
        assert t.user_attrs["epochs_run"] == row["epochs_run"], row["trial_id"]
        iv = t.intermediate_values
        assert set(range(1, row["epochs_run"])) <= set(iv) and max(iv) <= row["epochs_run"], (row["trial_id"], iv)
        assert t.params["arch"] == row["param.arch"] and t.params["lr"] == pytest.approx(row["param.lr"])
        if row["status"] == "completed":
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(last), row["trial_id"]
        else:
            assert t.state == optuna.trial.TrialState.PRUNED, row["trial_id"]
            assert iv[row["epochs_run"]] == pytest.approx(last), (row["trial_id"], iv)
    # best_params.json (the best trial) feeds `xfer train --config_path`; best_model.pt: the final
    # model of tune/final_model.py (the default rule, greedy by the average's own objective, from
    # the trials that ran all 4 epochs), each member a whole predictor at its best epoch
    import torch
    from xfer.config import TrainConfig
    cfg = TrainConfig.from_file(out / "best_params.json")
    assert cfg.model.hidden_dim == SMALL_MODEL["hidden_dim"]
    bp = json.loads((out / "best_params.json").read_text())
    fm = bp["final_model"]
    assert fm["asked"] == 8 and fm["rule"] == "greedy" and 1 <= len(fm["members"]) <= 8
    assert df.iloc[0]["trial_id"] == bp["trial_id"]
    ids = [m["trial_id"] for m in fm["members"]]
    assert set(ids) <= set(completed["trial_id"]) and len(set(ids)) == len(ids)
    assert fm["defaults_trial"] is not None and fm["objective"] >= fm["defaults_trial"]["value"] - 1e-9
    if not fm["guarded"]:
        assert ids[0] == completed.iloc[0]["trial_id"]          # greedy starts from the best finished trial
    ck = torch.load(out / "best_model.pt", weights_only=True)
    members = ck["ensemble"] if len(ids) > 1 else [ck]
    assert len(members) == len(ids) and all("train_state" not in m for m in members)
    for m, tid in zip(members, ids):
        row = df.set_index("trial_id").loc[tid]
        assert m["config"]["model"]["arch"] == row["param.arch"] and m["epoch"] == row["best_epoch"], tid
    # the test line only scores the final model, after the search
    m = json.loads((out / "metrics.json").read_text())
    assert {"gex_val", "gex_test", "peak_val", "peak_test", "baselines"} <= set(m)
    assert m["model"]["n_members"] == len(ids)
    assert list((out / "ray_results").rglob("events.out.tfevents*")), "no TensorBoard logs with --tensorboard"
    assert "Ray dashboard: http://127.0.0.1:" in r.stdout
    # the compact progress display (tune/progress.py; plain lines, as stdout is a pipe), not Tune's tables
    assert "Trial status:" not in r.stdout and "\x1b[" not in r.stdout
    ended = [ln for ln in r.stdout.splitlines() if ln.startswith("trial ")]
    assert len(ended) == 6 and sum("stopped by ASHA" in ln for ln in ended) == len(stopped), ended
    assert "sweep 'sweep' finished: 6 of 6 trials" in r.stdout


def test_predict_with_the_sweeps_checkpoint_reproduces_its_scoring(smoke, store, tmp_path):
    """best_model.pt of a sweep is a whole predictor: `xfer predict` on the test line gives the
    predictions the sweep scored its best trial with."""
    from test_predict import _assert_same
    out, _ = smoke
    r = subprocess.run(XFER + ["predict", "--checkpoint", str(out / "best_model.pt"), "--store", str(store),
                               "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK",
                               "--output_folder", str(tmp_path / "pred")], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(tmp_path / "pred" / "predictions.csv", out / "predictions_peak_test.csv")
    _assert_same(tmp_path / "pred" / "predictions_gex.csv", out / "predictions_gex_test.csv")


def test_trials_adapt_to_the_test_line_without_its_labels(smoke):
    """Trials get the test line's datasets (transductive) and never score on it: no test-line
    metric in any trial's results; the labels are dropped on read (tests/test_selection.py
    proves relabelling the test line changes no trial's report)."""
    from tune.data import DataSpec
    from xfer.selection import CANDIDATES, TRANSFER
    out, _ = smoke
    sweep = json.loads((out / "sweep.json").read_text())
    spec = DataSpec(**sweep["spec"])
    assert (spec.src, spec.tgt, spec.test, spec.sup_peak) == ("A_GEX", "A_PEAK", "B_GEX", "B_PEAK")
    assert spec.transductive and sweep["objective"] == TRANSFER["with_expression"]
    results = list((out / "ray_results").rglob("result.json"))
    assert results
    for res in results:
        for line in res.read_text().splitlines():
            keys = json.loads(line).keys()
            assert not any(k.startswith(("gex_test", "peak_test")) for k in keys), keys
    # trials.csv: every candidate and the training line's metric at each trial's best epoch
    df = pd.read_csv(out / "trials.csv")
    assert {f"sel.{c}" for c in CANDIDATES} | {"best_objective", "peak_val_balanced_accuracy"} <= set(df.columns)
    done = df.dropna(subset=["best_objective"])
    assert (done["best_objective"] == done[f"sel.{TRANSFER['with_expression']}"]).all()
    best = json.loads((out / "best_params.json").read_text())
    assert best["objective"] == TRANSFER["with_expression"] and best["objective_setting"] == "auto"


def test_the_defaults_are_the_first_trial(smoke):
    import optuna
    from tune.space import BROAD_SPACE
    from xfer.config import ALL_ARCH_PARAMS, ARCH_PARAMS, TrainConfig
    out, _ = smoke
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'optuna_study.db'}")
    first = min(study.get_trials(), key=lambda t: t.number)
    defaults = TrainConfig().to_flat()
    fixed = {k[len("--set="):].split("=")[0] for k in FIX} | {"warmup_epochs"}  # the smoke sweep fixes it
    expect = {k: defaults[k] for k in BROAD_SPACE if k not in fixed and
              (k not in ALL_ARCH_PARAMS or k in ARCH_PARAMS[defaults["arch"]])}
    assert first.params == pytest.approx(expect)


def test_bad_space_fails_before_any_trial(tmp_path, store):
    (tmp_path / "bad.yaml").write_text("lr: {type: float, low: 0.1, high: 0.01}\n")
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--space", str(tmp_path / "bad.yaml")), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "bad.yaml: config key 'lr': needs low < high" in r.stderr
    assert not (out / "sweep.json").exists() and not (out / "ray_results").exists()


def test_search_epochs_inside_every_warmup_fail_before_anything_starts(tmp_path, store):
    """The default (centred) space warms every trial up for 5-15 epochs: a 4-epoch sweep could
    never judge a trial, so it fails at once, naming the flag, with nothing written."""
    out = tmp_path / "sweep"
    args = [a for a in _tune_args(store, out, "--n_trials", "2", "--search_epochs", "4") if a != "broad"]
    args.remove("--space")
    r = subprocess.run(XFER + args, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "search_epochs" in err[0] and "warmup_epochs >= 5" in err[0], r.stderr
    assert not out.exists()


def test_no_trial_is_judged_inside_its_warmup_and_the_final_model_holds_only_judged_trials(tmp_path, store):
    """Every trial warms up for 1-3 epochs and ASHA's first rung is 1, so rungs counted in plain
    epochs (1, 2, 4: `--rungs epochs`) would judge every trial at epoch 1,
    inside its warm-up, with no objective value yet. The default rungs count the epochs after each
    trial's own warm-up: no trial is stopped without an objective value, and every member of the
    final model has one and ran the whole budget (the same footing)."""
    space = tmp_path / "space.yaml"
    space.write_text("warmup_epochs: {type: int, low: 1, high: 3}\n"
                     "lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n"
                     "arch: {type: categorical, choices: [dae, mlp]}\n")
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--n_trials", "6", "--search_epochs", "6", "--grace_period", "1",
                                         "--reduction_factor", "2", "--space", str(space), "--final_ensemble", "3"),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sw = json.loads((out / "sweep.json").read_text())
    assert (sw["scheduler"], sw["rungs"], sw["final_model"]) == ("asha", "adapted", "greedy")
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 6 and (df["status"] != "errored").all()
    warm = df["param.warmup_epochs"]
    assert (warm >= 1).all()                      # plain-epoch rung 1 falls inside every trial's warm-up
    assert df["best_objective"].notna().all(), df[["trial_id", "status", "epochs_run", "best_objective"]]
    assert (df["best_epoch"] > warm).all() and (df["epochs_run"] > warm).all()
    stopped = df[df["status"] == "stopped_by_asha"]
    assert (stopped["epochs_run"] - stopped["param.warmup_epochs"]).isin([1, 2, 4]).all()  # at an adapted rung
    bp = json.loads((out / "best_params.json").read_text())
    rows = df.set_index("trial_id").loc[[m["trial_id"] for m in bp["final_model"]["members"]]]
    assert 1 <= len(rows) <= 3 and rows["best_objective"].notna().all() and (rows["status"] == "completed").all()
    assert [m["value"] for m in bp["final_model"]["members"]] == pytest.approx(list(rows["best_objective"]))
    import torch
    ck = torch.load(out / "best_model.pt", weights_only=True)
    assert [m["epoch"] for m in ck.get("ensemble", [ck])] == list(rows["best_epoch"])


@pytest.mark.parametrize("k", ["0", "33"])
def test_final_ensemble_outside_1_to_32_fails_before_anything_is_written(tmp_path, store, k):
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--n_trials", "6", "--final_ensemble", k), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "final_ensemble" in err[0] and "1..32" in err[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [(("--population", "0"), "1..1024"),
                                          (("--population", "4", "--num_workers", "2"), "fast path")])
def test_a_bad_population_fails_before_anything_is_written(tmp_path, store, extra, words):
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--n_trials", "6", *extra), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "population" in err[0] and words in err[0], r.stderr
    assert not out.exists()


def test_unusable_storage_fails_before_anything_is_written(tmp_path, store):
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--storage", "nosuchfs://bucket/sweeps"), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "storage" in err[0] and "nosuchfs://bucket/sweeps" in err[0], r.stderr
    assert not out.exists()


def test_torch_trainer_trials(tmp_path, store):
    """Multi-worker trials: a Ray Train TorchTrainer with 2 data-parallel workers per trial."""
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--n_trials", "1", "--search_epochs", "2", "--num_workers", "2",
                                         "--cpus_per_trial", "2", test=False),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out / "trials.csv")
    assert list(df["status"]) == ["completed"] and list(df["epochs_run"]) == [2]
    assert (out / "best_model.pt").exists()
    assert list((out / "ray_train").glob("train-*")), "no Ray Train run named train-<trial id>"


def _finished_values(db) -> dict:
    """{Optuna trial number: value} of the study's finished trials."""
    with sqlite3.connect(db) as c:
        return dict(c.execute("select t.number, v.value from trials t join trial_values v using(trial_id) "
                              "where t.state in ('COMPLETE','PRUNED')").fetchall())


def _kill_and_resume(out, args, n: int):
    """Start the sweep, SIGKILL its driver (and the Ray processes it started) once two of its n
    trials have finished, then `--resume` it. Returns (finished values before, the resume's run)."""
    proc = subprocess.Popen(XFER + args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    finished_before = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            st = study_states(out / "optuna_study.db")
            finished_before = st.get("COMPLETE", 0) + st.get("PRUNED", 0)
            if finished_before >= 2:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    assert 2 <= finished_before < n
    done = _finished_values(out / "optuna_study.db")
    time.sleep(2)
    r = subprocess.run(XFER + ["tune", "--resume", "--output_folder", str(out), "--num_cpus", "2"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return done, r


def test_resume_after_sigkill_of_the_driver(tmp_path, store):
    out = tmp_path / "sweep"
    args = _tune_args(store, out, "--n_trials", "6", "--search_epochs", "6", "--grace_period", "6", test=False)
    done, r = _kill_and_resume(out, args, 6)
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 6 and df["trial_id"].is_unique and (df["status"] != "errored").all()
    after = _finished_values(out / "optuna_study.db")
    assert len(after) == 6                                    # nothing lost, nothing run twice
    assert "sweep 'sweep' finished: 6 of 6 trials" in r.stdout  # the resumed sweep shows the display too
    assert all(after[n] == v for n, v in done.items())        # finished trials kept their results


def test_a_population_sweep_writes_one_row_per_member(tmp_path, store):
    """--population 8: two Ray trials of eight members each; every member is its own Optuna trial
    and trials.csv row (with its population's id), judged on its own by the members' ASHA, and the
    final model is built from members' checkpoints."""
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _tune_args(store, out, "--n_trials", "16", "--population", "8", "--search_epochs", "4",
                                         "--grace_period", "1", "--set=warmup_epochs=1"),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 16 and df["trial_id"].is_unique and df["population_id"].nunique() == 2
    assert sorted(df["optuna_trial"]) == list(range(16)) and (df["status"] != "errored").all()
    for _, pop in df.groupby("population_id"):  # one shape per population, its scalars searched
        assert pop["param.arch"].nunique() == 1 and pop["param.hidden_dim"].nunique() == 1
        assert pop["param.lr"].nunique() == 8
    states = study_states(out / "optuna_study.db")
    assert states.get("COMPLETE", 0) == (df["status"] == "completed").sum()
    assert states.get("PRUNED", 0) == (df["status"] == "stopped_by_asha").sum()
    stopped = df[df["status"] == "stopped_by_asha"]
    assert (stopped["epochs_run"] < 4).all() and (df[df["status"] == "completed"]["epochs_run"] == 4).all()
    best = json.loads((out / "best_params.json").read_text())
    assert best["trial_id"] == df.iloc[0]["trial_id"] and best["final_model"]["members"]
    assert all(m["trial_id"] in set(df["trial_id"]) for m in best["final_model"]["members"])
    assert (out / "best_model.pt").exists() and (out / "report.html").exists()
    d = df.set_index("optuna_trial").loc[0]  # the shipped defaults are the first member
    assert d["param.lr"] == pytest.approx(3e-4)
    # reports go out at most once a second, yet each member's Optuna trial has its whole curve
    import optuna
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'optuna_study.db'}")
    for t in study.get_trials():
        row = df.set_index("optuna_trial").loc[t.number]
        assert set(t.intermediate_values) == set(range(1, int(row["epochs_run"]) + 1)), (t.number, t.intermediate_values)
    assert not list((out / "ray_results").rglob("events.out.tfevents*"))   # TensorBoard only with --tensorboard


def test_a_population_sweep_resumes_after_sigkill_of_the_driver(tmp_path, store):
    """Killed while populations train, resumed: every member ends with exactly one result, the
    members that had finished keep theirs, and trials.csv has one row per member."""
    out = tmp_path / "sweep"
    args = _tune_args(store, out, "--n_trials", "24", "--population", "8", "--search_epochs", "6", "--grace_period",
                      "6", test=False)
    done, _ = _kill_and_resume(out, args, 24)                # three populations of 8 on two slots
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 24 and df["trial_id"].is_unique and (df["status"] != "errored").all()
    after = _finished_values(out / "optuna_study.db")
    with sqlite3.connect(out / "optuna_study.db") as c:
        n_trials = c.execute("select count(*) from trials where state != 'FAIL'").fetchone()[0]
    assert len(after) == 24 and n_trials == 24               # nothing lost, nothing run twice
    assert all(after[n] == v for n, v in done.items())       # finished members kept their results
    assert sorted(df["optuna_trial"]) == sorted(after)
