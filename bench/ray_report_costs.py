"""CPU benchmark: what Ray's per-report costs take from a sweep whose epochs are short, change by change.

    python -m bench.ray_report_costs [--size tiny] [--n_trials 8] [--epochs 30] [--repeats 3]

Where a GPU trains a trial's epoch in tens of milliseconds (BENCHMARKS.md: an H200 epoch of
research-sized data is 0.06-0.09 s), a Tune report per epoch is no longer small: the trial's training
thread waits for each report until the driver has processed it (Tune's function trainables report
synchronously; the driver runs the searcher, the scheduler, the loggers and the callbacks). This
script reproduces that regime on CPU with the `tiny` simulated pair, whose epochs are short too,
and runs the same `xfer tune` (the shipped design, 2 slots of 1 CPU) under each arm in turn, arm
after arm, `--repeats` rounds:

- `before`: a report every epoch and Tune's automatic loggers (TensorBoard's included), as before
  this change (`--report_every 1 --tensorboard`);
- `no_tensorboard`: a report every epoch, CSV and JSON loggers only (`--report_every 1`);
- `default`: the reports as the shipped default sends them (at most one a second, and always at
  the epochs ASHA judges, at checkpoints and at the end) with CSV and JSON loggers.

Per run: the command's wall, Tuner.fit's wall, the reports the trials sent (lines of their
result.json), the trials' epochs, and their mean wall per epoch (Tune's time_total_s over the
epochs run: the epoch's compute plus the wait for its report). Writes
bench/results/ray_report_costs.json; the medians over the rounds are what BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.harness import RESULTS, fit_seconds, population_tune_argv, run, simulate_into_store, write_results

ARMS = {"before": ["--report_every", "1", "--tensorboard"], "no_tensorboard": ["--report_every", "1"], "default": []}


def run_arm(store: Path, out: Path, extra: list[str], args) -> dict:
    ran = run(population_tune_argv(store, out, args.population, args.n_trials, args.epochs, args.num_cpus, *extra))
    reports, epochs, per_epoch = 0, 0, []
    for res in (out / "ray_results").rglob("result.json"):
        lines = [json.loads(ln) for ln in res.read_text().splitlines() if ln.strip()]
        if not lines:
            continue
        last = lines[-1]
        n = int(last.get("epoch", 0) or 0)
        reports += len(lines)
        epochs += n
        if n:
            per_epoch.append(float(last["time_total_s"]) / n)
    return {"wall_s": ran.seconds, "fit_s": fit_seconds(ran.stdout), "reports": reports, "epochs": epochs,
            "trial_s_per_epoch": statistics.mean(per_epoch) if per_epoch else None,
            "tfevents": len(list((out / "ray_results").rglob("events.out.tfevents*")))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--n_trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--population", type=int, default=1)
    ap.add_argument("--num_cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default=str(RESULTS / "ray_report_costs.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_raycosts_"))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "size": args.size, "n_trials": args.n_trials,
           "epochs": args.epochs, "population": args.population, "num_cpus": args.num_cpus,
           "method": " ".join(__doc__.split("\n\n")[2].split()), "runs": [], "median": {}}
    try:
        store = work / "store"
        simulate_into_store(store, args.size, seed=0)
        for rnd in range(args.repeats):
            for arm in args.arms:
                out = work / f"{arm}_{rnd}"
                row = {"arm": arm, "round": rnd, **run_arm(store, out, ARMS[arm], args)}
                res["runs"].append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)  # checkpoints: the figures are kept
                write_results(args.out, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for arm in args.arms:
        rows = [r for r in res["runs"] if r["arm"] == arm]
        res["median"][arm] = {k: statistics.median(r[k] for r in rows if r[k] is not None)
                              for k in ("wall_s", "fit_s", "reports", "epochs", "trial_s_per_epoch")}
    write_results(args.out, res)
    print(json.dumps(res["median"], indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
