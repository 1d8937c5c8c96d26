"""`xfer map-peaks` -> `xfer train --peak_mapper_method neural` -> `xfer predict`: the round trip,
the checkpoint carrying the mapper, and a mapper trained for other peak sets refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_MODEL
from xfer.cli import main

SETS = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "batch_size")]


def _map(store, out, source, target, *extra):
    return main(["map-peaks", "--store", str(store), "--source_peaks", source, "--target_peaks", target,
                 "--output_folder", str(out), "--epochs", "3", "--device", "cpu", *extra])


def _train(store, out, mapper, *extra):
    return main(["train", "--store", str(store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
                 "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK", "--epochs", "2", "--batch_size", "64",
                 "--device", "cpu", "--peak_mapper_method", "neural", "--peak_mapper", str(mapper),
                 "--output_folder", str(out), *SETS, *extra])


@pytest.fixture(scope="module")
def mapped(tiny_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("neural")
    assert _map(tiny_store, d / "mapper", "store:A_PEAK", "store:B_PEAK") == 0
    assert _train(tiny_store, d / "run", d / "mapper" / "mapper.pt") == 0
    return d


def test_map_peaks_then_train_uses_the_mapper(mapped):
    assert (mapped / "mapper" / "mapper.pt").exists()
    m = json.loads((mapped / "run" / "metrics.json").read_text())
    assert m["model"]["peak_mapping"]["method"] == "neural"
    assert m["model"]["config"]["peak_mapper_method"] == "neural"
    assert "peak_test" in m and 0.0 <= m["peak_test"]["balanced_accuracy"] <= 1.0


def test_predict_needs_only_the_checkpoint(mapped, tiny_store, tmp_path):
    """The checkpoint carries the mapper: predict reproduces the run's test-line predictions even
    with the mapper's file gone."""
    moved = mapped / "mapper_moved"
    (mapped / "mapper").rename(moved)
    try:
        assert main(["predict", "--store", str(tiny_store), "--checkpoint", str(mapped / "run" / "best_model.pt"),
                     "--sup_peak_csv", "store:B_PEAK", "--device", "cpu", "--output_folder", str(tmp_path / "p")]) == 0
    finally:
        moved.rename(mapped / "mapper")
    got = pd.read_csv(tmp_path / "p" / "predictions.csv")
    ref = pd.read_csv(mapped / "run" / "predictions_peak_test.csv")
    cols = ["prob_G1", "prob_S", "prob_G2M"]
    np.testing.assert_allclose(got[cols].to_numpy(), ref[cols].to_numpy(), atol=1e-5)
    assert json.loads((tmp_path / "p" / "predict.json").read_text())["peak_mapping"]["method"] == "neural"


def test_a_mapper_for_other_peak_sets_is_refused_by_train(tiny_store, mapped, tmp_path, capsys):
    """A mapper whose source line is the test line (B -> A) cannot serve training line A."""
    assert _map(tiny_store, tmp_path / "other", "store:B_PEAK", "store:A_PEAK") == 0
    capsys.readouterr()
    assert _train(tiny_store, tmp_path / "run", tmp_path / "other" / "mapper.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mapper.pt" in err and "other peak sets" in err
    assert not (tmp_path / "run").exists()


def test_predict_refuses_cells_of_other_peak_sets(mapped, tiny_store, tmp_path, capsys):
    """The checkpoint's mapper reads the test line's peaks; the training line's own peaks are another set."""
    assert main(["predict", "--store", str(tiny_store), "--checkpoint", str(mapped / "run" / "best_model.pt"),
                 "--sup_peak_csv", "store:A_PEAK", "--device", "cpu", "--output_folder", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "A_PEAK" in err and "features" in err
    assert not (tmp_path / "p").exists()


def test_neural_without_a_mapper_is_a_config_error(tiny_store, tmp_path, capsys):
    assert main(["train", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
                 "--peak_mapper_method", "neural", "--output_folder", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "peak_mapper" in err and "xfer map-peaks" in err and not (tmp_path / "r").exists()


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_a_sweep_searches_the_mapping_method(mapped, tiny_store, tmp_path):
    """A space may search peak_mapper_method with the neural mapper among its choices (the mapper
    fixed with --peak_mapper); each trial's row says which method it drew."""
    import os
    import subprocess
    import sys

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"peak_mapper_method": {"type": "categorical", "choices": ["overlap_50pct", "neural"]},
                                 "warmup_epochs": 1}))
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "xfer.cli", "tune", "--store", str(tiny_store), "--src_csv", "store:A_GEX",
            "--tgt_csv", "store:A_PEAK", "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK",
            "--space", str(space), "--peak_mapper", str(mapped / "mapper" / "mapper.pt"), "--n_trials", "4",
            "--search_epochs", "3", "--scheduler", "fifo", "--num_cpus", "2", "--output_folder", str(out),
            *[a for a in SETS if "warmup" not in a]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    assert set(trials["param.peak_mapper_method"]) <= {"overlap_50pct", "neural"}
    assert trials["param.peak_mapper_method"].nunique() == 2  # TPE's random start draws both within 4 trials


def test_a_space_with_neural_needs_the_mapper(tiny_store, tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"peak_mapper_method": {"type": "categorical", "choices": ["overlap_50pct", "neural"]}}))
    assert main(["tune", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
                 "--space", str(space), "--output_folder", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--peak_mapper" in err and not (tmp_path / "s").exists()
