"""Readers for the files biologists have, each returning one CellMatrix.

- the original research code's CSV layout: cells as rows, the first column the cell id, features
  as columns (optionally a `phase` column), or the transpose (features as rows);
  labels in a separate CSV (a barcode column and a phase/label column);
- AnnData `.h5ad` (labels in `obs['phase']` or a named column), or an AnnData in memory;
- MuData `.h5mu` (or a MuData in memory): expression from its `rna` modality, accessibility
  from `atac` unless named otherwise; labels from `obs['phase']` of the modality, of the
  MuData, or of another modality (see `matrix_from_mudata`);
- 10x Multiome `filtered_feature_bc_matrix.h5` ("Gene Expression" / "Peaks").

Large CSVs are streamed with pyarrow's multi-threaded reader block by block and
sparsified per block, so a research-sized PEAK matrix (7.4k x 92k) never exists as a
dense float64 frame. Every problem is an `InputError` naming the file and the
field (column, row) at fault.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import scipy.sparse as sp

from ..errors import InputError
from ..phases import encode_phases
from .dataset import CellMatrix, make_matrix
from .peaks import parse_peak_names

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("phase", "label", "labels", "cell_cycle_phase", "cycle_phase", "phase_label",
                 "cell_cycle", "cellcycle", "cc_phase")
BARCODE_COLUMNS = ("barcode", "barcodes", "cell", "cell_id", "cellid", "cell_barcode", "obs_names", "index", "")
ORIENTATIONS = ("auto", "cells_rows", "features_rows")
_BARCODE_RE = re.compile(r"^[ACGTN]{8,}([-_.]\w+)?$")
_PEAK_RE = re.compile(r"^\S+?[:_-][\d,]+[-_][\d,]+$")
CSV_SUFFIXES = (".csv", ".tsv", ".txt")


# ----------------------------------------------------------------------------- helpers

def _stem(path) -> str:
    name = Path(str(path)).name
    for suf in (".gz", ".bz2", ".zst"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _check_exists(path) -> None:
    if not os.path.exists(path):
        raise InputError(path, None, "file not found")
    if os.path.isdir(path):
        raise InputError(path, None, "is a directory, expected a file")
    if os.path.getsize(path) == 0:
        raise InputError(path, None, "file is empty")


# Compressed files are recognised by their suffix (as pyarrow and pandas do); each format's magic bytes.
_CODECS = {".gz": ("gzip", b"\x1f\x8b"), ".bz2": ("bzip2", b"BZh"), ".zst": ("zstd", b"\x28\xb5\x2f\xfd")}


def _codec(path) -> tuple[str, str, bytes] | None:
    """(suffix, format name, magic bytes) of a file named as compressed, else None."""
    for suffix, (name, magic) in _CODECS.items():
        if str(path).lower().endswith(suffix):
            return suffix, name, magic
    return None


def _check_compressed(path) -> None:
    """A file named .gz / .bz2 / .zst must hold that format (checked before any reading)."""
    codec = _codec(path)
    if codec is None:
        return
    suffix, name, magic = codec
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        raise InputError(path, None, f"not a {name} file (the name ends in {suffix} but the content is not "
                         f"{name}-compressed; rename or compress it)")


_STREAM_ERRORS = (OSError, EOFError, zlib.error)  # what pyarrow / Python's gzip raise on a broken stream


def _stream_error(path, e: BaseException) -> InputError:
    """A decompression failure while reading a compressed file, as one clear line."""
    name = _codec(path)[1]
    msg = str(e)
    if isinstance(e, EOFError) or "truncated" in msg.lower() or "ended before" in msg:
        return InputError(path, None, f"truncated {name} stream (the file ends early: an interrupted download "
                          "or copy?)")
    return InputError(path, None, f"corrupted {name} stream ({msg})")


def _check_unique(values: np.ndarray, path, field: str, what: str) -> None:
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        shown = ", ".join(f"'{d}' ({c}x)" for d, c in zip(dup[:5], counts[counts > 1][:5]))
        raise InputError(path, field, f"{len(dup)} duplicate {what}: {shown}")


def _check_values(block: np.ndarray, path, row_ids, col_names, row_offset: int = 0) -> None:
    """Reject NaN / infinite / negative values, naming the first offending cell."""
    bad = ~np.isfinite(block)
    kind = "missing or non-finite (NaN/inf)"
    if not bad.any():
        bad = block < 0
        kind = "negative"
        if not bad.any():
            return
    r, c = np.argwhere(bad)[0]
    n_bad = int(bad.sum())
    raise InputError(
        path, f"row '{row_ids[r]}', column '{col_names[c]}'",
        f"{kind} value {block[r, c]!r}; counts must be finite and >= 0 "
        f"({n_bad} such values in rows {row_offset + 1}-{row_offset + block.shape[0]})")


def looks_like_barcode(x: str) -> bool:
    return bool(_BARCODE_RE.match(str(x)))


def looks_like_peak(x: str) -> bool:
    return bool(_PEAK_RE.match(str(x)))


def _frac(pred, items) -> float:
    items = list(items)
    return sum(bool(pred(x)) for x in items) / len(items) if items else 0.0


# ----------------------------------------------------------------------------- labels

def find_label_column(columns, path, label_column: str | None = None, required: bool = True) -> int | None:
    """Index of the phase/label column: the named one, or the first known name."""
    lower = [str(c).strip().lower() for c in columns]
    if label_column is not None:
        if label_column in columns:
            return list(columns).index(label_column)
        if label_column.lower() in lower:
            return lower.index(label_column.lower())
        raise InputError(path, label_column, f"no such column; columns are: {', '.join(map(str, columns[:20]))}")
    for cand in LABEL_COLUMNS:
        if cand in lower:
            return lower.index(cand)
    if required:
        raise InputError(path, "phase", "no phase/label column found (looked for "
                         f"{', '.join(LABEL_COLUMNS)}); columns are: {', '.join(map(str, columns[:20]))}; "
                         "name it with --label_column")
    return None


def read_labels(path, label_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A labels CSV -> (barcodes, int8 phase codes). Barcodes come from a column named
    like 'barcode'/'cell' or else the first column; phases are normalised."""
    import pandas as pd

    _check_exists(path)
    _check_compressed(path)
    sep = "\t" if str(path).endswith((".tsv", ".tsv.gz")) else None
    try:
        df = pd.read_csv(path, sep=sep, engine="python", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError(path, None, "file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(path, None, f"not a readable CSV: {e}") from None
    except _STREAM_ERRORS as e:
        if _codec(path) is None:
            raise
        raise _stream_error(path, e) from None
    if df.shape[0] == 0:
        raise InputError(path, None, "no rows (only a header)")
    cols = list(df.columns)
    li = find_label_column(cols, path, label_column)
    lower = [str(c).strip().lower() for c in cols]
    bi = next((lower.index(c) for c in BARCODE_COLUMNS if c in lower and lower.index(c) != li), None)
    if bi is None:
        bi = 0 if li != 0 else None
    if bi is None:
        raise InputError(path, "barcode", "no barcode column (expected a column named barcode/cell or a first column of cell ids)")
    barcodes = df.iloc[:, bi].astype(str).str.strip().to_numpy(dtype=object)
    if (barcodes == "").any():
        raise InputError(path, str(cols[bi]), f"{int((barcodes == '').sum())} empty barcodes")
    _check_unique(barcodes, path, str(cols[bi]), "barcodes")
    codes = encode_phases(df.iloc[:, li].astype(str).str.strip().to_numpy(), path, str(cols[li]))
    return barcodes, codes


def attach_labels(ds: CellMatrix, barcodes: np.ndarray, codes: np.ndarray, label_path) -> CellMatrix:
    """Give every cell of `ds` its label; label barcodes missing from the matrix and
    matrix cells without a label are both errors that say how many."""
    index = {b: i for i, b in enumerate(barcodes)}
    missing_in_labels = [b for b in ds.barcodes if b not in index]
    mat = set(ds.barcodes)
    missing_in_matrix = [b for b in barcodes if b not in mat]
    if missing_in_matrix:
        raise InputError(label_path, "barcode",
                         f"{len(missing_in_matrix)} of {len(barcodes)} label barcodes are not in the matrix "
                         f"{ds.source} (e.g. {', '.join(map(str, missing_in_matrix[:3]))})")
    if missing_in_labels:
        raise InputError(label_path, "barcode",
                         f"{len(missing_in_labels)} of {ds.n_cells} cells of the matrix {ds.source} have no label "
                         f"here (e.g. {', '.join(map(str, missing_in_labels[:3]))})")
    order = np.fromiter((index[b] for b in ds.barcodes), dtype=np.int64, count=ds.n_cells)
    return ds.with_labels(codes[order])


# ----------------------------------------------------------------------------- CSV

def _read_head(path, n_lines: int = 6) -> list[str]:
    """The first lines of a (possibly compressed) text file, decoded."""
    try:
        with pa.input_stream(str(path), compression="detect") as f:
            buf = b""
            while buf.count(b"\n") < n_lines:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                buf += chunk
    except _STREAM_ERRORS as e:
        if _codec(path) is None:
            raise
        raise _stream_error(path, e) from None
    if not buf.strip():
        raise InputError(path, None, "file is empty")
    try:
        text = buf.decode("utf-8")
    except UnicodeDecodeError:
        text = buf.decode("utf-8", errors="replace")
        if "\ufffd" in text[:1000]:
            raise InputError(path, None, "not a text CSV (binary content)") from None
    return [line.rstrip("\r") for line in text.split("\n")[:n_lines] if line.strip()]


def _detect_orientation(path, header, first_ids, label_barcodes, orient: str) -> str:
    if orient != "auto":
        if orient not in ORIENTATIONS:
            raise InputError(path, "--orient", f"unknown orientation '{orient}'; use one of {ORIENTATIONS}")
        return orient
    cols = header[1:]
    if label_barcodes is not None:
        lb = set(label_barcodes)
        in_header = _frac(lambda c: c in lb, cols[:2000])
        in_rows = _frac(lambda r: r in lb, first_ids)
        if in_header > in_rows:
            return "features_rows"
        if in_rows > 0:
            return "cells_rows"
    if _frac(looks_like_barcode, cols[:2000]) > 0.5 and _frac(looks_like_barcode, first_ids) < 0.5:
        return "features_rows"
    if _frac(looks_like_peak, first_ids) > 0.9 and _frac(looks_like_peak, cols[:2000]) < 0.5:
        return "features_rows"
    return "cells_rows"


def _locate_bad_value(path, delim, names, col_idx: int, value: str) -> str:
    """Second pass, only on error: the row id holding a non-numeric value."""
    try:
        reader = pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delim),
            convert_options=pacsv.ConvertOptions(include_columns=[names[0], names[col_idx]],
                                                 column_types={names[0]: pa.string(), names[col_idx]: pa.string()}))
        for batch in reader:
            vals = batch.column(1).to_pylist()
            if value in vals:
                return str(batch.column(0)[vals.index(value)])
    except (pa.ArrowInvalid, *_STREAM_ERRORS):
        pass
    return "?"


