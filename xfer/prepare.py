"""From validated CellMatrix inputs to model inputs, without ever touching test labels.

    make_split        stratified 80/20 validation split of the training line, made
                      once by barcode and shared by its GEX and PEAK modalities
    PeakPreprocessor  fitted on the training line's training cells: the peak
                      frequency filter, IDF, LSI and the coverage-channel PCA;
                      puts another line's peaks on the same features
    prepare_training  -> TrainData for the one training loop (training line only)
    prepare_line      -> LineInputs of another line (e.g. the test line) for scoring

What the peak encoder reads is configurable (DataConfig) and built from up to
two channels, concatenated: the peak channel, a `PeakRepr` strategy registered
under its `peak_repr` name (xfer.registry; the built-in ones in xfer/builtin.py),
and the coverage channel:

    peak_repr="peaks"  the filtered peaks, binarised x IDF (`peak_transform`);
                       deliberately not divided by the cell's total: total
                       accessibility grows with DNA content through S phase
    peak_repr="lsi"    LSI components: log TF-IDF -> truncated SVD fitted on the
                       training cells (Signac / GLUE-style input)
    peak_repr="joint_lsi"  LSI of both lines' cells (each line's own IDF), fitted
                       on the other line's unlabelled peaks too (transductive)
    peak_repr="none"   no peak channel (the coverage channel alone)
    bin_size > 0       the coverage channel: fragments summed in genomic bins
                       (1 Mb by default), log of the share of the cell's total,
                       standardised with the line's own bin statistics and
                       projected on a PCA fitted on the training cells. S-phase
                       cells have replicated early-replicating domains but not
                       yet late ones, so their coverage shifts between Mb-scale
                       domains; bins need coordinates only, so another line needs
                       no peak mapping for this channel.

Another line's peaks reach the peak channels through the coordinate peak
mapper (or identical names). Each line's final features are standardised with
that line's own statistics inside the model (CDANN.LineNorm).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from . import registry
from .config import DataConfig
from .data.dataset import CellMatrix
from .data.mapper import chrom_prefix_differs, map_dataset, strip_chr
from .data.peaks import genomic_bins, parse_peak_names, peak_frequency_mask
from .errors import InputError
from .phases import N_PHASES, PHASES, UNLABELLED
from .standardise import mean_std, standardise

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


# ----------------------------------------------------------------------------- peak channels

def transform_peaks(X: sp.csr_matrix, idf: np.ndarray | None, how: str) -> sp.csr_matrix:
    """Raw counts -> peak-channel values: binary (x > 0), tfidf (binary x IDF) or
    log1p(counts). No per-cell depth normalisation."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if how == "log1p":
        X.data = np.log1p(X.data)
        return X
    X.data = np.ones_like(X.data)
    if how == "tfidf":
        X = (X @ sp.diags(idf.astype(np.float32))).tocsr()
    return X


