"""Peak coordinates: parsing peak names into a `PeakSet`, and the peak frequency filter.

Peak names
----------
scATAC feature names carry their genomic coordinates. Three spellings are
accepted, also mixed within one list:

    chr1:100-200      (Cell Ranger ARC / ATAC, UCSC style)
    chr1-100-200      (Signac, some h5ad exports)
    chr1_100_200      (ArchR, SnapATAC)

The chromosome is everything before the last two numbers, so chromosome names
that themselves contain "_" or "-" parse correctly ("chrUn_KI270742v1_1_100"
-> chrUn_KI270742v1, 1, 100). Thousands separators ("chr1:1,000-2,000") are
accepted. Coordinates are taken as written and treated as 0-based half-open
[start, end) intervals (the BED convention the peak callers write); no
+1/-1 shift is applied, so two datasets are comparable as long as both name
their peaks the same way. Chromosome names are kept exactly as written
(no "chr"-prefix normalisation here; see `xfer.data.mapper`).

A name is malformed when it has no trailing "<start><sep><end>" pair, a
coordinate is not a plain non-negative integer (so negative values fail),
a coordinate has more than 18 digits, or start >= end. All malformed names
are reported in one `InputError` giving their count and the first few with
their column positions.

Frequency filter
----------------
`peak_frequency_mask` keeps the peaks that are non-zero in at least a given
fraction of cells. Compute it on the training cells only and apply the same
mask to every other dataset, so that no information about held-out cells
leaks into the feature set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, InputError

__all__ = ["PeakSet", "parse_peak_names", "peak_frequency_mask", "PEAK_NAME_FORMATS"]

PEAK_NAME_FORMATS = "chrom:start-end, chrom-start-end or chrom_start_end"

# Chromosome, separator, start, separator, end. Numbers cannot contain a
# separator, so the split is unique: the coordinates are the last two numbers
# (lazy chromosome match, which is the faster one here). The chromosome must
# not end in a separator: that is what makes "chr1:-5-100" (negative start)
# fail instead of parsing as chromosome "chr1:".
_PEAK_RE = re.compile(r"(.*?[^\s:_\-])[:_\-]([\d,]+)[_\-]([\d,]+)")
# A number with commas must use them as thousands separators.
_GROUPED_RE = re.compile(r"\d{1,3}(?:,\d{3})+")
_NO_MATCH = ("", "", "")
# Why a name is malformed (codes into _REASONS).
_OK, _NO_COORDS, _BAD_COMMA, _TOO_LARGE, _EMPTY = range(5)
_REASONS = ("", "no coordinates", "misplaced comma", "coordinate too large", "start >= end")
_MAX_DIGITS = 18  # int64 holds any 18-digit number
_N_SHOWN = 5  # malformed names shown in an error message


@dataclass(frozen=True, eq=False)
class PeakSet:
    """Genomic coordinates of a dataset's peak features, one entry per feature.

    names  the original feature names (object array of str), in column order
    chrom  chromosome names as written (object array of str)
    start  int64, 0-based, inclusive
    end    int64, exclusive (half-open [start, end), so width = end - start)

    Arrays are coerced to these dtypes on construction; lengths must agree
    and every interval must satisfy 0 <= start < end.
    """

    names: np.ndarray
    chrom: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __post_init__(self) -> None:
        names = np.asarray(self.names, dtype=object)
        chrom = np.asarray(self.chrom, dtype=object)
        start = np.asarray(self.start, dtype=np.int64)
        end = np.asarray(self.end, dtype=np.int64)
        n = len(names)
        for label, arr in (("chrom", chrom), ("start", start), ("end", end)):
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"PeakSet: {n} names but {label} has shape {arr.shape}")
        if n and ((start < 0).any() or (start >= end).any()):
            raise ValueError("PeakSet: every interval needs 0 <= start < end")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "chrom", chrom)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @classmethod
    def from_arrays(cls, chrom, start, end, names=None) -> PeakSet:
        """Build a PeakSet from coordinates; names default to "chrom:start-end"."""
        chrom = np.asarray(chrom, dtype=object).astype(str).astype(object)
        start = np.asarray(start, dtype=np.int64)
        end = np.asarray(end, dtype=np.int64)
        if names is None:
            names = (
                pd.Series(chrom, dtype=object)
                + ":" + pd.Series(start).astype(str)
                + "-" + pd.Series(end).astype(str)
            ).to_numpy(dtype=object)
        return cls(names=names, chrom=chrom, start=start, end=end)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def width(self) -> np.ndarray:
        """Peak widths in bp (end - start), int64."""
        return self.end - self.start

    @property
    def midpoint(self) -> np.ndarray:
        """Peak midpoints (start + end) / 2 as float64 (x.5 for odd widths)."""
        return (self.start + self.end) / 2.0

    def subset(self, idx) -> PeakSet:
        """Peaks by integer index or boolean mask (order as given)."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return PeakSet(self.names[idx], self.chrom[idx], self.start[idx], self.end[idx])


