"""The neural peak mapper: a small network that puts one cell line's peaks on another's.

Two lines call their peaks independently. The coordinate mapper (`xfer.data.mapper`) gives a
reference (source, training-line) peak the counts of the query (target, test-line) peaks that
overlap it; a reference peak without a partner is "unmapped" and gets zeros or the source
line's mean. The neural mapper learns, without labels, what a cell shows on the reference
peaks from what it shows on the target line's peaks, and fills those gaps with calls.

Peak sets (`_plan`)
-------------------
- reference peaks (`ref_peaks`, the output space): the source line's peaks non-zero in
  >= `min_fraction` (default 0.05) of its cells (the idea of `peak_frequency_mask`);
- input peaks: the target line's peaks non-zero in >= `min_fraction` of its cells; for the
  `source_adapter` design only those with a source partner (the others would be constant zero
  in its training data);
- coordinate pairs: every target peak (filtered or not) that `map_peaks(method="overlap_50pct")`
  pairs with a reference peak; `query_peaks` is the union of these and the input peaks, the
  target peaks the mapper reads. A reference peak with no pair is unmapped.
Chromosome names that differ only by a "chr" prefix are matched (as `PeakPreprocessor` does).

Network
-------
target-peak presence (binarised) -> mean of one learned 256-D vector per present input peak
(the original's 25,027 -> 256; 44,923 -> 256 on the simulated research-sized pair; the data
stay sparse until each minibatch is densified) -> LayerNorm ->
ReLU -> dropout -> one logit per reference peak, plus a per-peak slope on the cell's log
depth (log1p of its present input peaks, centred on the source training cells), because
how many peaks a cell shows open grows with its depth and LayerNorm removes the scale.
Loss: binary cross-entropy against binarised reference-peak values.

Designs (`design=`)
-------------------
- "source_adapter": trained on the source line's own cells, whose every reference peak is
  known. Each cell is viewed through the target's peak set (`map_peaks(ref=target peaks,
  query=source peaks)`: its counts on the target peaks) and the network predicts its
  reference peaks.
- "joint": the same, and in every step also a batch of the target line's own cells: input
  their real target peaks, loss only on the reference peaks the coordinate pairs fill for
  them (their values known), so the target's own peak structure shapes the shared layers.
- "shared": each line has its own encoder into one shared 256-D space (the decoder reads that
  space); the source encoder reads a source cell's own reference peaks (with the input noise
  below), the target encoder the target's peaks. Every step: the source cells decoded from
  both encoders (the target encoder reading them through the target's peak set, as the
  source adapter); aligned on the overlapping peaks, the squared distance between the two
  encodings of the same source cell (PAIR_WEIGHT) and the target cells' loss on their known
  reference peaks (as joint); and aligned by a divergence between the lines, the MMD between
  the target cells' and the source cells' batches in the shared space (MMD_WEIGHT,
  `xfer.losses.mmd`). Mapping reads the target encoder and the decoder only, so the file is
  the same as the other designs'; the source encoder is not kept.
Augmentation (every design, training only), simulated peak-calling and depth differences:
  * depth: each cell is thinned as a whole, input and output alike (an entry of count n
    survives with probability 1 - (1 - k)^n, k ~ U(DEPTH_KEEP) per cell), so the network
    predicts a cell's peaks at that cell's own depth, not at the source line's;
  * shifted boundaries: input entries thinned again with k = ENTRY_KEEP (a peak whose
    boundary moved loses part of its fragments);
  * dropped peaks: PEAK_DROP of the input peaks zeroed per batch (a peak one line did not
    call); split peaks need no simulation: a source peak under two target halves already
    feeds both.

Calls (the output is count-like, as the coordinate mapper's)
-----------------------------------------------------------
The network gives probabilities; the rest of the pipeline binarises peaks (x > 0) or takes
log1p, so the mapper writes 1.0 where it calls a peak accessible and nothing elsewhere.
Rule: peak j is called in a cell when p_j >= t_j, with t_j calibrated on held-out source
cells (the validation split) so that the share of those cells called equals peak j's rate
in the source training cells (rate matching; t_j = 2, never, for a peak never open there).
A target cell of lower depth gets lower p (the depth slope) and so fewer calls.

`fill=` (fixed when fitting): "unmapped" keeps the coordinate pairs' summed counts where a
reference peak has a partner and puts the network's calls on the unmapped reference peaks
only (the file then holds only those output rows); "all" puts the network's calls on every
reference peak (no coordinate counts).

Fit
---
Source cells are split (seeded) 80 / 10 / 10: training; validation (early stopping, patience
PATIENCE, on its reconstruction loss over the peaks the network fills: the unmapped ones under
fill "unmapped" when there are >= MIN_WATCHED of them, else all; and the calibration of t_j);
test (the reported quality, `quality` in the statistics; see `_quality`). The network starts
as the depth-only model (output weights 0, biases at the peaks' logit rates, depth slopes 1),
so that what it learns beyond depth has to lower the held-out loss to be kept. Minibatches of
up to 256 cells (smaller for small lines, so that an epoch has >= MIN_STEPS steps), Adam; a
step's loss covers every peak the network fills and a fresh random sample of the others, up to
OUTPUT_SAMPLE peaks in all (under fill "unmapped" the others only shape the shared layers, so
their own outputs, scored as "neural_all" in `quality`, are undertrained there; fit with fill
"all" to judge predicting every peak).

What it achieves on simulated pairs (`bench/`, the study, has the numbers that matter): the
simulator's peaks are nearly independent given the cell's depth, so on held-out source cells the
filled peaks reach about the depth-only model (per-peak AUROC ~0.62-0.64, F1 above the zero
fill's 0 and the mean fill's, log loss below the mean fill's); on the peaks with a partner the
coordinate counts are observations and the network's calls (fill "all") are far worse.

File (`mapper.pt`, `torch.load(weights_only=True)`): `NeuralPeakMapper.state()`, a dict of
tensors, numbers, strings and lists with "format" = FORMAT, and the fit's statistics. The two
large matrices (input vectors, output weights) are stored as float16; the fit rounds them so
before calibrating, so a loaded mapper computes exactly what the fitted one did.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import ConfigError, InputError
from .dataset import CellMatrix
from .mapper import chrom_prefix_differs, map_peaks, strip_chr
from .peaks import PeakSet, parse_peak_names, peak_frequency_mask

log = logging.getLogger(__name__)

__all__ = ["MAPPER_FILE", "STATS_FILE", "REPORT_FILE", "FORMAT", "DESIGNS", "FILLS", "DEFAULT_DESIGN",
           "NeuralPeakMapper", "fit_mapper", "save_mapper", "load_mapper", "mapper_report", "write_mapper_folder"]

MAPPER_FILE = "mapper.pt"
STATS_FILE = "mapper_stats.json"
REPORT_FILE = "mapper_report.md"
FORMAT = "xfer.neural_mapper/1"
DESIGNS = ("source_adapter", "joint", "shared")
FILLS = ("unmapped", "all")
DEFAULT_DESIGN = "source_adapter"
COORD_METHOD = "overlap_50pct"     # the coordinate pairs (the pipeline's default method)
MIN_SHARED = 0.5                   # a query must hold at least this share of the mapper's query peaks
MAX_EPOCHS = 60                    # epochs=None: at most this many, early stopping decides
PATIENCE = 3                       # epochs without a better validation loss before stopping
BATCH = 256                        # cells per step at most
MIN_STEPS = 8                      # steps per epoch at least (smaller batches for small lines)
LR = 1e-3
MIN_WATCHED = 20                   # early stopping watches the network's output peaks when this many
OUTPUT_SAMPLE = 4096               # reference peaks in one step's loss (all filled ones, others sampled)
HIDDEN_DROPOUT = 0.1
DEPTH_KEEP = (0.4, 1.0)            # per-cell thinning of the whole cell (input and output)
ENTRY_KEEP = 0.8                   # input-only thinning per entry (shifted boundaries)
PEAK_DROP = 0.1                    # input peaks zeroed per batch (peaks one line did not call)
SPLIT = (0.8, 0.1, 0.1)            # source cells: training, validation, test
MIN_CELLS = 20                     # per line
NEVER = 2.0                        # threshold of a peak never called (p <= 1)
PREDICT_BATCH = 1024               # cells per forward pass when mapping
PAIR_WEIGHT = 1.0                  # shared: the same source cell through both encoders, mean squared distance
MMD_WEIGHT = 1.0                   # shared: MMD between the lines' batches in the shared space


# ----------------------------------------------------------------------------- the mapper

@dataclass(eq=False)
class NeuralPeakMapper:
    """A fitted mapper (see the module docstring). Index arrays are into `query_peaks` /
    `ref_peaks`; `weights` are float32 numpy arrays: enc (n_in x dim), enc_bias, norm_w,
    norm_b (dim), dec (n_out x dim), dec_bias, depth (n_out), for the reference peaks
    `out_idx`, whose call thresholds are `thresholds`."""

    ref_peaks: np.ndarray      # output space: the source line's peak names, object array
    query_peaks: np.ndarray    # input space: the target line's peak names it reads
    input_idx: np.ndarray      # query peaks the network reads
    coord_q: np.ndarray        # coordinate pairs: query peak ...
    coord_r: np.ndarray        # ... into reference peak
    out_idx: np.ndarray        # reference peaks the network predicts
    thresholds: np.ndarray     # per out_idx peak: called when p >= threshold
    weights: dict
    depth_centre: float
    design: str = DEFAULT_DESIGN
    fill: str = "unmapped"
    dim: int = 256
    min_fraction: float = 0.05
    method: str = COORD_METHOD
    fit_stats: dict = field(default_factory=dict)
    _keys: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.ref_peaks = np.asarray(self.ref_peaks, dtype=object)
        self.query_peaks = np.asarray(self.query_peaks, dtype=object)
        for k in ("input_idx", "coord_q", "coord_r", "out_idx"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.int64))
        self.thresholds = np.asarray(self.thresholds, dtype=np.float32)
        self.weights = {k: np.asarray(v, dtype=np.float32) for k, v in self.weights.items()}

    @property
    def coord(self) -> sp.csr_matrix:
        """The coordinate pairs as a 0/1 matrix, query peaks x reference peaks."""
        return sp.csr_matrix((np.ones(len(self.coord_q), np.float32), (self.coord_q, self.coord_r)),
                             shape=(len(self.query_peaks), len(self.ref_peaks)))

    def map(self, query: CellMatrix) -> tuple[sp.csr_matrix, dict]:
        """The query line's cells on ref_peaks (CSR float32, cells x len(ref_peaks)): the summed
        counts of the coordinate partners (fill "unmapped") and 1.0 where the network calls a
        predicted peak accessible (see the module docstring), and the statistics. The query's
        peaks are matched to query_peaks by coordinates (spelling and a "chr" prefix aside); one
        holding fewer than MIN_SHARED of them is an InputError (query.source, 'features')."""
        where = query.source or query.name or "<query>"
        if query.modality != "peak":
            raise InputError(where, "modality", f"the neural peak mapper reads peaks, got {query.modality!r}")
        cols = self._match(query, where)
        found = cols >= 0
        pick = sp.csr_matrix((np.ones(found.sum(), np.float32), (cols[found], np.flatnonzero(found))),
                             shape=(query.n_features, len(self.query_peaks)))
        Xq = (sp.csr_matrix(query.X, dtype=np.float32) @ pick).tocsr()   # the query on query_peaks
        calls = self._calls(Xq)
        if self.fill == "all":
            Y = calls
        else:
            Y = (Xq @ self.coord).tocsr() + calls    # the network's peaks have no partner: zero there
        Y = sp.csr_matrix(Y, dtype=np.float32)
        Y.sum_duplicates()
        Y.sort_indices()
        return Y, self._map_stats(query, found, calls)

    def _match(self, query: CellMatrix, where: str) -> np.ndarray:
        """For each query peak of the mapper, its column in `query` (-1: absent)."""
        if self._keys is None:
            self._keys = {k: i for i, k in enumerate(_peak_keys(parse_peak_names(self.query_peaks, "mapper")))}
        theirs = _peak_keys(parse_peak_names(query.features, where, "features"))
        cols = np.full(len(self.query_peaks), -1, dtype=np.int64)
        for j, k in enumerate(theirs):
            i = self._keys.get(k)
            if i is not None:
                cols[i] = j
        n_found = int((cols >= 0).sum())
        if n_found < MIN_SHARED * len(self.query_peaks):
            raise InputError(where, "features", f"holds only {n_found} of the {len(self.query_peaks)} peaks the "
                             f"neural peak mapper reads ({n_found / max(len(self.query_peaks), 1):.0%}; at least "
                             f"{MIN_SHARED:.0%} needed): the mapper was trained for other peak sets (run "
                             f"`xfer map-peaks` with this line as --target_peaks)")
        return cols

    def _calls(self, Xq: sp.csr_matrix) -> sp.csr_matrix:
        """1.0 where p >= threshold, on the reference peaks (cells x n_ref)."""
        import torch

        if not len(self.out_idx):  # every reference peak has a coordinate partner: nothing to fill
            return sp.csr_matrix((Xq.shape[0], len(self.ref_peaks)), dtype=np.float32)
        net = _Net().from_weights(self.weights)
        X_in = _binary(Xq[:, self.input_idx])
        rows, cols = [], []
        with torch.no_grad():
            for lo in range(0, X_in.shape[0], PREDICT_BATCH):
                p = _probabilities(net, X_in[lo:lo + PREDICT_BATCH], self.depth_centre)
                r, c = np.nonzero(p >= self.thresholds[None, :])
                rows.append(r + lo)
                cols.append(self.out_idx[c])
        r = np.concatenate(rows) if rows else np.empty(0, np.int64)
        c = np.concatenate(cols) if cols else np.empty(0, np.int64)
        return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(Xq.shape[0], len(self.ref_peaks)))

    def _map_stats(self, query: CellMatrix, found: np.ndarray, calls: sp.csr_matrix) -> dict:
        n_ref, n_q = len(self.ref_peaks), len(self.query_peaks)
        by_network = np.zeros(n_ref, bool)
        by_network[self.out_idx] = True
        present = found[self.coord_q]
        by_coord = np.zeros(n_ref, bool)
        if self.fill == "unmapped":
            by_coord[self.coord_r[present]] = True
        by_coord &= ~by_network
        n_mapped = int((by_coord | by_network).sum())
        n_cells = max(query.n_cells, 1)
        return {
            "method": "neural", "design": self.design, "fill": self.fill, "coordinate_method": self.method,
            "n_ref": n_ref, "n_ref_mapped": n_mapped, "fraction_ref_mapped": n_mapped / max(n_ref, 1),
            "n_ref_by_coordinates": int(by_coord.sum()), "n_ref_by_network": int(by_network.sum()),
            "n_query": int(query.n_features), "n_query_used": int(found.sum()),
            "fraction_query_used": int(found.sum()) / max(query.n_features, 1),
            "n_mapper_query_peaks": n_q, "fraction_mapper_query_peaks_found": int(found.sum()) / max(n_q, 1),
            "network_calls_per_cell": calls.nnz / n_cells,
            "network_call_rate": calls.nnz / (n_cells * max(len(self.out_idx), 1)),
        }

    # --- the file

    def state(self) -> dict:
        """A weights_only-safe dict (tensors, numbers, strings, lists) with "format" = FORMAT."""
        import torch

        return {
            "format": FORMAT, "design": self.design, "fill": self.fill, "dim": int(self.dim),
            "min_fraction": float(self.min_fraction), "method": self.method,
            "depth_centre": float(self.depth_centre),
            "ref_peaks": [str(x) for x in self.ref_peaks], "query_peaks": [str(x) for x in self.query_peaks],
            **{k: torch.from_numpy(getattr(self, k).copy()) for k in _INDEX_KEYS},
            "thresholds": torch.from_numpy(self.thresholds.copy()),
            "weights": {k: torch.from_numpy(v.astype(np.float16 if k in _HALF_KEYS else np.float32))
                        for k, v in self.weights.items()},
            "fit_stats": _plain(self.fit_stats),
        }

    @classmethod
    def from_state(cls, state: dict, where: str = "mapper") -> "NeuralPeakMapper":
        """Rebuild from `state()`; anything else (another format, missing or inconsistent
        entries) is an InputError naming `where`."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InputError(where, "format", f"is not a neural peak mapper of format {FORMAT} (got {got!r}); "
                             "train one with `xfer map-peaks`")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise InputError(where, missing[0], "missing from the neural peak mapper")
        try:
            arrays = {k: _numpy(state[k]) for k in (*_INDEX_KEYS, "thresholds")}
            weights = {k: _numpy(state["weights"][k]) for k in _WEIGHT_KEYS}
            mapper = cls(ref_peaks=np.asarray(state["ref_peaks"], dtype=object),
                         query_peaks=np.asarray(state["query_peaks"], dtype=object), weights=weights,
                         depth_centre=float(state["depth_centre"]), design=str(state["design"]),
                         fill=str(state["fill"]), dim=int(state["dim"]), min_fraction=float(state["min_fraction"]),
                         method=str(state["method"]), fit_stats=dict(state.get("fit_stats") or {}), **arrays)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(where, "weights", f"malformed neural peak mapper ({type(e).__name__}: {e})") from None
        problem = mapper._inconsistency()
        if problem:
            raise InputError(where, problem[0], f"inconsistent neural peak mapper: {problem[1]}")
        return mapper

    def _inconsistency(self) -> tuple[str, str] | None:
        """(field, what) of the first inconsistency between the arrays, or None."""
        w, n_in, n_out = self.weights, len(self.input_idx), len(self.out_idx)
        n_q, n_r = len(self.query_peaks), len(self.ref_peaks)
        checks = [
            ("design", self.design in DESIGNS, f"unknown design {self.design!r}"),
            ("fill", self.fill in FILLS, f"unknown fill {self.fill!r}"),
            ("input_idx", n_in == 0 or (self.input_idx.min() >= 0 and self.input_idx.max() < n_q), "out of range"),
            ("out_idx", n_out == 0 or (self.out_idx.min() >= 0 and self.out_idx.max() < n_r), "out of range"),
            ("coord_q", len(self.coord_q) == len(self.coord_r) and (len(self.coord_q) == 0 or (
                self.coord_q.min() >= 0 and self.coord_q.max() < n_q and self.coord_r.min() >= 0
                and self.coord_r.max() < n_r)), "coordinate pairs out of range"),
            ("thresholds", len(self.thresholds) == n_out, f"{len(self.thresholds)} thresholds for {n_out} peaks"),
            ("weights", w["enc"].shape == (n_in, self.dim) and w["dec"].shape == (n_out, self.dim)
             and w["dec_bias"].shape == (n_out,) and w["depth"].shape == (n_out,)
             and all(w[k].shape == (self.dim,) for k in ("enc_bias", "norm_w", "norm_b")),
             f"weight shapes do not fit {n_in} inputs, {n_out} outputs, dim {self.dim}"),
        ]
        return next(((k, msg) for k, ok, msg in checks if not ok), None)