def log_tfidf(X: sp.csr_matrix, idf: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Signac-style log TF-IDF of binarised peaks: log1p(b / rowsum x N / df x 1e4).
    Returns the matrix and the IDF (computed from X when not given)."""
    B = sp.csr_matrix(X, dtype=np.float32, copy=True)
    B.data[:] = 1.0
    if idf is None:
        df = np.asarray(B.sum(axis=0)).ravel()
        idf = (B.shape[0] / np.maximum(df, 1)).astype(np.float32)
    rs = np.asarray(B.sum(axis=1)).ravel()
    rs[rs == 0] = 1
    B = sp.csr_matrix(sp.diags((1e4 / rs).astype(np.float32)) @ B @ sp.diags(idf))
    B.data = np.log1p(B.data)
    return B, idf


class PeakRepr:
    """A peak representation: how a line's counts on the kept peaks become the encoder's peak
    channel. Fitted once on the training line's training cells (`fit`), it transforms any line
    (`transform`); its fitted arrays are `arrays`, saved in checkpoints under the keys STATE
    (beside the preprocessor's own). transductive: fitted on the other line's peaks too."""

    STATE: tuple[str, ...] = ()
    transductive = False

    def __init__(self, cfg: DataConfig, arrays: dict | None = None):
        self.cfg, self.arrays = cfg, dict(arrays or {})

    def fit(self, pre: "PeakPreprocessor", kept: sp.csr_matrix, other: sp.csr_matrix | None) -> None:
        """kept: the training cells' counts on the kept peaks; other: the other line's counts on
        them (transductive representations only; None when no other line is given)."""

    def transform(self, pre: "PeakPreprocessor", kept_counts: sp.csr_matrix):
        """A line's peak channel (CSR or dense float32), or None for no channel."""
        raise NotImplementedError

    def state(self) -> dict:
        return {k: self.arrays[k] for k in self.STATE if self.arrays.get(k) is not None}

    @classmethod
    def from_state(cls, cfg: DataConfig, state: dict) -> "PeakRepr":
        return cls(cfg, {k: state[k] for k in cls.STATE})


class PeaksRepr(PeakRepr):
    """The filtered peaks, `peak_transform`ed with the preprocessor's IDF."""

    def transform(self, pre, kept_counts):
        return transform_peaks(kept_counts, pre.idf, self.cfg.peak_transform)


def _lsi_basis(T: sp.csr_matrix, n_components: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD

    k = min(n_components, min(T.shape) - 1)
    svd = TruncatedSVD(k, random_state=0, algorithm="randomized", n_iter=7).fit(T)
    return svd.components_.astype(np.float32)


class LSIRepr(PeakRepr):
    """LSI of the training line: its log TF-IDF (its IDF kept for every line) -> truncated SVD."""

    STATE = ("lsi_components", "lsi_idf")

    def fit(self, pre, kept, other):
        T, self.arrays["lsi_idf"] = log_tfidf(kept)
        self.arrays["lsi_components"] = _lsi_basis(T, self.cfg.lsi_components)

    def transform(self, pre, kept_counts):
        a = self.arrays
        return np.asarray(log_tfidf(kept_counts, a["lsi_idf"])[0] @ a["lsi_components"].T, np.float32)


class JointLSIRepr(PeakRepr):
    """One SVD of both lines' cells (the training cells of the training line and every cell of the
    other line; no label is read), each line's log TF-IDF with its own IDF."""

    STATE = ("lsi_components",)
    transductive = True

    def fit(self, pre, kept, other):
        T = log_tfidf(kept)[0]
        if other is not None:
            T = sp.vstack([T, log_tfidf(other)[0]]).tocsr()
        else:
            log.info("joint_lsi without another line's peaks: the basis is the training line's alone")
        self.arrays["lsi_components"] = _lsi_basis(T, self.cfg.lsi_components)

    def transform(self, pre, kept_counts):  # the line's own IDF (label-free), the shared components
        return np.asarray(log_tfidf(kept_counts)[0] @ self.arrays["lsi_components"].T, np.float32)


class NoPeakRepr(PeakRepr):
    """No peak channel: the encoder reads the coverage channel alone."""

    def transform(self, pre, kept_counts):
        return None


def peak_repr_class(name: str) -> type[PeakRepr]:
    """The strategy registered as `name` (DataConfig.peak_repr)."""
    return registry.peak_repr(name).load()


@dataclass
class PeakPreprocessor:
    """Every peak-side transform, fitted on the training line's training cells."""

    cfg: DataConfig
    peak_names: np.ndarray | None = None      # kept peaks of the training line
    kept_idx: np.ndarray | None = None
    idf: np.ndarray | None = None             # peaks channel (log1p(N / (1 + df)))
    col_mean: np.ndarray | None = None        # raw column means of kept peaks (for 'mean' imputation)
    channel: PeakRepr | None = None           # the fitted peak representation (cfg.peak_repr)
    bin_keys: np.ndarray | None = None
    bin_components: np.ndarray | None = None  # (k, n_bins) or None for raw bins
    n_peaks_before: int = 0
    mapping_stats: dict = field(default_factory=dict)
    neural_mapper: object = None              # peak_mapper_method "neural": xfer.data.neural_mapper.NeuralPeakMapper

    def fit(self, tgt: CellMatrix, train_idx: np.ndarray, other: CellMatrix | None = None) -> "PeakPreprocessor":
        """Fit on the training line's training cells; `other`: another line's peaks (unlabelled),
        which a transductive representation (`joint_lsi`) is fitted on as well."""
        from sklearn.decomposition import PCA

        c = self.cfg
        Xtr = tgt.X[train_idx]
        mask = peak_frequency_mask(Xtr, c.peak_filter, key="peak_filter")
        if not mask.any():
            raise InputError(tgt.source, "peak_filter", f"no peak is non-zero in >= {c.peak_filter:.1%} "
                             "of the training cells; lower --peak_filter")
        self.kept_idx = np.flatnonzero(mask)
        self.peak_names = np.asarray(tgt.features[mask], dtype=object)
        self.n_peaks_before = tgt.n_features
        kept = Xtr[:, self.kept_idx]
        df = np.asarray((kept > 0).sum(axis=0)).ravel()
        self.idf = np.log1p(Xtr.shape[0] / (1.0 + df)).astype(np.float32)
        self.col_mean = np.asarray(kept.mean(axis=0)).ravel().astype(np.float32)
        log.info("peak filter %.3f kept %d of %d peaks (training cells only)", c.peak_filter, len(self.kept_idx),
                 tgt.n_features)
        if c.use_peak_mapper and c.peak_mapper_method == "neural":
            self.neural_mapper = _load_neural_mapper(c.peak_mapper, self.peak_names)
        self.channel = peak_repr_class(c.peak_repr)(c)
        other_counts = self.map_counts(other) if other is not None and self.channel.transductive else None
        self.channel.fit(self, kept, other_counts)
        if c.bin_size > 0:
            _, self.bin_keys = genomic_bins(parse_peak_names(tgt.features, tgt.source, "features"), c.bin_size)
            prof = self._bin_profile(tgt)
            if c.bin_components > 0:
                k = min(c.bin_components, len(self.bin_keys) - 1, len(train_idx) - 1)
                self.bin_components = PCA(k, random_state=0).fit(prof[train_idx]).components_.astype(np.float32)
            log.info("coverage channel: %d bins of %d bp%s", len(self.bin_keys), c.bin_size,
                     f" -> {self.bin_components.shape[0]} PCA components" if self.bin_components is not None else "")
        return self

    def _bin_profile(self, peaks: CellMatrix) -> np.ndarray:
        """log share of the cell's fragments per bin, standardised with the line's own statistics.
        Chromosome names that differ from the training line's only by a "chr" prefix are matched."""
        ps = parse_peak_names(peaks.features, peaks.source, "features")
        keys = np.asarray(self.bin_keys).astype(str)
        key_chroms = np.unique(np.char.rpartition(keys, ":")[:, 0])
        if chrom_prefix_differs(key_chroms, np.unique(ps.chrom.astype(str))):
            ps = dataclasses.replace(ps, chrom=strip_chr(ps.chrom))
            keys = np.char.add(np.char.add(strip_chr(np.char.rpartition(keys, ":")[:, 0]).astype(str), ":"),
                               np.char.rpartition(keys, ":")[:, 2])
        M, _ = genomic_bins(ps, self.cfg.bin_size, keys)
        if M.nnz == 0:
            raise InputError(peaks.source, "features", f"no peak lies in the training line's {len(keys)} genomic "
                             f"bins of {self.cfg.bin_size} bp (chromosomes e.g. {', '.join(map(str, key_chroms[:3]))}"
                             f" there, {', '.join(map(str, np.unique(ps.chrom.astype(str))[:3]))} here)")
        counts = np.asarray((peaks.X @ M).todense(), dtype=np.float64)
        total = np.asarray(peaks.X.sum(axis=1)).ravel()
        return standardise(np.log((counts + 1.0) / (total[:, None] + 1.0) * 1e4)).astype(np.float32)

    def features(self, kept_counts: sp.csr_matrix, peaks: CellMatrix):
        """Encoder input for one line: its raw counts on the kept peaks (for the peak
        channels) and its own peaks (for the coverage channel). Sparse when only the
        peaks channel is on, else dense float32."""
        c = self.cfg
        channel = self.channel.transform(self, kept_counts)
        parts = [] if channel is None else [channel]
        if c.bin_size > 0:
            prof = self._bin_profile(peaks)
            parts.append(prof @ self.bin_components.T if self.bin_components is not None else prof)
        if len(parts) == 1:
            return parts[0]
        return np.hstack([p.toarray() if sp.issparse(p) else p for p in parts]).astype(np.float32)

    def training_counts(self, tgt: CellMatrix) -> sp.csr_matrix:
        return tgt.X[:, self.kept_idx].tocsr()

    def map_counts(self, peaks: CellMatrix) -> sp.csr_matrix:
        """Another line's raw counts on the kept peaks: by coordinates (peak mapper) or,
        without the mapper, by identical peak names (others are zero). Chromosome names
        that differ only by a "chr" prefix are matched (the mapper strips it on both sides).
        A line that shares no peak with the kept peaks is an error."""
        ref = parse_peak_names(self.peak_names, "training line peaks", "features")
        if self.neural_mapper is not None:
            return self._map_neural(peaks)
        if self.cfg.use_peak_mapper:
            query = parse_peak_names(peaks.features, peaks.source, "features")
            normalise = chrom_prefix_differs(np.unique(ref.chrom.astype(str)), np.unique(query.chrom.astype(str)))
            if normalise:
                log.info("%s: chromosome names differ from the training line's by a 'chr' prefix; matched without it",
                         peaks.source)
            mapped, mapping = map_dataset(peaks, ref, method=self.cfg.peak_mapper_method,
                                          impute=self.cfg.peak_impute_strategy, ref_fill=self.col_mean,
                                          max_distance=self.cfg.peak_max_distance, normalise_chrom=normalise)
            self.mapping_stats = dict(mapping.stats)
            if mapping.stats["n_ref_mapped"] == 0:
                raise InputError(peaks.source, "features", f"shares no peak coordinates with the training line's "
                                 f"{len(self.peak_names)} peaks (method {self.cfg.peak_mapper_method}; chromosomes "
                                 f"e.g. {_examples(query.chrom)} here, {_examples(ref.chrom)} there)")
            return mapped.X
        pos = {n: i for i, n in enumerate(peaks.features)}
        src = np.array([pos.get(n, -1) for n in self.peak_names])
        found = src >= 0
        if not found.any():
            query = parse_peak_names(peaks.features, peaks.source, "features")
            hint = (" (its chromosome names differ by a 'chr' prefix: --use_peak_mapper matches them)"
                    if chrom_prefix_differs(np.unique(ref.chrom.astype(str)), np.unique(query.chrom.astype(str)))
                    else "; use --use_peak_mapper to map peaks by genomic coordinates")
            raise InputError(peaks.source, "features", f"shares no peak name with the training line{hint}")
        cols = np.flatnonzero(found)
        M = sp.csr_matrix((np.ones(len(cols), np.float32), (src[found], cols)),
                          shape=(peaks.n_features, len(self.peak_names)))
        self.mapping_stats = {"method": "name", "n_ref": len(self.peak_names), "n_ref_mapped": int(found.sum()),
                              "fraction_ref_mapped": float(found.mean())}
        return (peaks.X @ M).tocsr()

    def _map_neural(self, peaks: CellMatrix) -> sp.csr_matrix:
        """Another line's counts on the kept peaks through the neural mapper: every kept peak is one
        of the mapper's training-line peaks (checked when it was loaded)."""
        out, stats = self.neural_mapper.map(peaks)
        pos = {n: i for i, n in enumerate(map(str, self.neural_mapper.ref_peaks))}
        cols = np.array([pos.get(str(n), -1) for n in self.peak_names], dtype=np.int64)
        have = cols >= 0
        mapped = sp.csr_matrix(out)[:, np.where(have, cols, 0)].tocsr()
        if not have.all():  # kept peaks the mapper does not predict (rare: its own peak filter): by coordinates
            coord, _ = map_dataset(peaks, parse_peak_names(self.peak_names, "training line peaks", "features"),
                                   method="overlap_50pct", impute="zero", max_distance=self.cfg.peak_max_distance)
            keep = sp.diags(have.astype(np.float32))
            mapped = (mapped @ keep + coord.X @ sp.diags((~have).astype(np.float32))).tocsr()
        self.mapping_stats = {**stats, "n_ref_kept": len(self.peak_names),
                              "n_ref_kept_by_coordinates": int((~have).sum())}
        return mapped

    @classmethod
    def from_state(cls, cfg: DataConfig, state: dict) -> "PeakPreprocessor":
        """Rebuild a fitted preprocessor from `state()` (arrays as numpy or tensors)."""
        st = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}
        pre = cls(cfg, peak_names=np.asarray(st["peak_names"], dtype=object), idf=st["idf"], col_mean=st["col_mean"],
                  n_peaks_before=int(st.get("n_peaks_before", 0)),
                  channel=peak_repr_class(cfg.peak_repr).from_state(cfg, st))
        if cfg.bin_size > 0:
            pre.bin_keys = np.asarray(st["bin_keys"]).astype(str)
            pre.bin_components = st.get("bin_components")
        if "neural_mapper" in state:  # the checkpoint carries the mapper: predict needs nothing more
            from .data.neural_mapper import NeuralPeakMapper

            pre.neural_mapper = NeuralPeakMapper.from_state(state["neural_mapper"], where="checkpoint")
        return pre

    def state(self) -> dict:
        """Everything needed to featurise new cells (numpy arrays; checkpoints convert them)."""
        out = {"peak_names": list(map(str, self.peak_names)), "idf": self.idf, "col_mean": self.col_mean,
               "n_peaks_before": self.n_peaks_before, **self.channel.state()}
        if self.bin_keys is not None:
            out["bin_keys"] = list(map(str, self.bin_keys))
            if self.bin_components is not None:
                out["bin_components"] = self.bin_components
        if self.neural_mapper is not None:
            out["neural_mapper"] = self.neural_mapper.state()
        return out


# A neural mapper serves a training line when it predicts all but this fraction of its kept peaks
# (those it lacks, left out by the mapper's own peak filter, are mapped by coordinates).
MAPPER_MISSING_MAX = 0.1


def _load_neural_mapper(path: str, kept_peaks: np.ndarray):
    """The mapper of `xfer map-peaks`, checked against the training line: it must predict every
    kept peak (it was trained with this line as its source)."""
    from .data.neural_mapper import load_mapper

    mapper = load_mapper(path)
    have = set(map(str, mapper.ref_peaks))
    missing = [str(n) for n in kept_peaks if str(n) not in have]
    if len(missing) > MAPPER_MISSING_MAX * len(kept_peaks):
        raise InputError(path, "ref_peaks", f"was trained for other peak sets: {len(missing)} of the training line's "
                         f"{len(kept_peaks)} kept peaks are not among its {len(have)} source peaks (e.g. "
                         f"'{missing[0]}'); train it with this line as --source_peaks (`xfer map-peaks`)")
    if missing:
        log.info("neural peak mapper: %d of %d kept peaks are not among its source peaks (its own filter); they "
                 "are mapped by coordinates", len(missing), len(kept_peaks))
    return mapper


def _examples(chroms, n: int = 3) -> str:
    return ", ".join(map(str, np.unique(np.asarray(chroms).astype(str))[:n]))


# ----------------------------------------------------------------------------- model inputs

@dataclass(frozen=True)
class LineInputs:
    """One cell line's model inputs (rows follow `barcodes`)."""

    name: str
    barcodes: np.ndarray
    emb: np.ndarray | None = None          # (n, E) expression embedding
    peaks: object = None                   # (n, P) encoder input (CSR or dense), see PeakPreprocessor.features
    labels: np.ndarray | None = None       # int8 codes; for a test line only the evaluation reads them

    def stats(self) -> dict:
        """Per-feature mean/std of this line's inputs (label-free) for LineNorm."""
        out = {}
        if self.emb is not None:
            out["emb"] = mean_std(self.emb)
        if self.peaks is not None:
            out["peaks"] = mean_std(self.peaks)
        return out

    def stats_tensors(self, device) -> dict:
        """`stats()` as tensors on `device` (what the model's LineNorm takes for another line)."""
        import torch

        return {k: tuple(torch.as_tensor(a, device=device) for a in v) for k, v in self.stats().items()}


@dataclass(frozen=True)
class TrainData:
    """What `fit` sees: the training line (its two paired modalities + labels, split into
    training and validation cells) and, optionally, another line's unlabelled peaks to
    adapt to (`with_adaptation` drops that line's labels)."""

    line: LineInputs
    train_idx: np.ndarray
    val_idx: np.ndarray
    class_prior: np.ndarray
    line_stats: dict                       # LineNorm statistics from the training cells
    preprocess: dict                       # state for checkpoints (peaks, embedder)
    adapt: LineInputs | None = None        # another line's unlabelled peaks (+ expression) to adapt to (no labels)

    def with_adaptation(self, line: LineInputs | None) -> "TrainData":
        """Add a line's peaks (and its expression embedding, when given: the `agreement` selection
        candidate reads it) as an unlabelled adaptation domain; its labels are dropped here."""
        if line is None or line.peaks is None:
            return self
        return dataclasses.replace(self, adapt=LineInputs(name=line.name, barcodes=line.barcodes, peaks=line.peaks,
                                                          emb=line.emb))

    @property
    def emb_dim(self) -> int:
        return int(self.line.emb.shape[1])

    @property
    def n_peaks(self) -> int:
        return int(self.line.peaks.shape[1])


def check_training_labels(src: CellMatrix, val_fraction: float) -> None:
    """Every phase in the training line's labels, with enough cells that the stratified validation
    split holds each (>= max(2, ceil(1 / val_fraction)) per phase); an InputError naming the
    counts otherwise. Runs before anything is embedded, trained or written."""
    if src.labels is None or (src.labels == UNLABELLED).all():
        raise InputError(src.source, "phase", "the training line needs phase labels (--src_label_csv or a phase column)")
    counts = np.bincount(src.labels[src.labels != UNLABELLED], minlength=N_PHASES)
    need = max(2, math.ceil(1 / val_fraction - 1e-9))
    if (counts < need).any():
        got = ", ".join(f"{ph} {n}" for ph, n in zip(PHASES, counts.tolist()))
        raise InputError(src.source, "phase", f"the training labels need every phase with at least {need} cells (the "
                         f"validation split takes {val_fraction:.0%} of each); they hold {got}")


def prepare_training(src: CellMatrix, tgt: CellMatrix, src_emb: np.ndarray, cfg: DataConfig, seed: int,
                     embedder_state: dict | None = None,
                     other_peaks: CellMatrix | None = None) -> tuple[TrainData, PeakPreprocessor]:
    """Split, filter and transform the training line. `src` and `tgt` must be paired
    (same barcodes in the same order, see data.inputs.pair_cells). `other_peaks`: the test
    line's peaks (unlabelled), for a transductive input basis (peak_repr='joint_lsi')."""
    check_training_labels(src, cfg.val_fraction)
    if list(src.barcodes) != list(tgt.barcodes):
        raise InputError(tgt.source, "barcode", "GEX and PEAK of the training line are not paired cell by cell")
    train_idx, val_idx = make_split(src.barcodes, src.labels, cfg.val_fraction, seed)
    pre = PeakPreprocessor(cfg).fit(tgt, train_idx, other=other_peaks)
    peaks = pre.features(pre.training_counts(tgt), tgt)
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
                 peaks: CellMatrix | None = None, peak_counts: sp.csr_matrix | None = None) -> LineInputs:
    """Another line's inputs on the training line's feature spaces. `peak_counts`:
    its counts already mapped onto the kept peaks with `pre.map_counts` (mapped here
    when not given). Labels are attached only so that the final evaluation can
    score; nothing in training reads them."""
    ref = gex if gex is not None else peaks
    X = None
    if peaks is not None:
        if peak_counts is None:
            peak_counts = pre.map_counts(peaks)
        X = pre.features(peak_counts, peaks)
    return LineInputs(name=name, barcodes=ref.barcodes, emb=None if emb is None else np.asarray(emb, np.float32),
                      peaks=X, labels=ref.labels)
