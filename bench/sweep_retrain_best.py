"""Should a sweep return its best configuration retrained the way the shipped defaults train?

    OMP_NUM_THREADS=1 python -m bench.sweep_retrain_best dev bench/_data/transfer --pairs 401 402 403 404
    OMP_NUM_THREADS=1 python -m bench.sweep_retrain_best run bench/_data/transfer --pairs 501 502 503 504
    python -m bench.sweep_retrain_best report bench/results/sweep_retrain_best.json

Today `xfer tune` returns its top 4 trials' best epochs, averaged (sweep_final_ensemble.py). Those
trials trained for at most `--search_epochs` (30 here) with one seed each, many cut short by ASHA.
The shipped defaults train for 100 epochs with an ensemble of three seeds. On four evaluation pairs
the sweep's model came out level with the defaults (-0.003 ± 0.004, BENCHMARKS.md, "What a sweep
returns"). The candidate studied here: after the sweep, train the best trial's configuration
exactly as the defaults train, with `xfer train --config_path best_params.json` (its params carry
the shipped `epochs` and `ensemble`), and return that.

dev: on the development pairs 401-404, each exactly the command a user types:
  sweep      `xfer tune --objective transfer`, 30 trials of up to 30 epochs, the default final
             ensemble (what `xfer tune` returns today);
  retrained  `xfer train --config_path <sweep>/best_params.json`.
THE RULE, fixed here before any of these runs: adopt retraining as what a sweep returns iff, over
the four development pairs, the mean of (retrained - sweep) in PEAK-test balanced accuracy
exceeds TIE (0.001). Fewer than four pairs decide nothing.

run: on the evaluation pairs 501-504, with the sweeps and shipped defaults of
sweep_final_ensemble.py (root/sweep_ensemble/pairNNN/{sweep,defaults}, never used to choose
anything), adds `retrained` and reports it beside them and the best plain baseline.
The test line's labels are read only by each run's final scoring.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.harness import mean_se, pair_flags, pairs_cli, run_xfer, summary, with_se, write_results

TIE = 0.001
DEV_PAIRS = 4


def _retrain(pd_: Path, base: Path) -> dict:
    m = run_xfer(["train", *pair_flags(pd_), "--config_path", str(base / "sweep" / "best_params.json"), "--device", "cpu",
               "--output_folder", str(base / "retrained")], base / "retrained", base / "retrained.log")
    return {**summary(m), "seconds": m["model"]["wall_seconds"], "n_members": m["model"].get("n_members")}


def decide(pairs: dict) -> dict:
    """THE RULE (module docstring)."""
    diffs = [p["retrained"]["peak_test"] - p["sweep"]["peak_test"] for p in pairs.values()
             if "retrained" in p and "sweep" in p]
    if len(diffs) < DEV_PAIRS:
        return {"decided": False, "pairs_done": len(diffs), "why": f"{len(diffs)} of {DEV_PAIRS} development pairs"}
    mean = sum(diffs) / len(diffs)
    return {"decided": True, "mean_retrained_minus_sweep": mean, "adopt_retraining": mean > TIE}


def cmd_dev(root: Path, pairs: list[int], n_trials: int, epochs: int, num_cpus: int, out_json: Path) -> None:
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res.update({"machine": f"{os.cpu_count()} CPU cores", "n_trials": n_trials, "epochs": epochs})
    res.setdefault("pairs", {})
    for p in pairs:
        pd_, base = root / f"pair{p}", root / "sweep_retrain" / f"pair{p}"
        base.mkdir(parents=True, exist_ok=True)
        m = run_xfer(["tune", *pair_flags(pd_), "--objective", "transfer", "--n_trials", str(n_trials), "--space", "broad", "--search_epochs",
                   str(epochs), "--num_cpus", str(num_cpus), "--output_folder", str(base / "sweep"),
                   "--name", f"ret_{p}"], base / "sweep", base / "sweep.log")
        r = {"sweep": {**summary(m), "n_members": m["model"]["n_members"],
                       "best_params": json.loads((base / "sweep" / "best_params.json").read_text())["params"]},
             "settings": json.loads((pd_ / "settings.json").read_text())}
        r["retrained"] = _retrain(pd_, base)
        res["pairs"][str(p)] = r
        res["decision"] = decide(res["pairs"])
        write_results(out_json, res)
        print(f"pair {p}: sweep {r['sweep']['peak_test']:.3f}, retrained {r['retrained']['peak_test']:.3f}", flush=True)
    print(report(out_json))


def cmd_run(root: Path, pairs: list[int], out_json: Path) -> None:
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res["machine"] = f"{os.cpu_count()} CPU cores"
    res.setdefault("pairs", {})
    for p in pairs:
        pd_, base = root / f"pair{p}", root / "sweep_ensemble" / f"pair{p}"
        for need in ("sweep/metrics.json", "defaults/metrics.json"):
            if not (base / need).exists():
                raise SystemExit(f"{base / need} is missing: run sweep_final_ensemble.py run on pair {p} first")
        r = {"sweep": summary(json.loads((base / "sweep" / "metrics.json").read_text())),
             "defaults": summary(json.loads((base / "defaults" / "metrics.json").read_text())),
             "settings": json.loads((pd_ / "settings.json").read_text())}
        r["retrained"] = _retrain(pd_, base)
        res["pairs"][str(p)] = r
        write_results(out_json, res)
    print(report(out_json))


def report(path: Path, dev_path: Path | None = None) -> str:
    lines = []
    if path.stem.endswith("_dev"):  # given the development file: the evaluation one lies beside it
        dev_path, path = path, path.with_name(path.stem[:-len("_dev")] + ".json")
    dev_path = dev_path or path.with_name(path.stem + "_dev.json")
    for label, pth in (("Development", dev_path), ("Evaluation", path)):
        if not pth.exists():
            continue
        d = json.loads(pth.read_text())
        pairs = sorted(d["pairs"], key=int)
        cols = [c for c in ("sweep", "retrained", "defaults") if any(c in d["pairs"][p] for p in pairs)]
        lines += [f"{label} (PEAK-test balanced accuracy ± SE):", "",
                  "| pair | " + " | ".join(cols) + " | best plain baseline | retrained − sweep |",
                  "|---|" + "---|" * (len(cols) + 2)]
        diffs: dict[str, list[float]] = {}  # retrained − each other model, per pair
        for p in pairs:
            r = d["pairs"][p]
            cells = [with_se(r[c]["peak_test"], r[c]) if c in r else "—" for c in cols]
            b = r["sweep"]
            diff = r["retrained"]["peak_test"] - r["sweep"]["peak_test"] if "retrained" in r else None
            if "retrained" in r:
                for other in ("sweep", "defaults"):
                    if other in r:
                        diffs.setdefault(other, []).append(r["retrained"]["peak_test"] - r[other]["peak_test"])
                diffs.setdefault("best plain baseline", []).append(r["retrained"]["peak_test"] - b["best_baseline_value"])
            lines.append(f"| {p} | " + " | ".join(cells) + f" | {b['best_baseline_value']:.3f} ({b['best_baseline']}) | "
                         + (f"{diff:+.3f}" if diff is not None else "—") + " |")
        if diffs:
            lines.append("")
        for other, x in diffs.items():
            m, se = mean_se(x)
            lines.append(f"retrained − {other}: mean {m:+.3f} ± {se:.3f} over {len(x)} pairs, above on "
                         f"{sum(v > 0 for v in x)}")
        if "decision" in d:
            lines.append(f"rule: {json.dumps(d['decision'])}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    def dev_options(d):
        d.add_argument("--n_trials", type=int, default=30)
        d.add_argument("--epochs", type=int, default=30)
        d.add_argument("--num_cpus", type=int, default=2)
        d.add_argument("--json", default="bench/results/sweep_retrain_best_dev.json")

    def run_options(r):
        r.add_argument("--json", default="bench/results/sweep_retrain_best.json")

    args = pairs_cli(__doc__, run_options, more={"dev": dev_options})
    if args.cmd == "dev":
        cmd_dev(Path(args.root).resolve(), args.pairs, args.n_trials, args.epochs, args.num_cpus, Path(args.json))
    elif args.cmd == "run":
        cmd_run(Path(args.root).resolve(), args.pairs, Path(args.json))
    else:
        print(report(Path(args.json)))


if __name__ == "__main__":
    main()
