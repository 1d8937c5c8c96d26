"""`xfer train` and `xfer predict` on MuData (.h5mu) files: the expression roles read the `rna`
modality, the accessibility roles `atac` (or the modalities named with --gex_modality /
--peak_modality); `xfer predict` writes a labelled copy of the .h5mu."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_MODEL
from xfer.cli import main

SETS = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "batch_size")]


def _mudata(line, path, rna="rna", atac="atac", drop_peak_cells: int = 0):
    """A line as one .h5mu; `drop_peak_cells`: the accessibility modality lacks the last cells."""
    from mudata import MuData

    from xfer.data.writers import to_anndata

    peak = to_anndata(line.peak)
    if drop_peak_cells:
        peak = peak[: peak.n_obs - drop_peak_cells].copy()
    MuData({rna: to_anndata(line.gex), atac: peak}).write_h5mu(path)
    return str(path)


@pytest.fixture(scope="module")
def h5mu(tmp_path_factory, tiny_pair):
    d = tmp_path_factory.mktemp("h5mu")
    a, b = tiny_pair
    return {"a": _mudata(a, d / "a.h5mu", drop_peak_cells=7), "b": _mudata(b, d / "b.h5mu"),
            "b_named": _mudata(b, d / "b_named.h5mu", rna="gex", atac="peaks"), "dir": d}


@pytest.fixture(scope="module")
def trained(h5mu, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--src_csv", h5mu["a"], "--tgt_csv", h5mu["a"], "--test_csv", h5mu["b"],
                 "--sup_peak_csv", h5mu["b"], "--store", str(h5mu["dir"] / "store"), "--epochs", "2",
                 "--batch_size", "64", "--device", "cpu", "--output_folder", str(out), *SETS]) == 0
    return out


def test_train_reads_both_modalities_of_an_h5mu(trained, tiny_pair):
    m = json.loads((trained / "metrics.json").read_text())
    a, b = tiny_pair
    n_val = len(pd.read_csv(trained / "predictions_peak_val.csv"))
    assert n_val < a.gex.n_cells - 7  # the training line is the cells both modalities hold (a validation split)
    assert m["peak_test"]["n"] == b.peak.n_cells and m["gex_test"]["n"] == b.gex.n_cells


def test_predict_on_an_h5mu_writes_a_labelled_copy(trained, h5mu, tmp_path, tiny_pair):
    import mudata

    out = tmp_path / "p"
    assert main(["predict", "--checkpoint", str(trained / "best_model.pt"), "--sup_peak_csv", h5mu["b"],
                 "--test_csv", h5mu["b"], "--store", str(h5mu["dir"] / "store"), "--device", "cpu",
                 "--output_folder", str(out)]) == 0
    preds = pd.read_csv(out / "predictions.csv")
    copy = mudata.read_h5mu(out / "b.xfer.h5mu")
    atac = copy.mod["atac"]
    assert list(atac.obs_names) == list(preds["barcode"])
    assert (atac.obs["xfer_phase"].astype(str).values == preds["predicted"].values).all()
    np.testing.assert_allclose(atac.obs["xfer_prob_G2M"].to_numpy(), preds["prob_G2M"].to_numpy(), rtol=1e-6)
    # the same checkpoint predicts the same from the test line's store datasets (the .h5mu changed nothing)
    again = tmp_path / "again"
    assert main(["predict", "--checkpoint", str(trained / "best_model.pt"), "--sup_peak_csv", "store:simB_PEAK",
                 "--store", str(_store_of(tiny_pair, tmp_path)), "--device", "cpu",
                 "--output_folder", str(again)]) == 0
    ref = pd.read_csv(again / "predictions.csv").set_index("barcode").loc[preds["barcode"]]
    np.testing.assert_allclose(ref[["prob_G1", "prob_S", "prob_G2M"]].to_numpy(),
                               preds[["prob_G1", "prob_S", "prob_G2M"]].to_numpy(), atol=1e-6)


def _store_of(pair, tmp_path):
    from xfer.data.store import CellStore

    store = CellStore(str(tmp_path / "s"))
    for line in pair:
        store.write(line.peak)
    return tmp_path / "s"


def test_modality_flags_name_other_modalities(trained, h5mu, tmp_path, capsys):
    flags = ["predict", "--checkpoint", str(trained / "best_model.pt"), "--sup_peak_csv", h5mu["b_named"],
             "--store", str(h5mu["dir"] / "store"), "--device", "cpu"]
    assert main([*flags, "--output_folder", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b_named.h5mu" in err and "atac" in err and "--peak_modality" in err
    assert not (tmp_path / "bad").exists()
    assert main([*flags, "--peak_modality", "peaks", "--output_folder", str(tmp_path / "ok")]) == 0
    assert "xfer_phase" in __import__("mudata").read_h5mu(tmp_path / "ok" / "b_named.xfer.h5mu").mod["peaks"].obs
