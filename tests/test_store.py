"""Parquet cell store and embedding store: round trips, atomicity, corruption, URIs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from xfer.data.embed_store import EmbeddingKey, EmbeddingStore
from xfer.data.store import SCHEMA_VERSION, CellStore
from xfer.errors import StoreError


def test_round_trip_is_exact_and_sparse(tmp_path, peak_ds):
    store = CellStore(str(tmp_path / "s"))
    man = store.write(peak_ds)
    assert man.schema_version == SCHEMA_VERSION and man.n_cells == peak_ds.n_cells
    assert man.content_hash == peak_ds.content_hash()
    back = store.read("peak")
    assert sp.isspmatrix_csr(back.X) and back.X.dtype == np.float32
    assert (back.X != peak_ds.X).nnz == 0
    assert list(back.barcodes) == list(peak_ds.barcodes) and list(back.features) == list(peak_ds.features)
    np.testing.assert_array_equal(back.labels, peak_ds.labels)
    assert back.content_hash() == man.content_hash
    assert store.names() == ["peak"]


def test_file_uri_and_feature_ids(tmp_path, gex_ds):
    from dataclasses import replace
    ds = replace(gex_ds, feature_ids=np.array([f"ENSG{i}" for i in range(gex_ds.n_features)], dtype=object),
                 labels=None)
    store = CellStore(f"file://{tmp_path}/uri_store")
    store.write(ds)
    back = CellStore(f"file://{tmp_path}/uri_store").read("gex")
    assert list(back.feature_ids) == list(ds.feature_ids) and back.labels is None
    assert os.path.exists(tmp_path / "uri_store" / "datasets" / "gex" / "manifest.json")


def test_same_content_is_noop_and_different_needs_overwrite(tmp_path, gex_ds, peak_ds):
    store = CellStore(str(tmp_path))
    store.write(gex_ds, "d")
    store.write(gex_ds, "d")  # same content: fine
    with pytest.raises(StoreError, match="different dataset named 'd' already exists"):
        store.write(peak_ds, "d")
    store.write(peak_ds, "d", overwrite=True)
    assert store.read("d").modality == "peak"
    assert [n for n in os.listdir(tmp_path / "datasets")] == ["d"]  # no temporary leftovers


def test_failed_write_leaves_nothing(tmp_path, gex_ds, monkeypatch):
    store = CellStore(str(tmp_path))
    import xfer.data.store as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "_features_table", boom)
    with pytest.raises(OSError):
        store.write(gex_ds, "x")
    assert os.listdir(tmp_path / "datasets") == []


def test_error_missing_manifest(tmp_path, gex_ds):
    store = CellStore(str(tmp_path))
    store.write(gex_ds, "g")
    os.remove(tmp_path / "datasets" / "g" / "manifest.json")
    with pytest.raises(StoreError, match=r"datasets/g/manifest\.json: missing manifest"):
        store.read("g")


def test_error_corrupted_parquet(tmp_path, gex_ds):
    store = CellStore(str(tmp_path))
    store.write(gex_ds, "g")
    p = tmp_path / "datasets" / "g" / "cells.parquet"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 40] = b"\x00" * 40
    p.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"cells\.parquet: corrupted Parquet file"):
        store.read("g")


def test_error_truncated_parquet(tmp_path, gex_ds):
    store = CellStore(str(tmp_path))
    store.write(gex_ds, "g")
    p = tmp_path / "datasets" / "g" / "features.parquet"
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(StoreError, match=r"features\.parquet: corrupted Parquet file"):
        store.read("g")


def test_error_unknown_dataset_and_schema(tmp_path, gex_ds):
    store = CellStore(str(tmp_path))
    store.write(gex_ds, "g")
    with pytest.raises(StoreError, match=r"no dataset 'nope' in this store \(datasets: g\)"):
        store.read("nope")
    m = tmp_path / "datasets" / "g" / "manifest.json"
    d = json.loads(m.read_text())
    d["schema_version"] = 99
    m.write_text(json.dumps(d))
    with pytest.raises(StoreError, match=r"\[schema_version\]: schema version 99 is not supported"):
        store.read("g")


@pytest.mark.parametrize("make", [CellStore, EmbeddingStore])
def test_error_root_is_a_file(tmp_path, make):
    """A store root that is a regular file (or lies under one) is refused when the store is
    opened, with the file named and the file untouched."""
    f = tmp_path / "file"
    f.write_bytes(b"not a store")
    for root, msg in ((f, "is a file, not a store directory"), (f / "a" / "b", "is a file, so the store directory")):
        for given in (str(root), f"file://{root}"):
            with pytest.raises(StoreError, match=msg) as e:
                make(given)
            assert e.value.path == str(f)
    assert f.read_bytes() == b"not a store" and os.listdir(tmp_path) == ["file"]
    assert make(str(tmp_path / "new")).root.path == str(tmp_path / "new")  # a missing root is fine (made on write)
    assert not (tmp_path / "new").exists()


def test_error_invalid_name(tmp_path, gex_ds):
    with pytest.raises(StoreError, match="invalid dataset name"):
        CellStore(str(tmp_path)).write(gex_ds, "../evil")


def test_verify_detects_tampering(tmp_path, gex_ds):
    store = CellStore(str(tmp_path))
    store.write(gex_ds, "g")
    m = tmp_path / "datasets" / "g" / "manifest.json"
    d = json.loads(m.read_text())
    d["content_hash"] = "0" * 32
    m.write_text(json.dumps(d))
    store.read("g")  # not verified by default
    with pytest.raises(StoreError, match="content hash does not match"):
        store.read("g", verify=True)


# ----------------------------------------------------------------------------- embedding store

def test_embedding_round_trip(tmp_path):
    es = EmbeddingStore(str(tmp_path))
    key = EmbeddingKey("ab" * 16, "pca", {"n_components": 8, "fit_on": "x"})
    vec = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    bc = [f"c{i}" for i in range(5)]
    assert not es.has(key)
    loc = es.put(key, bc, vec)
    assert es.has(key) and loc.path.endswith(f"pca/{key.settings_hash}.parquet")
    e = es.get(key)
    np.testing.assert_array_equal(e.vectors, vec)
    assert list(e.barcodes) == bc and e.dim == 8
    # different settings -> different key
    assert not es.has(EmbeddingKey("ab" * 16, "pca", {"n_components": 16}))
    meta = json.loads(pq.read_schema(loc.path).metadata[b"xfer.embedding"])
    assert meta["settings"] == {"n_components": 8, "fit_on": "x"} and meta["dim"] == 8
    assert es.entries()[0]["embedder"] == "pca"


def test_embedding_missing_and_corrupted(tmp_path):
    es = EmbeddingStore(f"file://{tmp_path}")
    key = EmbeddingKey("cd" * 16, "geneformer-316m", {"layer": -2})
    with pytest.raises(StoreError, match="run `xfer embed` first"):
        es.get(key)
    loc = es.put(key, ["a", "b"], np.ones((2, 3)))
    with open(loc.path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff" * 20)
    with pytest.raises(StoreError, match="corrupted embedding file"):
        es.get(key)


def _writer(root, seed):
    es = EmbeddingStore(root)
    key = EmbeddingKey("ef" * 16, "pca", {"k": 1})
    vec = np.full((2000, 64), float(seed), dtype=np.float32)
    for _ in range(5):
        es.put(key, [f"c{i}" for i in range(2000)], vec)


def test_concurrent_writers_leave_one_valid_file(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    es = EmbeddingStore(str(tmp_path))
    key = EmbeddingKey("ef" * 16, "pca", {"k": 1})
    d = os.path.dirname(es.location(key).path)
    assert os.listdir(d) == [os.path.basename(es.location(key).path)]  # no temporaries left
    e = es.get(key)
    assert e.vectors.shape == (2000, 64)
    assert len(np.unique(e.vectors)) == 1  # one writer's whole file, not a mixture
