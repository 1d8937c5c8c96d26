"""Issue 12, done means: does a sweep ranked by the transfer objective find a better model?

    python -m bench.sweep_objective_eval run bench/_data/transfer --pairs 401 402 403 404 [--n_trials 30] [--epochs 30]
    python -m bench.sweep_objective_eval report bench/results/sweep_objective_eval.json

On each evaluation pair (model_vs_plain_recipe.py's pairs: never used to choose the objective, the
space or the defaults), three runs, each exactly the command a user types:

  transfer    `xfer tune --objective transfer` (n_trials, search_epochs = epochs; ASHA; the
              shipped defaults are its first trial); its best trial's model scored on the
              test line (the sweep's metrics.json)
  source_val  the same sweep with `--objective source_val` (same seed, same space)
  defaults    the shipped defaults trained the way a trial trains (`xfer train --epochs E
              --set ensemble=1`, the same objective as the transfer sweep): what the sweep
              must beat
and, with --retrain, `xfer train --config_path best_params.json` of each sweep and `xfer
train` with the shipped defaults (full epochs, the shipped ensemble of three).

Every run reads the test line's labels only through its final scoring.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.harness import pair_flags, pairs_cli, read_results, run_xfer, summary, summary_se, with_se, write_results


def run(root: Path, pairs: list[int], n_trials: int, epochs: int, num_cpus: int, retrain: bool,
        out_json: Path) -> None:
    results = {"machine": f"{os.cpu_count()} CPU cores", "n_trials": n_trials, "epochs": epochs, "pairs": {}}
    for p in pairs:
        pd_ = root / f"pair{p}"
        base = root / "sweeps" / f"n{n_trials}_e{epochs}" / f"pair{p}"
        base.mkdir(parents=True, exist_ok=True)
        res = {}
        for objective in ("transfer", "source_val"):
            out = base / objective
            m = run_xfer(["tune", *pair_flags(pd_), "--objective", objective, "--n_trials", str(n_trials),
                          "--space", "broad", "--search_epochs", str(epochs), "--num_cpus", str(num_cpus),
                          "--output_folder", str(out), "--name", f"{objective}_{p}"], out, base / f"{objective}.log")
            res[objective] = {**summary(m), "best_params": json.loads((out / "best_params.json").read_text())}
        m = run_xfer(["train", *pair_flags(pd_), "--epochs", str(epochs), "--set", "ensemble=1", "--objective",
                      "transfer", "--device", "cpu", "--output_folder", str(base / "defaults")], base / "defaults",
                     base / "defaults.log")
        res["defaults"] = summary(m)
        if retrain:
            for objective in ("transfer", "source_val"):
                m = run_xfer(["train", *pair_flags(pd_), "--config_path", str(base / objective / "best_params.json"),
                              "--device", "cpu", "--output_folder", str(base / f"{objective}_retrained")],
                             base / f"{objective}_retrained", base / f"{objective}_retrained.log")
                res[f"{objective}_retrained"] = summary(m)
            m = run_xfer(["train", *pair_flags(pd_), "--device", "cpu", "--output_folder", str(base / "defaults_full")],
                         base / "defaults_full", base / "defaults_full.log")
            res["defaults_full"] = summary(m)
        results["pairs"][p] = res
        write_results(out_json, results)
    print(report(out_json))


def report(path: Path) -> str:
    d = read_results(path)
    pairs = sorted(d["pairs"], key=int)
    kinds = [k for k in ("transfer", "source_val", "defaults", "transfer_retrained", "source_val_retrained",
                         "defaults_full") if all(k in d["pairs"][p] for p in pairs)]
    lines = [f"{d['n_trials']} trials of up to {d['epochs']} epochs per sweep; PEAK-test balanced accuracy ± SE", "",
             "| pair | " + " | ".join(kinds) + " | best plain baseline | transfer − defaults | transfer − source_val |",
             "|---|" + "---|" * (len(kinds) + 3)]
    diffs, dsv, below = [], [], 0
    for p in pairs:
        r = d["pairs"][p]
        cells = [with_se(r[k]["peak_test"], r[k]) for k in kinds]
        dd = r["transfer"]["peak_test"] - r["defaults"]["peak_test"]
        ds = r["transfer"]["peak_test"] - r["source_val"]["peak_test"]
        diffs.append(dd)
        dsv.append(ds)
        below += dd < -(summary_se(r["defaults"]) or float("inf"))
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {r['transfer']['best_baseline_value']:.3f} "
                     f"({r['transfer']['best_baseline']}) | {dd:+.3f} | {ds:+.3f} |")
    n = len(pairs)
    lines += ["", f"transfer sweep − defaults: mean {sum(diffs) / n:+.3f}, more than one SE below the defaults on "
              f"{below} of {n} pairs; transfer − source_val sweep: mean {sum(dsv) / n:+.3f}"]
    return "\n".join(lines)


def main() -> None:
    def options(r):
        r.add_argument("--n_trials", type=int, default=30)
        r.add_argument("--epochs", type=int, default=30)
        r.add_argument("--num_cpus", type=int, default=2)
        r.add_argument("--retrain", action="store_true")
        r.add_argument("--json", default="bench/results/sweep_objective_eval.json")

    args = pairs_cli(__doc__, options)
    if args.cmd == "run":
        run(Path(args.root).resolve(), args.pairs, args.n_trials, args.epochs, args.num_cpus, args.retrain,
            Path(args.json))
    else:
        print(report(Path(args.json)))


if __name__ == "__main__":
    main()
