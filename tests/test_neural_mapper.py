"""The neural peak mapper (xfer.data.neural_mapper) and `xfer map-peaks`: a fit on the tiny
simulated pair, its output against the coordinate mapper's, the file round trip, held-out
quality against the zero and mean fills, and the bad inputs (one line, exit 2, no folder)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from xfer.cli import main
from xfer.data.dataset import make_matrix
from xfer.data.mapper import map_dataset
from xfer.data.neural_mapper import (FORMAT, MAPPER_FILE, REPORT_FILE, STATS_FILE, NeuralPeakMapper, fit_mapper,
                                     load_mapper, save_mapper, write_mapper_folder)
from xfer.data.peaks import parse_peak_names
from xfer.data.simulate import SimSettings, simulate_pair
from xfer.data.writers import write_10x_h5, write_h5ad
from xfer.errors import ConfigError, InputError

# A pair whose lines call their peaks very differently: a fifth of the source's peaks have no
# partner in the target (the default simulator leaves under 1 % without one).
HARD = SimSettings(site_line_only=0.15, peaks_b_ratio=0.7, boundary_jitter_sd=150, site_line_sd=1.2)


@pytest.fixture(scope="module")
def fitted(tiny_pair):
    A, B = tiny_pair
    mapper, stats = fit_mapper(A.peak, B.peak, epochs=6, device="cpu")
    return mapper, stats


@pytest.fixture(scope="module")
def hard_pair():
    return simulate_pair("tiny", seed=0, settings=HARD)


def test_fit_on_the_tiny_pair(tiny_pair, fitted):
    A, B = tiny_pair
    mapper, stats = fitted
    kept = (np.asarray((A.peak.X > 0).mean(axis=0)).ravel() >= 0.05)
    assert list(mapper.ref_peaks) == list(A.peak.features[kept])
    assert set(mapper.query_peaks) <= set(B.peak.features)
    assert stats["method"] == "neural" and stats["design"] == "source_adapter" and stats["fill"] == "unmapped"
    assert stats["source"]["n_ref_peaks"] == len(mapper.ref_peaks) == stats["overlap"]["n_ref"]
    assert stats["n_network_outputs"] == stats["n_ref_unmapped"] == len(mapper.out_idx) > 0
    assert 1 <= stats["epochs_run"] <= 6 and stats["fit_seconds"] > 0
    assert sum(stats["split"].values()) == A.peak.n_cells
    json.dumps(stats)  # JSON-ready


def test_map_keeps_the_coordinate_counts_and_fills_the_rest(tiny_pair, fitted):
    """Where a source peak has a partner, the counts are the coordinate mapper's; the unmapped
    peaks hold the network's calls (1.0), at about their rate."""
    _, B = tiny_pair
    mapper, _ = fitted
    Y, stats = mapper.map(B.peak)
    assert Y.shape == (B.peak.n_cells, len(mapper.ref_peaks)) and Y.dtype == np.float32 and (Y.data > 0).all()
    ref = parse_peak_names(mapper.ref_peaks)
    coord, mapping = map_dataset(B.peak, ref, method="overlap_50pct", impute="zero")
    mapped = mapping.mapped
    np.testing.assert_array_equal(Y[:, mapped].toarray(), coord.X[:, mapped].toarray())
    filled = Y[:, ~mapped]
    assert filled.nnz > 0 and set(np.unique(filled.data)) == {1.0}
    for key in ("method", "n_ref", "n_ref_mapped", "fraction_ref_mapped", "n_query", "n_query_used",
                "fraction_query_used"):
        assert key in stats
    assert stats["method"] == "neural" and stats["n_ref"] == len(mapper.ref_peaks)
    assert stats["n_ref_by_network"] == int((~mapped).sum())
    assert stats["n_ref_by_coordinates"] == int(mapped.sum()) and stats["n_query"] == B.peak.n_features
    assert stats["n_query_used"] == len(mapper.query_peaks) and stats["fraction_query_used"] < 1


def test_state_round_trip(tiny_pair, fitted, tmp_path):
    _, B = tiny_pair
    mapper, stats = fitted
    path = save_mapper(mapper, stats, tmp_path / "m")
    assert path == tmp_path / "m" / MAPPER_FILE
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["fit_stats"]["n_ref_unmapped"] == stats["n_ref_unmapped"]
    want, want_stats = mapper.map(B.peak)
    for where in (path, tmp_path / "m"):  # the file or its folder
        got, got_stats = load_mapper(where).map(B.peak)
        assert (got != want).nnz == 0 and got_stats == want_stats
    again = NeuralPeakMapper.from_state(mapper.state())
    assert (again.map(B.peak)[0] != want).nnz == 0


