"""From validated CellMatrix inputs to model inputs, without ever touching test labels.

    make_split        stratified 80/20 validation split of the training line, made
                      once by barcode and shared by its GEX and PEAK modalities
    PeakPreprocessor  fitted on the training line's training cells: the peak
                      frequency filter, IDF weights; maps another line's peaks onto
                      the kept peaks by coordinates (the peak mapper) or by name
    prepare_training  -> TrainData for the one training loop (training line only)
    prepare_line      -> LineInputs of another line (e.g. the test line) for scoring

Peaks are binarised and IDF-weighted, but not depth-normalised per cell:
total accessibility grows with DNA content through S phase, and dividing it
out would erase a real cell-cycle signal. Line-level differences are removed
by per-line standardisation inside the model (CDANN.LineNorm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .config import DataConfig
from .data.dataset import CellMatrix
from .data.mapper import map_dataset
from .data.peaks import parse_peak_names, peak_frequency_mask
from .errors import InputError
from .phases import N_PHASES, UNLABELLED

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- split

def make_split(barcodes: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split by barcode: the same barcodes and labels give the same split
    whatever the row order. Returns sorted (train_idx, val_idx) row indices."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if (labels == UNLABELLED).any():
        raise InputError("training line", "phase", f"{int((labels == UNLABELLED).sum())} cells have no label")
    order = np.argsort(np.asarray(barcodes).astype(str), kind="stable")
    counts = np.bincount(labels[order], minlength=N_PHASES)
    stratify = labels[order] if (counts[counts > 0] >= 2).all() else None
    tr, va = train_test_split(order, test_size=val_fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


# ----------------------------------------------------------------------------- peaks

def transform_peaks(X: sp.csr_matrix, idf: np.ndarray | None, how: str) -> sp.csr_matrix:
    """binary / tfidf (binary x IDF) / log1p counts; no per-cell depth normalisation."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if how == "log1p":
        X.data = np.log1p(X.data)
        return X
    X.data = np.ones_like(X.data)
    if how == "tfidf":
        X = (X @ sp.diags(idf.astype(np.float32))).tocsr()
    return X


