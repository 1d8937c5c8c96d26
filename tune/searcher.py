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
- after `Tuner.restore`, marks Optuna trials the restored state does not know
  as FAIL ("orphaned_by_restore");
- never raises from a hook (an exception in `on_trial_result` would stop the
  whole Tune driver).

The study lives in SQLite (`optuna.storages.RDBStorage`), so it survives the
driver and `optuna-dashboard sqlite:///.../optuna_study.db` opens it.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class EpochAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, max_t: int, step_attr: str = "epoch", **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = int(max_t)
        self._step_attr = step_attr

    def suggest(self, trial_id: str) -> Optional[Dict]:
        cfg = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and "ray_trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
        return cfg

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        step, value = result.get(self._step_attr), result.get(self.metric)
        if step is None or value is None:
            return
        try:
            self._ot_trials[trial_id].report(float(value), int(step))
        except Exception as e:  # e.g. a finished trial re-run after a restore
            log.debug("optuna report skipped for %s: %r", trial_id, e)

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = result.get(self.metric) if result else None
        step = result.get(self._step_attr) if result else None
        try:
            if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)  # re-run after a restore: keep the first result
                return
            if step is not None:
                ot_trial.set_user_attr("epochs_run", int(step))
            if error:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            elif value is None:
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            elif step is not None and int(step) < self._max_t and not (result or {}).get("stopped_early"):
                ot_trial.report(float(value), int(step))
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            else:
                self._ot_study.tell(ot_trial, float(value))
        except Exception as e:
            log.warning("optuna tell failed for %s: %r", trial_id, e)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self._ot_study is None:
            return
        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if t._trial_id not in known:
                storage.set_trial_system_attr(t._trial_id, "orphaned_by_restore", True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
