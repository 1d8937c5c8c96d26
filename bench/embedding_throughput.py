"""GPU benchmark: Geneformer-316M-shaped cell embedding throughput (random weights, no downloads).

    python -m bench.embedding_throughput            # on a GPU machine (no ray / optuna / anndata imports)
    python -m bench.embedding_throughput --smoke    # a tiny model on the CPU: checks the script and the encoder

All figures are cells/s measured in this one process on one device (absolute numbers drift
between machines: compare the ratios). The model is BertForMaskedLM with the V2-316M shape
(18 layers, hidden 1,152, 18 heads, FFN 4,608, vocab 20,275, 4,096 positions).

fixed      plain transformers (bf16 weights, SDPA, all-ones mask, as the reference) at 2,048 tokens x 16 and
           4,096 x 8: the reference's shapes (313 / 127 cells/s on one H100); and xfer's encoder
           (xfer.embed.geneformer.BertCellEncoder) on the same lengths, all 18 layers.
cellline   3,000 cells whose lengths are drawn like a cell line's detected-gene counts
           (normal(3,000, 700) clipped to [600, 4,094], + <cls>/<eos>, as
           bench/reference/gpu_embed_anchor.py; --length_dist lognormal: a lognormal, same median):
             ours           xfer's encoder: length-sorted batches under a token budget (several
                            budgets), packed varlen flash attention (or its padded fallback),
                            mean over gene tokens; all 18 layers (like the references) and 17
                            (Geneformer's default emb_layer=-1 needs only the layers up to the
                            second-to-last)
             ref_bf16_b100  plain transformers, bf16, length-sorted, padded per batch of 100,
                            last layer, masked mean (106 cells/s on one H100)
             ref_extractor  Geneformer's EmbExtractor settings: float32 (TF32 off), batches of
                            25 length-sorted cells padded to their longest, output_hidden_states=True,
                            hidden_states[-2] masked mean; 300 cells (14 cells/s on one H100)
check      ours (bf16) against transformers in float32 on a few cells: cosine similarity.

Goals (same run): ours with all layers >= ref_bf16_b100, and within 5 % of transformers at fixed
lengths (the same computation: nothing to unpad); ours up to the second-to-last layer (the
extractor's output, hidden_states[-2]) >= 5 x ref_extractor.
Writes embedding_throughput.json to $OUT (or the current directory).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import write_results
from xfer.embed.geneformer import BertCellEncoder

CLS, EOS, FIRST_GENE = 2, 3, 4


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


DIST = "anchor"  # set from --length_dist


def cell_lengths(n: int, median: float, sd: float, lo: int, hi: int, seed: int) -> np.ndarray:
    """Gene counts like a cell line's, plus <cls>/<eos>: normal(median, sd) clipped (the reference anchor's
    draw), or lognormal with that median and a log-sd of sd / median (--length_dist lognormal)."""
    g = torch.Generator().manual_seed(seed)
    if DIST == "lognormal":
        L = torch.exp(torch.normal(float(np.log(median)), sd / median, (n,), generator=g))
    else:
        L = torch.normal(median, sd, (n,), generator=g)
    return (L.clamp(lo, hi).long() + 2).numpy()


def sequences(lengths: np.ndarray, vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for L in lengths:
        s = rng.integers(FIRST_GENE, vocab, int(L), dtype=np.int64)
        s[0], s[-1] = CLS, EOS
        out.append(s)
    return out


def timed(fn, dev: str, warmup: int = 1, repeat: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / repeat


def hf_fixed(bert, length: int, batch: int, n_batches: int, vocab: int, dev: str, dtype) -> float:
    """Plain transformers forward at a fixed length as bench/reference/gpu_reference.py runs it:
    bf16 weights, no autocast, an all-ones attention mask, mean of the last layer."""
    ids = torch.randint(FIRST_GENE, vocab, (batch, length), device=dev)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            for _ in range(n_batches):
                bert(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)

    return batch * n_batches / timed(run, dev, repeat=3)


def hf_padded(bert, seqs: list[np.ndarray], batch: int, dev: str, dtype, hidden_states: bool) -> float:
    """Plain transformers over length-sorted cells padded per batch; masked mean of the last layer
    (or hidden_states[-2] with output_hidden_states=True, as Geneformer's EmbExtractor)."""
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    batches = []
    for i in range(0, len(order), batch):
        b = [seqs[j] for j in order[i:i + batch]]
        m = max(len(s) for s in b)
        ids = np.zeros((len(b), m), np.int64)
        mask = np.zeros((len(b), m), np.int64)
        for k, s in enumerate(b):
            ids[k, : len(s)], mask[k, : len(s)] = s, 1
        batches.append((torch.from_numpy(ids), torch.from_numpy(mask)))

    def run():
        outs = []
        with torch.inference_mode(), torch.autocast(dev, dtype, enabled=dev == "cuda" and dtype != torch.float32):
            for ids, mask in batches:
                ids, mask = ids.to(dev), mask.to(dev)
                o = bert(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_states)
                h = o.hidden_states[-2] if hidden_states else o.last_hidden_state
                outs.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).float().cpu())
        return outs

    return len(seqs) / timed(run, dev, warmup=0)


