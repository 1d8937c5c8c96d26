"""`xfer report`: report.html, one self-contained page about a sweep or an `xfer train` folder.

The page works offline: plotly.js is inlined once in its head and every figure
is a plotly figure (the sweep's from `optuna.visualization`); nothing is fetched.

- A sweep folder (sweep.json, trials.csv, optuna_study.db; metrics.json when the
  final model was scored): the trials table; every trial's objective per epoch
  (Optuna's intermediate values) with ASHA's rungs marked; parameter
  importances; parallel coordinates; each trial's objective against the
  training line's validation metric; the sweep's final model (best_model.pt)
  on the four splits beside the baselines, with its confusion matrices.
- An `xfer train` folder (metrics.json, training_history.json): the loss parts
  and validation curves per epoch, the four splits beside the baselines and the
  confusion matrices.

Everything is read and checked first; a missing or malformed file or field
stops with one line naming both, and report.html is written atomically.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from .errors import InputError, XferError
from .evaluate import METRIC_KEYS
from .phases import PHASES
from .results import SPLIT_NAMES, read_json, read_metrics
from .sweep_files import (SETTINGS_FILE, STUDY_DB, TRIALS_CSV, asha_rungs, load_study, read_settings, read_trials,
                          rung_clock)

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PARALLEL_PARAMS = 8  # parameters on the parallel coordinates (the most important ones)
METRIC_NAMES = {"accuracy": "acc.", "balanced_accuracy": "bal. acc.", "macro_f1": "macro-F1"}
STYLE = """body{font-family:system-ui,sans-serif;margin:24px auto;padding:0 16px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
.table{overflow-x:auto;font-size:12px}table{border-collapse:collapse}.note{color:#666}
th,td{padding:2px 6px;text-align:right;border-bottom:1px solid #eee;white-space:nowrap}th[colspan]{text-align:center}"""


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(df, **kw) -> str:
    body = df.to_html(border=0, na_rep="–", float_format=lambda v: f"{v:.4g}", **kw)
    return f'<div class="table">{body}</div>'


# ----------------------------------------------------------------------------- both kinds

def metrics_items(m: dict) -> list:
    """The model and every baseline on each scored split (+ the majority-class rate), and the
    model's confusion matrices."""
    import pandas as pd
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    splits = [s for s in SPLIT_NAMES if s in m]
    if not splits:
        return [_note("metrics.json holds no scored split")]
    rows = {"model": m, **{f"baseline {k}": v for k, v in m["baselines"].items()}}
    data = {name: {(SPLIT_NAMES[s], METRIC_NAMES[k]): res[s][k] for s in splits if s in res for k in METRIC_KEYS}
            for name, res in rows.items()}
    data["majority-class rate"] = {(SPLIT_NAMES[s], METRIC_NAMES["accuracy"]): m[s]["majority_rate"] for s in splits}
    cols = pd.MultiIndex.from_product([[SPLIT_NAMES[s] for s in splits], METRIC_NAMES.values()])
    table = pd.DataFrame.from_dict(data, orient="index").reindex(index=list(data), columns=cols)
    fig = make_subplots(rows=1, cols=len(splits), horizontal_spacing=0.05, subplot_titles=[
        f"{SPLIT_NAMES[s]}<br>n {m[s]['n']}, bal. acc. {m[s]['balanced_accuracy']:.3f}" for s in splits])
    for i, s in enumerate(splits, 1):
        fig.add_trace(go.Heatmap(z=m[s]["confusion"], x=list(PHASES), y=list(PHASES), colorscale="Blues",
                                 showscale=False, texttemplate="%{z}",
                                 hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"), 1, i)
        fig.update_xaxes(title_text="predicted", row=1, col=i)
        fig.update_yaxes(autorange="reversed", title_text="true" if i == 1 else None, row=1, col=i)
    fig.update_layout(height=380, margin={"t": 110},
                      title="confusion matrices of the model (rows true, columns predicted)")
    return [_table(table), fig]


# ----------------------------------------------------------------------------- xfer train

def _curves(hist: list[dict], keys: list[str], title: str, best):
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=[e["epoch"] for e in hist if k in e], y=[e[k] for e in hist if k in e],
                                mode="lines+markers", name=k) for k in keys])
    if best:
        fig.add_vline(x=best, line_dash="dot", line_color="grey", annotation_text=f"best epoch {best}")
    return fig.update_layout(title=title, xaxis_title="epoch", height=420)


def train_report(folder: Path) -> tuple[str, list]:
    m = read_metrics(folder / "metrics.json", require=())
    path = folder / "training_history.json"
    hist = read_json(path)
    if not isinstance(hist, list) or not hist:
        raise InputError(path, None, "not a list of epochs")
    for i, e in enumerate(hist):
        if not isinstance(e, dict) or not isinstance(e.get("epoch"), int):
            raise InputError(path, f"[{i}].epoch", "missing or not an integer")
    model, cfg = m["model"], m["model"]["config"]
    best = model.get("best_epoch")
    losses = sorted({k for e in hist for k in e if k.startswith("loss/")})
    vals = [k for k in [f"{h}_val_{k}" for h in ("gex", "peak") for k in METRIC_KEYS] + ["objective"]
            if any(k in e for e in hist)]
    members = len(model.get("members", [])) or 1
    summary = (f"{cfg['arch']} / {cfg['divergence']} on {cfg['source_model']} embeddings; "
               f"best epoch {best} of {len(hist)} by the {model.get('objective', '?')} objective"
               + (f"; curves of the first of {members} ensemble members" if members > 1 else ""))
    return f"xfer train: {folder}", [
        ("Training", [_note(summary),
                      _curves(hist, losses, "loss parts per epoch", best),
                      _curves(hist, vals, "validation metrics (the training line's held-out cells) and the objective",
                              best)]),
        ("The model on the four splits, beside the baselines", metrics_items(m)),
    ]


# ----------------------------------------------------------------------------- xfer tune

AT_BEST = ("every trial that reported counts, valued at its best epoch (ASHA stops most trials early: Optuna's "
           "own importances would see only the few that ran every epoch); a trial stopped early was judged on "
           "fewer epochs, so its value is a lower bound")


def _at_best(study):
    """An in-memory copy of the study in which every trial that reported (COMPLETE or PRUNED)
    is COMPLETE with its best objective, for the importances and parallel coordinates."""
    import optuna
    from optuna.trial import TrialState

    quiet = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        copy = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(quiet)
    best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        values = list(t.intermediate_values.values()) + ([t.value] if t.value is not None else [])
        values = [v for v in values if v == v]
        if values and t.params:
            copy.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                     value=best(values)))
    return copy


