"""Benchmark: what orchestration costs — Ray Tune sweeps against the trials' own compute
and against a sequential plain-Optuna loop (the seed's way).

    python bench/bench_tune.py [--size small] [--n_trials 8] [--epochs 10] [--num_cpus 2]
                               [--torch_trials 2] [--json out.json]

1. `xfer tune` (function fast path): sweep wall time; per trial its own compute
   (the sum of the loop's `epoch_seconds`) and its start-up (Tune's first
   `time_this_iter_s` minus the first epoch's own seconds = trial start -> first
   report, data loading included); ideal wall = sum of compute / concurrent slots.
2. `xfer tune --trainer torch` (Ray Train TorchTrainer per trial): the same for a
   few trials, to show the start-up cost that made the fast path the default.
3. A plain Optuna loop in one process over the same data, space, epochs and
   number of trials (TPE, MedianPruner), no Ray: wall and compute.

ASHA and the pruner stop different trials, so the sums of compute differ; the
overhead figure compares each sweep with its own trials' compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXED = {"hidden_dim": 256, "latent_dim": 64, "batch_size": 256}
FIX = [f"--set={k}={v}" for k, v in FIXED.items()]


def sweep_figures(out: Path) -> dict:
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


def run_sweep(store: Path, out: Path, args, extra: list[str], n_trials: int) -> dict:
    cmd = [sys.executable, "-m", "xfer.cli", "tune", "--store", str(store), "--src_csv", "store:simA_GEX",
           "--tgt_csv", "store:simA_PEAK", "--n_trials", str(n_trials), "--space", "broad", "--search_epochs", str(args.epochs),
           "--num_cpus", str(args.num_cpus), "--output_folder", str(out), *FIX, *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    f = sweep_figures(out)
    f["wall_s"] = wall                       # the whole command: Ray start, data preparation, sweep, export
    import re
    m = re.search(r"trials in ([0-9.]+) s", r.stdout)
    f["sweep_wall_s"] = float(m.group(1)) if m else None  # Tuner.fit() alone
    return f


def plain_optuna(store: Path, args) -> dict:
    import optuna
    import torch

    from tune.space import load_space
    from xfer.config import TrainConfig
    from xfer.train import fit
    from tune.data import DataSpec, prepare_from_store
    from xfer.data.store import CellStore

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = CellStore(str(store))
    spec = DataSpec(store=str(store), src="simA_GEX", tgt="simA_PEAK", src_hash=s.manifest("simA_GEX").content_hash,
                    tgt_hash=s.manifest("simA_PEAK").content_hash)
    space = load_space("broad").with_fixed(FIXED)
    t0 = time.perf_counter()
    data = prepare_from_store(spec, TrainConfig.from_dict({"epochs": args.epochs}))
    compute = 0.0

    def objective(trial):
        nonlocal compute
        cfg = TrainConfig.from_dict({**space(trial), "epochs": args.epochs})

        def report(m, _ck):
            nonlocal compute
            compute += m["epoch_seconds"]
            trial.report(m["objective"], m["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()
        return fit(cfg, data, report).best_metric

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.optimize(objective, n_trials=args.n_trials)
    return {"wall_s": time.perf_counter() - t0, "compute_s": compute, "n_trials": len(study.trials),
            "pruned": sum(t.state.name == "PRUNED" for t in study.trials)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--n_trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--num_cpus", type=int, default=2)
    ap.add_argument("--torch_trials", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    from xfer.data.simulate import simulate_pair
    from xfer.data.store import CellStore

    work = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    store = work / "store"
    A, _ = simulate_pair(args.size, seed=0)
    for ds in (A.gex, A.peak):
        CellStore(str(store)).write(ds)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size, "epochs": args.epochs,
           "n_trials": args.n_trials, "num_cpus": args.num_cpus}
    res["tune_function"] = run_sweep(store, work / "fn", args, [], args.n_trials)
    if args.torch_trials:
        res["tune_torch"] = run_sweep(store, work / "torch", args, ["--trainer", "torch"], args.torch_trials)
    res["plain_optuna"] = plain_optuna(store, args)
    slots = args.num_cpus
    for key in ("tune_function", "tune_torch"):
        if key in res:
            f = res[key]
            f["ideal_wall_s"] = f["compute_s"] / min(slots, f["n_trials"])
            f["overhead_vs_compute"] = f["sweep_wall_s"] / f["ideal_wall_s"] - 1
            f["per_trial_startup_share"] = f["startup_median_s"] / (f["compute_s"] / f["n_trials"])
    po = res["plain_optuna"]
    po["overhead_vs_compute"] = po["wall_s"] / po["compute_s"] - 1
    print(f"{'run':16s} {'trials':>6s} {'command s':>9s} {'sweep s':>8s} {'compute s':>10s} {'ideal':>7s} "
          f"{'overhead':>9s} {'start-up s (median/max)':>24s}")
    for key in ("tune_function", "tune_torch", "plain_optuna"):
        if key not in res:
            continue
        f = res[key]
        su = f"{f['startup_median_s']:.2f} / {f['startup_max_s']:.2f}" if "startup_median_s" in f else "-"
        print(f"{key:16s} {f['n_trials']:6d} {f['wall_s']:9.1f} {f.get('sweep_wall_s') or f['wall_s']:8.1f} "
              f"{f['compute_s']:10.1f} {f.get('ideal_wall_s', f['compute_s']):7.1f} {f['overhead_vs_compute']:9.0%} "
              f"{su:>24s}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
