"""Map one dataset's peaks onto another's by genomic coordinates.

Two cell lines call their peak sets independently, so a model trained on the
reference (training) line's peaks sees the query (test) line only after the
query's peaks are mapped onto the reference feature space. `map_peaks` builds
that mapping once as a sparse n_query x n_ref matrix M with
``X_query @ M = X on the reference peaks``; `apply_mapping` applies it and
imputes the reference peaks nothing mapped to; `map_dataset` does both for a
`CellMatrix`.

Matching cascade
----------------
Every reference peak is matched at the *strictest* tier that finds a partner
among the query peaks; the chosen method sets the most permissive tier allowed:

    tier            rule                                          allowed by method
    exact           identical chrom, start and end                all four
    overlap_50pct   overlap >= 50 % of the shorter of the two     overlap_50pct, overlap, nearest
    overlap         any overlap (>= 1 bp)                         overlap, nearest
    nearest         the query peak whose midpoint is nearest,     nearest
                    same chromosome, within max_distance bp

so, from strict to permissive: exact < overlap_50pct < overlap < nearest.
For instance, under ``method="overlap"`` a reference peak with an exact twin
takes only the twin; one without a twin takes every query peak that covers
>= 50 % of the shorter peak, and only when there is none of those does it take
every query peak that overlaps it at all. Intervals are 0-based half-open
[start, end), so [100, 200) and [200, 300) do not overlap. The midpoint
distance is |(s_r + e_r) / 2 - (s_q + e_q) / 2| <= max_distance; equal
distances go to the upstream (lower-coordinate) query peak.

Counts are summed: when several query peaks match one reference peak at its
tier, their columns are added (the fragments in the region add up). A query
peak may feed several reference peaks (each receives its full count). Query
peaks that match no reference peak are dropped, and reference peaks that
match nothing are "unmapped": zero, or the reference value from `ref_fill`
under ``impute="mean"``.

Chromosome names are compared as written; ``normalise_chrom=True`` strips a
leading "chr" from both sides first ("chr1" == "1"; "chrM" == "M", not "MT").

Implementation: exact matches by a hash join on (chrom, start, end); overlaps
per chromosome with the NCLS interval index (`ncls.NCLS64.all_overlaps_both`)
for the reference peaks still unmatched; nearest midpoints per chromosome with
`np.searchsorted`. There are no loops over peaks, only over chromosomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, InputError
from .dataset import CellMatrix, make_matrix
from .peaks import PeakSet, parse_peak_names

__all__ = [
    "METHODS", "IMPUTE", "TIERS", "UNMAPPED", "PeakMapping",
    "map_peaks", "apply_mapping", "map_dataset", "chrom_prefix_differs", "strip_chr",
]

METHODS: tuple[str, ...] = ("exact", "overlap", "overlap_50pct", "nearest")
IMPUTE: tuple[str, ...] = ("zero", "mean")

# Tiers from strict to permissive; PeakMapping.tier holds codes into TIERS.
TIERS: tuple[str, ...] = ("exact", "overlap_50pct", "overlap", "nearest")
EXACT, OVERLAP_50PCT, OVERLAP, NEAREST = range(4)
UNMAPPED = -1
# The most permissive tier each method allows.
_MAX_TIER = {"exact": EXACT, "overlap_50pct": OVERLAP_50PCT, "overlap": OVERLAP, "nearest": NEAREST}

METHOD_KEY = "peak_mapper_method"
IMPUTE_KEY = "peak_impute_strategy"
DISTANCE_KEY = "peak_max_distance"

_NO_PAIRS = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class PeakMapping:
    """A query -> reference peak mapping.

    matrix  scipy CSR float32, n_query x n_ref, entries 1 for each matched
            (query, reference) pair: ``X_query @ matrix`` is X on the reference
            peaks (several query peaks into one reference peak are summed)
    tier    int8 per reference peak: the code into TIERS of the tier it was
            matched at, or UNMAPPED (-1)
    stats   JSON-ready summary: n_ref, n_query, method, max_distance,
            normalise_chrom, n_pairs, n/fraction of reference peaks mapped
            (total and by tier), n/fraction of query peaks used,
            n_chrom_shared (chromosomes present on both sides)
    """

    matrix: sp.csr_matrix
    tier: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def n_query(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_ref(self) -> int:
        return self.matrix.shape[1]

    @property
    def mapped(self) -> np.ndarray:
        """Boolean mask of the reference peaks that have at least one partner."""
        return self.tier != UNMAPPED

    def tier_names(self) -> np.ndarray:
        """Per reference peak, the tier name ('unmapped' where none)."""
        names = np.array(list(TIERS) + ["unmapped"], dtype=object)
        return names[np.where(self.tier < 0, len(TIERS), self.tier)]


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _check_method(method) -> str:
    if method not in METHODS:
        raise ConfigError(METHOD_KEY, f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def _check_impute(impute) -> str:
    if impute not in IMPUTE:
        raise ConfigError(IMPUTE_KEY, f"unknown strategy {impute!r}; expected one of {', '.join(IMPUTE)}")
    return impute


def _check_distance(max_distance) -> float:
    try:
        d = float(max_distance)
    except (TypeError, ValueError):
        d = float("nan")
    if isinstance(max_distance, bool) or not np.isfinite(d) or d < 0:
        raise ConfigError(DISTANCE_KEY, f"must be a finite number >= 0 (bp), got {max_distance!r}")
    return d


# --------------------------------------------------------------------------- #
# matching
# --------------------------------------------------------------------------- #
def _chrom_codes(ref: PeakSet, query: PeakSet, normalise: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Shared integer codes for the chromosome names of both sets."""
    chroms = pd.Series(np.concatenate([ref.chrom, query.chrom]), dtype=object).astype(str)
    if normalise:
        chroms = chroms.str.replace(r"^chr", "", regex=True)
    codes, uniques = pd.factorize(chroms, sort=False)
    return codes[: len(ref)].astype(np.int64), codes[len(ref):].astype(np.int64), len(uniques)