_INDEX_KEYS = ("input_idx", "coord_q", "coord_r", "out_idx")
_WEIGHT_KEYS = ("enc", "enc_bias", "norm_w", "norm_b", "dec", "dec_bias", "depth")
_HALF_KEYS = ("enc", "dec")   # stored as float16 (the fit rounds them so: `round_weights`)
_STATE_KEYS = ("design", "fill", "dim", "min_fraction", "method", "depth_centre", "ref_peaks", "query_peaks",
               *_INDEX_KEYS, "thresholds", "weights")


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _plain(obj):
    """JSON-ready and weights_only-safe: numpy numbers and arrays become Python numbers and lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _peak_keys(peaks: PeakSet) -> list[str]:
    """One key per peak, its coordinates without a "chr" prefix, whatever the spelling."""
    chroms = strip_chr(peaks.chrom)
    return [f"{c}:{s}-{e}" for c, s, e in zip(chroms, peaks.start.tolist(), peaks.end.tolist())]


# ----------------------------------------------------------------------------- the network

def _net_class():
    import torch
    from torch import nn

    class Net(nn.Module):
        """Presence / count -> mean of per-peak vectors -> LayerNorm -> ReLU -> logits + depth slope."""

        def __init__(self, n_in: int, dim: int, n_out: int):
            super().__init__()
            self.enc = nn.Parameter(torch.randn(n_in, dim) / math.sqrt(dim))   # one vector per input peak
            self.enc_bias = nn.Parameter(torch.zeros(dim))
            self.norm = nn.LayerNorm(dim)
            self.drop = nn.Dropout(HIDDEN_DROPOUT)
            self.dec = nn.Linear(dim, n_out)
            self.depth = nn.Parameter(torch.ones(n_out))

        def forward(self, x, z, rows=None):
            """Logits of every output, or of the outputs `rows` (a LongTensor) only; x: presence
            divided by the cell's count of present peaks (dense), z: centred log depth."""
            return self.head(self.hidden(x), z, rows)

        def hidden(self, x, enc=None, enc_bias=None):
            """The shared space: x through this network's input vectors (or `enc`, `enc_bias`:
            another line's encoder, the `shared` design), LayerNorm, ReLU, dropout."""
            enc, enc_bias = (self.enc, self.enc_bias) if enc is None else (enc, enc_bias)
            return self.drop(torch.relu(self.norm(x @ enc + enc_bias)))

        def head(self, h, z, rows=None):
            """Logits from the shared space (`forward`)."""
            if rows is None:
                return self.dec(h) + self.depth * z[:, None]
            return h @ self.dec.weight[rows].T + self.dec.bias[rows] + self.depth[rows] * z[:, None]

        def round_weights(self) -> None:
            """Round the two large matrices to float16 precision: what the file stores, so that
            a loaded mapper computes what this one does."""
            with torch.no_grad():
                for t in (self.enc, self.dec.weight):
                    t.copy_(t.half().float())

        def weights(self, rows=None) -> dict:
            """float32 numpy weights; `rows`: the output rows kept."""
            rows = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)
            get = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
            return {"enc": get(self.enc), "enc_bias": get(self.enc_bias), "norm_w": get(self.norm.weight),
                    "norm_b": get(self.norm.bias), "dec": get(self.dec.weight[rows]),
                    "dec_bias": get(self.dec.bias[rows]), "depth": get(self.depth[rows])}

        @classmethod
        def from_weights(cls, w: dict) -> "Net":
            net = cls(w["enc"].shape[0], w["enc"].shape[1], w["dec"].shape[0])
            with torch.no_grad():
                net.enc.copy_(torch.from_numpy(w["enc"]))
                for name, t in (("enc_bias", net.enc_bias), ("norm_w", net.norm.weight), ("norm_b", net.norm.bias),
                                ("dec", net.dec.weight), ("dec_bias", net.dec.bias), ("depth", net.depth)):
                    t.copy_(torch.from_numpy(w[name]))
            return net.eval()

    return Net


