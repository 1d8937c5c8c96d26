"""bench.harness: the standard error of a balanced accuracy, running a command, a simulated pair in
a store; and the bench package's shape (every script imports; none imports another or edits
sys.path)."""

from __future__ import annotations

import ast
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import harness
from bench.harness import balanced_accuracy_se, confusion_se, summary, summary_se, with_se
from bench.per_class_se import class_correct
from xfer.evaluate import classification_metrics

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


def _single_binomial(ba: float, n: int) -> float:
    return math.sqrt(ba * (1 - ba) / n)


def test_se_hand_computed_imbalanced():
    # 80 / 10 / 10 cells, recalls 0.9, 0.5, 0.8:
    # (1/3) sqrt(0.9*0.1/80 + 0.5*0.5/10 + 0.8*0.2/10) = (1/3) sqrt(0.042125) = 0.0684145858
    se = balanced_accuracy_se([72, 5, 8], [80, 10, 10])
    assert se == pytest.approx(0.0684145858, rel=1e-8)
    ba = (0.9 + 0.5 + 0.8) / 3
    # one binomial over the 100 cells says 0.0442: it understates the error of the small classes
    assert _single_binomial(ba, 100) == pytest.approx(0.0442217, rel=1e-5)
    assert se > 1.5 * _single_binomial(ba, 100)


def test_se_balanced_classes_equal_recalls_is_the_binomial():
    # the one case where the single binomial is right: equal class sizes and recalls
    se = balanced_accuracy_se([70, 70, 70], [100, 100, 100])
    assert se == pytest.approx(_single_binomial(0.7, 300), rel=1e-12)
    assert se == pytest.approx(math.sqrt(0.21 / 300), rel=1e-12)


def test_se_skips_absent_classes_and_refuses_impossible_counts():
    # two classes present: (1/2) sqrt(0.8*0.2/50 + 0.6*0.4/50) = 0.0447213595
    assert balanced_accuracy_se([40, 0, 30], [50, 0, 50]) == pytest.approx(0.0447213595, rel=1e-8)
    with pytest.raises(ValueError):
        balanced_accuracy_se([11, 0, 0], [10, 5, 5])
    with pytest.raises(ValueError):
        balanced_accuracy_se([0, 0, 0], [0, 0, 0])


