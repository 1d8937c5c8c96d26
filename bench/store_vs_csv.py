"""Benchmark: loading a research-sized PEAK matrix from the Parquet cell store vs parsing its CSV.

    python -m bench.store_vs_csv [--size research] [--repeat 3] [--json out.json]

Simulates one pair at the given size (research: 7,432 cells x 92,328 peaks for
the training line), writes the training line's PEAK matrix in the research code's CSV
layout, ingests it into a store, then times (best of --repeat, page cache warm
for every contender):

  csv_pandas   pandas.read_csv of the whole CSV (how the research code's scripts load it:
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

from bench.harness import ROOT, run, write_results


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def contender(which: str, csv: str, store_root: str, repeat: int) -> None:
    """Run one loader `repeat` times in this process; print seconds, peak RSS and content hash."""
    import resource

    import scipy.sparse as sp

    from xfer.data.dataset import make_matrix
    from xfer.data.readers import read_csv_matrix
    from xfer.data.store import CellStore

    def pandas_parse():
        import pandas as pd
        df = pd.read_csv(csv, index_col=0)
        return make_matrix(sp.csr_matrix(df.to_numpy(dtype=np.float32)), df.index, df.columns, None,
                           modality="peak")

    fn = {"store": lambda: CellStore(store_root).read("A_PEAK"),
          "csv_xfer": lambda: read_csv_matrix(csv, modality="peak"),
          "csv_pandas": pandas_parse}[which]
    t, ds = best_of(fn, repeat)
    if which == "csv_pandas":
        ds = make_matrix(ds.X, ds.barcodes, ds.features, None, modality="peak")
    from xfer.data.dataset import content_hash
    # hash without labels (the CSV has none; the stored dataset has none either)
    h = content_hash(ds.without_labels())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({"seconds": t, "peak_rss_gb": peak, "hash": h}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--_contender", help=argparse.SUPPRESS)
    ap.add_argument("--_csv", help=argparse.SUPPRESS)
    ap.add_argument("--_store", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="research")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "_data"))
    ap.add_argument("--skip-pandas", action="store_true", help="skip the (slow, memory-hungry) dense pandas parse")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args._contender:
        contender(args._contender, args._csv, args._store, args.repeat)
        return 0

    from xfer.data.simulate import simulate_pair
    from xfer.data.store import CellStore
    from xfer.data.writers import write_research_csv

    work = Path(args.workdir) / f"store_bench_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "A_PEAK.csv"
    t = time.perf_counter()
    line_a, _ = simulate_pair(args.size, seed=0)
    ds = line_a.peak.without_labels()  # the matrix CSV alone, as the research code ships it
    t_sim = time.perf_counter() - t
    t = time.perf_counter()
    write_research_csv(ds, csv)
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
    expected = store.manifest("A_PEAK").content_hash
    del line_a, ds
    # each contender in its own process: its time, its peak memory, and the content hash of what it read
    for key, code, repeat in (("store", "store", args.repeat), ("csv_xfer", "csv_xfer", args.repeat),
                              ("csv_pandas", "csv_pandas", 1)):
        if key == "csv_pandas" and args.skip_pandas:
            continue
        r = run([sys.executable, "-m", "bench.store_vs_csv", "--_contender", code, "--_csv", str(csv),
                 "--_store", str(store_root), "--repeat", str(repeat)], threads=None, check=False)
        if not r.ok:
            res[f"{key}_error"] = r.stderr[-1500:]
            print(f"{key}: failed ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")
            continue
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["hash"] == expected, f"{key} read different content"
        res[f"{key}_s"], res[f"{key}_peak_rss_gb"] = out["seconds"], out["peak_rss_gb"]
    t_store = res["store_s"]
    print(f"{'method':12s} {'seconds':>9s} {'peak RSS GB':>12s} {'store speed-up':>15s}")
    for name in ("csv_pandas", "csv_xfer", "store"):
        if f"{name}_s" in res:
            print(f"{name:12s} {res[name + '_s']:9.2f} {res[name + '_peak_rss_gb']:12.1f} "
                  f"{res[name + '_s'] / t_store:14.1f}x")
    if args.json:
        write_results(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
