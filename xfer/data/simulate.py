"""A paired 10x-Multiome-like simulator of two cycling cell lines with known phases.

No public single-cell ATAC data set comes with lab-measured cell-cycle phases,
so this module stands in for one.  It simulates two cell lines ("simA" plays
the training line, e.g. REH; "simB" the test line, e.g. SUP-B15), each with a
gene-expression (GEX) and a chromatin-accessibility (PEAK) count matrix over
the same cells, plus the ground truth behind them.  All numbers below are the
module constants / ``LINE_SPECS``.

Generative model
================

Cells and the cycle
-------------------
Each cell gets a cycle position ``t`` in [0, 1) (stratified uniform draws, so
the realised phase proportions equal the line's).  ``t`` is a population
quantile (pseudotime): the phase boundaries are the cumulative proportions,
G1 = [0, g1), S = [g1, g1 + s), G2M = the rest.  The lines are G1-heavy with
different proportions (simA 50/28/22 %, simB 60/22/18 %).  S progress
``p = (t - g1) / s`` is 0 in G1 and 1 in G2M.  The label is the DNA-defined
phase; the transcriptional programs run on a per-cell clock ``t + e``
(e ~ N(0, 0.03)), so expression and phase disagree a little near boundaries,
as with lab-measured labels.  Cells are written in barcode order, as Cell
Ranger does, never in phase order.

Replication and DNA content
---------------------------
The synthetic genome (chr1..chr22, chrX with hg38 lengths) is cut into 1 Mb
bins; a smooth random field along each chromosome, squashed by a logistic,
gives every bin a replication time ``rt`` in (0, 1) (early ~ 0, late ~ 1) with
Mb-scale early and late domains.  The lines share most of the profile
(correlation 0.9); some domains switch timing between them.  In an S cell a
site is replicated when ``p > rt + jitter`` (jitter per cell and bin, sd 0.12
of S).  ``dna_content`` (1..2) is 1 in G1, 2 in G2M and 1 + the replicated
fraction of the line's sites in S.

Expression (GEX)
----------------
Genes are the 97 Tirosh et al. (2016) markers (43 S, 54 G2/M;
``xfer.phases.tirosh_genes``) plus synthetic genes (``SIMG00001``...) up to
``n_genes``; ids are fake Ensembl ids
(``ENSG9`` + 10 digits); features are in genomic order.  Each gene's TSS sits
on a regulatory site (its promoter).  The mean UMI count of gene g in cell c::

    mu = L_c * (1 + 0.8 t) * m_g * exp(line_g + aS_g S(t') + aG_g G(t') + z_c . w_g)

* ``m_g``: baseline mean UMIs, lognormal over genes (median 0.04, log-sd 1.9;
  markers drawn higher, median 0.8) - ~85 % zeros and ~4k genes per cell at
  the research size;
* ``L_c``: capture/library factor, lognormal (sd 0.35), line-specific median;
  ``1 + 0.8 t``: mRNA content grows through the cycle;
* ``S``, ``G``: periodic (von Mises) programs in [0, 1] at the program clock
  ``t'``.  S peaks mid-S and starts rising in late G1; G2/M rises in late S,
  peaks in G2M and decays into early G1 (daughters inherit G2/M transcripts);
* ``aS``, ``aG``: per-gene log-amplitudes.  S markers: aS ~ Gamma(4, 0.25)
  (mean 1.0, a ~2.7x swing) plus a little G2/M; G2/M markers: aG ~
  Gamma(4, 0.33) (mean 1.3) plus a little S.  About 4 % of synthetic genes
  follow one program weakly (mean 0.3): real data has more cycle genes than
  the markers;
* ``line_g``: simB's per-gene offset (sd 0.35; 4 % of genes strongly
  line-specific, +-2.5 on the log scale), recentred so simB's total
  expression is unchanged; simB's amplitudes are jittered per gene (sd 0.15);
* ``z_c . w_g``: three non-cycle cell states loading on ~10 % of genes and
  sites, with line-specific means.

Counts are negative binomial with per-gene dispersion phi in 0.05..0.5.

Accessibility (PEAK)
--------------------
Regulatory sites are spread along the genome (>= 4 kb apart); about 28 % are
gene promoters at the research size.  The mean number of Tn5 fragments at site j
in cell c::

    lam = s * D_c * cn_cj * [k * b_j * o_jl * exp(gamma (aS_g S + aG_g G) + z_c . v_j
                                                  + q_c (0.5 - rt_j) + e_c [promoter]) + bg_j]

* ``b_j``: baseline accessibility, Beta(0.6, 12) for distal sites, Beta(1.5, 5)
  for promoters (more for better-expressed genes); early-replicating sites are
  more open (active compartment);
* ``o_jl``: simB's per-site offset (log-sd 0.7, mean factor 1) and 8 % of the
  sites open only in simA, 8 % only in simB (x0.05 in the other line);
* ``cn_cj``: accessible copies - 1 in G1, 2 in G2M; in S a replicated site has
  1.6 (nascent chromatin is less accessible until it matures).  Total
  accessibility grows with DNA content, and early domains gain before late
  ones: the real, weak S-phase signal;
* ``k``: 0.85 per copy in G2M (chromatin compaction), else 1;
* ``gamma = 0.25``: promoters of cycle genes follow their gene's programs
  weakly (a 4x expression swing is ~1.4x in accessibility);
* ``q_c`` ~ N(0, 0.2): per-cell early-vs-late (compartment) swing, a nuisance
  that mimics replication; ``e_c`` ~ N(line, 0.25): per-cell promoter (TSS)
  enrichment, library quality (simB +0.3);
* ``bg_j``: background fragments in proportion to peak width (15 % of
  in-peak fragments in simA, 35 % in simB: different FRiP);
* ``D_c``: per-cell depth, lognormal (sd 0.45), line-specific median (simB
  0.6x simA), correlated (rho 0.4) with the GEX library factor as in Multiome
  data; ``s`` = 0.6 sets the overall sparsity.

Fragments are Poisson; each adds 1 or 2 Tn5 insertions (both cut sites fall in
the peak half the time), so counts are mostly 1 and 2 with ~91-92 % zeros.

Peak calling
------------
Each line calls its own peak set from the shared sites: the sites with the
highest (noisy, sd 0.7 on the log scale) line-specific accessibility.  Most
sites are called in both lines, some in one only.  15 % of the shared sites
get identical coordinates in both lines; otherwise each line jitters both
boundaries (sd 50 bp) and widths differ, so exact name matching finds ~14 %
of the peaks while a >= 1 bp overlap finds ~95 %.  In simB 2 % of the peaks
are the two halves of a split site (insertions shared binomially), giving
many-to-one matches.  Peaks are named ``chr1:1000-1500`` (start 0-based, end
exclusive, as in BED), sorted and non-overlapping; simA calls ``n_peaks``
peaks, simB 3 % more.

Everything is deterministic given ``seed``: every random step draws from its
own child of ``numpy.random.SeedSequence(seed)``.  Cells are generated in
fixed chunks of 256, so the research size (2 x ~7.5k cells, 28k genes, 92k peaks)
never needs a dense cells x peaks array (about 2 minutes, < 3 GB on 2 cores).

Varied pairs
------------
``draw_settings(seed)`` draws a pair's assumptions (``SimSettings``) and its
cells per line from ``VARIED_RANGES`` (``xfer simulate --vary``): phase
proportions per line (G1 45-80 %), how strongly phase shows in accessibility
(nascent-copy accessibility 0.3-0.9, promoter coupling 0.1-0.45, G2/M
compaction 0.7-1.0), how different the two lines' replication timing is
(correlation 0.6-0.97), depth (per-cell sd 0.3-0.7, simB's median 0.4-1.2x
simA's) and its link to DNA content (fragments grow as DNA content ** 0.4-1.0),
FRiP per line, simB's TSS enrichment and non-cycle states, how the lines' peaks
differ (site offsets, line-only sites 3-15 %, identical boundaries 0-40 %,
boundary jitter 20-150 bp, split peaks 0-6 %, simB calling 0.7-1.3x simA's
peaks) and 800-7,500 cells per line.  The defaults (no settings) are the
constants above and give exactly the unvaried simulator.

Honesty
-------
Plain baselines are deliberately not near-perfect: phases blend at their
boundaries, the transcriptional clock is noisy, G2/M transcripts linger into
early G1, depths vary more than the cycle changes them, compartment noise
mimics replication, and the lines differ in depth, FRiP, TSS enrichment,
baseline expression and accessibility, replication timing and phase
proportions.  ``bench/sim_difficulty.py`` prints within-line and cross-line
baseline accuracies (at size "small": expression LR ~0.8, peak LSI + LR
~0.6-0.65, naive peak transfer A -> B ~0.47, per-line-aligned ~0.66).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..phases import N_TIROSH, PHASES, tirosh_genes
from .dataset import CellMatrix, make_matrix

__all__ = [
    "SIZES",
    "SIZE_ALIASES",
    "size_name",
    "SimSize",
    "SimulatedLine",
    "LineSpec",
    "LINE_SPECS",
    "SimSettings",
    "VARIED_RANGES",
    "draw_settings",
    "simulate_pair",
    "write_simulation",
]

# --------------------------------------------------------------------------- sizes

PEAKS_B_RATIO = 1.03  # simB calls this many times simA's peaks
CALLED_FRACTION = 0.92  # each line calls about this fraction of the shared sites


@dataclass(frozen=True)
class SimSize:
    """How big a simulated pair is.  Line A calls ``n_peaks`` peaks, line B ~3 % more."""

    n_cells_a: int
    n_cells_b: int
    n_genes: int
    n_peaks: int

    def __post_init__(self) -> None:
        if min(self.n_cells_a, self.n_cells_b) < 30:
            raise ValueError("SimSize needs at least 30 cells per line")
        if self.n_genes < N_TIROSH:
            raise ValueError(f"SimSize.n_genes must be >= {N_TIROSH} (the Tirosh markers)")
        if self.n_peaks < 200:
            raise ValueError("SimSize.n_peaks must be >= 200")
        if self.n_genes > 0.9 * self.n_sites:
            raise ValueError(
                f"SimSize: {self.n_genes} genes need promoter sites but n_peaks={self.n_peaks} "
                f"gives only {self.n_sites} sites; use n_peaks >= n_genes"
            )

    @property
    def n_peaks_a(self) -> int:
        return self.n_peaks

    @property
    def n_peaks_b(self) -> int:
        return int(round(self.n_peaks * PEAKS_B_RATIO))

    @property
    def n_sites(self) -> int:
        """Shared regulatory sites the two peak sets are called from."""
        return int(math.ceil(max(self.n_peaks_a, self.n_peaks_b) / CALLED_FRACTION))


SIZE_ALIASES: dict[str, str] = {"seed": "research"}  # old name -> name


class _SizeTable(dict):
    """The named sizes; an old name (SIZE_ALIASES) still looks its size up, with a note."""

    def __missing__(self, name):
        if name not in SIZE_ALIASES:
            raise KeyError(name)
        return self[size_name(name)]


def size_name(name: str) -> str:
    """`name` itself, or the name an old size name now has (logging a one-line note);
    ValueError for a name that is neither."""
    if name in SIZES:
        return name
    if name in SIZE_ALIASES:
        new = SIZE_ALIASES[name]
        logging.getLogger(__name__).info("size '%s' is the old name of size '%s'", name, new)
        return new
    raise ValueError(f"unknown simulation size {name!r}; choose one of {', '.join(SIZES)}")


# "research": the size of the original research code's data (REH and SUP-B15 lines).
SIZES: dict[str, SimSize] = _SizeTable({
    "tiny": SimSize(300, 320, 600, 2_000),
    "small": SimSize(1_500, 1_600, 3_000, 10_000),
    "medium": SimSize(3_000, 3_200, 8_000, 30_000),
    "research": SimSize(7_432, 7_728, 28_105, 92_328),
})

# ------------------------------------------------------------------- line specs


@dataclass(frozen=True)
class LineSpec:
    """The line-level knobs of the generative model (see the module docstring)."""

    name: str
    phase_props: tuple[float, float, float]  # G1, S, G2M
    gex_median_factor: float  # median library factor L_c
    atac_median_depth: float  # median fragment-depth factor D_c
    atac_background: float  # share of in-peak fragments that are background (not accessibility)
    promoter_enrichment: float  # mean log promoter (TSS) enrichment of the library
    state_means: tuple[float, float, float]  # means of the 3 non-cycle cell states


LINE_SPECS: tuple[LineSpec, LineSpec] = (
    LineSpec("simA", (0.50, 0.28, 0.22), 1.00, 1.00, 0.15, 0.0, (0.0, 0.0, 0.0)),
    LineSpec("simB", (0.60, 0.22, 0.18), 0.75, 0.60, 0.35, 0.3, (0.6, -0.4, 0.3)),
)

# ----------------------------------------------------------- model constants

CHROMOSOMES: tuple[tuple[str, int], ...] = (
    ("chr1", 248_956_422), ("chr2", 242_193_529), ("chr3", 198_295_559),
    ("chr4", 190_214_555), ("chr5", 181_538_259), ("chr6", 170_805_979),
    ("chr7", 159_345_973), ("chr8", 145_138_636), ("chr9", 138_394_717),
    ("chr10", 133_797_422), ("chr11", 135_086_622), ("chr12", 133_275_309),
    ("chr13", 114_364_328), ("chr14", 107_043_718), ("chr15", 101_991_189),
    ("chr16", 90_338_345), ("chr17", 83_257_441), ("chr18", 80_373_285),
    ("chr19", 58_617_616), ("chr20", 64_444_167), ("chr21", 46_709_983),
    ("chr22", 50_818_468), ("chrX", 156_040_895),
)
RT_BIN = 1_000_000  # replication-timing bin (bp)
RT_SMOOTH_BINS = 2.5  # correlation length of the timing field, in bins
RT_LINE_CORR = 0.9  # correlation of the two lines' timing fields
RT_JITTER = 0.12  # per cell and bin replication-time jitter (in S-progress units)
NASCENT_ACCESS = 0.6  # accessibility of a freshly replicated copy, relative to a mature one
MIN_SITE_GAP = 4_000  # bp between site centres (called peaks never overlap)
GENE_MEDIAN_UMI = 0.04  # median over genes of the mean UMIs per cell (G1, median library)
GENE_LOG_SD = 1.9  # sd over genes of the log mean
SIZE_GROWTH = 0.8  # mRNA content: 1 -> 1.8 over the cycle
PROGRAM_TIME_SD = 0.03  # transcriptional clock vs the DNA-defined phase (cycle fraction)
GEX_LIB_SD = 0.35  # per-cell log library factor
ATAC_DEPTH_SD = 0.45  # per-cell log fragment depth
DEPTH_CORR = 0.4  # correlation of the two log depths of a cell
ATAC_SCALE = 0.6  # fragments per unit of b_j at median depth (sets the ~91 % zeros)
TSS_ENRICHMENT_SD = 0.25  # per-cell log promoter enrichment (library quality)
COMPARTMENT_SD = 0.2  # per-cell early-vs-late (active compartment) accessibility swing
G2M_PER_COPY = 0.85  # chromatin compaction in G2/M
PROMOTER_COUPLING = 0.25  # gamma: promoter accessibility per unit of gene log-amplitude
INSERT_BOTH_ENDS = 0.5  # chance a fragment puts both its Tn5 insertions in the peak
SITE_LINE_SD = 0.7  # sd of simB's per-site log accessibility offset
SITE_LINE_ONLY = 0.08  # share of sites open only in simA (and again only in simB)
SHARED_IDENTICAL = 0.15  # shared sites both lines call with identical boundaries
BOUNDARY_JITTER_SD = 50.0  # bp, per peak boundary and line
SPLIT_FRACTION_B = 0.02  # simB peaks that are halves of a split site
N_STATES = 3  # non-cycle cell states
CHUNK_CELLS = 256  # fixed, so the output does not depend on memory settings
_LARGE_MEAN = 30.0  # above this, counts come from numpy's own samplers


# ------------------------------------------------------------- pair settings


@dataclass(frozen=True)
class SimSettings:
    """The assumptions a simulated pair is made under.  The defaults are the module
    constants above (``simulate_pair`` without settings); ``draw_settings`` draws every
    field from ``VARIED_RANGES`` so that a benchmark can span the assumptions a method
    could overfit: how strongly phase shows in accessibility, how different the lines'
    replication timing is, depth and its link to DNA content, phase proportions and peak
    calling.
    """

    lines: tuple[LineSpec, LineSpec] = LINE_SPECS
    rt_line_corr: float = RT_LINE_CORR            # correlation of the two lines' timing fields
    nascent_access: float = NASCENT_ACCESS        # accessibility of a freshly replicated copy
    promoter_coupling: float = PROMOTER_COUPLING  # promoter accessibility per unit of gene log-amplitude
    g2m_per_copy: float = G2M_PER_COPY            # chromatin compaction in G2/M
    atac_depth_sd: float = ATAC_DEPTH_SD          # per-cell log fragment depth
    dna_depth_exponent: float = 1.0               # fragments grow as DNA content ** this (1: in proportion)
    site_line_sd: float = SITE_LINE_SD            # simB's per-site log accessibility offset
    site_line_only: float = SITE_LINE_ONLY        # share of sites open in one line only (each way)
    shared_identical: float = SHARED_IDENTICAL    # shared sites called with identical boundaries
    boundary_jitter_sd: float = BOUNDARY_JITTER_SD  # bp, per peak boundary and line
    split_fraction_b: float = SPLIT_FRACTION_B    # simB peaks that are halves of a split site
    peaks_b_ratio: float = PEAKS_B_RATIO          # simB calls this many times simA's peaks

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


#: Documented ranges of ``draw_settings`` (uniform; "log" ones log-uniform).  Chosen a
#: priori to span plausible cell-line pairs, never tuned towards any model.
VARIED_RANGES: dict[str, tuple] = {
    "n_cells": (800, 7_500, "log"),          # per line, drawn independently
    "g1_fraction": (0.45, 0.80),             # per line: G1-heavy, as real cell lines are
    "s_share_of_cycling": (0.45, 0.65),      # per line: S / (S + G2M)
    "depth_ratio_b": (0.4, 1.2, "log"),      # simB's median fragment depth relative to simA's
    "gex_ratio_b": (0.6, 1.2, "log"),        # simB's median GEX library factor relative to simA's
    "background": (0.10, 0.45),              # per line: background share of in-peak fragments (FRiP)
    "promoter_enrichment_b": (-0.2, 0.5),    # simB's mean log TSS enrichment (simA 0)
    "state_mean_b": (-0.6, 0.6),             # simB's mean of each non-cycle state
    "rt_line_corr": (0.6, 0.97),
    "nascent_access": (0.3, 0.9),
    "promoter_coupling": (0.1, 0.45),
    "g2m_per_copy": (0.7, 1.0),
    "atac_depth_sd": (0.3, 0.7),
    "dna_depth_exponent": (0.4, 1.0),
    "site_line_sd": (0.4, 1.0),
    "site_line_only": (0.03, 0.15),
    "shared_identical": (0.0, 0.4),
    "boundary_jitter_sd": (20.0, 150.0),
    "split_fraction_b": (0.0, 0.06),
    "peaks_b_ratio": (0.7, 1.3),
}


def draw_settings(seed: int, size: str | SimSize = "medium") -> tuple[SimSize, SimSettings]:
    """A pair's size (cells per line drawn, genes and peaks from `size`) and settings, each
    drawn from ``VARIED_RANGES`` with a generator of its own (independent of the pair's
    simulation streams)."""
    base = _resolve_size(size)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E77]))

    def u(key):
        lo, hi, *log = VARIED_RANGES[key]
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if log else float(rng.uniform(lo, hi))

    n_cells = [int(round(u("n_cells"))) for _ in range(2)]
    props = []
    for _ in range(2):
        g1 = u("g1_fraction")
        s = (1.0 - g1) * u("s_share_of_cycling")
        props.append((round(g1, 4), round(s, 4), round(1.0 - g1 - s, 4)))
    a, b = LINE_SPECS
    depth_b, gex_b = u("depth_ratio_b"), u("gex_ratio_b")
    bg = (u("background"), u("background"))
    lines = (LineSpec(a.name, props[0], a.gex_median_factor, a.atac_median_depth, bg[0], a.promoter_enrichment,
                      a.state_means),
             LineSpec(b.name, props[1], a.gex_median_factor * gex_b, a.atac_median_depth * depth_b, bg[1],
                      u("promoter_enrichment_b"), tuple(u("state_mean_b") for _ in range(N_STATES))))
    fields = ("rt_line_corr", "nascent_access", "promoter_coupling", "g2m_per_copy", "atac_depth_sd",
              "dna_depth_exponent", "site_line_sd", "site_line_only", "shared_identical", "boundary_jitter_sd",
              "split_fraction_b", "peaks_b_ratio")
    settings = SimSettings(lines=lines, **{f: u(f) for f in fields})
    return SimSize(n_cells[0], n_cells[1], base.n_genes, base.n_peaks), settings


def _n_peaks_b(size: SimSize, st: SimSettings) -> int:
    return int(round(size.n_peaks * st.peaks_b_ratio))


def _n_sites(size: SimSize, st: SimSettings) -> int:
    return int(math.ceil(max(size.n_peaks_a, _n_peaks_b(size, st)) / CALLED_FRACTION))


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class SimulatedLine:
    """One simulated cell line: paired GEX and PEAK matrices and the truth behind them.

    truth  one row per cell (same order as the matrices): barcode, line, phase,
           cycle_position (0..1), s_progress (0..1), dna_content (1..2),
           program_time (the transcriptional clock), gex_library_factor,
           atac_depth_factor, tss_enrichment, compartment, state_1..state_3,
           gex_total_counts, peak_total_counts
    genes  one row per gene (matrix column order): gene_id, symbol, chrom,
           start, end, strand, interval, tirosh ('S' / 'G2M' / ''), amp_s,
           amp_g2m (this line's log-amplitudes), base_mean, promoter_site
    peaks  one row per peak (matrix column order): name, chrom, start, end,
           site (shared site index, the key for cross-line truth), part
           (0, or 1/2 for the halves of a split site), replication_time,
           promoter_of (gene symbol or '')
    """

    name: str
    gex: CellMatrix
    peak: CellMatrix
    truth: pd.DataFrame
    genes: pd.DataFrame | None = None
    peaks: pd.DataFrame | None = None


# ------------------------------------------------------------ random streams


class _Streams:
    """Named, independent random generators derived from one seed."""

    _NAMES = ("genome", "genes", "sites", "calls", "barcodes", "lineA", "lineB")

    def __init__(self, seed: int):
        children = np.random.SeedSequence(seed).spawn(len(self._NAMES))
        self.seqs = dict(zip(self._NAMES, children))

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng(self.seqs[name])

    def line_seq(self, index: int) -> np.random.SeedSequence:
        return self.seqs["lineA" if index == 0 else "lineB"]


# ----------------------------------------------------------------- genome


@dataclass(frozen=True)
class _Sites:
    """Shared regulatory sites, sorted by (chromosome, centre)."""

    chrom: np.ndarray  # int16 index into CHROMOSOMES
    centre: np.ndarray  # int64
    width: np.ndarray  # int64
    rt_bin: np.ndarray  # int64 global bin index
    rt: tuple[np.ndarray, np.ndarray]  # replication time per global bin, per line
    n_bins: int


def _smooth_field(rng: np.random.Generator, n: int) -> np.ndarray:
    """A unit-variance random field along n bins, Gaussian-smoothed (periodic padding avoided)."""
    half = int(4 * RT_SMOOTH_BINS) + 1
    x = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (x / RT_SMOOTH_BINS) ** 2)
    noise = rng.standard_normal(n + 2 * half)
    field = np.convolve(noise, kernel, mode="valid")[:n]
    return field / np.sqrt((kernel**2).sum())


def _replication_timing(rng: np.random.Generator, line_corr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin replication times for both lines and the first bin of each chromosome."""
    n_bins = [length // RT_BIN + 1 for _, length in CHROMOSOMES]
    offsets = np.concatenate([[0], np.cumsum(n_bins)])
    z_a = np.concatenate([_smooth_field(rng, n) for n in n_bins])
    z_other = np.concatenate([_smooth_field(rng, n) for n in n_bins])
    z_b = line_corr * z_a + math.sqrt(1 - line_corr**2) * z_other

    def squash(z: np.ndarray) -> np.ndarray:
        return np.clip(1.0 / (1.0 + np.exp(-2.0 * z)), 0.02, 0.98)

    return squash(z_a), squash(z_b), offsets


def _make_sites(rng: np.random.Generator, n_sites: int, st: SimSettings) -> _Sites:
    lengths = np.array([length for _, length in CHROMOSOMES], dtype=np.float64)
    per_chrom = np.floor(n_sites * lengths / lengths.sum()).astype(np.int64)
    per_chrom[np.argsort(-lengths)[: n_sites - per_chrom.sum()]] += 1
    rt_a, rt_b, bin_offsets = _replication_timing(rng, st.rt_line_corr)

    chrom, centre = [], []
    for ci, ((_, length), n) in enumerate(zip(CHROMOSOMES, per_chrom)):
        margin = 20_000
        free = length - 2 * margin - n * MIN_SITE_GAP
        gaps = rng.exponential(1.0, n + 1)
        gaps *= free / gaps.sum()
        pos = margin + np.cumsum(gaps[:n] + MIN_SITE_GAP).astype(np.int64)
        chrom.append(np.full(n, ci, dtype=np.int16))
        centre.append(pos)
    chrom_arr = np.concatenate(chrom)
    centre_arr = np.concatenate(centre)
    width = np.clip(rng.lognormal(math.log(600), 0.45, n_sites), 200, 2_500).astype(np.int64)
    rt_bin = bin_offsets[chrom_arr] + centre_arr // RT_BIN
    return _Sites(chrom_arr, centre_arr, width, rt_bin, (rt_a, rt_b), int(bin_offsets[-1]))


# ------------------------------------------------------------------ genes


@dataclass(frozen=True)
class _Genes:
    table: pd.DataFrame  # genomic order; columns as SimulatedLine.genes (line-free ones)
    log_mean: np.ndarray  # log baseline mean UMIs (line A)
    line_offset: np.ndarray  # log offset of line B relative to A
    amp_s: tuple[np.ndarray, np.ndarray]  # per line
    amp_g: tuple[np.ndarray, np.ndarray]
    inv_dispersion: np.ndarray  # NB size r = 1 / phi
    state_loadings: np.ndarray  # N_STATES x genes


def _make_genes(rng: np.random.Generator, n_genes: int, sites: _Sites) -> _Genes:
    s_genes, g2m_genes = tirosh_genes()
    n_syn = n_genes - N_TIROSH
    symbols = np.array(s_genes + g2m_genes + [f"SIMG{i + 1:05d}" for i in range(n_syn)], dtype=object)
    tirosh = np.array(["S"] * len(s_genes) + ["G2M"] * len(g2m_genes) + [""] * n_syn, dtype=object)

    # Promoter sites: distinct, then genes are put in genomic order.
    promoter = np.sort(rng.choice(len(sites.centre), size=n_genes, replace=False))
    order = rng.permutation(n_genes)  # which gene sits on which promoter
    symbols, tirosh = symbols[order], tirosh[order]
    is_s, is_g = tirosh == "S", tirosh == "G2M"

    log_mean = rng.normal(math.log(GENE_MEDIAN_UMI), GENE_LOG_SD, n_genes)
    log_mean[is_s | is_g] = rng.normal(math.log(0.8), 0.8, int((is_s | is_g).sum()))

    amp_s = np.zeros(n_genes)
    amp_g = np.zeros(n_genes)
    amp_s[is_s] = rng.gamma(4.0, 0.25, is_s.sum())
    amp_g[is_s] = rng.gamma(2.0, 0.12, is_s.sum())
    amp_g[is_g] = rng.gamma(4.0, 0.33, is_g.sum())
    amp_s[is_g] = rng.gamma(2.0, 0.12, is_g.sum())
    synthetic = np.flatnonzero(tirosh == "")
    weak = rng.random(synthetic.size) < 0.04
    weak_idx = synthetic[weak]
    to_s = rng.random(weak_idx.size) < 0.5
    amp_s[weak_idx[to_s]] = rng.gamma(2.0, 0.15, to_s.sum())
    amp_g[weak_idx[~to_s]] = rng.gamma(2.0, 0.15, (~to_s).sum())

    # Line B: per-gene offsets, a few line-specific genes, jittered amplitudes.
    line_offset = rng.normal(0.0, 0.35, n_genes)
    specific = rng.random(n_genes) < 0.04
    line_offset[specific] = rng.choice([-1.0, 1.0], specific.sum()) * rng.normal(2.5, 0.5, specific.sum())
    # Keep simB's total expression comparable, so its library factor means what it says.
    line_offset -= np.log(np.exp(log_mean + line_offset).sum() / np.exp(log_mean).sum())
    jitter = np.exp(rng.normal(0.0, 0.15, (2, n_genes)))
    amp_s_b, amp_g_b = amp_s * jitter[0], amp_g * jitter[1]

    phi = np.exp(rng.uniform(math.log(0.05), math.log(0.5), n_genes))
    loadings = rng.normal(0.0, 0.3, (N_STATES, n_genes)) * (rng.random((N_STATES, n_genes)) < 0.1)

    chrom = sites.chrom[promoter]
    tss = sites.centre[promoter]
    strand = np.where(rng.random(n_genes) < 0.5, "+", "-")
    length = np.clip(rng.lognormal(math.log(25_000), 1.0, n_genes), 1_000, 1_500_000).astype(np.int64)
    chrom_len = np.array([length for _, length in CHROMOSOMES])[chrom]
    start = np.where(strand == "+", tss, np.maximum(tss - length, 1))
    end = np.where(strand == "+", np.minimum(tss + length, chrom_len), tss)
    names = np.array([c for c, _ in CHROMOSOMES], dtype=object)[chrom]
    table = pd.DataFrame(
        {
            "gene_id": [f"ENSG9{i + 1:010d}" for i in range(n_genes)],
            "symbol": symbols,
            "chrom": names,
            "start": start,
            "end": end,
            "strand": strand,
            "interval": [f"{c}:{s}-{e}" for c, s, e in zip(names, start, end)],
            "tirosh": tirosh,
            "promoter_site": promoter,
        }
    )
    return _Genes(table, log_mean, line_offset, (amp_s, amp_s_b), (amp_g, amp_g_b), 1.0 / phi, loadings)


# ------------------------------------------------------------ site effects


@dataclass(frozen=True)
class _SiteModel:
    base: tuple[np.ndarray, np.ndarray]  # b_j * o_jl per line (fragments, G1, median depth)
    amp_s: tuple[np.ndarray, np.ndarray]  # promoter coupling (gamma * gene amplitude), per line
    amp_g: tuple[np.ndarray, np.ndarray]
    state_loadings: np.ndarray  # N_STATES x sites
    promoter_of: np.ndarray  # gene symbol or '' per site


def _make_site_model(rng: np.random.Generator, sites: _Sites, genes: _Genes, st: SimSettings) -> _SiteModel:
    n = len(sites.centre)
    base = rng.beta(0.6, 12.0, n)
    prom = genes.table["promoter_site"].to_numpy()
    expr_z = (genes.log_mean - genes.log_mean.mean()) / genes.log_mean.std()
    base[prom] = rng.beta(1.5, 5.0, prom.size) * np.exp(np.clip(0.35 * expr_z, -1.0, 1.0))
    base *= np.exp(0.6 * (0.5 - sites.rt[0][sites.rt_bin]))  # early domains are more open

    offset_b = rng.normal(-0.5 * st.site_line_sd**2, st.site_line_sd, n)  # mean factor 1
    base_a, base_b = base.copy(), base * np.exp(offset_b)
    only = rng.random(n)
    base_b[only < st.site_line_only] *= 0.05  # open in A only
    base_a[(only >= st.site_line_only) & (only < 2 * st.site_line_only)] *= 0.05  # open in B only

    amps_s, amps_g = [], []
    for li in range(2):
        a_s, a_g = np.zeros(n), np.zeros(n)
        a_s[prom] = st.promoter_coupling * genes.amp_s[li]
        a_g[prom] = st.promoter_coupling * genes.amp_g[li]
        amps_s.append(a_s)
        amps_g.append(a_g)

    loadings = rng.normal(0.0, 0.2, (N_STATES, n)) * (rng.random((N_STATES, n)) < 0.1)
    promoter_of = np.full(n, "", dtype=object)
    promoter_of[prom] = genes.table["symbol"].to_numpy()
    return _SiteModel((base_a, base_b), tuple(amps_s), tuple(amps_g), loadings, promoter_of)


# ------------------------------------------------------------ peak calling


@dataclass(frozen=True)
class _PeakSet:
    """One line's called peaks: columns of its PEAK matrix, in genomic order."""

    table: pd.DataFrame  # as SimulatedLine.peaks
    sites: np.ndarray  # distinct called sites (simulation columns), sorted
    col_of_site: np.ndarray  # for each simulated site, its first peak column
    split_frac: np.ndarray  # for each simulated site: 0 (not split) or part-1 share


def _call_peaks(rng: np.random.Generator, sites: _Sites, model: _SiteModel,
                size: SimSize, st: SimSettings) -> tuple[_PeakSet, _PeakSet]:
    n = len(sites.centre)
    n_peaks_b = _n_peaks_b(size, st)
    n_split_b = int(round(n_peaks_b * st.split_fraction_b))
    called = []
    for li, n_sites_called in enumerate((size.n_peaks_a, n_peaks_b - n_split_b)):
        score = np.log(model.base[li]) + rng.normal(0.0, 0.7, n)
        called.append(np.sort(np.argsort(-score)[:n_sites_called]))

    identical = rng.random(n) < st.shared_identical
    shared_start = sites.centre - sites.width // 2
    shared_end = shared_start + sites.width
    peak_sets = []
    for li, chosen in enumerate(called):
        w = np.clip(sites.width[chosen] * np.exp(rng.normal(0.0, 0.15, chosen.size)), 150, 3_000)
        jit = rng.normal(0.0, st.boundary_jitter_sd, (2, chosen.size))
        start = np.round(sites.centre[chosen] - w / 2 + jit[0]).astype(np.int64)
        end = np.round(sites.centre[chosen] + w / 2 + jit[1]).astype(np.int64)
        same = identical[chosen]
        start[same], end[same] = shared_start[chosen][same], shared_end[chosen][same]
        end = np.maximum(end, start + 100)
        split = np.zeros(chosen.size, dtype=bool)
        if li == 1:  # exactly n_split_b wide-enough sites become two sub-peaks
            wide = np.flatnonzero(end - start > 500)
            split[rng.choice(wide, size=min(n_split_b, wide.size), replace=False)] = True
        peak_sets.append(_build_peak_set(rng, sites, model, li, chosen, start, end, split))
    return peak_sets[0], peak_sets[1]


def _build_peak_set(rng, sites: _Sites, model: _SiteModel, li: int, chosen: np.ndarray,
                    start: np.ndarray, end: np.ndarray, split: np.ndarray) -> _PeakSet:
    """Expand split sites into two sub-peaks and lay out the peak table."""
    rows_site, rows_start, rows_end, rows_part = [], [], [], []
    frac = np.zeros(chosen.size)
    cut = rng.uniform(0.35, 0.65, chosen.size)
    gap = rng.integers(40, 160, chosen.size)
    for k in range(chosen.size):
        s, e = int(start[k]), int(end[k])
        if split[k]:
            m = s + int((e - s) * cut[k])
            g = int(gap[k]) // 2
            rows_site += [chosen[k], chosen[k]]
            rows_start += [s, m + g]
            rows_end += [m - g, e]
            rows_part += [1, 2]
            frac[k] = (m - g - s) / ((m - g - s) + (e - m - g))
        else:
            rows_site.append(chosen[k])
            rows_start.append(s)
            rows_end.append(e)
            rows_part.append(0)
    site_arr = np.array(rows_site, dtype=np.int64)
    chrom_names = np.array([c for c, _ in CHROMOSOMES], dtype=object)[sites.chrom[site_arr]]
    start_arr, end_arr = np.array(rows_start, np.int64), np.array(rows_end, np.int64)
    table = pd.DataFrame(
        {
            "name": [f"{c}:{s}-{e}" for c, s, e in zip(chrom_names, start_arr, end_arr)],
            "chrom": chrom_names,
            "start": start_arr,
            "end": end_arr,
            "site": site_arr,
            "part": np.array(rows_part, dtype=np.int8),
            "replication_time": sites.rt[li][sites.rt_bin[site_arr]],
            "promoter_of": model.promoter_of[site_arr],
        }
    )
    col_of_site = np.searchsorted(site_arr, chosen)  # first column of each chosen site
    return _PeakSet(table, chosen, col_of_site, frac)


# ------------------------------------------------------------------- cells


def _von_mises_bump(t: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """A periodic bump on [0, 1): 1 at centre, 0.5 at +-half_width, 0 opposite."""
    kappa = math.log(2.0) / (1.0 - math.cos(2.0 * math.pi * half_width))
    raw = np.exp(kappa * (np.cos(2.0 * math.pi * (t - centre)) - 1.0))
    floor = math.exp(-2.0 * kappa)
    return (raw - floor) / (1.0 - floor)


def _programs(t: np.ndarray, spec: LineSpec) -> tuple[np.ndarray, np.ndarray]:
    """S and G2/M program activities (0..1) at cycle positions t."""
    g1, s, g2m = spec.phase_props
    s_prog = _von_mises_bump(t, g1 + 0.45 * s, 0.5 * s + 0.04)
    g_prog = _von_mises_bump(t, g1 + s + 0.5 * g2m, 0.5 * g2m + 0.06)
    return s_prog, g_prog


def _make_barcodes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n unique 10x-like barcodes (16 nt + '-1')."""
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    seqs: np.ndarray = np.empty(0, dtype="S16")
    while seqs.size < n:
        codes = rng.integers(0, 4, (n - seqs.size + 16, 16))
        new = letters[codes].view("S16").ravel()
        seqs = np.concatenate([seqs, new])
        _, first = np.unique(seqs, return_index=True)
        seqs = seqs[np.sort(first)]
    return np.array([s.decode() + "-1" for s in seqs[:n]], dtype=object)


def _make_cells(rng: np.random.Generator, spec: LineSpec, barcodes: np.ndarray, st: SimSettings) -> pd.DataFrame:
    """The per-cell truth except the count totals and DNA content; sorted by barcode."""
    n = barcodes.size
    g1, s, _ = spec.phase_props
    t = (rng.permutation(n) + rng.random(n)) / n  # stratified: proportions come out as specified
    phase = np.where(t < g1, 0, np.where(t < g1 + s, 1, 2)).astype(np.int8)
    progress = np.clip((t - g1) / s, 0.0, 1.0)
    z = rng.multivariate_normal([0.0, 0.0], [[1.0, DEPTH_CORR], [DEPTH_CORR, 1.0]], n)
    states = rng.standard_normal((n, N_STATES)) + np.asarray(spec.state_means)
    cells = pd.DataFrame(
        {
            "barcode": barcodes,
            "line": spec.name,
            "phase": np.array(PHASES, dtype=object)[phase],
            "phase_code": phase,
            "cycle_position": t,
            "s_progress": progress,
            "program_time": np.mod(t + rng.normal(0.0, PROGRAM_TIME_SD, n), 1.0),
            "gex_library_factor": spec.gex_median_factor * np.exp(GEX_LIB_SD * z[:, 0]),
            "atac_depth_factor": spec.atac_median_depth * np.exp(st.atac_depth_sd * z[:, 1]),
            "tss_enrichment": np.exp(rng.normal(spec.promoter_enrichment, TSS_ENRICHMENT_SD, n)),
            "compartment": rng.normal(0.0, COMPARTMENT_SD, n),
        }
    )
    for k in range(N_STATES):
        cells[f"state_{k + 1}"] = states[:, k]
    return cells.sort_values("barcode", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- sampling


def _sample_counts(rng: np.random.Generator, mu: np.ndarray, size: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact Poisson (size None) or negative-binomial draws for a dense float32 mean block.

    Uses the inverse CDF: one uniform and one exp per entry decides zero / non-zero
    (most entries are zero), then a short recursion over the non-zero entries only.
    ``size`` (NB size r = 1/phi) broadcasts over the last axis.  Returns the flat
    indices of the non-zero entries (ascending) and their counts.
    """
    u = rng.random(mu.shape, dtype=np.float32)
    if size is None:
        p0 = np.exp(-mu)
    else:
        p0 = np.exp(-size * np.log1p(mu / size)).astype(np.float32)
    flat = np.flatnonzero(u > p0)
    del p0
    m = mu.ravel()[flat].astype(np.float64)
    uu = u.ravel()[flat].astype(np.float64)
    del u
    counts = np.zeros(flat.size, dtype=np.int64)
    r = None if size is None else np.asarray(size, dtype=np.float64)[flat % mu.shape[-1]]

    large = m > _LARGE_MEAN
    if large.any():
        lm = m[large]
        lam = lm if r is None else rng.gamma(r[large], lm / r[large])
        counts[large] = np.maximum(rng.poisson(lam), 1)

    active = np.flatnonzero(~large)
    ma, ua = m[active], uu[active]
    if r is None:
        p = np.exp(-ma)
        ra = q = None
    else:
        ra = r[active]
        q = ma / (ma + ra)
        p = np.exp(-ra * np.log1p(ma / ra))
    cdf = p.copy()
    k = 0
    while active.size:
        p = p * ma / (k + 1) if ra is None else p * (k + ra) / (k + 1) * q
        cdf += p
        k += 1
        done = (ua <= cdf) | (k >= 400)
        counts[active[done]] = k
        keep = ~done
        active, ma, ua, p, cdf = active[keep], ma[keep], ua[keep], p[keep], cdf[keep]
        if ra is not None:
            ra, q = ra[keep], q[keep]
    return flat, counts


def _coo_block_to_csr(flat: np.ndarray, counts: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    rows, cols = np.divmod(flat, shape[1])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
    return sp.csr_matrix((counts.astype(np.float32), cols.astype(np.int32), indptr), shape=shape)


def _chunks(n: int) -> Iterable[slice]:
    for start in range(0, n, CHUNK_CELLS):
        yield slice(start, min(start + CHUNK_CELLS, n))


def _simulate_gex(seq: np.random.SeedSequence, cells: pd.DataFrame, spec: LineSpec, li: int,
                  genes: _Genes) -> sp.csr_matrix:
    """UMI counts, cells x genes, generated in chunks of CHUNK_CELLS cells."""
    t = cells["cycle_position"].to_numpy()
    s_prog, g_prog = _programs(cells["program_time"].to_numpy(), spec)
    log_lib = np.log(cells["gex_library_factor"].to_numpy() * (1.0 + SIZE_GROWTH * t)).astype(np.float32)
    states = cells[[f"state_{k + 1}" for k in range(N_STATES)]].to_numpy(np.float32)
    base = (genes.log_mean + (genes.line_offset if li == 1 else 0.0)).astype(np.float32)
    amp_s, amp_g = genes.amp_s[li], genes.amp_g[li]
    cyc = np.flatnonzero((amp_s > 0) | (amp_g > 0))  # genes with a cycle program
    amp_s, amp_g = amp_s[cyc].astype(np.float32), amp_g[cyc].astype(np.float32)
    loadings = genes.state_loadings.astype(np.float32)
    r = genes.inv_dispersion.astype(np.float32)
    blocks = []
    chunk_slices = list(_chunks(len(cells)))
    for sl, child in zip(chunk_slices, seq.spawn(len(chunk_slices))):
        rng = np.random.default_rng(child)
        log_mu = states[sl] @ loadings
        log_mu += base[None, :]
        log_mu += log_lib[sl, None]
        log_mu[:, cyc] += np.outer(s_prog[sl].astype(np.float32), amp_s) + np.outer(
            g_prog[sl].astype(np.float32), amp_g)
        mu = np.exp(log_mu, out=log_mu)
        flat, counts = _sample_counts(rng, mu, r)
        blocks.append(_coo_block_to_csr(flat, counts, mu.shape))
    return sp.vstack(blocks, format="csr")


def _simulate_peaks(seq: np.random.SeedSequence, cells: pd.DataFrame, spec: LineSpec, li: int,
                    sites: _Sites, model: _SiteModel, peaks: _PeakSet,
                    st: SimSettings) -> tuple[sp.csr_matrix, np.ndarray]:
    """Insertion counts over the line's peak columns, and each cell's DNA content.

    Sites are simulated in a working order (cycle-gene promoters, other
    promoters, distal sites) so the per-cell promoter terms touch contiguous
    column blocks; ``_split_to_peaks`` maps them back to peak columns.
    """
    cols = peaks.sites
    is_prom = model.promoter_of[cols] != ""
    is_cyc = (model.amp_s[li][cols] > 0) | (model.amp_g[li][cols] > 0)
    order = np.lexsort((np.arange(cols.size), ~is_prom, ~is_cyc))
    cols = cols[order]
    n_cyc, n_prom = int(is_cyc.sum()), int(is_prom.sum())
    col_map, frac_map = peaks.col_of_site[order], peaks.split_frac[order]

    f32 = np.float32
    phase = cells["phase_code"].to_numpy()
    progress = cells["s_progress"].to_numpy()
    s_prog, g_prog = (p.astype(f32) for p in _programs(cells["program_time"].to_numpy(), spec))
    log_tss = np.log(cells["tss_enrichment"].to_numpy()).astype(f32)
    compartment = cells["compartment"].to_numpy().astype(f32)
    states = cells[[f"state_{k + 1}" for k in range(N_STATES)]].to_numpy(f32)
    # Per-cell scale: depth, copies (G1 1, G2M 2; S handled per site below), compaction.
    per_copy = np.where(phase == 2, st.g2m_per_copy, 1.0)
    copies = np.where(phase == 2, 2.0, 1.0) * per_copy
    row_scale = (ATAC_SCALE * cells["atac_depth_factor"].to_numpy()).astype(f32)

    base = model.base[li][cols].astype(f32)
    amp_s = model.amp_s[li][cols[:n_cyc]].astype(f32)
    amp_g = model.amp_g[li][cols[:n_cyc]].astype(f32)
    loadings = model.state_loadings[:, cols].astype(f32)
    rt = sites.rt[li][sites.rt_bin[cols]]
    early = (0.5 - rt).astype(f32)
    bins = sites.rt_bin[cols]
    # Background fragments land anywhere in proportion to peak width, not accessibility.
    width = sites.width[cols]
    bg_level = spec.atac_background / (1.0 - spec.atac_background) * float(base.mean())
    background = (bg_level * width / width.mean()).astype(f32)
    n_peak_cols = len(peaks.table)
    dna = np.ones(len(cells))

    blocks = []
    chunk_slices = list(_chunks(len(cells)))
    for sl, child in zip(chunk_slices, seq.spawn(len(chunk_slices))):
        rng = np.random.default_rng(child)
        log_mod = states[sl] @ loadings
        log_mod += np.outer(compartment[sl], early)
        log_mod[:, :n_prom] += log_tss[sl, None]
        log_mod[:, :n_cyc] += np.outer(s_prog[sl], amp_s) + np.outer(g_prog[sl], amp_g)
        lam = np.exp(log_mod, out=log_mod)
        lam *= base[None, :]
        lam += background[None, :] / per_copy[sl, None].astype(f32)  # compaction spares background
        lam *= (row_scale[sl] * copies[sl]).astype(f32)[:, None]
        in_s, gain, dna[sl] = _replication(rng, phase[sl], progress[sl], rt, bins, sites.n_bins, st.nascent_access)
        if in_s.size:
            lam[in_s] *= gain
        if st.dna_depth_exponent != 1.0:  # fragments grow less than in proportion to DNA content
            lam *= (dna[sl] ** (st.dna_depth_exponent - 1.0)).astype(f32)[:, None]
        flat, fragments = _sample_counts(rng, lam)
        insertions = fragments + rng.binomial(fragments, INSERT_BOTH_ENDS)
        blocks.append(_split_to_peaks(rng, flat, insertions, lam.shape, col_map, frac_map, n_peak_cols))
    return sp.vstack(blocks, format="csr"), dna


def _replication(rng: np.random.Generator, phase: np.ndarray, progress: np.ndarray, rt: np.ndarray,
                 bins: np.ndarray, n_bins: int, nascent_access: float = NASCENT_ACCESS
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S-phase replication: the S rows, their per-site accessibility gain, and DNA content.

    A replicated site has 1 + nascent_access accessible copies (nascent chromatin
    is still maturing); G1 cells have DNA content 1, G2M cells 2 (their two mature
    copies are part of the per-cell scale).
    """
    dna = np.where(phase == 2, 2.0, 1.0)
    in_s = np.flatnonzero(phase == 1)
    if not in_s.size:
        return in_s, np.empty((0, rt.size), dtype=np.float32), dna
    jitter = rng.normal(0.0, RT_JITTER, (in_s.size, n_bins)).astype(np.float32)
    replicated = progress[in_s, None].astype(np.float32) > (rt.astype(np.float32)[None, :] + jitter[:, bins])
    dna[in_s] = 1.0 + replicated.mean(axis=1)
    gain = 1.0 + np.float32(nascent_access) * replicated.astype(np.float32)
    return in_s, gain, dna


def _split_to_peaks(rng: np.random.Generator, flat: np.ndarray, counts: np.ndarray,
                    shape: tuple[int, int], col_map: np.ndarray, frac_map: np.ndarray,
                    n_cols: int) -> sp.csr_matrix:
    """Site-level counts -> peak columns; split sites share their insertions binomially."""
    rows, site_col = np.divmod(flat, shape[1])
    col = col_map[site_col]
    frac = frac_map[site_col]
    is_split = frac > 0
    if is_split.any():
        first = rng.binomial(counts[is_split], frac[is_split])
        second = counts[is_split] - first
        rows = np.concatenate([rows[~is_split], rows[is_split], rows[is_split]])
        col = np.concatenate([col[~is_split], col[is_split], col[is_split] + 1])
        counts = np.concatenate([counts[~is_split], first, second])
    X = sp.csr_matrix((counts.astype(np.float32), (rows, col)), shape=(shape[0], n_cols))
    X.eliminate_zeros()
    return X


# ------------------------------------------------------------------- public


def _resolve_size(size: str | SimSize) -> SimSize:
    if isinstance(size, SimSize):
        return size
    try:
        return SIZES[size_name(size)]
    except ValueError as e:
        raise ValueError(f"{e} or pass a SimSize") from None


def simulate_pair(size: str | SimSize = "tiny", seed: int = 0,
                  settings: SimSettings | None = None) -> tuple[SimulatedLine, SimulatedLine]:
    """Simulate the training line (simA) and the test line (simB); see the module docstring.
    `settings`: the pair's assumptions (default: the module constants; see `draw_settings`)."""
    size = _resolve_size(size)
    st = settings or SimSettings()
    streams = _Streams(seed)
    sites = _make_sites(streams.rng("genome"), _n_sites(size, st), st)
    genes = _make_genes(streams.rng("genes"), size.n_genes, sites)
    model = _make_site_model(streams.rng("sites"), sites, genes, st)
    peak_sets = _call_peaks(streams.rng("calls"), sites, model, size, st)
    barcodes = _make_barcodes(streams.rng("barcodes"), size.n_cells_a + size.n_cells_b)
    split_bc = (barcodes[: size.n_cells_a], barcodes[size.n_cells_a:])

    lines = []
    for li, spec in enumerate(st.lines):
        cells_seq, gex_seq, peak_seq = streams.line_seq(li).spawn(3)
        cells = _make_cells(np.random.default_rng(cells_seq), spec, split_bc[li], st)
        X_gex = _simulate_gex(gex_seq, cells, spec, li, genes)
        X_peak, dna = _simulate_peaks(peak_seq, cells, spec, li, sites, model, peak_sets[li], st)
        lines.append(_assemble_line(spec, li, cells, genes, peak_sets[li], X_gex, X_peak, dna, seed))
    return lines[0], lines[1]


def _assemble_line(spec: LineSpec, li: int, cells: pd.DataFrame, genes: _Genes, peaks: _PeakSet,
                   X_gex: sp.csr_matrix, X_peak: sp.csr_matrix, dna: np.ndarray, seed: int) -> SimulatedLine:
    labels = cells["phase_code"].to_numpy().astype(np.int8)
    meta = {"simulated": True, "seed": int(seed), "line": spec.name}
    gex = make_matrix(X_gex, cells["barcode"], genes.table["symbol"], labels, modality="gex",
                      name=f"{spec.name}_GEX", source=f"simulate:{spec.name}",
                      feature_ids=genes.table["gene_id"], meta=meta)
    peak = make_matrix(X_peak, cells["barcode"], peaks.table["name"], labels, modality="peak",
                       name=f"{spec.name}_PEAK", source=f"simulate:{spec.name}", meta=meta)
    truth = cells.drop(columns="phase_code").copy()
    truth.insert(truth.columns.get_loc("s_progress") + 1, "dna_content", dna)
    truth["gex_total_counts"] = np.asarray(X_gex.sum(axis=1)).ravel().astype(np.int64)
    truth["peak_total_counts"] = np.asarray(X_peak.sum(axis=1)).ravel().astype(np.int64)
    gene_table = genes.table.copy()
    gene_table["amp_s"] = genes.amp_s[li]
    gene_table["amp_g2m"] = genes.amp_g[li]
    gene_table["base_mean"] = np.exp(genes.log_mean + (genes.line_offset if li == 1 else 0.0))
    return SimulatedLine(spec.name, gex, peak, truth, gene_table, peaks.table.copy())


def write_simulation(lines: Iterable[SimulatedLine], out_dir: str | Path,
                     formats: Iterable[str] = ("csv", "h5ad", "10x")) -> dict[str, list[Path]]:
    """Write simulated lines in the users' formats; returns {kind: [paths]}.

    Per line ``<name>``:
      csv   ``<name>_GEX.csv``, ``<name>_PEAK.csv`` (the research code's CSV layout: cells as rows)
      h5ad  ``<name>_GEX.h5ad``, ``<name>_PEAK.h5ad`` (labels in obs['phase'])
      10x   ``<name>_filtered_feature_bc_matrix.h5`` (Cell Ranger ARC layout, no labels)
    and always ``<name>_labels.csv`` (barcode,phase) under "labels" and
    ``<name>_truth.csv`` under "truth".
    """
    from .writers import write_10x_h5, write_h5ad, write_research_csv

    formats = tuple(formats)
    unknown = set(formats) - {"csv", "h5ad", "10x"}
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; choose from csv, h5ad, 10x")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {kind: [] for kind in (*formats, "labels", "truth")}
    for line in lines:
        labels_path = out / f"{line.name}_labels.csv"
        if "csv" in formats:
            for ds in (line.gex, line.peak):
                path = out / f"{ds.name}.csv"
                write_research_csv(ds, path)
                written["csv"].append(path)
        if "h5ad" in formats:
            for ds in (line.gex, line.peak):
                path = out / f"{ds.name}.h5ad"
                write_h5ad(ds, path)
                written["h5ad"].append(path)
        if "10x" in formats:
            path = out / f"{line.name}_filtered_feature_bc_matrix.h5"
            intervals = None if line.genes is None else line.genes["interval"].to_numpy()
            write_10x_h5(line.gex, line.peak, path, gene_intervals=intervals)
            written["10x"].append(path)
        _write_labels(line, labels_path)
        written["labels"].append(labels_path)
        truth_path = out / f"{line.name}_truth.csv"
        line.truth.to_csv(truth_path, index=False)
        written["truth"].append(truth_path)
    return written


def _write_labels(line: SimulatedLine, path: Path) -> None:
    from .writers import write_labels_csv

    write_labels_csv(line.gex, path)