_NET = []


def _Net(*args):
    """The network class (built on first use: torch is imported only when a mapper runs), or,
    with arguments, a new network."""
    if not _NET:
        _NET.append(_net_class())
    return _NET[0](*args) if args else _NET[0]


def _binary(X: sp.csr_matrix) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    return sp.csr_matrix((np.ones(X.nnz, np.float32), X.indices, X.indptr), shape=X.shape)


def _inputs(X: sp.csr_matrix, depth_centre: float, device=None):
    """A binary CSR batch as the network's inputs: each row divided by its count of present
    peaks, densified (on 2 CPU cores a dense product and its gradient beat torch's sparse
    products and EmbeddingBag by 2-4x at research size), and the centred log depth."""
    import torch

    X = sp.csr_matrix(X, dtype=np.float32)
    counts = np.diff(X.indptr)
    x = torch.from_numpy((sp.diags(1.0 / np.maximum(counts, 1)).astype(np.float32) @ X).toarray())
    z = torch.from_numpy((np.log1p(counts) - depth_centre).astype(np.float32))
    return x.to(device), z.to(device)


def _probabilities(net, X_bin: sp.csr_matrix, depth_centre: float) -> np.ndarray:
    """sigmoid(logits) for binary cells, numpy float32 (cells x outputs), PREDICT_BATCH at a time."""
    import torch

    dev = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for lo in range(0, X_bin.shape[0], PREDICT_BATCH):
            out.append(torch.sigmoid(net(*_inputs(X_bin[lo:lo + PREDICT_BATCH], depth_centre, dev))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.dec.out_features), np.float32)