def sweep_report(folder: Path) -> tuple[str, list]:
    import plotly.graph_objects as go
    from optuna import visualization as ov

    sw = read_settings(folder / SETTINGS_FILE)
    metric_col = f"peak_val_{sw['metric']}"
    df = read_trials(folder / TRIALS_CSV, ["trial_id", "status", "epochs_run", "best_objective", metric_col])
    study = load_study(folder / STUDY_DB, sw["name"])
    metrics = read_metrics(folder / "metrics.json", require=()) if (folder / "metrics.json").exists() else None
    objective = sw.get("objective", "source_val")

    counts = ", ".join(f"{v} {k}" for k, v in df["status"].value_counts().items())
    shown = [c for c in ("trial_id", "status", "epochs_run", "best_epoch", "best_objective", metric_col,
                         "wall_seconds", "node", "error") if c in df and df[c].notna().any()]
    table = df[shown + [c for c in df if c.startswith("param.")]].rename(columns=lambda c: c.removeprefix("param."))

    rungs = asha_rungs(sw["grace_period"], sw["reduction_factor"], sw["search_epochs"])
    inter = ov.plot_intermediate_values(study)
    names = {f"Trial{t.number}": f"#{t.number} {t.user_attrs.get('ray_trial_id', '')} ({t.state.name.lower()})"
             for t in study.trials}
    inter.for_each_trace(lambda tr: tr.update(name=names.get(tr.name, tr.name)))
    clock = rung_clock(sw.get("rungs"), bool(sw.get("asha_after_warmup")))
    if sw.get("scheduler", "asha") == "fifo":
        title = f"objective ({objective}) per epoch; every trial ran its whole budget (FIFO)"
    elif clock == "adapted":  # each trial's rungs sit after its own warm-up: no common epoch to mark
        title = (f"objective ({objective}) per epoch; ASHA judged each trial {rungs} epochs after its own "
                 "warm-up ended")
    else:
        for r in rungs:
            inter.add_vline(x=r, line_dash="dash", line_color="grey", annotation_text=f"rung {r}")
        title = f"objective ({objective}) per epoch; ASHA rungs at epochs {rungs}"
    inter.update_layout(title=title, xaxis_title="epoch", yaxis_title=objective, height=440)

    reached = _at_best(study)
    top = None  # the parallel coordinates show the most important parameters when importances are known
    if len(reached.trials) < 2:
        importance = _note(f"parameter importances need at least 2 trials that reported (this sweep has "
                           f"{len(reached.trials)})")
    else:
        try:
            from optuna.importance import FanovaImportanceEvaluator

            importance = ov.plot_param_importances(reached, evaluator=FanovaImportanceEvaluator(seed=0))
            top = list(importance.data[0].y)[::-1][:PARALLEL_PARAMS]  # the bars run from least important up
            importance.update_layout(height=140 + 22 * len(importance.data[0].y),
                                     title="parameter importances (fANOVA of each trial's best objective)")
        except Exception as e:  # noqa: BLE001 - too few or too alike trials: a note, not a failed report
            importance = _note(f"parameter importances could not be computed: {str(e).splitlines()[0]}")
    parallel = (ov.plot_parallel_coordinate(reached, params=top).update_layout(height=480) if reached.trials else
                _note("parallel coordinates need a trial that reported"))

    scatter = go.Figure([go.Scatter(x=g[metric_col], y=g["best_objective"], mode="markers", name=status,
                                    text=g["trial_id"], marker={"size": 9},
                                    hovertemplate="%{text}: %{x:.3f}, %{y:.3f}<extra></extra>")
                         for status, g in df.groupby("status")])
    scatter.update_layout(title="each trial at its best epoch: the objective against the training line's metric",
                          xaxis_title=f"training line's PEAK validation {sw['metric']} ({metric_col})",
                          yaxis_title=f"best objective ({objective})", height=440)

    best = df.dropna(subset=["best_objective"]).sort_values("best_objective", ascending=False)
    summary = (f"sweep '{sw['name']}': {len(df)} trials ({counts}), up to {sw['search_epochs']} epochs each, "
               f"ranked by {objective}" + (f"; best trial {best.iloc[0]['trial_id']} "
                                           f"({best.iloc[0]['best_objective']:.4g})" if len(best) else ""))
    scored = (metrics_items(metrics) if metrics is not None else
              [_note("no metrics.json: the sweep was given no test line to score its final model on")])
    n = ((metrics or {}).get("model") or {}).get("n_members", 1)
    final = "The final model (one trial)" if n == 1 else f"The final model ({n} trials averaged)"
    return f"xfer tune: {folder}", [
        ("Trials", [_note(summary), _table(table, index=False)]),
        ("Intermediate values", [_note("each trial's objective per epoch (dashed lines, when ASHA's rungs fall on the "
                                        "same epoch for every trial: the rungs)"), inter]),
        ("Parameter importances", [_note(AT_BEST), importance]),
        ("Parallel coordinates (each trial at its best epoch" +
         (f"; the {len(top)} most important parameters)" if top else ")"), [parallel]),
        ("Objective against the training line's metric", [scatter]),
        (f"{final} on the four splits, beside the baselines", scored),
    ]


