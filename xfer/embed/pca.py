"""PCA, the weight-free default source model: log-normalised expression ->
truncated SVD fitted on the training line, applied to every line."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD

from ..data.dataset import CellMatrix
from ..errors import InputError
from .base import Embedder


def log_normalise(X: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p(counts / cell total * target_sum), sparse in, sparse out."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    totals = np.asarray(X.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    X.data = np.log1p(X.data * np.repeat(target_sum / totals, np.diff(X.indptr))).astype(np.float32)
    return X


def align_genes(ds: CellMatrix, genes: np.ndarray) -> sp.csr_matrix:
    """ds's matrix on the gene list `genes` (by name; missing genes are zero columns)."""
    pos = {g: i for i, g in enumerate(ds.features)}
    src = np.array([pos.get(g, -1) for g in genes])
    found = src >= 0
    if not found.any():
        raise InputError(ds.source, "features", "shares no gene name with the training line's expression matrix")
    X = ds.X.tocsc()[:, src[found]]
    cols = np.flatnonzero(found)
    M = sp.csr_matrix((np.ones(len(cols), np.float32), (np.arange(len(cols)), cols)), shape=(len(cols), len(genes)))
    return (X @ M).tocsr()


class PCAEmbedder(Embedder):
    name = "pca"

    def __init__(self, n_components: int = 64, seed: int = 0):
        self.n_components = n_components
        self.seed = seed
        self.genes: np.ndarray | None = None
        self.components_: np.ndarray | None = None

    def settings(self) -> dict:
        return {"n_components": self.n_components, "normalisation": "log1p_cp10k", "seed": self.seed}

    def is_fitted(self) -> bool:
        return self.components_ is not None

    @classmethod
    def from_state(cls, state: dict) -> "PCAEmbedder":
        st = state.get("settings", {})
        emb = cls(n_components=int(st.get("n_components", 64)), seed=int(st.get("seed", 0)))
        comps = state["components"]
        emb.components_ = np.asarray(comps.numpy() if hasattr(comps, "numpy") else comps, dtype=np.float32)
        emb.genes = np.asarray(state["genes"], dtype=object)
        return emb

    def fit(self, train: CellMatrix) -> "PCAEmbedder":
        k = min(self.n_components, train.n_features - 1, train.n_cells - 1)
        svd = TruncatedSVD(n_components=k, random_state=self.seed, algorithm="randomized", n_iter=7)
        svd.fit(log_normalise(train.X))
        self.genes = np.asarray(train.features, dtype=object)
        self.components_ = svd.components_.astype(np.float32)
        return self

    def transform(self, ds: CellMatrix) -> np.ndarray:
        if self.components_ is None:
            raise RuntimeError("PCAEmbedder.transform before fit")
        same = len(ds.features) == len(self.genes) and (ds.features == self.genes).all()
        X = ds.X if same else align_genes(ds, self.genes)
        return np.asarray(log_normalise(X) @ self.components_.T, dtype=np.float32)

    def state(self) -> dict:
        return {**super().state(), "genes": list(map(str, self.genes)), "components": self.components_}
