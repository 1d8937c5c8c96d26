"""Embeddings computed earlier by `xfer embed`, read back from the embedding store by source-model name.

`xfer train --source_model geneformer-316m` (and sweeps) get a `StoredEmbedder` from
`make_embedder` when no --model_path is given: it looks up the store entries of that
embedder name on the training line's dataset (`EmbeddingStore.find`), takes their settings
(the only ones, or the most recent, logged, when several were written), and reads every
line's vectors under that key. A missing entry is a StoreError that prints the `xfer embed`
command to run, with the data flags of the current command.

`embed_datasets` is what `xfer embed` runs: per dataset, a cache hit when the store has the
key, else compute (or import) and write; keys are exactly those `embed_lines` uses.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..data.dataset import CellMatrix
from ..data.embed_store import EmbeddingKey, EmbeddingStore
from ..errors import StoreError, XferError
from .base import Embedder, _needs_fit

log = logging.getLogger(__name__)

# flags that tell `xfer embed` where the model is, per source-model family (for messages)
MODEL_FLAGS = {
    "geneformer": "--model_path DIR --token_dictionary_file FILE --gene_median_file FILE --gene_mapping_file FILE",
    "scfoundation": "--scfoundation_npy EMB.npy --scfoundation_barcodes BARCODES.txt "
                    "(or --scfoundation_dir SCFOUNDATION_CODE_DIR)",
}


def family(name: str) -> str:
    return "geneformer" if name.startswith("geneformer") else name


def _data_flag_names() -> set[str]:
    from ..data.inputs import ROLES

    names = {"--label_column", "--orient", "--store", "--gex_modality", "--peak_modality"}
    for r in ROLES.values():
        names |= {r.flag, r.label_flag}
    return names


def data_flags_from_argv(argv: list[str] | None = None) -> list[str]:
    """The data flags (and their values) of the running command line, e.g. of `xfer train`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names, out, i = _data_flag_names(), [], 0
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] in names:
            if "=" in a:
                out.append(a)
            elif i + 1 < len(argv):
                out += [a, argv[i + 1]]
                i += 1
        i += 1
    return out


def embed_command(name: str, argv: list[str] | None = None) -> str:
    """The `xfer embed` command that writes `name`'s entries for the datasets of this command line."""
    data = data_flags_from_argv(argv)
    parts = ["xfer embed", "--source_model", shlex.quote(name)]
    if family(name) in MODEL_FLAGS:
        parts.append(MODEL_FLAGS[family(name)])
    parts.append(shlex.join(data) if data else "<the data flags of your xfer train command>")
    return " ".join(parts)