@dataclass(frozen=True)
class _CsvLayout:
    """What the first lines of a matrix CSV say about the rest: the delimiter, the header, which
    way round it is, the column of phases inside it (if any) and the names of its value columns."""

    delim: str
    header: list[str]
    orientation: str
    label_idx: int | None
    col_names: list[str]
    row_width: int


def _csv_layout(path: str, label_barcodes, label_column: str | None, orient: str, has_label_file: bool) -> _CsvLayout:
    """Read the head of a matrix CSV: delimiter, header, orientation and the phase column."""
    head = _read_head(path)
    delim = "\t" if (path.endswith((".tsv", ".tsv.gz")) or ("\t" in head[0] and "," not in head[0])) else ","
    header = [h.strip().strip('"') for h in head[0].split(delim)]
    if len(header) < 2:
        raise InputError(path, "header", "needs an id column and at least one feature column")
    if len(head) < 2:
        raise InputError(path, None, "no data rows (only a header)")
    first_ids = [line.split(delim, 1)[0].strip().strip('"') for line in head[1:]]
    orientation = _detect_orientation(path, header, first_ids, label_barcodes, orient)

    label_idx = None
    if orientation == "cells_rows" and not has_label_file:
        label_idx = find_label_column(header[1:], path, label_column, required=label_column is not None)
        label_idx = None if label_idx is None else label_idx + 1
    col_names = [header[i] for i in range(1, len(header)) if i != label_idx]
    _check_unique(np.asarray(col_names, dtype=object), path, "header",
                  "feature columns" if orientation == "cells_rows" else "cell columns")
    return _CsvLayout(delim, header, orientation, label_idx, col_names, max(len(head[1]), 1))


