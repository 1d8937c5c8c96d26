"""Trial data: read from the Parquet stores by path/URI, prepared at most once per node.

The driver ingests the inputs into the cell store and computes the source
embeddings into the embedding store; trials receive only a small `DataSpec`
(store URI + dataset names + embedder settings), never pickled matrices. The
first trial process on a node prepares the training data (split, peak filter,
channels) and writes it to a node-local cache file under a file lock; later
trial processes on that node load the file; within a process a memo keeps it.

Transductive trials: when the sweep is given the test line (`test`, `sup_peak`),
a trial prepares exactly what `xfer train` prepares (`xfer.pipeline.prepare_member`
and `training_data`): the test line's unlabelled peaks as the adaptation domain and
its expression for the selection objective. The test line's labels are dropped the
moment its datasets are read (the driver also stores file inputs without them), so no
trial can see one.
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

from xfer.checkpoint import tree_map
from xfer.config import DataConfig, TrainConfig
from xfer.data.embed_store import EmbeddingStore
from xfer.data.fs import save_torch
from xfer.data.inputs import pair_cells
from xfer.data.store import CellStore
from xfer.prepare import LineInputs, TrainData

log = logging.getLogger(__name__)
CACHE_FORMAT = "xfer.trialdata/3"


@dataclass(frozen=True)
class DataSpec:
    store: str          # absolute path or URI of the store (shared by every node)
    src: str            # training line expression dataset (store name)
    tgt: str            # training line peaks dataset (store name)
    src_hash: str       # content hashes: a changed dataset never reuses a stale cache
    tgt_hash: str
    test: str = ""      # test line expression (store name; "" = not given), read without labels
    sup_peak: str = ""  # test line peaks (store name; "" = not given), read without labels
    test_hash: str = ""
    sup_peak_hash: str = ""

    @property
    def transductive(self) -> bool:
        """Trials adapt to the test line (its peaks are given)."""
        return bool(self.sup_peak)

    def to_dict(self) -> dict:
        return asdict(self)


_MEMO: dict[str, TrainData] = {}


def cache_key(spec: DataSpec, data_cfg: DataConfig, seed: int) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "spec": spec.to_dict(), "data": asdict(data_cfg), "seed": seed},
                      sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def cache_dir() -> Path:
    d = Path(os.environ.get("XFER_NODE_CACHE", Path(tempfile.gettempdir()) / "xfer_node_cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_inputs(spec: DataSpec) -> dict:
    """The sweep's datasets from the store, paired; the test line's without labels."""
    store = CellStore(spec.store)
    inputs = dict(zip(("src", "tgt"), pair_cells(store.read(spec.src), store.read(spec.tgt))))
    for role in ("test", "sup_peak"):
        name = getattr(spec, role)
        if name:
            inputs[role] = store.read(name).without_labels()
    if "test" in inputs and "sup_peak" in inputs:
        inputs["test"], inputs["sup_peak"] = pair_cells(inputs["test"], inputs["sup_peak"])
    return inputs


def prepare_from_store(spec: DataSpec, cfg: TrainConfig) -> TrainData:
    """Read the datasets and embeddings from the stores and prepare what `xfer train` would."""
    from xfer.pipeline import embed_inputs, prepare_member, training_data

    loaded = embed_inputs(read_inputs(spec), cfg, EmbeddingStore(spec.store))
    return training_data(prepare_member(loaded, cfg))


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

def _pack_leaf(v):
    if isinstance(v, np.ndarray):
        return {"__str__": [str(x) for x in v]} if v.dtype == object else torch.from_numpy(
            np.ascontiguousarray(v) if v.flags.writeable else v.copy(order="C"))
    if sp.issparse(v):
        X = sp.csr_matrix(v)
        return {"__csr__": [torch.from_numpy(X.indptr), torch.from_numpy(X.indices), torch.from_numpy(X.data),
                            list(X.shape)]}
    return v


def _unpack_leaf(v):
    if isinstance(v, torch.Tensor):
        return v.numpy()
    if isinstance(v, dict) and "__str__" in v:
        return np.asarray(v["__str__"], dtype=object)
    if isinstance(v, dict) and "__csr__" in v:
        indptr, indices, data, shape = v["__csr__"]
        return sp.csr_matrix((data.numpy(), indices.numpy(), indptr.numpy()), shape=tuple(shape))
    return v


def _pack(obj):
    """numpy / CSR / string arrays -> tensors and plain lists (weights_only loading)."""
    return tree_map(_pack_leaf, obj, is_leaf=lambda v: isinstance(v, np.ndarray) or sp.issparse(v))


def _unpack(obj):
    return tree_map(_unpack_leaf, obj, is_leaf=lambda v: isinstance(v, dict) and ("__str__" in v or "__csr__" in v))


def _line(line: LineInputs | None) -> dict | None:
    if line is None:
        return None
    return {"name": line.name, "barcodes": line.barcodes, "emb": line.emb, "peaks": line.peaks, "labels": line.labels}


def _unline(d: dict | None) -> LineInputs | None:
    return None if d is None else LineInputs(name=d["name"], barcodes=d["barcodes"], emb=d["emb"], peaks=d["peaks"],
                                             labels=d["labels"])


def _save(data: TrainData, path: Path) -> None:
    blob = {"format": CACHE_FORMAT, "line": _line(data.line), "adapt": _line(data.adapt),
            "train_idx": data.train_idx, "val_idx": data.val_idx, "class_prior": data.class_prior,
            "line_stats": {k: list(v) for k, v in data.line_stats.items()}, "preprocess": data.preprocess}
    save_torch(_pack(blob), path)


def _load(path: Path) -> TrainData:
    blob = _unpack(torch.load(path, weights_only=True))
    if blob.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a trial-data cache file")
    return TrainData(line=_unline(blob["line"]), train_idx=blob["train_idx"], val_idx=blob["val_idx"],
                     class_prior=blob["class_prior"],
                     line_stats={k: tuple(v) for k, v in blob["line_stats"].items()},
                     preprocess=blob["preprocess"], adapt=_unline(blob["adapt"]))
