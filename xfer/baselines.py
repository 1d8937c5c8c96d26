"""Plain baselines every metrics.json reports next to the model.

    majority        always the training line's most common phase
    lsi_lr          naive transfer: LSI (log TF-IDF + truncated SVD) fitted on the
                    training line's training cells + logistic regression
    lsi_aligned     label-free aligned transfer: LSI fitted on both lines' peaks,
                    each line's components standardised with its own statistics,
                    + logistic regression
    lsi_coral       as lsi_aligned, then the test line's components CORAL-aligned
                    to the training line's (whiten with its own covariance,
                    re-colour with the training line's)
    joint_lsi_z     the strongest plain recipe measured (BENCHMARKS.md): binarised
                    peaks, TF-IDF per line with each line's own IDF, log1p; one
                    truncated SVD (50) fitted on both lines' cells together; the
                    components z-scored per line; balanced LR on every cell of the
                    training line (its validation cells are scored by an LR fitted
                    on the training cells only)
    joint_lsi_coral the same components, the training line's CORAL-mapped onto the
                    test line's (whiten with its own covariance, re-colour with the
                    test line's, move to its mean); the LR fits the mapped training
                    line and reads the test line as it is
    gex_lr          logistic regression on the expression embedding
    marker_score    Seurat-style S / G2M scores on the Tirosh genes (no training)

Every logistic regression is class-balanced (balanced accuracy is the headline
metric) and fitted on the training split of the training line only (the
joint_lsi recipe fits its test-line LR on all of the training line's cells);
the test line's labels are used only to score. The PEAK baselines see the same peaks
as the model (after the peak filter and the peak mapper).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .data.dataset import CellMatrix
from .embed.pca import log_normalise
from .evaluate import classification_metrics
from .phases import N_PHASES, PHASES, tirosh_genes
from .prepare import log_tfidf
from .standardise import standardise

log = logging.getLogger(__name__)
N_LSI = 50


def _lr(seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, class_weight="balanced",
                                                             random_state=seed))


def _lsi_fit(X, seed):
    T, idf = log_tfidf(X)
    k = max(2, min(N_LSI, min(T.shape) - 1))
    svd = TruncatedSVD(k, random_state=seed, algorithm="randomized", n_iter=7).fit(T)
    return idf, svd


def joint_lsi(peaks_a: sp.csr_matrix, peaks_b: sp.csr_matrix, k: int = N_LSI, seed: int = 0) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """The recipe's components: each line's binarised peaks -> log TF-IDF with that line's own
    IDF, then one truncated SVD fitted on both lines' cells together. Returns (Za, Zb)."""
    Ta, _ = log_tfidf(peaks_a)
    Tb, _ = log_tfidf(peaks_b)
    both = sp.vstack([Ta, Tb]).tocsr()
    k = max(2, min(k, min(both.shape) - 1))
    Z = TruncatedSVD(k, random_state=seed, algorithm="randomized", n_iter=7).fit_transform(both)
    return Z[: peaks_a.shape[0]], Z[peaks_a.shape[0]:]


def coral_align(Zs: np.ndarray, Zt: np.ndarray, eps: float = 1.0) -> np.ndarray:
    """Re-colour target features with the source covariance (Sun et al. 2016)."""
    def msqrt(C, inv=False):
        w, V = np.linalg.eigh(C)
        w = np.maximum(w, 1e-8)
        return (V * (w ** (-0.5 if inv else 0.5))) @ V.T
    Cs = np.cov(Zs, rowvar=False) + eps * np.eye(Zs.shape[1])
    Ct = np.cov(Zt, rowvar=False) + eps * np.eye(Zt.shape[1])
    return (Zt - Zt.mean(0)) @ msqrt(Ct, inv=True) @ msqrt(Cs) + Zs.mean(0)


def marker_scores(gex: CellMatrix, n_bins: int = 24, n_ctrl: int = 50, seed: int = 0) -> np.ndarray:
    """Seurat's CellCycleScoring: per program, mean expression of its genes minus that of
    control genes drawn from the same expression bins; G1 when both scores < 0, else the
    larger. Returns phase codes."""
    rng = np.random.default_rng(seed)
    X = log_normalise(gex.X)
    means = np.asarray(X.mean(axis=0)).ravel()
    order = np.argsort(means, kind="stable")
    bins = np.empty(len(means), dtype=np.int64)
    bins[order] = np.arange(len(means)) * n_bins // len(means)
    pos = {g: i for i, g in enumerate(gex.features)}
    scores = []
    for genes in tirosh_genes():
        idx = np.array([pos[g] for g in genes if g in pos], dtype=np.int64)
        if len(idx) == 0:
            scores.append(np.zeros(gex.n_cells))
            continue
        ctrl = np.concatenate([rng.choice(np.flatnonzero(bins == b), size=min(n_ctrl, int((bins == b).sum())),
                                          replace=False) for b in np.unique(bins[idx])])
        s = np.asarray(X[:, idx].mean(axis=1)).ravel() - np.asarray(X[:, ctrl].mean(axis=1)).ravel()
        scores.append(s)
    s_score, g2m_score = scores
    pred = np.where(s_score > g2m_score, PHASES.index("S"), PHASES.index("G2M"))
    return np.where((s_score < 0) & (g2m_score < 0), PHASES.index("G1"), pred)