def test_peak_names_are_matched_by_coordinates(tiny_pair, fitted):
    """Another spelling of the same peaks (chr1-100-200, no "chr") maps the same."""
    _, B = tiny_pair
    mapper, _ = fitted
    ps = parse_peak_names(B.peak.features)
    names = [f"{c[3:]}-{s}-{e}" for c, s, e in zip(ps.chrom, ps.start, ps.end)]
    respelled = replace(B.peak, features=np.asarray(names, dtype=object))
    assert (mapper.map(respelled)[0] != mapper.map(B.peak)[0]).nnz == 0


def test_folder_files_and_report(fitted, tmp_path):
    mapper, stats = fitted
    paths = write_mapper_folder(mapper, dict(stats), tmp_path / "out")
    assert set(paths) == {MAPPER_FILE, STATS_FILE, REPORT_FILE}
    written = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    assert written["file_bytes"] == (tmp_path / "out" / MAPPER_FILE).stat().st_size
    report = (tmp_path / "out" / REPORT_FILE).read_text()
    assert "Held-out quality" in report and "| unmapped |" in report and "MiB" in report


def test_filled_peaks_beat_the_zero_and_mean_fills(hard_pair):
    """On held-out source cells, the network's calls on the peaks without a partner beat the
    coordinate mapper's fills: F1 above zero fill's (0) and mean fill's (everything called),
    log loss below the peak rate's, per-peak AUROC above chance, calls at about the true rate."""
    A, B = hard_pair
    for design in ("source_adapter", "joint", "shared"):
        _, stats = fit_mapper(A.peak, B.peak, design=design, device="cpu")
        q = stats["quality"]["unmapped"]
        assert q["n_peaks"] > 100
        assert q["zero"]["f1"] == 0.0 and q["mean"]["recall"] == 1.0
        assert q["neural"]["f1"] > q["mean"]["f1"] + 0.01, (design, q)
        assert q["neural"]["log_loss"] < q["mean"]["log_loss"], (design, q)
        assert q["neural"]["auroc"] > 0.58, (design, q)
        assert 0.5 * q["rate_true"] < q["neural"]["rate_called"] < 1.5 * q["rate_true"]


def test_fill_all_predicts_every_peak(tiny_pair):
    A, B = tiny_pair
    mapper, stats = fit_mapper(A.peak, B.peak, design="joint", fill="all", dim=32, epochs=2, device="cpu")
    assert len(mapper.out_idx) == len(mapper.ref_peaks) == stats["n_network_outputs"]
    Y, mstats = mapper.map(B.peak)
    assert set(np.unique(Y.data)) == {1.0} and mstats["n_ref_by_network"] == len(mapper.ref_peaks)
    assert mstats["n_ref_by_coordinates"] == 0 and mapper.weights["enc"].shape[1] == 32


def test_shared_design_keeps_only_the_target_encoder(tiny_pair, tmp_path):
    """The shared design trains a source encoder too, but mapping reads the target's: the file
    holds the same arrays as the other designs', and a loaded mapper maps as the fitted one."""
    A, B = tiny_pair
    mapper, stats = fit_mapper(A.peak, B.peak, design="shared", dim=32, epochs=2, device="cpu")
    assert stats["design"] == "shared" and mapper.weights["enc"].shape == (len(mapper.input_idx), 32)
    assert len(mapper.input_idx) > 0 and stats["target"]["n_input_peaks"] == len(mapper.input_idx)
    save_mapper(mapper, stats, tmp_path)
    again = load_mapper(tmp_path)
    assert again.design == "shared"
    Y1, _ = mapper.map(B.peak)
    Y2, _ = again.map(B.peak)
    assert (Y1 != Y2).nnz == 0


def test_cells_of_other_peak_sets_are_refused(tiny_pair, fitted):
    A, _ = tiny_pair
    mapper, _ = fitted
    with pytest.raises(InputError) as e:
        mapper.map(A.peak)  # the source line's own peaks: another peak set than the target's
    assert e.value.field == "features" and e.value.path == A.peak.source and "other peak sets" in str(e.value)


