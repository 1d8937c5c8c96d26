"""The simulator carries the biology it claims (tiny size, a few seconds in all)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from xfer.data.simulate import SIZES, SimSize, SimulatedLine, simulate_pair
from xfer.phases import PHASES, tirosh_genes

BARCODE = re.compile(r"^[ACGT]{16}-1$")
PEAK = re.compile(r"^(chr(?:\d+|X)):(\d+)-(\d+)$")


@pytest.fixture(scope="module")
def pair() -> tuple[SimulatedLine, SimulatedLine]:
    return simulate_pair("tiny", seed=0)


def log_cp10k(X: sp.csr_matrix) -> np.ndarray:
    totals = np.asarray(X.sum(axis=1)).ravel()
    return np.log1p(X.toarray() / totals[:, None] * 1e4)


def parse_peaks(names) -> pd.DataFrame:
    rows = [PEAK.match(n) for n in names]
    assert all(rows), "every peak name is chrom:start-end"
    return pd.DataFrame({"chrom": [m[1] for m in rows], "start": [int(m[2]) for m in rows],
                         "end": [int(m[3]) for m in rows]})


def test_shapes_features_and_barcodes(pair):
    a, b = pair
    size = SIZES["tiny"]
    assert a.gex.X.shape == (size.n_cells_a, size.n_genes)
    assert b.gex.X.shape == (size.n_cells_b, size.n_genes)
    assert a.peak.X.shape == (size.n_cells_a, size.n_peaks_a)
    assert b.peak.X.shape == (size.n_cells_b, size.n_peaks_b)
    s_genes, g2m_genes = tirosh_genes()
    assert len(s_genes) == 43 and len(g2m_genes) == 54
    for line in pair:
        assert set(s_genes + g2m_genes) <= set(line.gex.features)
        assert all(re.fullmatch(r"ENSG9\d{10}", g) for g in line.gex.feature_ids)
        assert len(set(line.gex.feature_ids)) == line.gex.n_features
        assert all(BARCODE.match(bc) for bc in line.gex.barcodes)
        assert list(line.gex.barcodes) == sorted(line.gex.barcodes)  # Cell Ranger order, not phase order
        np.testing.assert_array_equal(line.gex.barcodes, line.peak.barcodes)
        np.testing.assert_array_equal(line.gex.labels, line.peak.labels)
        assert line.gex.modality == "gex" and line.peak.modality == "peak"
        assert line.gex.X.dtype == np.float32
        assert np.all(line.gex.X.data == np.round(line.gex.X.data))  # counts
    assert not set(a.gex.barcodes) & set(b.gex.barcodes)


def test_truth_table_matches_matrices(pair):
    for line in pair:
        t = line.truth
        assert list(t["barcode"]) == list(line.gex.barcodes)
        assert list(t["phase"]) == list(line.gex.phase_names())
        assert {"cycle_position", "dna_content", "s_progress"} <= set(t.columns)
        assert t["cycle_position"].between(0, 1).all()
        np.testing.assert_array_equal(t["peak_total_counts"], np.asarray(line.peak.X.sum(axis=1)).ravel())
        np.testing.assert_array_equal(t["gex_total_counts"], np.asarray(line.gex.X.sum(axis=1)).ravel())
        assert list(line.genes["symbol"]) == list(line.gex.features)
        assert list(line.peaks["name"]) == list(line.peak.features)


def test_deterministic_for_a_seed(pair):
    again = simulate_pair("tiny", seed=0)
    other = simulate_pair("tiny", seed=1)
    for first, second, third in zip(pair, again, other):
        for mod in ("gex", "peak"):
            assert getattr(first, mod).content_hash() == getattr(second, mod).content_hash()
            assert getattr(first, mod).content_hash() != getattr(third, mod).content_hash()
        pd.testing.assert_frame_equal(first.truth, second.truth)


def test_peaks_are_sparse_small_counts(pair):
    for line in pair:
        X = line.peak.X
        zeros = 1 - X.nnz / (X.shape[0] * X.shape[1])
        assert 0.85 < zeros < 0.99
        assert np.isin(X.data, [1, 2]).mean() > 0.75


def test_phase_proportions_g1_heavy_and_line_specific(pair):
    a, b = pair
    shares = [np.bincount(line.gex.labels, minlength=3) / line.gex.n_cells for line in pair]
    for share in shares:
        assert share.argmax() == PHASES.index("G1")
        assert share.min() > 0.1
    assert shares[1][0] - shares[0][0] > 0.03  # simB is more G1-heavy than simA


def test_dna_content_follows_phase(pair):
    for line in pair:
        t = line.truth
        assert (t.loc[t.phase == "G1", "dna_content"] == 1).all()
        assert (t.loc[t.phase == "G2M", "dna_content"] == 2).all()
        s = t[t.phase == "S"]
        assert s["dna_content"].between(1, 2).all()
        assert s["dna_content"].std() > 0.1
        assert s["dna_content"].corr(s["s_progress"], method="spearman") > 0.9


def test_total_accessibility_grows_with_dna_content(pair):
    for line in pair:
        totals = line.truth.groupby("phase")["peak_total_counts"].mean()
        assert totals["G2M"] > 1.2 * totals["G1"]
        assert totals["S"] > totals["G1"]


def test_early_replicating_peaks_gain_in_s_phase(pair):
    """The replication-timing signal: S cells carry relatively more early-domain insertions."""
    for line in pair:
        X = line.peak.X
        early = (line.peaks["replication_time"] < 0.5).to_numpy()
        frac_early = np.asarray(X[:, early].sum(axis=1)).ravel() / np.asarray(X.sum(axis=1)).ravel()
        phase = line.truth["phase"].to_numpy()
        assert frac_early[phase == "S"].mean() > frac_early[phase == "G1"].mean() + 0.01
        assert frac_early[phase == "S"].mean() > frac_early[phase == "G2M"].mean() + 0.01


def test_marker_genes_follow_their_programs(pair):
    s_genes, g2m_genes = tirosh_genes()
    for line in pair:
        expr = pd.DataFrame(log_cp10k(line.gex.X), columns=line.gex.features)
        by_phase = expr.groupby(line.truth["phase"].to_numpy()).mean()
        s_diff = by_phase.loc["S", s_genes] - by_phase.loc["G1", s_genes]
        g_diff = by_phase.loc["G2M", g2m_genes] - by_phase.loc["G1", g2m_genes]
        assert s_diff.mean() > 0.2 and (s_diff > 0).mean() > 0.8
        assert g_diff.mean() > 0.3 and (g_diff > 0).mean() > 0.8


def test_marker_score_baseline_scores_the_planted_markers(pair):
    """The simulator and the marker-score baseline read one gene list: scoring the genes the
    simulator planted beats chance (1/3) on every line."""
    from sklearn.metrics import balanced_accuracy_score

    from xfer.baselines import marker_scores
    for line in pair:
        assert balanced_accuracy_score(line.gex.labels, marker_scores(line.gex)) > 0.45


def test_lines_differ_in_depth_and_expression(pair):
    a, b = pair
    assert a.truth["atac_depth_factor"].median() > 1.3 * b.truth["atac_depth_factor"].median()
    mean_a = np.log1p(np.asarray(a.gex.X.mean(axis=0)).ravel())
    mean_b = np.log1p(np.asarray(b.gex.X.mean(axis=0)).ravel())
    assert 0.5 < np.corrcoef(mean_a, mean_b)[0, 1] < 0.99


def test_peak_sets_differ_but_overlap(pair):
    a, b = pair
    pa, pb = parse_peaks(a.peak.features), parse_peaks(b.peak.features)
    for p in (pa, pb):  # sorted, non-overlapping within a line
        for _, g in p.groupby("chrom"):
            assert (g["start"].to_numpy() < g["end"].to_numpy()).all()
            assert (g["start"].to_numpy()[1:] >= g["end"].to_numpy()[:-1]).all()
    exact = len(set(a.peak.features) & set(b.peak.features)) / b.peak.n_features
    assert exact < 0.5
    overlapping = 0
    for chrom, g in pb.groupby("chrom"):
        ref = pa[pa.chrom == chrom].sort_values("start")
        i = np.searchsorted(ref["end"].to_numpy(), g["start"].to_numpy(), side="right")
        ok = i < len(ref)
        starts = ref["start"].to_numpy()[np.where(ok, i, 0)]
        overlapping += int((ok & (starts < g["end"].to_numpy())).sum())
    assert overlapping / b.peak.n_features > 0.7
    # The shared-site key agrees with what overlap finds.
    shared_sites = set(a.peaks["site"]) & set(b.peaks["site"])
    assert 0.7 < len(shared_sites) / b.peaks["site"].nunique() < 1.0


def test_size_validation():
    assert SIZES["research"] == SimSize(7_432, 7_728, 28_105, 92_328)
    with pytest.raises(ValueError, match="Tirosh"):
        SimSize(100, 100, 50, 1_000)
    with pytest.raises(ValueError, match="promoter"):
        SimSize(100, 100, 5_000, 1_000)
    with pytest.raises(ValueError, match="unknown simulation size"):
        simulate_pair("huge")


def test_old_size_name_seed_is_research_with_a_note(caplog):
    from xfer.data.simulate import size_name

    assert list(SIZES) == ["tiny", "small", "medium", "research"]
    with caplog.at_level("INFO", logger="xfer.data.simulate"):
        assert size_name("seed") == "research"
        assert SIZES["seed"] is SIZES["research"]
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["size 'seed' is the old name of size 'research'"] * 2
    assert size_name("tiny") == "tiny"
    with pytest.raises(KeyError):
        SIZES["huge"]
    with pytest.raises(ValueError, match="choose one of tiny, small, medium, research"):
        size_name("huge")


def test_simulate_command_takes_the_old_size_name(pair, tmp_path, monkeypatch, caplog, capsys):
    import xfer.data.simulate as simulate
    from xfer.cli import main

    sizes = []
    monkeypatch.setattr(simulate, "simulate_pair", lambda size, **kw: sizes.append(size) or pair)
    with caplog.at_level("INFO"):
        assert main(["simulate", "--size", "seed", "--out", str(tmp_path / "d"), "--formats", "csv"]) == 0
    assert sizes == ["research"]
    assert "size 'seed' is the old name of size 'research'" in caplog.text
    assert main(["simulate", "--size", "huge", "--out", str(tmp_path / "e")]) == 2
    assert "--size: unknown size 'huge'; choose from tiny, small, medium, research" in capsys.readouterr().err


def test_custom_size_runs():
    a, b = simulate_pair(SimSize(40, 50, 120, 400), seed=3)
    assert a.gex.X.shape == (40, 120) and b.peak.n_cells == 50
    assert a.peak.n_features == 400


# ----------------------------------------------------------------------------- varied assumptions

def test_drawn_settings_are_deterministic_and_within_the_documented_ranges():
    from xfer.data.simulate import VARIED_RANGES, draw_settings

    draws = [draw_settings(seed, "tiny") for seed in range(40)]
    assert draw_settings(7, "tiny") == draws[7] and draws[0] != draws[1]
    for size, st in draws:
        lo, hi, _ = VARIED_RANGES["n_cells"]
        assert lo <= size.n_cells_a <= hi and lo <= size.n_cells_b <= hi
        assert (size.n_genes, size.n_peaks) == (SIZES["tiny"].n_genes, SIZES["tiny"].n_peaks)
        for key in ("rt_line_corr", "nascent_access", "promoter_coupling", "g2m_per_copy", "dna_depth_exponent",
                    "shared_identical", "boundary_jitter_sd", "split_fraction_b", "peaks_b_ratio"):
            assert VARIED_RANGES[key][0] <= getattr(st, key) <= VARIED_RANGES[key][1], key
        for spec in st.lines:
            g1, s, g2m = spec.phase_props
            assert VARIED_RANGES["g1_fraction"][0] <= g1 <= VARIED_RANGES["g1_fraction"][1]
            assert abs(g1 + s + g2m - 1) < 1e-3 and s > 0 and g2m > 0
    # the draws span their ranges (not a handful of values near one default)
    corr = [st.rt_line_corr for _, st in draws]
    assert min(corr) < 0.7 and max(corr) > 0.9


def test_settings_change_what_they_claim():
    """Phase proportions, the test line's peak count, and fragments growing with DNA content
    follow the settings; the defaults reproduce the unvaried simulator exactly."""
    from dataclasses import replace

    from xfer.data.simulate import LINE_SPECS, SimSettings

    size = SimSize(600, 600, 300, 1_000)
    a0, b0 = simulate_pair(size, seed=2)
    a1, b1 = simulate_pair(size, seed=2, settings=SimSettings())
    assert a0.peak.content_hash() == a1.peak.content_hash() and b0.gex.content_hash() == b1.gex.content_hash()
    lines = (replace(LINE_SPECS[0], phase_props=(0.8, 0.1, 0.1)), LINE_SPECS[1])
    st = SimSettings(lines=lines, peaks_b_ratio=0.75, dna_depth_exponent=0.0)
    a2, b2 = simulate_pair(size, seed=2, settings=st)
    assert a2.truth["phase"].value_counts(normalize=True)["G1"] == pytest.approx(0.8, abs=0.01)
    assert b2.peak.n_features < 0.8 * b0.peak.n_features
    ratio = lambda line: (line.truth.groupby("phase")["peak_total_counts"].mean()  # noqa: E731
                          / line.truth.groupby("phase")["atac_depth_factor"].mean())
    assert ratio(a0)["G2M"] / ratio(a0)["G1"] > 1.4          # fragments grow with DNA content ...
    assert ratio(a2)["G2M"] / ratio(a2)["G1"] < 1.15         # ... or, with exponent 0, do not


def test_simulate_vary_writes_its_settings(tmp_path, capsys):
    import json

    from xfer.cli import main

    assert main(["simulate", "--size", "tiny", "--vary", "--seed", "3", "--out", str(tmp_path / "d"),
                 "--formats", "csv"]) == 0
    saved = json.loads((tmp_path / "d" / "settings.json").read_text())
    assert saved["seed"] == 3 and set(saved["settings"]) >= {"lines", "rt_line_corr", "dna_depth_exponent"}
    n_cells = pd.read_csv(tmp_path / "d" / "simA_labels.csv").shape[0]
    assert n_cells == saved["size"]["n_cells_a"]
