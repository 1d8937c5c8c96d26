"""`xfer embed`: compute (or import) expression embeddings into the embedding store, once.

It reads the same data flags as `xfer train` (all given roles, paired the same way), embeds
the expression roles (--src_csv, --test_csv) and writes each under its content-addressed
key; a second call with the same inputs is a cache hit. `xfer train --source_model NAME`
and sweeps then read these entries (give them the same data flags, so that the datasets,
and so the keys, are the same).
"""

from __future__ import annotations

import argparse
import time

from ..errors import XferError

GEX_ROLES = ("src", "test")
MODEL_KEYS = ("model_path", "token_dictionary_file", "gene_median_file", "gene_mapping_file", "model_version",
              "layer", "pooling", "batch_tokens", "batch_size", "device", "attention", "n_components",
              "scfoundation_npy", "scfoundation_barcodes", "scfoundation_dir", "scfoundation_pool",
              "scfoundation_python", "ensemble_model1", "ensemble_model2")


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags of `xfer embed` (the data flags come from add_data_arguments)."""
    g = parser.add_argument_group("source model")
    g.add_argument("--source_model", required=True,
                   help="pca | geneformer | geneformer-316m | geneformer-104m | geneformer-10m | scfoundation | "
                        "ensemble (with --ensemble_model1/2) or MODEL1+MODEL2")
    g.add_argument("--n_components", type=int, default=64, help="pca: embedding width (default 64)")
    g.add_argument("--overwrite", action="store_true", help="compute again and replace entries already stored")

    g = parser.add_argument_group("Geneformer (local files only; nothing is downloaded)")
    g.add_argument("--model_path", metavar="DIR", help="Hugging Face model directory (config.json + weights)")
    g.add_argument("--token_dictionary_file", metavar="FILE",
                   help="Ensembl id -> token id (.json/.tsv, or Geneformer's .pkl: read with a restricted unpickler)")
    g.add_argument("--gene_median_file", metavar="FILE", help="Ensembl id -> non-zero median expression")
    g.add_argument("--gene_mapping_file", metavar="FILE",
                   help="gene symbol (or Ensembl id) -> Ensembl id; needed when the data have symbols only")
    g.add_argument("--model_version", choices=("V1", "V2"),
                   help="V1: 2,048 tokens, no special tokens; V2: 4,096 with <cls>/<eos> (default: from the preset, "
                        "else from the token dictionary)")
    g.add_argument("--layer", type=int, default=-1,
                   help="Geneformer's emb_layer: 0 = last layer, -1 = second to last (default), -k = k before the last")
    g.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="mean over gene tokens (default) or the <cls> token (V2)")
    g.add_argument("--batch_tokens", type=int, help="token budget per batch (default 131,072 on a GPU, 8,192 on CPU)")
    g.add_argument("--batch_size", type=int, help="at most this many cells per batch (default: no limit)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--attention", choices=("auto", "packed", "padded"), default="auto",
                   help="packed: no padding, varlen flash attention on GPUs; padded: SDPA with a padding mask")

    g = parser.add_argument_group("scFoundation (its own code and checkpoint)")
    g.add_argument("--scfoundation_npy", nargs="+", metavar="NPY",
                   help="import: cell embeddings written by scFoundation's get_embedding.py (one file per line)")
    g.add_argument("--scfoundation_barcodes", nargs="+", metavar="FILE",
                   help="import: the barcodes of each .npy's rows, in order (one per line)")
    g.add_argument("--scfoundation_dir", metavar="DIR", help="run: scFoundation's repository (or its model/ folder)")
    g.add_argument("--scfoundation_pool", choices=("all", "max"), default="all",
                   help="run: 'all' gives 3,072-D, 'max' 768-D (default all)")
    g.add_argument("--scfoundation_python", metavar="PYTHON",
                   help="run: the Python of scFoundation's environment (default: this one)")

    g = parser.add_argument_group("ensemble")
    g.add_argument("--ensemble_model1", help="first member, e.g. geneformer-316m")
    g.add_argument("--ensemble_model2", help="second member, e.g. scfoundation")


def run_embed(sources, source_model: str, options: dict, overwrite: bool = False) -> int:
    """Embed the expression roles of `sources` (DataSources) with `source_model` into the
    embedding store; `options`: the model settings (MODEL_KEYS, None = the default)."""
    from ..data.embed_store import EmbeddingStore
    from . import make_embedder, resolve_source_model
    from .scfoundation import ScFoundationImport
    from .stored import embed_datasets

    roles = sources.given()
    todo = [r for r in GEX_ROLES if r in roles]
    if not todo:
        raise XferError("embed: give the expression to embed: --src_csv and/or --test_csv (with the same data "
                        "flags as `xfer train`)")
    t0 = time.perf_counter()
    data = sources.load(roles)  # every given role, paired exactly as `xfer train` pairs them
    store = EmbeddingStore(sources.store)
    name = resolve_source_model(source_model, options.get("ensemble_model1"), options.get("ensemble_model2"))
    embedder = make_embedder(name, store=store, train=data.get("src"), **{k: options.get(k) for k in MODEL_KEYS})
    overwrite = overwrite or isinstance(embedder, ScFoundationImport)  # an import always re-reads
    results = embed_datasets(embedder, {r: data[r] for r in todo}, store, overwrite=overwrite)
    for r in results:
        verb = {"hit": "cached", "wrote": "wrote"}[r.status]
        print(f"{verb:6s} {embedder.name:18s} {r.role:4s} {r.dataset:20s} {r.n_cells:7d} cells x {r.dim:<5d} "
              f"{r.seconds:7.1f} s  {r.uri}")
    print(f"store: {store.root.uri}  ({time.perf_counter() - t0:.1f} s; `xfer train --source_model {embedder.name}` "
          "with the same data flags reads these entries)")
    return 0
