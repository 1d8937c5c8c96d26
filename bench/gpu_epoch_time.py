"""GPU benchmark: one training epoch of xfer's loop on research-sized data.

    python -m bench.gpu_epoch_time            # on a GPU machine (no ray / optuna / anndata needed)
    python -m bench.gpu_epoch_time --smoke    # tiny shapes on CPU, to check the script runs

Shapes of the issue: 7,728 training cells x 25,027 peaks (the peaks channel, i.e.
`peak_repr="peaks"`), a 1,152-D source embedding, batch 1,024, encoder
25,027 -> 1,024 -> 512, the DAE decoder back, classifier and CDAN
discriminator on the multilinear map; the whole training set resident on the
GPU, bf16 autocast. Variants, all through `xfer.training.fit`:

  paired   the training line alone (encoder and decoder once per step)
  adapt    the shipped default: plus a 7,432-cell unlabelled adaptation line (encoder
           and decoder twice per step, a third domain for the discriminator), with
           self-training (lambda_pseudo=1: pseudo-labels refreshed by one pass over the
           adaptation line at the start of each epoch after the warm-up, here from epoch 1)
  adapt_nopseudo  the same without self-training (lambda_pseudo=0; the `adapt` of the
           first GPU run, before self-training became the default)
  *_eager  the same with cuda_graph=False (one kernel launch per op, as plain PyTorch)

The plain-PyTorch reference step (bench/reference/gpu_reference.py, 66 ms per
epoch at batch 1,024 on one H100) runs the encoder twice and the decoder once,
between the two. Reported per variant: the median over epochs 2..N of
`train_seconds` (the steps, from the loop's own history) and `epoch_seconds`
(steps + the per-epoch validation pass and metrics), the time per step, and the
ratio to the reference measured in the same run (per step, and per epoch
with the reference's ceil(7,728 / 1,024) = 8 steps against our 7 (the loop drops the
ragged last batch)). Goal: epoch <= 1.5 x the reference.
Writes gpu_epoch_time.json to $OUT (or the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from bench.harness import write_results
from xfer.config import TrainConfig
from xfer.prepare import LineInputs, TrainData
from xfer.training import fit


def synthetic(n_cells: int, n_peaks: int, emb_dim: int, density: float, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    peaks = sp.random(n_cells, n_peaks, density=density, format="csr", dtype=np.float32, random_state=rng,
                      data_rvs=lambda k: np.ones(k, np.float32))
    emb = rng.normal(size=(n_cells, emb_dim)).astype(np.float32)
    labels = rng.integers(0, 3, n_cells).astype(np.int8)
    idx = rng.permutation(n_cells)
    n_val = n_cells // 5
    line = LineInputs(name="bench", barcodes=np.array([f"c{i}" for i in range(n_cells)], dtype=object),
                      emb=emb, peaks=peaks, labels=labels)
    prior = np.bincount(labels, minlength=3) / n_cells
    return TrainData(line=line, train_idx=np.sort(idx[n_val:]), val_idx=np.sort(idx[:n_val]),
                     class_prior=prior.astype(np.float32), line_stats={}, preprocess={})


def run_variant(name: str, data: TrainData, cfg: TrainConfig, dev: str) -> dict:
    t0 = time.perf_counter()
    res = fit(cfg, data, device=dev)
    hist = res.history[1:] or res.history
    steps = max(1, len(data.train_idx) // cfg.optim.batch_size)
    out = {"fit_seconds": round(time.perf_counter() - t0, 3), "epochs": len(res.history), "steps_per_epoch": steps,
           "epoch_seconds_median": statistics.median(h["epoch_seconds"] for h in hist),
           "train_seconds_median": statistics.median(h["train_seconds"] for h in hist),
           "epoch_seconds_all": [round(h["epoch_seconds"], 4) for h in res.history],
           "cuda_graph": res.extra.get("cuda_graph"), "last_total_loss": res.history[-1]["loss/total"]}
    out["step_ms"] = 1e3 * out["train_seconds_median"] / steps
    print(name, json.dumps({k: v for k, v in out.items() if k != "epoch_seconds_all"}), flush=True)
    return out


def validate_breakdown(cfg: TrainConfig, data: TrainData, dev: str, reps: int = 5) -> dict:
    """Where an `adapt` epoch's time outside its steps goes: the per-epoch validation (every
    label-free selection candidate, xfer.selection) timed whole, with the domain classifier of
    IWCV / DEV (xfer.selection.domain_weights, fitted by Newton steps) and with that classifier
    left out (weights of 1: timing only, never shipped); and the self-training refresh. Medians
    of `reps` calls after one warm-up, on the model after one epoch."""
    from xfer import selection
    from xfer.training import Population

    tr = Population([cfg], data, dev)
    tr.begin_epoch()
    tr.train_epoch()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return round(1e3 * statistics.median(ts), 2)

    out = {"validate_ms_newton": timed(lambda: tr.validate([0]))}
    orig = selection.domain_weights
    try:
        selection.domain_weights = lambda zt, zs, ze, **k: torch.ones(len(ze), device=ze.device)
        out["validate_ms_no_domain_classifier"] = timed(lambda: tr.validate([0]))
    finally:
        selection.domain_weights = orig
    if tr.self_training:
        out["refresh_pseudo_labels_ms"] = timed(lambda: tr.refresh_pseudo_labels([0]))
    print("validate_breakdown", json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--skip_reference", action="store_true")
    ap.add_argument("--variants", default="paired,paired_eager,adapt,adapt_eager,adapt_nopseudo",
                    help="which variants to run (comma-separated)")
    args = ap.parse_args()
    if args.smoke:
        n, n_b, P, E, hidden, latent, bs = 600, 500, 2000, 64, 128, 64, 128
    else:
        # 7,728 training cells: the training split is 80 % of the cells we build here
        n, n_b, P, E, hidden, latent, bs = int(7728 / 0.8), 7432, 25027, 1152, 1024, 512, args.batch_size
    data = synthetic(n, P, E, 0.15)
    other = synthetic(n_b, P, E, 0.15, seed=1).line
    cfg = TrainConfig.from_dict({
        "arch": "dae", "hidden_dim": hidden, "latent_dim": latent, "proj_hidden": hidden, "cls_hidden": 256,
        "disc_hidden": 1024 if not args.smoke else 64, "batch_size": bs, "epochs": args.epochs,
        "patience": args.epochs + 1, "peak_repr": "peaks", "bin_size": 0, "line_norm": False,
        "divergence": "mmd", "warmup_epochs": 0})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "cells": n, "train_cells": len(data.train_idx), "adapt_cells": n_b, "peaks": P, "emb_dim": E,
           "batch_size": bs, "variants": {}}
    adapt = data.with_adaptation(other)
    todo = set(args.variants.split(","))
    for name, d, c in (("paired", data, cfg), ("paired_eager", data, cfg.replace(cuda_graph=False)),
                       ("adapt", adapt, cfg), ("adapt_eager", adapt, cfg.replace(cuda_graph=False)),
                       ("adapt_nopseudo", adapt, cfg.replace(lambda_pseudo=0.0))):
        if name not in todo:
            continue
        out["variants"][name] = run_variant(name, d, c, dev)
        if dev == "cuda":
            torch.cuda.empty_cache()
    out["adapt_validate"] = validate_breakdown(cfg, adapt, dev)
    dest = Path(os.environ.get("OUT", ".")) / "gpu_epoch_time.json"
    write_results(dest, out)
    if dev == "cuda" and not args.skip_reference:
        ref = Path(__file__).parent / "reference" / "gpu_reference.py"
        r = subprocess.run([sys.executable, str(ref)], capture_output=True, text=True, env=os.environ)
        if r.returncode == 0:
            refj = json.loads(r.stdout[r.stdout.index("{"):])
            out["reference"] = refj
            ref_step = refj["dann_step"][f"bs{bs}_bf16"]
            out["reference_epoch_seconds"] = ref_step["epoch_s"]
            out["reference_step_ms"] = ref_step["step_ms"]
            for v in out["variants"].values():
                v["ratio_epoch_to_reference"] = round(v["epoch_seconds_median"] / ref_step["epoch_s"], 3)
                v["ratio_step_to_reference"] = round(v["step_ms"] / ref_step["step_ms"], 3)
                v["meets_1.5x"] = v["epoch_seconds_median"] <= 1.5 * ref_step["epoch_s"]
        else:
            out["reference_error"] = r.stderr[-2000:]
        write_results(dest, out)
    print(json.dumps({k: ({n: {kk: vv for kk, vv in v.items() if kk != "epoch_seconds_all"}
                           for n, v in out[k].items()} if k == "variants" else out[k])
                      for k in out if k in ("variants", "reference_epoch_seconds", "reference_step_ms",
                                            "reference_error")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
