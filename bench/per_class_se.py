"""What are the standard errors of the stored sweep results under the per-class formula?

    python -m bench.per_class_se run [--root bench/_data/transfer] [--write]

BENCHMARKS.md once printed the standard error of a balanced accuracy as one binomial over all
test cells, sqrt(BA (1 - BA) / n), for the sweeps of issues 12, 22 and 23 and the warm-up sweeps
of issue 15. The right one (bench.harness.stats) is per class:
(1/C) sqrt(sum_c p_c (1 - p_c) / n_c). Those results kept a run's balanced accuracy, accuracy
and cell count, not its confusion matrix. The per-class figure is re-derived from them:

  - each pair's test-line class counts n_c: from the prepared pair's store (ROOT/pair<seed>,
    the B_GEX labels) when it is there, else by simulating the pair again (the same
    `draw_settings(seed, "medium")` and seed as `model_vs_plain_recipe prepare`; about 30 s);
  - each class's right predictions k_c: the integers with sum_c k_c / n_c = C x BA and
    sum_c k_c = n x accuracy, both to 1e-9 (the stored values are full doubles). With n_c known
    this has one solution in every result here; any other count stops the script.

`run` prints, per result, the single-binomial figure that was printed and the per-class one;
`--write` adds `class_counts` and `class_correct` to each result's entries (what
bench.harness.summary now stores for every new run), so that the scripts' reports print the
per-class SE.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from bench.harness import RESULTS, ROOT, balanced_accuracy_se, read_results, write_results

# result file -> the arms of each pair that print a balanced accuracy with its SE
RESULT_ARMS = {
    "sweep_objective_eval.json": ("transfer", "source_val", "defaults"),
    "sweep_final_ensemble.json": ("sweep", "top1", "defaults"),
    "sweep_retrain_best_dev.json": ("sweep", "retrained"),
    "sweep_retrain_best.json": ("sweep", "retrained", "defaults"),
    "sweep_design_eval.json": ("sweep", "before", "defaults"),
    "asha_after_warmup_sweeps.json": ("asha", "asha_after_warmup"),
}
TOL = 1e-9


def class_correct(counts: list[int], balanced_accuracy: float, accuracy: float) -> list[list[int]]:
    """Every vector of right predictions per class (k_c <= n_c) with the given balanced accuracy
    (over the classes with cells) and accuracy; classes 0 .. C-3 enumerated, the last two solved."""
    present = [c for c, n in enumerate(counts) if n > 0]
    total, n_right = sum(counts), round(accuracy * sum(counts))
    if abs(accuracy * total - n_right) > TOL * total or len(present) < 2:
        return []
    *head, a, b = present
    out = []
    for ks in np.ndindex(*(counts[c] + 1 for c in head)):
        rest = n_right - sum(ks)
        recall_left = len(present) * balanced_accuracy - sum(k / counts[c] for k, c in zip(ks, head))
        # k_a / n_a + (rest - k_a) / n_b = recall_left
        na, nb = counts[a], counts[b]
        ka = (recall_left - rest / nb) / (1 / na - 1 / nb) if na != nb else None
        for k in ([round(ka)] if ka is not None and abs(ka - round(ka)) < 1e-6 else
                  (range(na + 1) if ka is None else [])):
            kb = rest - k
            if 0 <= k <= na and 0 <= kb <= nb and abs(k / na + kb / nb - recall_left) < TOL:
                vec = [0] * len(counts)
                for c, kc in zip(head, ks):
                    vec[c] = int(kc)
                vec[a], vec[b] = int(k), int(kb)
                out.append(vec)
    return out


def test_line_counts(root: Path, pair: int, cache: dict) -> list[int]:
    """A pair's test-line cells per class (G1, S, G2M)."""
    if pair not in cache:
        store = root / f"pair{pair}" / "store"
        if (store / "datasets" / "B_GEX").exists():
            from xfer.data.store import CellStore

            labels = CellStore(str(store)).read("B_GEX").labels
        else:
            from xfer.data.simulate import draw_settings, simulate_pair

            size, settings = draw_settings(pair, "medium")
            labels = simulate_pair(size, seed=pair, settings=settings)[1].gex.labels
        cache[pair] = np.bincount(np.asarray(labels)[np.asarray(labels) >= 0], minlength=3).tolist()
    return cache[pair]


def rederive(root: Path, write: bool) -> list[str]:
    cache: dict = {}
    lines = ["| result | pair | arm | n | balanced accuracy | single-binomial SE (as printed) | per-class SE |",
             "|---|---|---|---|---|---|---|"]
    for name, arms in RESULT_ARMS.items():
        path = RESULTS / name
        d = read_results(path)
        for p in sorted(d["pairs"], key=int):
            for arm in arms:
                r = d["pairs"][p].get(arm)
                if r is None:
                    continue
                counts = test_line_counts(root, int(p), cache)
                if sum(counts) != r["n"]:
                    raise SystemExit(f"{path}: pair {p} {arm}: {r['n']} test cells, the pair has {sum(counts)}")
                sols = class_correct(counts, r["peak_test"], r["accuracy"])
                if len(sols) != 1:
                    raise SystemExit(f"{path}: pair {p} {arm}: {len(sols)} per-class solutions")
                old = math.sqrt(r["peak_test"] * (1 - r["peak_test"]) / r["n"])
                new = balanced_accuracy_se(sols[0], counts)
                lines.append(f"| {name} | {p} | {arm} | {r['n']} | {r['peak_test']:.3f} | {old:.3f} | {new:.3f} |")
                r.update(class_counts=counts, class_correct=sols[0])
        if write:
            d["class_counts_note"] = ("class_counts / class_correct re-derived by bench.per_class_se from the stored "
                                      "balanced accuracy, accuracy and the pair's test-line class counts")
            write_results(path, d)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--root", default=str(ROOT / "bench" / "_data" / "transfer"))
    r.add_argument("--write", action="store_true", help="add class_counts / class_correct to the result files")
    args = ap.parse_args()
    print("\n".join(rederive(Path(args.root), args.write)))


if __name__ == "__main__":
    main()
