"""Writers for the file formats users bring: the original research code's CSV layout, AnnData .h5ad,
10x Cell Ranger ARC .h5.

They exist so the simulator (and tests) can produce real files for the readers
to read.  Every writer is atomic: it writes to a hidden temporary file next to
the target and ``os.replace``-s it into place, so an error never leaves a
half-written target (an existing target stays untouched).

The research code's CSV layout (``write_research_csv``)::

    barcode,<feature1>,<feature2>,...[,phase]
    AAACAGCCAACATAAG-1,0,1,0,...[,G1]

Values of an integral matrix are printed as integers ("2", never "2.0"); other
matrices use the shortest float32 round-trip spelling.  The CSV is formatted
in blocks of rows with vectorised byte arithmetic (no per-value Python), so the
research-sized PEAK matrix (7.4k x 92k, ~1.3 GB of text) is written in well under a
minute; a path ending in ``.gz`` is gzip-compressed (level 1, much slower).
"""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..phases import PHASES
from .dataset import CellMatrix
from .fs import atomic_path

__all__ = ["write_research_csv", "write_labels_csv", "write_h5ad", "write_10x_h5"]

_BLOCK_VALUES = 4_000_000  # values formatted per block when chunk size is automatic
_COMMA = ord(",")
_MAX_INT_TABLE = 1 << 20  # integral matrices spanning more values use the general path

@contextlib.contextmanager
def _open_binary(path: Path, gz: bool) -> Iterator[BinaryIO]:
    with open(path, "wb", buffering=1 << 22) as raw:
        if gz:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as fh:
                yield fh
        else:
            yield raw


# ------------------------------------------------------------- CSV formatting


def _csv_field(text: str) -> str:
    """Quote a CSV field when it needs it (RFC 4180)."""
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


