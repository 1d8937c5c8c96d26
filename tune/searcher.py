"""OptunaSearch that keeps an honest, durable Optuna study, and a search generator
whose restore agrees with the trials Tune restored.

Ray 2.60's stock `OptunaSearch` (measured here) records a trial that ASHA
stopped as COMPLETE with its last value, keys intermediate values on
`training_iteration` (which restarts when a trial is restored), and leaves
trials proposed after the driver's last snapshot RUNNING forever after a
restore. `EpochAwareOptunaSearch`:

- reports intermediate values at the reported `epoch`;
- records every epoch's value as an intermediate value, the last one included;
- tells a trial that ended before `max_t` epochs as PRUNED, so optuna-dashboard
  shows pruning;
- tags each Optuna trial with its Ray trial id and the epochs it ran;
- never raises from a hook (an exception in `on_trial_result` would stop the
  whole Tune driver).

Restoring a sweep (`Tuner.restore`) reads three snapshots that Tune writes as
separate files and uploads separately: the trial list (`experiment_state-*.json`),
the search generator with its ConcurrencyLimiter (`search_gen_state-*.json`:
how many trials were proposed, which are live) and this searcher
(`searcher-state-*.pkl`: Ray trial id -> Optuna trial). A driver killed while
they upload (S3 storage makes that window wide) leaves them from different
moments; Ray's own restore then proposes extra trials (a stale count) and never
tells the study about trials the stale limiter does not know (measured: 7
trials for `--n_trials 6`, one Optuna trial RUNNING forever). `SweepSearchGenerator`
therefore takes the trial list as the truth and rebuilds the rest from it and
from the study (SQLite, always current) in `EpochAwareOptunaSearch.reconcile`:

- each restored Ray trial gets its Optuna trial back (by the `ray_trial_id`
  tag, else the snapshot's map, else equal parameters for a trial that re-ran
  another);
- unfinished Optuna trials no restored Ray trial owns are marked FAIL
  ("orphaned_by_restore"): they were proposed after the trial list's snapshot;
- Optuna trials that *finished* but no restored Ray trial owns (proposed and
  finished after the snapshot) are handed to the replacements Tune asks for
  ("readopted"): the replacement gets that trial's parameters and its Optuna
  trial, so the study keeps exactly one result per trial (the first) and the
  sweep its number of trials (the trial's work runs again);
- the proposal count is the number of restored trials and the limiter's live
  set is the restored trials that will run again.

The study lives in SQLite (`optuna.storages.RDBStorage`), so it survives the
driver and `optuna-dashboard sqlite:///.../optuna_study.db` opens it.

All of this needs private fields of Ray's OptunaSearch, SearchGenerator and
ConcurrencyLimiter and of Optuna; every access to them goes through
`OptunaInternals` and `GeneratorInternals` below, which name the field when an
upgrade removes one. Both check their fields when built (before any trial), and
tests/test_searcher.py exercises each of them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Dict, Mapping, Optional

import optuna
import ray
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
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
            for step, value in reported_points(result, step, value):
                if step is not None and value is not None:
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
            stored = ot.stored(ot_trial)
            if stored.state.is_finished():
                ot.completed.add(trial_id)  # re-run after a restore: keep the first result
                return
            if step is not None:
                ot_trial.set_user_attr("epochs_run", int(step))
                # the last epoch too: whole curves in the dashboard (Tune hands the result that ends a
                # trial here only)
                for s_, v_ in reported_points(result or {}, step, value):
                    if v_ is not None and not error and int(s_) not in stored.intermediate_values:
                        ot_trial.report(float(v_), int(s_))
            if error:
                ot.tell(ot_trial, state=TrialState.FAIL)
            elif value is None:
                ot.tell(ot_trial, state=TrialState.PRUNED)
            elif step is not None and int(step) < self._max_t and not (result or {}).get("stopped_early"):
                ot.tell(ot_trial, state=TrialState.PRUNED)
            else:
                ot.tell(ot_trial, float(value))
        except Exception as e:
            log.warning("optuna tell failed for %s: %r", trial_id, e)
        ot.completed.add(trial_id)

    def reconcile(self, restored: Mapping[str, dict]) -> None:
        """Make this searcher agree with the Ray trials Tune restored and with the study.

        `restored`: {Ray trial id: its saved state} (at least `config`), the trial list
        Tune resumes from. Called by SweepSearchGenerator after a restore; see the module
        docstring for the rules."""
        ot = self.internals
        if ot.study is None:
            return
        everything = ot.study.get_trials(deepcopy=False)
        by_sid = {ot.storage_id(t): t for t in everything}
        by_tag = {t.user_attrs["ray_trial_id"]: t for t in everything if "ray_trial_id" in t.user_attrs}
        snapshot = {rid: by_sid.get(ot.storage_id(t)) for rid, t in ot.trials.items()}
        owner: dict[str, optuna.trial.FrozenTrial] = {}
        for rid in restored:   # by tag first: a tag never lies, the snapshot may be stale
            t = by_tag.get(rid)
            if t is not None:
                owner[rid] = t
        taken = {ot.storage_id(t) for t in owner.values()}
        for rid, info in restored.items():
            if rid in owner:
                continue
            t = snapshot.get(rid)   # a Ray trial that re-ran another trial (readopted) has no tag
            if t is None or ot.storage_id(t) in taken:
                config = info.get("config") or {}
                t = next((f for f in everything if ot.storage_id(f) not in taken
                          and f.state in (TrialState.COMPLETE, TrialState.PRUNED) and f.params and all(config.get(k) == v for k, v in f.params.items())), None)
            if t is not None:
                owner[rid] = t
                taken.add(ot.storage_id(t))
        ot.trials.clear()
        ot.trials.update({rid: optuna.trial.Trial(ot.study, ot.storage_id(t)) for rid, t in owner.items()})
        finished_now = {rid for rid, t in owner.items() if t.state.is_finished()}
        kept_done = ot.completed & set(restored)
        ot.completed.clear()
        ot.completed.update(kept_done | finished_now)
        orphans = [t for t in everything if t.state == TrialState.RUNNING and ot.storage_id(t) not in taken]
        for t in orphans:   # proposed after the trial list's snapshot; never ran to the end as a Ray trial Tune knows
            ot.mark_failed(t, "orphaned_by_restore")
        # finished after the snapshot: the restored Tune state will propose that many new trials
        self._readopt = sorted((t for t in ot.finished() if ot.storage_id(t) not in taken), key=lambda t: t.number)
        log.info("restored searcher: %d Ray trial(s) matched to Optuna trials, %d orphaned, %d to re-adopt",
                 len(owner), len(orphans), len(self._readopt))


class GeneratorInternals:
    """The private state of Ray's SearchGenerator and ConcurrencyLimiter (2.60) that a
    restore must rebuild:
        SearchGenerator._counter               trials proposed so far (stops at num_samples)
        ConcurrencyLimiter.live_trials         Ray trial ids it will pass completions on for
        ConcurrencyLimiter.num_unfinished_live_trials, .cached_results
    """

    GENERATOR_FIELDS = ("_counter", "searcher")
    LIMITER_FIELDS = ("live_trials", "num_unfinished_live_trials", "cached_results", "searcher")

    def __init__(self, gen: SearchGenerator):
        self._gen = gen

    def limiters(self) -> list[ConcurrencyLimiter]:
        out, s = [], _private(self._gen, "searcher", "ray.tune.search.SearchGenerator")
        while isinstance(s, ConcurrencyLimiter):
            out.append(s)
            s = _private(s, "searcher", "ray.tune.search.ConcurrencyLimiter")
        return out

    def base(self):
        s = _private(self._gen, "searcher", "ray.tune.search.SearchGenerator")
        while hasattr(s, "searcher"):
            s = s.searcher
        return s

    def set_counter(self, n: int) -> None:
        _private(self._gen, "_counter", "ray.tune.search.SearchGenerator")
        self._gen._counter = int(n)

    def set_live(self, live: set) -> None:
        for lim in self.limiters():
            for name in self.LIMITER_FIELDS:
                _private(lim, name, "ray.tune.search.ConcurrencyLimiter")
            lim.live_trials = set(live)
            lim.num_unfinished_live_trials = len(live)
            lim.cached_results = {}

    def check(self) -> None:
        for name in self.GENERATOR_FIELDS:
            _private(self._gen, name, "ray.tune.search.SearchGenerator")
        for lim in self.limiters():
            for name in self.LIMITER_FIELDS:
                _private(lim, name, "ray.tune.search.ConcurrencyLimiter")


# Tune's trial statuses that a restore with resume_unfinished=True, resume_errored=True does not run again
_NOT_RERUN = {"TERMINATED"}


def restored_trials(dirpath: str) -> dict[str, dict] | None:
    """{Ray trial id: saved trial state} from the newest `experiment_state-*.json` in
    `dirpath`, the file TuneController.resume restores from (it picks the newest name the
    same way; `sync_down_experiment_state` has just copied it there from the storage).
    Plain JSON: the trial states' pickled fields stay undecoded. None without such a file."""
    from ray.tune.execution.tune_controller import TuneController

    names = fnmatch.filter(os.listdir(dirpath), TuneController.CKPT_FILE_TMPL.format("*"))
    if not names:
        return None
    path = os.path.join(dirpath, max(names))
    try:
        with open(path) as f:
            data = json.load(f)["trial_data"]
        states = [json.loads(trial_json) for trial_json, _meta in data]
        return {st["trial_id"]: st for st in states}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{path}: cannot read the restored trial list ({e!r})") from None


