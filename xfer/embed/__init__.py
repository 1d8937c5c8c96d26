"""Cell embedders behind one interface; results cached in the embedding store.

    pca                      log-normalised expression -> truncated SVD fitted on the training line
    geneformer               any local Geneformer-style BERT checkpoint (--model_path + dictionaries)
    geneformer-316m / -104m / -10m   the same, with the checkpoint's shape checked against the preset
    scfoundation             imported from scFoundation's get_embedding.py output, or run through it
    ensemble (A+B)           concatenation of two embeddings, each block standardised

Foundation models run once, in `xfer embed`; `xfer train` and sweeps then read their
entries from the store by source-model name (`StoredEmbedder`).
"""

from __future__ import annotations

from .base import Embedder, embed_lines, predictor_state
from .pca import PCAEmbedder

__all__ = ["Embedder", "PCAEmbedder", "embed_lines", "embedder_from_state", "make_embedder", "predictor_state",
           "resolve_source_model", "SOURCE_MODELS"]

SOURCE_MODELS = ("pca", "geneformer", "geneformer-316m", "geneformer-104m", "geneformer-10m", "scfoundation",
                 "ensemble")

# keyword settings that name a live model (as opposed to reading the store), per family
_LIVE_KEYS = {"geneformer": ("model_path",), "scfoundation": ("scfoundation_npy", "scfoundation_dir")}


def resolve_source_model(name: str, model1: str | None = None, model2: str | None = None) -> str:
    """The canonical source-model name: 'ensemble' + its two members becomes 'A+B'."""
    from ..errors import ConfigError
    from .ensemble import ensemble_name

    name = (name or "").strip()
    if name.lower() == "ensemble":
        if not model1 or not model2:
            raise ConfigError("ensemble_model1", "--source_model ensemble needs --ensemble_model1 and "
                              "--ensemble_model2 (or write --source_model MODEL1+MODEL2)")
        return ensemble_name([model1.strip().lower(), model2.strip().lower()])
    if "+" in name:
        return ensemble_name([m.strip().lower() for m in name.split("+")])
    return name.lower() if name.lower() in SOURCE_MODELS else name


def make_embedder(name: str, *, store=None, train=None, **settings) -> Embedder:
    """An embedder by source-model name.

    store / train: the embedding store and the training line's dataset; foundation models
    named without their model files (no --model_path / --scfoundation_npy / --scfoundation_dir)
    read what `xfer embed` stored for the training line. Other keywords are the `xfer embed`
    flags (model_path, token_dictionary_file, layer, pooling, ..., n_components)."""
    from ..errors import ConfigError
    from .ensemble import EnsembleEmbedder
    from .geneformer import NAMES as GENEFORMER_NAMES
    from .stored import StoredEmbedder, family

    name = resolve_source_model(name, settings.get("ensemble_model1"), settings.get("ensemble_model2"))
    if name == "pca":
        n = settings.get("n_components")
        return PCAEmbedder(n_components=int(64 if n is None else n))
    if "+" in name:
        members = name.split("+")
        fams = [family(m) for m in members]
        for f in set(fams):
            if fams.count(f) > 1 and any(settings.get(k) for k in _LIVE_KEYS.get(f, ())):
                raise ConfigError("source_model", f"two {f} members in '{name}' but one set of model flags: "
                                  "embed each member with its own `xfer embed` call first")
        inner = {k: v for k, v in settings.items() if k not in ("ensemble_model1", "ensemble_model2")}
        return EnsembleEmbedder([make_embedder(m, store=store, train=train, **inner) for m in members], store=store)
    if name not in GENEFORMER_NAMES and name != "scfoundation":
        raise ConfigError("source_model", f"unknown source model '{name}' (available: {', '.join(SOURCE_MODELS)}, "
                          "or MODEL1+MODEL2)")
    if any(settings.get(k) for k in _LIVE_KEYS[family(name)]):
        if name == "scfoundation":
            from .scfoundation import scfoundation_from_settings
            return scfoundation_from_settings(**settings)
        from .geneformer import geneformer_from_settings
        return geneformer_from_settings(name, **settings)
    if store is None:
        raise ConfigError("source_model", f"'{name}' is read from the embedding store (computed once by `xfer embed`); "
                          "pass store= or give the model files")
    return StoredEmbedder(name, store, train)


def embedder_from_state(state: dict, store=None, argv: list[str] | None = None) -> Embedder:
    """The embedder a checkpoint describes (`Embedder.state()`): PCA from its components; a
    foundation model reads the embedding store (entries written by `xfer embed`) with the
    settings it was trained with; an ensemble rebuilds its members and block statistics.
    `argv`: the command's data flags, for the `xfer embed` command a missing entry names."""
    from ..errors import ConfigError
    from .ensemble import EnsembleEmbedder
    from .stored import StoredEmbedder

    name = state.get("name")
    if name == "pca":
        if "components" not in state:
            raise ConfigError("source_model", "the checkpoint's PCA embedder has no components")
        return PCAEmbedder.from_state(state)
    if isinstance(name, str) and "+" in name:
        members = [embedder_from_state(m, store, argv) for m in state["members"]]
        return EnsembleEmbedder.from_state(state, members, store)
    if not isinstance(name, str) or "settings" not in state:
        raise ConfigError("source_model", f"the checkpoint names no usable expression embedder ({state!r:.80})")
    if store is None:
        raise ConfigError("source_model", f"'{name}' embeddings are read from the embedding store: give --store")
    return StoredEmbedder(name, store, settings=state["settings"], argv=argv)
