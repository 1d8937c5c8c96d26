"""The coordinate peak mapper (xfer.data.mapper)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xfer.data.dataset import make_matrix
from xfer.data.mapper import (
    EXACT, IMPUTE, METHODS, NEAREST, OVERLAP, OVERLAP_50PCT, TIERS, UNMAPPED,
    apply_mapping, map_dataset, map_peaks,
)
from xfer.data.peaks import PeakSet
from xfer.errors import ConfigError, InputError


def peaks(*rows) -> PeakSet:
    """PeakSet from (chrom, start, end) rows."""
    chrom, start, end = zip(*rows) if rows else ((), (), ())
    return PeakSet.from_arrays(chrom, start, end)


def pairs(mapping) -> set[tuple[int, int]]:
    """The (query, ref) pairs of a mapping's matrix."""
    coo = mapping.matrix.tocoo()
    assert np.all(coo.data == 1)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


# Reference peaks, each built so one tier decides it.
REF = peaks(
    ("chr1", 100, 200),     # 0: exact twin (q0), also a 60 % partner (q1) that exact hides
    ("chr1", 1000, 1100),   # 1: q2 covers 60 bp, q3 40 bp: both >= 50 % of the shorter peak
    ("chr1", 2000, 2100),   # 2: only q4, 10 bp of 100 (< 50 %): tier "overlap"
    ("chr1", 3000, 3100),   # 3: nothing overlaps; q5 midpoint 400 bp away: "nearest"
    ("chr1", 9000, 9100),   # 4: nearest query midpoint (q5) 5,600 bp away: unmapped
    ("chr2", 500, 600),     # 5: q6 and q7 each cover 50 bp (exactly 50 %): summed
    ("chr2", 700, 800),     # 6: q8 covers both 6 and 7 fully (a query peak feeding two)
    ("chr2", 800, 900),     # 7: q8 as well ([700, 800) and [800, 900) touch, no overlap)
    ("chr3", 100, 200),     # 8: no chr3 in the query at all: unmapped
)
QUERY = peaks(
    ("chr1", 100, 200),     # q0
    ("chr1", 140, 240),     # q1
    ("chr1", 1040, 1140),   # q2
    ("chr1", 960, 1040),    # q3: overlaps ref1 by 40 bp, half of its own 80 bp
    ("chr1", 2090, 2400),   # q4
    ("chr1", 3400, 3500),   # q5: midpoint 3450, ref3 midpoint 3050
    ("chr2", 450, 550),     # q6
    ("chr2", 550, 650),     # q7
    ("chr2", 650, 950),     # q8
    ("chrY", 100, 200),     # q9: matches nothing
)


def test_tiers_on_hand_built_sets():
    m = map_peaks(REF, QUERY, "nearest", max_distance=1000)
    assert m.tier.dtype == np.int8
    assert m.tier.tolist() == [
        EXACT, OVERLAP_50PCT, OVERLAP, NEAREST, UNMAPPED,
        OVERLAP_50PCT, OVERLAP_50PCT, OVERLAP_50PCT, UNMAPPED,
    ]
    assert pairs(m) == {
        (0, 0),                 # exact only, q1 is hidden by the stricter tier
        (2, 1), (3, 1),         # q3 covers 40 bp = 50 % of itself (the shorter peak)
        (4, 2),
        (5, 3),
        (6, 5), (7, 5),         # two query peaks summed into one reference peak
        (8, 6), (8, 7),         # one query peak feeding two reference peaks
    }
    assert m.tier_names().tolist()[:5] == ["exact", "overlap_50pct", "overlap", "nearest", "unmapped"]


def test_each_method_stops_at_its_tier():
    expected = {
        "exact": [EXACT] + [UNMAPPED] * 8,
        "overlap_50pct": [EXACT, OVERLAP_50PCT, UNMAPPED, UNMAPPED, UNMAPPED,
                          OVERLAP_50PCT, OVERLAP_50PCT, OVERLAP_50PCT, UNMAPPED],
        "overlap": [EXACT, OVERLAP_50PCT, OVERLAP, UNMAPPED, UNMAPPED,
                    OVERLAP_50PCT, OVERLAP_50PCT, OVERLAP_50PCT, UNMAPPED],
        "nearest": [EXACT, OVERLAP_50PCT, OVERLAP, NEAREST, UNMAPPED,
                    OVERLAP_50PCT, OVERLAP_50PCT, OVERLAP_50PCT, UNMAPPED],
    }
    assert set(expected) == set(METHODS)
    for method, tiers in expected.items():
        m = map_peaks(REF, QUERY, method, max_distance=1000)
        assert m.tier.tolist() == tiers, method
        assert m.stats["method"] == method