def _stream_csv(path: str, lay: _CsvLayout, block_bytes: int) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray | None]:
    """Stream the body block by block: (row ids, sparse values, phase strings or None)."""
    names = [f"c{i}" for i in range(len(lay.header))]
    types = {n: pa.float32() for n in names}
    types[names[0]] = pa.string()
    if lay.label_idx is not None:
        types[names[lay.label_idx]] = pa.string()
    value_idx = [i for i in range(1, len(lay.header)) if i != lay.label_idx]
    row_ids: list[np.ndarray] = []
    phase_vals: list[np.ndarray] = []
    blocks: list[sp.csr_matrix] = []
    n_rows = 0
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1,
                                           block_size=int(max(block_bytes, 64 * lay.row_width))),
            parse_options=pacsv.ParseOptions(delimiter=lay.delim),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
        for batch in reader:
            ids = batch.column(0).to_numpy(zero_copy_only=False).astype(object)
            block = batch.select(value_idx).to_tensor(null_to_nan=True, row_major=True).to_numpy()
            _check_values(block, path, ids, lay.col_names, n_rows)
            blocks.append(sp.csr_matrix(block))
            row_ids.append(ids)
            if lay.label_idx is not None:
                phase_vals.append(batch.column(lay.label_idx).to_numpy(zero_copy_only=False).astype(object))
            n_rows += batch.num_rows
    except pa.ArrowInvalid as e:
        raise _csv_parse_error(path, lay, names, str(e)) from None
    except _STREAM_ERRORS as e:
        if _codec(path) is None:
            raise
        raise _stream_error(path, e) from None
    if n_rows == 0:
        raise InputError(path, None, "no data rows (only a header)")
    phases = np.concatenate(phase_vals) if lay.label_idx is not None else None
    return np.concatenate(row_ids), sp.vstack(blocks, format="csr"), phases


