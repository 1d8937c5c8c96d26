"""CPU benchmark: the epoch time of a population of P members against P separate trials.

    python -m bench.population_trainer_speed                 # demo (small) and research sizes, P = 1 2 4 8 16
    python -m bench.population_trainer_speed --sizes small --populations 1 8 --epochs 2   # a quick look
    python -m bench.population_trainer_speed --device cuda --sizes research --populations 1 4 16 64   # a GPU (gpu_run.sh)

What is timed: `xfer.training.fit_population` on simulated data (the shipped defaults: DAE, MMD,
LSI + coverage inputs, adapting to the test line's unlabelled cells with self-training and
every selection candidate), members of one shape that differ in their scalars (seeds, learning
rates, lambdas, dropout, warm-up: drawn from the centred space's ranges). Per P, the median
over epochs 2..E of the loop's own `epoch_seconds` (steps + validation of every member) and
`train_seconds` (the steps). "Separate" is P x the P = 1 epoch: P trials run one after the
other with the same threads, what a sweep pays per epoch without populations. The gain is
separate / population. On a GPU also torch's peak memory per P and the GPU's utilisation
(nvidia-smi every 200 ms) while that population trained. Writes bench/results/population_trainer_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import RESULTS, write_results
from xfer.config import TrainConfig
from xfer.data.simulate import simulate_pair
from xfer.embed import PCAEmbedder, embed_lines
from xfer.prepare import prepare_line, prepare_training
from xfer.training import fit_population


def members(base: TrainConfig, n: int, seed: int = 0) -> list[TrainConfig]:
    """n configurations of the defaults' shape with their scalars drawn from the centred space."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(base.replace(
            seed=i, lr=float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-3)))),
            weight_decay=float(np.exp(rng.uniform(np.log(3e-5), np.log(3e-4)))),
            lambda_domain=float(rng.uniform(0.1, 1.0)), lambda_divergence=float(rng.uniform(0.3, 3.0)),
            lambda_target_class=float(rng.uniform(2, 12)), lambda_pseudo=float(rng.uniform(0.3, 2.0)),
            dropout=float(rng.uniform(0.3, 0.6)), peak_dropout=float(rng.uniform(0.1, 0.3)),
            warmup_epochs=int(rng.integers(0, 3)), pseudo_fraction=float(rng.uniform(0.3, 0.7))))
    return out


def prepare(size: str, base: TrainConfig):
    A, B = simulate_pair(size, seed=0)
    emb = embed_lines(PCAEmbedder(base.data.n_components), A.gex, {"test": B.gex})
    data, pre = prepare_training(A.gex, A.peak, emb["train"], base.data, base.optim.seed)
    test = prepare_line("B", pre, gex=B.gex, emb=emb["test"], peaks=B.peak)
    return data.with_adaptation(test)


class Utilisation:
    """nvidia-smi's GPU utilisation, sampled every 200 ms into memory while a block runs."""

    def __init__(self):
        self.samples: list[float] = []
        self.proc = None

    def __enter__(self):
        import shutil
        import subprocess
        import threading

        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)

            def read():
                for line in self.proc.stdout:
                    try:
                        self.samples.append(float(line.split(",")[0]))
                    except ValueError:
                        pass
            threading.Thread(target=read, daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)

    def figures(self) -> dict:
        s = self.samples[2:] or self.samples  # the first samples precede the training
        return {"gpu_util_mean_pct": statistics.mean(s), "gpu_util_max_pct": max(s), "samples": len(s)} if s else {}


def time_population(data, cfgs, device: str) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with Utilisation() if cuda else contextlib.nullcontext() as util:
        res = fit_population(cfgs, data, device=device)
    wall = time.perf_counter() - t
    hist = res[0].history[1:] or res[0].history
    row = {"P": len(cfgs), "epoch_s": statistics.median(h["epoch_seconds"] for h in hist),
           "train_s": statistics.median(h["train_seconds"] for h in hist), "wall_s": wall,
           "epochs": len(res[0].history)}
    if cuda:
        row["max_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row.update(util.figures())
        row["cuda_graph"] = res[0].extra.get("cuda_graph")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["small", "research"])
    ap.add_argument("--populations", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "population_trainer_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # patience above the epochs: every member trains every epoch (nobody is masked early)
    base = TrainConfig.from_dict({"epochs": args.epochs, "patience": args.epochs + 1, "ensemble": 1})
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__}, {args.threads} threads" + (f", {gpu}" if gpu else ""),
           "device": args.device,
           "method": __doc__.split("\n\n")[2].strip().replace("\n", " "), "epochs": args.epochs, "sizes": {}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        t = time.perf_counter()
        data = prepare(size, base)
        print(size, f"simulated and prepared in {time.perf_counter() - t:.1f} s", flush=True)
        rows = []
        out["sizes"][size] = {"cells": int(len(data.train_idx)), "features": int(data.n_peaks), "rows": rows}
        for P in args.populations:
            row = time_population(data, members(base, P), args.device)
            rows.append(row)
            one = rows[0]
            if one["P"] == 1:
                row["separate_epoch_s"] = P * one["epoch_s"]
                row["gain"] = row["separate_epoch_s"] / row["epoch_s"]
                row["train_gain"] = P * one["train_s"] / row["train_s"]
            print(size, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
            write_results(out_path, out)  # after every row: a time-out keeps what was measured
    print("wrote", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