def parse_peak_names(names, path="<peaks>", field: str = "features") -> PeakSet:
    """Parse peak names ("chr1:100-200", "chr1-100-200", "chr1_100_200") into a PeakSet.

    Vectorised over the whole list (one compiled regex over the array, numpy
    for the rest; ~0.2 s per 100k names); the spellings may be mixed. `path`
    and `field` only serve the error message.

    Raises InputError(path, field, ...) naming how many names are malformed and
    showing the first few with their column positions (0-based).
    """
    names = np.asarray(names, dtype=object).ravel()
    n = len(names)
    fullmatch = _PEAK_RE.fullmatch
    groups = [m.groups() if (m := fullmatch(str(v).strip())) else _NO_MATCH for v in names]
    cols = tuple(zip(*groups)) if n else ((), (), ())
    chrom = np.array(cols[0], dtype=object)
    start_txt = np.array(cols[1], dtype=str)
    end_txt = np.array(cols[2], dtype=str)
    reason = np.where(chrom == "", _NO_COORDS, _OK).astype(np.int8)

    # Commas are rare: check those few numbers strictly, then drop the commas.
    for txt in (start_txt, end_txt):
        with_comma = np.flatnonzero(np.char.find(txt, ",") >= 0)
        for i in with_comma:
            if reason[i] == _OK and not _GROUPED_RE.fullmatch(txt[i]):
                reason[i] = _BAD_COMMA
        if len(with_comma):
            txt[with_comma] = np.char.replace(txt[with_comma], ",", "")
    too_long = (np.char.str_len(start_txt) > _MAX_DIGITS) | (np.char.str_len(end_txt) > _MAX_DIGITS)
    reason[(reason == _OK) & too_long] = _TOO_LARGE
    ok = reason == _OK
    start = np.zeros(n, dtype=np.int64)
    end = np.zeros(n, dtype=np.int64)
    start[ok] = start_txt[ok].astype(np.int64)
    end[ok] = end_txt[ok].astype(np.int64)
    reason[ok & (start >= end)] = _EMPTY

    bad = np.flatnonzero(reason != _OK)
    if len(bad):
        shown = ", ".join(
            f"#{i} {names[i]!r} ({_REASONS[reason[i]]})" for i in bad[:_N_SHOWN]
        )
        more = f" and {len(bad) - _N_SHOWN} more" if len(bad) > _N_SHOWN else ""
        raise InputError(
            path, field,
            f"{len(bad)} of {n} peak names are malformed (expected {PEAK_NAME_FORMATS} "
            f"with integers 0 <= start < end; column positions from 0): {shown}{more}",
        )
    return PeakSet(names=names, chrom=chrom, start=start, end=end)


def peak_frequency_mask(X, min_fraction: float, *, key: str = "peak_min_fraction") -> np.ndarray:
    """Boolean mask of the features non-zero in >= `min_fraction` of the rows of X.

    Compute it on the training cells only, then apply the same mask to every
    dataset (test cells must not influence which features exist).

    X is a cells x features matrix, normally scipy CSR; non-zeros are counted
    per column without densifying (explicitly stored zeros do not count, and
    duplicate entries are summed first). Dense arrays are accepted too.
    `min_fraction` must be in [0, 1); 0 keeps every feature. A bad value raises
    ConfigError naming `key` (the config key the caller took it from).
    """
    try:
        frac = float(min_fraction)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be a number in [0, 1), got {min_fraction!r}") from None
    if isinstance(min_fraction, bool) or not math.isfinite(frac) or not 0.0 <= frac < 1.0:
        raise ConfigError(key, f"must be a number in [0, 1), got {min_fraction!r}")

    if sp.issparse(X):
        X = sp.csr_matrix(X)  # no copy when already CSR
        n_rows, n_cols = X.shape
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        counts = np.bincount(X.indices[X.data != 0], minlength=n_cols)
    else:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        n_rows, n_cols = X.shape
        counts = np.count_nonzero(X, axis=0)
    if n_rows == 0:
        raise ValueError("peak_frequency_mask: X has no rows")
    # counts / n_rows is correctly rounded, so e.g. 3 of 10 rows passes 0.3.
    return counts / n_rows >= frac


def genomic_bins(peaks: PeakSet, bin_size: int, keys: np.ndarray | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """Assign each peak to the genomic bin of `bin_size` bp holding its start.

    Returns (M, keys): M is n_peaks x n_bins (0/1, CSR) so that `X @ M` sums a
    cells x peaks count matrix into bins; keys are the bin names "chrom:index".
    Pass the keys of another dataset to get its bins in the same order (peaks
    in bins that the keys lack are dropped; bins without peaks stay zero).
    Bins are defined by coordinates alone, so two lines with independently
    called peaks give comparable bin profiles without any peak mapping.
    """
    if bin_size <= 0:
        raise ValueError("bin_size must be > 0")
    idx = (peaks.start // int(bin_size)).astype(np.int64)
    key = np.char.add(np.char.add(peaks.chrom.astype(str), ":"), idx.astype(str))
    if keys is None:
        keys = np.unique(key)
    keys = np.asarray(keys).astype(str)
    col = pd.Index(keys).get_indexer(key)
    ok = col >= 0
    M = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (np.flatnonzero(ok), col[ok])),
                      shape=(len(key), len(keys)))
    return M, keys
