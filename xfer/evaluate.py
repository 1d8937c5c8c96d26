"""Honest metrics and prediction tables.

Every evaluated split reports accuracy, balanced accuracy and macro-F1 next to
the majority-class rate (the share of the split's most common true phase: what
always answering that phase would score) and the confusion matrix (rows true,
columns predicted, in PHASES order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .phases import N_PHASES, PHASES, decode_phases

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


def confusion(y_true, y_pred, n_classes: int = N_PHASES) -> np.ndarray:
    """Counts, rows true, columns predicted (labels 0..n_classes-1)."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(y_true, y_pred) -> dict:
    """The metrics from the confusion matrix, as sklearn defines them (tests/test_evaluate.py checks them
    against accuracy_score, balanced_accuracy_score and f1_score(average="macro", zero_division=0)):
    balanced accuracy averages the recall of the phases present in y_true; macro-F1 averages F1 over
    all three phases, 0 for a phase neither true nor predicted. numpy only: sklearn's import (~1.2 s)
    stays off a trial's start (BENCHMARKS.md: Ray's costs that are ours)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    keep = y_true >= 0
    y_true, y_pred = y_true[keep], y_pred[keep]
    n = int(len(y_true))
    if n == 0:
        return {"n": 0}
    if y_pred.min() < 0 or y_pred.max() >= N_PHASES or y_true.max() >= N_PHASES:
        raise ValueError(f"phase codes must be in 0..{N_PHASES - 1}")
    cm = confusion(y_true, y_pred)
    tp = np.diag(cm).astype(np.float64)
    true_n, pred_n = cm.sum(1), cm.sum(0)
    present = true_n > 0
    denom = true_n + pred_n
    f1 = np.divide(2 * tp, denom, out=np.zeros(N_PHASES), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(tp[present] / true_n[present])),
        "macro_f1": float(f1.mean()),
        "majority_rate": float(true_n.max() / n),
        "majority_class": PHASES[int(true_n.argmax())],
        "n": n,
        "confusion": cm.tolist(),
    }


def predictions_table(barcodes, y_true, probs) -> pd.DataFrame:
    """barcode, true, predicted, one probability column per phase name."""
    probs = np.asarray(probs, dtype=np.float64)
    df = pd.DataFrame({"barcode": np.asarray(barcodes).astype(str),
                       "true": decode_phases(y_true) if y_true is not None else "",
                       "predicted": decode_phases(probs.argmax(1))})
    for i, p in enumerate(PHASES):
        df[f"prob_{p}"] = probs[:, i]
    return df
