"""xfer.evaluate's metrics (numpy, from the confusion matrix) are sklearn's: accuracy_score,
balanced_accuracy_score (recall averaged over the phases present in y_true) and
f1_score(labels=all phases, average="macro", zero_division=0)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from xfer.evaluate import classification_metrics


def _cases():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 37, 400):
        for _ in range(40):
            k_true = rng.integers(1, 4)            # 1, 2 or 3 phases present in y_true
            true_set = rng.choice(3, size=k_true, replace=False)
            y = rng.choice(true_set, size=n)
            p = np.where(rng.random(n) < 0.6, y, rng.integers(0, 3, size=n))
            yield y, p
    yield np.zeros(10, int), np.ones(10, int)      # every cell wrong, one phase true, another predicted
    yield np.array([0, 1, 2, -1, -1]), np.array([0, 2, 2, 1, 0])  # unlabelled cells (-1) are left out


@pytest.mark.parametrize("case", list(_cases()))
def test_the_metrics_are_sklearns(case):
    y, p = case
    m = classification_metrics(y, p)
    keep = y >= 0
    y, p = y[keep], p[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # sklearn warns about a predicted phase absent from y_true
        want = {"accuracy": accuracy_score(y, p),
                "balanced_accuracy": balanced_accuracy_score(y, p) if len(np.unique(y)) > 1 else accuracy_score(y, p),
                "macro_f1": f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0)}
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    assert m["confusion"] == confusion_matrix(y, p, labels=[0, 1, 2]).tolist()
    assert m["n"] == len(y) and m["majority_rate"] == pytest.approx(np.bincount(y).max() / len(y))


def test_no_labelled_cell_and_codes_out_of_range():
    assert classification_metrics([-1, -1], [0, 1]) == {"n": 0}
    with pytest.raises(ValueError, match="phase codes"):
        classification_metrics([0, 1], [0, 3])
