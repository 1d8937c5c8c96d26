"""The Tuner of a sweep: its trainable (tune.trainable), searcher (tune.searcher: OptunaSearch, or
PopulationSearch for populations), scheduler (ASHA or FIFO), display (tune.progress) and result
loggers, or the Tuner restored from the sweep's storage (`--resume`). Ray, Optuna and the trial
modules are imported inside the functions, after tune.ray_start.ray_environment has run."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

from xfer.errors import XferError
from xfer.sweep_files import asha_rungs

from .configure import default_point
from .ray_start import TRIAL_CPU, check_trial_fits, slots, worker_resources
from .settings import Sweep
from .space import parse_space

log = logging.getLogger(__name__)


def rungs_of(sw: Sweep) -> tuple[int, ...]:
    """Where ASHA may stop a trial, on the sweep's rung clock (none under FIFO)."""
    if sw.scheduler != "asha":
        return ()
    return tuple(asha_rungs(sw.grace_period, sw.reduction_factor, sw.search_epochs))


def make_trainable(sw: Sweep):
    """The trial function of the sweep (a population's, the fast path's or a TorchTrainer's) with its
    resources. The trial functions are looked up in tune.trainable at each call."""
    from ray import tune

    from .trainable import function_trial, labelled, trainer_trial

    rungs = rungs_of(sw)
    if sw.population > 1:
        from .trainable import population_trial

        fn = partial(population_trial, spec=sw.spec, base=sw.base, checkpoint_every=sw.checkpoint_every,
                     rungs=rungs, clock=sw.rungs, board=board_name(sw), report_every=sw.report_every)
        return labelled(tune.with_resources(fn, {"cpu": sw.cpus_per_trial, "gpu": sw.gpus_per_trial}))
    if sw.trainer == "function":
        fn = partial(function_trial, spec=sw.spec, base=sw.base, checkpoint_every=sw.checkpoint_every,
                     rungs=rungs, clock=sw.rungs, report_every=sw.report_every)
        return labelled(tune.with_resources(fn, {"cpu": sw.cpus_per_trial, "gpu": sw.gpus_per_trial}))
    per_worker = worker_resources(sw.cpus_per_trial, sw.gpus_per_trial, sw.num_workers)
    fn = partial(trainer_trial, spec=sw.spec, base=sw.base, checkpoint_every=sw.checkpoint_every, rungs=rungs,
                 clock=sw.rungs,
                 num_workers=sw.num_workers, resources_per_worker=per_worker,
                 train_storage=_train_storage(sw))
    return labelled(tune.with_resources(fn, {"cpu": TRIAL_CPU}))


def board_name(sw: Sweep) -> str:
    """The named actor that holds a population sweep's ASHA board (tune.population.RungBoard)."""
    from .trainable import BOARD_ACTOR

    return BOARD_ACTOR.format(sw.name)


def n_ray_trials(sw: Sweep) -> int:
    """Ray trials of the sweep: one per trial, or one per population of P members."""
    return math.ceil(sw.n_trials / sw.population)


def _train_storage(sw: Sweep) -> str:
    """Ray Train's storage for TorchTrainer trials: ray_train beside the output folder, or a
    ray_train prefix next to Tune's storage when that is a URI (query string kept)."""
    if not sw.storage_uri or "://" not in sw.storage_uri:
        return str(sw.output / "ray_train")
    head, _, query = sw.storage_uri.partition("?")
    return head.rstrip("/") + "_train" + (f"?{query}" if query else "")


def display(sw: Sweep, verbose: bool, progress_every: float = 30.0) -> tuple[int, list]:
    """(Tune's verbosity, callbacks): Tune's own status tables with -v, else none of them and
    the compact display of tune/progress.py (Tune still reports an errored trial);
    progress_every: seconds between its status lines when the output is not a terminal."""
    if verbose:
        return 1, []
    from .progress import SweepProgress

    return 0, [SweepProgress(n_ray_trials(sw), sw.search_epochs, sw.objective_label, sw.name,
                             interval_s=progress_every, unit="trials" if sw.population == 1 else "populations")]