def test_bad_mapper_files(fitted, tmp_path):
    mapper, stats = fitted
    with pytest.raises(InputError, match="no such"):
        load_mapper(tmp_path / "nowhere")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError) as e:
        load_mapper(tmp_path / "junk.pt")
    assert e.value.field == "format"
    state = mapper.state()
    with pytest.raises(InputError) as e:
        NeuralPeakMapper.from_state({**state, "format": "xfer.neural_mapper/0"}, where="ckpt")
    assert e.value.path == "ckpt" and e.value.field == "format"
    bad = {**state, "thresholds": state["thresholds"][:-1]}
    with pytest.raises(InputError, match="inconsistent"):
        NeuralPeakMapper.from_state(bad, where="ckpt")
    torch.save({k: v for k, v in state.items() if k != "weights"}, tmp_path / "partial.pt")
    with pytest.raises(InputError) as e:
        load_mapper(tmp_path / "partial.pt")
    assert e.value.field == "weights"


def test_bad_arguments(tiny_pair):
    A, B = tiny_pair
    with pytest.raises(ConfigError, match="design"):
        fit_mapper(A.peak, B.peak, design="nope")
    with pytest.raises(ConfigError, match="dim"):
        fit_mapper(A.peak, B.peak, dim=0)
    with pytest.raises(InputError, match="modality"):
        fit_mapper(A.gex, B.peak)


# ----------------------------------------------------------------------------- xfer map-peaks

def _map_peaks(store, out, source, target, *extra):
    return main(["map-peaks", "--store", str(store), "--source_peaks", str(source), "--target_peaks", str(target),
                 "--output_folder", str(out), "--epochs", "2", "--dim", "32", "--device", "cpu", *extra])


def test_map_peaks_reads_every_format(tiny_pair, tmp_path, capsys):
    """A 10x .h5 source and an .h5ad target give the same mapper as the store datasets would."""
    A, B = tiny_pair
    write_10x_h5(A.gex, A.peak, tmp_path / "A.h5")
    write_h5ad(B.peak, tmp_path / "B.h5ad")
    assert _map_peaks(tmp_path / "store", tmp_path / "out", tmp_path / "A.h5", tmp_path / "B.h5ad") == 0
    assert "mapper.pt" in capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    assert stats["source"]["n_cells"] == A.peak.n_cells and stats["target"]["n_peaks"] == B.peak.n_features
    Y, _ = load_mapper(tmp_path / "out").map(B.peak)
    assert Y.shape == (B.peak.n_cells, stats["source"]["n_ref_peaks"])


def _refused(capsys, out, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_map_peaks_bad_inputs(tiny_pair, tmp_path, capsys):
    A, B = tiny_pair
    write_h5ad(A.peak, tmp_path / "A.h5ad")
    out = tmp_path / "out"
    # a "peak" file whose features are genes: no peak names
    write_h5ad(replace(B.gex, modality="peak"), tmp_path / "genes.h5ad")
    assert _map_peaks(tmp_path / "s", out, tmp_path / "A.h5ad", tmp_path / "genes.h5ad") == 2
    _refused(capsys, out, "genes.h5ad", "[features]", "peak")
    # no overlapping peaks: the same intervals on other chromosomes
    far = make_matrix(B.peak.X, B.peak.barcodes, [f"scaffold{n[3:]}" for n in B.peak.features], modality="peak",
                      name="far")
    write_h5ad(far, tmp_path / "far.h5ad")
    assert _map_peaks(tmp_path / "s", out, tmp_path / "A.h5ad", tmp_path / "far.h5ad") == 2
    _refused(capsys, out, "far.h5ad", "[features]", "shares no peak coordinates")
    # a missing file
    assert _map_peaks(tmp_path / "s", out, tmp_path / "A.h5ad", tmp_path / "missing.h5ad") == 2
    _refused(capsys, out, "missing.h5ad")


def test_map_peaks_names_its_own_flags(tiny_store, tmp_path, capsys):
    """A store dataset of expression given as --source_peaks: the message names that flag."""
    assert _map_peaks(tiny_store, tmp_path / "out", "store:A_GEX", "store:B_PEAK") == 2
    _refused(capsys, tmp_path / "out", "store:A_GEX", "[--source_peaks]", "expects peak")