class SweepSearchGenerator(SearchGenerator):
    """Tune's SearchGenerator whose restore takes the restored trial list as the truth
    (module docstring): the proposal count, the ConcurrencyLimiter's live set and the
    searcher's trial map are rebuilt from it, whichever moments their own snapshots are from."""

    def __init__(self, searcher):
        super().__init__(searcher)
        GeneratorInternals(self).check()

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        trials = restored_trials(dirpath)
        if trials is None:
            log.warning("no experiment state in %s: the searcher keeps its own snapshot", dirpath)
            return
        gi = GeneratorInternals(self)
        gi.set_counter(len(trials))
        gi.set_live({tid for tid, st in trials.items() if st.get("status") not in _NOT_RERUN})
        base = gi.base()
        if isinstance(base, (EpochAwareOptunaSearch, PopulationSearch)):
            base.reconcile(trials)


def reported_points(result: Dict, step, value, prefix: str = "") -> list[tuple]:
    """(epoch, objective) pairs a report brings: the epochs the trial held back since its last
    report (`<prefix>curve`, tune.trainable.ReportGate), then the reported epoch itself."""
    return [tuple(p) for p in result.get(f"{prefix}curve") or ()] + [(step, value)]


class AfterWarmupASHA(AsyncHyperBandScheduler):
    """Ray's ASHA; with `after_warmup` a trial is neither judged nor recorded at a rung while its
    adaptation is still warming up (`warmup` < 1 in its report): Ray's rule judges it at the first
    epoch it reports warmed, at the highest rung it has passed unjudged. Without it, exactly
    ASHAScheduler."""

    def __init__(self, *args, after_warmup: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.after_warmup = after_warmup

    def on_trial_result(self, tune_controller, trial, result: Dict) -> str:
        if (self.after_warmup and float(result.get("warmup", 1.0)) < 1.0
                and result.get(self._time_attr, 0) < self._max_t):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(kind: str, clock: str, max_t: int, grace_period: int, reduction_factor: int):
    """The sweep's trial scheduler: `fifo` runs every trial its whole budget; `asha` stops the weak
    at rungs grace_period x reduction_factor^k counted on `clock` (tune.settings.RUNG_CLOCKS)."""
    from ray.tune.schedulers import FIFOScheduler

    if kind == "fifo":
        return FIFOScheduler()
    if clock == "adapted":
        # a trial reports adapted_epochs = 0 throughout its warm-up: below every rung, never judged there
        return AsyncHyperBandScheduler(time_attr="adapted_epochs", max_t=max_t, grace_period=grace_period,
                                       reduction_factor=reduction_factor)
    return AfterWarmupASHA(time_attr="epoch", max_t=max_t, grace_period=grace_period,
                           reduction_factor=reduction_factor, after_warmup=clock == "after_warmup")


# ----------------------------------------------------------------------------- populations

class PopulationSearch(Searcher):
    """The searcher of `xfer tune --population P`: every Ray trial is a population of P members
    (tune.trainable.population_trial) and every member one Optuna trial of a durable study
    (SQLite), tagged with its Ray trial (`ray_trial_id`) and its place (`member`).

    - `suggest` asks the study for P trials of one shape (tune.population.ask_population; TPE
      with constant liar, so a batch holds no near-duplicates); the sweep's first member is the
      shipped defaults. The last population is smaller when n_members is not a multiple of P.
    - Every member's objective is reported to its own trial at the member's epoch (`m<i>/...`
      in the population's reports); at the end each member is told on its own: COMPLETE with its
      last objective when it ran its epochs (or stopped early by patience), PRUNED when the
      board stopped it (ASHA), FAIL when it diverged or its population failed.
    - The members' ASHA board (an actor, `board`) is saved with the searcher at every snapshot of
      the driver and recreated from it on a restore.
    - `reconcile`, after a restore: the restored trial list is the truth, as for
      EpochAwareOptunaSearch, population by population: a restored population gets its members'
      trials back (by tag); unfinished trials of populations Tune does not know are marked FAIL
      ("orphaned_by_restore"); finished populations Tune does not know are handed to the new
      trials Tune asks for ("readopted"), so the study keeps one result per member and the sweep
      its number of members.
    """

    def __init__(self, space, *, size: int, n_members: int, study_name: str, storage_url: str, seed: int,
                 n_startup_trials: int, first: dict | None, max_t: int, board: str = "",
                 rungs=(), reduction_factor: int = 2):
        super().__init__(metric="objective", mode="max")
        self.space, self.size, self.n_members = space, int(size), int(n_members)
        self.study_name, self.storage_url = study_name, storage_url
        self.seed, self.n_startup_trials, self.first, self.max_t = seed, n_startup_trials, first, int(max_t)
        self.board, self.rungs, self.reduction_factor = board, tuple(rungs), int(reduction_factor)
        self.proposed = 0
        self.owned: dict[str, list[int]] = {}       # Ray trial id -> its members' Optuna trial numbers
        self.last: dict[int, tuple[int, float]] = {}  # trial number -> (epoch, objective) last reported
        self.completed: set[str] = set()
        self._readopt: list[list[int]] = []
        self.sid: dict[int, int] = {}                 # trial number -> its id in the storage
        self._study = None
        self._board_handle = None

    def __getstate__(self) -> dict:  # Tune pickles the searcher with the Tuner: never the study's engine
        return {**self.__dict__, "_study": None, "_board_handle": None}

    # ------------------------------------------------------------------ the study and the board
    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials,
                                                 constant_liar=True)
            self._study = optuna.create_study(study_name=self.study_name, storage=self.storage_url,
                                              direction="maximize", sampler=sampler, load_if_exists=True)
        return self._study

    @property
    def _storage(self):
        return _private(self.study, "_storage", "optuna.Study")

    def _sid(self, number: int) -> int:
        if number not in self.sid:
            for t in self.study.get_trials(deepcopy=False):
                self.sid[t.number] = OptunaInternals.storage_id(t)
        return self.sid[number]

    def _trial(self, number: int) -> optuna.trial.Trial:
        return optuna.trial.Trial(self.study, self._sid(number))

    def _stored(self, number: int) -> optuna.trial.FrozenTrial:
        return _private(self._storage, "get_trial", "optuna storage")(self._sid(number))

    def _mark_failed(self, number: int, attr: str) -> None:
        tid = self._sid(number)
        _private(self._storage, "set_trial_system_attr", "optuna storage")(tid, attr, True)
        _private(self._storage, "set_trial_state_values", "optuna storage")(tid, TrialState.FAIL)

    def start_board(self, state: dict | None = None):
        """The members' ASHA board as a named actor (none under FIFO); `state`: a saved board."""
        if not (self.board and self.rungs):
            return None
        from .population import RungBoard

        @ray.remote(num_cpus=0)
        class MemberBoard:
            def __init__(self, state):
                self.b = RungBoard.load(state)

            def judge(self, key, t, value):
                return self.b.judge(key, t, value)

            def state(self):
                return self.b.state()

        try:
            ray.kill(ray.get_actor(self.board))
        except ValueError:
            pass
        state = state or RungBoard(self.rungs, self.reduction_factor).state()
        # held here: an actor lives as long as a handle to it (the driver's searcher); on the driver's own
        # node, so that losing a worker node never takes the board with it
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._board_handle = MemberBoard.options(name=self.board, scheduling_strategy=here).remote(state)
        return self._board_handle

    def board_state(self) -> dict | None:
        if not (self.board and self.rungs):
            return None
        try:
            return ray.get(ray.get_actor(self.board).state.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - a snapshot without the board is still a snapshot
            log.warning("the members' ASHA board could not be saved: %r", e)
            return None

    # ------------------------------------------------------------------ Tune's hooks
    def suggest(self, trial_id: str) -> Optional[Dict]:
        from .population import ask_population

        if self._readopt:  # a population that finished after the driver's last snapshot comes back
            numbers = self._readopt.pop(0)
            trials = [self.study.get_trials(deepcopy=False)[n] for n in numbers]
            log.info("Ray trial %s re-runs population %s, which finished after the driver's last snapshot "
                     "(its members' first results are kept)", trial_id, numbers)
            self.owned[trial_id] = numbers
            self.proposed += len(numbers)
            return {"population": [self.space(optuna.trial.FixedTrial(t.params, t.number)) for t in trials],
                    "numbers": numbers}
        k = min(self.size, self.n_members - self.proposed)
        if k <= 0:
            return Searcher.FINISHED
        pop = ask_population(self.study, self.space, k, first=self.first if self.proposed == 0 else None)
        for i, (t, _) in enumerate(pop):
            t.set_user_attr("ray_trial_id", trial_id)
            t.set_user_attr("member", i)
            self.sid[t.number] = OptunaInternals.storage_id(t)
        self.proposed += k
        self.owned[trial_id] = [t.number for t, _ in pop]
        return {"population": [p for _, p in pop], "numbers": self.owned[trial_id]}

    def on_trial_result(self, trial_id: str, result: Dict) -> None:
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: Dict) -> None:
        """Each member's objectives in a report (those held back since the last one included) as its
        Optuna trial's intermediate values; a step already recorded is skipped."""
        try:
            for i, number in enumerate(self.owned.get(trial_id, [])):
                for step, value in reported_points(result, result.get(f"m{i}/epoch"),
                                                   result.get(f"m{i}/objective"), f"m{i}/"):
                    if step is None or value is None or self.last.get(number, (0,))[0] >= int(step):
                        continue
                    self.last[number] = (int(step), float(value))
                    if not self._stored(number).state.is_finished():
                        self._trial(number).report(float(value), int(step))
        except Exception as e:  # noqa: BLE001 - an exception here would stop the whole driver
            log.debug("optuna report skipped for %s: %r", trial_id, e)

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False) -> None:
        if trial_id in self.completed or trial_id not in self.owned:
            return
        result = result or {}
        self._record(trial_id, result)  # a population stopped by Tune: its last report comes only here
        for i, number in enumerate(self.owned[trial_id]):
            try:
                if self._stored(number).state.is_finished():
                    continue  # re-run after a restore: keep the first result
                t = self._trial(number)
                status = result.get(f"m{i}/status")
                if result.get(f"m{i}/epochs_run") is not None:
                    t.set_user_attr("epochs_run", int(result[f"m{i}/epochs_run"]))
                value = self.last.get(number, (None, None))[1]
                if error or status in (None, "training", "diverged"):
                    self.study.tell(number, state=TrialState.FAIL)
                elif status == "halted" or value is None:
                    self.study.tell(number, state=TrialState.PRUNED)
                else:
                    self.study.tell(number, value)
            except Exception as e:  # noqa: BLE001
                log.warning("optuna tell failed for member %d of %s: %r", number, trial_id, e)
        self.completed.add(trial_id)

    # ------------------------------------------------------------------ snapshots
    def save(self, checkpoint_path: str) -> None:
        state = {"proposed": self.proposed, "owned": self.owned, "_readopt": self._readopt,
                 "last": {str(k): v for k, v in self.last.items()}, "completed": sorted(self.completed),
                 "board_state": self.board_state()}
        with open(checkpoint_path, "w") as f:
            json.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        board_state = state.pop("board_state", None)
        for k in ("proposed", "owned", "_readopt"):
            setattr(self, k, state[k])
        self.last = {int(k): tuple(v) for k, v in state["last"].items()}
        self.completed = set(state["completed"])
        self.start_board(board_state)

    def reconcile(self, restored: Mapping[str, dict]) -> None:
        """See the class docstring: the restored trial list is the truth."""
        everything = self.study.get_trials(deepcopy=False)
        by_owner: dict[str, list] = {}
        for t in everything:
            rid = t.user_attrs.get("ray_trial_id")
            if rid is not None:
                by_owner.setdefault(rid, []).append(t)
        owned = {}
        for rid in restored:
            members = sorted(by_owner.get(rid, []), key=lambda t: t.user_attrs.get("member", 0))
            if members:
                owned[rid] = [t.number for t in members]
            elif rid in self.owned:   # a readopted population keeps its first owner's tags
                owned[rid] = self.owned[rid]
        taken = {n for ns in owned.values() for n in ns}
        self.owned = owned
        self.completed &= set(restored)
        lost = {}
        for t in everything:
            if t.number in taken:
                continue
            if t.state == TrialState.RUNNING:
                self._mark_failed(t.number, "orphaned_by_restore")
            elif t.state.is_finished() and t.user_attrs.get("ray_trial_id") is not None:
                lost.setdefault(t.user_attrs["ray_trial_id"], []).append(t)
        self._readopt = [[t.number for t in sorted(ts, key=lambda t: t.user_attrs.get("member", 0))]
                         for _, ts in sorted(lost.items(), key=lambda kv: min(t.number for t in kv[1]))
                         if all(t.state.is_finished() for t in ts)]
        self.proposed = sum(len(ns) for ns in owned.values())
        log.info("restored population searcher: %d population(s) matched, %d to re-adopt", len(owned),
                 len(self._readopt))
