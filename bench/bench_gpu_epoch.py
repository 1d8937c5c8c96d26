"""GPU benchmark: one training epoch of xfer's loop on seed-sized data.

    python bench/bench_gpu_epoch.py            # on a GPU machine (no ray / optuna / anndata needed)
    python bench/bench_gpu_epoch.py --smoke    # tiny shapes on CPU, to check the script runs

Shapes of the issue: 7,728 target cells x 25,027 peaks (the peaks channel, i.e.
`peak_repr="peaks"`), a 1,152-D source embedding, batch 1,024, encoder
25,027 -> 1,024 -> 512, the DAE decoder back, classifier and CDAN
discriminator on the multilinear map; the whole training set resident on the
GPU, bf16 autocast. Reported: seconds per epoch of training steps (median of
epochs 2..N, from the loop's own `epoch_seconds`, which also include the
per-epoch validation pass) and of the steps alone, against the plain-PyTorch
reference (bench/reference/gpu_reference.py, 66 ms per epoch at batch 1,024 on
one H100). Goal: <= 1.5 x the reference measured in the same run.
Writes bench_gpu_epoch.json to $OUT (or the current directory).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xfer.config import TrainConfig  # noqa: E402
from xfer.prepare import LineInputs, TrainData  # noqa: E402
from xfer.train import fit  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--skip_reference", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        n, P, E, hidden, latent, bs = 600, 2000, 64, 128, 64, 128
    else:
        # 7,728 target cells: the training split is 80 % of the cells we build here, so build
        # 7,728 / 0.8 to give an epoch over 7,728 training cells (as the reference's epoch)
        n, P, E, hidden, latent, bs = int(7728 / 0.8), 25027, 1152, 1024, 512, args.batch_size
    data = synthetic(n, P, E, 0.15)
    cfg = TrainConfig.from_dict({
        "arch": "dae", "hidden_dim": hidden, "latent_dim": latent, "proj_hidden": hidden, "cls_hidden": 256,
        "disc_hidden": 1024 if not args.smoke else 64, "batch_size": bs, "epochs": args.epochs,
        "patience": args.epochs + 1, "peak_repr": "peaks", "bin_size": 0, "line_norm": False,
        "divergence": "mmd", "warmup_epochs": 0})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "cells": n, "train_cells": len(data.train_idx), "peaks": P, "emb_dim": E, "batch_size": bs}
    t0 = time.perf_counter()
    res = fit(cfg, data, device=dev)
    out["fit_seconds"] = time.perf_counter() - t0
    ep = [h["epoch_seconds"] for h in res.history[1:]]
    out["epoch_seconds_median"] = statistics.median(ep)
    out["epoch_seconds_all"] = [round(h["epoch_seconds"], 4) for h in res.history]
    steps = len(data.train_idx) // bs
    out["steps_per_epoch"] = steps
    print(json.dumps(out, indent=1))
    if dev == "cuda" and not args.skip_reference:
        ref = Path(__file__).parent / "reference" / "gpu_reference.py"
        r = subprocess.run([sys.executable, str(ref)], capture_output=True, text=True, env=os.environ)
        if r.returncode == 0:
            refj = json.loads(r.stdout[r.stdout.index("{"):])
            out["reference"] = refj["dann_step"]
            ref_epoch = refj["dann_step"][f"bs{bs}_bf16"]["epoch_s"]
            out["reference_epoch_seconds"] = ref_epoch
            out["ratio_to_reference"] = out["epoch_seconds_median"] / ref_epoch
        else:
            out["reference_error"] = r.stderr[-2000:]
    dest = Path(os.environ.get("OUT", ".")) / "bench_gpu_epoch.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in out if k in ("epoch_seconds_median", "reference_epoch_seconds",
                                                       "ratio_to_reference")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
