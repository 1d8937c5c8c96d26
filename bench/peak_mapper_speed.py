"""Benchmark the coordinate peak mapper on two realistic 100k-peak sets.

The reference set: 100k peaks over chr1-22 and chrX (hg38 lengths, peaks per
chromosome proportional to its length), widths 200-1500 bp, sorted by
position with small local shuffles ("sorted-ish", as peak files come). The
query set is derived from it like an independently called peak set: exact
copies, jittered copies (both ends moved), copies shifted by about half a
width (partial overlaps), copies moved just past the peak (no overlap, nearby),
dropped peaks, and new peaks elsewhere to make up the count.

Times `map_peaks` for each method (median of --repeat runs), plus
`parse_peak_names` on the query names and `apply_mapping` on a sparse
cells x query-peaks matrix; prints a table with the mapped fractions and
optionally writes everything as JSON (--json PATH).

    python -m bench.peak_mapper_speed [--n-ref 100000] [--n-query 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xfer.data.mapper import METHODS, apply_mapping, map_peaks
from xfer.data.peaks import PeakSet, parse_peak_names

# hg38 chromosome lengths (chr1-22, chrX).
HG38 = {
    "chr1": 248956422, "chr2": 242193529, "chr3": 198295559, "chr4": 190214555,
    "chr5": 181538259, "chr6": 170805979, "chr7": 159345973, "chr8": 145138636,
    "chr9": 138394717, "chr10": 133797422, "chr11": 135086622, "chr12": 133275309,
    "chr13": 114364328, "chr14": 107043718, "chr15": 101991189, "chr16": 90338345,
    "chr17": 83257441, "chr18": 80373285, "chr19": 58617616, "chr20": 64444167,
    "chr21": 46709983, "chr22": 50818468, "chrX": 156040895,
}
LIMIT_S = 10.0  # the per-method budget on the 2-core dev machine


def random_peaks(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n peaks spread over HG38 proportional to length, sorted-ish."""
    names = np.array(list(HG38), dtype=object)
    lengths = np.array(list(HG38.values()), dtype=np.int64)
    per_chrom = rng.multinomial(n, lengths / lengths.sum())
    chrom = np.repeat(names, per_chrom)
    width = rng.integers(200, 1501, size=n)
    start = (rng.random(n) * (np.repeat(lengths, per_chrom) - 2000)).astype(np.int64)
    order = np.lexsort((start, np.repeat(np.arange(len(names)), per_chrom)))
    # Local shuffles: peak files are sorted, but not always strictly.
    order = order[np.argsort(np.arange(n) + rng.normal(0, 3, size=n))]
    return chrom[order], start[order], start[order] + width[order]


def derived_peaks(ref: PeakSet, n: int, rng: np.random.Generator) -> PeakSet:
    """A query set like an independent peak call on a related cell line."""
    m = len(ref)
    kind = rng.choice(5, size=m, p=[0.35, 0.25, 0.10, 0.10, 0.20])
    width = ref.end - ref.start
    start, end = ref.start.copy(), ref.end.copy()
    # 1: jittered ends (mostly >= 50 % overlap)
    j = kind == 1
    start[j] += rng.normal(0, 120, j.sum()).astype(np.int64)
    end[j] += rng.normal(0, 120, j.sum()).astype(np.int64)
    # 2: shifted by 55-90 % of the width (partial overlap, often < 50 %)
    s = kind == 2
    shift = (width[s] * rng.uniform(0.55, 0.9, s.sum())).astype(np.int64)
    start[s] += shift
    end[s] += shift
    # 3: moved just past the peak (no overlap, 0-800 bp gap)
    p = kind == 3
    gap = width[p] + rng.integers(1, 800, p.sum())
    start[p] += gap
    end[p] += gap
    start = np.maximum(start, 0)
    end = np.maximum(end, start + 50)
    keep = kind != 4  # 4: dropped
    chrom = ref.chrom[keep]
    start, end = start[keep], end[keep]
    if len(chrom) < n:  # new peaks elsewhere
        c2, s2, e2 = random_peaks(n - len(chrom), rng)
        chrom, start, end = (np.concatenate(a) for a in ((chrom, c2), (start, s2), (end, e2)))
    order = rng.permutation(len(chrom))[:n]
    order.sort()  # keep the derived order, i.e. still sorted-ish
    spelling = rng.choice(3, size=len(order))  # mixed name spellings, like real exports
    chrom, start, end = chrom[order], start[order], end[order]
    sep = np.array([(":", "-"), ("-", "-"), ("_", "_")], dtype=object)[spelling]
    names = np.array([f"{c}{a}{s}{b}{e}" for c, (a, b), s, e in zip(chrom, sep, start, end)], dtype=object)
    return PeakSet(names=names, chrom=chrom, start=start, end=end)