class StoredEmbedder(Embedder):
    """Reads the embeddings `xfer embed` wrote for `name` (frozen: no fit).

    The settings are those of the entry on the training line (`train`); without `train`,
    of the most recent entry of `name` anywhere in the store."""

    def __init__(self, name: str, store: EmbeddingStore, train: CellMatrix | None = None,
                 argv: list[str] | None = None, settings: dict | None = None):
        EmbeddingKey("0" * 32, name)  # validates the name
        self.name = name
        self.store = store
        self.train = train
        self.argv = argv
        self._settings: dict | None = dict(settings) if settings is not None else None  # fixed (a checkpoint's)

    def settings(self) -> dict:
        if self._settings is None:
            self._settings = self._resolve()
        return dict(self._settings)

    def _resolve(self) -> dict:
        if self.train is not None:
            th = self.train.content_hash()
            cands = self.store.find(th, self.name)
            where = f"the training line {self.train.name or self.train.source} (dataset {th[:12]})"
        else:
            hashes = sorted({e["dataset_hash"] for e in self.store.entries()
                             if e.get("embedder") == self.name and not e.get("corrupted")})
            cands = sorted((e for dh in hashes for e in self.store.find(dh, self.name)),
                           key=lambda e: e["mtime"] or 0.0, reverse=True)
            where = "any dataset"
        if not cands:
            raise StoreError(self.store.root.uri, f"no '{self.name}' embedding of {where} in this store; compute it "
                             f"once with: {embed_command(self.name, self.argv)}", field=self.name)
        distinct = {e["settings_hash"]: e for e in reversed(cands)}  # keeps the most recent per settings
        chosen = cands[0]
        if len(distinct) > 1:
            when = (datetime.fromtimestamp(chosen["mtime"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                    if chosen.get("mtime") else "?")
            log.info("%d '%s' embeddings of %s with different settings in the store; using the most recent "
                     "(settings %s, written %s): %s", len(distinct), self.name, where, chosen["settings_hash"], when,
                     _short(chosen["settings"]))
        return chosen["settings"]

    def transform(self, ds: CellMatrix) -> np.ndarray:
        key = EmbeddingKey(ds.content_hash(), self.name, self.settings())
        if self.store.has(key):
            e = self.store.get(key)
            if list(e.barcodes) == list(ds.barcodes):
                return e.vectors
        others = self.store.find(key.dataset_hash, self.name)
        extra = (f" ({len(others)} stored with other settings: embed both lines with the same model, "
                 "dictionaries and flags)" if others else "")
        raise StoreError(self.store.root.uri, f"no '{self.name}' embedding of {ds.name or ds.source} (dataset "
                         f"{key.dataset_hash[:12]}) with the settings of the training line's entry{extra}; compute it "
                         f"with: {embed_command(self.name, self.argv)}", field=self.name)


def _short(settings: dict) -> str:
    keep = {k: v for k, v in settings.items() if k in ("layer", "pooling", "version", "pool", "model")}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "-"


# ----------------------------------------------------------------------------- xfer embed

@dataclass(frozen=True)
class EmbedResult:
    role: str
    dataset: str
    status: str      # 'hit' | 'wrote'
    n_cells: int
    dim: int
    seconds: float
    uri: str
    key: EmbeddingKey


def embed_datasets(embedder: Embedder, datasets: dict[str, CellMatrix], store: EmbeddingStore, *,
                   train_role: str = "src", overwrite: bool = False) -> list[EmbedResult]:
    """Embed each dataset into the store (a hit when the key is already there, unless overwrite).

    Keys are those of `embed_lines`: (content hash, embedder name, settings), with
    `fit_on` = the training line's hash for embedders that are fitted (PCA, ensemble)."""
    fitted = _needs_fit(embedder)
    if fitted and train_role not in datasets:
        raise XferError(f"embed: '{embedder.name}' is fitted on the training line: give --src_csv")
    settings = embedder.settings()
    if fitted:
        settings = {**settings, "fit_on": datasets[train_role].content_hash()}
    results: list[EmbedResult] = []
    pending: dict[str, tuple[CellMatrix, EmbeddingKey]] = {}
    for role, ds in datasets.items():
        key = EmbeddingKey(ds.content_hash(), embedder.name, settings)
        if not overwrite and store.has(key):
            t0 = time.perf_counter()
            e = store.get(key)
            if list(e.barcodes) == list(ds.barcodes):
                results.append(EmbedResult(role, ds.name, "hit", len(e.barcodes), e.dim, time.perf_counter() - t0,
                                           store.location(key).uri, key))
                continue
        pending[role] = (ds, key)
    if pending:
        if fitted:
            embedder.fit(datasets[train_role])
        for role, (ds, key) in pending.items():
            t0 = time.perf_counter()
            vec = np.asarray(embedder.transform(ds), dtype=np.float32)
            if vec.ndim != 2 or vec.shape[0] != ds.n_cells:
                raise XferError(f"embed: {embedder.name} returned shape {vec.shape} for {ds.n_cells} cells")
            loc = store.put(key, ds.barcodes, vec)
            results.append(EmbedResult(role, ds.name, "wrote", ds.n_cells, vec.shape[1], time.perf_counter() - t0,
                                       loc.uri, key))
    order = list(datasets)
    return sorted(results, key=lambda r: order.index(r.role))
