"""Ensemble: the concatenation of two (or more) embeddings, each block standardised.

`--source_model ensemble --ensemble_model1 geneformer-316m --ensemble_model2 scfoundation`
(or directly `--source_model geneformer-316m+scfoundation`) concatenates the members'
vectors, e.g. 1,152 + 768 = 1,920 columns. Each block is z-scored per column with the
training line's mean and standard deviation (so members on different scales weigh alike
and no line is normalised with its own statistics here; per-line normalisation stays the
model's `line_norm`). The members are usually entries that `xfer embed` stored; PCA members
are fitted on the training line. The ensemble is fitted (its statistics come from the
training line), so its store keys carry `fit_on` like PCA's.
"""

from __future__ import annotations

import numpy as np

from ..data.dataset import CellMatrix
from ..data.embed_store import EmbeddingStore
from ..errors import ConfigError
from ..standardise import mean_std
from .base import Embedder, embed_lines

STANDARDISE = "zscore-per-column-train"


def ensemble_name(members: list[str]) -> str:
    """The store / config name of an ensemble: its members joined by '+' (order matters)."""
    for m in members:
        if not m or m == "ensemble" or "+" in m:
            raise ConfigError("ensemble_model1", f"invalid ensemble member {m!r}")
    if len(members) < 2:
        raise ConfigError("ensemble_model2", "an ensemble needs two source models")
    return "+".join(members)


class EnsembleEmbedder(Embedder):
    def __init__(self, members: list[Embedder], store: EmbeddingStore | None = None):
        self.members = list(members)
        self.name = ensemble_name([m.name for m in self.members])
        self.store = store
        self._train: CellMatrix | None = None
        self.stats_: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._memo: dict[tuple[int, str], np.ndarray] = {}

    def settings(self) -> dict:
        return {"members": [{"name": m.name, "settings": m.settings()} for m in self.members],
                "standardise": STANDARDISE}

    def _member(self, i: int, ds: CellMatrix) -> np.ndarray:
        key = (i, ds.content_hash())
        if key not in self._memo:
            m = self.members[i]
            if self._train is None:  # rebuilt from a checkpoint: the members are fitted or frozen
                v = m.transform(ds)
            elif ds is self._train:
                v = embed_lines(m, ds, {}, store=self.store)["train"]
            else:
                v = embed_lines(m, self._train, {"other": ds}, store=self.store)["other"]
            self._memo[key] = np.asarray(v, dtype=np.float32)
        return self._memo[key]

    def fit(self, train: CellMatrix) -> "EnsembleEmbedder":
        self._train, self._memo = train, {}
        self.stats_ = [mean_std(self._member(i, train)) for i in range(len(self.members))]
        return self

    def is_fitted(self) -> bool:
        return self.stats_ is not None

    @classmethod
    def from_state(cls, state: dict, members: list[Embedder], store: EmbeddingStore | None) -> "EnsembleEmbedder":
        """The ensemble a checkpoint describes, around its members (already rebuilt from
        state["members"] by xfer.embed.embedder_from_state) and with its block statistics."""
        emb = cls(members, store=store)
        emb.stats_ = [(np.asarray(mu, np.float32), np.asarray(sd, np.float32))
                      for mu, sd in zip(state["block_mean"], state["block_std"])]
        return emb

    def transform(self, ds: CellMatrix) -> np.ndarray:
        if self.stats_ is None:
            raise RuntimeError("EnsembleEmbedder.transform before fit")
        blocks = [(self._member(i, ds) - mu) / sd for i, (mu, sd) in enumerate(self.stats_)]
        return np.hstack(blocks).astype(np.float32)

    def state(self) -> dict:
        out = {**super().state(), "members": [m.state() for m in self.members]}
        if self.stats_ is not None:
            out["block_mean"] = [mu for mu, _ in self.stats_]
            out["block_std"] = [sd for _, sd in self.stats_]
        return out