def run_baselines(*, peaks_a: sp.csr_matrix, y_a: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                  peaks_b: sp.csr_matrix | None = None, y_b: np.ndarray | None = None,
                  emb_a: np.ndarray | None = None, emb_b: np.ndarray | None = None,
                  gex_a: CellMatrix | None = None, gex_b: CellMatrix | None = None, seed: int = 0) -> dict:
    """All baselines on the four splits that exist: peak_val / gex_val (training line's
    validation cells) and peak_test / gex_test (test line; its labels only score)."""
    out: dict[str, dict] = {}
    ya_tr, ya_va = y_a[train_idx], y_a[val_idx]

    def score(name, split, y_true, y_pred):
        if y_true is None:
            return
        out.setdefault(name, {})[split] = classification_metrics(y_true, y_pred)

    major = int(np.bincount(ya_tr, minlength=N_PHASES).argmax())
    has_gex_b = emb_b is not None or gex_b is not None
    for split, y, present in (("gex_val", ya_va, True), ("peak_val", ya_va, True),
                              ("gex_test", y_b, has_gex_b), ("peak_test", y_b, peaks_b is not None)):
        if y is not None and present:
            score("majority", split, y, np.full(len(y), major))

    # naive LSI + LR, fitted on the training cells of the training line
    idf, svd = _lsi_fit(peaks_a[train_idx], seed)
    Za = svd.transform(log_tfidf(peaks_a, idf)[0])
    clf = _lr(seed).fit(Za[train_idx], ya_tr)
    score("lsi_lr", "peak_val", ya_va, clf.predict(Za[val_idx]))
    if peaks_b is not None:
        score("lsi_lr", "peak_test", y_b, clf.predict(svd.transform(log_tfidf(peaks_b, idf)[0])))

        # label-free aligned: LSI on both lines' peaks, per-line standardisation
        both = sp.vstack([peaks_a, peaks_b]).tocsr()
        T, _ = log_tfidf(both)
        k = max(2, min(N_LSI, min(T.shape) - 1))
        Z = TruncatedSVD(k, random_state=seed, algorithm="randomized", n_iter=7).fit_transform(T)
        Za2, Zb2 = standardise(Z[: peaks_a.shape[0]]), standardise(Z[peaks_a.shape[0]:])
        clf = _lr(seed).fit(Za2[train_idx], ya_tr)
        score("lsi_aligned", "peak_val", ya_va, clf.predict(Za2[val_idx]))
        score("lsi_aligned", "peak_test", y_b, clf.predict(Zb2))
        score("lsi_coral", "peak_val", ya_va, clf.predict(Za2[val_idx]))
        score("lsi_coral", "peak_test", y_b, clf.predict(coral_align(Za2, Zb2)))

        # the recipe: per-line IDF, one SVD of both lines, z per line (or the training line CORAL-mapped
        # onto the test line); validation from an LR of the training cells, the test line from all cells
        Za3, Zb3 = joint_lsi(peaks_a, peaks_b, seed=seed)
        for name, A, B in (("joint_lsi_z", standardise(Za3), standardise(Zb3)),
                           ("joint_lsi_coral", coral_align(Zb3, Za3), Zb3)):
            score(name, "peak_val", ya_va, _lr(seed).fit(A[train_idx], ya_tr).predict(A[val_idx]))
            score(name, "peak_test", y_b, _lr(seed).fit(A, y_a).predict(B))

    if emb_a is not None:
        clf = _lr(seed).fit(emb_a[train_idx], ya_tr)
        score("gex_lr", "gex_val", ya_va, clf.predict(emb_a[val_idx]))
        if emb_b is not None:
            score("gex_lr", "gex_test", y_b, clf.predict(emb_b))
    if gex_a is not None:
        score("marker_score", "gex_val", ya_va, marker_scores(gex_a, seed=seed)[val_idx])
        if gex_b is not None:
            score("marker_score", "gex_test", y_b, marker_scores(gex_b, seed=seed))
    return out
