"""`xfer results`: the CSV cell by cell against the metrics.json files it read, the Markdown
table, and bad input (one line naming file and field, exit 2, no CSV)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import SMALL_MODEL

from xfer.cli import main

SPLITS = ("gex_val", "gex_test", "peak_val", "peak_test")
SETS = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "batch_size")]


def train_tiny(store, out, *extra) -> None:
    """A real `xfer train` folder on the tiny simulated pair (2 epochs, one member)."""
    assert main(["train", "--store", str(store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
                 "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK", "--epochs", "2", "--batch_size", "64",
                 "--device", "cpu", "--output_folder", str(out), *SETS, *extra]) == 0


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_store):
    """Two trained folders (dae/mmd, mlp/coral) and a copy of the second whose metrics.json is edited
    so that another PEAK baseline is best on peak_test, and majority (never picked) is above all."""
    root = tmp_path_factory.mktemp("results")
    train_tiny(tiny_store, root / "dae_mmd")
    train_tiny(tiny_store, root / "mlp_coral", "--arch_type", "mlp", "--divergence_type", "coral")
    shutil.copytree(root / "mlp_coral", root / "edited")
    m = json.loads((root / "edited" / "metrics.json").read_text())
    m["baselines"]["joint_lsi_coral"]["peak_test"]["balanced_accuracy"] = 0.97
    m["baselines"]["majority"]["peak_test"]["balanced_accuracy"] = 0.99
    m["model"]["config"]["source_model"] = "geneformer-316m"
    (root / "edited" / "metrics.json").write_text(json.dumps(m))
    return [root / "dae_mmd", root / "mlp_coral", root / "edited"]


def expected_row(folder) -> dict:
    """What the row of a folder must hold, from its metrics.json."""
    m = json.loads((folder / "metrics.json").read_text())
    cfg = m["model"]["config"]
    row = {"model_dir": str(folder), "source_model": cfg["source_model"], "arch": cfg["arch"],
           "divergence": cfg["divergence"]}
    for s in SPLITS:
        row[f"{s}_accuracy"], row[f"{s}_balanced_accuracy"] = m[s]["accuracy"], m[s]["balanced_accuracy"]
    row.update({f"{s}_macro_f1": m[s]["macro_f1"] for s in SPLITS})
    row.update({f"{s}_majority_rate": m[s]["majority_rate"] for s in SPLITS})
    peak = [(v["peak_test"]["balanced_accuracy"], k) for k, v in m["baselines"].items()
            if k != "majority" and "peak_test" in v]
    best = max(peak)[1]
    row["best_baseline"] = best
    row.update({f"best_baseline_peak_test_{k}": m["baselines"][best]["peak_test"][k]
                for k in ("accuracy", "balanced_accuracy", "macro_f1")})
    return row


def test_the_csv_holds_each_folders_metrics(models, tmp_path, capsys):
    out = tmp_path / "comprehensive_results.csv"
    assert main(["results", "--model_dirs", *map(str, models), "--output_csv", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for folder, row in zip(models, rows):
        want = expected_row(folder)
        assert list(row) == list(want)
        for col, v in want.items():
            assert (float(row[col]) == v) if isinstance(v, float) else (row[col] == v), (folder.name, col)
    assert [r["arch"] for r in rows] == ["dae", "mlp", "mlp"] and rows[1]["divergence"] == "coral"
    assert rows[2]["best_baseline"] == "joint_lsi_coral" and rows[1]["best_baseline"] != "joint_lsi_coral"
    # the Markdown table: a header, a rule, one row per folder with accuracy / balanced accuracy in percent
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 3 and lines[0].startswith("| Model | Embedder | GEX val | GEX test | PEAK val | PEAK test")
    for folder, line in zip(models, lines[2:]):
        m = json.loads((folder / "metrics.json").read_text())
        for s in SPLITS:
            assert f"{100 * m[s]['accuracy']:.2f}% / {100 * m[s]['balanced_accuracy']:.2f}%" in line
        assert f"({folder.name})" in line and f"{100 * m['peak_test']['majority_rate']:.2f}%" in line
    assert "| MLP-CORAL (edited) | geneformer-316m |" in lines[4]


def _break(metrics: dict, how: str) -> None:
    if how == "split field":
        del metrics["peak_test"]["balanced_accuracy"]
    elif how == "config field":
        del metrics["model"]["config"]["arch"]
    elif how == "baseline field":
        metrics["baselines"]["lsi_lr"]["peak_test"]["macro_f1"] = "high"
    elif how == "confusion":
        metrics["gex_val"]["confusion"] = [[1, 2], [3, 4]]
    elif how == "unscored split":
        metrics["gex_test"] = {"n": 0}  # what `xfer train` writes for a test line without labels


@pytest.mark.parametrize("how, where", [
    ("no metrics.json", "metrics.json: not found"),
    ("not JSON", "metrics.json: not valid JSON"),
    ("split field", "metrics.json [peak_test.balanced_accuracy]: missing"),
    ("config field", "metrics.json [model.config.arch]: missing"),
    ("baseline field", "metrics.json [baselines.lsi_lr.peak_test.macro_f1]: not a number: 'high'"),
    ("confusion", "metrics.json [gex_val.confusion]: not a 3 x 3 matrix of counts"),
    ("unscored split", "metrics.json [gex_test]: missing"),
])
def test_bad_input_names_file_and_field_and_writes_nothing(models, tmp_path, capsys, how, where):
    bad = tmp_path / "bad"
    shutil.copytree(models[0], bad)
    if how == "no metrics.json":
        (bad / "metrics.json").unlink()
    elif how == "not JSON":
        (bad / "metrics.json").write_text((models[0] / "metrics.json").read_text()[:200])
    else:
        m = json.loads((bad / "metrics.json").read_text())
        _break(m, how)
        (bad / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "csv" / "results.csv"
    assert main(["results", "--model_dirs", str(models[0]), str(bad), "--output_csv", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and f"{bad}/{where}" in err[0], err
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_the_demo_prints_the_sweep_beside_the_defaults_and_the_best_plain_baseline(models):
    """`make demo`'s last lines (tune.cli.demo_summary): every row's scores, the majority-class
    rate, and the sweep's balanced accuracy minus the defaults' and minus the best plain PEAK
    baseline's (majority never counts as one), from the metrics.json files themselves."""
    from tune.cli import demo_summary
    from xfer.results import best_baseline
    swept = json.loads((models[2] / "metrics.json").read_text())   # majority 0.99 above joint_lsi_coral 0.97
    defaults = json.loads((models[0] / "metrics.json").read_text())
    text = demo_summary("B", swept, defaults)
    name, base = best_baseline(swept, models[2] / "metrics.json")
    ba = swept["peak_test"]["balanced_accuracy"]
    assert name == "joint_lsi_coral" and f"baseline {name}" in text and "majority-class rate" in text
    last = text.splitlines()[-1]
    assert f"sweep − shipped defaults {ba - defaults['peak_test']['balanced_accuracy']:+.3f}" in last
    assert f"sweep − best plain baseline ({name}) {ba - base['balanced_accuracy']:+.3f}" in last
