"""`xfer predict`: a checkpoint rebuilds the whole predictor and reproduces its run's test-line
predictions from every input format; bad input is one clear line and nothing written."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SMALL_MODEL
from xfer.cli import main

SETS = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "batch_size", "n_components")]
STORE_TEST = ["--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK"]


def _train(store, out, *extra):
    assert main(["train", "--store", str(store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK", *STORE_TEST,
                 "--epochs", "3", "--batch_size", "64", "--set=n_components=16", "--output_folder", str(out),
                 "--device", "cpu", *SETS, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store):
    return _train(tiny_store, tmp_path_factory.mktemp("train") / "run")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_pair):
    """The test line (simB) as CSV, .h5ad and 10x .h5 files."""
    from xfer.data.simulate import write_simulation

    d = tmp_path_factory.mktemp("files")
    write_simulation([tiny_pair[1]], d, formats=("csv", "h5ad", "10x"))
    return d


def _predict(store, out, *flags):
    return main(["predict", "--store", str(store), "--device", "cpu", "--output_folder", str(out), *flags])


def _assert_same(got_csv, ref_csv):
    """Same cells, same classes, probabilities within 1e-5."""
    ref = pd.read_csv(ref_csv)
    got = pd.read_csv(got_csv).set_index("barcode").loc[ref["barcode"]]
    assert len(got) == len(ref)
    assert (got["predicted"].to_numpy() == ref["predicted"].to_numpy()).all()
    cols = ["prob_G1", "prob_S", "prob_G2M"]
    np.testing.assert_allclose(got[cols].to_numpy(), ref[cols].to_numpy(), atol=1e-5, rtol=0)


def _test_flags(fmt, files):
    if fmt == "store":
        return STORE_TEST
    if fmt == "csv":
        return ["--test_csv", str(files / "simB_GEX.csv"), "--sup_peak_csv", str(files / "simB_PEAK.csv"),
                "--test_label_csv", str(files / "simB_labels.csv")]
    if fmt == "h5ad":
        return ["--test_csv", str(files / "simB_GEX.h5ad"), "--sup_peak_csv", str(files / "simB_PEAK.h5ad")]
    h5 = str(files / "simB_filtered_feature_bc_matrix.h5")
    return ["--test_csv", h5, "--sup_peak_csv", h5]


@pytest.mark.parametrize("fmt", ["store", "csv", "h5ad", "10x"])
def test_predict_reproduces_the_training_run(trained, files, tiny_store, tmp_path, fmt, capsys):
    out = tmp_path / "pred"
    assert _predict(tiny_store, out, "--checkpoint", str(trained / "best_model.pt"), *_test_flags(fmt, files)) == 0
    _assert_same(out / "predictions.csv", trained / "predictions_peak_test.csv")      # accessibility head
    _assert_same(out / "predictions_gex.csv", trained / "predictions_gex_test.csv")   # expression head
    printed = capsys.readouterr().out
    assert "peak mapping (overlap_50pct" in printed and "training peaks mapped" in printed
    summary = json.loads((out / "predict.json").read_text())
    assert summary["peak_mapping"]["n_ref_mapped"] > 0
    if fmt == "10x":  # no labels in the file: predictions only
        assert summary["metrics"] == {} and "true" not in pd.read_csv(out / "predictions.csv").columns
    else:             # labels given: the usual metrics, equal to the run's own scores of the test line
        run = json.loads((trained / "metrics.json").read_text())
        for head, split in (("peak", "peak_test"), ("gex", "gex_test")):
            for key in ("accuracy", "balanced_accuracy", "macro_f1", "majority_rate", "n", "confusion"):
                assert summary["metrics"][head][key] == run[split][key], (head, key)
        assert "balanced_accuracy" in printed
    if fmt == "h5ad":  # a copy of each input with the phase and probabilities in obs
        pred = pd.read_csv(out / "predictions.csv").set_index("barcode")
        a = ad.read_h5ad(out / "simB_PEAK.xfer.h5ad")
        assert list(a.obs["xfer_phase"].astype(str)) == list(pred.loc[a.obs_names, "predicted"])
        np.testing.assert_allclose(a.obs["xfer_prob_S"], pred.loc[a.obs_names, "prob_S"], atol=1e-6)
        assert (out / "simB_GEX.xfer.h5ad").exists()


def test_predict_peaks_only_and_expression_only(trained, tiny_store, tmp_path):
    ck = ["--checkpoint", str(trained / "best_model.pt")]
    assert _predict(tiny_store, tmp_path / "p", *ck, "--sup_peak_csv", "store:B_PEAK") == 0
    _assert_same(tmp_path / "p" / "predictions.csv", trained / "predictions_peak_test.csv")
    assert not (tmp_path / "p" / "predictions_gex.csv").exists()
    assert _predict(tiny_store, tmp_path / "g", *ck, "--test_csv", "store:B_GEX") == 0
    pred = pd.read_csv(tmp_path / "g" / "predictions.csv")
    assert list(pred.columns) == ["barcode", "true", "predicted", "prob_G1", "prob_S", "prob_G2M"]
    _assert_same(tmp_path / "g" / "predictions.csv", trained / "predictions_gex_test.csv")


def test_chromosome_names_without_chr_prefix_are_matched(trained, files, tiny_store, tmp_path, capsys):
    df = pd.read_csv(files / "simB_PEAK.csv", index_col=0)
    df.columns = [c[3:] if c.startswith("chr") else c for c in df.columns]
    df.to_csv(tmp_path / "nochr_PEAK.csv")
    assert _predict(tiny_store, tmp_path / "p", "--checkpoint", str(trained / "best_model.pt"),
                    "--sup_peak_csv", str(tmp_path / "nochr_PEAK.csv")) == 0
    assert "chr prefix ignored" in capsys.readouterr().out
    _assert_same(tmp_path / "p" / "predictions.csv", trained / "predictions_peak_test.csv")


def test_predict_with_a_stored_geneformer_embedding(tmp_path, tiny_store, sim_geneformer, capsys):
    data = ["--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK", *STORE_TEST]
    assert main(["embed", "--source_model", "geneformer", *sim_geneformer, *data]) == 0
    run = _train(tiny_store, tmp_path / "run", "--source_model", "geneformer")
    ck = ["--checkpoint", str(run / "best_model.pt")]
    assert _predict(tiny_store, tmp_path / "p", *ck, *STORE_TEST) == 0
    _assert_same(tmp_path / "p" / "predictions.csv", run / "predictions_peak_test.csv")
    _assert_same(tmp_path / "p" / "predictions_gex.csv", run / "predictions_gex_test.csv")
    # expression nobody embedded (other labels: another dataset) -> the xfer embed command to run
    capsys.readouterr()
    assert _predict(tiny_store, tmp_path / "q", *ck, "--test_csv", "store:B_GEX_relabelled") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "xfer embed --source_model geneformer" in err
    assert "--test_csv store:B_GEX_relabelled" in err and "[geneformer]" in err
    assert not (tmp_path / "q").exists()


def _fails(capsys, store, out, *flags) -> str:
    capsys.readouterr()
    assert _predict(store, out, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists(), "an error must leave nothing written"
    return err


def test_errors_are_one_line_and_write_nothing(trained, files, tiny_store, tmp_path, capsys):
    best = trained / "best_model.pt"
    out = tmp_path / "out"
    # a checkpoint of another format version
    ck = torch.load(best, weights_only=True)
    torch.save({**ck, "format": "xfer.cdann/1"}, tmp_path / "old.pt")
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(tmp_path / "old.pt"), "--sup_peak_csv", "store:B_PEAK")
    assert "old.pt [format]: checkpoint format 'xfer.cdann/1'" in err and "xfer.cdann/3" in err
    # not a checkpoint at all, or no file
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(tmp_path / "junk.pt"), "--sup_peak_csv", "store:B_PEAK")
    assert "junk.pt: not a readable checkpoint" in err
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(tmp_path / "none.pt"), "--sup_peak_csv", "store:B_PEAK")
    assert "none.pt: checkpoint file not found" in err
    # new data that share no peak coordinates with the training peaks
    df = pd.read_csv(files / "simB_PEAK.csv", index_col=0)
    df.columns = ["Z" + c for c in df.columns]
    df.to_csv(tmp_path / "far_PEAK.csv")
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(best), "--sup_peak_csv", str(tmp_path / "far_PEAK.csv"))
    assert "far_PEAK.csv [features]: shares no peak coordinates with the training line's" in err
    # a run without the peak mapper matches peaks by name: a chr-prefix difference is refused, saying why
    ck_names = {**ck, "config": {**ck["config"], "data": {**ck["config"]["data"], "use_peak_mapper": False}}}
    torch.save(ck_names, tmp_path / "by_name.pt")
    df.columns = [c[4:] for c in df.columns]  # Zchr1:... -> 1:...
    df.to_csv(tmp_path / "nochr_PEAK.csv")
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(tmp_path / "by_name.pt"),
                 "--sup_peak_csv", str(tmp_path / "nochr_PEAK.csv"))
    assert "nochr_PEAK.csv [features]: shares no peak name with the training line" in err and "'chr' prefix" in err
    # nothing to label, or the training line's flags
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(best))
    assert "--sup_peak_csv" in err
    err = _fails(capsys, tiny_store, out, "--checkpoint", str(best), "--src_csv", "store:A_GEX",
                 "--sup_peak_csv", "store:B_PEAK")
    assert "--src_csv" in err and "already in the checkpoint" in err


def test_joint_lsi_basis_round_trips_through_the_checkpoint(tiny_store, tmp_path):
    """peak_repr=joint_lsi fits its basis on both lines (no labels); xfer predict rebuilds it
    from the checkpoint, and a new line gets its own IDF."""
    run = _train(tiny_store, tmp_path / "run", "--set=peak_repr=joint_lsi")
    ck = torch.load(run / "best_model.pt", weights_only=True)
    assert "lsi_components" in ck["preprocess"]["peaks"] and "lsi_idf" not in ck["preprocess"]["peaks"]
    assert _predict(tiny_store, tmp_path / "p", "--checkpoint", str(run / "best_model.pt"), *STORE_TEST) == 0
    _assert_same(tmp_path / "p" / "predictions.csv", run / "predictions_peak_test.csv")
    # the basis saw the test line's cells: training on a relabelled copy gives the same weights
    other = _train(tiny_store, tmp_path / "relabelled", "--set=peak_repr=joint_lsi", "--test_csv",
                   "store:B_GEX_relabelled", "--sup_peak_csv", "store:B_PEAK_relabelled")
    ck2 = torch.load(other / "best_model.pt", weights_only=True)
    assert all(torch.equal(ck["model"][k], ck2["model"][k]) for k in ck["model"])


def test_seed_ensemble_averages_its_members_and_predicts_as_trained(tiny_store, tmp_path):
    """ensemble=2 is two runs (seeds 0 and 1, each its own split) whose test-line probabilities
    are averaged; its checkpoint holds both predictors and xfer predict reproduces it."""
    from xfer.checkpoint import load_checkpoint
    from xfer.errors import StoreError

    ens = _train(tiny_store, tmp_path / "ens", "--set=ensemble=2")
    one = [_train(tiny_store, tmp_path / f"s{s}", f"--seed={s}") for s in (0, 1)]
    cols = ["prob_G1", "prob_S", "prob_G2M"]
    got = pd.read_csv(ens / "predictions_peak_test.csv")
    mean = sum(pd.read_csv(r / "predictions_peak_test.csv")[cols].to_numpy() for r in one) / 2
    np.testing.assert_allclose(got[cols].to_numpy(), mean, atol=1e-6)
    val = pd.read_csv(ens / "predictions_peak_val.csv")  # each member on its own validation cells
    assert sorted(val["member"].unique()) == [0, 1]
    for m, r in enumerate(one):
        own = pd.read_csv(r / "predictions_peak_val.csv")
        np.testing.assert_allclose(val[val["member"] == m][cols].to_numpy(), own[cols].to_numpy(), atol=1e-6)
    metrics = json.loads((ens / "metrics.json").read_text())
    assert [m["seed"] for m in metrics["model"]["members"]] == [0, 1]
    assert (ens / "training_history_member1.json").exists()
    ck = torch.load(ens / "best_model.pt", weights_only=True)
    assert len(ck["ensemble"]) == 2 and ck["ensemble"][1]["config"]["optim"]["seed"] == 1
    with pytest.raises(StoreError, match="ensemble of 2 models"):
        load_checkpoint(ens / "best_model.pt")
    assert _predict(tiny_store, tmp_path / "p", "--checkpoint", str(ens / "best_model.pt"), *STORE_TEST) == 0
    _assert_same(tmp_path / "p" / "predictions.csv", ens / "predictions_peak_test.csv")
    _assert_same(tmp_path / "p" / "predictions_gex.csv", ens / "predictions_gex_test.csv")
    assert json.loads((tmp_path / "p" / "predict.json").read_text())["model"]["members"] == 2


def test_an_ensemble_of_different_configs_is_scored_and_predicted_member_by_member(tiny_store, tmp_path):
    """A sweep's final model averages trials that differ in architecture and inputs: each member
    is featurised with its own preprocessing. `evaluate_checkpoint` (how `xfer tune` scores it)
    and `xfer predict` both give the mean of the members' own test-line predictions."""
    from xfer.checkpoint import ensemble_checkpoint, export_best, read_checkpoint, save_checkpoint
    from xfer.data.inputs import DataSources
    from xfer.pipeline import evaluate_checkpoint

    runs = [_train(tiny_store, tmp_path / "mlp", "--set=ensemble=1", "--set=arch=mlp"),
            _train(tiny_store, tmp_path / "dae", "--set=ensemble=1", "--set=arch=dae", "--set=bin_size=0",
                   "--set=lr=0.002")]
    members = [export_best(read_checkpoint(r / "best_model.pt")) for r in runs]
    assert members[0]["config"]["model"]["arch"] != members[1]["config"]["model"]["arch"]
    ens = ensemble_checkpoint(members)
    save_checkpoint(ens, tmp_path / "ens.pt")
    args = DataSources(store=str(tiny_store), src="store:A_GEX", tgt="store:A_PEAK", test="store:B_GEX",
                       sup_peak="store:B_PEAK")
    (tmp_path / "scored").mkdir()
    metrics, _ = evaluate_checkpoint(args, ens, tmp_path / "scored")
    cols = ["prob_G1", "prob_S", "prob_G2M"]
    for split in ("peak_test", "gex_test"):
        got = pd.read_csv(tmp_path / "scored" / f"predictions_{split}.csv")
        mean = sum(pd.read_csv(r / f"predictions_{split}.csv")[cols].to_numpy() for r in runs) / 2
        np.testing.assert_allclose(got[cols].to_numpy(), mean, atol=1e-6)
    single, _ = evaluate_checkpoint(args, members[0])
    assert single["peak_test"] == json.loads((runs[0] / "metrics.json").read_text())["peak_test"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "majority_rate"} <= set(metrics["peak_test"])
    assert _predict(tiny_store, tmp_path / "p", "--checkpoint", str(tmp_path / "ens.pt"), *STORE_TEST) == 0
    _assert_same(tmp_path / "p" / "predictions.csv", tmp_path / "scored" / "predictions_peak_test.csv")
