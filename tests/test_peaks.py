"""Peak-name parsing and the peak frequency filter (xfer.data.peaks)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xfer.data.peaks import PeakSet, parse_peak_names, peak_frequency_mask
from xfer.errors import ConfigError, InputError


# --------------------------------------------------------------------------- #
# parse_peak_names
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["chr1:100-200", "chr1-100-200", "chr1_100_200", " chr1:100-200\n"])
def test_each_spelling(name):
    p = parse_peak_names([name])
    assert list(p.chrom) == ["chr1"]
    assert p.start.tolist() == [100] and p.end.tolist() == [200]
    assert p.start.dtype == np.int64 and p.end.dtype == np.int64
    assert p.names[0] == name  # original names kept as given


def test_mixed_spellings_and_chromosomes_with_separators():
    names = [
        "chr1:100-200",
        "chr2-5-10",
        "chrX_1000_2000",
        "chrUn_KI270742v1:1-100",
        "chrUn_KI270742v1_1_100",
        "chrUn_KI270742v1-1-100",
        "chr1_KI270706v1_random:7-9",
        "HLA-DRB1_0_50",
        "1:10-20",
    ]
    p = parse_peak_names(np.array(names, dtype=object))
    assert len(p) == len(names)
    assert p.chrom.tolist() == [
        "chr1", "chr2", "chrX", "chrUn_KI270742v1", "chrUn_KI270742v1", "chrUn_KI270742v1",
        "chr1_KI270706v1_random", "HLA-DRB1", "1",
    ]
    assert p.start.tolist() == [100, 5, 1000, 1, 1, 1, 7, 0, 10]
    assert p.end.tolist() == [200, 10, 2000, 100, 100, 100, 9, 50, 20]
    assert p.names.tolist() == names
    assert p.width.tolist() == [100, 5, 1000, 99, 99, 99, 2, 50, 10]
    np.testing.assert_allclose(p.midpoint, [150, 7.5, 1500, 50.5, 50.5, 50.5, 8, 25, 15])


def test_thousands_separators():
    p = parse_peak_names(["chr1:1,000-2,000", "chr2:999-1,234,567", "chr3_12,345_67,890"])
    assert p.start.tolist() == [1000, 999, 12345]
    assert p.end.tolist() == [2000, 1234567, 67890]


def test_empty_list():
    p = parse_peak_names([])
    assert len(p) == 0 and p.start.dtype == np.int64


@pytest.mark.parametrize("name,reason", [
    ("chr1", "no coordinates"),
    ("chr1:100", "no coordinates"),
    ("chr1:abc-200", "no coordinates"),
    ("chr1:-5-100", "no coordinates"),  # negative start
    ("chr1:5--100", "no coordinates"),  # negative end
    (":100-200", "no coordinates"),  # no chromosome
    ("chr1:1.5-200", "no coordinates"),
    ("chr1:200-100", "start >= end"),
    ("chr1:100-100", "start >= end"),
    ("chr1:1,00-200", "misplaced comma"),
    ("chr1:1-99999999999999999999", "coordinate too large"),
])
def test_malformed_single(name, reason):
    with pytest.raises(InputError) as err:
        parse_peak_names(["chr1:1-2", name], path="atac.h5ad", field="var_names")
    msg = str(err.value)
    assert msg.startswith("atac.h5ad [var_names]: 1 of 2 peak names are malformed")
    assert f"#1 {name!r} ({reason})" in msg


def test_malformed_count_and_first_few_with_positions():
    names = [f"chr1:{i}-{i + 10}" for i in range(20)]
    bad_positions = [2, 5, 7, 11, 13, 17, 19]
    for i in bad_positions:
        names[i] = f"peak{i}"
    with pytest.raises(InputError) as err:
        parse_peak_names(names, path="p.tsv")
    err = err.value
    assert err.path == "p.tsv" and err.field == "features"
    msg = str(err)
    assert "7 of 20 peak names are malformed" in msg
    for i in bad_positions[:5]:
        assert f"#{i} 'peak{i}'" in msg
    assert "#17" not in msg and "and 2 more" in msg


def test_non_string_names_are_malformed():
    with pytest.raises(InputError, match="2 of 3"):
        parse_peak_names(["chr1:1-2", None, 7])


def test_parse_100k_names_is_fast():
    import time

    names = np.array([f"chr{i % 23}:{i * 1000}-{i * 1000 + 500}" for i in range(100_000)], dtype=object)
    t0 = time.perf_counter()
    p = parse_peak_names(names)
    assert time.perf_counter() - t0 < 3.0  # ~0.3 s on 2 cores; generous for busy CI
    assert p.start[-1] == 99_999_000


# --------------------------------------------------------------------------- #
# PeakSet
# --------------------------------------------------------------------------- #
def test_peakset_from_arrays_and_subset():
    p = PeakSet.from_arrays(["chr1", "chr2"], [0, 10], [5, 20])
    assert p.names.tolist() == ["chr1:0-5", "chr2:10-20"]
    q = p.subset(np.array([False, True]))
    assert q.chrom.tolist() == ["chr2"] and q.start.tolist() == [10] and len(q) == 1


@pytest.mark.parametrize("start,end", [([5], [5]), ([-1], [4]), ([0, 1], [2])])
def test_peakset_rejects_bad_intervals(start, end):
    with pytest.raises(ValueError):
        PeakSet(names=["a"] * len(start), chrom=["c"] * len(start), start=start, end=end)


# --------------------------------------------------------------------------- #
# peak_frequency_mask
# --------------------------------------------------------------------------- #
def _dense_mask(D: np.ndarray, frac: float) -> np.ndarray:
    n = D.shape[0]
    return np.array([(D[:, j] != 0).sum() / n >= frac for j in range(D.shape[1])])


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.1, 0.3, 0.5, 0.99])
def test_frequency_mask_matches_dense(frac):
    rng = np.random.default_rng(1)
    D = rng.poisson(0.4, size=(40, 60)).astype(np.float32)
    D[:, 3] = 0  # an empty column
    D[:12, 4] = 1  # exactly 30 % of rows
    X = sp.csr_matrix(D)
    got = peak_frequency_mask(X, frac)
    assert got.dtype == bool and got.shape == (60,)
    np.testing.assert_array_equal(got, _dense_mask(D, frac))
    np.testing.assert_array_equal(peak_frequency_mask(D, frac), got)  # dense input too
    if frac == 0.3:
        assert got[4]  # 12 of 40 passes 0.3 (no floating-point off-by-one)


def test_frequency_mask_ignores_explicit_zeros_and_sums_duplicates():
    # column 0: one explicit zero and one real value; column 1: +1 and -1 in the
    # same cell, stored as duplicates (they cancel); column 2: a plain value.
    data = np.array([0.0, 2.0, 1.0, -1.0, 3.0], dtype=np.float32)
    indices = np.array([0, 0, 1, 1, 2])
    indptr = np.array([0, 1, 5])
    X = sp.csr_matrix((data, indices, indptr), shape=(2, 3))
    before = X.data.copy()
    np.testing.assert_array_equal(peak_frequency_mask(X, 0.5), [True, False, True])
    np.testing.assert_array_equal(peak_frequency_mask(X, 0.75), [False, False, False])
    np.testing.assert_array_equal(X.data, before)  # input untouched


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "a lot", None, True])
def test_frequency_mask_rejects_bad_fraction(bad):
    with pytest.raises(ConfigError, match="peak_min_fraction"):
        peak_frequency_mask(sp.csr_matrix(np.eye(3)), bad)


def test_frequency_mask_names_the_callers_key():
    with pytest.raises(ConfigError, match="min_peak_cells"):
        peak_frequency_mask(sp.csr_matrix(np.eye(3)), 2, key="min_peak_cells")
