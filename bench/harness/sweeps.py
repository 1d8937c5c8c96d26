"""What a finished `xfer tune` sweep's trials report, read from its ray_results, and the plain
Optuna loop the sweeps are compared with (orchestration_cost, sweep_overhead, gpu_sweep)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .pairs import TRAIN

# a small model, fixed in every sweep of orchestration_cost and sweep_overhead (--set KEY=VALUE)
SMALL_MODEL = {"hidden_dim": 256, "latent_dim": 64, "batch_size": 256}


def set_flags(fixed: dict) -> list[str]:
    """`--set=KEY=VALUE` for each fixed key."""
    return [f"--set={k}={v}" for k, v in fixed.items()]


def sweep_figures(out: Path) -> dict:
    """Per trial of a finished sweep: its epochs, its own compute (the loop's epoch_seconds), its
    start-up (Tune's first time_this_iter_s minus the first epoch's own seconds) and its wall."""
    trials = []
    for res in sorted((out / "ray_results").rglob("result.json")):
        rows = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        compute = sum(r.get("epoch_seconds", 0.0) for r in rows)
        startup = rows[0]["time_this_iter_s"] - rows[0].get("epoch_seconds", 0.0)
        trials.append({"epochs": rows[-1]["epoch"], "compute_s": compute, "startup_s": startup,
                       "trial_s": rows[-1]["time_total_s"]})
    return {"n_trials": len(trials), "compute_s": sum(t["compute_s"] for t in trials),
            "startup_median_s": statistics.median(t["startup_s"] for t in trials),
            "startup_max_s": max(t["startup_s"] for t in trials),
            "epochs_total": sum(t["epochs"] for t in trials), "trials": trials}


def plain_optuna(store: Path, epochs: int, n_trials: int, fixed: dict) -> dict:
    """A sequential Optuna loop in this process (TPE, MedianPruner), no Ray, over the training
    line in `store`, the broad space with `fixed` keys and `epochs` epochs: its wall (data
    preparation included) and its trials' compute."""
    import optuna
    import torch

    from tune.data import DataSpec, prepare_from_store
    from tune.space import load_space
    from xfer.config import TrainConfig
    from xfer.data.store import CellStore
    from xfer.training import fit

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = CellStore(str(store))
    spec = DataSpec(store=str(store), src=TRAIN[0], tgt=TRAIN[1], src_hash=s.manifest(TRAIN[0]).content_hash,
                    tgt_hash=s.manifest(TRAIN[1]).content_hash)
    space = load_space("broad").with_fixed(fixed)
    t0 = time.perf_counter()
    data = prepare_from_store(spec, TrainConfig.from_dict({"epochs": epochs}))
    compute = 0.0

    def objective(trial):
        nonlocal compute
        cfg = TrainConfig.from_dict({**space(trial), "epochs": epochs})

        def report(m, _ck):
            nonlocal compute
            compute += m["epoch_seconds"]
            trial.report(m["objective"], m["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()
        return fit(cfg, data, report).best_metric

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.optimize(objective, n_trials=n_trials)
    return {"wall_s": time.perf_counter() - t0, "compute_s": compute, "n_trials": len(study.trials),
            "pruned": sum(t.state.name == "PRUNED" for t in study.trials)}


def slot_breakdown(results: Path, fit_wall: float, slots: int) -> dict:
    """Tuner.fit's slot-time (its wall x slots), split from every trial's result.json: the
    trials' compute, start-up, reporting and checkpoints, and the idle slots (sweep_overhead)."""
    trials = []
    for f in sorted(results.rglob("result.json")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        end = rows[-1]["timestamp"]
        start = end - rows[-1]["time_total_s"]
        compute = sum(r.get("epoch_seconds", 0.0) for r in rows)
        ckpt = sum(r.get("checkpoint_seconds", 0.0) for r in rows)
        startup = rows[0]["time_this_iter_s"] - rows[0].get("epoch_seconds", 0.0) - rows[0].get("checkpoint_seconds", 0.0)
        reporting = sum(r["time_this_iter_s"] - r.get("epoch_seconds", 0.0) - r.get("checkpoint_seconds", 0.0)
                        for r in rows[1:])
        trials.append({"start": start, "end": end, "epochs": rows[-1]["epoch"], "compute_s": compute,
                       "checkpoint_s": ckpt, "startup_s": startup, "reporting_s": reporting,
                       "wall_s": rows[-1]["time_total_s"]})
    t0 = min(t["start"] for t in trials)
    t_end = max(t["end"] for t in trials)
    # idle slot-seconds on a fine grid: before the first trial is not seen here (fit's start is not in
    # result.json), so it is what fit's wall leaves over once the trials' span is accounted for
    step, busy_idle, tail = 0.01, 0.0, 0.0
    last_start = max(t["start"] for t in trials)
    x = t0
    while x < t_end:
        running = sum(t["start"] <= x < t["end"] for t in trials)
        free = max(0, slots - running) * step
        if x >= last_start:
            tail += free
        else:
            busy_idle += free
        x += step
    span = t_end - t0
    outside = max(0.0, fit_wall - span) * slots
    # fit's start: Tune writes tuner.pkl when fit starts the experiment
    pkl = next(results.glob("*/tuner.pkl"), None)
    before = min(outside, max(0.0, t0 - pkl.stat().st_mtime) * slots) if pkl else None
    total = fit_wall * slots
    parts = {"compute": sum(t["compute_s"] for t in trials), "startup": sum(t["startup_s"] for t in trials),
             "reporting": sum(t["reporting_s"] for t in trials), "checkpoints": sum(t["checkpoint_s"] for t in trials),
             "idle: gaps between trials": busy_idle, "idle: ASHA tail": tail}
    if before is None:
        parts["idle: before the first trial and after the last"] = outside
    else:
        parts["idle: before the first trial"] = before
        parts["idle: after the last trial"] = outside - before
    parts["unaccounted"] = total - sum(parts.values())
    return {"slot_seconds": total, "parts": parts, "n_trials": len(trials),
            "epochs": sum(t["epochs"] for t in trials), "trials": trials}
