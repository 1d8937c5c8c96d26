"""Standard errors, and what a run's metrics.json says about its test line.

Balanced accuracy is the mean of the per-class recalls, BA = (1/C) sum_c p_c, where p_c is the
share of class c's n_c cells predicted as c. The classes are independent binomial samples of
their own sizes, so

    SE(BA) = (1/C) * sqrt( sum_c p_c (1 - p_c) / n_c ),

over the C classes present (n_c > 0). This is the one standard error of a balanced accuracy
that the benchmarks report. Treating BA as a single binomial over all n cells,
sqrt(BA (1 - BA) / n), is right only when every class has as many cells and the same recall;
with imbalanced classes it understates the error, most where a small class has a middling
recall (the small classes weigh 1/C each in BA whatever their size).

`mean_se` is a different quantity: the standard error of a mean over pairs (of per-pair
differences), from their spread.
"""

from __future__ import annotations

import math

# the plain PEAK baselines of a metrics.json, "the best plain baseline" is the best of these
PEAK_BASELINES = ("lsi_lr", "lsi_aligned", "lsi_coral", "joint_lsi_z", "joint_lsi_coral")


def balanced_accuracy_se(correct, counts) -> float:
    """SE of a balanced accuracy from each class's cells (`counts`, n_c) and how many of them were
    predicted right (`correct`): (1/C) sqrt(sum_c p_c (1 - p_c) / n_c), p_c = correct_c / n_c, over
    the classes with n_c > 0 (module docstring)."""
    terms = []
    for k, n in zip(correct, counts):
        if n < 0 or not 0 <= k <= n:
            raise ValueError(f"a class with {k} of {n} cells right")
        if n:
            p = k / n
            terms.append(p * (1 - p) / n)
    if not terms:
        raise ValueError("no class has cells")
    return math.sqrt(sum(terms)) / len(terms)


def confusion_counts(confusion) -> tuple[list[int], list[int]]:
    """(correct, counts) per class of a confusion matrix (rows: the true class)."""
    return [int(row[i]) for i, row in enumerate(confusion)], [int(sum(row)) for row in confusion]


def confusion_se(confusion) -> float:
    """balanced_accuracy_se of a confusion matrix (rows: the true class, as xfer's metrics.json)."""
    return balanced_accuracy_se(*confusion_counts(confusion))


def summary_se(r: dict) -> float | None:
    """The SE of a `summary` (its class_correct and class_counts); None when it has neither."""
    if "class_correct" in r and "class_counts" in r:
        return balanced_accuracy_se(r["class_correct"], r["class_counts"])
    return None


def mean_se(x: list[float]) -> tuple[float, float]:
    """Mean of per-pair differences and its standard error over the pairs (nan for one pair)."""
    m = sum(x) / len(x)
    return m, (math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x)) if len(x) > 1 else float("nan"))


def best_plain_baseline(metrics: dict, split: str = "peak_test") -> tuple[str, float]:
    """(name, balanced accuracy) of the best plain PEAK baseline of a metrics.json on `split`,
    picked after the fact (which favours the baselines)."""
    have = [(k, metrics["baselines"][k][split]["balanced_accuracy"]) for k in PEAK_BASELINES
            if split in metrics["baselines"].get(k, {})]
    return max(have, key=lambda kv: kv[1])


def summary(metrics: dict) -> dict:
    """The PEAK-test figures of a metrics.json: balanced accuracy, cells, accuracy, macro-F1, the
    majority-class rate, each class's cells and right predictions (what its SE needs), and the
    best plain PEAK baseline."""
    pt = metrics["peak_test"]
    correct, counts = confusion_counts(pt["confusion"])
    name, value = best_plain_baseline(metrics)
    return {"peak_test": pt["balanced_accuracy"], "n": pt["n"], "accuracy": pt["accuracy"],
            "macro_f1": pt["macro_f1"], "majority_rate": pt["majority_rate"],
            "class_counts": counts, "class_correct": correct,
            "best_baseline": name, "best_baseline_value": value}


def with_se(value: float, r: dict) -> str:
    """`0.653 ± 0.009`, or the value alone when the summary cannot give its SE."""
    se = summary_se(r)
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"