def _csv_parse_error(path: str, lay: _CsvLayout, names: list[str], msg: str) -> InputError:
    """pyarrow's parse error as one line naming the row and column at fault."""
    m = re.search(r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error to float: invalid value '(.*)'", msg)
    if m:
        ci, val = int(m.group(1)), m.group(2)
        row = _locate_bad_value(path, lay.delim, names, ci, val)
        return InputError(path, f"row '{row}', column '{lay.header[ci]}'",
                          f"non-numeric value '{val}' in a count matrix")
    m = re.search(r"Expected (\d+) columns, got (\d+): (.*)", msg)
    if m:
        row = m.group(3).split(lay.delim, 1)[0]
        return InputError(path, f"row '{row}'", f"has {m.group(2)} fields but the header has {m.group(1)}")
    return InputError(path, None, f"malformed CSV: {msg}")


def read_csv_matrix(path, *, modality: str, label_path=None, label_column: str | None = None,
                    orient: str = "auto", name: str | None = None,
                    block_bytes: int = 64 << 20) -> CellMatrix:
    """Stream a CSV in the research code's layout (or its transpose) into a sparse CellMatrix.

    Labels come from `label_path` (a separate CSV) or, for cells-as-rows files, from a
    `phase`/`label` column inside the matrix (or the column named `label_column`).
    """
    path = str(path)
    _check_exists(path)
    _check_compressed(path)
    label_barcodes = label_codes = None
    if label_path is not None:
        label_barcodes, label_codes = read_labels(label_path, label_column)
    lay = _csv_layout(path, label_barcodes, label_column, orient, label_path is not None)
    ids, X, phase_values = _stream_csv(path, lay, block_bytes)
    if lay.orientation == "cells_rows":
        barcodes, features = ids, np.asarray(lay.col_names, dtype=object)
    else:
        barcodes, features, X = np.asarray(lay.col_names, dtype=object), ids, X.T.tocsr()
    _check_unique(barcodes.astype(str), path, "barcode" if lay.orientation == "cells_rows" else "header", "barcodes")
    _check_unique(features.astype(str), path, "feature", "features")
    labels = None
    if phase_values is not None:
        labels = encode_phases(phase_values, path, lay.header[lay.label_idx])
    ds = make_matrix(X, barcodes, features, labels, modality=modality, name=name or _stem(path),
                     source=path, meta={"orientation": lay.orientation})
    if label_path is not None:
        ds = attach_labels(ds, label_barcodes, label_codes, label_path)
    return ds


# ----------------------------------------------------------------------------- AnnData (.h5ad) and MuData (.h5mu)

# The MuData modality each kind of data is read from, unless --gex_modality / --peak_modality name another.
DEFAULT_MODALITIES = {"gex": "rna", "peak": "atac"}
MODALITY_FLAGS = {"gex": "--gex_modality", "peak": "--peak_modality"}


def load_anndata(path):
    """An .h5ad file as an AnnData; a missing or unreadable file is an InputError naming it."""
    import anndata as ad

    path = str(path)
    _check_exists(path)
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py / anndata raise many types for a broken file
        raise InputError(path, None, f"not a readable .h5ad file: {type(e).__name__}: {e}") from None


def load_mudata(path):
    """An .h5mu file as a MuData, as stored (no modality columns pulled into its obs); a missing or
    unreadable file is an InputError naming it."""
    import h5py
    import mudata as md

    path = str(path)
    _check_exists(path)
    try:
        with h5py.File(path, "r") as f:
            has_mod = "mod" in f
    except OSError as e:
        raise InputError(path, None, f"not a readable .h5mu file (not HDF5: {e})") from None
    if not has_mod:
        raise InputError(path, "mod", "no 'mod' group: not a MuData .h5mu file (an AnnData? name it .h5ad)")
    try:
        with md.set_options(pull_on_update=False):
            return md.read_h5mu(path)
    except Exception as e:  # h5py / anndata / mudata raise many types for a broken file
        raise InputError(path, None, f"not a readable .h5mu file: {type(e).__name__}: {e}") from None


def _anndata_counts(adata, *, modality: str, source: str, name: str, layer: str | None,
                    where: str = "") -> CellMatrix:
    """An AnnData's X (or a layer) as an unlabelled CellMatrix, checked; `where` prefixes the
    fields errors name (e.g. "mod['rna']." for a MuData's modality)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(source, f"{where}X", f"empty matrix ({adata.n_obs} cells x {adata.n_vars} features)")
    if layer is not None:
        if layer not in adata.layers:
            raise InputError(source, f"{where}layers['{layer}']", f"no such layer; layers are {list(adata.layers)}")
        X = adata.layers[layer]
    else:
        X = adata.X
    field = f"{where}layers['{layer}']" if layer else f"{where}X"
    if X is None:
        raise InputError(source, field, "no matrix stored (X is empty); name a layer")
    X = sp.csr_matrix(X, dtype=np.float32)
    if X.nnz:
        data = X.data
        if not np.isfinite(data).all() or (data < 0).any():
            bad = np.flatnonzero(~np.isfinite(data) | (data < 0))[0]
            row = np.searchsorted(X.indptr, bad, side="right") - 1
            where_bad = f"{field} row '{adata.obs_names[row]}', column '{adata.var_names[X.indices[bad]]}'"
            raise InputError(source, where_bad, f"value {data[bad]!r}; counts must be finite and >= 0")
    barcodes = np.asarray(adata.obs_names, dtype=object)
    features = np.asarray(adata.var_names, dtype=object)
    _check_unique(barcodes, source, f"{where}obs_names", "barcodes")
    _check_unique(features, source, f"{where}var_names", "features")
    feature_ids = None
    for key in ("gene_ids", "gene_id", "ensembl_id", "ensembl"):
        if key in adata.var.columns:
            feature_ids = adata.var[key].astype(str).to_numpy(dtype=object)
            break
    return make_matrix(X, barcodes, features, None, modality=modality, name=name, source=source,
                       feature_ids=feature_ids)


def matrix_from_anndata(adata, *, modality: str, source: str, name: str | None = None, label_path=None,
                        label_column: str | None = None, layer: str | None = None) -> CellMatrix:
    """An in-memory AnnData -> CellMatrix (X or a named layer; labels from obs['phase'] or the
    column named `label_column`, or from a labels CSV). `source` is what errors name: the file it
    was read from, or e.g. "<AnnData>"; `name` defaults to its file stem."""
    ds = _anndata_counts(adata, modality=modality, source=source, name=name or _stem(source), layer=layer)
    if label_path is not None:
        return attach_labels(ds, *read_labels(label_path, label_column), label_path)
    li = find_label_column(list(adata.obs.columns), source, label_column, required=label_column is not None)
    if li is None:
        return ds
    col = adata.obs.columns[li]
    return ds.with_labels(encode_phases(adata.obs[col].astype(object).to_numpy(), source, f"obs['{col}']"))


def read_h5ad(path, *, modality: str, label_path=None, label_column: str | None = None,
              layer: str | None = None, name: str | None = None) -> CellMatrix:
    """AnnData -> CellMatrix (X or a named layer; labels from obs or a labels CSV)."""
    adata = load_anndata(path)
    return matrix_from_anndata(adata, modality=modality, source=str(path), name=name, label_path=label_path,
                               label_column=label_column, layer=layer)


def get_modality(mdata, modality: str, mod_name: str, source: str):
    """The AnnData of modality `mod_name` of a MuData; a missing one is an InputError naming
    `source`, the modalities there are and the flag that names another (by `modality`)."""
    if mod_name not in mdata.mod:
        raise InputError(source, f"mod['{mod_name}']", f"has no '{mod_name}' modality (it has: "
                         f"{', '.join(mdata.mod) or 'none'}); name one with {MODALITY_FLAGS[modality]}")
    return mdata.mod[mod_name]


def matrix_from_mudata(mdata, *, modality: str, mod_name: str | None = None, source: str, name: str | None = None,
                       label_path=None, label_column: str | None = None) -> CellMatrix:
    """One modality of an in-memory MuData -> CellMatrix: exactly that modality's cells.

    `mod_name` defaults to DEFAULT_MODALITIES[modality] ("rna" for gex, "atac" for peak). Labels
    come from a labels CSV when given, else from the first of these with a phase column (or the
    column named `label_column`):
      1. the modality's own obs (every value must be a phase, as in an .h5ad);
      2. the MuData's obs: a plain column, then the modality's prefixed copy ("atac:phase");
      3. another modality's obs, then its prefixed copy in the MuData's obs ("rna:phase"), in
         the MuData's order: the same barcode is the same cell in every modality.
    In 2 and 3 a cell the column does not cover (absent there, or a missing value) is unlabelled;
    a column that covers none of the modality's cells is passed over. `source` is what errors
    name; `name` defaults to "<file stem>_<mod_name>".
    """
    mod_name = mod_name or DEFAULT_MODALITIES[modality]
    adata = get_modality(mdata, modality, mod_name, source)
    ds = _anndata_counts(adata, modality=modality, source=source, name=name or f"{_stem(source)}_{mod_name}",
                         layer=None, where=f"mod['{mod_name}'].")
    if label_path is not None:
        return attach_labels(ds, *read_labels(label_path, label_column), label_path)
    return ds.with_labels(_mudata_labels(mdata, mod_name, ds.barcodes, source, label_column))


def _label_sources(mdata, mod_name: str):
    """(obs frame, column prefix, the frame's name in errors, strict) in the order labels are looked for."""
    yield mdata.mod[mod_name].obs, "", f"mod['{mod_name}'].obs", True
    yield mdata.obs, "", "obs", False
    yield mdata.obs, f"{mod_name}:", "obs", False
    for other in mdata.mod:
        if other != mod_name:
            yield mdata.mod[other].obs, "", f"mod['{other}'].obs", False
            yield mdata.obs, f"{other}:", "obs", False


def _label_candidates(obs, prefix: str, is_mudata_obs: bool, mods: set) -> list:
    """The columns of `obs` that may hold phases: those under `prefix`; with no prefix, in the
    MuData's obs, the columns not prefixed with a modality's name."""
    if prefix:
        return [c for c in obs.columns if str(c).startswith(prefix)]
    if not is_mudata_obs:
        return list(obs.columns)
    return [c for c in obs.columns if not (":" in str(c) and str(c).split(":", 1)[0] in mods)]


def _mudata_labels(mdata, mod_name: str, barcodes: np.ndarray, source: str,
                   label_column: str | None) -> np.ndarray | None:
    """The phase codes of a modality's cells from the MuData's label sources (see matrix_from_mudata)."""
    mods = set(mdata.mod)
    for obs, prefix, frame, strict in _label_sources(mdata, mod_name):
        cols = _label_candidates(obs, prefix, frame == "obs", mods)
        short = [str(c)[len(prefix):] for c in cols]
        if label_column is not None and label_column.lower() not in {s.lower() for s in short}:
            continue
        li = find_label_column(short, source, label_column, required=False)
        if li is None:
            continue
        col, field = cols[li], f"{frame}['{cols[li]}']"
        if strict:
            return encode_phases(obs[col].astype(object).to_numpy(), source, field)
        codes = _covered_labels(obs, col, barcodes, source, field, frame)
        if (codes >= 0).any():
            log.info("%s: labels of mod['%s'] from %s (%d of %d cells)", source, mod_name, field,
                     int((codes >= 0).sum()), len(codes))
            return codes
    if label_column is not None:
        raise InputError(source, f"obs['{label_column}']", f"no such column in mod['{mod_name}'].obs, the "
                         "MuData's obs or another modality's obs")
    return None


def _covered_labels(obs, col, barcodes: np.ndarray, source: str, field: str, frame: str) -> np.ndarray:
    """A column's phases for `barcodes` aligned by barcode; cells it does not cover get -1
    (`frame` names the obs frame in errors)."""
    import pandas as pd

    codes = np.full(len(barcodes), -1, dtype=np.int8)
    if len(obs) == 0:
        return codes
    _check_unique(np.asarray(obs.index, dtype=object), source, f"{frame}_names", "barcodes")
    pos = obs.index.astype(str).get_indexer(barcodes.astype(str))
    values = obs[col].astype(object).to_numpy()
    picked = np.where(pos >= 0, values[np.maximum(pos, 0)], None)
    has = (pos >= 0) & ~pd.isna(picked)
    has &= np.array([str(v).strip() != "" for v in picked], dtype=bool)
    if has.any():
        codes[has] = encode_phases(picked[has], source, field)
    return codes


def read_h5mu(path, *, modality: str, mod_name: str | None = None, label_path=None,
              label_column: str | None = None, name: str | None = None) -> CellMatrix:
    """One modality of a MuData .h5mu file -> CellMatrix (see matrix_from_mudata)."""
    mdata = load_mudata(path)
    return matrix_from_mudata(mdata, modality=modality, mod_name=mod_name, source=str(path), name=name,
                              label_path=label_path, label_column=label_column)


# ----------------------------------------------------------------------------- 10x h5

TENX_FEATURE_TYPES = {"gex": "Gene Expression", "peak": "Peaks"}


def read_10x_h5(path, *, modality: str, label_path=None, label_column: str | None = None,
                name: str | None = None) -> CellMatrix:
    """A Cell Ranger (ARC) filtered_feature_bc_matrix.h5; keeps the features of the
    modality's type ("Gene Expression" or "Peaks")."""
    import h5py

    path = str(path)
    _check_exists(path)
    want = TENX_FEATURE_TYPES[modality]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, None, f"not a readable HDF5 file: {e}") from None
    with f:
        if "matrix" not in f:
            raise InputError(path, "matrix", "no 'matrix' group: not a 10x feature-barcode matrix .h5")
        g = f["matrix"]
        for key in ("barcodes", "data", "indices", "indptr", "shape", "features"):
            if key not in g:
                raise InputError(path, f"matrix/{key}", "missing from the 10x matrix")
        n_feat, n_cells = (int(v) for v in g["shape"][:])
        dec = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else str(b), otypes=[object])
        barcodes = dec(g["barcodes"][:])
        feats = g["features"]
        ftype = dec(feats["feature_type"][:])
        fname = dec(feats["name"][:])
        fid = dec(feats["id"][:])
        M = sp.csc_matrix((g["data"][:].astype(np.float32), g["indices"][:], g["indptr"][:]),
                          shape=(n_feat, n_cells))
    keep = np.flatnonzero(ftype == want)
    if len(keep) == 0:
        types = ", ".join(sorted(set(ftype)))
        raise InputError(path, "matrix/features/feature_type", f"no '{want}' features (types present: {types})")
    X = M[keep].T.tocsr()
    data = X.data
    if not np.isfinite(data).all() or (data < 0).any():
        raise InputError(path, "matrix/data", "non-finite or negative counts")
    names, ids = fname[keep], fid[keep]
    if modality == "peak":
        features = ids  # 10x peak ids are the coordinates "chr1:10109-10357"
    else:
        features = _make_unique(names)
    _check_unique(barcodes, path, "matrix/barcodes", "barcodes")
    ds = make_matrix(X, barcodes, features, None, modality=modality, name=name or _stem(path),
                     source=path, feature_ids=ids if modality == "gex" else None)
    if label_path is not None:
        ds = attach_labels(ds, *read_labels(label_path, label_column), label_path)
    return ds