def test_fifty_percent_is_of_the_shorter_peak():
    ref = peaks(("c", 0, 1000))
    # 100 bp query peak inside a 1 kb reference peak: 100 % of the shorter one
    assert map_peaks(ref, peaks(("c", 400, 500)), "overlap_50pct").tier.tolist() == [OVERLAP_50PCT]
    # 49 of 100 bp: not enough; 50 of 100 bp: enough
    assert map_peaks(ref, peaks(("c", 951, 1051)), "overlap_50pct").tier.tolist() == [UNMAPPED]
    assert map_peaks(ref, peaks(("c", 950, 1050)), "overlap_50pct").tier.tolist() == [OVERLAP_50PCT]


def test_one_bp_overlap_and_half_open_ends():
    ref = peaks(("c", 100, 200))
    assert map_peaks(ref, peaks(("c", 199, 400)), "overlap").tier.tolist() == [OVERLAP]
    assert map_peaks(ref, peaks(("c", 200, 400)), "overlap").tier.tolist() == [UNMAPPED]
    assert map_peaks(ref, peaks(("c", 0, 100)), "overlap").tier.tolist() == [UNMAPPED]


def test_nearest_within_and_beyond_distance():
    ref = peaks(("c", 1000, 1100))  # midpoint 1050
    query = peaks(("c", 1300, 1400), ("c", 600, 700), ("c", 5000, 5100))  # midpoints 1350, 650, 5050
    m = map_peaks(ref, query, "nearest", max_distance=300)
    assert m.tier.tolist() == [NEAREST] and pairs(m) == {(0, 0)}  # 300 bp: inclusive
    assert map_peaks(ref, query, "nearest", max_distance=299).tier.tolist() == [UNMAPPED]
    # equal distances go to the upstream peak
    tie = peaks(("c", 1300, 1400), ("c", 700, 800))  # midpoints 1350 and 750: both 300 away
    assert pairs(map_peaks(ref, tie, "nearest", max_distance=500)) == {(1, 0)}
    # a different chromosome is never near
    other = peaks(("d", 1000, 1100))
    assert map_peaks(ref, other, "nearest", max_distance=10**9).tier.tolist() == [UNMAPPED]


def test_chromosome_names_compared_as_given_unless_normalised():
    ref = peaks(("chr1", 100, 200), ("chrX", 0, 50))
    query = peaks(("1", 100, 200), ("X", 0, 50))
    assert map_peaks(ref, query, "exact").stats["n_ref_mapped"] == 0
    m = map_peaks(ref, query, "exact", normalise_chrom=True)
    assert m.tier.tolist() == [EXACT, EXACT] and m.stats["n_chrom_shared"] == 2


def test_stats_fractions():
    m = map_peaks(REF, QUERY, "nearest", max_distance=1000)
    st = m.stats
    assert st["n_ref"] == 9 and st["n_query"] == 10 and st["method"] == "nearest"
    assert st["max_distance"] == 1000 and st["n_pairs"] == 9
    assert st["n_ref_by_tier"] == {"exact": 1, "overlap_50pct": 4, "overlap": 1, "nearest": 1, "unmapped": 2}
    assert st["n_ref_mapped"] == 7 and st["fraction_ref_mapped"] == pytest.approx(7 / 9)
    assert st["fraction_ref_by_tier"]["overlap_50pct"] == pytest.approx(4 / 9)
    assert sum(st["fraction_ref_by_tier"].values()) == pytest.approx(1.0)
    # used: q0 q2 q3 q4 q5 q6 q7 q8 (not q1, hidden by the exact tier, nor q9)
    assert st["n_query_used"] == 8 and st["fraction_query_used"] == pytest.approx(0.8)
    assert st["n_chrom_shared"] == 2


def test_empty_sets():
    empty = peaks()
    m = map_peaks(empty, QUERY, "nearest")
    assert m.matrix.shape == (10, 0) and m.stats["fraction_ref_mapped"] == 0.0
    m = map_peaks(REF, empty, "nearest")
    assert m.matrix.shape == (0, 9) and (m.tier == UNMAPPED).all()
    assert m.stats["fraction_query_used"] == 0.0


