"""OptunaSearch that keeps an honest, durable Optuna study.

Ray 2.60's stock `OptunaSearch` (measured here) records a trial that ASHA
stopped as COMPLETE with its last value, keys intermediate values on
`training_iteration` (which restarts when a trial is restored), and leaves
trials proposed after the driver's last snapshot RUNNING forever after a
restore. This subclass:

- reports intermediate values at the reported `epoch`;
- tells a trial that ended before `max_t` epochs as PRUNED (with its last
  value as the final intermediate), so optuna-dashboard shows pruning;
- tags each Optuna trial with its Ray trial id and the epochs it ran;
- after `Tuner.restore`, marks unfinished Optuna trials the restored state does
  not know as FAIL ("orphaned_by_restore"); a trial that was proposed *and*
  finished after the driver's last snapshot is finished in the study but
  unknown to the restored Tune state, so Tune asks for a replacement: the
  replacement gets that trial's parameters and its Optuna trial back
  ("readopted"), so the study keeps exactly one result per trial (the first)
  and the sweep its number of trials (the trial's work runs again);
- never raises from a hook (an exception in `on_trial_result` would stop the
  whole Tune driver).

The study lives in SQLite (`optuna.storages.RDBStorage`), so it survives the
driver and `optuna-dashboard sqlite:///.../optuna_study.db` opens it.

All of this needs private fields of Ray's OptunaSearch and of Optuna; every
access to them goes through `OptunaInternals` below, which names the field
when an upgrade removes one. The searcher checks them when it is built (before
any trial), and tests/test_searcher.py exercises each of them.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import optuna
import ray
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class PrivateFieldGone(RuntimeError):
    """A private field of Ray's OptunaSearch or of Optuna that this module relies on is gone
    (an upgrade removed or renamed it): `OptunaInternals` must be updated."""


def _private(obj, name: str, owner: str):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise PrivateFieldGone(
            f"{owner}.{name} is gone (ray {ray.__version__}, optuna {optuna.__version__}); "
            "tune/searcher.py OptunaInternals relies on it and must be updated for this version") from None


class OptunaInternals:
    """The one place that touches private state of Ray's OptunaSearch and of Optuna.

    Ray's OptunaSearch (2.60) keeps its state in private fields:
        _ot_trials          {Ray trial id: optuna.Trial}, filled by suggest()
        _completed_trials   Ray trial ids already told to the study
        _ot_study           the optuna.Study
    and Optuna offers no public way to reach a study's storage (`Study._storage`)
    or a trial's id in that storage (`Trial._trial_id`, `FrozenTrial._trial_id`),
    which reading a trial's stored state and failing an orphaned trial need.
    Every access raises `PrivateFieldGone`, naming the field, when it is missing.
    """

    SEARCHER_FIELDS = ("_ot_trials", "_completed_trials", "_ot_study", "_space")
    STORAGE_METHODS = ("get_trial", "set_trial_system_attr", "set_trial_state_values")

    def __init__(self, searcher: OptunaSearch):
        self._searcher = searcher

    # ------------------------------------------------------------------ Ray's OptunaSearch
    @property
    def trials(self) -> dict:
        """Ray trial id -> optuna.Trial (OptunaSearch._ot_trials)."""
        return _private(self._searcher, "_ot_trials", "ray.tune.search.optuna.OptunaSearch")

    @property
    def completed(self) -> set:
        """Ray trial ids already told (OptunaSearch._completed_trials)."""
        return _private(self._searcher, "_completed_trials", "ray.tune.search.optuna.OptunaSearch")

    @property
    def study(self) -> optuna.Study | None:
        """The study (OptunaSearch._ot_study); None before the search space is set."""
        return _private(self._searcher, "_ot_study", "ray.tune.search.optuna.OptunaSearch")

    @property
    def space(self):
        """The define-by-run space function (OptunaSearch._space)."""
        return _private(self._searcher, "_space", "ray.tune.search.optuna.OptunaSearch")

    # ------------------------------------------------------------------ Optuna
    @property
    def storage(self) -> optuna.storages.BaseStorage:
        """The study's storage (optuna.Study._storage)."""
        return _private(self.study, "_storage", "optuna.Study")

    def _storage_method(self, name: str):
        return _private(self.storage, name, f"optuna.storages.{type(self.storage).__name__}")

    @staticmethod
    def storage_id(trial) -> int:
        """A trial's id in its storage (optuna.Trial._trial_id / optuna.FrozenTrial._trial_id)."""
        return _private(trial, "_trial_id", f"optuna.{type(trial).__name__}")

    def stored(self, trial) -> optuna.trial.FrozenTrial:
        """The trial as the storage holds it now (state, values, attributes)."""
        return self._storage_method("get_trial")(self.storage_id(trial))

    def tell(self, ot_trial, value: float | None = None, state: TrialState | None = None) -> None:
        self.study.tell(ot_trial, value, state=state)

    def unfinished(self) -> list[optuna.trial.FrozenTrial]:
        """The study's RUNNING and WAITING trials (without copying them)."""
        return self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))

    def finished(self) -> list[optuna.trial.FrozenTrial]:
        """The study's COMPLETE and PRUNED trials (without copying them)."""
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))

    def adopt(self, ray_trial_id: str, frozen: optuna.trial.FrozenTrial) -> dict:
        """Give the Ray trial `ray_trial_id` the stored trial `frozen` (its Optuna trial and
        its parameters, fixed ones included); returns the parameters."""
        self.trials[ray_trial_id] = optuna.trial.Trial(self.study, self.storage_id(frozen))
        return self.space(optuna.trial.FixedTrial(frozen.params, frozen.number))

    def mark_failed(self, trial, attr: str) -> None:
        """Set the system attribute `attr` and the state FAIL straight in the storage (a trial
        no optuna.Trial object of this process owns, so Study.tell cannot end it)."""
        tid = self.storage_id(trial)
        self._storage_method("set_trial_system_attr")(tid, attr, True)
        self._storage_method("set_trial_state_values")(tid, TrialState.FAIL)

    def check(self) -> None:
        """Raise PrivateFieldGone now if a field this adapter reads is missing (the per-trial
        Trial._trial_id can only be checked on a trial: tests/test_searcher.py does)."""
        for name in self.SEARCHER_FIELDS:
            _private(self._searcher, name, "ray.tune.search.optuna.OptunaSearch")
        if self.study is not None:
            for name in self.STORAGE_METHODS:
                self._storage_method(name)


class EpochAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, max_t: int, step_attr: str = "epoch", **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = int(max_t)
        self._step_attr = step_attr
        self.internals.check()  # a Ray / Optuna upgrade that broke the adapter fails here, before any trial

    @property
    def internals(self) -> OptunaInternals:
        # built on access, never stored: save()/restore() pickle the searcher's __dict__
        return OptunaInternals(self)

    def suggest(self, trial_id: str) -> Optional[Dict]:
        lost = getattr(self, "_readopt", None)
        if lost:  # a trial that finished after the last snapshot comes back under this id (see restore)
            frozen = lost.pop(0)
            log.info("Ray trial %s re-runs Optuna trial %d, which finished after the driver's last snapshot "
                     "(its first result is kept)", trial_id, frozen.number)
            return self.internals.adopt(trial_id, frozen)
        cfg = super().suggest(trial_id)
        ot_trial = self.internals.trials.get(trial_id)
        if ot_trial is not None and "ray_trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
        return cfg

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        try:
            ot = self.internals
            if trial_id in ot.completed or trial_id not in ot.trials:
                return
            step, value = result.get(self._step_attr), result.get(self.metric)
            if step is None or value is None:
                return
            ot.trials[trial_id].report(float(value), int(step))
        except PrivateFieldGone as e:
            log.warning("optuna report failed for %s: %s", trial_id, e)
        except Exception as e:  # e.g. a finished trial re-run after a restore
            log.debug("optuna report skipped for %s: %r", trial_id, e)

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        try:
            ot = self.internals
            if trial_id in ot.completed or trial_id not in ot.trials:
                return
            ot_trial = ot.trials[trial_id]
        except PrivateFieldGone as e:
            log.warning("optuna tell failed for %s: %s", trial_id, e)
            return
        value = result.get(self.metric) if result else None
        step = result.get(self._step_attr) if result else None
        try:
            if ot.stored(ot_trial).state.is_finished():
                ot.completed.add(trial_id)  # re-run after a restore: keep the first result
                return
            if step is not None:
                ot_trial.set_user_attr("epochs_run", int(step))
            if error:
                ot.tell(ot_trial, state=TrialState.FAIL)
            elif value is None:
                ot.tell(ot_trial, state=TrialState.PRUNED)
            elif step is not None and int(step) < self._max_t and not (result or {}).get("stopped_early"):
                ot_trial.report(float(value), int(step))
                ot.tell(ot_trial, state=TrialState.PRUNED)
            else:
                ot.tell(ot_trial, float(value))
        except Exception as e:
            log.warning("optuna tell failed for %s: %r", trial_id, e)
        ot.completed.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        ot = self.internals
        if ot.study is None:
            return
        known = {ot.storage_id(t) for t in ot.trials.values()}
        for t in ot.unfinished():
            if ot.storage_id(t) not in known:
                ot.mark_failed(t, "orphaned_by_restore")
        # finished after the last snapshot: the restored Tune state will propose that many new trials
        self._readopt = sorted((t for t in ot.finished() if ot.storage_id(t) not in known), key=lambda t: t.number)
