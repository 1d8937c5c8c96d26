"""Issue 12: which label-free objective picks the configuration that transfers best?

    python -m bench.selection_objective run bench/_data/transfer --pairs 101 102 --json bench/results/selection_objective_dev.json
    python -m bench.selection_objective run bench/_data/transfer --pairs 401 402 403 404 --json bench/results/selection_objective_eval.json
    python -m bench.selection_objective report bench/results/selection_objective_dev.json [bench/results/selection_objective_eval.json]

The pairs are model_vs_plain_recipe.py's (`prepare` makes them: varied simulator settings,
stores with A_GEX/A_PEAK, the training line, and B_GEX/B_PEAK, the test line).

`run` trains a population of N configurations (default 48) on every pair: configuration 0
is the shipped defaults, the others are drawn from the default search space
(`tune.space.BROAD_SPACE`, the default space then, Optuna's RandomSampler, seed 12) — the same N on every pair.
Each run is the one training loop (`xfer.training.fit`) exactly as a transductive trial
trains (`xfer.pipeline.prepare_member` + `training_data`: the test line's cells
unlabelled), for E epochs (default 30, the search budget) with no early stopping. Every
epoch records each selection candidate (`sel/<name>`, what the trial reports) and, for
this study alone, the true PEAK-test balanced accuracy, computed here from the epoch's
weights and the test line's labels, which never enter training.

Per candidate and pair (`report`):
  - each run's chosen epoch is the candidate's best eligible epoch (after the warm-up, or
    the last), as a trial chooses it; the run's score is the candidate's value there;
  - Spearman rho between the runs' scores and their true accuracy at those epochs;
  - regret: the best true accuracy in the population (any run, any eligible epoch) minus
    the true accuracy of the candidate's pick (the run with the highest score, at its
    chosen epoch).
The rule, fixed here before any evaluation pair is run: the pick is the candidate with the
lowest mean regret over the development pairs (ties: the higher mean rho, then the order
of xfer.selection.CANDIDATES); and, separately, the same among the candidates that need
no test-line expression (the fallback when --test_csv is not given). Evaluation pairs only
report.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.harness import pairs_cli, write_results
from bench.harness.populations import population as draw_population
from bench.harness.populations import EpochPredictions, transductive_data

POPULATION_SEED = 12


def population(n: int) -> list[dict]:
    """Configuration 0: the shipped defaults (every searched key at its default); then n - 1
    random draws from the default space of the study (the broad space)."""
    return draw_population("broad", n, POPULATION_SEED)


def _run(job: tuple) -> dict:
    pair_dir, i, params, epochs, out = job
    out = Path(out)
    if out.exists():
        return json.loads(out.read_text())
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from xfer.config import ALL_ARCH_PARAMS, TrainConfig
    from xfer.evaluate import classification_metrics
    from xfer.training import fit

    base = {k: v for k, v in TrainConfig().to_flat().items() if k not in ALL_ARCH_PARAMS}
    cfg = TrainConfig.from_dict({**base, **params, "epochs": epochs, "patience": epochs + 1, "ensemble": 1,
                                 "objective": "source_val"})
    t0 = time.perf_counter()
    train, test = transductive_data(Path(pair_dir), cfg)
    predictions = EpochPredictions(test, cfg)
    history = []

    def report(m, make_checkpoint):
        probs = predictions(make_checkpoint)["peak"]
        truth = classification_metrics(test.labels, probs.argmax(1))["balanced_accuracy"]
        history.append({"epoch": m["epoch"], "warmup": m["warmup"], "truth": truth,
                        **{k[4:]: v for k, v in m.items() if k.startswith("sel/")}})

    fit(cfg, train, report, device="cpu")
    res = {"pair": int(Path(pair_dir).name[4:]), "config": i, "params": params, "history": history,
           "seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res))
    print(f"pair {res['pair']} config {i}: {res['seconds']} s, last truth {history[-1]['truth']:.3f}", flush=True)
    return res


def run(root: Path, pairs: list[int], n: int, epochs: int, workers: int, out_json: Path) -> None:
    configs = population(n)
    jobs = [(str(root / f"pair{p}"), i, c, epochs, str(root / "selection" / f"e{epochs}" / f"pair{p}_c{i}.json"))
            for p in pairs for i, c in enumerate(configs)]
    jobs.sort(key=lambda j: (j[0], j[2]["peak_repr"], j[2]["bin_size"], j[1]))  # workers reuse prepared data
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(_run, jobs))
    write_results(out_json, {"machine": f"{os.cpu_count()} CPU cores", "pairs": pairs, "n": n, "epochs": epochs,
                             "population_seed": POPULATION_SEED, "runs": runs}, indent=None)
    print(report([out_json], pick=False))


# ----------------------------------------------------------------------------- analysis

def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if r == r else float("nan")


def analyse(runs: list[dict]) -> dict:
    """{pair: {candidate: {"rho", "regret", "pick_truth", "pick_config"}}, "oracle", "defaults"}."""
    from xfer.selection import CANDIDATES

    for r in runs:  # the development runs were recorded when the means were named source_val+<x>
        r["history"] = [{k.replace("+", "_"): v for k, v in h.items()} for h in r["history"]]
    out = {}
    for pair in sorted({r["pair"] for r in runs}):
        rs = [r for r in runs if r["pair"] == pair]
        elig = {r["config"]: [h for h in r["history"] if h["warmup"] >= 1] or r["history"][-1:] for r in rs}
        oracle = max(h["truth"] for e in elig.values() for h in e)
        res = {"oracle": oracle}
        for c in CANDIDATES:
            scores, truths = [], []
            for r in rs:
                e = elig[r["config"]]
                vals = [h.get(c, float("nan")) for h in e]
                if not all(math.isfinite(v) for v in vals):
                    break
                j = max(range(len(e)), key=lambda k: vals[k])
                scores.append(vals[j])
                truths.append(e[j]["truth"])
            else:
                pick = max(range(len(rs)), key=lambda k: scores[k])
                res[c] = {"rho": _spearman(scores, truths), "regret": oracle - truths[pick],
                          "pick_truth": truths[pick], "pick_config": rs[pick]["config"]}
        d = next((r for r in rs if r["config"] == 0), None)
        res["defaults_last"] = d["history"][-1]["truth"] if d else float("nan")
        out[pair] = res
    return out


def choose(dev: dict) -> dict:
    """The rule (see the module doc): lowest mean regret over the development pairs."""
    from xfer.selection import CANDIDATES, NEEDS_TEST_GEX

    def key(c):
        reg = sum(dev[p][c]["regret"] for p in dev) / len(dev)
        rho = sum(dev[p][c]["rho"] for p in dev) / len(dev)
        return (reg, -rho, CANDIDATES.index(c))

    every = [c for c in CANDIDATES if all(c in dev[p] for p in dev)]
    return {"with_expression": min(every, key=key),
            "peaks_only": min((c for c in every if c not in NEEDS_TEST_GEX), key=key)}


def report(paths: list[Path], pick: bool = True) -> str:
    """Tables per file: the first is the development study (whose rule picks), the others
    evaluation pairs; pick=False: one file's table alone, no pick (what `run` prints)."""
    from xfer.selection import CANDIDATES

    blocks = []
    picks = None
    for k, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        a = analyse(data["runs"])
        pairs = sorted(a)
        if k == 0:
            picks = choose(a)
        title = ("Development" if k == 0 else "Evaluation") if pick else "Population on"
        lines = [f"{title} pairs {', '.join(map(str, pairs))} ({data['n']} configurations, {data['epochs']} epochs): "
                 "Spearman rho with the true PEAK-test balanced accuracy / selection regret", "",
                 "| candidate | " + " | ".join(f"pair {p} rho / regret" for p in pairs) + " | mean rho | mean regret |",
                 "|---|" + "---|" * (len(pairs) + 2)]
        for c in CANDIDATES:
            if not all(c in a[p] for p in pairs):
                continue
            cells = [f"{a[p][c]['rho']:+.2f} / {a[p][c]['regret']:.3f}" for p in pairs]
            mr = sum(a[p][c]["rho"] for p in pairs) / len(pairs)
            mg = sum(a[p][c]["regret"] for p in pairs) / len(pairs)
            mark = " **(pick)**" if pick and c in picks.values() else ""
            lines.append(f"| {c}{mark} | " + " | ".join(cells) + f" | {mr:+.2f} | {mg:.3f} |")
        lines.append("| best in population (oracle) | " + " | ".join(f"{a[p]['oracle']:.3f}" for p in pairs) + " | | |")
        lines.append("| defaults (config 0), last epoch | " +
                     " | ".join(f"{a[p]['defaults_last']:.3f}" for p in pairs) + " | | |")
        blocks.append("\n".join(lines))
    if pick:
        blocks.append(f"Pick (rule fixed in the script, development pairs only): {picks}")
    return "\n\n".join(blocks)


def main() -> None:
    def options(r):
        r.add_argument("--n", type=int, default=48)
        r.add_argument("--epochs", type=int, default=30)
        r.add_argument("--workers", type=int, default=2)
        r.add_argument("--json", required=True)

    args = pairs_cli(__doc__, options, report_nargs="+")
    if args.cmd == "run":
        run(Path(args.root), args.pairs, args.n, args.epochs, args.workers, Path(args.json))
    else:
        print(report([Path(j) for j in args.json]))


if __name__ == "__main__":
    main()