def _brute_force_overlaps(ref: PeakSet, query: PeakSet) -> set[tuple[int, int]]:
    same = ref.chrom[:, None] == query.chrom[None, :]
    ov = (np.minimum(ref.end[:, None], query.end[None, :])
          - np.maximum(ref.start[:, None], query.start[None, :]))
    r, q = np.nonzero(same & (ov > 0))
    return set(zip(q.tolist(), r.tolist()))


@pytest.mark.parametrize("seed", range(5))
def test_random_sets_against_brute_force(seed):
    rng = np.random.default_rng(seed)

    def random_set(n):
        chrom = rng.choice(["chr1", "chr2", "chr3"], size=n)
        start = rng.integers(0, 20_000, size=n)
        return PeakSet.from_arrays(chrom, start, start + rng.integers(1, 600, size=n))

    ref, query = random_set(300), random_set(300)
    # a few exact twins so the exact tier is exercised
    twins = rng.choice(300, size=20, replace=False)
    query = PeakSet.from_arrays(
        np.where(np.isin(np.arange(300), twins), ref.chrom, query.chrom),
        np.where(np.isin(np.arange(300), twins), ref.start, query.start),
        np.where(np.isin(np.arange(300), twins), ref.end, query.end),
    )

    # "overlap" with the exact tier off is all overlapping pairs; rebuild the
    # cascade from the brute-force pairs and compare.
    all_pairs = _brute_force_overlaps(ref, query)
    q, r = (np.array(x, dtype=np.int64) for x in zip(*all_pairs))
    exact = (ref.start[r] == query.start[q]) & (ref.end[r] == query.end[q])
    ov = np.minimum(ref.end[r], query.end[q]) - np.maximum(ref.start[r], query.start[q])
    half = 2 * ov >= np.minimum(ref.width[r], query.width[q])
    code = np.where(exact, EXACT, np.where(half, OVERLAP_50PCT, OVERLAP))
    best = np.full(len(ref), 99)
    np.minimum.at(best, r, code)
    keep = code == best[r]
    want = set(zip(q[keep].tolist(), r[keep].tolist()))
    want_tier = np.where(best == 99, UNMAPPED, best)

    m = map_peaks(ref, query, "overlap")
    assert pairs(m) == want
    np.testing.assert_array_equal(m.tier, want_tier)

    # nearest: the remaining reference peaks against brute-force midpoints
    m = map_peaks(ref, query, "nearest", max_distance=400)
    todo = np.flatnonzero(want_tier == UNMAPPED)
    d = np.abs(ref.midpoint[todo, None] - query.midpoint[None, :])
    d[ref.chrom[todo, None] != query.chrom[None, :]] = np.inf
    near = d.min(axis=1) <= 400
    assert (m.tier[todo] == np.where(near, NEAREST, UNMAPPED)).all()
    got = {(qq, rr) for qq, rr in pairs(m) if rr in set(todo.tolist())}
    for rr, dd in zip(todo[near], d[near]):
        (qq,) = [qq for qq, r2 in got if r2 == rr]
        assert dd[qq] == dd.min()  # one partner, at the minimum distance


# --------------------------------------------------------------------------- #
# apply_mapping / map_dataset
# --------------------------------------------------------------------------- #
def _query_counts(n_cells=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=(n_cells, len(QUERY))).astype(np.float32)


def test_apply_mapping_zero():
    m = map_peaks(REF, QUERY, "nearest", max_distance=1000)
    D = _query_counts()
    Y = apply_mapping(m, sp.csr_matrix(D), impute="zero")
    assert sp.issparse(Y) and Y.format == "csr" and Y.shape == (6, 9)
    assert Y.dtype == np.float32 and Y.has_sorted_indices
    Yd = Y.toarray()
    np.testing.assert_array_equal(Yd[:, 0], D[:, 0])
    np.testing.assert_array_equal(Yd[:, 1], D[:, 2] + D[:, 3])
    np.testing.assert_array_equal(Yd[:, 3], D[:, 5])
    np.testing.assert_array_equal(Yd[:, 5], D[:, 6] + D[:, 7])  # summed
    np.testing.assert_array_equal(Yd[:, 6], D[:, 8])  # one query peak, two refs
    np.testing.assert_array_equal(Yd[:, 7], D[:, 8])
    np.testing.assert_array_equal(Yd[:, [4, 8]], 0)  # unmapped