def ours(enc: BertCellEncoder, seqs: list[np.ndarray], budget: int, dev: str, repeat: int = 1) -> float:
    def run():
        enc.embed(seqs, pooling="mean", special=True, batch_tokens=budget, progress=False)

    return len(seqs) / timed(run, dev, warmup=0, repeat=repeat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (seconds)")
    ap.add_argument("--cells", type=int, default=3000, help="cell-line-like cells for 'ours' and ref_bf16_b100")
    ap.add_argument("--extractor_cells", type=int, default=300, help="cells for the float32 extractor settings")
    ap.add_argument("--budgets", default="65536,131072,262144", help="token budgets per batch for 'ours'")
    ap.add_argument("--length_dist", choices=("anchor", "lognormal"), default="anchor",
                    help="cell lengths: the reference anchor's clipped normal (default, comparable to its figures) "
                         "or a lognormal with the same median")
    ap.add_argument("--skip_extractor", action="store_true")
    args = ap.parse_args()
    global DIST
    DIST = args.length_dist

    from transformers import BertConfig, BertForMaskedLM
    import transformers

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        shape = dict(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=4096)
        n_cells, n_extract = 48, 24
        lens_args = dict(median=300.0, sd=70.0, lo=60, hi=400)
        fixed = [(256, 4, 2), (512, 2, 2)]
        budgets = [2048, 4096]
        warm_cells = 8
    else:
        shape = dict(vocab_size=20275, hidden_size=1152, num_hidden_layers=18, num_attention_heads=18,
                     intermediate_size=4608, max_position_embeddings=4096)
        n_cells, n_extract = args.cells, args.extractor_cells
        lens_args = dict(median=3000.0, sd=700.0, lo=600, hi=4094)
        fixed = [(2048, 16, 20), (4096, 8, 20)]
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        warm_cells = 200
    cfg = BertConfig(**shape, pad_token_id=0, hidden_act="relu", attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        model32 = BertForMaskedLM(cfg).eval()
    L = shape["num_hidden_layers"]
    out: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
                 "transformers": transformers.__version__, "smoke": args.smoke, "shape": shape,
                 "params_M": round(sum(p.numel() for p in model32.bert.parameters()) / 1e6, 1),
                 "attn_implementation": getattr(model32.config, "_attn_implementation", None)}
    bf16 = torch.bfloat16 if dev == "cuda" else torch.float32
    model16 = copy.deepcopy(model32).to(bf16).eval() if dev == "cuda" else model32
    enc_all = BertCellEncoder(model16.bert, n_layers=L, device=dev)
    enc_default = BertCellEncoder(model16.bert, n_layers=L - 1, device=dev)  # Geneformer's emb_layer=-1
    out["attention_path"] = "varlen" if enc_all.varlen else enc_all.attention
    V = shape["vocab_size"]

    # ---------------------------------------------------------------- correctness check
    check_seqs = sequences(cell_lengths(6, **lens_args, seed=3), V, seed=3)
    ref = []
    with torch.inference_mode():
        for s in check_seqs:
            h = model32.bert(input_ids=torch.from_numpy(s)[None].to(dev), output_hidden_states=True).hidden_states[L - 1]
            ref.append(h[0, 1:-1].float().mean(0).cpu().numpy())
    got = enc_default.embed(check_seqs, pooling="mean", special=True, progress=False)
    ref = np.stack(ref)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    out["check"] = {"min_cosine_vs_fp32_transformers": round(float(cos.min()), 5),
                    "max_abs_diff": float(np.abs(got - ref).max())}
    out["check"]["ok"] = bool(cos.min() > (0.9999 if dev == "cpu" else 0.99))
    print(json.dumps(out, indent=1), flush=True)

    # ---------------------------------------------------------------- fixed lengths
    res: dict = {}
    for length, batch, nb in fixed:
        res[f"hf_bf16_len{length}_bs{batch}"] = round(hf_fixed(model16.bert, length, batch, nb, V, dev, bf16), 1)
        seqs = sequences(np.full(batch * nb, length), V, seed=length)
        ours(enc_all, seqs[: batch], batch * length, dev)  # warm-up
        res[f"ours_len{length}_bs{batch}"] = round(ours(enc_all, seqs, batch * length, dev, repeat=3), 1)
        print(f"fixed {length}: transformers {res[f'hf_bf16_len{length}_bs{batch}']} cells/s, "
              f"ours {res[f'ours_len{length}_bs{batch}']} cells/s", flush=True)
    out["fixed_cells_per_s"] = res

    # ---------------------------------------------------------------- cell-line-like lengths
    lens = cell_lengths(n_cells, **lens_args, seed=0)
    seqs = sequences(lens, V, seed=0)
    out["cellline"] = {"cells": n_cells, "length_dist": DIST, "median_tokens": int(np.median(lens)), "mean_tokens": float(lens.mean()),
                       "max_tokens": int(lens.max())}
    cl: dict = {}
    ours(enc_all, seqs[:warm_cells], budgets[0], dev)  # warm-up (kernels, allocator)
    for b in budgets:
        cl[f"ours_all_layers_budget{b}"] = round(ours(enc_all, seqs, b, dev), 1)
        cl[f"ours_to_second_last_budget{b}"] = round(ours(enc_default, seqs, b, dev), 1)
        print(f"ours budget {b}: {cl[f'ours_all_layers_budget{b}']} cells/s (all {L} layers), "
              f"{cl[f'ours_to_second_last_budget{b}']} (up to the second-to-last)", flush=True)
    hf_padded(model16.bert, seqs[:warm_cells], 100, dev, bf16, False)
    cl["ref_bf16_b100"] = round(hf_padded(model16.bert, seqs, 100, dev, bf16, False), 1)
    print(f"ref bf16 batch 100 padded: {cl['ref_bf16_b100']} cells/s", flush=True)
    del model16, enc_all, enc_default
    if dev == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_extractor:
        ex_seqs = sequences(cell_lengths(n_extract, **lens_args, seed=1), V, seed=1)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        hf_padded(model32.bert, ex_seqs[: max(2, n_extract // 6)], 25, dev, torch.float32, True)
        cl["ref_extractor_fp32_b25"] = round(hf_padded(model32.bert, ex_seqs, 25, dev, torch.float32, True), 1)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        print(f"ref extractor settings (fp32, batch 25, all hidden states): {cl['ref_extractor_fp32_b25']} cells/s",
              flush=True)
    out["cellline_cells_per_s"] = cl

    # ---------------------------------------------------------------- goals
    best_all = max(v for k, v in cl.items() if k.startswith("ours_all_layers"))
    best_default = max(v for k, v in cl.items() if k.startswith("ours_to_second_last"))
    g = {"ours_best_all_layers": best_all, "ours_best_to_second_last": best_default,
         "vs_ref_bf16_b100": round(best_all / cl["ref_bf16_b100"], 2)}
    for length, batch, _ in fixed:
        g[f"fixed{length}_vs_transformers"] = round(res[f"ours_len{length}_bs{batch}"]
                                                    / res[f"hf_bf16_len{length}_bs{batch}"], 2)
    if "ref_extractor_fp32_b25" in cl:
        # the extractor returns hidden_states[-2]: ours up to the second-to-last layer is the same output
        g["vs_ref_extractor"] = round(best_default / cl["ref_extractor_fp32_b25"], 1)
        g["vs_ref_extractor_all_layers"] = round(best_all / cl["ref_extractor_fp32_b25"], 1)
    # fixed lengths are the same computation as transformers' (no padding to save): within 5 % counts
    g["meets_bf16_refs"] = bool(g["vs_ref_bf16_b100"] >= 1.0
                                and all(v >= 0.95 for k, v in g.items() if k.endswith("_vs_transformers")))
    g["meets_5x_extractor"] = bool(g.get("vs_ref_extractor", 0) >= 5.0)
    g["h100_reference_cells_per_s"] = {"fixed2048": 313, "fixed4096": 127, "bf16_b100": 106, "extractor_fp32": 14}
    if args.smoke:
        g["note"] = "smoke run on the CPU with a tiny model: the goals apply to the GPU run only"
    out["goals"] = g
    dest = Path(os.environ.get("OUT", ".")) / "embedding_throughput.json"
    write_results(dest, out)
    print(json.dumps(out["goals"], indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
