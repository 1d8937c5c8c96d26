"""CPU benchmark: a 32-trial sweep, populations against one configuration per trial, at equal budgets.

    python bench/bench_population_sweep.py [--populations 1 8 16] [--n_trials 32] [--epochs 20]

The demo's job (what `make demo` sweeps): the `small` simulated pair, the training line
labelled, the test line's cells unlabelled (the agreement objective), `xfer tune` with its
shipped design (centred space, ASHA on adapted epochs, grace 5, reduction factor 2, greedy
final model) and the same budget in every arm: --n_trials members of --epochs epochs, on a local
Ray cluster of --num_cpus CPUs, one CPU per trial (so two populations, or two single trials, run
at once). Each arm differs only in `--population P` (P = 1: today's sweep). Per arm: the
command's wall time, Tuner.fit's wall time, the member-epochs trained, the members' statuses,
the best member's objective and the final model's scores on the test line (balanced accuracy,
accuracy, macro-F1: what a user gets for the time). Writes bench/results/bench_population_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_store(size: str, work: Path) -> Path:
    from xfer.data.simulate import simulate_pair
    from xfer.data.store import CellStore

    store = work / "store"
    for line in simulate_pair(size, seed=0):
        for ds in (line.gex, line.peak):
            CellStore(str(store)).write(ds, overwrite=True)
    return store


def tune_command(store: Path, out: Path, population: int, args, *extra: str) -> list[str]:
    """`xfer tune` on make_store's pair (the test line's cells unlabelled), one CPU per trial."""
    return [sys.executable, "-m", "xfer.cli", "tune", "--store", str(store), "--src_csv", "store:simA_GEX",
            "--tgt_csv", "store:simA_PEAK", "--test_csv", "store:simB_GEX", "--sup_peak_csv", "store:simB_PEAK",
            "--n_trials", str(args.n_trials), "--search_epochs", str(args.epochs), "--num_cpus", str(args.num_cpus),
            "--cpus_per_trial", "1", "--population", str(population), "--output_folder", str(out),
            "--progress_every", "600", *extra]


def run_arm(store: Path, out: Path, population: int, args) -> dict:
    import pandas as pd

    cmd = tune_command(store, out, population, args)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    m = re.search(r"trials in ([0-9.]+) s", r.stdout)
    df = pd.read_csv(out / "trials.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    best = json.loads((out / "best_params.json").read_text())
    return {"population": population, "wall_s": wall, "sweep_wall_s": float(m.group(1)) if m else None,
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
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_population_sweep.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_popsweep_"))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size, "n_trials": args.n_trials,
           "epochs": args.epochs, "num_cpus": args.num_cpus, "method": __doc__.split("\n\n")[2].replace("\n", " "),
           "arms": []}
    try:
        store = make_store(args.size, work)
        for p in args.populations:
            row = run_arm(store, work / f"p{p}", p, args)
            res["arms"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"p{p}", ignore_errors=True)  # checkpoints: the figures are kept
            Path(args.out).write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((a for a in res["arms"] if a["population"] == 1), None)
    if base:
        for a in res["arms"]:
            a["speedup_vs_p1"] = base["wall_s"] / a["wall_s"]
            a["sweep_speedup_vs_p1"] = (base["sweep_wall_s"] / a["sweep_wall_s"]) if a["sweep_wall_s"] else None
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
