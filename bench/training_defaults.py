"""How the shipped training defaults were chosen, and what they give on pairs never used to choose them.

    python -m bench.training_defaults prepare DIR [--seeds 1,5,6,0,2,3,4] [--size medium]
    python -m bench.training_defaults run DIR [--dev 1,5,6] [--eval 0,2,3,4] [--budget 540] [--json out.json]
    python -m bench.training_defaults report out.json      # the Markdown tables of BENCHMARKS.md

`prepare` (CPU; needs the simulator) simulates each pair, prepares it exactly as
`xfer train` does with the default data settings and writes DIR/pair<seed>.npz
(model inputs, the split, the LineNorm statistics, the test line) and
DIR/pair<seed>_baselines.json (every plain baseline's metrics on that pair).

`run` (GPU or CPU; needs only torch, numpy, scikit-learn, pandas) trains with
`xfer.training.fit` in four stages, writing the JSON after every run so that a
run cut short keeps what it finished:

  1. every candidate in CANDIDATES (DAE-MMD) on the development pairs, once
     per training seed;
  2. the pick: the candidate with the highest mean PEAK-test balanced accuracy
     over the development pairs and training seeds. The rule is fixed here, before any evaluation
     pair is trained on; the evaluation pairs never influence the choice;
  3. the previous defaults, the pick and the runners-up on the evaluation pairs;
  4. every encoder x divergence with the pick's settings on the first
     evaluation pair (the model table of BENCHMARKS.md).

Stages stop when the time budget (seconds) is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.harness import write_results
from bench.harness.prepared import prepare_simulated_pair, score_splits
from xfer.config import ARCHS, DIVERGENCES, TrainConfig
from xfer.prepare import LineInputs, TrainData
from xfer.training import fit

SPLITS = ("gex_val", "gex_test", "peak_val", "peak_test")

# The settings before this study (the defaults of commit 10d1346): every candidate overrides
# these, so a rerun reproduces the study whatever the shipped defaults are now.
BASE = {"lambda_pseudo": 0.0, "dropout": 0.3, "peak_dropout": 0.0}
# Candidate settings, tried on the development pairs ("default": BASE itself).
CANDIDATES: dict[str, dict] = {
    "default": {},
    "reg": {"dropout": 0.5, "peak_dropout": 0.2},
    "pseudo1": {"lambda_pseudo": 1.0},
    "pseudo1_reg": {"lambda_pseudo": 1.0, "dropout": 0.5, "peak_dropout": 0.2},
    "pseudo1_f0.7": {"lambda_pseudo": 1.0, "pseudo_fraction": 0.7},
    "pseudo1_no_balance": {"lambda_pseudo": 1.0, "lambda_balance": 0.0},
    "pseudo1_narrow": {"lambda_pseudo": 1.0, "hidden_dim": 64},
    "pseudo1_reg_f0.7": {"lambda_pseudo": 1.0, "pseudo_fraction": 0.7, "dropout": 0.5, "peak_dropout": 0.2},
    "pseudo1_reg_no_balance": {"lambda_pseudo": 1.0, "lambda_balance": 0.0, "dropout": 0.5, "peak_dropout": 0.2},
}
N_EVAL_CANDIDATES = 4  # the previous defaults, the pick and the next two on the development pairs


# ----------------------------------------------------------------------------- prepare (CPU)

def prepare(out: Path, seeds: list[int], size: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        t = time.perf_counter()
        data, test, bl = prepare_simulated_pair(size, seed, TrainConfig())
        np.savez_compressed(
            out / f"pair{seed}.npz", emb=data.line.emb, peaks=np.asarray(data.line.peaks), labels=data.line.labels,
            train_idx=data.train_idx, val_idx=data.val_idx, prior=data.class_prior,
            emb_mean=data.line_stats["emb"][0], emb_std=data.line_stats["emb"][1],
            peaks_mean=data.line_stats["peaks"][0], peaks_std=data.line_stats["peaks"][1],
            t_emb=test.emb, t_peaks=np.asarray(test.peaks), t_labels=test.labels)
        (out / f"pair{seed}_baselines.json").write_text(json.dumps({"size": size, "seed": seed, "baselines": bl}))
        print(f"pair {seed}: prepared in {time.perf_counter() - t:.0f} s", flush=True)


def load_pair(path: Path) -> tuple[TrainData, LineInputs]:
    z = np.load(path)
    n, nt = len(z["labels"]), len(z["t_labels"])
    line = LineInputs(name="train", barcodes=np.array([f"a{i}" for i in range(n)], dtype=object), emb=z["emb"],
                      peaks=z["peaks"], labels=z["labels"])
    data = TrainData(line=line, train_idx=z["train_idx"], val_idx=z["val_idx"], class_prior=z["prior"],
                     line_stats={"emb": (z["emb_mean"], z["emb_std"]), "peaks": (z["peaks_mean"], z["peaks_std"])},
                     preprocess={})
    test = LineInputs(name="test", barcodes=np.array([f"b{i}" for i in range(nt)], dtype=object), emb=z["t_emb"],
                      peaks=z["t_peaks"], labels=z["t_labels"])
    return data, test


# ----------------------------------------------------------------------------- run (GPU or CPU)

def run(src: Path, dev_seeds: list[int], eval_seeds: list[int], budget: float, out_json: Path,
        train_seeds: list[int]) -> None:
    t_start = time.perf_counter()
    pairs: dict[int, tuple[TrainData, LineInputs]] = {}
    res: dict = {"machine": _machine(), "dev": dev_seeds, "eval": eval_seeds, "train_seeds": train_seeds,
                 "base": BASE, "candidates": CANDIDATES,
                 "baselines": {}, "runs": [], "pick": None, "stopped": None}
    for s in dev_seeds + eval_seeds:
        pairs[s] = load_pair(src / f"pair{s}.npz")
        bl = src / f"pair{s}_baselines.json"
        if bl.exists():
            res["baselines"][s] = json.loads(bl.read_text())["baselines"]

    def one(stage: str, name: str, seed: int, over: dict, arch="dae", div="mmd", train_seed=0) -> dict | None:
        if time.perf_counter() - t_start > budget:
            res["stopped"] = f"time budget spent before {stage} {name} pair {seed} {arch}-{div} seed {train_seed}"
            return None
        data, test = pairs[seed]
        cfg = TrainConfig.from_dict({**BASE, **over, "arch": arch, "divergence": div, "seed": train_seed})
        t = time.perf_counter()
        fr = fit(cfg, data.with_adaptation(test) if cfg.data.adapt_test_peaks else data)
        stats = test.stats_tensors(next(fr.model.parameters()).device)
        m = score_splits(fr.model, data, test, stats)
        rec = {"stage": stage, "candidate": name, "seed": seed, "train_seed": train_seed, "arch": arch,
               "divergence": div,
               "best_epoch": fr.best_epoch, "epochs_run": len(fr.history),
               "seconds": round(time.perf_counter() - t, 1), **m}
        res["runs"].append(rec)
        write_results(out_json, res, default=_jsonable)
        print(f"{stage:5s} {name:22s} pair {seed}/{train_seed} {arch}-{div}: "
              + " ".join(f"{k} {m[k]['balanced_accuracy']:.3f}" for k in SPLITS)
              + f" ({rec['seconds']:.0f} s, best epoch {fr.best_epoch}/{len(fr.history)})", flush=True)
        return rec

    def mean_test(name: str, seeds: list[int]) -> float:
        v = [r["peak_test"]["balanced_accuracy"] for r in res["runs"]
             if r["candidate"] == name and r["seed"] in seeds and r["arch"] == "dae" and r["divergence"] == "mmd"]
        return float(np.mean(v)) if len(v) == len(seeds) * len(train_seeds) else float("nan")

    for name, over in CANDIDATES.items():
        for s in dev_seeds:
            for ts in train_seeds:
                one("dev", name, s, over, train_seed=ts)
    ranked = sorted((n for n in CANDIDATES if np.isfinite(mean_test(n, dev_seeds))),
                    key=lambda n: -mean_test(n, dev_seeds))
    res["dev_ranking"] = [(n, round(mean_test(n, dev_seeds), 4)) for n in ranked]
    if not ranked:
        return
    pick = ranked[0]
    res["pick"] = pick
    print("development ranking:", res["dev_ranking"], "pick:", pick, flush=True)
    chosen = list(dict.fromkeys(["default", *ranked[:N_EVAL_CANDIDATES - 1]]))
    for s in eval_seeds:
        for name in chosen:
            for ts in train_seeds:
                one("eval", name, s, CANDIDATES[name], train_seed=ts)
    for arch in ARCHS:
        for div in DIVERGENCES:
            if (arch, div) != ("dae", "mmd"):
                one("table", pick, eval_seeds[0], CANDIDATES[pick], arch, div)
    write_results(out_json, res, default=_jsonable)


# ----------------------------------------------------------------------------- report

BASELINES = ("lsi_lr", "lsi_aligned", "lsi_coral", "joint_lsi_z", "joint_lsi_coral")  # the plain PEAK baselines


def report(path: Path) -> str:
    """Markdown: candidates on the development pairs, the evaluation pairs, the model table."""
    res = json.loads(path.read_text())
    bl = {int(k): v for k, v in res["baselines"].items()}
    best = {s: max(bl[s][b]["peak_test"]["balanced_accuracy"] for b in BASELINES) for s in bl}
    within = {s: bl[s]["lsi_lr"]["peak_val"]["balanced_accuracy"] for s in bl}
    runs = res["runs"]

    def ba(r, split):
        return r[split]["balanced_accuracy"]

    def per_pair(stage, name, seeds, split="peak_test"):
        return [float(np.mean([ba(r, split) for r in runs if r["stage"] == stage and r["candidate"] == name
                               and r["seed"] == s and (r["arch"], r["divergence"]) == ("dae", "mmd")]))
                for s in seeds]

    out = []
    for stage, seeds in (("dev", res["dev"]), ("eval", res["eval"])):
        names = list(dict.fromkeys(r["candidate"] for r in runs if r["stage"] == stage))
        if not names:
            continue
        out += [f"{'Development' if stage == 'dev' else 'Evaluation'} pairs (simulation seeds "
                f"{', '.join(map(str, seeds))}), DAE-MMD, PEAK test balanced accuracy, mean of training seeds "
                f"{', '.join(map(str, res['train_seeds']))}:", "",
                "| settings | " + " | ".join(f"pair {s}" for s in seeds)
                + " | mean | mean − best PEAK baseline | PEAK val mean − within-line LSI+LR |",
                "|---|" + "---|" * (len(seeds) + 3)]
        for n in names:
            t, v = per_pair(stage, n, seeds), per_pair(stage, n, seeds, "peak_val")
            d = np.mean([x - best[s] for x, s in zip(t, seeds)])
            dv = np.mean([x - within[s] for x, s in zip(v, seeds)])
            over = ", ".join(f"{k}={w}" for k, w in res["candidates"][n].items()) or "(previous defaults)"
            out.append(f"| {n}: {over}{' **(pick)**' if n == res['pick'] else ''} | "
                       + " | ".join(f"{x:.3f}" for x in t) + f" | {np.mean(t):.3f} | {d:+.3f} | {dv:+.3f} |")
        out.append("| best of the plain PEAK baselines (LSI+LR / aligned / CORAL) | "
                   + " | ".join(f"{best[s]:.3f}" for s in seeds) + f" | {np.mean([best[s] for s in seeds]):.3f} | | |")
        out.append("")
    table = [r for r in runs if (r["stage"] == "table") or (r["stage"] == "eval" and r["candidate"] == res["pick"]
             and r["seed"] == res["eval"][0] and r["train_seed"] == res["train_seeds"][0])]
    if table:
        s0 = res["eval"][0]
        out += [f"Every encoder x divergence with the pick's settings on evaluation pair {s0} (training seed "
                f"{res['train_seeds'][0]}), balanced accuracy:", "",
                f"| model | GEX val | GEX test | PEAK val | PEAK test | PEAK test − best PEAK baseline ({best[s0]:.3f}) "
                f"| PEAK val − within-line LSI+LR ({within[s0]:.3f}) | PEAK test macro-F1 | best epoch / run |",
                "|---|---|---|---|---|---|---|---|---|"]
        table.sort(key=lambda r: (ARCHS.index(r["arch"]), DIVERGENCES.index(r["divergence"])))
        for r in table:
            d = ba(r, "peak_test") - best[s0]
            out.append(f"| {r['arch']}-{r['divergence']}{' **(default)**' if r['stage'] == 'eval' else ''} | "
                       + " | ".join(f"{ba(r, k):.3f}" for k in SPLITS)
                       + f" | {d:+.3f}{' **short**' if d < -0.018 else ''} | {ba(r, 'peak_val') - within[s0]:+.3f} | "
                       f"{r['peak_test']['macro_f1']:.3f} | {r['best_epoch']}/{r['epochs_run']} |")
        names = {"majority": "majority class", "lsi_lr": "LSI + LR fit on the training line (naive transfer; "
                 "on val: within-line)", "lsi_aligned": "LSI on both lines, each standardised, balanced LR "
                 "(label-free aligned)", "lsi_coral": "the same, CORAL-aligned",
                 "joint_lsi_z": "TF-IDF per line (own IDF), one SVD of both lines, z per line, balanced LR on all "
                 "training-line cells (the recipe)", "joint_lsi_coral": "the recipe, training line CORAL-mapped onto "
                 "the test line", "gex_lr": "LR on the expression "
                 "embedding", "marker_score": "marker-gene scores (Tirosh lists)"}
        for k, m in bl[s0].items():
            f1 = f"{m['peak_test']['macro_f1']:.3f}" if "peak_test" in m else "–"
            out.append(f"| baseline: {names.get(k, k)} | " + " | ".join(
                f"{m[s]['balanced_accuracy']:.3f}" if s in m else "–" for s in SPLITS) + f" | | | {f1} | |")
        any_r = table[0]
        out.append("| majority-class rate (accuracy of always answering the commonest phase) | "
                   + " | ".join(f"{any_r[s]['majority_rate']:.3f}" for s in SPLITS) + " | | | | |")
    return "\n".join(out)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def _machine() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--seeds", default="1,5,6,0,2,3,4")
    p.add_argument("--size", default="medium")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--dev", default="1,5,6")
    r.add_argument("--eval", default="0,2,3,4")
    r.add_argument("--train_seeds", default="0,1", help="training seeds per pair (the table uses the first)")
    r.add_argument("--budget", type=float, default=540.0, help="seconds")
    r.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "training_defaults.json")
    q = sub.add_parser("report")
    q.add_argument("json", type=Path)
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if a.cmd == "prepare":
        prepare(a.dir, ints(a.seeds), a.size)
    elif a.cmd == "report":
        print(report(a.json))
    else:
        run(a.dir, ints(a.dev), ints(a.eval), a.budget, a.json, ints(a.train_seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