@dataclass
class PeakPreprocessor:
    """Peak filter + IDF fitted on the training line's training cells."""

    cfg: DataConfig
    peak_names: np.ndarray | None = None      # kept peaks of the training line
    kept_idx: np.ndarray | None = None
    idf: np.ndarray | None = None
    col_mean: np.ndarray | None = None        # raw column means of kept peaks (for 'mean' imputation)
    n_peaks_before: int = 0
    mapping_stats: dict = field(default_factory=dict)

    def fit(self, tgt: CellMatrix, train_idx: np.ndarray) -> "PeakPreprocessor":
        Xtr = tgt.X[train_idx]
        mask = peak_frequency_mask(Xtr, self.cfg.peak_filter, key="peak_filter")
        if not mask.any():
            raise InputError(tgt.source, "peak_filter", f"no peak is non-zero in >= {self.cfg.peak_filter:.1%} "
                             "of the training cells; lower --peak_filter")
        self.kept_idx = np.flatnonzero(mask)
        self.peak_names = np.asarray(tgt.features[mask], dtype=object)
        self.n_peaks_before = tgt.n_features
        df = np.asarray((Xtr[:, self.kept_idx] > 0).sum(axis=0)).ravel()
        self.idf = np.log1p(Xtr.shape[0] / (1.0 + df)).astype(np.float32)
        self.col_mean = np.asarray(Xtr[:, self.kept_idx].mean(axis=0)).ravel().astype(np.float32)
        log.info("peak filter %.3f kept %d of %d peaks (training cells only)",
                 self.cfg.peak_filter, len(self.kept_idx), tgt.n_features)
        return self

    def transform(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """Raw counts on the kept peaks -> model input values (binary / tfidf / log1p)."""
        return transform_peaks(X, self.idf, self.cfg.peak_transform)

    def training_counts(self, tgt: CellMatrix) -> sp.csr_matrix:
        return tgt.X[:, self.kept_idx].tocsr()

    def map_counts(self, peaks: CellMatrix) -> sp.csr_matrix:
        """Another line's raw counts on the kept peaks: by coordinates (peak mapper) or,
        without the mapper, by identical peak names (others are zero)."""
        if self.cfg.use_peak_mapper:
            ref = parse_peak_names(self.peak_names, "training line peaks", "features")
            mapped, mapping = map_dataset(peaks, ref, method=self.cfg.peak_mapper_method,
                                          impute=self.cfg.peak_impute_strategy, ref_fill=self.col_mean,
                                          max_distance=self.cfg.peak_max_distance)
            self.mapping_stats = dict(mapping.stats)
            return mapped.X
        pos = {n: i for i, n in enumerate(peaks.features)}
        src = np.array([pos.get(n, -1) for n in self.peak_names])
        found = src >= 0
        if not found.any():
            raise InputError(peaks.source, "features", "shares no peak name with the training line; "
                             "use --use_peak_mapper to map peaks by genomic coordinates")
        cols = np.flatnonzero(found)
        M = sp.csr_matrix((np.ones(len(cols), np.float32), (src[found], cols)),
                          shape=(peaks.n_features, len(self.peak_names)))
        self.mapping_stats = {"method": "name", "fraction_ref_mapped": float(found.mean())}
        return (peaks.X @ M).tocsr()

    def state(self) -> dict:
        return {"peak_names": list(map(str, self.peak_names)), "idf": self.idf, "col_mean": self.col_mean,
                "n_peaks_before": self.n_peaks_before}


# ----------------------------------------------------------------------------- model inputs

@dataclass(frozen=True)
class LineInputs:
    """One cell line's model inputs (rows follow `barcodes`)."""

    name: str
    barcodes: np.ndarray
    emb: np.ndarray | None = None          # (n, E) expression embedding
    peaks: sp.csr_matrix | None = None     # (n, P) transformed peaks on the training line's kept peaks
    labels: np.ndarray | None = None       # int8 codes; for a test line only the evaluation reads them

    def stats(self) -> dict:
        """Per-feature mean/std of this line's inputs (label-free) for LineNorm."""
        out = {}
        if self.emb is not None:
            out["emb"] = _mean_std(self.emb)
        if self.peaks is not None:
            out["peaks"] = _mean_std(self.peaks)
        return out


def _mean_std(X) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(X):
        mean = np.asarray(X.mean(axis=0)).ravel()
        sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
        var = np.maximum(sq - mean ** 2, 0)
    else:
        mean, var = X.mean(axis=0), X.var(axis=0)
    std = np.sqrt(var)
    floor = max(float(np.median(std[std > 0])) * 1e-2, 1e-6) if (std > 0).any() else 1.0
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


@dataclass(frozen=True)
class TrainData:
    """What `fit` sees: the training line only (its two paired modalities + labels)."""

    line: LineInputs
    train_idx: np.ndarray
    val_idx: np.ndarray
    class_prior: np.ndarray
    line_stats: dict                       # LineNorm statistics from the training cells
    preprocess: dict                       # state for checkpoints (peaks, embedder)

    @property
    def emb_dim(self) -> int:
        return int(self.line.emb.shape[1])

    @property
    def n_peaks(self) -> int:
        return int(self.line.peaks.shape[1])


def prepare_training(src: CellMatrix, tgt: CellMatrix, src_emb: np.ndarray, cfg: DataConfig, seed: int,
                     embedder_state: dict | None = None) -> tuple[TrainData, PeakPreprocessor]:
    """Split, filter and transform the training line. `src` and `tgt` must be paired
    (same barcodes in the same order, see data.inputs.pair_cells)."""
    if src.labels is None or (src.labels == UNLABELLED).all():
        raise InputError(src.source, "phase", "the training line needs phase labels (--src_label_csv or a phase column)")
    if list(src.barcodes) != list(tgt.barcodes):
        raise InputError(tgt.source, "barcode", "GEX and PEAK of the training line are not paired cell by cell")
    train_idx, val_idx = make_split(src.barcodes, src.labels, cfg.val_fraction, seed)
    pre = PeakPreprocessor(cfg).fit(tgt, train_idx)
    peaks = pre.transform(pre.training_counts(tgt))
    line = LineInputs(name=src.name, barcodes=src.barcodes, emb=np.asarray(src_emb, np.float32), peaks=peaks,
                      labels=src.labels)
    prior = np.bincount(src.labels[train_idx], minlength=N_PHASES).astype(np.float32)
    train_view = LineInputs(name=line.name, barcodes=line.barcodes[train_idx], emb=line.emb[train_idx],
                            peaks=peaks[train_idx])
    stats = train_view.stats() if cfg.line_norm else {}
    data = TrainData(line=line, train_idx=train_idx, val_idx=val_idx, class_prior=prior / prior.sum(),
                     line_stats=stats,
                     preprocess={"peaks": pre.state(), "embedder": embedder_state or {}})
    return data, pre


def prepare_line(name: str, pre: PeakPreprocessor, gex: CellMatrix | None = None, emb: np.ndarray | None = None,
                 peak_counts: sp.csr_matrix | None = None, peaks: CellMatrix | None = None) -> LineInputs:
    """Another line's inputs on the training line's feature spaces. Peaks come as a
    CellMatrix (mapped here) or as counts already mapped with `pre.map_counts`.
    Labels are attached only so that the final evaluation can score; nothing in
    training reads them."""
    ref = gex if gex is not None else peaks
    if peak_counts is None and peaks is not None:
        peak_counts = pre.map_counts(peaks)
    return LineInputs(name=name, barcodes=ref.barcodes if ref is not None else None,
                      emb=None if emb is None else np.asarray(emb, np.float32),
                      peaks=None if peak_counts is None else pre.transform(peak_counts),
                      labels=None if ref is None else ref.labels)
