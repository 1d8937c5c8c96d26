"""The Parquet cell store: datasets written once, read fast by every trial on every node.

Layout of a store root (a local directory or a URI such as file:///... or s3://...):

    <root>/datasets/<name>/
        manifest.json      schema version, shape, nnz, content hash, label counts, source
        cells.parquet      one row per cell: barcode, phase (or null), indices, values
                           (indices/values: the cell's sparse row, large_list<int32/float32>)
        features.parquet   one row per feature: name, id (or null)

Reading `cells.parquet` back gives the list offsets, indices and values as
contiguous arrays, which are exactly CSR's indptr / indices / data: no dense
matrix is ever built. Files carry page checksums, the manifest is written last
and a dataset directory is published by an atomic rename (local file systems),
so a reader sees a whole dataset or none.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ..version import __version__
from ..errors import StoreError
from ..phases import PHASES, decode_phases
from .dataset import CellMatrix, _canonical_csr, content_hash, make_matrix
from .fs import Location, resolve_store_root, tmp_sibling

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_STORE = "xfer_store"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ROW_GROUP_CELLS = 1024


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise StoreError(name, "invalid dataset name: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit, at most 128 characters)", field="name")
    return name


@dataclass(frozen=True)
class Manifest:
    name: str
    modality: str
    n_cells: int
    n_features: int
    nnz: int
    content_hash: str
    has_labels: bool
    label_counts: dict
    source: str
    created_utc: str
    schema_version: int = SCHEMA_VERSION
    xfer_version: str = __version__

    def to_json(self) -> str:
        return json.dumps({"kind": "xfer.cell_dataset", **self.__dict__}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where) -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(where, f"manifest is not valid JSON ({e})") from None
        if d.get("kind") != "xfer.cell_dataset":
            raise StoreError(where, "not an xfer cell-dataset manifest", field="kind")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(where, f"schema version {version} is not supported by this xfer "
                             f"(expects {SCHEMA_VERSION}); re-ingest the dataset", field="schema_version")
        fields = set(cls.__dataclass_fields__)
        missing = fields - set(d)
        if missing:
            raise StoreError(where, f"manifest lacks {sorted(missing)}", field=sorted(missing)[0])
        return cls(**{k: d[k] for k in fields})


def _cells_table(ds: CellMatrix, X: sp.csr_matrix) -> pa.Table:
    offsets = pa.array(X.indptr.astype(np.int64))
    indices = pa.LargeListArray.from_arrays(offsets, pa.array(X.indices.astype(np.int32)))
    values = pa.LargeListArray.from_arrays(offsets, pa.array(X.data.astype(np.float32)))
    phase = None
    if ds.labels is not None:
        names = decode_phases(ds.labels)
        phase = pa.array([n if n else None for n in names], type=pa.string())
    else:
        phase = pa.nulls(ds.n_cells, type=pa.string())
    return pa.table({"barcode": pa.array(ds.barcodes.astype(str), type=pa.string()),
                     "phase": phase, "indices": indices, "values": values})


def _features_table(ds: CellMatrix) -> pa.Table:
    ids = ds.feature_ids.astype(str) if ds.feature_ids is not None else None
    return pa.table({"name": pa.array(ds.features.astype(str), type=pa.string()),
                     "id": pa.array(ids, type=pa.string()) if ids is not None else pa.nulls(ds.n_features, pa.string())})


def _write_parquet(table: pa.Table, loc: Location, row_group_size: int | None = None) -> None:
    with loc.fs.open_output_stream(loc.path) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_size,
                       write_page_checksum=True, use_dictionary=["barcode", "phase", "name", "id"])


def _read_parquet(loc: Location, columns=None) -> pa.Table:
    if not loc.exists():
        raise StoreError(loc.uri, "file missing from the dataset (the store entry is incomplete; re-ingest it)")
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.read_table(f, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise StoreError(loc.uri, f"corrupted Parquet file ({type(e).__name__}: {e}); re-ingest the dataset") from None


class CellStore:
    """Datasets by name under `<root>/datasets/`."""

    def __init__(self, root: str = DEFAULT_STORE):
        self.root = resolve_store_root(root)  # a file in the way fails here, before any write

    def __repr__(self) -> str:
        return f"CellStore({self.root.uri!r})"

    def _dir(self, name: str) -> Location:
        return self.root.join("datasets", check_name(name))

    def exists(self, name: str) -> bool:
        return self._dir(name).join("manifest.json").exists()

    def names(self) -> list[str]:
        base = self.root.join("datasets")
        return [n for n in base.listdir() if not n.startswith(".") and base.join(n, "manifest.json").exists()]

    def manifest(self, name: str) -> Manifest:
        d = self._dir(name)
        mloc = d.join("manifest.json")
        if not mloc.exists():
            if d.exists():
                raise StoreError(mloc.uri, "missing manifest: the dataset directory is incomplete or was not "
                                 "written by xfer ingest; re-ingest it")
            known = ", ".join(self.names()) or "none"
            raise StoreError(self.root.uri, f"no dataset '{name}' in this store (datasets: {known})", field=name)
        return Manifest.from_json(mloc.read_bytes().decode(), mloc.uri)

    def write(self, ds: CellMatrix, name: str | None = None, *, overwrite: bool = False) -> Manifest:
        """Write a dataset once. The same content under the same name is a no-op;
        different content under an existing name needs overwrite=True."""
        name = check_name(name or ds.name)
        X = _canonical_csr(ds.X)
        ds_c = make_matrix(X, ds.barcodes, ds.features, ds.labels, modality=ds.modality, name=name,
                           source=ds.source, feature_ids=ds.feature_ids)
        digest = content_hash(ds_c)
        target = self._dir(name)
        if target.exists():
            if self.exists(name):
                old = self.manifest(name)
                if old.content_hash == digest:
                    log.info("dataset '%s' already in the store with the same content", name)
                    return old
                if not overwrite:
                    raise StoreError(target.uri, f"a different dataset named '{name}' already exists "
                                     "(use --overwrite to replace it)", field="name")
            elif not overwrite:
                raise StoreError(target.uri, "an incomplete dataset directory is in the way (no manifest); "
                                 "use --overwrite to replace it", field="name")
        man = Manifest(name=name, modality=ds.modality, n_cells=ds.n_cells, n_features=ds.n_features,
                       nnz=int(X.nnz), content_hash=digest, has_labels=ds.labels is not None,
                       label_counts=ds_c.label_counts(), source=str(ds.source),
                       created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        build = tmp_sibling(target) if target.is_local else target
        build.fs.create_dir(build.path, recursive=True)
        try:
            _write_parquet(_cells_table(ds_c, X), build.join("cells.parquet"), ROW_GROUP_CELLS)
            _write_parquet(_features_table(ds_c), build.join("features.parquet"))
            build.join("manifest.json").write_bytes_atomic(man.to_json().encode())
            if build is not target:
                self._publish(build, target)
        except BaseException:
            _remove(build)
            raise
        return man

    @staticmethod
    def _publish(build: Location, target: Location) -> None:
        """Rename a finished build directory into place (replacing any old one)."""
        import os

        trash = None
        if target.exists():
            trash = tmp_sibling(target, "old")
            os.replace(target.path, trash.path)
        os.replace(build.path, target.path)
        if trash is not None:
            _remove(trash)

    def read(self, name: str, *, verify: bool = False) -> CellMatrix:
        """Read a dataset as a CellMatrix (CSR built straight from the Parquet lists)."""
        man = self.manifest(name)
        d = self._dir(name)
        cells = _read_parquet(d.join("cells.parquet"))
        feats = _read_parquet(d.join("features.parquet"))
        try:
            indices_col = cells.column("indices").combine_chunks()
            values_col = cells.column("values").combine_chunks()
            indptr = indices_col.offsets.to_numpy()
            indptr = indptr - indptr[0]
            indices = indices_col.values.to_numpy()
            data = values_col.values.to_numpy()
            barcodes = cells.column("barcode").to_numpy().astype(object)
            phase = cells.column("phase").to_pylist()
            fnames = feats.column("name").to_numpy().astype(object)
            fid_col = feats.column("id")
        except KeyError as e:
            raise StoreError(d.uri, f"cells/features table lacks column {e}; re-ingest the dataset") from None
        if len(barcodes) != man.n_cells or len(fnames) != man.n_features or len(data) != man.nnz:
            raise StoreError(d.uri, f"contents ({len(barcodes)} cells, {len(fnames)} features, {len(data)} values) "
                             f"disagree with the manifest ({man.n_cells}, {man.n_features}, {man.nnz}); re-ingest")
        X = sp.csr_matrix((data, indices, indptr), shape=(man.n_cells, man.n_features))
        labels = _decode_phases(phase) if man.has_labels else None
        feature_ids = None if fid_col.null_count == len(fid_col) else fid_col.to_numpy(zero_copy_only=False).astype(object)
        ds = CellMatrix(X=X, barcodes=barcodes, features=fnames, labels=labels, modality=man.modality,
                        name=man.name, source=f"{d.uri}", feature_ids=feature_ids,
                        meta={"content_hash": man.content_hash})
        if verify and content_hash(ds) != man.content_hash:
            raise StoreError(d.uri, "content hash does not match the manifest: the dataset is corrupted; re-ingest it")
        return ds

    def delete(self, name: str) -> None:
        _remove(self._dir(name))


def _decode_phases(phase: list) -> np.ndarray:
    """Stored phase names (null = unlabelled) -> int8 codes."""
    lut = {p: i for i, p in enumerate(PHASES)}
    return np.array([lut.get(p, -1) if p is not None else -1 for p in phase], dtype=np.int8)


def _remove(loc: Location) -> None:
    try:
        if loc.is_dir():
            loc.fs.delete_dir(loc.path)
        elif loc.exists():
            loc.fs.delete_file(loc.path)
    except OSError:  # best effort clean-up
        log.warning("could not remove %s", loc.uri)
