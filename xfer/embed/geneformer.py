"""Geneformer cell embeddings from a local Hugging Face checkpoint (never downloaded).

Tokenisation follows Geneformer's TranscriptomeTokenizer:

    genes      each column is mapped to an Ensembl id: its feature id (CellMatrix.feature_ids)
               when present, else its symbol, through the gene-mapping file; columns that map to
               the same Ensembl id are summed (Geneformer's collapse_gene_ids); genes outside the
               token dictionary are dropped
    values     counts / cell total (all columns) x 10,000 / gene median (gene-median file)
    tokens     the cell's non-zero genes ranked by value, descending (ties: column order),
               truncated to the model's input size: V1 2,048 genes, no special tokens;
               V2 <cls> + 4,094 genes + <eos> (4,096)

The cell embedding is the mean over the gene tokens (<cls>/<eos> and padding excluded) of
one layer's hidden states, or that layer's <cls> state (V2). `layer` follows Geneformer's
EmbExtractor `emb_layer`: 0 = the last layer, -1 = the second-to-last (Geneformer's
default), -k = k layers before the last. Only the layers up to the chosen one are run.

On a GPU the encoder runs in bf16 (weights and autocast) on length-sorted batches that fill a
token budget. The default attention packs each batch without padding and calls PyTorch's
variable-length flash attention (torch.nn.attention.varlen); where that is missing or fails
its self-check at start-up, batches are padded to their longest cell and use
scaled_dot_product_attention with a key-padding mask. Embeddings come back in input order.

Presets check the checkpoint's config.json against Geneformer's published shapes:
geneformer-316m (V2, 18 layers, hidden 1,152, 18 heads, FFN 4,608), geneformer-104m (V2,
12/768/12/3,072), geneformer-10m (V1, 6/256/4/512); `geneformer` takes any Geneformer-style
BERT checkpoint and reads its shape from config.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..data.dataset import CellMatrix
from ..errors import ConfigError, InputError
from .base import Embedder
from .dictionaries import ENSEMBL_RE, dictionary_hash, is_special_token, load_dictionary

log = logging.getLogger(__name__)

TARGET_SUM = 10_000.0
TOKENIZER_ID = "geneformer-rank-value/1"  # bump when tokenisation changes (part of the store key)


@dataclass(frozen=True)
class GeneformerShape:
    version: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int


# Shapes of the published checkpoints (Hugging Face ctheodoris/Geneformer config.json files).
PRESETS: dict[str, GeneformerShape] = {
    "geneformer-316m": GeneformerShape("V2", 18, 1152, 18, 4608, 4096, 20275),
    "geneformer-104m": GeneformerShape("V2", 12, 768, 12, 3072, 4096, 20275),
    "geneformer-10m": GeneformerShape("V1", 6, 256, 4, 512, 2048, 25426),
}
GENERIC = "geneformer"
NAMES = (GENERIC, *PRESETS)

# model version -> (input size in tokens, <cls>/<eos> added)
VERSIONS: dict[str, tuple[int, bool]] = {"V1": (2048, False), "V2": (4096, True)}
POOLINGS = ("mean", "cls")


# ----------------------------------------------------------------------------- dictionaries

@dataclass(frozen=True)
class GeneformerVocab:
    """Token dictionary, gene medians and the optional gene -> Ensembl mapping, with their hashes."""

    token_ids: dict[str, int]
    medians: dict[str, float]
    mapping: dict[str, str] | None
    token_file: str
    median_file: str
    mapping_file: str | None

    @classmethod
    def load(cls, token_dictionary_file, gene_median_file, gene_mapping_file=None) -> "GeneformerVocab":
        tokens = load_dictionary(token_dictionary_file, "token", "--token_dictionary_file")
        medians = load_dictionary(gene_median_file, "median", "--gene_median_file")
        mapping = (load_dictionary(gene_mapping_file, "mapping", "--gene_mapping_file")
                   if gene_mapping_file else None)
        genes = [k for k in tokens if not is_special_token(k)]
        if not genes:
            raise InputError(token_dictionary_file, None, "the token dictionary holds no gene (only special tokens)")
        if not any(g in medians for g in genes):
            raise InputError(gene_median_file, None, "no gene of the token dictionary has a median here; "
                             "the two files belong to different Geneformer releases")
        return cls(tokens, medians, mapping, str(token_dictionary_file), str(gene_median_file),
                   None if gene_mapping_file is None else str(gene_mapping_file))

    def special(self, name: str) -> int | None:
        return self.token_ids.get(name)

    def hashes(self) -> dict:
        return {"token_dictionary": dictionary_hash(self.token_ids), "gene_median": dictionary_hash(self.medians),
                "gene_mapping": None if self.mapping is None else dictionary_hash(self.mapping)}


@dataclass(frozen=True)
class GeneMap:
    """How a dataset's columns feed Geneformer's genes.

    agg      (n_features x n_genes) 0/1 matrix: X @ agg sums columns that map to one gene
    tokens   (n_genes,) token id of each gene
    medians  (n_genes,) its median (float64)
    """

    agg: sp.csr_matrix
    tokens: np.ndarray
    medians: np.ndarray
    n_columns_mapped: int

    @property
    def n_genes(self) -> int:
        return len(self.tokens)


def _strip_version(key: str) -> str:
    return key.split(".", 1)[0] if ENSEMBL_RE.match(key) and "." in key else key


def _resolve_gene(key: str, vocab: GeneformerVocab) -> str | None:
    """An Ensembl id of the token dictionary for one column key (feature id or symbol)."""
    if not key:
        return None
    for cand in dict.fromkeys((key, key.upper(), _strip_version(key), _strip_version(key.upper()))):
        if vocab.mapping is not None:
            ens = vocab.mapping.get(cand)
            if ens is not None and ens in vocab.token_ids and not is_special_token(ens):
                return ens
        if cand in vocab.token_ids and not is_special_token(cand):
            return cand
    return None


def map_genes(ds: CellMatrix, vocab: GeneformerVocab) -> GeneMap:
    """Map ds's columns onto the vocabulary: by Ensembl id (feature_ids) first, else by symbol."""
    ids = ds.feature_ids
    col_gene: list[str | None] = []
    for j, sym in enumerate(ds.features):
        ens = _resolve_gene(str(ids[j]), vocab) if ids is not None else None
        col_gene.append(ens if ens is not None else _resolve_gene(str(sym), vocab))
    no_median = sorted({g for g in col_gene if g is not None and g not in vocab.medians})
    if no_median:
        log.warning("%d gene(s) of %s are in the token dictionary but have no median in %s (dropped), e.g. %s",
                    len(no_median), ds.name or ds.source, vocab.median_file, no_median[0])
    order: dict[str, int] = {}
    rows, cols = [], []
    for j, g in enumerate(col_gene):
        if g is None or g not in vocab.medians:
            continue
        rows.append(j)
        cols.append(order.setdefault(g, len(order)))
    if not order:
        how = "feature ids (Ensembl) and symbols" if ids is not None else "gene symbols"
        hint = ("" if vocab.mapping is not None else
                "; give --gene_mapping_file (gene symbol -> Ensembl id) when the columns are symbols")
        raise InputError(ds.source or ds.name, "features",
                         f"no gene maps to the Geneformer token dictionary {vocab.token_file} "
                         f"(matched by {how}, e.g. '{ds.features[0]}'){hint}")
    genes = list(order)
    agg = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(ds.n_features, len(genes)))
    n_dup = len(rows) - len(genes)
    log.info("%s: %d of %d columns map to %d Geneformer genes%s", ds.name or ds.source, len(rows), ds.n_features,
             len(genes), f" ({n_dup} duplicate columns summed)" if n_dup else "")
    return GeneMap(agg=agg, tokens=np.array([vocab.token_ids[g] for g in genes], dtype=np.int64),
                   medians=np.array([vocab.medians[g] for g in genes], dtype=np.float64),
                   n_columns_mapped=len(rows))


