"""Issue 12, done means: does a sweep ranked by the transfer objective find a better model?

    python bench/bench_sweeps.py run bench/_data/transfer --pairs 401 402 403 404 [--n_trials 30] [--epochs 30]
    python bench/bench_sweeps.py report bench/results/bench_sweeps.json

On each evaluation pair (bench_transfer.py's pairs: never used to choose the objective, the
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
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
XFER = [sys.executable, "-m", "xfer.cli"]


def _data(pair_dir: Path) -> list[str]:
    return ["--store", str(pair_dir / "store"), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK"]


def _call(argv: list[str], out: Path, log: Path, cwd: Path | None = None) -> dict:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(XFER + argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT)
    if r.returncode:
        raise SystemExit(f"{' '.join(argv[:1])} failed for {out} (see {log})")
    print(f"{out}: {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads((out / "metrics.json").read_text())


def _summary(m: dict) -> dict:
    pt = m["peak_test"]
    best = max(((k, v["peak_test"]["balanced_accuracy"]) for k, v in m["baselines"].items() if "peak_test" in v
                and k.startswith(("lsi", "joint"))), key=lambda kv: kv[1])
    return {"peak_test": pt["balanced_accuracy"], "n": pt["n"], "accuracy": pt["accuracy"],
            "macro_f1": pt["macro_f1"], "majority_rate": pt["majority_rate"],
            "best_baseline": best[0], "best_baseline_value": best[1]}


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
            m = _call(["tune", *_data(pd_), "--objective", objective, "--n_trials", str(n_trials),
                       "--space", "broad", "--search_epochs", str(epochs), "--num_cpus", str(num_cpus), "--output_folder", str(out),
                       "--name", f"{objective}_{p}"], out, base / f"{objective}.log")
            res[objective] = {**_summary(m), "best_params": json.loads((out / "best_params.json").read_text())}
        m = _call(["train", *_data(pd_), "--epochs", str(epochs), "--set", "ensemble=1", "--objective", "transfer",
                   "--device", "cpu", "--output_folder", str(base / "defaults")], base / "defaults",
                  base / "defaults.log")
        res["defaults"] = _summary(m)
        if retrain:
            for objective in ("transfer", "source_val"):
                m = _call(["train", *_data(pd_), "--config_path", str(base / objective / "best_params.json"),
                           "--device", "cpu", "--output_folder", str(base / f"{objective}_retrained")],
                          base / f"{objective}_retrained", base / f"{objective}_retrained.log")
                res[f"{objective}_retrained"] = _summary(m)
            m = _call(["train", *_data(pd_), "--device", "cpu", "--output_folder", str(base / "defaults_full")],
                      base / "defaults_full", base / "defaults_full.log")
            res["defaults_full"] = _summary(m)
        results["pairs"][p] = res
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))
    print(report(out_json))


def _se(r: dict) -> float:
    v = r["peak_test"]
    return math.sqrt(v * (1 - v) / r["n"])


def mean_se(x: list[float]) -> tuple[float, float]:
    """Mean of per-pair differences and its standard error over the pairs (nan for one pair)."""
    m = sum(x) / len(x)
    return m, (math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x)) if len(x) > 1 else float("nan"))


def report(path: Path) -> str:
    d = json.loads(Path(path).read_text())
    pairs = sorted(d["pairs"], key=int)
    kinds = [k for k in ("transfer", "source_val", "defaults", "transfer_retrained", "source_val_retrained",
                         "defaults_full") if all(k in d["pairs"][p] for p in pairs)]
    lines = [f"{d['n_trials']} trials of up to {d['epochs']} epochs per sweep; PEAK-test balanced accuracy ± SE", "",
             "| pair | " + " | ".join(kinds) + " | best plain baseline | transfer − defaults | transfer − source_val |",
             "|---|" + "---|" * (len(kinds) + 3)]
    diffs, dsv, below = [], [], 0
    for p in pairs:
        r = d["pairs"][p]
        cells = [f"{r[k]['peak_test']:.3f} ± {_se(r[k]):.3f}" for k in kinds]
        dd = r["transfer"]["peak_test"] - r["defaults"]["peak_test"]
        ds = r["transfer"]["peak_test"] - r["source_val"]["peak_test"]
        diffs.append(dd)
        dsv.append(ds)
        below += dd < -_se(r["defaults"])
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {r['transfer']['best_baseline_value']:.3f} "
                     f"({r['transfer']['best_baseline']}) | {dd:+.3f} | {ds:+.3f} |")
    n = len(pairs)
    lines += ["", f"transfer sweep − defaults: mean {sum(diffs) / n:+.3f}, more than one SE below the defaults on "
              f"{below} of {n} pairs; transfer − source_val sweep: mean {sum(dsv) / n:+.3f}"]
    return "\n".join(lines)


def main() -> None:
    from _cli import pairs_cli

    def options(r):
        r.add_argument("--n_trials", type=int, default=30)
        r.add_argument("--epochs", type=int, default=30)
        r.add_argument("--num_cpus", type=int, default=2)
        r.add_argument("--retrain", action="store_true")
        r.add_argument("--json", default="bench/results/bench_sweeps.json")

    args = pairs_cli(__doc__, options)
    if args.cmd == "run":
        run(Path(args.root).resolve(), args.pairs, args.n_trials, args.epochs, args.num_cpus, args.retrain,
            Path(args.json))
    else:
        print(report(Path(args.json)))


if __name__ == "__main__":
    main()
