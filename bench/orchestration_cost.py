"""Benchmark: what orchestration costs — Ray Tune sweeps against the trials' own compute
and against a sequential plain-Optuna loop (the original research code's way).

    python -m bench.orchestration_cost [--size small] [--n_trials 8] [--epochs 10] [--num_cpus 2]
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
import os
import platform
import sys
import tempfile
from pathlib import Path

from bench.harness import XFER, data_flags, fit_seconds, run, simulate_into_store, write_results
from bench.harness.sweeps import SMALL_MODEL, plain_optuna, set_flags, sweep_figures


def run_sweep(store: Path, out: Path, args, extra: list[str], n_trials: int) -> dict:
    ran = run([*XFER, "tune", *data_flags(store, test=False), "--n_trials", str(n_trials), "--space", "broad",
               "--search_epochs", str(args.epochs), "--num_cpus", str(args.num_cpus), "--output_folder", str(out),
               *set_flags(SMALL_MODEL), *extra])
    f = sweep_figures(out)
    f["wall_s"] = ran.seconds                # the whole command: Ray start, data preparation, sweep, export
    f["sweep_wall_s"] = fit_seconds(ran.stdout)  # Tuner.fit() alone
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--n_trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--num_cpus", type=int, default=2)
    ap.add_argument("--torch_trials", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="orchestration_cost_"))
    store = work / "store"
    simulate_into_store(store, args.size, seed=0, lines="A")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size, "epochs": args.epochs,
           "n_trials": args.n_trials, "num_cpus": args.num_cpus}
    res["tune_function"] = run_sweep(store, work / "fn", args, [], args.n_trials)
    if args.torch_trials:
        res["tune_torch"] = run_sweep(store, work / "torch", args, ["--trainer", "torch"], args.torch_trials)
    res["plain_optuna"] = plain_optuna(store, args.epochs, args.n_trials, SMALL_MODEL)
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
        write_results(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
