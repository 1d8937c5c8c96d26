"""The embedder interface and store-backed caching.

An embedder turns a line's expression matrix into per-cell vectors. Some are
fitted on the training line first (PCA); foundation models are frozen and
only transform. Results go to the content-addressed embedding store, keyed by
(dataset content hash, embedder name, settings) - settings include what the
embedder was fitted on - so every trial and every later call reuses them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np

from ..data.dataset import CellMatrix
from ..data.embed_store import EmbeddingKey, EmbeddingStore

log = logging.getLogger(__name__)


class Embedder(ABC):
    name: str = "base"

    def fit(self, train: CellMatrix) -> "Embedder":
        """Fit on the training line's expression (no labels). Frozen models: no-op."""
        return self

    @abstractmethod
    def transform(self, ds: CellMatrix) -> np.ndarray:
        """(n_cells, dim) float32, rows in the order of ds.barcodes."""

    @abstractmethod
    def settings(self) -> dict:
        """Everything that changes the output (JSON-serialisable); part of the store key."""

    def is_fitted(self) -> bool:
        """Whether `transform` can run (frozen models: always)."""
        return True

    def state(self) -> dict:
        """What a checkpoint needs to apply the embedder to new cells (tensors / lists / numbers):
        `embedder_from_state` rebuilds it."""
        return {"name": self.name, "settings": self.settings()}


def predictor_state(embedder: Embedder, train: CellMatrix) -> dict:
    """The embedder's checkpoint state, fitting it on `train` first when the embeddings came
    from the store cache and it was never fitted in this process (the fit is seeded: the
    same components that made the cached vectors)."""
    if _needs_fit(embedder) and not embedder.is_fitted():
        embedder.fit(train)
    return embedder.state()


def embed_lines(embedder: Embedder, train: CellMatrix, others: dict[str, CellMatrix],
                store: EmbeddingStore | None = None) -> dict[str, np.ndarray]:
    """Fit on `train` if needed and embed train + others, through the store cache.

    Returns {"train": array, **{name: array}}; each array's rows follow its dataset's barcodes.
    """
    datasets = {"train": train, **others}
    keys = {}
    out: dict[str, np.ndarray] = {}
    settings = None
    for role, ds in datasets.items():
        if store is None:
            continue
        if settings is None:
            settings = {**embedder.settings(), "fit_on": train.content_hash()} if _needs_fit(embedder) \
                else embedder.settings()
        keys[role] = EmbeddingKey(ds.content_hash(), embedder.name, settings)
        if store.has(keys[role]):
            e = store.get(keys[role])
            if list(e.barcodes) == list(ds.barcodes):
                out[role] = e.vectors
                log.info("embedding cache hit: %s on %s", embedder.name, ds.name)
    if len(out) == len(datasets):
        return out
    embedder.fit(train)
    for role, ds in datasets.items():
        if role in out:
            continue
        vec = embedder.transform(ds).astype(np.float32)
        out[role] = vec
        if store is not None:
            store.put(keys[role], ds.barcodes, vec)
    return out


def _needs_fit(embedder: Embedder) -> bool:
    return type(embedder).fit is not Embedder.fit
