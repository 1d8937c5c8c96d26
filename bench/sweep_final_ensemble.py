"""What a sweep returns: its best trial alone, or its top K trials averaged (`xfer tune --final_ensemble K`)?

    OMP_NUM_THREADS=1 python -m bench.sweep_final_ensemble dev bench/_data/transfer --pairs 401 402 403 404
    (one thread, as the figures were made: with more, float sums change and a near-tie may flip a cell)
    python -m bench.sweep_final_ensemble run bench/_data/transfer --pairs 501 502 503 504   # report
    python -m bench.sweep_final_ensemble report bench/results/sweep_final_ensemble.json

dev: the `--objective transfer` sweeps that sweep_objective_eval.py ran on pairs 401-404 (30 trials of
up to 30 epochs; those pairs reported issue 12 and chose nothing about the final model).
For each K in CANDIDATES, the top K trials' best epochs, averaged, are scored on the pair's
test line by the product's own functions (the top-K of `xfer tune` before issue 23, `ensemble_checkpoint`,
`xfer.pipeline.evaluate_checkpoint`: what `xfer tune` writes as best_model.pt and scores).
THE RULE, fixed here before any evaluation pair ran: the K with the highest mean PEAK-test
balanced accuracy over the development pairs; a K within 0.001 of a smaller one loses to it.
That K was `xfer tune`'s default until issue 23 made the final model `greedy` (at most 8 trials);
`run` passes `--final_model top --final_ensemble K` (the rule's K), so the study's sweep arm stays
the study's top-K model. Its other settings are today's defaults (issue 23 changed ASHA's rungs):
a rerun measures today's sweep with the study's final-model rule, not the recorded figures' sweep.

run: on fresh evaluation pairs (model_vs_plain_recipe.py's simulator, seeds never used before), each
run exactly the command a user types:
  sweep     `xfer tune --objective transfer`, 30 trials of up to 30 epochs, the default
            final ensemble: its metrics.json is what a user gets
  top1      the same sweep's best trial alone (K = 1), scored the same way (for reference)
  defaults  `xfer train` with the shipped defaults (100 epochs, the ensemble of three):
            what a user gets without a sweep
beside the best plain PEAK baseline of each pair (picked after the fact, every one we have).
The test line's labels are read only by the final scoring.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.harness import mean_se, pair_data, pair_flags, pairs_cli, run_xfer, summary, with_se, \
    write_results

CANDIDATES = (1, 2, 3, 4, 5, 8)
TIE = 0.001


def _sweep_checkpoints(sweep_dir: Path):
    """trial id -> its newest checkpoint file in a finished sweep's local storage."""
    name = json.loads((sweep_dir / "sweep.json").read_text())["name"]

    def checkpoint_of(trial_id: str) -> Path | None:
        found = sorted((sweep_dir / "ray_results" / name / trial_id).glob("checkpoint_*/checkpoint.pt"))
        return found[-1] if found else None
    return checkpoint_of


def score_top(sweep_dir: Path, pair_dir: Path, ks: tuple[int, ...]) -> dict:
    """PEAK-test metrics of the top-K ensemble of a finished sweep on the prepared pair
    `pair_dir`, for each K."""
    import pandas as pd
    from xfer.checkpoint import ensemble_checkpoint, export_best, read_checkpoint
    from xfer.pipeline import evaluate_checkpoint

    df = pd.read_csv(sweep_dir / "trials.csv")
    ranked = df[df["status"] != "errored"].dropna(subset=["best_objective"]).sort_values(
        "best_objective", ascending=False, kind="stable")
    checkpoint_of = _sweep_checkpoints(sweep_dir)
    members = []  # the top trials that left a checkpoint (xfer tune's top-K of before issue 23)
    for _, row in ranked.iterrows():
        path = checkpoint_of(row["trial_id"])
        if path is not None and len(members) < max(ks):
            members.append((row.to_dict(), export_best(read_checkpoint(path))))
    out, cache = {}, {}  # the inputs and each member's preparation, once for every K
    for k in ks:  # as `xfer tune` does: up to k, when fewer trials reached an eligible epoch
        ck = [c for _, c in members[:k]]
        m, _ = evaluate_checkpoint(pair_data(pair_dir), ck[0] if len(ck) == 1 else ensemble_checkpoint(ck),
                                   cache=cache)
        out[k] = {**m["peak_test"], "members": [r["trial_id"] for r, _ in members[:k]]}
    return {"by_k": out, "n_ranked": len(ranked)}


