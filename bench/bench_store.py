"""Benchmark: loading a seed-sized PEAK matrix from the Parquet cell store vs parsing its CSV.

    python bench/bench_store.py [--size seed] [--repeat 3] [--json out.json]

Simulates one pair at the given size (seed: 7,432 cells x 92,328 peaks for
the training line), writes the training line's PEAK matrix in the seed's CSV
layout, ingests it into a store, then times (best of --repeat, page cache warm
for every contender):

  csv_pandas   pandas.read_csv of the whole CSV (how the seed's scripts load it:
               a dense frame) + conversion to CSR
  csv_xfer     xfer's streaming CSV reader (pyarrow, block by block to CSR; what
               `xfer ingest` does once)
  store        CellStore.read: Parquet -> CSR without densifying (what every
               trial does)

The issue's goal: store >= 20x faster than parsing the CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="seed")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(__file__).parent / "_data"))
    ap.add_argument("--skip-pandas", action="store_true", help="skip the (slow, memory-hungry) dense pandas parse")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import scipy.sparse as sp

    from xfer.data.readers import read_csv_matrix
    from xfer.data.simulate import simulate_pair
    from xfer.data.store import CellStore
    from xfer.data.writers import write_seed_csv

    work = Path(args.workdir) / f"store_bench_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "A_PEAK.csv"
    t = time.perf_counter()
    line_a, _ = simulate_pair(args.size, seed=0)
    ds = line_a.peak
    t_sim = time.perf_counter() - t
    t = time.perf_counter()
    write_seed_csv(ds, csv)
    t_write = time.perf_counter() - t
    store_root = work / "store"
    shutil.rmtree(store_root, ignore_errors=True)
    store = CellStore(str(store_root))
    t = time.perf_counter()
    store.write(ds, "A_PEAK")
    t_ingest_write = time.perf_counter() - t
    csv_bytes = csv.stat().st_size
    store_bytes = sum(f.stat().st_size for f in (store_root / "datasets" / "A_PEAK").iterdir())
    print(f"{ds.n_cells} cells x {ds.n_features} peaks, nnz {ds.X.nnz:,} "
          f"({1 - ds.X.nnz / (ds.n_cells * ds.n_features):.1%} zeros); simulated in {t_sim:.0f} s, "
          f"CSV written in {t_write:.0f} s")
    print(f"CSV {csv_bytes / 1e9:.2f} GB, store {store_bytes / 1e6:.0f} MB (written in {t_ingest_write:.1f} s)")

    res = {"size": args.size, "n_cells": ds.n_cells, "n_features": ds.n_features, "nnz": int(ds.X.nnz),
           "csv_bytes": csv_bytes, "store_bytes": store_bytes, "machine": f"{platform.machine()}, "
           f"{os.cpu_count()} cores", "python": sys.version.split()[0]}

    t_store, back = best_of(lambda: store.read("A_PEAK"), args.repeat)
    assert (back.X != ds.X).nnz == 0
    res["store_s"] = t_store
    t_xfer, parsed = best_of(lambda: read_csv_matrix(csv, modality="peak"), args.repeat)
    assert (parsed.X != ds.X).nnz == 0
    res["csv_xfer_s"] = t_xfer
    if not args.skip_pandas:
        import pandas as pd

        def pandas_parse():
            df = pd.read_csv(csv, index_col=0)
            return sp.csr_matrix(df.to_numpy(dtype=np.float32))
        t_pd, _ = best_of(pandas_parse, 1)
        res["csv_pandas_s"] = t_pd

    print(f"{'method':12s} {'seconds':>9s} {'store speed-up':>15s}")
    for key, name in (("csv_pandas_s", "csv_pandas"), ("csv_xfer_s", "csv_xfer"), ("store_s", "store")):
        if key in res:
            print(f"{name:12s} {res[key]:9.2f} {res[key] / t_store:14.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