# ----------------------------------------------------------------------------- page

def render(title: str, sections: list) -> str:
    """The page: plotly.js once in the head, then each section's HTML and figures."""
    from plotly.offline import get_plotlyjs

    body = []
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for it in items:
            body.append(it if isinstance(it, str) else it.update_layout(template="plotly_white").to_html(
                full_html=False, include_plotlyjs=False, config={"displaylogo": False}))
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style>\n<script type="text/javascript">{get_plotlyjs()}</script>\n</head>'
            f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(folder) -> Path:
    """Read and check the folder, then write folder/report.html atomically."""
    from .data.fs import write_bytes_atomic

    folder = Path(folder)
    if (folder / SETTINGS_FILE).is_file():
        title, sections = sweep_report(folder)
    elif (folder / "metrics.json").is_file():
        title, sections = train_report(folder)
    else:
        raise XferError(f"{folder}: neither a sweep folder (sweep.json) nor an `xfer train` folder "
                        "(metrics.json + training_history.json)")
    return write_bytes_atomic(folder / REPORT_FILE, render(title, sections).encode())


def try_write_report(folder) -> Path | None:
    """write_report for the end of a sweep: a failure is a warning, never a failed sweep."""
    try:
        return write_report(folder)
    except Exception as e:  # noqa: BLE001 - the sweep's results are written; the report is extra
        log.warning("report.html not written: %s", e)
        return None