def rank_value_tokens(X: sp.spmatrix, gmap: GeneMap, max_genes: int, chunk: int = 4096) -> list[np.ndarray]:
    """Each cell's gene tokens ranked by counts / total x 10,000 / median, descending, at most max_genes.

    The cell total is over all columns of X (Geneformer's n_counts). Ties keep column order."""
    X = sp.csr_matrix(X)
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    G = (X @ gmap.agg).tocsr()
    G.sort_indices()
    out: list[np.ndarray] = []
    for start in range(0, G.shape[0], chunk):
        block = G[start:start + chunk]
        n = block.shape[0]
        lens = np.diff(block.indptr)
        rows = np.repeat(np.arange(n), lens)
        tot = totals[start:start + n][rows]
        vals = np.divide(block.data.astype(np.float64), tot, out=np.zeros(len(rows)), where=tot > 0)
        vals = vals * TARGET_SUM / gmap.medians[block.indices]
        order = np.lexsort((-vals, rows))  # by cell, then value descending; stable for ties
        toks = gmap.tokens[block.indices[order]]
        keep = vals[order] > 0
        for i in range(n):
            a, b = block.indptr[i], block.indptr[i + 1]
            seg = toks[a:b][keep[a:b]]
            out.append(seg[:max_genes].copy())
    return out


