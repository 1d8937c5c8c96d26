"""A sweep's results exported: trials.csv / trials.parquet (one row per trial, or per member of a
population), best_params.json (the best trial's configuration) and best_model.pt (the final model
of tune.final_model, from the trials' checkpoints), read from Tune's results (`ResultGrid`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from xfer.checkpoint import ensemble_checkpoint, export_best, read_checkpoint, save_checkpoint
from xfer.config import TrainConfig
from xfer.data.fs import write_json
from xfer.errors import XferError
from xfer.sweep_files import BEST_PARAMS_FILE, SETTINGS_FILE, TRIALS_CSV, TRIALS_PARQUET

from . import final_model
from .configure import default_point
from .settings import Sweep
from .space import parse_space
from .trainable import CHECKPOINT_FILE, member_file
from .trials import error_line, trial_status

log = logging.getLogger(__name__)


def _at_best_epoch(r, m: dict) -> dict:
    """The trial's report of its best epoch (every candidate's value then); its last report when
    the history is not available or no epoch was chosen yet."""
    if any(k.startswith("at_best/") for k in m):  # each report carries them (tune.trainable.at_best)
        return {k[len("at_best/"):]: v for k, v in m.items() if k.startswith("at_best/")}
    hist = getattr(r, "metrics_dataframe", None)
    best = m.get("best_epoch")
    if hist is not None and best and "epoch" in getattr(hist, "columns", ()):
        rows = hist[hist["epoch"] == best]
        if len(rows):
            return rows.iloc[-1].to_dict()
    return m


def _nodes_of(r, m: dict) -> list[str]:
    """The Ray node ids a trial ran on, in order (several when it was restored elsewhere)."""
    hist = getattr(r, "metrics_dataframe", None)
    ids = list(hist["node_id"].dropna()) if hist is not None and "node_id" in getattr(hist, "columns", ()) else []
    if m.get("node_id"):
        ids.append(m["node_id"])
    return list(dict.fromkeys(ids))


MEMBER_STATUS = {"finished": "completed", "stopped_early": "completed", "halted": "stopped_by_asha",
                 "diverged": "errored"}


def member_rows(grid, sw: Sweep) -> list[dict]:
    """A population sweep's trials.csv rows: one per member (its own Optuna trial), with its
    population's Ray trial id, from the population's last report (every member's summary)."""
    rows = []
    for r in grid:
        m, cfg = r.metrics or {}, r.config or {}
        pid = m.get("trial_id") or Path(r.path).name
        numbers = cfg.get("numbers", [])
        for i, params in enumerate(cfg.get("population", [])):
            st = m.get(f"m{i}/status")
            status = MEMBER_STATUS.get(st, "errored")  # still training at the end: its population failed
            error = m.get(f"m{i}/error") or (None if r.error is None or st in MEMBER_STATUS else error_line(r.error))
            rows.append({
                "trial_id": f"{pid}-m{i}", "population_id": pid,
                "optuna_trial": numbers[i] if i < len(numbers) else None, "status": status,
                "epochs_run": int(m.get(f"m{i}/epochs_run") or 0), "early_stopped": st == "stopped_early",
                "best_objective": m.get(f"m{i}/best_objective"), "last_objective": m.get(f"m{i}/last_objective"),
                "best_epoch": m.get(f"m{i}/best_epoch"),
                f"peak_val_{sw.metric}": m.get(f"m{i}/at_best/peak_val_{sw.metric}"),
                **{f"sel.{k[len(f'm{i}/at_best/sel/'):]}": v for k, v in m.items()
                   if k.startswith(f"m{i}/at_best/sel/")},
                "node": m.get("hostname") or m.get("node_ip"), "node_ip": m.get("node_ip"),
                "node_id": m.get("node_id"), "node_ids": ";".join(_nodes_of(r, m)),
                "wall_seconds": m.get(f"m{i}/seconds"), "error": error,
                **{f"param.{k}": v for k, v in params.items()},
            })
    return rows


def trial_table(grid, sw: Sweep):
    """One row per trial (in a population sweep one per member, `member_rows`): status, its
    objective (best and last), every selection candidate and the training line's validation
    metric at its best epoch, where it ran (hostname, IP, the Ray node id of its last epoch and
    every node id it reported from), its parameters."""
    rows = member_rows(grid, sw) if sw.population > 1 else []
    for r in ([] if sw.population > 1 else grid):
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items()}
        epochs = int(m.get("epoch", 0) or 0)
        status = trial_status(m, sw.search_epochs, errored=r.error is not None)
        at_best = _at_best_epoch(r, m)
        rows.append({
            "trial_id": m.get("trial_id") or Path(r.path).name, "status": status, "epochs_run": epochs,
            "early_stopped": bool(m.get("stopped_early", False)),
            "best_objective": m.get("best_objective"), "last_objective": m.get("objective"),
            "best_epoch": m.get("best_epoch"),
            f"peak_val_{sw.metric}": at_best.get(f"peak_val_{sw.metric}"),
            **{f"sel.{k[4:]}": v for k, v in at_best.items() if k.startswith("sel/")},
            "node": m.get("hostname") or m.get("node_ip"),
            "node_ip": m.get("node_ip"), "node_id": m.get("node_id"), "node_ids": ";".join(_nodes_of(r, m)),
            "wall_seconds": m.get("time_total_s"),
            "error": None if r.error is None else error_line(r.error),
            **{f"param.{k}": v for k, v in params.items()},
        })
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("best_objective", ascending=False, na_position="last").reset_index(drop=True)
    return df


