"""The content-addressed embedding store: per-cell vectors computed once, read by every trial.

A key is (dataset content hash, embedder name, embedder settings). Each key is
one Parquet file

    <root>/embeddings/<dataset_hash>/<embedder>/<settings_hash>.parquet

with columns `barcode` (string) and `embedding` (fixed_size_list<float32>[d]);
the key itself (dataset hash, embedder, settings, dim) is in the file's schema
metadata, so a file describes itself. Writes are atomic: on a local file system
the file is written under a unique temporary name and renamed into place, so
concurrent writers of one key leave exactly one valid file; object stores
publish an object only when its upload completes.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StoreError
from .fs import Location, resolve_store_root

META_KEY = b"xfer.embedding"
EMBED_SCHEMA_VERSION = 1
_EMBEDDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def settings_hash(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class EmbeddingKey:
    dataset_hash: str
    embedder: str
    settings: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if not re.fullmatch(r"[0-9a-f]{8,64}", self.dataset_hash or ""):
            raise StoreError(self.dataset_hash, "dataset hash must be a hex content hash", field="dataset_hash")
        if not _EMBEDDER_RE.match(self.embedder or ""):
            raise StoreError(self.embedder, "invalid embedder name", field="embedder")

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    def relpath(self) -> str:
        return f"embeddings/{self.dataset_hash}/{self.embedder}/{self.settings_hash}.parquet"

    def __eq__(self, other) -> bool:
        return isinstance(other, EmbeddingKey) and self.relpath() == other.relpath()

    def __hash__(self) -> int:
        return hash(self.relpath())


@dataclass(frozen=True)
class Embedding:
    key: EmbeddingKey
    barcodes: np.ndarray  # object array of str
    vectors: np.ndarray   # float32 (n, d)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


class EmbeddingStore:
    def __init__(self, root: str):
        self.root = resolve_store_root(root)  # a file in the way fails here, before any write

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.root.uri!r})"

    def location(self, key: EmbeddingKey) -> Location:
        return self.root.join(*key.relpath().split("/"))

    def has(self, key: EmbeddingKey) -> bool:
        return self.location(key).exists()

    def put(self, key: EmbeddingKey, barcodes, vectors) -> Location:
        """Store vectors (n, d) for the cells `barcodes` (in that order) under `key`."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        barcodes = np.asarray(barcodes, dtype=object).astype(str)
        if vectors.ndim != 2 or vectors.shape[0] != len(barcodes) or vectors.shape[1] == 0:
            raise StoreError(key.relpath(), f"vectors of shape {vectors.shape} do not match {len(barcodes)} barcodes")
        if not np.isfinite(vectors).all():
            raise StoreError(key.relpath(), "embedding has non-finite values", field="embedding")
        n, d = vectors.shape
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d)
        meta = {"schema_version": EMBED_SCHEMA_VERSION, "dataset_hash": key.dataset_hash,
                "embedder": key.embedder, "settings": key.settings, "settings_hash": key.settings_hash,
                "dim": d, "n_cells": n}
        table = pa.table({"barcode": pa.array(barcodes, type=pa.string()), "embedding": emb})
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
        loc = self.location(key)
        loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
        target = loc if not loc.is_local else Location(loc.fs, f"{loc.path}.tmp-{uuid.uuid4().hex}", loc.uri)
        try:
            with target.fs.open_output_stream(target.path) as f:
                pq.write_table(table, f, compression="zstd", write_page_checksum=True)
            if target is not loc:
                import os

                os.replace(target.path, loc.path)
        finally:
            if target is not loc and target.exists():
                target.fs.delete_file(target.path)
        return loc

    def get(self, key: EmbeddingKey) -> Embedding:
        loc = self.location(key)
        if not loc.exists():
            raise StoreError(loc.uri, f"no embedding stored for embedder '{key.embedder}' on dataset "
                             f"{key.dataset_hash[:12]} with these settings (run `xfer embed` first)")
        try:
            with loc.fs.open_input_file(loc.path) as f:
                table = pq.read_table(f, page_checksum_verification=True)
        except (pa.ArrowException, OSError) as e:
            raise StoreError(loc.uri, f"corrupted embedding file ({type(e).__name__}: {e}); delete it and "
                             "run `xfer embed` again") from None
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise StoreError(loc.uri, "not an xfer embedding file (no key metadata)", field="metadata")
        meta = json.loads(raw)
        if meta.get("dataset_hash") != key.dataset_hash or meta.get("embedder") != key.embedder \
                or meta.get("settings_hash") != key.settings_hash:
            raise StoreError(loc.uri, "file metadata does not match its key", field="metadata")
        col = table.column("embedding").combine_chunks()
        d = col.type.list_size
        if d != meta.get("dim"):
            raise StoreError(loc.uri, f"embedding width {d} != {meta.get('dim')} in metadata", field="embedding")
        vectors = col.values.to_numpy().reshape(-1, d)
        barcodes = table.column("barcode").to_numpy().astype(object)
        return Embedding(key=key, barcodes=barcodes, vectors=vectors)

    def entries(self) -> list[dict]:
        """Every stored key's metadata (dataset hash, embedder, settings, dim, n_cells)."""
        out = []
        base = self.root.join("embeddings")
        for dh in base.listdir():
            for emb in base.join(dh).listdir():
                for fn in base.join(dh, emb).listdir():
                    if not fn.endswith(".parquet"):
                        continue
                    loc = base.join(dh, emb, fn)
                    try:
                        with loc.fs.open_input_file(loc.path) as f:
                            md = pq.read_schema(f).metadata or {}
                        out.append({**json.loads(md[META_KEY]), "uri": loc.uri})
                    except Exception:  # a corrupted entry is listed as such, not fatal
                        out.append({"dataset_hash": dh, "embedder": emb, "uri": loc.uri, "corrupted": True})
        return out

    def find(self, dataset_hash: str, embedder: str) -> list[dict]:
        """The stored entries of `embedder` on one dataset, whatever their settings; most recent first.

        Each item is the entry's key metadata (dataset_hash, embedder, settings, settings_hash, dim,
        n_cells) plus `uri` and `mtime` (POSIX seconds; None where the file system gives none).
        Unreadable entries are skipped here (`entries()` lists them as corrupted)."""
        EmbeddingKey(dataset_hash, embedder)  # validates both names (no path tricks)
        base = self.root.join("embeddings", dataset_hash, embedder)
        out = []
        for fn in base.listdir():
            if not fn.endswith(".parquet"):
                continue
            loc = base.join(fn)
            try:
                with loc.fs.open_input_file(loc.path) as f:
                    meta = json.loads((pq.read_schema(f).metadata or {})[META_KEY])
                mtime = loc.fs.get_file_info(loc.path).mtime
            except Exception:
                continue
            out.append({**meta, "uri": loc.uri, "mtime": None if mtime is None else mtime.timestamp()})
        out.sort(key=lambda e: e["mtime"] or 0.0, reverse=True)
        return out
