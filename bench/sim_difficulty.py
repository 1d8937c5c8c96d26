"""How hard is the simulated task?  Plain baselines on a simulated pair (not a test).

Usage::

    python -m bench.sim_difficulty [--size small] [--seed 0] [--folds 5]

Prints balanced accuracies (mean over stratified folds where it says CV):

  gex within-line CV    logistic regression on log1p-CP10k expression
  peak within-line CV   LSI (TF-IDF + TruncatedSVD, 50 comps) + logistic regression
  gex A -> B            LR on A's expression applied to B (same genes)
  peak A -> B naive     LSI fit on A, LR on A, B mapped onto A's peaks by >= 1 bp overlap
  peak A -> B aligned   LSI on both lines, components standardised per line,
                        class-balanced LR on A
  majority rate         share of the largest class (what guessing it scores in accuracy;
                        its balanced accuracy is 1/3)

plus the simulation's sparsity and peak-set overlap.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from xfer.data.simulate import SIZES, simulate_pair

_PEAK = re.compile(r"^(.+?)[:_-](\d+)[-_](\d+)$")


def log_cp10k(X: sp.csr_matrix) -> sp.csr_matrix:
    totals = np.asarray(X.sum(axis=1)).ravel()
    Y = sp.diags(1e4 / np.maximum(totals, 1)) @ X
    Y.data = np.log1p(Y.data)
    return sp.csr_matrix(Y)


def tfidf(X: sp.csr_matrix, idf: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Signac-style TF-IDF: log1p(tf * idf * 1e4) with idf = n_cells / feature totals."""
    if idf is None:
        idf = X.shape[0] / np.maximum(np.asarray(X.sum(axis=0)).ravel(), 1)
    tf = sp.diags(1.0 / np.maximum(np.asarray(X.sum(axis=1)).ravel(), 1)) @ X
    Y = sp.csr_matrix(tf @ sp.diags(idf))
    Y.data = np.log1p(Y.data * 1e4)
    return Y, idf


def parse_peaks(names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chrom, start, end = [], [], []
    for n in names:
        m = _PEAK.match(str(n))
        chrom.append(m[1])
        start.append(int(m[2]))
        end.append(int(m[3]))
    return np.array(chrom, dtype=object), np.array(start), np.array(end)


def overlap_map(query_names, ref_names) -> np.ndarray:
    """For each query peak, the index of the ref peak it overlaps most (>= 1 bp), else -1.

    Ref peaks must not overlap one another (true of called peak sets); half-open intervals.
    """
    qc, qs, qe = parse_peaks(query_names)
    rc, rs, re_ = parse_peaks(ref_names)
    out = np.full(len(qc), -1, dtype=np.int64)
    for chrom in np.unique(qc):
        qi = np.flatnonzero(qc == chrom)
        ri = np.flatnonzero(rc == chrom)
        if ri.size == 0:
            continue
        ri = ri[np.argsort(rs[ri])]
        first = np.searchsorted(re_[ri], qs[qi], side="right")  # first ref ending after q start
        best = np.full(qi.size, -1)
        best_len = np.zeros(qi.size)
        for step in range(3):  # a query spans at most a few refs
            j = first + step
            ok = j < ri.size
            jj = np.where(ok, j, 0)
            ov = np.minimum(qe[qi], re_[ri[jj]]) - np.maximum(qs[qi], rs[ri[jj]])
            better = ok & (ov > 0) & (ov > best_len)
            best[better], best_len[better] = ri[jj[better]], ov[better]
        out[qi] = best
    return out


def map_onto(X: sp.csr_matrix, mapping: np.ndarray, n_ref: int) -> sp.csr_matrix:
    """Sum query columns into their mapped reference columns (unmapped columns dropped)."""
    keep = np.flatnonzero(mapping >= 0)
    M = sp.csr_matrix((np.ones(keep.size), (keep, mapping[keep])), shape=(X.shape[1], n_ref))
    return sp.csr_matrix(X @ M)


def cv_balanced_accuracy(Z: np.ndarray, y: np.ndarray, folds: int, seed: int, **lr) -> float:
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Z, y):
        scaler = StandardScaler().fit(Z[train])
        clf = LogisticRegression(max_iter=2000, **lr).fit(scaler.transform(Z[train]), y[train])
        scores.append(balanced_accuracy_score(y[test], clf.predict(scaler.transform(Z[test]))))
    return float(np.mean(scores))