def random_counts(n_cells: int, n_peaks: int, nnz_per_cell: int,
                  rng: np.random.Generator) -> sp.csr_matrix:
    """A cells x peaks count matrix, about nnz_per_cell non-zeros per row
    (scipy.sparse.random is far too slow at this size)."""
    cols = rng.integers(0, n_peaks, size=n_cells * nnz_per_cell)
    counts = rng.integers(1, 5, size=len(cols)).astype(np.float32)
    indptr = np.arange(n_cells + 1, dtype=np.int64) * nnz_per_cell
    X = sp.csr_matrix((counts, cols, indptr), shape=(n_cells, n_peaks))
    X.sum_duplicates()
    return X


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-ref", type=int, default=100_000)
    ap.add_argument("--n-query", type=int, default=100_000)
    ap.add_argument("--max-distance", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=2000, help="cells in the apply_mapping timing")
    ap.add_argument("--nnz-per-cell", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    ref = PeakSet.from_arrays(*random_peaks(args.n_ref, rng))
    query = derived_peaks(ref, args.n_query, rng)
    print(f"reference {len(ref):,} peaks, query {len(query):,} peaks, "
          f"{len(set(ref.chrom))} chromosomes, max_distance {args.max_distance} bp, "
          f"median of {args.repeat}")

    rows = []
    t_parse, parsed = timed(lambda: parse_peak_names(query.names), args.repeat)
    assert np.array_equal(parsed.start, query.start) and np.array_equal(parsed.end, query.end)
    rows.append({"step": "parse_peak_names", "seconds": t_parse})

    mappings = {}
    for method in METHODS:
        t, mapping = timed(lambda m=method: map_peaks(ref, query, m, args.max_distance), args.repeat)
        mappings[method] = mapping
        st = mapping.stats
        rows.append({
            "step": f"map_peaks[{method}]",
            "seconds": t,
            "fraction_ref_mapped": st["fraction_ref_mapped"],
            "fraction_query_used": st["fraction_query_used"],
            "fraction_ref_by_tier": st["fraction_ref_by_tier"],
            "n_pairs": st["n_pairs"],
        })

    nnz = min(args.nnz_per_cell, len(query))
    X = random_counts(args.cells, len(query), nnz, rng)
    fill = np.full(len(ref), 0.01)
    for impute in ("zero", "mean"):
        t, _ = timed(lambda i=impute: apply_mapping(mappings["nearest"], X, i, fill), args.repeat)
        rows.append({"step": f"apply_mapping[{impute}] {args.cells} cells", "seconds": t})

    print(f"\n{'step':<34}{'seconds':>9}{'ref mapped':>12}{'query used':>12}"
          f"{'exact':>8}{'>=50%':>8}{'>=1bp':>8}{'nearest':>9}")
    for r in rows:
        line = f"{r['step']:<34}{r['seconds']:>9.3f}"
        if "fraction_ref_mapped" in r:
            ft = r["fraction_ref_by_tier"]
            line += (f"{r['fraction_ref_mapped']:>12.3f}{r['fraction_query_used']:>12.3f}"
                     f"{ft['exact']:>8.3f}{ft['overlap_50pct']:>8.3f}{ft['overlap']:>8.3f}{ft['nearest']:>9.3f}")
        print(line)

    slow = [r["step"] for r in rows if r["step"].startswith("map_peaks") and r["seconds"] > LIMIT_S]
    if slow:
        print(f"\nSLOWER THAN {LIMIT_S:.0f} s: {', '.join(slow)}", file=sys.stderr)

    if args.json:
        result = {
            "n_ref": len(ref), "n_query": len(query), "max_distance": args.max_distance,
            "repeat": args.repeat, "seed": args.seed, "cells": args.cells,
            "nnz_per_cell": nnz, "python": platform.python_version(),
            "machine": platform.machine(), "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