def add_special_tokens(genes: list[np.ndarray], vocab: GeneformerVocab, version: str) -> list[np.ndarray]:
    """Model input sequences: V2 <cls> + genes[:4094] + <eos>; V1 genes[:2048]."""
    size, special = VERSIONS[version]
    if not special:
        return [g[:size] for g in genes]
    cls_id, eos_id = vocab.special("<cls>"), vocab.special("<eos>")
    head, tail = np.array([cls_id], np.int64), np.array([eos_id], np.int64)
    return [np.concatenate([head, g[:size - 2], tail]) for g in genes]


# ----------------------------------------------------------------------------- model files

def read_model_config(model_path: str | Path) -> tuple[Path, dict]:
    d = Path(model_path).expanduser()
    if not d.is_dir():
        raise InputError(d, None, "--model_path: no such directory (a local Hugging Face model directory "
                         "with config.json and model.safetensors)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise InputError(cfg_path, None, "not found: --model_path must be a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(cfg_path, None, f"not valid JSON ({e})") from None
    if cfg.get("model_type") != "bert":
        raise InputError(cfg_path, "model_type", f"is {cfg.get('model_type')!r}; Geneformer checkpoints are 'bert'")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise InputError(cfg_path, key, "missing or not an integer")
    return cfg_path, cfg


def check_preset(name: str, cfg_path: Path, cfg: dict) -> None:
    """A preset's checkpoint must have the published shape (each field named on a mismatch)."""
    shape = PRESETS[name]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size"):
        want, got = getattr(shape, key), cfg.get(key)
        if got != want:
            raise InputError(cfg_path, key, f"is {got}, but {name} has {key} = {want}: this checkpoint is not "
                             f"{name} (use --source_model geneformer for any Geneformer-style checkpoint)")


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def model_fingerprint(model_dir: Path, probe_bytes: int = 4 << 20) -> str:
    """Identity of a checkpoint directory: config.json, and each weights file's name, size and a hash
    of its first and last `probe_bytes` (cheap for GB files; independent of paths and mtimes)."""
    h = hashlib.blake2b(digest_size=10)
    h.update((model_dir / "config.json").read_bytes())
    files = sorted({p for pat in WEIGHT_PATTERNS for p in model_dir.glob(pat) if p.is_file()})
    if not files:
        raise InputError(model_dir, None, "--model_path holds no weights (model.safetensors or pytorch_model.bin)")
    for p in files:
        size = p.stat().st_size
        h.update(f"|{p.name}|{size}|".encode())
        with open(p, "rb") as f:
            h.update(f.read(probe_bytes))
            if size > 2 * probe_bytes:
                f.seek(size - probe_bytes)
                h.update(f.read(probe_bytes))
    return h.hexdigest()


def load_bert(model_dir: Path, cfg_path: Path):
    """The checkpoint's BertModel (no pooler) in float32 on the CPU, eval mode; missing weights are an error."""
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False, attn_implementation="sdpa",
                                                output_loading_info=True)
    except OSError as e:
        raise InputError(model_dir, None, f"cannot load the checkpoint ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise InputError(model_dir, missing[0], f"{len(missing)} weight(s) missing from the checkpoint "
                         f"(config: {cfg_path.name}); is this a Geneformer BERT?")
    return model.to(torch.float32).eval()


# ----------------------------------------------------------------------------- encoder