def lsi(X: sp.csr_matrix, n_comp: int, seed: int) -> tuple[np.ndarray, TruncatedSVD, np.ndarray]:
    Y, idf = tfidf(X)
    svd = TruncatedSVD(n_comp, random_state=seed).fit(Y)
    return svd.transform(Y), svd, idf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--components", type=int, default=50)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    a, b = simulate_pair(args.size, seed=args.seed)
    t_sim = time.perf_counter() - t0
    ya, yb = a.gex.labels.astype(int), b.gex.labels.astype(int)
    rows: list[tuple[str, float, float]] = []

    # (a) expression, within line
    ga, gb = log_cp10k(a.gex.X).toarray(), log_cp10k(b.gex.X).toarray()
    rows.append(("gex within-line CV (LR, log1p-CP10k)",
                 cv_balanced_accuracy(ga, ya, args.folds, args.seed),
                 cv_balanced_accuracy(gb, yb, args.folds, args.seed)))

    # (b) peaks, within line
    za, svd_a, idf_a = lsi(a.peak.X, args.components, args.seed)
    zb, _, _ = lsi(b.peak.X, args.components, args.seed)
    rows.append(("peak within-line CV (LSI50 + LR)",
                 cv_balanced_accuracy(za, ya, args.folds, args.seed),
                 cv_balanced_accuracy(zb, yb, args.folds, args.seed)))

    # gex A -> B (same genes): an upper reference for expression-side transfer
    sc = StandardScaler().fit(ga)
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(ga), ya)
    gex_ab = balanced_accuracy_score(yb, clf.predict(sc.transform(gb)))

    # (c) peaks A -> B, naive: B mapped onto A's peaks, A's IDF and SVD, A's scaler and LR
    mapping = overlap_map(b.peak.features, a.peak.features)
    xb_on_a = map_onto(b.peak.X, mapping, a.peak.n_features)
    zb_naive = svd_a.transform(tfidf(xb_on_a, idf_a)[0])
    sc = StandardScaler().fit(za)
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(za), ya)
    naive = balanced_accuracy_score(yb, clf.predict(sc.transform(zb_naive)))

    # (d) aligned: joint LSI, per-line standardisation, class-balanced LR
    joint = sp.vstack([a.peak.X, xb_on_a], format="csr")
    zj, _, _ = lsi(joint, args.components, args.seed)
    zja = StandardScaler().fit_transform(zj[: a.peak.n_cells])
    zjb = StandardScaler().fit_transform(zj[a.peak.n_cells:])
    clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(zja, ya)
    aligned = balanced_accuracy_score(yb, clf.predict(zjb))

    # (e) majority rates
    maj_a = np.bincount(ya).max() / ya.size
    maj_b = np.bincount(yb).max() / yb.size

    exact = len(set(a.peak.features) & set(b.peak.features))
    mapped = int((mapping >= 0).sum())
    zeros = [1 - ds.X.nnz / np.prod(ds.X.shape) for ds in (a.peak, b.peak)]
    print(f"size={args.size} seed={args.seed}  simA {a.peak.n_cells} cells, simB {b.peak.n_cells} cells, "
          f"{a.gex.n_features} genes, peaks {a.peak.n_features}/{b.peak.n_features}  "
          f"(simulated in {t_sim:.1f} s)")
    print(f"peak zeros: simA {zeros[0]:.1%}  simB {zeros[1]:.1%};  B peaks with exact-name match in A: "
          f"{exact / b.peak.n_features:.1%}, with >=1 bp overlap: {mapped / b.peak.n_features:.1%}")
    print(f"phase proportions G1/S/G2M: simA {np.bincount(ya, minlength=3) / ya.size}, "
          f"simB {np.bincount(yb, minlength=3) / yb.size}")
    print()
    print(f"{'baseline (balanced accuracy)':<44}{'simA':>8}{'simB':>8}")
    print("-" * 60)
    for name, va, vb in rows:
        print(f"{name:<44}{va:>8.3f}{vb:>8.3f}")
    print(f"{'gex A -> B (LR on A, applied to B)':<44}{'':>8}{gex_ab:>8.3f}")
    print(f"{'peak A -> B naive (A LSI, overlap-mapped)':<44}{'':>8}{naive:>8.3f}")
    print(f"{'peak A -> B aligned (joint LSI, per-line z)':<44}{'':>8}{aligned:>8.3f}")
    print(f"{'majority-class rate (accuracy of guessing)':<44}{maj_a:>8.3f}{maj_b:>8.3f}")
    print(f"{'chance balanced accuracy':<44}{1 / 3:>8.3f}{1 / 3:>8.3f}")
    print(f"(total {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
