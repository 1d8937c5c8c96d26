"""Self-describing checkpoints: one file rebuilds the whole predictor.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads
with `torch.load(weights_only=True)` (no pickled objects, nothing executed):

    format        FORMAT; another version is refused with a clear message
    config        the resolved TrainConfig, nested (every field)
    dims          emb_dim, n_peaks, n_domains: the network's shape
    preprocess    peaks:    the fitted PeakPreprocessor (kept peaks, IDF, column means, LSI,
                            coverage bins and their PCA)
                  embedder: the expression embedder (PCA: genes and components; a
                            foundation model: its name and the settings of its store entries)
    model         the weights, each with a leading member axis of size 1 (the model is a
                  population of one, xfer.model); LineNorm buffers hold the training line's statistics
    epoch         the epoch of these weights
    best_epoch, best_metric, metric_name
    train_state   only in training checkpoints: what resuming needs (optimiser, the best
                  epoch's weights when they are not `model`, patience counter, RNG states,
                  history); `export_best` drops it and keeps the best epoch's weights

A seed ensemble (`xfer train --set ensemble=K`) is {"format": FORMAT, "ensemble":
[member, ...]}, each member a whole predictor as above; `xfer predict` averages them.

`xfer predict` (xfer.predict) and `load_checkpoint` read them; `fit` writes them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch

from .config import TrainConfig
from .data.fs import save_torch
from .errors import StoreError

FORMAT = "xfer.cdann/3"   # 3: every tensor of the model has a leading member axis (a population of one)


# ----------------------------------------------------------------------------- nested data

def tree_map(fn: Callable[[Any], Any], obj, is_leaf: Callable[[Any], bool] | None = None):
    """Apply `fn` to every leaf of nested dicts / lists / tuples (containers are rebuilt;
    `is_leaf` may stop the descent at a dict or list that is itself a value)."""
    if is_leaf is not None and is_leaf(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v, is_leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v, is_leaf) for v in obj)
    return fn(obj)


def cpu_copy(obj):
    """A detached CPU copy of a (nested) state: later training steps must not change a
    checkpoint that was already handed out."""
    return tree_map(lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v),
                    obj)


def to_tensors(obj):
    """numpy arrays -> tensors (what weights_only loading accepts)."""
    return tree_map(lambda v: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v, obj)


def to_numpy(obj):
    """tensors -> numpy arrays (the preprocessing state as the featurisers use it)."""
    return tree_map(lambda v: v.numpy() if isinstance(v, torch.Tensor) else v, obj)


# ----------------------------------------------------------------------------- files

def save_checkpoint(ckpt: dict, path) -> None:
    save_torch(ckpt, path)


def ensemble_checkpoint(members: list[dict]) -> dict:
    return {"format": FORMAT, "ensemble": list(members)}


def export_best(ckpt: dict) -> dict:
    """The predictor of a training checkpoint: its best epoch's weights, no resume state."""
    ts = ckpt.get("train_state") or {}
    best = ts.get("best_model")
    out = {k: v for k, v in ckpt.items() if k != "train_state"}
    if best is not None:
        out["model"] = best
    out["epoch"] = int(ckpt["best_epoch"]) if ckpt.get("best_epoch") else int(ckpt["epoch"])
    return out


def read_checkpoint(path, device="cpu") -> dict:
    """torch.load(weights_only=True) of an xfer checkpoint of this format version."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise StoreError(path, "checkpoint file not found") from None
    except Exception as e:
        raise StoreError(path, f"not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    check_format(ckpt, path)
    return ckpt


def check_format(ckpt, path) -> None:
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("xfer.cdann/"):
        raise StoreError(path, "not an xfer checkpoint (no xfer format tag)", field="format")
    if fmt != FORMAT:
        raise StoreError(path, f"checkpoint format '{fmt}', but this xfer reads '{FORMAT}'; retrain the model with "
                         "this version (xfer train or xfer tune)", field="format")
    if "ensemble" in ckpt:
        if not isinstance(ckpt["ensemble"], list) or not ckpt["ensemble"]:
            raise StoreError(path, "an ensemble checkpoint without members", field="ensemble")
        for m in ckpt["ensemble"]:
            check_format(m, path)
        return
    missing = [k for k in ("config", "dims", "preprocess", "model") if k not in ckpt]
    if missing:
        raise StoreError(path, f"incomplete checkpoint: no {', '.join(missing)}", field=missing[0])


def build_model(ckpt: dict, device="cpu"):
    """The network a checkpoint describes, with its weights, in eval mode."""
    from .model import build_model as build

    cfg = TrainConfig.from_dict(ckpt["config"], source="checkpoint", allow_inert=True)
    dims = ckpt["dims"]
    model = build(dims["emb_dim"], dims["n_peaks"], cfg.model, use_cdann=cfg.loss.use_cdann, seed=cfg.optim.seed,
                  n_domains=dims.get("n_domains", 2))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def load_checkpoint(path, device="cpu"):
    """(model, config, checkpoint dict) of a single-model checkpoint file (an ensemble's
    members: `xfer.predict.Predictor.load`)."""
    ckpt = read_checkpoint(path, device)
    if "ensemble" in ckpt:
        raise StoreError(path, f"a checkpoint of an ensemble of {len(ckpt['ensemble'])} models; load it with "
                         "xfer.predict.Predictor.load (or use xfer predict)", field="ensemble")
    model, cfg = build_model(ckpt, device)
    return model, cfg, ckpt
