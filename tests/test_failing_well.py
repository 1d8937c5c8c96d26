"""Failing well (issue 27): an output folder that cannot be one, training labels without every
phase, and an unexpected exception: each is one line on stderr, a non-zero exit, and nothing
written. (Clusters that cannot be reached or hold no trial: tests/test_cluster_checks.py;
SIGTERM: tests/test_sigterm.py.)"""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import SMALL_MODEL, write_csv
from xfer.cli import main
from xfer.phases import decode_phases

SETS = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "batch_size", "n_components")]
DATA = ["--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK", "--test_csv", "store:B_GEX",
        "--sup_peak_csv", "store:B_PEAK", "--source_model", "pca"]


def _fails(capsys, argv, code: int = 2) -> str:
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- output folders

@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a folder\n")
    return f


def test_predict_into_an_existing_file(tiny_store, tmp_path, a_file, capsys):
    """Case 1: `xfer predict --output_folder F` where F is a file (a FileExistsError traceback before)."""
    before = _listing(tmp_path)
    err = _fails(capsys, ["predict", "--store", str(tiny_store), "--checkpoint", str(tmp_path / "none.pt"),
                          "--sup_peak_csv", "store:B_PEAK", "--output_folder", str(a_file)])
    assert err == f"xfer predict: error: {a_file} [--output_folder]: exists and is not a folder; give a folder " \
                  "(new or existing)"
    assert a_file.read_text() == "not a folder\n" and _listing(tmp_path) == before


@pytest.mark.parametrize("command", ["train", "baseline", "tune", "map-peaks"])
def test_an_output_folder_under_a_file(command, tiny_store, tmp_path, a_file, capsys):
    """Case 2: `--output_folder F/sub` where F is a regular file (a NotADirectoryError traceback
    before), for every command that writes a folder: refused before any data is read."""
    flags = {"map-peaks": ["--source_peaks", "store:A_PEAK", "--target_peaks", "store:B_PEAK"],
             "tune": [*DATA, "--n_trials", "2", "--search_epochs", "12", "--num_cpus", "1"]}.get(command, DATA)
    before = _listing(tmp_path)
    err = _fails(capsys, [command, "--store", str(tiny_store), *flags, "--output_folder", str(a_file / "sub")])
    assert err == f"xfer {command}: error: {a_file / 'sub'} [--output_folder]: cannot be created: {a_file} is a " \
                  "file, not a folder"
    assert _listing(tmp_path) == before


# ----------------------------------------------------------------------------- training labels

@pytest.fixture
def one_phase(tmp_path, tiny_pair):
    """The training line's CSVs with every cell labelled G1 (case 3), and with S down to 3 cells."""
    A, _ = tiny_pair
    few_s = A.gex.labels.copy()
    few_s[np.flatnonzero(few_s == 1)[3:]] = 0
    out = {}
    for tag, labels in (("one", np.zeros_like(A.gex.labels)), ("few_s", few_s)):
        d = tmp_path / tag
        d.mkdir()
        out[tag] = {role: str(write_csv(d / f"{role}.csv", ds.barcodes, ds.features, ds.X.toarray(),
                                        phase=decode_phases(labels)))
                    for role, ds in (("src", A.gex), ("tgt", A.peak))}
    return out


@pytest.mark.parametrize("command", ["train", "baseline", "tune"])
def test_training_labels_without_every_phase(command, one_phase, tiny_pair, tmp_path, capsys):
    """Case 3: one phase only (before: the model trained and wrote its files, then a baseline died in
    scikit-learn's traceback, the folder half-written). The check runs before anything is embedded,
    trained, ingested or written, and names the counts."""
    files = one_phase["one"]
    store = tmp_path / "store"
    out = tmp_path / "out"
    extra = ["--n_trials", "2", "--search_epochs", "12", "--num_cpus", "1"] if command == "tune" else \
        ["--epochs", "2", "--device", "cpu", *SETS] if command == "train" else []
    err = _fails(capsys, [command, "--store", str(store), "--src_csv", files["src"], "--tgt_csv", files["tgt"],
                          "--source_model", "pca", *extra,
                          "--output_folder", str(out)])
    n = tiny_pair[0].gex.n_cells
    assert err.startswith(f"xfer {command}: error: {files['src']} [phase]: the training labels need every phase "
                          "with at least 5 cells (the validation split takes 20% of each)"), err
    assert err.endswith(f"they hold G1 {n}, S 0, G2M 0")
    assert not out.exists()
    assert not (store / "datasets").exists() or not list((store / "datasets").iterdir()), "nothing ingested"


def test_a_phase_with_too_few_cells_for_the_validation_split(one_phase, tmp_path, capsys):
    files = one_phase["few_s"]
    err = _fails(capsys, ["train", "--src_csv", files["src"], "--tgt_csv", files["tgt"], "--source_model", "pca",
                          "--epochs", "2", "--device", "cpu", "--output_folder", str(tmp_path / "out")])
    assert re.search(r"they hold G1 \d+, S 3, G2M \d+$", err), err
    assert not (tmp_path / "out").exists()


def test_the_python_api_checks_the_labels_too(tiny_pair):
    import xfer
    from xfer.errors import InputError

    A, _ = tiny_pair
    with pytest.raises(InputError, match=r"\[phase\]: the training labels need every phase"):
        xfer.train(xfer.Inputs(src=A.gex.with_labels(np.zeros_like(A.gex.labels)),
                               tgt=A.peak.with_labels(np.zeros_like(A.peak.labels))), epochs=1, device="cpu")


# ----------------------------------------------------------------------------- one error path

def test_an_unexpected_exception_is_one_line_with_its_traceback_kept(tiny_store, tmp_path, monkeypatch, capsys):
    """Anything not foreseen (a bug, the environment) is one line naming the command and the
    exception, and where the full traceback went; -v prints it too. Exit status 1."""
    import xfer.pipeline

    def broken(*a, **k):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(xfer.pipeline, "run_baseline", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    argv = ["baseline", "--store", str(tiny_store), *DATA, "--output_folder", str(tmp_path / "out")]
    err = _fails(capsys, argv, code=1)
    m = re.fullmatch(r"xfer baseline: unexpected error: RuntimeError: something nobody foresaw \(full traceback in "
                     r"(\S+) \(or rerun with `xfer -v baseline \.\.\.`\)\)", err)
    assert m, err
    kept = open(m.group(1)).read()
    assert "Traceback (most recent call last)" in kept and "second line" in kept and "in broken" in kept
    capsys.readouterr()
    assert main(["-v", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "xfer baseline: unexpected error: RuntimeError: something nobody foresaw (full traceback in ")


def test_demo_on_an_unreachable_cluster_makes_nothing(tmp_path, capsys):
    """`xfer demo --address` checks the cluster before it simulates anything (the sweep's own check,
    tests/test_cluster_checks.py, comes after the demo's data)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]      # free once closed: nothing listens there
    out = tmp_path / "demo"
    err = _fails(capsys, ["demo", "--address", f"127.0.0.1:{port}", "--output_folder", str(out)])
    assert err.startswith("xfer demo: error: ") and f"127.0.0.1:{port}" in err, err
    assert not out.exists()
