"""Issue 23, done means: the sweep under the new defaults against the shipped defaults and the
best plain baseline, on fresh evaluation pairs never used to choose anything.

    python -m bench.model_vs_plain_recipe prepare bench/_data/transfer --dev 101 --eval 601,602,603,604,605,606,607,608
    python -m bench.sweep_design_eval run bench/_data/transfer --pairs 601 602 603 604 605 606 607 608
    python -m bench.sweep_design_eval report bench/results/sweep_design_eval.json   # settings from bench/_data/transfer

On each pair (drawn by `xfer.data.simulate.draw_settings` from the simulator's varied ranges,
seeds 601-608: never run before this study), each run exactly the command a user types, one
after another on an otherwise idle machine (the walls are the whole commands):

  sweep     `xfer tune` with the test line's expression and accessibility (unlabelled) and
            nothing else but `--num_cpus 2`: the new defaults (sweep_design_study.py's pick)
  before    `xfer tune` as it was before issue 23 (the code at commit BEFORE_COMMIT, checked out
            in a git worktree, with its own defaults: 20 trials x 50 epochs, ASHA on plain epochs
            with grace 6 / rf 2, the top 4 averaged however far they ran) and `--num_cpus 2`
  defaults  `xfer train` with the shipped defaults (100 epochs, patience 20, the ensemble of three)

The test line's labels score each final model only (its metrics.json); the best plain PEAK
baseline is the best, on that pair's test line, of naive / aligned / CORAL-aligned LSI and both
joint-LSI recipes, picked after the fact (which favours the baselines).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from bench.harness import ROOT, mean_se, pair_flags, pairs_cli, read_results, run, run_xfer, summary, with_se, \
    write_results

BEFORE_COMMIT = "df90855"   # main just before issue 23


def _before_tree() -> Path:
    """A worktree of the code before issue 23 (its `python -m xfer.cli` imports its own packages)."""
    tree = ROOT / "bench" / "_data" / "before_issue23"
    if not (tree / "xfer").exists():
        run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BEFORE_COMMIT])
    return tree


def run_pairs(root: Path, pairs: list[int], out_json: Path, before: bool, only: set[str] | None = None) -> None:
    import pandas as pd

    res = read_results(out_json, default={"pairs": {}})
    res.update(machine=f"{os.cpu_count()} CPU cores", date=time.strftime("%Y-%m-%d"))
    for p in pairs:
        base = root / "sweep_eval" / f"pair{p}"
        base.mkdir(parents=True, exist_ok=True)
        r = res["pairs"].get(str(p), {})
        arms = [("sweep", ["tune", *pair_flags(root / f"pair{p}"), "--num_cpus", "2", "--name", f"eval_{p}"])]
        if before:
            arms.append(("before", ["tune", *pair_flags(root / f"pair{p}"), "--num_cpus", "2", "--name", f"before_{p}"]))
        arms.append(("defaults", ["train", *pair_flags(root / f"pair{p}"), "--device", "cpu"]))
        for arm, argv in arms:
            out = base / arm
            if arm in r or (only and arm not in only):
                continue
            t = time.perf_counter()
            m = run_xfer(argv + ["--output_folder", str(out)], out, base / f"{arm}.log",
                         cwd=_before_tree() if arm == "before" else None)
            r[arm] = {**summary(m), "wall_s": round(time.perf_counter() - t, 1)}
            if arm != "defaults":
                df = pd.read_csv(out / "trials.csv")
                bp = json.loads((out / "best_params.json").read_text())
                sw = json.loads((out / "sweep.json").read_text())
                r[arm].update(epochs_run=int(df["epochs_run"].sum()), n_trials=len(df),
                              ranked=int(df["best_objective"].notna().sum()),
                              final_model=bp.get("final_model"), design={k: sw.get(k) for k in (
                                  "scheduler", "rungs", "grace_period", "reduction_factor", "n_trials",
                                  "search_epochs", "final_model", "final_ensemble")})
            res["pairs"][str(p)] = r
            write_results(out_json, res)
            # the sweep's checkpoints are the bulk of the disk; the figures are written
            shutil.rmtree(out / "ray_results", ignore_errors=True)
    if all({"sweep", "defaults"} <= set(v) for v in res["pairs"].values()):
        print(report(out_json, root))


def report(path: Path, root: Path | None = None) -> str:
    d = read_results(path)
    pairs = sorted(d["pairs"], key=int)
    have_before = any("before" in d["pairs"][p] for p in pairs)
    lines = ["| pair | cells A / B | sweep (new defaults) ± SE | "
             + ("before issue 23 | " if have_before else "")
             + "shipped defaults ± SE | best plain baseline | sweep − defaults | sweep − baseline | "
             "wall: sweep / " + ("before / " if have_before else "") + "defaults |",
             "|---|---|---|" + ("---|" if have_before else "") + "---|---|---|---|---|"]
    dd, db, dbef, above_d, above_b = [], [], [], 0, 0
    for p in pairs:
        r = d["pairs"][p]
        s, f = r["sweep"], r["defaults"]
        cells = ""
        if root is not None and (root / f"pair{p}" / "settings.json").exists():
            st = json.loads((root / f"pair{p}" / "settings.json").read_text())
            cells = f"{st['size']['n_cells_a']} / {st['size']['n_cells_b']}"
        x, y = s["peak_test"] - f["peak_test"], s["peak_test"] - s["best_baseline_value"]
        dd.append(x)
        db.append(y)
        above_d += x > 0
        above_b += y > 0
        bef = ""
        if have_before:
            b = r.get("before")
            if b:
                dbef.append(s["peak_test"] - b["peak_test"])
            bef = f"{b['peak_test']:.3f} | " if b else "– | "
        lines.append(f"| {p} | {cells} | {with_se(s['peak_test'], s)} | {bef}"
                     f"{with_se(f['peak_test'], f)} | {s['best_baseline_value']:.3f} "
                     f"({s['best_baseline']}) | {x:+.3f} | {y:+.3f} | {s['wall_s']:.0f} s / "
                     + ((f"{r['before']['wall_s']:.0f} s / " if "before" in r else "– / ") if have_before else "")
                     + f"{f['wall_s']:.0f} s |")
    n = len(pairs)
    m, se = mean_se(dd)
    mb, seb = mean_se(db)
    lines += ["", f"sweep − shipped defaults: {m:+.3f} ± {se:.3f} (SE over the {n} pairs), above them on {above_d} of {n}",
              f"sweep − best plain baseline: {mb:+.3f} ± {seb:.3f}, above it on {above_b} of {n}"]
    if have_before:
        mbef, sebef = mean_se(dbef)
        lines.append(f"sweep − the sweep before issue 23: {mbef:+.3f} ± {sebef:.3f} over the {len(dbef)} pairs "
                     f"it ran on, above it on {sum(v > 0 for v in dbef)} of {len(dbef)}")
    lines += ["", "| pair | model | accuracy | balanced accuracy | macro-F1 | majority-class rate |", "|---|---|---|---|---|---|"]
    for p in pairs:
        r = d["pairs"][p]
        for arm in ("sweep", "before", "defaults"):
            if arm in r:
                v = r[arm]
                lines.append(f"| {p} | {arm} | {v['accuracy']:.3f} | {v['peak_test']:.3f} | {v['macro_f1']:.3f} | "
                             f"{v['majority_rate']:.3f} |")
    lines += ["", "| pair | sweep: trials, epochs run, members (values) | before: trials ranked, epochs run |",
              "|---|---|---|"]
    for p in pairs:
        r = d["pairs"][p]
        s = r["sweep"]
        mem = ", ".join(f"{m['value']:.3f}" for m in s["final_model"]["members"])
        g = " (the defaults' trial: guard)" if s["final_model"].get("guarded") else ""
        bef = (f"{r['before']['ranked']} of {r['before']['n_trials']}, {r['before']['epochs_run']}"
               if "before" in r else "")
        lines.append(f"| {p} | {s['n_trials']}, {s['epochs_run']}, {len(s['final_model']['members'])} ({mem}){g} | "
                     f"{bef} |")
    if root is not None:
        keys = ("rt_line_corr", "nascent_access", "promoter_coupling", "g2m_per_copy", "dna_depth_exponent",
                "atac_depth_sd", "shared_identical", "peaks_b_ratio")
        lines += ["", "| pair | G1 A / B | depth B/A | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        for p in pairs:
            f = root / f"pair{p}" / "settings.json"
            if f.exists():
                s = json.loads(f.read_text())["settings"]
                depth = s["lines"][1]["atac_median_depth"] / s["lines"][0]["atac_median_depth"]
                g1 = f"{s['lines'][0]['phase_props'][0]:.2f} / {s['lines'][1]['phase_props'][0]:.2f}"
                lines.append(f"| {p} | {g1} | {depth:.2f} | " + " | ".join(f"{s[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    def options(r):
        r.add_argument("--json", default="bench/results/sweep_design_eval.json")
        r.add_argument("--no-before", dest="before", action="store_false",
                       help="skip the sweep as it was before issue 23")
        r.add_argument("--arms", default="", help="comma-separated arms to run now (default: all); a pair's "
                       "finished arms are kept and never rerun")

    ap = pairs_cli(__doc__, options)
    if ap.cmd == "run":
        run_pairs(Path(ap.root).resolve(), ap.pairs, Path(ap.json), ap.before,
            set(ap.arms.split(",")) - {""} or None)
    else:
        root = ROOT / "bench" / "_data" / "transfer"
        print(report(Path(ap.json), root if root.exists() else None))


if __name__ == "__main__":
    main()