# ----------------------------------------------------------------------------- the peak sets

@dataclass
class _Plan:
    """The peak sets of a fit (see the module docstring)."""

    design: str
    ref_cols: np.ndarray        # reference peaks: columns of source.X
    query_cols: np.ndarray      # query peaks: columns of target.X
    input_idx: np.ndarray       # into query_cols
    coord: sp.csr_matrix        # len(query_cols) x n_ref, 0/1
    view: sp.csr_matrix         # source peaks x input peaks, 0/1: a source cell on the input peaks
    view_all: sp.csr_matrix     # source peaks x all target peaks (the coordinate round trip)
    coord_all: sp.csr_matrix    # all target peaks x n_ref
    mapped: np.ndarray          # bool per reference peak: has a coordinate partner
    normalise_chrom: bool
    overlap: dict               # the coordinate mapping's statistics


def _subset(ps: PeakSet, cols: np.ndarray) -> PeakSet:
    return PeakSet(names=ps.names[cols], chrom=ps.chrom[cols], start=ps.start[cols], end=ps.end[cols])


def _plan(source: CellMatrix, target: CellMatrix, design: str, min_fraction: float, method: str) -> _Plan:
    s_where, t_where = source.source or source.name, target.source or target.name
    ps = parse_peak_names(source.features, s_where, "features")
    pt = parse_peak_names(target.features, t_where, "features")
    ref_cols = np.flatnonzero(peak_frequency_mask(source.X, min_fraction, key="min_fraction"))
    t_kept = peak_frequency_mask(target.X, min_fraction, key="min_fraction")
    for where, n in ((s_where, len(ref_cols)), (t_where, int(t_kept.sum()))):
        if n == 0:
            raise InputError(where, "features", f"no peak is non-zero in >= {min_fraction:.1%} of the cells; "
                             "lower --min_fraction")
    ref = _subset(ps, ref_cols)
    normalise = chrom_prefix_differs(np.unique(ps.chrom.astype(str)), np.unique(pt.chrom.astype(str)))
    fwd = map_peaks(ref, pt, method=method, normalise_chrom=normalise)     # target peaks -> reference peaks
    if fwd.stats["n_ref_mapped"] == 0:
        raise InputError(t_where, "features", f"shares no peak coordinates with the source line's {len(ref)} "
                         f"peaks ({s_where}; method {method}; chromosomes e.g. "
                         f"{', '.join(map(str, np.unique(pt.chrom.astype(str))[:3]))} here, "
                         f"{', '.join(map(str, np.unique(ref.chrom.astype(str))[:3]))} there)")
    back = map_peaks(pt, ps, method=method, normalise_chrom=normalise)     # source peaks -> target peaks
    inputs = t_kept & (back.mapped if design == "source_adapter" else True)
    if not inputs.any():
        raise InputError(t_where, "features", "none of its frequent peaks has a partner among the source line's "
                         "peaks; the mapper has nothing to read")
    partners = np.diff(fwd.matrix.indptr) > 0
    query_cols = np.flatnonzero(inputs | partners)
    return _Plan(design=design, ref_cols=ref_cols, query_cols=query_cols,
                 input_idx=np.flatnonzero(inputs[query_cols]), coord=fwd.matrix[query_cols].tocsr(),
                 view=back.matrix[:, np.flatnonzero(inputs)].tocsr(), view_all=back.matrix, coord_all=fwd.matrix,
                 mapped=fwd.mapped, normalise_chrom=normalise, overlap=dict(fwd.stats))


