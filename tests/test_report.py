"""`xfer report`: report.html of a sweep folder and of an `xfer train` folder, rendered by headless
Chromium (no console error, the plots drawn, a non-blank screenshot), offline (plotly.js inlined
once, nothing fetched), and bad input (one line naming file and field, exit 2, no report.html).

The sweep folder is built cheaply but in the real formats: a real Optuna study in SQLite (what
the searcher records: intermediate values per epoch, ASHA-stopped trials PRUNED, the Ray trial id
tag), sweep.json written by tune.settings.Sweep, trials.csv by tune.export.trial_table from per-epoch
reports that are a real training run's history, and that run's metrics.json as the sweep's.
"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from chromium import chromium, read_png, screenshot
from test_results import train_tiny

from xfer.cli import main
from xfer.report import try_write_report
from xfer.sweep_files import asha_rungs

needs_chromium = pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (Debian package "
                                    "`chromium`; `make test` installs it as root with apt)")
FIGURE = 'class="plot-container plotly"'  # plotly's wrapper of a drawn figure


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, tiny_store):
    out = tmp_path_factory.mktemp("report") / "train"
    train_tiny(tiny_store, out)
    return out


def make_sweep(folder, train_dir, completed=(0, 2, 3, 5), n_trials=6, search_epochs=4):
    """A sweep folder of `n_trials` trials (those in `completed` ran every epoch; the others were
    stopped at ASHA's first or second rung), in the files and formats `xfer tune` writes."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from tune.export import trial_table
    from tune.settings import Sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True)
    history = json.loads((train_dir / "training_history.json").read_text())
    space = {"arch": CategoricalDistribution(["dae", "mlp"]), "lr": FloatDistribution(1e-4, 3e-3, log=True),
             "lambda_domain": FloatDistribution(0.01, 1.0, log=True)}
    sw = Sweep(name="sweep", output=folder, spec={}, base={}, space={}, n_trials=n_trials,
               search_epochs=search_epochs, metric="balanced_accuracy", cpus_per_trial=1.0, gpus_per_trial=0.0,
               num_workers=1, trainer="function", grace_period=1, reduction_factor=2, checkpoint_every=5,
               max_failures=2, seed=0, data_args={}, objective="agreement")
    study = optuna.create_study(study_name=sw.name, direction="maximize", storage=f"sqlite:///{sw.study_db}",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    rng, grid = np.random.default_rng(0), []
    for i in range(n_trials):
        t = study.ask(space)
        rid, done = f"{i:04d}a1b2", i in completed
        epochs = search_epochs if done else asha_rungs(1, 2, search_epochs)[i % 2]
        reports, best = [], (-1.0, 0)
        for e in range(1, epochs + 1):
            obj = 0.3 + 0.04 * e + 0.2 * t.params["lambda_domain"] + rng.normal(0, 0.01)
            best = max(best, (obj, e))
            reports.append({**history[(e - 1) % len(history)], "epoch": e, "objective": obj,
                            "best_objective": best[0], "best_epoch": best[1], "trial_id": rid, "hostname": "node0",
                            "node_ip": "127.0.0.1", "node_id": "ab" * 28, "time_total_s": 0.4 * e})
            if e < epochs or not done:  # a completed trial's last epoch is its value (tune/searcher.py)
                t.report(obj, e)
        t.set_user_attr("ray_trial_id", rid)
        t.set_user_attr("epochs_run", epochs)
        study.tell(t, obj if done else None, state=optuna.trial.TrialState.COMPLETE if done else
                   optuna.trial.TrialState.PRUNED)
        grid.append(SimpleNamespace(metrics=reports[-1], config=t.params, error=None, path=str(folder / rid),
                                    metrics_dataframe=pd.DataFrame(reports)))
    sw.save()
    trial_table(grid, sw).to_csv(folder / "trials.csv", index=False)
    m = json.loads((train_dir / "metrics.json").read_text())  # what score_best writes, with its `model`
    m["model"] = {"source": "best trial of the sweep", "objective": sw.objective, "config": m["model"]["config"]}
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, train_dir):
    return make_sweep(tmp_path_factory.mktemp("report") / "sweep", train_dir)