def test_apply_mapping_mean():
    m = map_peaks(REF, QUERY, "overlap")
    D = _query_counts()
    fill = np.arange(1, 10, dtype=np.float64) / 10
    fill[8] = 0.0  # a zero fill value adds nothing
    Y = apply_mapping(m, sp.csr_matrix(D), impute="mean", ref_fill=fill)
    zero = apply_mapping(m, sp.csr_matrix(D), impute="zero").toarray()
    unmapped = m.tier == UNMAPPED
    expect = zero.copy()
    expect[:, unmapped] = fill[unmapped].astype(np.float32)
    np.testing.assert_allclose(Y.toarray(), expect)
    assert Y.has_sorted_indices and Y.dtype == np.float32
    Y.sum_duplicates()
    np.testing.assert_allclose(Y.toarray(), expect)  # no duplicate entries hid anything


def test_apply_mapping_validates():
    m = map_peaks(REF, QUERY, "overlap")
    X = sp.csr_matrix(_query_counts())
    with pytest.raises(ConfigError, match="peak_impute_strategy"):
        apply_mapping(m, X, impute="median")
    with pytest.raises(ConfigError, match="peak_impute_strategy"):
        apply_mapping(m, X, impute="mean")  # no ref_fill
    with pytest.raises(ValueError, match="ref_fill"):
        apply_mapping(m, X, impute="mean", ref_fill=np.ones(3))
    with pytest.raises(ValueError, match="query peaks"):
        apply_mapping(m, X[:, :5])


def test_bad_method_and_distance():
    with pytest.raises(ConfigError, match="peak_mapper_method") as err:
        map_peaks(REF, QUERY, "fuzzy")
    assert all(name in str(err.value) for name in METHODS)
    for bad in (-1, float("nan"), "far", None):
        with pytest.raises(ConfigError, match="peak_max_distance"):
            map_peaks(REF, QUERY, "nearest", max_distance=bad)
    assert set(IMPUTE) == {"zero", "mean"} and TIERS[0] == "exact"


def test_map_dataset_from_cellmatrix():
    D = _query_counts()
    labels = np.array([0, 1, 2, -1, 0, 1], dtype=np.int8)
    query = make_matrix(D, [f"q{i}" for i in range(6)], QUERY.names, labels,
                        modality="peak", name="lineB", source="b.h5ad", meta={"kept": 1})
    # the reference CellMatrix names its peaks in another spelling
    ref_names = [f"{c}-{s}-{e}" for c, s, e in zip(REF.chrom, REF.start, REF.end)]
    ref = make_matrix(np.ones((2, 9)), ["r0", "r1"], ref_names, modality="peak", source="a.h5ad")

    mapped, mapping = map_dataset(query, ref, method="nearest", impute="mean",
                                  ref_fill=np.full(9, 0.5), max_distance=1000)
    assert mapped.features.tolist() == ref_names
    assert mapped.barcodes.tolist() == query.barcodes.tolist()
    np.testing.assert_array_equal(mapped.labels, labels)
    assert mapped.name == "lineB" and mapped.source == "b.h5ad" and mapped.modality == "peak"
    assert mapped.meta["kept"] == 1
    st = mapped.meta["peak_mapping"]
    assert st["impute"] == "mean" and st["n_ref_mapped"] == 7 and mapping.stats == st
    np.testing.assert_allclose(mapped.X.toarray()[:, [4, 8]], 0.5)
    np.testing.assert_array_equal(mapped.X.toarray()[:, 5], D[:, 6] + D[:, 7])

    # a PeakSet works as the reference too, with the same result
    again, _ = map_dataset(query, REF, method="nearest", impute="mean",
                           ref_fill=np.full(9, 0.5), max_distance=1000)
    assert again.features.tolist() == REF.names.tolist()
    assert (again.X != mapped.X).nnz == 0


def test_map_dataset_errors():
    X = np.ones((2, 2))
    gex = make_matrix(X, ["a", "b"], ["GAPDH", "ACTB"], modality="gex", source="rna.h5ad")
    with pytest.raises(InputError, match="rna.h5ad"):
        map_dataset(gex, REF)
    bad = make_matrix(X, ["a", "b"], ["chr1:1-2", "oops"], modality="peak", source="atac.h5ad")
    with pytest.raises(InputError, match=r"atac.h5ad \[features\]: 1 of 2 .*#1 'oops'"):
        map_dataset(bad, REF)
    good = make_matrix(X, ["a", "b"], ["chr1:1-2", "chr1:5-9"], modality="peak")
    with pytest.raises(ConfigError, match="peak_mapper_method"):
        map_dataset(good, REF, method="closest")
    with pytest.raises(ConfigError, match="peak_impute_strategy"):
        map_dataset(good, REF, impute="knn")
