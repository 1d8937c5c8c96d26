"""The one in-memory dataset type every reader returns and every store reads back."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from ..phases import PHASES, UNLABELLED, decode_phases

MODALITIES = ("gex", "peak")


@dataclass(frozen=True, eq=False)
class CellMatrix:
    """A sparse cells x features matrix with its barcodes, features and labels.

    X         scipy CSR, float32, cells x features (counts or normalised values)
    barcodes  str array, one per row, unique
    features  str array, one per column, unique (gene symbols or peak names)
    labels    int8 codes into PHASES (-1 = unlabelled), or None when no labels
    modality  'gex' or 'peak'
    feature_ids  optional str array (e.g. Ensembl ids for genes)
    name      a short dataset name (file stem or store dataset name)
    source    where it came from (path / URI), used in error messages
    """

    X: sp.csr_matrix
    barcodes: np.ndarray
    features: np.ndarray
    labels: np.ndarray | None
    modality: str
    name: str = ""
    source: str = ""
    feature_ids: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        n, m = self.X.shape
        if len(self.barcodes) != n:
            raise ValueError(f"{n} rows but {len(self.barcodes)} barcodes")
        if len(self.features) != m:
            raise ValueError(f"{m} columns but {len(self.features)} features")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{n} rows but {len(self.labels)} labels")
        if self.feature_ids is not None and len(self.feature_ids) != m:
            raise ValueError(f"{m} columns but {len(self.feature_ids)} feature ids")

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((self.labels != UNLABELLED).any())

    def phase_names(self) -> np.ndarray:
        if self.labels is None:
            return np.full(self.n_cells, "", dtype=object)
        return decode_phases(self.labels)

    def label_counts(self) -> dict[str, int]:
        if self.labels is None:
            return {}
        return {p: int((self.labels == i).sum()) for i, p in enumerate(PHASES)}

    def subset_cells(self, idx) -> "CellMatrix":
        """Rows by integer index or boolean mask (order as given)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return replace(
            self,
            X=self.X[idx],
            barcodes=self.barcodes[idx],
            labels=None if self.labels is None else self.labels[idx],
        )

    def without_labels(self) -> "CellMatrix":
        return replace(self, labels=None)

    def with_labels(self, labels) -> "CellMatrix":
        return replace(self, labels=None if labels is None else np.asarray(labels, dtype=np.int8))

    def content_hash(self) -> str:
        """A stable hash of barcodes, features, matrix and labels (hex, 32 chars)."""
        return content_hash(self)


def _canonical_csr(X) -> sp.csr_matrix:
    """CSR float32 with sorted, unique column indices and no stored zeros.

    Never modifies its argument (store reads hand out read-only Arrow buffers)."""
    X = sp.csr_matrix(X, dtype=np.float32)
    if not (X.has_canonical_format and (X.data != 0).all()):
        X = X.copy()
        X.sum_duplicates()
        X.sort_indices()
        X.eliminate_zeros()
    return X


def content_hash(ds: CellMatrix) -> str:
    h = hashlib.blake2b(digest_size=16)
    X = _canonical_csr(ds.X)
    h.update(f"{ds.modality}|{X.shape[0]}|{X.shape[1]}|".encode())
    for arr in (ds.barcodes, ds.features):
        h.update("\x1f".join(map(str, arr)).encode())
        h.update(b"\x1e")
    h.update(np.ascontiguousarray(X.indptr, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(X.indices, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(X.data, dtype=np.float32).tobytes())
    if ds.labels is not None:
        h.update(np.ascontiguousarray(ds.labels, dtype=np.int8).tobytes())
    return h.hexdigest()


def make_matrix(X, barcodes, features, labels=None, *, modality, name="", source="",
                feature_ids=None, meta=None) -> CellMatrix:
    """Build a CellMatrix with canonical dtypes (CSR float32, str arrays, int8 labels)."""
    return CellMatrix(
        X=_canonical_csr(X),
        barcodes=np.asarray(barcodes, dtype=object).astype(str).astype(object),
        features=np.asarray(features, dtype=object).astype(str).astype(object),
        labels=None if labels is None else np.asarray(labels, dtype=np.int8),
        modality=modality,
        name=name,
        source=str(source),
        feature_ids=None if feature_ids is None else np.asarray(feature_ids, dtype=object).astype(str).astype(object),
        meta=dict(meta or {}),
    )
