"""The Python API (README "Python API (notebooks)"): the README's example runs as written, and
what it predicts is what `xfer predict` writes for the same checkpoint and cells."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, f"no python block under {heading!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's example, executed in a fresh folder (its namespace afterwards)."""
    import os

    cwd = tmp_path_factory.mktemp("readme")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        ns: dict = {"__name__": "readme"}
        exec(compile(readme_block("## Python API (notebooks)"), "README.md", "exec"), ns)
    finally:
        os.chdir(old)
    ns["cwd"] = cwd
    return ns


def test_the_readme_example_trains_on_in_memory_data_and_labels_cells(example):
    run = example["cwd"] / "run"
    for name in ("best_model.pt", "metrics.json", "training_history.json", "predictions_peak_test.csv"):
        assert (run / name).exists(), name
    phases = example["phases"]
    atac = example["sample_b"]["atac"]
    assert list(phases.columns) == ["predicted", "prob_G1", "prob_S", "prob_G2M"]
    assert phases.index.name == "barcode" and list(phases.index) == list(atac.obs_names)
    np.testing.assert_allclose(phases[["prob_G1", "prob_S", "prob_G2M"]].sum(1), 1.0, atol=1e-5)
    # inplace=True wrote the same prediction onto the modality
    assert (atac.obs["xfer_phase"].astype(str).values == phases["predicted"].astype(str).values).all()
    np.testing.assert_allclose(atac.obs["xfer_prob_S"].to_numpy(), phases["prob_S"].to_numpy())
    m = example["model"].metrics
    assert set(m) >= {"gex_val", "peak_val", "peak_test", "gex_test", "baselines", "model"}


def test_load_predict_gives_the_probabilities_xfer_predict_writes(example, tmp_path):
    """The done-means check: `xfer.load(...).predict(adata)` == `xfer predict` on the same checkpoint."""
    from xfer.cli import main

    atac = example["sample_b"]["atac"]
    atac[:, :].copy().write_h5ad(tmp_path / "b_atac.h5ad")
    ckpt = example["cwd"] / "run" / "best_model.pt"
    assert main(["predict", "--checkpoint", str(ckpt), "--sup_peak_csv", str(tmp_path / "b_atac.h5ad"),
                 "--store", str(tmp_path / "store"), "--output_folder", str(tmp_path / "p")]) == 0
    cli = pd.read_csv(tmp_path / "p" / "predictions.csv").set_index("barcode")
    api = example["phases"]
    cols = ["prob_G1", "prob_S", "prob_G2M"]
    np.testing.assert_allclose(api.loc[cli.index, cols].to_numpy(), cli[cols].to_numpy(), atol=1e-6)
    assert (api.loc[cli.index, "predicted"].astype(str) == cli["predicted"].astype(str)).all()
    # the Model returned by xfer.train predicts the same as the file it wrote
    again = example["model"].predict(atac)
    np.testing.assert_allclose(again[cols].to_numpy(), api[cols].to_numpy(), atol=1e-6)


def test_train_without_an_output_folder_writes_no_outputs_and_takes_config_keys(tiny_pair, tmp_path, monkeypatch):
    import xfer
    from xfer.data.writers import to_anndata

    monkeypatch.chdir(tmp_path)
    a, _ = tiny_pair
    model = xfer.train(xfer.Inputs(src=to_anndata(a.gex), tgt=to_anndata(a.peak), store=str(tmp_path / "s")),
                       epochs=2, arch="mlp")
    assert model.metrics["model"]["config"]["arch"] == "mlp" and model.metrics["model"]["epochs_run"] <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the embedding store's cache alone
    expr = model.predict(to_anndata(a.gex))  # an AnnData of expression: the expression head
    assert len(expr) == a.gex.n_cells
    model.save(tmp_path / "m.pt")
    loaded = xfer.load(tmp_path / "m.pt").predict(to_anndata(a.gex))
    np.testing.assert_allclose(loaded.iloc[:, 1:].to_numpy(), expr.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_bad_inputs_name_the_role():
    import xfer
    from xfer.errors import XferError

    with pytest.raises(XferError, match="src"):
        xfer.Inputs(src=[1, 2, 3], tgt="store:X").load()
    with pytest.raises(XferError, match="--tgt_csv"):
        xfer.Inputs(src="store:X").load(require=("src", "tgt"))


def test_importing_xfer_is_light():
    """`import xfer` (and so `xfer results` / `xfer report`) loads neither torch nor anndata."""
    code = "import sys, xfer; xfer.Inputs; print(sorted(m for m in ('torch', 'anndata', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_the_readme_sweep_from_python(tmp_path):
    """README's two blocks, run as one script in its own process (its own Ray, shut down at exit):
    `tune.sweep` returns the trials as a DataFrame and the final model as a predictor."""
    import os

    script = readme_block("## Python API (notebooks)") + readme_block("A sweep from Python") + (
        "result.trials.to_csv('trials_api.csv', index=False)\n"
        "print('MODEL', type(result.model).__name__, len(result.model.predict(sample_b['atac'])))\n")
    (tmp_path / "readme.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "trials_api.csv")
    assert len(trials) == 3 and trials.equals(pd.read_csv(tmp_path / "sweep" / "trials.csv"))
    assert "MODEL" in r.stdout and r.stdout.split("MODEL", 1)[1].split()[1] == str(
        len(pd.read_csv(tmp_path / "run" / "predictions_peak_test.csv")))
    assert (tmp_path / "sweep" / "best_model.pt").exists() and (tmp_path / "sweep" / "metrics.json").exists()
