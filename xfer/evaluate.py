"""Honest metrics and prediction tables.

Every evaluated split reports accuracy, balanced accuracy and macro-F1 next to
the majority-class rate (the share of the split's most common true phase: what
always answering that phase would score) and the confusion matrix (rows true,
columns predicted, in PHASES order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from .phases import N_PHASES, PHASES, decode_phases

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


def classification_metrics(y_true, y_pred) -> dict:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    keep = y_true >= 0
    y_true, y_pred = y_true[keep], y_pred[keep]
    n = int(len(y_true))
    if n == 0:
        return {"n": 0}
    labels = list(range(N_PHASES))
    present = np.unique(y_true)
    counts = np.bincount(y_true, minlength=N_PHASES)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # sklearn's balanced accuracy averages recall over the classes present in y_true
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(present) > 1
        else float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "majority_rate": float(counts.max() / n),
        "majority_class": PHASES[int(counts.argmax())],
        "n": n,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
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
