"""`xfer ingest` / `xfer store` end to end: exit codes, messages, nothing half-written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import BARCODES, PHASES_OF, real_data, write_csv, write_labels
from xfer.cli import main
from xfer.data.store import CellStore


def _ingest(store, *args):
    return main(["ingest", "--store", str(store), *map(str, args)])


def test_ingest_pair_then_use_store_names(tmp_path, research_files, capsys):
    store = tmp_path / "store"
    rc = _ingest(store, "--src_csv", research_files["gex"], "--src_label_csv", research_files["labels"],
                 "--tgt_csv", research_files["peak"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "store:L_GEX" in out and "store:L_PEAK" in out
    s = CellStore(str(store))
    assert sorted(s.names()) == ["L_GEX", "L_PEAK"]
    peak = s.read("L_PEAK")
    assert list(peak.phase_names()) == PHASES_OF  # labels propagated to the paired modality
    np.testing.assert_array_equal(peak.X.toarray(), research_files["X_peak"])
    # store datasets are accepted by the same flags
    from xfer.cli import build_parser
    from xfer.flags import sources_from_args
    args = build_parser().parse_args(["ingest", "--store", str(store), "--src_csv", "store:L_GEX",
                                      "--tgt_csv", "store:L_PEAK"])
    data = sources_from_args(args).load()
    assert data["src"].n_cells == len(BARCODES) and data["tgt"].modality == "peak"
    assert main(["store", "--store", str(store)]) == 0
    assert "store:L_GEX" in capsys.readouterr().out


def test_ingest_store_dataset_of_wrong_modality(tmp_path, research_files, capsys):
    store = tmp_path / "store"
    assert _ingest(store, "--tgt_csv", research_files["peak"], "--tgt_label_csv", research_files["labels"]) == 0
    assert _ingest(store, "--src_csv", "store:L_PEAK") == 2
    assert "store dataset is peak, but --src_csv expects gex" in capsys.readouterr().err


def test_error_gex_and_peak_share_no_barcodes(tmp_path, research_files, capsys):
    other = [b.replace("-1", "-9") for b in BARCODES]
    peak = write_csv(tmp_path / "OTHER_PEAK.csv", other, ["chr1:1-100", "chr1:200-300"],
                     np.ones((len(other), 2)))
    store = tmp_path / "store"
    rc = _ingest(store, "--src_csv", research_files["gex"], "--src_label_csv", research_files["labels"], "--tgt_csv", peak)
    assert rc == 2
    err = capsys.readouterr().err
    assert "OTHER_PEAK.csv [barcode]: shares no barcode with the paired expression matrix" in err
    assert not os.path.exists(store / "datasets") or os.listdir(store / "datasets") == []


def test_bad_second_input_writes_nothing(tmp_path, research_files, capsys):
    """All inputs are validated before anything is written."""
    bad_labels = write_labels(tmp_path / "bad_labels.csv", BARCODES, ["G1", "S", "G7", "G1"] * 3)
    store = tmp_path / "store"
    rc = _ingest(store, "--src_csv", research_files["gex"], "--src_label_csv", research_files["labels"],
                 "--test_csv", research_files["gex"].parent / "L_GEX.csv", "--test_label_csv", bad_labels)
    assert rc == 2
    assert "bad_labels.csv [phase]: unknown phase name(s) 'G7' (3 cells)" in capsys.readouterr().err
    assert not os.path.exists(store / "datasets") or os.listdir(store / "datasets") == []


def test_ingest_conflicting_paired_labels(tmp_path, research_files, capsys):
    other = write_labels(tmp_path / "other.csv", BARCODES, ["S"] * len(BARCODES))
    rc = _ingest(tmp_path / "s", "--src_csv", research_files["gex"], "--src_label_csv", research_files["labels"],
                 "--tgt_csv", research_files["peak"], "--tgt_label_csv", other)
    assert rc == 2
    assert "paired cells have different phase labels" in capsys.readouterr().err


def test_ingest_needs_an_input(tmp_path, capsys):
    assert _ingest(tmp_path / "s") == 2
    assert "give at least one input" in capsys.readouterr().err


def test_ingest_missing_file(tmp_path, capsys):
    assert _ingest(tmp_path / "s", "--src_csv", tmp_path / "nope.csv") == 2
    assert "nope.csv: file not found" in capsys.readouterr().err


def test_ingest_real_h5ad(tmp_path, capsys):
    path = real_data("hsiao2020_ipsc_fucci_888x101.h5ad")
    assert _ingest(tmp_path / "s", "--src_csv", path) == 0
    ds = CellStore(str(tmp_path / "s")).read("hsiao2020_ipsc_fucci_888x101")
    assert ds.n_cells == 888 and ds.label_counts() == {"G1": 384, "S": 172, "G2M": 332}


# ----------------------------------------------------------------------------- broken compressed inputs

def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _gzip_cut(src, dst, keep=0.5):
    import gzip
    data = gzip.compress(src.read_bytes())
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("broken", ["matrix", "labels"])
@pytest.mark.parametrize("how, msg", [("plain", "not a gzip file"), ("cut", "truncated gzip stream")])
def test_ingest_broken_gzip_is_one_line_and_writes_nothing(tmp_path, research_files, capsys, broken, how, msg):
    src = research_files["gex" if broken == "matrix" else "labels"]
    bad = tmp_path / f"bad_{broken}.csv.gz"
    if how == "plain":
        bad.write_bytes(src.read_bytes())  # plain text renamed to .gz
    else:
        _gzip_cut(src, bad)
    gex, labels = (bad, research_files["labels"]) if broken == "matrix" else (research_files["gex"], bad)
    store = tmp_path / "store"
    assert _ingest(store, "--src_csv", gex, "--src_label_csv", labels, "--tgt_csv", research_files["peak"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"xfer ingest: error: {bad}: {msg}"), line
    assert not store.exists()


# ----------------------------------------------------------------------------- a file where the store should be

@pytest.mark.parametrize("under", [False, True])
def test_store_path_that_is_a_file(tmp_path, research_files, capsys, under):
    """--store naming a regular file (or a path under one): one line, the file untouched."""
    f = tmp_path / "not_a_store"
    f.write_text("precious\n")
    store = f / "sub" if under else f
    assert _ingest(store, "--src_csv", research_files["gex"], "--src_label_csv", research_files["labels"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"xfer ingest: error: {f}: is a file"), line
    assert ("cannot be made under it" in line) == under
    assert f.read_text() == "precious\n" and sorted(os.listdir(tmp_path)) == ["L_GEX.csv", "L_PEAK.csv",
                                                                            "L_labels.csv", "not_a_store"]
    assert main(["store", "--store", str(f)]) == 2
    assert f"{f}: is a file, not a store directory" in capsys.readouterr().err


def test_train_store_path_that_is_a_file(tmp_path, research_files, capsys):
    """xfer train reads its embeddings through the store: refused before anything is written
    there, and before the output folder is made."""
    f = tmp_path / "not_a_store"
    f.write_text("precious\n")
    out = tmp_path / "out"
    rc = main(["train", "--store", str(f), "--src_csv", str(research_files["gex"]), "--src_label_csv",
               str(research_files["labels"]), "--tgt_csv", str(research_files["peak"]), "--output_folder", str(out),
               "--epochs", "1"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"xfer train: error: {f}: is a file, not a store directory", line
    assert f.read_text() == "precious\n"
    assert not out.exists()
