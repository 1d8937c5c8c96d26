"""`xfer train` / `xfer baseline` end to end on the tiny simulated pair, and the no-leakage proof."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from conftest import SMALL_MODEL
from xfer.cli import main

SETS = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "batch_size")]


def _train(store, out, test_suffix="", extra=()):
    args = ["train", "--store", str(store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--test_csv", f"store:B_GEX{test_suffix}", "--sup_peak_csv", f"store:B_PEAK{test_suffix}",
            "--epochs", "3", "--batch_size", "64", "--output_folder", str(out), "--device", "cpu", *SETS, *extra]
    assert main(args) == 0


def test_train_writes_every_output(tmp_path, tiny_store, capsys):
    out = tmp_path / "run"
    _train(tiny_store, out)
    printed = capsys.readouterr().out
    assert "peak_test" in printed and "lsi_aligned" in printed and "majority-class rate" in printed
    m = json.loads((out / "metrics.json").read_text())
    for split in ("gex_val", "gex_test", "peak_val", "peak_test"):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "majority_rate", "n", "confusion"):
            assert key in m[split], (split, key)
        assert np.array(m[split]["confusion"]).shape == (3, 3)
        assert np.array(m[split]["confusion"]).sum() == m[split]["n"]
    assert set(m["baselines"]) == {"majority", "lsi_lr", "lsi_aligned", "lsi_coral", "joint_lsi_z", "joint_lsi_coral",
                                   "gex_lr", "marker_score"}
    assert m["baselines"]["lsi_aligned"]["peak_test"]["n"] == m["peak_test"]["n"]
    pred = pd.read_csv(out / "predictions_peak_test.csv")
    assert list(pred.columns) == ["barcode", "true", "predicted", "prob_G1", "prob_S", "prob_G2M"]
    np.testing.assert_allclose(pred[["prob_G1", "prob_S", "prob_G2M"]].sum(1), 1.0, atol=1e-4)
    hist = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3] and "loss/recon" in hist[0]
    ck = torch.load(out / "best_model.pt", weights_only=True)
    assert ck["config"]["optim"]["epochs"] == 3 and ck["epoch"] == m["model"]["best_epoch"]


def test_no_test_label_reaches_training(tmp_path, tiny_store):
    """Changing every test label leaves the weights and every training decision identical,
    with the test line's unlabelled peaks used for adaptation and self-training."""
    pseudo = ("--set", "lambda_pseudo=1", "--set", "warmup_epochs=1")  # pseudo-labels from epoch 2 on
    _train(tiny_store, tmp_path / "a", extra=pseudo)
    _train(tiny_store, tmp_path / "b", "_relabelled", extra=pseudo)
    wa = torch.load(tmp_path / "a" / "best_model.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "best_model.pt", weights_only=True)
    assert wa["epoch"] == wb["epoch"] and wa["best_metric"] == wb["best_metric"]
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_seconds", "train_seconds")} for e in h]
    ha = json.loads((tmp_path / "a" / "training_history.json").read_text())
    hb = json.loads((tmp_path / "b" / "training_history.json").read_text())
    assert strip(ha) == strip(hb)
    assert ha[-1]["pseudo_labels"] > 0 and ha[-1]["loss/pseudo"] > 0
    pa = pd.read_csv(tmp_path / "a" / "predictions_peak_test.csv")
    pb = pd.read_csv(tmp_path / "b" / "predictions_peak_test.csv")
    assert (pa["predicted"] == pb["predicted"]).all() and (pa["true"] != pb["true"]).all()
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["peak_val"] == mb["peak_val"]  # validation is the training line's: unchanged


def test_baseline_command(tmp_path, tiny_store, capsys):
    out = tmp_path / "bl"
    assert main(["baseline", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
                 "--sup_peak_csv", "store:B_PEAK", "--output_folder", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["baselines"]["lsi_aligned"]["peak_test"]["n"] > 0
    assert m["baselines"]["joint_lsi_z"]["peak_test"]["n"] == m["baselines"]["joint_lsi_coral"]["peak_test"]["n"] > 0
    assert "gex_test" not in m["baselines"]["majority"]  # no --test_csv given
    assert "joint_lsi_z" in capsys.readouterr().out


def test_train_bad_config_names_the_key(tmp_path, tiny_store, capsys):
    rc = main(["train", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
               "--set", "lamda_domain=1", "--output_folder", str(tmp_path / "x")])
    assert rc == 2
    assert "config key 'lamda_domain': unknown key (did you mean 'lambda_domain'?)" in capsys.readouterr().err


def test_train_requires_the_training_line(tmp_path, capsys):
    assert main(["train", "--output_folder", str(tmp_path / "x")]) == 2
    assert "--src_csv" in capsys.readouterr().err


def test_an_objective_that_needs_the_test_line_fails_before_anything_is_written(tmp_path, tiny_store, capsys):
    out = tmp_path / "run"
    args = ["train", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--objective", "transfer", "--output_folder", str(out), *SETS]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config key 'objective': 'transfer' needs the test line's peaks" in err[0]
    assert not out.exists()
    # agreement needs the test line's expression
    args = ["train", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--sup_peak_csv", "store:B_PEAK", "--objective", "agreement", "--output_folder", str(out), *SETS]
    assert main(args) == 2
    assert "'agreement' needs the test line's expression (--test_csv)" in capsys.readouterr().err
    assert not out.exists()