def choose(dev: dict) -> int:
    """THE RULE (module docstring): highest mean dev PEAK-test balanced accuracy; ties to the smaller K."""
    means = {k: sum(p["by_k"][str(k)]["balanced_accuracy"] for p in dev.values()) / len(dev)
             for k in CANDIDATES if all(str(k) in p["by_k"] for p in dev.values())}
    best = None
    for k in sorted(means):
        if best is None or means[k] > means[best] + TIE:
            best = k
    return best


def cmd_dev(root: Path, pairs: list[int], sweeps: str, out_json: Path) -> None:
    res = {"machine": f"{os.cpu_count()} CPU cores", "sweeps": sweeps, "candidates": list(CANDIDATES), "pairs": {}}
    for p in pairs:
        t = time.perf_counter()
        r = score_top(root / sweeps / f"pair{p}" / "transfer", root / f"pair{p}", CANDIDATES)
        res["pairs"][str(p)] = {"by_k": {str(k): v for k, v in r["by_k"].items()}, "n_ranked": r["n_ranked"]}
        print(f"pair {p}: " + ", ".join(f"K={k} {v['balanced_accuracy']:.3f}" for k, v in r["by_k"].items())
              + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    res["chosen"] = choose(res["pairs"])
    write_results(out_json, res)
    print(f"chosen K = {res['chosen']}")


def cmd_run(root: Path, pairs: list[int], n_trials: int, epochs: int, num_cpus: int, dev_json: Path,
            out_json: Path, part: str = "both") -> None:
    """`part`: both, or only the sweeps or only the defaults (two lanes at once on one machine;
    a later `both` run collects what they left, as finished runs are read, not repeated)."""
    chosen = json.loads(dev_json.read_text())["chosen"]
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res.update({"machine": f"{os.cpu_count()} CPU cores", "n_trials": n_trials, "epochs": epochs, "final_ensemble": chosen})
    res.setdefault("pairs", {})
    for p in pairs:
        pd_, base = root / f"pair{p}", root / "sweep_ensemble" / f"pair{p}"
        base.mkdir(parents=True, exist_ok=True)
        r = res["pairs"].get(str(p), {})
        if part in ("both", "defaults"):
            m = run_xfer(["train", *pair_flags(pd_), "--device", "cpu", "--output_folder", str(base / "defaults")],
                      base / "defaults", base / "defaults.log")
            r["defaults"] = {**summary(m), "seconds": m["model"]["wall_seconds"]}
            r["settings"] = json.loads((pd_ / "settings.json").read_text())
        if part == "defaults":
            res["pairs"][str(p)] = r
            write_results(out_json, res)
            continue
        m = run_xfer(["tune", *pair_flags(pd_), "--objective", "transfer", "--n_trials", str(n_trials), "--space", "broad", "--search_epochs",
                   str(epochs), "--num_cpus", str(num_cpus), "--output_folder", str(base / "sweep"),
                   "--name", f"ens_{p}", "--final_model", "top", "--final_ensemble", str(chosen)],
                   base / "sweep", base / "sweep.log")
        r["sweep"] = {**summary(m), "n_members": m["model"]["n_members"],
                      "final_model": json.loads((base / "sweep" / "best_params.json").read_text())["final_model"]}
        top1 = score_top(base / "sweep", pd_, (1,))["by_k"][1]
        r["top1"] = {**summary({"peak_test": top1, "baselines": m["baselines"]}), "trial": top1["members"][0]}
        res["pairs"][str(p)] = r
        write_results(out_json, res)
    if part == "both":
        print(report(out_json))


def report(path: Path, dev_path: Path | None = None) -> str:
    lines = []
    dev_path = dev_path or path.with_name(path.stem + "_dev.json")
    if dev_path.exists():
        dev = json.loads(dev_path.read_text())
        dp = sorted(dev["pairs"], key=int)
        lines += ["Development (PEAK-test balanced accuracy of the top-K trials averaged):", "",
                  "| K | " + " | ".join(f"pair {p}" for p in dp) + " | mean |", "|---|" + "---|" * (len(dp) + 1)]
        for k in dev["candidates"]:
            vals = [dev["pairs"][p]["by_k"].get(str(k), {}).get("balanced_accuracy") for p in dp]
            if None in vals:
                continue
            mark = " **(rule's pick)**" if k == dev["chosen"] else ""
            lines.append(f"| {k}{mark} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
        lines.append("")
    if not path.exists():
        return "\n".join(lines)
    d = json.loads(path.read_text())
    pairs = sorted(d["pairs"], key=int)
    k = d["final_ensemble"]
    lines += [f"Evaluation: {d['n_trials']} trials of up to {d['epochs']} epochs per sweep; PEAK-test balanced "
              "accuracy ± SE", "",
              f"| pair | cells A / B | sweep (top {k}, what `xfer tune` returns) | its best trial alone | shipped "
              "defaults (`xfer train`) | best plain baseline | sweep − defaults | sweep − baseline |",
              "|---|---|---|---|---|---|---|---|"]
    dd, db, above_d, above_b = [], [], 0, 0
    for p in pairs:
        r = d["pairs"][p]
        s, t, f = r["sweep"], r["top1"], r["defaults"]
        sz = r["settings"]["size"]
        a, b = s["peak_test"] - f["peak_test"], s["peak_test"] - s["best_baseline_value"]
        dd.append(a)
        db.append(b)
        above_d += a > 0
        above_b += b > 0
        lines.append(f"| {p} | {sz['n_cells_a']} / {sz['n_cells_b']} | {with_se(s['peak_test'], s)} | "
                     f"{t['peak_test']:.3f} | {with_se(f['peak_test'], f)} | {s['best_baseline_value']:.3f} "
                     f"({s['best_baseline']}) | {a:+.3f} | {b:+.3f} |")
    n = len(pairs)
    (md, sd_d), (mb, sd_b) = mean_se(dd), mean_se(db)
    lines += ["", f"sweep − shipped defaults: mean {md:+.3f} ± {sd_d:.3f} (SE over pairs), above on "
              f"{above_d} of {n}; sweep − best plain baseline: mean {mb:+.3f} ± {sd_b:.3f}, above on "
              f"{above_b} of {n}", "",
              "| pair | model | accuracy | balanced accuracy | macro-F1 | majority-class rate |", "|---|---|---|---|---|---|"]
    for p in pairs:
        r = d["pairs"][p]
        for name in ("sweep", "top1", "defaults"):
            x = r[name]
            if "accuracy" in x:
                lines.append(f"| {p} | {name} | {x['accuracy']:.3f} | {x['peak_test']:.3f} | {x['macro_f1']:.3f} | "
                             f"{x['majority_rate']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    def dev_options(d):
        d.add_argument("--sweeps", default="sweeps/n30_e30", help="sweep_objective_eval.py's sweeps under ROOT")
        d.add_argument("--json", default="bench/results/sweep_final_ensemble_dev.json")

    def run_options(r):
        r.add_argument("--n_trials", type=int, default=30)
        r.add_argument("--epochs", type=int, default=30)
        r.add_argument("--num_cpus", type=int, default=2)
        r.add_argument("--dev_json", default="bench/results/sweep_final_ensemble_dev.json")
        r.add_argument("--json", default="bench/results/sweep_final_ensemble.json")
        r.add_argument("--part", choices=("both", "sweep", "defaults"), default="both",
                       help="only the sweeps or only the defaults (two lanes at once; then `both` collects)")

    args = pairs_cli(__doc__, run_options, more={"dev": dev_options})
    if args.cmd == "dev":
        cmd_dev(Path(args.root).resolve(), args.pairs, args.sweeps, Path(args.json))
    elif args.cmd == "run":
        cmd_run(Path(args.root).resolve(), args.pairs, args.n_trials, args.epochs, args.num_cpus,
                Path(args.dev_json), Path(args.json), args.part)
    else:
        print(report(Path(args.json)))


if __name__ == "__main__":
    main()