def test_confusion_and_summary_use_the_per_class_formula():
    rng = np.random.default_rng(0)
    y = rng.choice(3, 900, p=[0.7, 0.2, 0.1])
    pred = np.where(rng.random(900) < 0.6, y, rng.integers(0, 3, 900))
    m = classification_metrics(y, pred)
    counts = np.bincount(y, minlength=3)
    right = [int(((y == c) & (pred == c)).sum()) for c in range(3)]
    assert confusion_se(m["confusion"]) == pytest.approx(balanced_accuracy_se(right, counts), rel=1e-12)
    metrics = {"peak_test": m, "baselines": {"lsi_lr": {"peak_test": {"balanced_accuracy": 0.4}},
                                             "joint_lsi_z": {"peak_test": {"balanced_accuracy": 0.5}},
                                             "gex_lr": {"peak_test": {"balanced_accuracy": 0.9}}}}
    s = summary(metrics)
    assert s["class_counts"] == counts.tolist() and s["class_correct"] == right
    assert (s["best_baseline"], s["best_baseline_value"]) == ("joint_lsi_z", 0.5)  # PEAK baselines only
    assert summary_se(s) == pytest.approx(confusion_se(m["confusion"]))
    assert with_se(s["peak_test"], s) == f"{s['peak_test']:.3f} ± {summary_se(s):.3f}"
    assert with_se(0.5, {}) == "0.500"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_per_class_counts_recovered_from_balanced_accuracy_and_accuracy(seed):
    """bench.per_class_se's re-derivation: the stored balanced accuracy and accuracy of a run, with
    the test line's class counts, give back its right predictions per class."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, 2000, p=[0.6, 0.25, 0.15])
    pred = np.where(rng.random(2000) < 0.55, y, rng.integers(0, 3, 2000))
    m = classification_metrics(y, pred)
    counts = np.bincount(y, minlength=3).tolist()
    right = [int(m["confusion"][c][c]) for c in range(3)]
    assert class_correct(counts, m["balanced_accuracy"], m["accuracy"]) == [right]


def test_run_captures_times_and_fails_clearly(tmp_path):
    ran = harness.run([sys.executable, "-c", "import os; print('hello', os.environ['OMP_NUM_THREADS'])"])
    assert ran.ok and ran.stdout.strip() == "hello 1" and ran.seconds > 0
    log = tmp_path / "out.log"
    harness.run([sys.executable, "-c", "import sys; print('to the log'); sys.stderr.write('and this')"], log=log)
    assert "to the log" in log.read_text() and "and this" in log.read_text()
    with pytest.raises(SystemExit, match="failed \\(3\\).*boom"):
        harness.run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    slow = harness.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1, check=False)
    assert slow.returncode == "timeout" and not slow.ok and slow.seconds < 20


def test_run_xfer_reads_a_finished_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"peak_test": {"balanced_accuracy": 0.61}}))
    # a finished run is read, not run again (this command would fail)
    assert harness.run_xfer(["no-such-command"], out, tmp_path / "log")["peak_test"]["balanced_accuracy"] == 0.61
    with pytest.raises(SystemExit, match="see"):
        harness.run_xfer(["no-such-command"], tmp_path / "other", tmp_path / "log")


def test_simulated_pair_in_a_store_and_its_data(tmp_path):
    from xfer.data.store import CellStore

    pair = tmp_path / "pair7"
    info = harness.simulate_into_store(pair / "store", "tiny", seed=7)
    store = CellStore(str(pair / "store"))
    assert sorted(store.names()) == ["A_GEX", "A_PEAK", "B_GEX", "B_PEAK"]
    assert [store.manifest(n).n_cells for n in ("A_GEX", "B_PEAK")] == info["cells"]
    assert info["settings"] is None
    flags = harness.pair_flags(pair)
    assert flags[:2] == ["--store", str(pair / "store")] and "store:B_PEAK" in flags
    loaded = harness.pair_data(pair).load()
    assert set(loaded) == {"src", "tgt", "test", "sup_peak"}
    assert loaded["sup_peak"].n_cells == info["cells"][1]
    assert harness.pair_data(pair, test=False).given() == ["src", "tgt"]
    only_a = harness.simulate_into_store(tmp_path / "a_only", "tiny", seed=7, lines="A", test_cells=50)
    assert sorted(CellStore(str(tmp_path / "a_only")).names()) == ["A_GEX", "A_PEAK"]
    assert only_a["cells"] == [info["cells"][0], 50]


def test_results_are_written_and_read(tmp_path):
    path = harness.write_results(tmp_path / "deep" / "r.json", {"a": 1})
    assert harness.read_results(path) == {"a": 1} and path.read_text() == '{\n "a": 1\n}'
    assert harness.read_results(tmp_path / "missing.json", default={"pairs": {}}) == {"pairs": {}}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports(name):
    importlib.import_module(f"bench.{name}")


def test_scripts_import_only_the_harness():
    """No sys.path edits, and what two scripts share comes from bench.harness, not from each other."""
    for path in [*BENCH.glob("*.py"), *BENCH.glob("harness/*.py")]:
        text = path.read_text()
        assert "sys.path.insert" not in text, path
        for node in ast.walk(ast.parse(text)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                parts = mod.split(".")
                assert not (parts[0] == "bench" and len(parts) > 1 and parts[1] != "harness"), (path, mod)
                assert parts[0] not in SCRIPTS, (path, mod)


def test_harness_imports_no_torch_ray_or_optuna():
    code = ("import sys, bench.harness; "
            "print(sorted(m for m in ('torch', 'ray', 'optuna', 'pandas') if m in sys.modules))")
    ran = harness.run([sys.executable, "-c", code])
    assert ran.stdout.strip() == "[]"