def strip_chr(chroms) -> np.ndarray:
    """Chromosome names without a leading "chr" ("chr1" -> "1")."""
    return pd.Series(np.asarray(chroms, dtype=object), dtype=object).astype(str).str.replace(
        r"^chr", "", regex=True).to_numpy(dtype=object)


def chrom_prefix_differs(ref_chroms, query_chroms) -> bool:
    """True when the two sides name their chromosomes with and without a "chr" prefix:
    stripping it makes more chromosome names shared than comparing them as written."""
    ref, query = set(map(str, ref_chroms)), set(map(str, query_chroms))
    return len(set(strip_chr(list(ref))) & set(strip_chr(list(query)))) > len(ref & query)


def _groups(codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices sorted by chromosome code, and bounds: group c is order[b[c]:b[c+1]]."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_codes + 1))
    return order, bounds


def _per_chromosome(ref_codes, query_codes, n_codes, ref_subset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (reference indices, query indices) per chromosome present on both
    sides, restricted to the reference peaks in `ref_subset` (global indices)."""
    r_order, r_bounds = _groups(ref_codes[ref_subset], n_codes)
    q_order, q_bounds = _groups(query_codes, n_codes)
    for c in range(n_codes):
        r = ref_subset[r_order[r_bounds[c]:r_bounds[c + 1]]]
        q = q_order[q_bounds[c]:q_bounds[c + 1]]
        if len(r) and len(q):
            yield r, q


def _exact_pairs(ref: PeakSet, query: PeakSet, ref_codes, query_codes) -> tuple[np.ndarray, np.ndarray]:
    """(ref, query) index pairs with identical chromosome, start and end (hash join)."""
    left = pd.DataFrame({"c": ref_codes, "s": ref.start, "e": ref.end, "r": np.arange(len(ref))})
    right = pd.DataFrame({"c": query_codes, "s": query.start, "e": query.end, "q": np.arange(len(query))})
    joined = left.merge(right, on=["c", "s", "e"], how="inner", sort=False)
    return joined["r"].to_numpy(np.int64), joined["q"].to_numpy(np.int64)


def _overlap_pairs(ref: PeakSet, query: PeakSet, ref_codes, query_codes, n_codes,
                   ref_subset) -> tuple[np.ndarray, np.ndarray]:
    """All (ref, query) pairs overlapping by >= 1 bp, for the reference peaks in
    `ref_subset`: one NCLS index over each chromosome's query peaks."""
    from ncls import NCLS64  # imported here, not at module level: only overlap mapping needs it

    rs, qs = [], []
    for r, q in _per_chromosome(ref_codes, query_codes, n_codes, ref_subset):
        index = NCLS64(query.start[q], query.end[q], q)
        r_hit, q_hit = index.all_overlaps_both(ref.start[r], ref.end[r], r)
        rs.append(np.asarray(r_hit, dtype=np.int64))
        qs.append(np.asarray(q_hit, dtype=np.int64))
    if not rs:
        return _NO_PAIRS
    return np.concatenate(rs), np.concatenate(qs)


def _nearest_pairs(ref: PeakSet, query: PeakSet, ref_codes, query_codes, n_codes,
                   ref_subset, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """For each reference peak in `ref_subset`, the query peak on the same
    chromosome with the nearest midpoint, if within max_distance bp.

    Works on doubled midpoints (start + end) so everything stays integer;
    ties go to the upstream query peak.
    """
    rs, qs = [], []
    limit = 2.0 * max_distance
    for r, q in _per_chromosome(ref_codes, query_codes, n_codes, ref_subset):
        q_mid2 = query.start[q] + query.end[q]
        order = np.argsort(q_mid2, kind="stable")
        q_sorted, q_mid2 = q[order], q_mid2[order]
        r_mid2 = ref.start[r] + ref.end[r]
        right = np.searchsorted(q_mid2, r_mid2, side="left")  # first query midpoint >= ref's
        left = np.maximum(right - 1, 0)
        right = np.minimum(right, len(q_mid2) - 1)
        d_left = np.abs(r_mid2 - q_mid2[left])
        d_right = np.abs(q_mid2[right] - r_mid2)
        pick = np.where(d_left <= d_right, left, right)
        dist = np.minimum(d_left, d_right)
        keep = dist <= limit
        rs.append(r[keep])
        qs.append(q_sorted[pick[keep]])
    if not rs:
        return _NO_PAIRS
    return np.concatenate(rs), np.concatenate(qs)


def map_peaks(ref: PeakSet, query: PeakSet, method: str = "overlap_50pct",
              max_distance: float = 1000, *, normalise_chrom: bool = False) -> PeakMapping:
    """Map the query peaks onto the reference peaks (see the module docstring).

    ref           the feature space to map onto (the training line's peaks)
    query         the peaks the data to be mapped comes with
    method        the most permissive tier allowed: one of METHODS
    max_distance  bp between midpoints for the "nearest" tier (recorded,
                  and validated, for every method)
    normalise_chrom  strip a leading "chr" from chromosome names on both sides

    Raises ConfigError (key "peak_mapper_method" / "peak_max_distance") for a
    bad method or distance.
    """
    method = _check_method(method)
    max_distance = _check_distance(max_distance)
    max_tier = _MAX_TIER[method]
    n_ref, n_query = len(ref), len(query)
    ref_codes, query_codes, n_codes = _chrom_codes(ref, query, normalise_chrom)

    tier = np.full(n_ref, UNMAPPED, dtype=np.int8)
    pair_r, pair_q = [], []

    def accept(r: np.ndarray, q: np.ndarray, code) -> None:
        tier[r] = code
        pair_r.append(r)
        pair_q.append(q)

    # exact
    r, q = _exact_pairs(ref, query, ref_codes, query_codes)
    accept(r, q, EXACT)

    # overlap tiers, for the reference peaks without an exact twin
    if max_tier >= OVERLAP_50PCT:
        todo = np.flatnonzero(tier == UNMAPPED)
        r, q = _overlap_pairs(ref, query, ref_codes, query_codes, n_codes, todo)
        ov = np.minimum(ref.end[r], query.end[q]) - np.maximum(ref.start[r], query.start[q])
        shorter = np.minimum(ref.end[r] - ref.start[r], query.end[q] - query.start[q])
        half = 2 * ov >= shorter  # overlap >= 50 % of the shorter peak
        accept(r[half], q[half], OVERLAP_50PCT)
        if max_tier >= OVERLAP:
            rest = tier[r] == UNMAPPED  # only < 50 % partners: take them all
            accept(r[rest], q[rest], OVERLAP)

    # nearest midpoint, for the reference peaks still without a partner
    if max_tier >= NEAREST:
        todo = np.flatnonzero(tier == UNMAPPED)
        r, q = _nearest_pairs(ref, query, ref_codes, query_codes, n_codes, todo, max_distance)
        accept(r, q, NEAREST)

    rows = np.concatenate(pair_q) if pair_q else _NO_PAIRS[0]
    cols = np.concatenate(pair_r) if pair_r else _NO_PAIRS[0]
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_query, n_ref)
    )
    matrix.sum_duplicates()  # no-op: every pair is found once
    n_chrom_shared = len(np.intersect1d(np.unique(ref_codes), np.unique(query_codes)))
    stats = _stats(tier, matrix, method, max_distance, normalise_chrom, n_chrom_shared)
    return PeakMapping(matrix=matrix, tier=tier, stats=stats)


def _stats(tier: np.ndarray, matrix: sp.csr_matrix, method: str, max_distance: float,
           normalise_chrom: bool, n_chrom_shared: int) -> dict:
    n_query, n_ref = matrix.shape

    def frac(k: int, n: int) -> float:
        return float(k) / n if n else 0.0

    counts = np.bincount(tier[tier >= 0].astype(np.intp), minlength=len(TIERS))
    n_mapped = int(counts.sum())
    n_query_used = int(np.count_nonzero(np.diff(matrix.indptr)))
    by_tier = {name: int(counts[i]) for i, name in enumerate(TIERS)}
    by_tier["unmapped"] = n_ref - n_mapped
    return {
        "method": method,
        "max_distance": int(max_distance) if float(max_distance).is_integer() else max_distance,
        "normalise_chrom": bool(normalise_chrom),
        "n_ref": int(n_ref),
        "n_query": int(n_query),
        "n_pairs": int(matrix.nnz),
        "n_chrom_shared": int(n_chrom_shared),
        "n_ref_mapped": n_mapped,
        "fraction_ref_mapped": frac(n_mapped, n_ref),
        "n_ref_by_tier": by_tier,
        "fraction_ref_by_tier": {k: frac(v, n_ref) for k, v in by_tier.items()},
        "n_query_used": n_query_used,
        "fraction_query_used": frac(n_query_used, n_query),
    }


# --------------------------------------------------------------------------- #
# applying
# --------------------------------------------------------------------------- #
def apply_mapping(mapping: PeakMapping, X_query, impute: str = "zero", ref_fill=None) -> sp.csr_matrix:
    """Put a query matrix (cells x query peaks) on the reference peaks.

    Returns a CSR cells x n_ref matrix (float32 for float32 input): the summed
    counts of each reference peak's partners. Unmapped reference peaks are,
    with

    impute="zero"  left at 0 (`ref_fill` is ignored);
    impute="mean"  set to ref_fill[j] in every cell; `ref_fill` (required)
                   holds one value per reference peak, e.g. the training
                   line's column means on the same scale as X_query. Those
                   columns become dense (n_cells x n_unmapped stored values).

    Raises ConfigError (key "peak_impute_strategy") for an unknown strategy or
    "mean" without ref_fill, and ValueError for shape mismatches.
    """
    impute = _check_impute(impute)
    X = sp.csr_matrix(X_query)  # no copy for CSR input; dense is accepted too
    if X.shape[1] != mapping.n_query:
        raise ValueError(
            f"X_query has {X.shape[1]} columns but the mapping was built for {mapping.n_query} query peaks"
        )
    M = mapping.matrix.astype(X.dtype) if X.dtype.kind == "f" else mapping.matrix
    Y = (X @ M).tocsr()
    Y.sort_indices()  # sparse products come out unsorted

    if impute == "mean":
        if ref_fill is None:
            raise ConfigError(IMPUTE_KEY, "'mean' needs ref_fill: one value per reference peak")
        fill = np.asarray(ref_fill, dtype=np.float64).ravel()
        if len(fill) != mapping.n_ref:
            raise ValueError(f"ref_fill has {len(fill)} values but there are {mapping.n_ref} reference peaks")
        if not np.isfinite(fill).all():
            raise ValueError("ref_fill holds NaN or infinite values")
        Y = _add_fill_columns(Y, np.flatnonzero(~mapping.mapped & (fill != 0)), fill)
    return Y


def _add_fill_columns(Y: sp.csr_matrix, cols: np.ndarray, fill: np.ndarray) -> sp.csr_matrix:
    """Y plus fill[cols] in columns `cols` of every row (Y is zero there).

    Both operands are canonical (sorted, no duplicates), so the sum is a
    linear merge and comes out canonical too.
    """
    n_cells, k = Y.shape[0], len(cols)
    if not (k and n_cells):
        return Y
    total = Y.nnz + n_cells * k
    idx = np.int32 if max(total, Y.shape[1]) < np.iinfo(np.int32).max else np.int64
    F = sp.csr_matrix(
        (np.tile(fill[cols].astype(Y.dtype), n_cells),
         np.tile(cols.astype(idx), n_cells),
         np.arange(n_cells + 1, dtype=idx) * idx(k)),
        shape=Y.shape,
    )
    F.has_sorted_indices = True  # cols is ascending (np.flatnonzero)
    out = (Y + F).tocsr()
    out.sort_indices()  # a flag check: the merge of canonical inputs is sorted
    return out


def map_dataset(query: CellMatrix, ref: PeakSet | CellMatrix, method: str = "overlap_50pct",
                impute: str = "zero", ref_fill=None, max_distance: float = 1000, *,
                normalise_chrom: bool = False) -> tuple[CellMatrix, PeakMapping]:
    """Put a peak CellMatrix on a reference peak set.

    `ref` is a PeakSet or the reference CellMatrix itself (its feature names
    are parsed). Returns the query cells (barcodes, labels, name, source kept)
    with features = the reference peak names, and the PeakMapping; the new
    matrix's meta records the mapping stats under "peak_mapping" (plus the
    impute strategy). See `map_peaks` and `apply_mapping` for the arguments.
    """
    _check_method(method)
    _check_impute(impute)
    if query.modality != "peak":
        raise InputError(query.source or query.name or "<query>", "modality",
                         f"peak mapping needs a 'peak' dataset, got {query.modality!r}")
    if isinstance(ref, CellMatrix):
        if ref.modality != "peak":
            raise InputError(ref.source or ref.name or "<reference>", "modality",
                             f"peak mapping needs a 'peak' reference, got {ref.modality!r}")
        ref = parse_peak_names(ref.features, path=ref.source or ref.name or "<reference>")
    query_peaks = parse_peak_names(query.features, path=query.source or query.name or "<query>")

    mapping = map_peaks(ref, query_peaks, method=method, max_distance=max_distance,
                        normalise_chrom=normalise_chrom)
    Y = apply_mapping(mapping, query.X, impute=impute, ref_fill=ref_fill)
    stats = dict(mapping.stats, impute=impute)
    mapped = make_matrix(
        Y, query.barcodes, ref.names, query.labels,
        modality="peak", name=query.name, source=query.source,
        meta={**query.meta, "peak_mapping": stats},
    )
    return mapped, replace(mapping, stats=stats)
