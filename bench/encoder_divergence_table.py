"""The model table: every encoder x divergence with the shipped defaults, beside the baselines.

    python -m bench.encoder_divergence_table --size medium --seed 0 [--archs dae,vae] [--divergences mmd]
                                      [--epochs 100] [--set KEY=VALUE ...] [--json out.json]

Simulates one pair (seed 0 is an evaluation pair: bench/training_defaults.py chose the
defaults on other simulation seeds), prepares it once, trains each combination with `fit` exactly
as `xfer train` does (adaptation to the test line's unlabelled peaks included
when the default says so) and scores the four splits. Prints a Markdown table
of balanced accuracy (and accuracy / macro-F1 in the JSON).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.harness import write_results
from bench.harness.prepared import prepare_simulated_pair, score_splits
from xfer.config import ARCHS, DIVERGENCES, TrainConfig
from xfer.training import fit

SPLITS = ("gex_val", "gex_test", "peak_val", "peak_test")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--seed", type=int, default=0, help="simulation seed of the evaluation pair")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--divergences", default=",".join(DIVERGENCES))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    from xfer.config import parse_set
    over = parse_set(args.set)
    if args.epochs:
        over["epochs"] = args.epochs
    base = TrainConfig.from_dict(over)
    t0 = time.perf_counter()
    data, test, bl = prepare_simulated_pair(args.size, args.seed, base)
    print(f"{args.size} pair (seed {args.seed}): {len(data.line.labels)}/{len(test.labels)} cells, {data.n_peaks} "
          f"encoder inputs; prepared with the baselines in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {"size": args.size, "seed": args.seed, "machine": f"{os.cpu_count()} CPU cores", "baselines": bl,
               "config": base.to_flat(), "runs": []}
    train = data.with_adaptation(test) if base.data.adapt_test_peaks else data
    stats = test.stats_tensors("cpu") if base.data.line_norm else None
    rows = []
    for arch in args.archs.split(","):
        for div in args.divergences.split(","):
            cfg = base.replace(arch=arch, divergence=div)
            t = time.perf_counter()
            res = fit(cfg, train)
            m = score_splits(res.model, data, test, stats)
            run = {"arch": arch, "divergence": div, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                   "seconds": round(time.perf_counter() - t, 1), **m}
            results["runs"].append(run)
            rows.append((f"{arch}-{div}", m))
            if args.json:  # written after every run, so a killed run keeps what it finished
                write_results(args.json, results)
            print(f"{arch:12s} {div:7s} " + " ".join(f"{s} {m[s]['balanced_accuracy']:.3f}" for s in SPLITS)
                  + f"  (best epoch {res.best_epoch}/{len(res.history)}, {run['seconds']:.0f} s)", flush=True)
    lines = ["| model | GEX val | GEX test | PEAK val | PEAK test |", "|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[s]['balanced_accuracy']:.3f}" for s in SPLITS) + " |")
    for name, m in bl.items():
        lines.append(f"| baseline: {name} | " + " | ".join(f"{m[s]['balanced_accuracy']:.3f}" if s in m else "–"
                                                       for s in SPLITS) + " |")
    any_m = rows[0][1] if rows else None
    if any_m:
        lines.append("| majority-class rate | " + " | ".join(f"{any_m[s]['majority_rate']:.3f}" for s in SPLITS) + " |")
    print("\n" + "\n".join(lines))
    if args.json:
        write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