# ----------------------------------------------------------------------------- training data

def _thin(X: sp.csr_matrix, keep: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Binary: an entry of count n survives with probability 1 - (1 - keep[row])^n."""
    X = sp.csr_matrix(X, dtype=np.float32)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    alive = rng.random(X.nnz) < 1.0 - (1.0 - keep[rows]) ** np.maximum(X.data, 0.0)
    return sp.csr_matrix((np.ones(alive.sum(), np.float32), (rows[alive], X.indices[alive])), shape=X.shape)


def _input_noise(X_in: sp.csr_matrix, rng: np.random.Generator) -> sp.csr_matrix:
    """Simulated peak calling on the input: entries thinned (shifted boundaries), peaks dropped."""
    X = _thin(X_in, np.full(X_in.shape[0], ENTRY_KEEP), rng)
    keep = (rng.random(X.shape[1]) >= PEAK_DROP).astype(np.float32)
    return _binary(X @ sp.diags(keep))


@dataclass
class _Data:
    """What a fit trains and checks on (CSR matrices; outputs are binary, cells x n_ref)."""

    src: sp.csr_matrix          # source cells, all their peaks (counts)
    split: tuple                # (train, val, test) row indices of src
    view: sp.csr_matrix         # source peaks -> input peaks
    ref_cols: np.ndarray
    tgt_q: sp.csr_matrix | None     # joint: target cells on query peaks (counts), for their known outputs
    coord: sp.csr_matrix
    mapped: np.ndarray

    def source_batch(self, rows, rng, augment: bool, out=None, own: bool = False):
        """Source cells: their input (binary CSR) and their reference peaks (all, or `out`: dense
        binary); `own` (the shared design, augmented): also their own reference peaks with the
        input noise, the source encoder's input."""
        X = self.src[rows]
        X = _thin(X, rng.uniform(*DEPTH_KEEP, len(rows)), rng) if augment else _binary(X)
        X_in = (X @ self.view).tocsr()
        X_in = _input_noise(X_in, rng) if augment else _binary(X_in)
        y = _binary(X[:, self.ref_cols if out is None else self.ref_cols[out]]).toarray()
        if own:
            return X_in, y, _input_noise(X[:, self.ref_cols].tocsr(), rng)
        return X_in, y

    def rates(self, rows) -> np.ndarray:
        """Per reference peak, the share of these source cells where it is non-zero."""
        X = self.src[rows][:, self.ref_cols]
        return np.bincount(X.indices[X.data != 0], minlength=len(self.ref_cols)) / max(len(rows), 1)

    def target_batch(self, rows, rng, input_idx, out):
        """Target cells: their input and their reference peaks `out` (those with a partner), dense binary."""
        X = _thin(self.tgt_q[rows], rng.uniform(*DEPTH_KEEP, len(rows)), rng)
        y = _binary((X @ self.coord[:, out]).tocsr()).toarray()
        return _input_noise(X[:, input_idx], rng), y


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = max(2, int(round(SPLIT[1] * n)))
    n_test = max(2, int(round(SPLIT[2] * n)))
    return np.sort(order[n_val + n_test:]), np.sort(order[:n_val]), np.sort(order[n_val:n_val + n_test])


# ----------------------------------------------------------------------------- fitting

def _check_args(design, fill, dim, epochs) -> None:
    if design not in DESIGNS:
        raise ConfigError("design", f"unknown design {design!r}; expected one of {', '.join(DESIGNS)}")
    if fill not in FILLS:
        raise ConfigError("fill", f"unknown fill {fill!r}; expected one of {', '.join(FILLS)}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError("dim", f"must be an integer >= 1, got {dim!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1):
        raise ConfigError("epochs", f"must be an integer >= 1 (or None: early stopping decides), got {epochs!r}")


def fit_mapper(source: CellMatrix, target: CellMatrix, *, design: str = DEFAULT_DESIGN, dim: int = 256,
               epochs: int | None = None, seed: int = 0, device="auto", fill: str = "unmapped",
               min_fraction: float = 0.05, method: str = COORD_METHOD) -> tuple[NeuralPeakMapper, dict]:
    """Fit a mapper from the target line's peaks onto the source line's (no labels are read).

    design  "source_adapter" | "joint" | "shared" (module docstring); fill "unmapped" | "all"
    dim     the hidden width; epochs: at most this many (None: MAX_EPOCHS), early stopping on
            held-out source cells either way; min_fraction: the peak filter of both lines;
    method  the coordinate pairs' method (xfer.data.mapper.METHODS)
    Returns the mapper and the fit's statistics (JSON-ready): sizes, overlap, the training
    history, held-out quality (`quality`, see `_quality`), seconds."""
    import torch

    from ..device import resolve_device

    _check_args(design, fill, dim, epochs)
    for ds, role in ((source, "source"), (target, "target")):
        where = ds.source or ds.name or role
        if ds.modality != "peak":
            raise InputError(where, "modality", f"the {role} line must be accessibility peaks, got {ds.modality!r}")
        if ds.n_cells < MIN_CELLS:
            raise InputError(where, "cells", f"{ds.n_cells} cells; the neural peak mapper needs >= {MIN_CELLS}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    plan = _plan(source, target, design, min_fraction, method)
    rng = np.random.default_rng(seed)
    X_t = sp.csr_matrix(target.X, dtype=np.float32)
    data = _Data(src=sp.csr_matrix(source.X, dtype=np.float32), split=_split(source.n_cells, rng), view=plan.view,
                 ref_cols=plan.ref_cols, tgt_q=X_t[:, plan.query_cols].tocsr() if design != "source_adapter"
                 else None, coord=plan.coord, mapped=plan.mapped)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        net, centre, history = _train(data, plan, dim, epochs, rng, dev,
                                      ~plan.mapped if fill == "unmapped" else np.ones(len(plan.ref_cols), bool))
    net = net.cpu().eval()
    net.round_weights()
    thresholds_all = _calibrate(net, data, centre)
    quality = _quality(net, data, plan, centre, thresholds_all)
    out_idx = np.flatnonzero(~plan.mapped) if fill == "unmapped" else np.arange(len(plan.ref_cols))
    mapper = NeuralPeakMapper(
        ref_peaks=source.features[plan.ref_cols], query_peaks=target.features[plan.query_cols],
        input_idx=plan.input_idx, coord_q=plan.coord.tocoo().row, coord_r=plan.coord.tocoo().col,
        out_idx=out_idx, thresholds=thresholds_all[out_idx], weights=net.weights(out_idx), depth_centre=centre,
        design=design, fill=fill, dim=int(dim), min_fraction=float(min_fraction), method=method)
    stats = _fit_stats(source, target, plan, data, mapper, history, quality, time.perf_counter() - t0, dev, seed)
    mapper.fit_stats = stats
    log.info("neural peak mapper (%s, fill %s): %d of %d source peaks without a coordinate partner, %d epochs "
             "(best %d), %.1f s", design, fill, stats["n_ref_unmapped"], len(plan.ref_cols), stats["epochs_run"],
             stats["best_epoch"], stats["fit_seconds"])
    return mapper, stats


def _batch_size(n_train: int) -> int:
    return int(max(8, min(BATCH, n_train // MIN_STEPS)))


def _init_net(data: _Data, plan: _Plan, dim: int, dev):
    """The network and the depth centre (the mean log1p of the training cells' present input
    peaks). It starts as the depth-only model: output biases at the training cells' peak rates
    (logits), depth slopes 1, output weights 0."""
    import torch

    train = data.split[0]
    X_in = _binary((data.src[train] @ data.view).tocsr())
    centre = float(np.log1p(np.diff(X_in.indptr)).mean())
    rate = data.rates(train).clip(1e-4, 1 - 1e-4)
    net = _Net(len(plan.input_idx), int(dim), len(plan.ref_cols)).to(dev)
    with torch.no_grad():
        net.dec.bias.copy_(torch.from_numpy(np.log(rate / (1 - rate)).astype(np.float32)))
        net.dec.weight.zero_()
    return net, centre


def _outputs(filled: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference peaks one step's loss covers: every one the network fills and, of the
    others, a random sample up to OUTPUT_SAMPLE in all (they train the shared layers; scoring
    all 50,000 research-sized peaks in every step would cost ten times the time)."""
    w, others = np.flatnonzero(filled), np.flatnonzero(~filled)
    k = max(0, OUTPUT_SAMPLE - len(w))
    if len(others) > k:
        others = rng.choice(others, k, replace=False)
    return np.sort(np.concatenate([w, others]))


def _epoch(net, opt, data: _Data, plan: _Plan, centre: float, rng: np.random.Generator, dev,
           filled: np.ndarray, src_enc=None) -> float:
    """One pass over the training cells (augmented); joint and shared: each step also a batch of
    target cells, loss on the reference peaks their coordinate partners fill; shared (`src_enc`,
    the source line's encoder): the source cells also through their own encoder, the pair and
    MMD terms (the module docstring). The mean step loss."""
    import torch

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    train = rng.permutation(data.split[0])
    bs = _batch_size(len(train))
    n_tgt = 0 if data.tgt_q is None else data.tgt_q.shape[0]
    net.train()
    losses = []
    for lo in range(0, len(train), bs):
        out = _outputs(filled, rng)
        out_t = torch.from_numpy(out).to(dev)
        loss, h_s = _source_loss(net, src_enc, data, train[lo:lo + bs], out, out_t, centre, rng, dev)
        known = out[data.mapped[out]]
        if n_tgt and (len(known) or h_s is not None):
            Xt, yt = data.target_batch(rng.integers(0, n_tgt, bs), rng, plan.input_idx, known)
            x_t, z_t = _inputs(Xt, centre, dev)
            h_t = net.hidden(x_t)
            if len(known):
                loss = loss + bce(net.head(h_t, z_t, torch.from_numpy(known).to(dev)), torch.from_numpy(yt).to(dev))
            if h_s is not None:
                from ..losses import mmd

                loss = loss + MMD_WEIGHT * mmd(h_t, h_s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _source_loss(net, src_enc, data: _Data, rows: np.ndarray, out: np.ndarray, out_t, centre: float,
                 rng: np.random.Generator, dev):
    """The source cells' loss on the reference peaks `out`, seen through the target's peaks;
    shared: also through the source encoder, and the pair term. Returns (loss, the source
    encoder's batch in the shared space, or None)."""
    import torch

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if src_enc is None:
        X, y = data.source_batch(rows, rng, augment=True, out=out)
        return bce(net(*_inputs(X, centre, dev), out_t), torch.from_numpy(y).to(dev)), None
    X, y, X_own = data.source_batch(rows, rng, augment=True, out=out, own=True)
    x, z = _inputs(X, centre, dev)
    y = torch.from_numpy(y).to(dev)
    h = net.hidden(x)
    h_s = net.hidden(_inputs(X_own, centre, dev)[0], src_enc["enc"], src_enc["bias"])
    loss = bce(net.head(h, z, out_t), y) + bce(net.head(h_s, z, out_t), y)
    return loss + PAIR_WEIGHT * (h - h_s).pow(2).mean(), h_s


def _loss(net, X: sp.csr_matrix, y: np.ndarray, rows: np.ndarray, centre: float) -> float:
    """Mean binary cross-entropy of the outputs `rows` on binary cells X (no dropout)."""
    import torch

    dev = next(net.parameters()).device
    rows_t, total = torch.from_numpy(rows).to(dev), 0.0
    with torch.no_grad():
        for lo in range(0, X.shape[0], PREDICT_BATCH):
            logits = net(*_inputs(X[lo:lo + PREDICT_BATCH], centre, dev), rows_t)
            target = torch.from_numpy(y[lo:lo + PREDICT_BATCH]).to(dev)
            total += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum"))
    return total / max(y.size, 1)


def _train(data: _Data, plan: _Plan, dim: int, epochs: int | None, rng: np.random.Generator, dev,
           filled: np.ndarray):
    """Adam with early stopping on the validation cells' loss (no augmentation) over the
    `filled` reference peaks, the network's outputs (all peaks when fewer than MIN_WATCHED);
    returns the best epoch's network, the depth centre and the history."""
    import torch

    net, centre = _init_net(data, plan, dim, dev)
    params = list(net.parameters())
    src_enc = None
    if plan.design == "shared":   # the source line's own encoder, training only (mapping reads the target's)
        src_enc = torch.nn.ParameterDict({
            "enc": torch.nn.Parameter(torch.randn(len(plan.ref_cols), int(dim)) / math.sqrt(dim)),
            "bias": torch.nn.Parameter(torch.zeros(int(dim)))}).to(dev)
        params += list(src_enc.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    watch = np.flatnonzero(filled) if filled.sum() >= MIN_WATCHED else np.arange(len(filled))
    X_val, y_val = data.source_batch(data.split[1], rng, augment=False, out=watch)
    best, best_state, history, wait = math.inf, None, [], 0
    for epoch in range(1, (epochs or MAX_EPOCHS) + 1):
        t_ep = time.perf_counter()
        train_loss = _epoch(net, opt, data, plan, centre, rng, dev, filled, src_enc)
        net.eval()
        v = _loss(net, X_val, y_val, watch, centre)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": v,
                        "seconds": time.perf_counter() - t_ep})
        if v < best - 1e-5:
            best, wait = v, 0
            best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
        else:
            wait += 1
            if wait >= PATIENCE:
                break
    net.load_state_dict(best_state)
    return net, centre, history


# ----------------------------------------------------------------------------- calibration, quality

def _calibrate(net, data: _Data, centre: float) -> np.ndarray:
    """Per reference peak, the threshold t_j at which the validation cells' call rate equals
    the peak's rate in the training cells (NEVER for a peak never open there)."""
    X_val, _ = data.source_batch(data.split[1], None, augment=False)
    p = _probabilities(net, X_val, centre)
    n = p.shape[0]
    k = np.round(data.rates(data.split[0]) * n).astype(np.int64)      # cells to call, per peak
    desc = -np.sort(-p, axis=0)
    t = desc[np.clip(k - 1, 0, n - 1), np.arange(p.shape[1])]
    return np.where(k > 0, t, NEVER).astype(np.float32)


def _binary_scores(pred: np.ndarray, y: np.ndarray) -> dict:
    tp = float(np.logical_and(pred, y).sum())
    n_pred, n_true = float(pred.sum()), float(y.sum())
    precision = tp / n_pred if n_pred else None
    recall = tp / n_true if n_true else None
    f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else None
    return {"precision": precision, "recall": recall, "f1": f1, "rate_called": float(pred.mean()) if pred.size else None}


def _prob_scores(p: np.ndarray, y: np.ndarray) -> dict:
    """Mean log loss over entries, and the mean over peaks (with both classes) of the AUROC."""
    from scipy.stats import rankdata

    if not p.size:
        return {"log_loss": None, "auroc": None}
    q = np.clip(p, 1e-6, 1 - 1e-6)
    log_loss = float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())
    pos = y.sum(axis=0)
    ok = (pos > 0) & (pos < y.shape[0])
    if not ok.any():
        return {"log_loss": log_loss, "auroc": None}
    ranks = rankdata(p[:, ok], axis=0)
    n_pos, n_neg = pos[ok], y.shape[0] - pos[ok]
    auc = ((ranks * y[:, ok]).sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"log_loss": log_loss, "auroc": float(auc.mean())}


def _quality(net, data: _Data, plan: _Plan, centre: float, thresholds: np.ndarray) -> dict:
    """Held-out quality on the test source cells, per group of reference peaks ("unmapped":
    no coordinate partner; "mapped"; "all"), of: "zero" / "mean" (the coordinate mapper's
    counts round-tripped through the target's peaks, unmapped peaks 0 / the training mean,
    which binarised is 1 and as a probability the peak's rate), "neural_fill" (coordinates,
    the network's calls on the unmapped peaks) and "neural_all" (the network's calls on every
    peak). Calls are scored against the binarised truth (precision, recall, F1, rate called);
    probabilities by log loss and per-peak AUROC."""
    test = data.split[2]
    X_in, y = data.source_batch(test, None, augment=False)
    y = y > 0
    p = _probabilities(net, X_in, centre)
    calls = p >= thresholds[None, :]
    src = _binary(data.src[test])
    coords = ((src @ plan.view_all) @ plan.coord_all).toarray() > 0
    rate = np.broadcast_to(data.rates(data.split[0]).astype(np.float32), y.shape)
    un = ~plan.mapped
    fill = {"zero": coords, "mean": coords | un[None, :], "neural_fill": np.where(un[None, :], calls, coords),
            "neural_all": calls}
    groups = {"unmapped": un, "mapped": plan.mapped, "all": np.ones_like(un)}
    out = {"n_test_cells": int(len(test))}
    for g, cols in groups.items():
        res = {"n_peaks": int(cols.sum()), "rate_true": float(y[:, cols].mean()) if cols.any() else None}
        names = {"unmapped": ("zero", "mean", "neural_all"), "mapped": ("zero", "neural_all")}.get(g, tuple(fill))
        for name in names:
            res[name] = _binary_scores(fill[name][:, cols], y[:, cols])
        res["neural_all"].update(_prob_scores(p[:, cols], y[:, cols]))
        if g != "mapped":
            res["mean"].update(_prob_scores(rate[:, cols], y[:, cols]))
        out[g] = res
    out["unmapped"]["neural"] = out["unmapped"].pop("neural_all")
    out["mapped"]["coordinates"] = out["mapped"].pop("zero")
    return out


def _fit_stats(source: CellMatrix, target: CellMatrix, plan: _Plan, data: _Data, mapper: NeuralPeakMapper,
               history: list, quality: dict, seconds: float, dev, seed: int) -> dict:
    best = min(history, key=lambda h: h["val_loss"])
    n_params = sum(int(v.size) for v in mapper.weights.values())
    return _plain({
        "method": "neural", "design": mapper.design, "fill": mapper.fill, "dim": mapper.dim,
        "min_fraction": mapper.min_fraction, "coordinate_method": mapper.method, "seed": int(seed),
        "device": str(dev), "normalise_chrom": plan.normalise_chrom,
        "source": {"name": source.name, "source": source.source, "n_cells": source.n_cells,
                   "n_peaks": source.n_features, "n_ref_peaks": len(plan.ref_cols)},
        "target": {"name": target.name, "source": target.source, "n_cells": target.n_cells,
                   "n_peaks": target.n_features, "n_input_peaks": len(plan.input_idx),
                   "n_query_peaks": len(plan.query_cols)},
        "overlap": plan.overlap,
        "n_ref_unmapped": int((~plan.mapped).sum()), "n_network_outputs": len(mapper.out_idx),
        "n_parameters": n_params,
        "split": {k: len(v) for k, v in zip(("train", "val", "test"), data.split)},
        "batch_size": _batch_size(len(data.split[0])), "epochs_run": len(history), "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"], "history": history, "quality": quality, "fit_seconds": seconds,
    })


# ----------------------------------------------------------------------------- files

def _serialise(mapper: NeuralPeakMapper, stats: dict) -> bytes:
    import torch

    state = mapper.state()
    state["fit_stats"] = _plain(stats)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_mapper(mapper: NeuralPeakMapper, stats: dict, folder) -> Path:
    """Write folder/mapper.pt (the mapper's state with `stats` inside it), atomically."""
    from .fs import write_bytes_atomic

    return write_bytes_atomic(Path(folder) / MAPPER_FILE, _serialise(mapper, stats))


def load_mapper(path) -> NeuralPeakMapper:
    """A mapper from a mapper.pt file or a folder holding one; InputError(path, ...) when the
    file is missing, not a torch file, or not a neural peak mapper."""
    import pickle

    import torch

    p = Path(path)
    if p.is_dir():
        p = p / MAPPER_FILE
    if not p.is_file():
        raise InputError(p, None, "no such neural peak mapper file (train one with `xfer map-peaks`)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise InputError(p, "format", f"is not a readable neural peak mapper ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return NeuralPeakMapper.from_state(state, where=str(p))


def write_mapper_folder(mapper: NeuralPeakMapper, stats: dict, folder) -> dict:
    """Everything computed first (the file's bytes, its size into the statistics, the report),
    then folder/mapper.pt, mapper_stats.json and mapper_report.md, each atomically.
    Returns {file name: path} and adds "file_bytes" to `stats`."""
    from .fs import write_bytes_atomic, write_json

    blob = _serialise(mapper, stats)
    stats["file_bytes"] = len(blob)
    report = mapper_report(stats)
    folder = Path(folder)
    return {MAPPER_FILE: write_bytes_atomic(folder / MAPPER_FILE, blob),
            STATS_FILE: write_json(folder / STATS_FILE, stats),
            REPORT_FILE: write_bytes_atomic(folder / REPORT_FILE, report.encode())}


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def mapper_report(stats: dict) -> str:
    """A short Markdown report of a fit: what, overlap, held-out quality, time and size."""
    s, t, o, q = stats["source"], stats["target"], stats["overlap"], stats["quality"]
    lines = [
        "# Neural peak mapper", "",
        f"- design `{stats['design']}`, fill `{stats['fill']}`, {stats['dim']}-D, seed {stats['seed']}, "
        f"device {stats['device']}",
        f"- source (reference) line {s['name'] or s['source']}: {s['n_cells']} cells, {s['n_peaks']} peaks, "
        f"{s['n_ref_peaks']} non-zero in >= {stats['min_fraction']:.0%} of cells (the output peaks)",
        f"- target line {t['name'] or t['source']}: {t['n_cells']} cells, {t['n_peaks']} peaks, "
        f"{t['n_input_peaks']} read by the network, {t['n_query_peaks']} read in all",
        f"- overlap ({stats['coordinate_method']}): {o['n_ref_mapped']} of {o['n_ref']} output peaks "
        f"({o['fraction_ref_mapped']:.1%}) have a coordinate partner; {stats['n_ref_unmapped']} do not",
        f"- the network predicts {stats['n_network_outputs']} peaks; {stats['n_parameters']:,} parameters; "
        f"file {stats.get('file_bytes', 0) / 2**20:.1f} MiB",
        f"- fit {stats['fit_seconds']:.1f} s: {stats['epochs_run']} epochs (best {stats['best_epoch']}, "
        f"validation loss {stats['best_val_loss']:.4f}), batch {stats['batch_size']}, source cells "
        f"{stats['split']['train']} / {stats['split']['val']} / {stats['split']['test']} (train / val / test)",
        "", f"## Held-out quality ({q['n_test_cells']} test cells of the source line)", "",
        "Each source cell is seen through the target line's peaks, as the target's cells are; the "
        "network calls a peak where its probability reaches the peak's threshold (set on validation cells so "
        "that its call rate matches the peak's training rate). Calls are scored against the cell's own "
        "binarised peaks; probabilities by log loss and per-peak AUROC (the mean fill as a probability is "
        "each peak's rate). `zero` / `mean`: the coordinate mapper with that fill; on peaks with a partner "
        "(`coordinates`) a source cell's counts come back unchanged (the same fragments), so those rows "
        "show how far the network's calls are from observed values.", "",
        "| peaks | n | fill | precision | recall | F1 | rate called (true) | log loss | AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in ("unmapped", "mapped", "all"):
        res = q[g]
        for name, sc in res.items():
            if isinstance(sc, dict):
                lines.append(f"| {g} | {res['n_peaks']} | {name} | {_fmt(sc['precision'])} | {_fmt(sc['recall'])} | "
                             f"{_fmt(sc['f1'])} | {_fmt(sc['rate_called'])} ({_fmt(res['rate_true'])}) | "
                             f"{_fmt(sc.get('log_loss'), '.4f')} | {_fmt(sc.get('auroc'))} |")
    return "\n".join(lines) + "\n"