class _TokenTable:
    """The byte spelling of every distinct value in a sparse matrix, and a value -> token coder."""

    def __init__(self, X: sp.spmatrix):
        data = np.asarray(X.data, dtype=np.float32)
        finite = np.isfinite(data).all()
        integral = finite and bool(np.all(data == np.round(data)))
        lo = int(min(0.0, data.min())) if data.size else 0
        hi = int(max(0.0, data.max())) if data.size else 0
        if integral and hi - lo < _MAX_INT_TABLE:
            self._lo = lo
            self._uniq = None
            spellings = [str(v) for v in range(lo, hi + 1)]
        else:
            self._lo = 0
            self._uniq = np.unique(data[data != 0])
            spellings = ["0"] + [str(np.float32(v)) for v in self._uniq]
        encoded = [s.encode() for s in spellings]
        self.length = np.array([len(b) for b in encoded], dtype=np.int64)
        self.max_len = int(self.length.max())
        self.bytes = np.zeros((len(encoded), self.max_len), dtype=np.uint8)
        for i, b in enumerate(encoded):
            self.bytes[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        self.integral = self._uniq is None
        longer = np.flatnonzero(self.length > 1)
        self.short_prefix = int(longer[0]) if longer.size else len(encoded)  # codes below: 1 byte

    def codes(self, block: np.ndarray) -> np.ndarray:
        """Token index of every value of a dense block."""
        if self._uniq is None:
            return (block - self._lo).astype(np.int32) if self._lo else block.astype(np.int32)
        out = np.zeros(block.shape, dtype=np.int32)
        nz = block != 0
        out[nz] = np.searchsorted(self._uniq, block[nz]).astype(np.int32) + 1
        return out


def _format_rows(codes: np.ndarray, table: _TokenTable, prefixes: Sequence[bytes],
                 suffixes: Sequence[bytes]) -> np.ndarray:
    """Rows ``prefix + v1,v2,...,vm + suffix`` as one uint8 buffer (vectorised)."""
    n_rows, n_cols = codes.shape
    lens = table.length[codes]
    field = lens + 1  # value and the separator after it
    pre_len = np.fromiter(map(len, prefixes), dtype=np.int64, count=n_rows)
    suf_len = np.fromiter(map(len, suffixes), dtype=np.int64, count=n_rows)
    row_len = pre_len + field.sum(axis=1) - 1 + suf_len
    row_start = np.concatenate([[0], np.cumsum(row_len)[:-1]])
    buf = np.full(int(row_len.sum()), _COMMA, dtype=np.uint8)

    starts = np.cumsum(field, axis=1)
    starts -= field
    starts += (row_start + pre_len)[:, None]
    buf[starts] = table.bytes[codes, 0]
    for d in range(1, table.max_len):
        longer = lens > d
        buf[starts[longer] + d] = table.bytes[codes[longer], d]
    for i in range(n_rows):
        s = row_start[i]
        buf[s : s + pre_len[i]] = np.frombuffer(prefixes[i], dtype=np.uint8)
        e = s + row_len[i]
        buf[e - suf_len[i] : e] = np.frombuffer(suffixes[i], dtype=np.uint8)
    return buf


def _write_block(fh: BinaryIO, block: np.ndarray, table: _TokenTable,
                 prefixes: Sequence[bytes], suffixes: Sequence[bytes]) -> None:
    codes = table.codes(block)
    if codes.size == 0 or int(codes.max()) < table.short_prefix:
        # All single-character tokens: a fixed layout, no offsets needed.
        body = np.empty((codes.shape[0], 2 * codes.shape[1]), dtype=np.uint8)
        body[:, 0::2] = table.bytes[codes, 0]
        body[:, 1::2] = _COMMA
        for i in range(codes.shape[0]):
            fh.write(prefixes[i])
            fh.write(memoryview(body[i, :-1]))
            fh.write(suffixes[i])
        return
    fh.write(memoryview(_format_rows(codes, table, prefixes, suffixes)))


def _row_blocks(X: sp.csr_matrix, rows_per_block: int) -> Iterator[tuple[slice, np.ndarray]]:
    for start in range(0, X.shape[0], rows_per_block):
        sl = slice(start, min(start + rows_per_block, X.shape[0]))
        yield sl, X[sl].toarray()


def _phase_strings(ds: CellMatrix) -> np.ndarray:
    if ds.labels is None:
        raise ValueError(f"{ds.name or 'dataset'} has no labels to write")
    return np.asarray(ds.phase_names(), dtype=object)


def write_research_csv(ds: CellMatrix, path: str | Path, *, label_path: str | Path | None = None,
                       phase_column: bool = False, orient: str = "cells_rows",
                       chunk_cells: int | None = None) -> Path:
    """Write ``ds`` as a CSV in the original research code's layout (streamed in blocks, atomic).

    orient        "cells_rows": header ``barcode,<features...>``, one row per cell;
                  "features_rows": the transpose, header ``feature,<barcodes...>``.
    label_path    also write ``barcode,phase`` for the labelled cells there.
    phase_column  append a final ``phase`` column (cells_rows only; '' when unlabelled).
    chunk_cells   rows (cells, or features when transposed) per block; default:
                  about 4 million values per block.
    """
    if orient not in ("cells_rows", "features_rows"):
        raise ValueError(f"orient must be 'cells_rows' or 'features_rows', got {orient!r}")
    if phase_column and orient != "cells_rows":
        raise ValueError("phase_column needs orient='cells_rows'")
    if ds.n_features == 0:
        raise ValueError(f"{ds.name or 'dataset'} has no features to write")
    target = Path(path)
    phases = _phase_strings(ds) if phase_column else None
    with contextlib.ExitStack() as stack:
        tmp_labels = stack.enter_context(atomic_path(label_path)) if label_path is not None else None
        tmp = stack.enter_context(atomic_path(target))
        if tmp_labels is not None:
            write_labels_csv(ds, tmp_labels, atomic=False)
        if orient == "cells_rows":
            X = sp.csr_matrix(ds.X)
            row_names, col_names, corner = ds.barcodes, ds.features, "barcode"
        else:
            X = sp.csr_matrix(ds.X.T)
            row_names, col_names, corner = ds.features, ds.barcodes, "feature"
        table = _TokenTable(X)
        rows_per_block = chunk_cells or max(1, _BLOCK_VALUES // max(1, X.shape[1]))
        header = [corner, *map(str, col_names)] + (["phase"] if phase_column else [])
        with _open_binary(tmp, target.suffix == ".gz") as fh:
            fh.write((",".join(_csv_field(h) for h in header) + "\n").encode())
            for sl, block in _row_blocks(X, rows_per_block):
                prefixes = [(_csv_field(str(n)) + ",").encode() for n in row_names[sl]]
                if phases is None:
                    suffixes = [b"\n"] * len(prefixes)
                else:
                    suffixes = [("," + _csv_field(p) + "\n").encode() for p in phases[sl]]
                _write_block(fh, block, table, prefixes, suffixes)
    return target


def write_labels_csv(ds: CellMatrix, path: str | Path, *, atomic: bool = True) -> Path:
    """Write ``barcode,phase`` for every labelled cell (phase names from PHASES)."""
    names = _phase_strings(ds)
    keep = names != ""
    frame = pd.DataFrame({"barcode": ds.barcodes[keep], "phase": names[keep]})
    if not atomic:
        frame.to_csv(path, index=False)
        return Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


# ---------------------------------------------------------------------- h5ad


def write_h5ad(ds: CellMatrix, path: str | Path) -> Path:
    """Write an AnnData .h5ad: X CSR float32, obs['phase'] categorical (PHASES order)."""
    adata = to_anndata(ds)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def to_anndata(ds: CellMatrix):
    """The dataset as an AnnData (what write_h5ad writes): X CSR float32, obs['phase']
    categorical (PHASES order) when labelled, var['gene_ids'] when the features have ids."""
    import anndata as ad

    obs = pd.DataFrame(index=pd.Index(ds.barcodes.astype(str), name="barcode"))
    if ds.labels is not None:
        names = _phase_strings(ds)
        obs["phase"] = pd.Categorical(np.where(names == "", None, names), categories=list(PHASES))
    var = pd.DataFrame(index=pd.Index(ds.features.astype(str), name="feature"))
    if ds.feature_ids is not None:
        var["gene_ids"] = ds.feature_ids.astype(str)
    adata = ad.AnnData(X=sp.csr_matrix(ds.X, dtype=np.float32), obs=obs, var=var)
    adata.uns["modality"] = ds.modality
    if ds.name:
        adata.uns["name"] = ds.name
    return adata


# ----------------------------------------------------------------- 10x ARC h5

_PEAK_COLON = re.compile(r"^(?P<chrom>.+):(?P<start>\d+)-(?P<end>\d+)$")
_PEAK_SEP = re.compile(r"^(?P<chrom>.+?)[-_](?P<start>\d+)[-_](?P<end>\d+)$")


def _peak_interval(name: str) -> str:
    """'chr1:100-200', 'chr1-100-200' or 'chr1_100_200' -> 'chr1:100-200'."""
    m = _PEAK_COLON.match(name) or _PEAK_SEP.match(name)
    if m is None:
        raise ValueError(f"peak name {name!r} is not chrom:start-end (or chrom-start-end / chrom_start_end)")
    return f"{m['chrom']}:{int(m['start'])}-{int(m['end'])}"


def _bytes_array(values) -> np.ndarray:
    arr = np.asarray([str(v) for v in values], dtype=object)
    width = max(1, max((len(s.encode()) for s in arr), default=1))
    return np.array([s.encode() for s in arr], dtype=f"S{width}")


def write_10x_h5(gex: CellMatrix, peak: CellMatrix, path: str | Path, *, genome: str = "GRCh38",
                 gene_intervals: Sequence[str] | None = None,
                 library_id: str = "multiome") -> Path:
    """Write a Cell Ranger ARC ``filtered_feature_bc_matrix.h5`` holding both modalities.

    Layout (features x cells, compressed sparse by cell)::

        /matrix/barcodes   S   one per cell
        /matrix/data       i4  counts
        /matrix/indices    i8  feature index of each count
        /matrix/indptr     i8  n_cells + 1 offsets (one column per cell)
        /matrix/shape      i4  [n_features, n_cells]
        /matrix/features/{id, name, feature_type, genome, interval, _all_tag_keys}

    Genes come first ("Gene Expression"; id = Ensembl id, or the symbol when the
    matrix has none), then peaks ("Peaks"; id = name = interval = chrom:start-end).
    Gene intervals default to "NA" as Cell Ranger writes for unplaced genes.
    """
    import h5py

    if gex.modality != "gex" or peak.modality != "peak":
        raise ValueError("write_10x_h5 needs a 'gex' and a 'peak' CellMatrix")
    if gex.n_cells != peak.n_cells or not np.array_equal(gex.barcodes, peak.barcodes):
        raise ValueError(
            f"GEX and PEAK must share barcodes in the same order "
            f"({gex.n_cells} vs {peak.n_cells} cells)"
        )
    X = sp.hstack([gex.X, peak.X], format="csr")
    X.sort_indices()
    if X.data.size and (np.any(X.data < 0) or np.any(X.data != np.round(X.data))):
        raise ValueError("a 10x .h5 holds non-negative integer counts; the matrix has other values")
    if gene_intervals is None:
        gene_intervals = ["NA"] * gex.n_features
    elif len(gene_intervals) != gex.n_features:
        raise ValueError(f"{len(gene_intervals)} gene intervals for {gex.n_features} genes")

    peak_intervals = [_peak_interval(str(n)) for n in peak.features]
    gene_ids = gex.feature_ids if gex.feature_ids is not None else gex.features
    features = {
        "id": [*map(str, gene_ids), *peak_intervals],
        "name": [*map(str, gex.features), *peak_intervals],
        "feature_type": ["Gene Expression"] * gex.n_features + ["Peaks"] * peak.n_features,
        "genome": [genome] * (gex.n_features + peak.n_features),
        "interval": [*map(str, gene_intervals), *peak_intervals],
    }
    opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["chemistry_description"] = "Single Cell Multiome ATAC + Gene Expression v1"
        f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=_bytes_array(gex.barcodes), **opts)
        m.create_dataset("data", data=X.data.astype(np.int32), **opts)
        m.create_dataset("indices", data=X.indices.astype(np.int64), **opts)
        m.create_dataset("indptr", data=X.indptr.astype(np.int64), **opts)
        m.create_dataset("shape", data=np.array([X.shape[1], X.shape[0]], dtype=np.int32))
        fg = m.create_group("features")
        for key, values in features.items():
            fg.create_dataset(key, data=_bytes_array(values), **opts)
        fg.create_dataset("_all_tag_keys", data=np.array([b"genome", b"interval"]))
    return Path(path)
