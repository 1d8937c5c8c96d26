"""What a sweep returns (best_model.pt): trials judged on the same footing, averaged by a rule
fixed on development pairs, and never below the shipped defaults' own trial.

    pool   the trials judged on the same footing: every trial with an objective value that ran its
           whole budget or stopped itself by patience (under FIFO, every trial). A trial ASHA
           stopped was ranked on fewer epochs than the survivors and stays out (when no trial
           finished, the ranked ones are the pool).
    rule   (`xfer tune --final_model`)
             greedy     from the best trial, add the pool's trial that raises the average's own
                        objective most, until none does (at most --final_ensemble members): the
                        average is judged like a trial, label-free
             within_se  the pool's trials whose objective is within one standard error of the
                        best's (the binomial SE of a balanced accuracy over the cells it is
                        computed on), at most --final_ensemble
             top        the pool's top --final_ensemble trials
             best       the best trial alone
           An average's own objective is computed for `agreement` (the expression head and the
           accessibility head, each averaged over the members, on the test line's unlabelled
           cells, as a trial computes it); for any other objective the rules return the best
           trial alone.
    guard  the shipped defaults are always the first trial; when the final model's objective is
           below the defaults' trial's, the defaults' trial is returned instead.

The test line's labels are never read here: the scorer reads the datasets trials read (stored
without labels) and the features each member's trial trained with (tune.data).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

FINAL_RULES = ("greedy", "within_se", "top", "best")


@dataclass
class FinalModel:
    members: list[tuple[dict, dict]]          # (trials.csv row, the member's predictor), best first
    rule: str                                 # the rule that chose them
    objective: float                          # the average's own objective (one member: its value)
    defaults: dict | None = None              # the defaults' trial's row, when it was ranked
    guarded: bool = False                     # the defaults' trial replaced a final model below it
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"rule": self.rule, "objective": self.objective, "guarded": self.guarded, "notes": self.notes,
                "defaults_trial": None if self.defaults is None else {
                    "trial_id": self.defaults["trial_id"], "value": float(self.defaults["best_objective"])},
                "members": [{"trial_id": r["trial_id"], "value": float(r["best_objective"]),
                             "best_epoch": int(r["best_epoch"]), "epochs_run": int(r["epochs_run"]),
                             "arch": r.get("param.arch")} for r, _ in self.members]}


def final_model_source(final: dict) -> str:
    """How a sweep's final model was made, in words (best_params.json's final_model)."""
    n = len(final.get("members", []))
    if final.get("guarded"):
        return "the shipped defaults' trial (the rule's average had a lower objective)"
    what = "one trial" if n == 1 else f"{n} trials averaged"
    return f"{what} ({final.get('rule', 'top')} rule)"


def same_footing(ranked, scheduler: str, search_epochs: int):
    """The rows of `ranked` (trials.csv, best first, ranked trials only) judged on the same footing."""
    if scheduler == "fifo":
        return ranked
    done = ranked[(ranked["epochs_run"] >= search_epochs) | ranked["early_stopped"].astype(bool)]
    return done if len(done) else ranked


def defaults_row(ranked, point: dict | None):
    """The row of the shipped defaults' trial (its parameters are the enqueued point), or None."""
    if not point:
        return None
    for _, row in ranked.iterrows():
        if all(_same(row.get(f"param.{k}"), v) for k, v in point.items()):
            return row.to_dict()
    return None


def _same(a, b) -> bool:
    if isinstance(b, bool) or isinstance(a, (bool, np.bool_)):
        return str(a).lower() == str(b).lower()
    if isinstance(b, (int, float)):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