def _make_unique(names: np.ndarray) -> np.ndarray:
    """Gene symbols repeat in 10x files; suffix repeats with -1, -2 (as anndata does)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return np.asarray(out, dtype=object)


# ----------------------------------------------------------------------------- dispatch

def file_format(path) -> str:
    p = str(path).lower()
    for suf in (".gz", ".bz2", ".zst"):
        if p.endswith(suf):
            p = p[: -len(suf)]
    if p.endswith(".h5ad"):
        return "h5ad"
    if p.endswith(".h5mu"):
        return "h5mu"
    if p.endswith(".h5"):
        return "10x"
    if p.endswith(CSV_SUFFIXES):
        return "csv"
    raise InputError(path, None, "unknown file type; expected .csv/.tsv(.gz), .h5ad, .h5mu, or a 10x .h5")


def read_matrix(path, *, modality: str, label_path=None, label_column: str | None = None,
                orient: str = "auto", name: str | None = None, mod_name: str | None = None) -> CellMatrix:
    """Read any supported file as a CellMatrix of the given modality (`mod_name`: the modality
    of a .h5mu to read, default DEFAULT_MODALITIES[modality]; other formats have one)."""
    fmt = file_format(path)
    if fmt == "csv":
        ds = read_csv_matrix(path, modality=modality, label_path=label_path, label_column=label_column,
                             orient=orient, name=name)
    elif fmt == "h5ad":
        ds = read_h5ad(path, modality=modality, label_path=label_path, label_column=label_column, name=name)
    elif fmt == "h5mu":
        ds = read_h5mu(path, modality=modality, mod_name=mod_name, label_path=label_path,
                       label_column=label_column, name=name)
    else:
        ds = read_10x_h5(path, modality=modality, label_path=label_path, label_column=label_column, name=name)
    _check_modality(ds)
    return ds


def _check_modality(ds: CellMatrix) -> None:
    """Catch a PEAK file given where expression is expected, and the reverse."""
    sample = list(ds.features[:500])
    peaky = _frac(looks_like_peak, sample)
    if ds.modality == "gex" and peaky > 0.9:
        raise InputError(ds.source, "features", "looks like chromatin accessibility (peak coordinates as "
                         "features) but was given as expression; check which flag this file was passed to")
    if ds.modality == "peak":
        if peaky < 0.5:
            raise InputError(ds.source, "features", "was given as accessibility peaks but its feature names are not "
                             f"peak coordinates like chr1:100-200 (e.g. '{sample[0]}')")
        parse_peak_names(ds.features, ds.source, "features")  # every name must parse