def export(grid, sw: Sweep) -> dict:
    """trials.csv / trials.parquet, best_params.json (the best trial), best_model.pt (the final
    model of tune.final_model: trials judged on the same footing, averaged by the sweep's rule,
    never below the shipped defaults' trial)."""
    df = trial_table(grid, sw)
    df.to_csv(sw.output / TRIALS_CSV, index=False)
    df.astype({c: "string" for c in df.columns if df[c].dtype == object}).to_parquet(sw.output / TRIALS_PARQUET,
                                                                                     index=False)
    ok = df[df["status"] != "errored"].dropna(subset=["best_objective"])
    if ok.empty:
        raise XferError(f"no trial finished without error; see {sw.output / TRIALS_CSV} and the logs under "
                        f"{sw.storage} ({sw.name})")
    best = ok.iloc[0]
    params = _params_of(grid, sw, best["trial_id"])
    full = TrainConfig.from_dict({**sw.base, **params})
    best_params = {
        "params": {**{k: v for k, v in full.to_flat().items() if k != "epochs"}},
        "searched": params, "objective": sw.objective_label, "objective_setting": sw.objective_setting,
        "value": float(best["best_objective"]),
        "trial_id": best["trial_id"], "best_epoch": int(best["best_epoch"]), "epochs_run": int(best["epochs_run"]),
        "search_epochs": sw.search_epochs,
    }
    fm = final_model.choose(
        ok, objective=sw.objective, rule=sw.final_model, k=sw.final_ensemble, scheduler=sw.scheduler,
        search_epochs=sw.search_epochs, defaults_point=default_point(parse_space(sw.space, SETTINGS_FILE), sw.base),
        predictor_of=lambda tid: _predictor(grid, sw, tid),
        scorer=final_model.AgreementScorer(sw.spec) if sw.objective == "agreement" else None)
    final = None
    if fm is not None:
        ckpts = [c for _, c in fm.members]
        final = ckpts[0] if len(ckpts) == 1 else ensemble_checkpoint(ckpts)
        save_checkpoint(final, sw.output / "best_model.pt")
        for note in fm.notes:
            log.info("final model: %s", note)
    best_params["final_model"] = {"asked": sw.final_ensemble, "members": []} if fm is None else \
        {"asked": sw.final_ensemble, **fm.describe()}
    write_json(sw.output / BEST_PARAMS_FILE, best_params)
    return {"table": df, "best": best_params, "final": final}  # final: what best_model.pt holds


def _result_of(grid, trial_id: str):
    return next(r for r in grid if (r.metrics or {}).get("trial_id", Path(r.path).name) == trial_id)


def _member_of(trial_id: str) -> tuple[str, int | None]:
    """(Ray trial id, member index) of a trials.csv id (`<population>-m<i>` in a population sweep)."""
    head, sep, tail = trial_id.rpartition("-m")
    return (head, int(tail)) if sep and tail.isdigit() else (trial_id, None)


def _params_of(grid, sw: Sweep, trial_id: str) -> dict:
    """The searched parameters of a trial (or of a population's member)."""
    if sw.population > 1:
        pid, i = _member_of(trial_id)
        return dict(_result_of(grid, pid).config["population"][i])
    return {**_result_of(grid, trial_id).config}


def _predictor(grid, sw: Sweep, trial_id: str) -> dict | None:
    """The best epoch's predictor of a trial (whole, with its own config and preprocessing: a
    sweep's trials differ in architecture and inputs), from its last checkpoint; None without one."""
    if sw.population > 1:
        pid, i = _member_of(trial_id)
        path = _checkpoint_file(_result_of(grid, pid), sw, pid, member=i)
    else:
        path = _checkpoint_file(_result_of(grid, trial_id), sw, trial_id)
    if path is None:
        return None
    ckpt = export_best(read_checkpoint(path))
    if path.name == ".best_checkpoint.pt":  # a download from remote storage
        path.unlink(missing_ok=True)
    return ckpt


def _checkpoint_file(result, sw: Sweep, trial_id: str, member: int | None = None) -> Path | None:
    """The trial's latest checkpoint.pt: Tune's own for function trials; for TorchTrainer
    trials Tune never sees them, they live in the Train run `train-<trial id>`. A population's
    member: its member_<i>.pt in the population's latest checkpoint."""
    name = CHECKPOINT_FILE if member is None else member_file(member)
    if result.checkpoint is not None and result.checkpoint.filesystem.type_name == "local":
        p = Path(result.checkpoint.path) / name
        if p.exists():
            return p
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:  # remote storage: download once
            local = sw.output / ".best_checkpoint.pt"
            local.write_bytes((Path(d) / name).read_bytes())
            return local
    found = sorted((sw.output / "ray_train" / f"train-{trial_id}").glob(f"checkpoint_*/{CHECKPOINT_FILE}"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
