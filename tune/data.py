"""Trial data: read from the Parquet stores by path/URI, prepared at most once per node.

The driver ingests the inputs into the cell store and computes the source
embeddings into the embedding store; trials receive only a small `DataSpec`
(store URI + dataset names + embedder settings), never pickled matrices. The
first trial process on a node prepares the training data (split, peak filter,
channels) and writes it to a node-local cache file under a file lock; later
trial processes on that node load the file; within a process a memo keeps it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from xfer.config import DataConfig, TrainConfig
from xfer.data.embed_store import EmbeddingStore
from xfer.data.fs import save_torch
from xfer.data.inputs import pair_cells
from xfer.data.store import CellStore
from xfer.embed import embed_lines, make_embedder
from xfer.prepare import LineInputs, TrainData, prepare_training

log = logging.getLogger(__name__)
CACHE_FORMAT = "xfer.trialdata/1"


@dataclass(frozen=True)
class DataSpec:
    store: str          # absolute path or URI of the store (shared by every node)
    src: str            # training line expression dataset (store name)
    tgt: str            # training line peaks dataset (store name)
    src_hash: str       # content hashes: a changed dataset never reuses a stale cache
    tgt_hash: str

    def to_dict(self) -> dict:
        return asdict(self)


_MEMO: dict[str, TrainData] = {}


def cache_key(spec: DataSpec, data_cfg: DataConfig, seed: int) -> str:
    text = json.dumps({"spec": spec.to_dict(), "data": asdict(data_cfg), "seed": seed}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def cache_dir() -> Path:
    d = Path(os.environ.get("XFER_NODE_CACHE", Path(tempfile.gettempdir()) / "xfer_node_cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def prepare_from_store(spec: DataSpec, cfg: TrainConfig) -> TrainData:
    """Read both datasets and the embedding from the stores and prepare the training data."""
    store = CellStore(spec.store)
    src, tgt = pair_cells(store.read(spec.src), store.read(spec.tgt))
    estore = EmbeddingStore(spec.store)
    embedder = make_embedder(cfg.data.source_model, n_components=cfg.data.n_components, store=estore, train=src)
    emb = embed_lines(embedder, src, {}, store=estore)["train"]
    data, _ = prepare_training(src, tgt, emb, cfg.data, cfg.optim.seed,
                               embedder_state={"name": embedder.name, "settings": embedder.settings()})
    return data


def load_trial_data(spec: DataSpec, cfg: TrainConfig) -> TrainData:
    """Memo -> node-local cache file -> prepare from the stores (then cache)."""
    key = cache_key(spec, cfg.data, cfg.optim.seed)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / f"{key}.pt"
    with open(cache_dir() / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                data = _load(path)
            else:
                data = prepare_from_store(spec, cfg)
                _save(data, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _MEMO[key] = data
    return data


# ----------------------------------------------------------------------------- pickle-free cache files

def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _pack(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return {"__str__": [str(x) for x in obj]}
        return _t(obj)
    if sp.issparse(obj):
        X = sp.csr_matrix(obj)
        return {"__csr__": [_t(X.indptr), _t(X.indices), _t(X.data), list(X.shape)]}
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v) for v in obj]
    return obj


def _unpack(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        if "__str__" in obj:
            return np.asarray(obj["__str__"], dtype=object)
        if "__csr__" in obj:
            indptr, indices, data, shape = obj["__csr__"]
            return sp.csr_matrix((data.numpy(), indices.numpy(), indptr.numpy()), shape=tuple(shape))
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    return obj


def _save(data: TrainData, path: Path) -> None:
    line = data.line
    blob = {"format": CACHE_FORMAT,
            "line": {"name": line.name, "barcodes": line.barcodes, "emb": line.emb, "peaks": line.peaks,
                     "labels": line.labels},
            "train_idx": data.train_idx, "val_idx": data.val_idx, "class_prior": data.class_prior,
            "line_stats": {k: list(v) for k, v in data.line_stats.items()}, "preprocess": data.preprocess}
    save_torch(_pack(blob), path)


def _load(path: Path) -> TrainData:
    blob = _unpack(torch.load(path, weights_only=True))
    if blob.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a trial-data cache file")
    ln = blob["line"]
    line = LineInputs(name=ln["name"], barcodes=ln["barcodes"], emb=ln["emb"], peaks=ln["peaks"], labels=ln["labels"])
    return TrainData(line=line, train_idx=blob["train_idx"], val_idx=blob["val_idx"],
                     class_prior=blob["class_prior"],
                     line_stats={k: tuple(v) for k, v in blob["line_stats"].items()},
                     preprocess=blob["preprocess"])
