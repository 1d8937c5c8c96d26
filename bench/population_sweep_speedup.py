"""CPU benchmark: a 32-trial sweep, populations against one configuration per trial, at equal budgets.

    python -m bench.population_sweep_speedup [--populations 1 8 16] [--n_trials 32] [--epochs 20]

The demo's job (what `make demo` sweeps): the `small` simulated pair, the training line
labelled, the test line's cells unlabelled (the agreement objective), `xfer tune` with its
shipped design (centred space, ASHA on adapted epochs, grace 5, reduction factor 2, greedy
final model) and the same budget in every arm: --n_trials members of --epochs epochs, on a local
Ray cluster of --num_cpus CPUs, one CPU per trial (so two populations, or two single trials, run
at once). Each arm differs only in `--population P` (P = 1: today's sweep). Per arm: the
command's wall time, Tuner.fit's wall time, the member-epochs trained, the members' statuses,
the best member's objective and the final model's scores on the test line (balanced accuracy,
accuracy, macro-F1: what a user gets for the time). Writes bench/results/population_sweep_speedup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from bench.harness import RESULTS, fit_seconds, population_tune_argv, run, simulate_into_store, write_results


def run_arm(store: Path, out: Path, population: int, args) -> dict:
    import pandas as pd

    ran = run(population_tune_argv(store, out, population, args.n_trials, args.epochs, args.num_cpus))
    df = pd.read_csv(out / "trials.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    best = json.loads((out / "best_params.json").read_text())
    return {"population": population, "wall_s": ran.seconds, "sweep_wall_s": fit_seconds(ran.stdout),
            "members": int(len(df)), "member_epochs": int(df["epochs_run"].sum()),
            "statuses": df["status"].value_counts().to_dict(),
            "best_objective": float(best["value"]), "final_members": len(best["final_model"]["members"]),
            "peak_test": {k: metrics["peak_test"][k] for k in ("balanced_accuracy", "accuracy", "macro_f1")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--populations", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--n_trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--size", default="small")
    ap.add_argument("--num_cpus", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "population_sweep_speedup.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_popsweep_"))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size, "n_trials": args.n_trials,
           "epochs": args.epochs, "num_cpus": args.num_cpus, "method": __doc__.split("\n\n")[2].replace("\n", " "),
           "arms": []}
    try:
        store = work / "store"
        simulate_into_store(store, args.size, seed=0)
        for p in args.populations:
            row = run_arm(store, work / f"p{p}", p, args)
            res["arms"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"p{p}", ignore_errors=True)  # checkpoints: the figures are kept
            write_results(args.out, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((a for a in res["arms"] if a["population"] == 1), None)
    if base:
        for a in res["arms"]:
            a["speedup_vs_p1"] = base["wall_s"] / a["wall_s"]
            a["sweep_speedup_vs_p1"] = (base["sweep_wall_s"] / a["sweep_wall_s"]) if a["sweep_wall_s"] else None
    write_results(args.out, res)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