def plan_batches(lengths: np.ndarray, batch_tokens: int, padded: bool, max_cells: int | None = None) -> list[np.ndarray]:
    """Greedy batches over cells sorted by length (longest first) under a token budget.

    Returns index arrays into `lengths`. padded: a batch costs n x its longest cell; else the sum.
    Every batch holds at least one cell (a cell longer than the budget runs alone)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, cur, cost_max, cost_sum = [], [], 0, 0
    for i in order:
        L = int(lengths[i])
        new_max, new_sum = max(cost_max, L), cost_sum + L
        cost = new_max * (len(cur) + 1) if padded else new_sum
        if cur and (cost > batch_tokens or (max_cells is not None and len(cur) >= max_cells)):
            batches.append(np.array(cur, dtype=np.int64))
            cur, new_max, new_sum = [], L, L
        cur.append(i)
        cost_max, cost_sum = new_max, new_sum
    if cur:
        batches.append(np.array(cur, dtype=np.int64))
    return batches


class BertCellEncoder:
    """Runs the first `n_layers` layers of a BertModel over token sequences and pools one vector per cell.

    attention: 'auto'   CUDA: packed + varlen flash attention when available (self-checked), else padded;
                        CPU: packed (one SDPA call per cell)
               'packed' no padding; varlen flash attention on CUDA, per-cell SDPA elsewhere
               'padded' batches padded to their longest cell, SDPA with a key-padding mask
    On CUDA the model is cast to bf16 and runs under bf16 autocast; on the CPU in float32.
    The model's modules are used as they are (nothing is copied); `model.to` moves it in place.
    """

    def __init__(self, model, n_layers: int | None = None, device: str = "auto", attention: str = "auto",
                 dtype=None):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self._autocast = cuda and any(p.dtype != self.dtype for p in self.model.parameters())
        cfg = model.config
        total = cfg.num_hidden_layers
        self.n_layers = total if n_layers is None else int(n_layers)
        if not 0 <= self.n_layers <= total:
            raise ValueError(f"n_layers must be in [0, {total}], got {self.n_layers}")
        self.layers = list(model.encoder.layer)[: self.n_layers]
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if attention not in ("auto", "packed", "padded"):
            raise ValueError(f"attention must be auto, packed or padded, got {attention!r}")
        absolute = getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")
        if attention == "packed" and not absolute:
            raise ValueError("packed attention needs absolute position embeddings")
        self.varlen = cuda and absolute and attention in ("auto", "packed") and self._varlen_ok()
        if attention == "auto":
            attention = "packed" if absolute and (self.varlen or not cuda) else "padded"
        elif attention == "packed" and cuda and not self.varlen:
            raise RuntimeError("packed attention on CUDA needs torch.nn.attention.varlen (PyTorch >= 2.9)")
        self.attention = attention

    # ------------------------------------------------------------------ public

    def embed(self, sequences: list[np.ndarray], *, pooling: str = "mean", special: bool = False,
              batch_tokens: int | None = None, max_cells: int | None = None,
              progress: bool | None = None, desc: str = "embedding") -> np.ndarray:
        """(n, hidden) float32 cell vectors, rows in the order of `sequences`.

        special: the sequences start with <cls> and end with <eos> (excluded from the mean).
        A sequence with no gene token gets a zero vector."""
        torch = self.torch
        from tqdm.auto import tqdm

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        n = len(sequences)
        hidden = self.model.config.hidden_size
        out = np.zeros((n, hidden), dtype=np.float32)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        runnable = np.flatnonzero(lengths > 0)
        if len(runnable) == 0:
            return out
        budget = int(batch_tokens or (131_072 if self.device.type == "cuda" else 8_192))
        budget = max(budget, int(lengths.max()))
        batches = plan_batches(lengths[runnable], budget, padded=self.attention == "padded", max_cells=max_cells)
        show = sys.stderr.isatty() if progress is None else progress
        results: list[tuple[np.ndarray, object]] = []
        t0 = time.perf_counter()
        with torch.inference_mode(), tqdm(total=n, unit="cell", desc=desc, disable=not show,
                                          smoothing=0.1) as bar:
            bar.update(n - len(runnable))
            for b in batches:
                idx = runnable[b]
                seqs = [sequences[i] for i in idx]
                # the weights are already in self.dtype: autocast would only add casts (and run
                # LayerNorm in float32, a full extra pass over the activations per layer)
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
                    vec = (self._packed(seqs, pooling, special) if self.attention == "packed"
                           else self._padded(seqs, pooling, special))
                results.append((idx, vec))
                bar.update(len(idx))
        for idx, vec in results:
            out[idx] = vec.float().cpu().numpy()
        secs = time.perf_counter() - t0
        log.info("%s: %d cells in %.1f s (%.1f cells/s, %d batches, %s attention on %s)", desc, n, secs,
                 n / max(secs, 1e-9), len(batches), "varlen" if self.varlen else self.attention, self.device)
        return out

    # ------------------------------------------------------------------ paths

    def _tensor(self, a: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _embed_tokens(self, ids, pos):
        emb = self.model.embeddings
        h = emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings.weight[0]
        return emb.LayerNorm(h)

    def _layer(self, layer, h, attend):
        """One BertLayer with our attention core (works on packed (T, H) or padded (B, L, H) states)."""
        sa = layer.attention.self
        shape = (*h.shape[:-1], self.n_heads, self.head_dim)
        q, k, v = sa.query(h).view(shape), sa.key(h).view(shape), sa.value(h).view(shape)
        ctx = attend(q, k, v).reshape(h.shape)
        a = layer.attention.output(ctx, h)            # dense + residual + LayerNorm
        return layer.output(layer.intermediate(a), a)  # FFN + residual + LayerNorm

    def _packed(self, seqs: list[np.ndarray], pooling: str, special: bool):
        torch = self.torch
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        T = int(lens.sum())
        ids = self._tensor(np.concatenate(seqs).astype(np.int64))
        pos = self._tensor(np.arange(T, dtype=np.int64) - np.repeat(starts, lens))
        cu_np = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cu = self._tensor(cu_np)
        max_len = int(lens.max())

        if (lens == max_len).all():
            # every cell the same length: a dense (B, L) batch with no padding, plain SDPA
            # (the kernel transformers uses), which beats varlen flash attention here
            B = len(seqs)

            def attend(q, k, v):  # (T, H, D) -> (B, H, L, D) -> (T, H, D)
                q, k, v = (t.view(B, max_len, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                return o.transpose(1, 2).reshape(B * max_len, o.shape[1], o.shape[3])
        elif self.varlen:
            from torch.nn.attention.varlen import varlen_attn

            def attend(q, k, v):
                return varlen_attn(q, k, v, cu, cu, max_len, max_len)
        else:
            bounds = list(zip(cu_np[:-1].tolist(), cu_np[1:].tolist()))

            def attend(q, k, v):
                out = torch.empty_like(q)
                for a, b in bounds:  # (L, H, D) -> (1, H, L, D)
                    qi, ki, vi = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                    out[a:b] = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
                return out

        h = self._embed_tokens(ids, pos)
        for layer in self.layers:
            h = self._layer(layer, h, attend)
        h = h.float()
        if pooling == "cls":
            return h[self._tensor(starts)]
        w = np.ones(T, dtype=np.float32)
        if special:
            w[starts] = 0.0
            w[starts + lens - 1] = 0.0
        seg = self._tensor(np.repeat(np.arange(len(seqs)), lens))
        wt = self._tensor(w)
        sums = torch.zeros(len(seqs), h.shape[1], device=h.device).index_add_(0, seg, h * wt[:, None])
        counts = torch.zeros(len(seqs), device=h.device).index_add_(0, seg, wt)
        return sums / counts.clamp_min(1.0)[:, None]

    def _padded(self, seqs: list[np.ndarray], pooling: str, special: bool):
        torch = self.torch
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        m = int(lens.max())
        pad = getattr(self.model.config, "pad_token_id", 0) or 0
        ids_np = np.full((len(seqs), m), pad, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids_np[i, : len(s)] = s
        valid_np = np.arange(m)[None, :] < lens[:, None]
        ids, valid = self._tensor(ids_np), self._tensor(valid_np)
        pos = self._tensor(np.broadcast_to(np.arange(m, dtype=np.int64), (len(seqs), m)).copy())
        key_mask = valid[:, None, None, :]  # (B, 1, 1, L): True = attend

        def attend(q, k, v):  # (B, L, H, D)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
            return o.transpose(1, 2)

        h = self._embed_tokens(ids, pos)
        for layer in self.layers:
            h = self._layer(layer, h, attend)
        h = h.float()
        if pooling == "cls":
            return h[:, 0]
        w_np = valid_np.astype(np.float32)
        if special:
            w_np[:, 0] = 0.0
            w_np[np.arange(len(seqs)), lens - 1] = 0.0
        w = self._tensor(w_np)
        return (h * w[..., None]).sum(1) / w.sum(1).clamp_min(1.0)[:, None]

    def _varlen_ok(self) -> bool:
        """Whether varlen flash attention runs here and agrees with SDPA on a small input."""
        torch = self.torch
        if self.device.type != "cuda":
            return False
        try:
            from torch.nn.attention.varlen import varlen_attn

            g = torch.Generator(device="cpu").manual_seed(0)
            lens = [7, 3]
            q, k, v = (torch.randn(sum(lens), self.n_heads, self.head_dim, generator=g)
                       .to(self.device, torch.bfloat16) for _ in range(3))
            cu = torch.tensor([0, 7, 10], dtype=torch.int32, device=self.device)
            got = varlen_attn(q, k, v, cu, cu, 7, 7)
            for a, b in ((0, 7), (7, 10)):
                ref = torch.nn.functional.scaled_dot_product_attention(
                    *(t[a:b].transpose(0, 1)[None].float() for t in (q, k, v)))[0].transpose(0, 1)
                if not torch.allclose(got[a:b].float(), ref, atol=3e-2, rtol=3e-2):
                    log.warning("varlen attention disagrees with SDPA; using padded batches")
                    return False
            return True
        except Exception as e:  # missing op, old PyTorch, unsupported GPU
            log.warning("varlen flash attention unavailable (%s: %s); using padded batches", type(e).__name__, e)
            return False


# ----------------------------------------------------------------------------- the embedder

class GeneformerEmbedder(Embedder):
    """A frozen Geneformer checkpoint as an embedder (see the module docstring)."""

    def __init__(self, model_path: str, token_dictionary_file: str | None, gene_median_file: str | None,
                 gene_mapping_file: str | None = None, *, name: str = GENERIC, model_version: str | None = None,
                 layer: int = -1, pooling: str = "mean", device: str = "auto", attention: str = "auto",
                 batch_tokens: int | None = None, max_cells: int | None = None, progress: bool | None = None):
        if name not in NAMES:
            raise ConfigError("source_model", f"unknown Geneformer model '{name}' (choose from {', '.join(NAMES)})")
        self.name = name
        self.cfg_path, self.config = read_model_config(model_path)
        self.model_dir = self.cfg_path.parent
        if name in PRESETS:
            check_preset(name, self.cfg_path, self.config)
        self.vocab = GeneformerVocab.load(token_dictionary_file, gene_median_file, gene_mapping_file)
        self.version = self._version(model_version)
        self.max_length, self.special = VERSIONS[self.version]
        self._check_vocab()
        n_total = self.config["num_hidden_layers"]
        if not isinstance(layer, int) or not -n_total <= layer <= 0:
            raise ConfigError("layer", f"must be an integer in [-{n_total}, 0] (Geneformer's emb_layer: 0 = last "
                              f"layer, -1 = second to last), got {layer!r}")
        if pooling not in POOLINGS:
            raise ConfigError("pooling", f"must be mean or cls, got {pooling!r}")
        if pooling == "cls" and not self.special:
            raise ConfigError("pooling", f"'cls' needs a V2 model (<cls> token); {self.version} models have none: "
                              "use --pooling mean")
        self.layer, self.pooling = layer, pooling
        self.n_layers_run = n_total + layer
        self.device, self.attention = device, attention
        self.batch_tokens, self.max_cells, self.progress = batch_tokens, max_cells, progress
        self._fingerprint = model_fingerprint(self.model_dir)
        self._encoder: BertCellEncoder | None = None

    def _version(self, requested: str | None) -> str:
        preset = PRESETS.get(self.name)
        has_special = self.vocab.special("<cls>") is not None and self.vocab.special("<eos>") is not None
        if requested is not None:
            v = str(requested).upper()
            if v not in VERSIONS:
                raise ConfigError("model_version", f"must be V1 or V2, got {requested!r}")
            if preset is not None and preset.version != v:
                raise ConfigError("model_version", f"{self.name} is a {preset.version} model, not {v}")
            return v
        if preset is not None:
            return preset.version
        return "V2" if has_special and self.config["max_position_embeddings"] >= VERSIONS["V2"][0] else "V1"

    def _check_vocab(self) -> None:
        size, special = VERSIONS[self.version]
        if self.config["max_position_embeddings"] < size:
            raise InputError(self.cfg_path, "max_position_embeddings",
                             f"is {self.config['max_position_embeddings']}, but {self.version} models take {size} tokens")
        if special:
            for tok in ("<cls>", "<eos>"):
                if self.vocab.special(tok) is None:
                    raise InputError(self.vocab.token_file, tok, f"{self.version} models need the {tok} token; this "
                                     "token dictionary has none (a V1 dictionary? use --model_version V1 with a V1 "
                                     "model and its dictionaries)")
        top = max(self.vocab.token_ids.values())
        if top >= self.config["vocab_size"]:
            raise InputError(self.vocab.token_file, None,
                             f"token ids go up to {top}, but the model's vocab_size is {self.config['vocab_size']} "
                             f"({self.cfg_path}): the dictionary belongs to another Geneformer release")

    def settings(self) -> dict:
        return {"model": self._fingerprint, "version": self.version, "max_length": self.max_length,
                "layer": self.layer, "pooling": self.pooling, "tokenizer": TOKENIZER_ID, **self.vocab.hashes()}

    def tokenize(self, ds: CellMatrix) -> list[np.ndarray]:
        """Model input sequences for every cell of ds (in order)."""
        gmap = map_genes(ds, self.vocab)
        n_genes = self.max_length - 2 if self.special else self.max_length
        genes = rank_value_tokens(ds.X, gmap, n_genes)
        return add_special_tokens(genes, self.vocab, self.version)

    @property
    def encoder(self) -> BertCellEncoder:
        if self._encoder is None:
            model = load_bert(self.model_dir, self.cfg_path)
            self._encoder = BertCellEncoder(model, n_layers=self.n_layers_run, device=self.device,
                                            attention=self.attention)
        return self._encoder

    def transform(self, ds: CellMatrix) -> np.ndarray:
        seqs = self.tokenize(ds)
        n_genes = np.array([len(s) for s in seqs]) - (2 if self.special else 0)
        empty = np.flatnonzero(n_genes <= 0)
        if len(empty) == len(seqs):
            raise InputError(ds.source or ds.name, "features",
                             "no cell has a non-zero count in a gene of the token dictionary")
        if len(empty):
            log.warning("%d cell(s) of %s have no gene of the token dictionary (e.g. '%s'): zero vectors",
                        len(empty), ds.name or ds.source, ds.barcodes[empty[0]])
            seqs = [s if n > 0 else s[:0] for s, n in zip(seqs, n_genes)]
        log.info("%s on %s: %d cells, median %d gene tokens (max %d)", self.name, ds.name or ds.source,
                 len(seqs), int(np.median(n_genes)), self.max_length)
        vec = self.encoder.embed(seqs, pooling=self.pooling, special=self.special, batch_tokens=self.batch_tokens,
                                 max_cells=self.max_cells, progress=self.progress, desc=f"{self.name} {ds.name}")
        if not np.isfinite(vec).all():
            raise InputError(self.model_dir, None, "the model produced non-finite embeddings")
        return vec

    def state(self) -> dict:
        return {**super().state(), "model_path": str(self.model_dir)}


def geneformer_from_settings(name: str, **kw) -> GeneformerEmbedder:
    """Build from command-line style keyword arguments (unknown keys ignored)."""
    layer = kw.get("layer")
    return GeneformerEmbedder(
        kw["model_path"], kw.get("token_dictionary_file"), kw.get("gene_median_file"), kw.get("gene_mapping_file"),
        name=name, model_version=kw.get("model_version"), layer=-1 if layer is None else int(layer),
        pooling=kw.get("pooling") or "mean", device=kw.get("device") or "auto",
        attention=kw.get("attention") or "auto", batch_tokens=kw.get("batch_tokens"),
        max_cells=kw.get("batch_size"), progress=kw.get("progress"))


__all__ = ["PRESETS", "NAMES", "GENERIC", "VERSIONS", "GeneformerShape", "GeneformerVocab", "GeneMap",
           "map_genes", "rank_value_tokens", "add_special_tokens", "plan_batches", "BertCellEncoder",
           "GeneformerEmbedder", "geneformer_from_settings", "model_fingerprint"]