class AgreementScorer:
    """The `agreement` objective of an average of members, label-free, on the test line's cells:
    each member's two heads on the features its own trial trained with, averaged, then the
    accessibility head's balanced accuracy against the expression head's predictions."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def probs(self, trial_id: str, ckpt: dict) -> tuple[np.ndarray, np.ndarray]:
        if trial_id not in self._probs:
            from xfer.checkpoint import build_model
            from xfer.config import TrainConfig
            from xfer.predict import predict_probs

            from .data import DataSpec, load_trial_data

            model, _ = build_model(ckpt)
            cfg = TrainConfig.from_dict(ckpt["config"], source="checkpoint", allow_inert=True)
            line = load_trial_data(DataSpec(**self.spec), cfg).adapt
            if line is None or line.emb is None:
                raise ValueError("agreement needs the test line's expression and accessibility")
            stats = line.stats_tensors("cpu") if cfg.data.line_norm else None
            p = predict_probs(model, emb=line.emb, peaks=line.peaks, stats=stats, device="cpu")
            self._probs[trial_id] = (p["peak"], p["gex"])
        return self._probs[trial_id]

    def n_cells(self) -> int:
        return len(next(iter(self._probs.values()))[0]) if self._probs else 0

    def objective(self, members: list[tuple[dict, dict]]) -> float:
        import torch

        from xfer.selection import agreement

        peak = sum(self.probs(r["trial_id"], c)[0] for r, c in members)
        gex = sum(self.probs(r["trial_id"], c)[1] for r, c in members)
        return agreement(torch.as_tensor(peak), torch.as_tensor(gex))


def choose(ranked, *, objective: str, rule: str, k: int, scheduler: str, search_epochs: int,
           defaults_point: dict | None, predictor_of, scorer: AgreementScorer | None = None) -> FinalModel | None:
    """The final model of a sweep. `ranked`: trials.csv's rows with an objective value, best first;
    `predictor_of(trial_id)`: the trial's best epoch's predictor, or None when it left no
    checkpoint; `scorer`: computes an average's `agreement` (None: averages are not built)."""
    pool = same_footing(ranked, scheduler, search_epochs)
    dflt = defaults_row(ranked, defaults_point)
    members_cache: dict[str, dict | None] = {}
    notes: list[str] = []

    def member(row) -> tuple[dict, dict] | None:
        tid = row["trial_id"]
        if tid not in members_cache:
            members_cache[tid] = predictor_of(tid)
            if members_cache[tid] is None:
                log.warning("trial %s left no checkpoint: not in best_model.pt", tid)
        ck = members_cache[tid]
        return None if ck is None else (row.to_dict() if hasattr(row, "to_dict") else dict(row), ck)

    candidates = [m for m in (member(r) for _, r in pool.iterrows()) if m is not None]
    if not candidates:
        return None
    averaging = objective == "agreement" and scorer is not None and rule != "best" and k > 1
    if rule != "best" and not averaging:
        notes.append(f"the {objective} objective of an average cannot be computed without labels: the best trial "
                     "alone" if objective != "agreement" else "the best trial alone")
    if not averaging:
        chosen, value, used = candidates[:1], float(candidates[0][0]["best_objective"]), "best"
    elif rule == "top":
        chosen, used = candidates[:k], rule
        value = scorer.objective(chosen)
    elif rule == "within_se":
        best = float(candidates[0][0]["best_objective"])
        scorer.probs(candidates[0][0]["trial_id"], candidates[0][1])
        se = math.sqrt(max(best * (1 - best), 1e-12) / max(scorer.n_cells(), 1))
        chosen = [m for m in candidates if float(m[0]["best_objective"]) >= best - se][:k]
        value, used = scorer.objective(chosen), rule
    else:  # greedy
        chosen, used = [candidates[0]], rule
        value = scorer.objective(chosen)
        rest = candidates[1:]
        while rest and len(chosen) < k:
            gains = [(scorer.objective(chosen + [m]), i) for i, m in enumerate(rest)]
            v, i = max(gains, key=lambda g: (g[0], -g[1]))
            if v <= value:
                break
            value = v
            chosen.append(rest.pop(i))
    fm = FinalModel(members=chosen, rule=used, objective=float(value), defaults=dflt, notes=notes)
    if dflt is not None and fm.objective < float(dflt["best_objective"]):
        d = member(_row(ranked, dflt["trial_id"]))
        if d is not None:
            fm.notes.append(f"the {used} model's objective {fm.objective:.4f} is below the shipped defaults' trial's "
                            f"{float(dflt['best_objective']):.4f}: the defaults' trial is returned")
            fm.members, fm.objective, fm.guarded = [d], float(dflt["best_objective"]), True
    return fm


def _row(ranked, trial_id: str):
    return ranked[ranked["trial_id"] == trial_id].iloc[0]