def _report(folder, capsys) -> str:
    assert main(["report", "--output_folder", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {folder / 'report.html'}"
    page = (folder / "report.html").read_text()
    # offline: no external script, plotly.js inlined exactly once
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert page.count("<script") == page.count("Plotly.newPlot") + 1 and page.count("* plotly.js v") == 1
    return page


def _render(folder, tmp_path, n_figures: int) -> str:
    """Chromium's DOM of report.html (n_figures drawn, no console message) and a non-blank screenshot."""
    dom, console = screenshot(folder / "report.html", tmp_path / "shot.png", 1000, 1400)
    assert console == [], console
    assert dom.count(FIGURE) == n_figures and dom.count('class="main-svg"') >= n_figures
    px = read_png(tmp_path / "shot.png")[..., :3]
    assert px.shape[:2] == (1400, 1000)
    colours = np.unique(px.reshape(-1, 3), axis=0)
    assert len(colours) > 100, len(colours)                  # plots, not a blank or one-colour page
    assert (px.min(axis=2) < 200).mean() > 0.02              # ink on the page, not all white
    return dom


@needs_chromium
def test_sweep_report_renders(sweep_dir, tmp_path, capsys):
    page = _report(sweep_dir, capsys)
    df = pd.read_csv(sweep_dir / "trials.csv")
    assert all(t in page for t in df["trial_id"])            # the trials table
    # intermediate values, importances, parallel coordinates, objective vs metric, confusion matrices
    dom = _render(sweep_dir, tmp_path, 5)
    for r in (1, 2, 4):                                      # ASHA's rungs for grace 1, factor 2, 4 epochs
        assert f">rung {r}<" in dom
    assert "parameter importances (fANOVA" in dom and "Parallel Coordinate Plot" in dom
    assert "#0 0000a1b2 (complete)" in page and "#1 0001a1b2 (pruned)" in page
    assert "baseline lsi_aligned" in page and "majority-class rate" in page


@needs_chromium
def test_train_report_renders(train_dir, tmp_path, capsys):
    page = _report(train_dir, capsys)
    dom = _render(train_dir, tmp_path, 3)                    # loss parts, validation curves, confusion matrices
    assert "loss/recon" in dom and "peak_val_balanced_accuracy" in dom and "best epoch" in dom
    assert "baseline joint_lsi_z" in page


def test_importances_count_trials_stopped_by_asha(train_dir, tmp_path, capsys):
    """One trial ran every epoch, the others were stopped at a rung: the importances and parallel
    coordinates still see every trial (at its best epoch); with one trial there is a note."""
    folder = make_sweep(tmp_path / "sweep", train_dir, completed=(0,))
    page = _report(folder, capsys)
    assert "parameter importances (fANOVA" in page and page.count("Plotly.newPlot") == 5
    assert "need at least 2 trials" not in page
    one = make_sweep(tmp_path / "one", train_dir, n_trials=1, completed=(0,))
    page = _report(one, capsys)
    assert "parameter importances need at least 2 trials that reported (this sweep has 1)" in page
    assert page.count("Plotly.newPlot") == 4


def test_a_split_without_labels_is_left_out(train_dir, tmp_path, capsys):
    folder = tmp_path / "train"
    shutil.copytree(train_dir, folder, ignore=shutil.ignore_patterns("report.html"))
    _edit_json(folder / "metrics.json", lambda m: m.update(gex_test={"n": 0}))  # an unlabelled test line
    page = _report(folder, capsys)
    assert "GEX test" not in page and "PEAK test</th>" in page


def test_asha_rungs_are_rays():
    from ray.tune.schedulers import ASHAScheduler

    for grace, factor, max_t in ((1, 2, 4), (2, 3, 20), (3, 2, 50), (5, 4, 5)):
        s = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=factor,
                          metric="objective", mode="max")
        assert asha_rungs(grace, factor, max_t) == sorted(r[0] for r in s._brackets[0]._rungs)


def _edit_json(path, edit):
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


BAD = {
    "neither": (lambda f: [p.unlink() for p in f.iterdir()], "", "neither a sweep folder"),
    "sweep.json not JSON": (lambda f: (f / "sweep.json").write_text("{\"name\": "), "sweep.json",
                            "not valid JSON"),
    "sweep.json field": (lambda f: _edit_json(f / "sweep.json", lambda d: d.pop("reduction_factor")), "sweep.json",
                         "[reduction_factor]: missing or not an integer >= 2"),
    "trials.csv column": (lambda f: pd.read_csv(f / "trials.csv").drop(columns="best_objective").to_csv(
        f / "trials.csv", index=False), "trials.csv", "[best_objective]: missing column"),
    "study db": (lambda f: (f / "optuna_study.db").write_bytes(b"not a database" * 100), "optuna_study.db",
                 "[studies]: not an Optuna study database"),
    "study name": (lambda f: _edit_json(f / "sweep.json", lambda d: d.update(name="other")), "optuna_study.db",
                   "[study 'other']: not in the database"),
    "metrics field": (lambda f: _edit_json(f / "metrics.json", lambda d: d["peak_test"].pop("confusion")),
                      "metrics.json", "[peak_test.confusion]: missing"),
}
BAD_TRAIN = {
    "history not JSON": (lambda f: (f / "training_history.json").write_text("[{"), "training_history.json",
                         "not valid JSON"),
    "history field": (lambda f: _edit_json(f / "training_history.json", lambda h: h[1].pop("epoch")),
                      "training_history.json", "[[1].epoch]: missing or not an integer"),
    "no history": (lambda f: (f / "training_history.json").unlink(), "training_history.json", "not found"),
}


@pytest.mark.parametrize("case", [*BAD, *BAD_TRAIN])
def test_bad_input_names_file_and_field_and_writes_no_report(case, sweep_dir, train_dir, tmp_path, capsys):
    breaks, name, message = {**BAD, **BAD_TRAIN}[case]
    folder = tmp_path / "f"
    shutil.copytree(train_dir if case in BAD_TRAIN else sweep_dir, folder,
                    ignore=shutil.ignore_patterns("report.html"))
    breaks(folder)
    assert main(["report", "--output_folder", str(folder)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    where = f"{folder}/{name}" if name else str(folder)
    assert len(err) == 1 and f"{where}" in err[0] and message in err[0], err
    assert not [p for p in folder.iterdir() if "report" in p.name]   # neither report.html nor a temp file
    assert try_write_report(folder) is None                          # the sweep's call: a warning, not a failure
