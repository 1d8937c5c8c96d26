"""The plain baselines: the joint-LSI recipe's steps pinned by an independent re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xfer.baselines import coral_align, run_baselines


@pytest.fixture(scope="module")
def lines(tiny_train, tiny_pair):
    """The training line's counts on its kept peaks and the test line's counts mapped onto them."""
    cfg, data, pre, _ = tiny_train
    A, B = tiny_pair
    return {"a": pre.training_counts(A.peak), "b": pre.map_counts(B.peak), "y_a": data.line.labels,
            "y_b": B.peak.labels, "tr": data.train_idx, "va": data.val_idx}


def _recipe_by_hand(Xa, Xb, k=50, seed=0):
    """binarise -> TF-IDF per line with its own IDF -> log1p -> one SVD of both lines."""
    def tfidf(X):
        b = (X.toarray() > 0).astype(np.float64)
        idf = b.shape[0] / np.maximum(b.sum(0), 1)
        tf = b / np.maximum(b.sum(1, keepdims=True), 1)
        return np.log1p(tf * idf * 1e4)
    Ta, Tb = tfidf(Xa), tfidf(Xb)
    svd = TruncatedSVD(min(k, Ta.shape[1] - 1), random_state=seed, algorithm="randomized", n_iter=7)
    Z = svd.fit_transform(np.vstack([Ta, Tb]))
    return Z[: len(Ta)], Z[len(Ta):]


def _lr(seed=0):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, class_weight="balanced",
                                                              random_state=seed))


def test_joint_lsi_recipe_follows_its_steps(lines):
    L = lines
    out = run_baselines(peaks_a=L["a"], y_a=L["y_a"], train_idx=L["tr"], val_idx=L["va"], peaks_b=L["b"],
                        y_b=L["y_b"])
    Za, Zb = _recipe_by_hand(L["a"], L["b"])
    z = lambda Z: (Z - Z.mean(0)) / Z.std(0)  # noqa: E731 - per line
    expect = {
        "joint_lsi_z": (z(Za), z(Zb)),
        "joint_lsi_coral": (coral_align(Zb, Za), Zb),  # the training line mapped onto the test line
    }
    for name, (A, B) in expect.items():
        test_pred = _lr().fit(A, L["y_a"]).predict(B)           # every training-line cell
        val_pred = _lr().fit(A[L["tr"]], L["y_a"][L["tr"]]).predict(A[L["va"]])  # validation: training cells only
        got = out[name]
        np.testing.assert_array_equal(got["peak_test"]["confusion"], confusion_matrix(L["y_b"], test_pred,
                                                                                      labels=[0, 1, 2]))
        np.testing.assert_array_equal(got["peak_val"]["confusion"], confusion_matrix(L["y_a"][L["va"]], val_pred,
                                                                                     labels=[0, 1, 2]))


def test_the_recipe_differs_from_the_shared_idf_alignment(lines):
    """Per-line IDF is what separates the recipe from lsi_aligned (one IDF of both lines)."""
    L = lines
    out = run_baselines(peaks_a=L["a"], y_a=L["y_a"], train_idx=L["tr"], val_idx=L["va"], peaks_b=L["b"],
                        y_b=L["y_b"])
    assert out["joint_lsi_z"]["peak_test"]["confusion"] != out["lsi_aligned"]["peak_test"]["confusion"]
    # without a test line there is nothing to align: only the within-line baselines
    alone = run_baselines(peaks_a=L["a"], y_a=L["y_a"], train_idx=L["tr"], val_idx=L["va"])
    assert "joint_lsi_z" not in alone and "peak_val" in alone["lsi_lr"]
