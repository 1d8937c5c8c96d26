"""Cell embedders behind one interface; results cached in the embedding store."""

from .base import Embedder, embed_lines
from .pca import PCAEmbedder

__all__ = ["Embedder", "PCAEmbedder", "embed_lines", "make_embedder"]


def make_embedder(name: str, **settings) -> Embedder:
    from ..errors import ConfigError

    if name == "pca":
        return PCAEmbedder(n_components=int(settings.get("n_components", 64)))
    raise ConfigError("source_model", f"unknown source model '{name}' (available here: pca)")