def _redisplay(tuner, sw: Sweep, verbose: bool, progress_every: float) -> None:
    """Tuner.restore brings back the RunConfig pickled when the sweep started (tuner.pkl), its
    display included; this invocation's -v decides instead. Tune (2.60) has no public way to
    change a restored Tuner's RunConfig: this reaches its private TunerInternal."""
    from .progress import SweepProgress

    internal = getattr(tuner, "_local_tuner", None)
    run_config = internal.get_run_config() if internal is not None and hasattr(internal, "get_run_config") else None
    if run_config is None:
        log.warning("--resume: cannot set the display of the restored sweep (Tuner._local_tuner is gone in this "
                    "Ray version); it keeps the one it started with")
        return
    level, callbacks = display(sw, verbose, progress_every)
    run_config.verbose = level
    run_config.callbacks = [c for c in (run_config.callbacks or []) if not isinstance(c, SweepProgress)] + callbacks


def loggers(sw: Sweep) -> list:
    """Tune's result loggers: CSV and JSON (each trial's history of reports: `xfer results`, the
    trial table), TensorBoard's with --tensorboard (the automatic ones are off, `ray_environment`)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()] + ([TBXLoggerCallback()] if sw.tensorboard else [])


def _study_trials(sw: Sweep) -> int:
    """How many trials the sweep's Optuna study holds (0 when it was never created)."""
    import optuna

    if not Path(sw.study_db).exists():
        return 0
    try:
        return len(optuna.load_study(study_name=sw.name, storage=f"sqlite:///{sw.study_db}").trials)
    except KeyError:
        return 0


def make_tuner(sw: Sweep, restore: bool, verbose: bool = False, progress_every: float = 30.0):
    """The Tuner of a new sweep, or the restored one (restore); verbose: Tune's own tables
    instead of the compact progress display (see `display`)."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import EpochAwareOptunaSearch, SweepSearchGenerator, make_scheduler
    from .trainable import KEEP_CHECKPOINTS

    check_trial_fits(sw)  # one trial fits some node (else its trials would stay pending for ever)
    trainable = make_trainable(sw)
    loc = sw.storage_location()
    fs = None if loc.is_local else loc.fs
    path = f"{loc.path.rstrip('/')}/{sw.name}"
    if restore and not tune.Tuner.can_restore(path, storage_filesystem=fs):
        if _study_trials(sw):
            raise XferError(f"--resume: no restorable sweep state under {sw.storage} ({sw.name})")
        # stopped before Tune saved anything (a SIGTERM while Ray started): nothing ran, so start it now
        log.warning("--resume: the sweep stopped before its first trial; starting it")
        restore = False
    if restore:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, storage_filesystem=fs)
        _redisplay(tuner, sw, verbose, progress_every)
        return tuner
    space = parse_space(sw.space, "sweep.json")
    point = default_point(space, sw.base)
    n_startup = min(10, max(2, sw.n_trials // 3))
    if sw.population > 1:
        from .searcher import PopulationSearch

        searcher = PopulationSearch(
            space, size=sw.population, n_members=sw.n_trials, study_name=sw.name,
            storage_url=f"sqlite:///{sw.study_db}", seed=sw.seed, n_startup_trials=n_startup, first=point,
            max_t=sw.search_epochs, board=board_name(sw), reduction_factor=sw.reduction_factor,
            rungs=rungs_of(sw))
        searcher.start_board()
    else:
        searcher = EpochAwareOptunaSearch(
            space=space, metric="objective", mode="max", max_t=sw.search_epochs,
            points_to_evaluate=[point] if point else None,
            sampler=optuna.samplers.TPESampler(seed=sw.seed, n_startup_trials=n_startup),
            study_name=sw.name, storage=optuna.storages.RDBStorage(f"sqlite:///{sw.study_db}"))
    n_slots = slots(sw)
    log.info("%d concurrent trial slot(s); %s trials", n_slots,
             "function (fast path)" if sw.trainer == "function" else f"TorchTrainer x{sw.num_workers}")
    tune_verbosity, callbacks = display(sw, verbose, progress_every)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=SweepSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=n_slots)),
            # a population's members are judged by its board, member by member: Tune runs populations out
            scheduler=make_scheduler("fifo" if sw.population > 1 else sw.scheduler, sw.rungs, sw.search_epochs,
                                     sw.grace_period, sw.reduction_factor),
            metric="objective", mode="max", num_samples=n_ray_trials(sw),
            reuse_actors=sw.trainer == "function" and sw.reuse_actors,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=sw.name, storage_path=loc.path, storage_filesystem=fs, verbose=tune_verbosity,
            callbacks=loggers(sw) + callbacks,
            failure_config=tune.FailureConfig(max_failures=sw.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
