"""`xfer tune`: OptunaSearch proposes, ASHA stops the weak, Ray runs the trials.

    driver                                         every trial (actor or Train workers)
    ------                                         ------------------------------------
    validate the space and config (no trial yet)
    ingest file inputs into the cell store
    embed the training line into the embedding store
    prepare the training data once (node cache)
    Tuner(OptunaSearch(TPE, SQLite) + ASHA)  --->  read stores by path, fit(), report each epoch
    export trials.csv / .parquet, best_params.json,
    mark ASHA-stopped Optuna trials PRUNED (live),
    score the best trial on the test line

Trials are transductive when the test line's peaks are given (--sup_peak_csv):
each trains exactly as `xfer train` does, adapting to the test line's unlabelled
cells (its labels are dropped before any trial reads it). The objective that
ranks trials, drives ASHA and chooses each trial's best epoch is `--objective`
(xfer.selection): `transfer`, label-free, by default when the test line is
given, else `source_val` (the training line's PEAK validation metric). The
shipped defaults are enqueued as the first trial. The test line's labels are
read only after the search, to score the best trial's model.

Everything a resume needs is in <output_folder>/sweep.json; `xfer tune --resume
--output_folder DIR` restores the Tuner and finishes the sweep without
repeating finished trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from argparse import Namespace
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from xfer.config import ALL_ARCH_PARAMS, TrainConfig, parse_set
from xfer.data.fs import write_json
from xfer.errors import ConfigError, XferError

from .space import SearchSpace, load_space, parse_space
from .trials import error_line, trial_status

log = logging.getLogger(__name__)

SETTINGS_FILE = "sweep.json"
DATA_FLAGS = ("src_csv", "src_label_csv", "tgt_csv", "tgt_label_csv", "test_csv", "test_label_csv",
              "sup_peak_csv", "sup_peak_label_csv", "label_column", "orient", "store")
SCHEDULERS = ("asha", "fifo")  # asha stops the weak trials at its rungs; fifo runs every trial its whole budget
# What ASHA's rungs count (`xfer tune --rungs`; tune.searcher.make_scheduler):
#   adapted       epochs with the adaptation fully on (`adapted_epochs` in each report: the epoch minus
#                 the trial's own searched warm-up), so every trial is judged after the same number of
#                 epochs in which a model could be chosen, never inside its warm-up
#   after_warmup  epochs, but a trial still warming up is neither judged nor recorded; it is judged at
#                 the first rung it reaches warmed (`--asha_after_warmup`, before issue 23)
#   epochs        plain epochs: a trial may be judged, and stopped, inside its warm-up, before it has
#                 any objective value to be judged by (before issue 23)
RUNG_CLOCKS = ("adapted", "after_warmup", "epochs")


def ray_environment() -> None:
    """Environment Ray must see before it is imported (inherited by trial processes)."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # snapshot the sweep state every second (resume)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune's automatic loggers include TensorBoardX's, ~4 ms of the driver's time per report (CSV and
    # JSON: ~0.2 ms; BENCHMARKS.md "Ray's costs that are ours"): the sweep adds its loggers itself
    # (`loggers`), TensorBoard's only with --tensorboard
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@dataclass
class Sweep:
    """Everything the driver needs, also after a restart (saved as sweep.json)."""

    name: str
    output: Path
    spec: dict
    base: dict
    space: dict
    n_trials: int
    search_epochs: int
    metric: str
    cpus_per_trial: float
    gpus_per_trial: float
    num_workers: int
    trainer: str
    grace_period: int
    reduction_factor: int
    checkpoint_every: int
    max_failures: int
    seed: int
    data_args: dict
    objective: str = "source_val"       # the selection candidate that ranks trials (xfer.selection)
    objective_setting: str = "auto"     # what was asked for (--objective)
    storage_uri: str = ""               # Tune's storage (results, checkpoints): a path or URI; "" = output/ray_results
    reuse_actors: bool = True           # fast path: Tune reuses a trial's actor for the next (tune/trainable.py)
    final_ensemble: int = 1             # at most this many trials in best_model.pt (1 in sweeps saved before it)
    final_model: str = "top"            # tune.final_model.FINAL_RULES (sweeps saved before issue 23: top)
    asha_after_warmup: bool = False     # sweeps saved before issue 23: their rung clock (rungs below)
    scheduler: str = "asha"             # SCHEDULERS: asha stops the weak, fifo runs every trial out
    rungs: str = ""                     # RUNG_CLOCKS: what ASHA's rungs count
    population: int = 1                 # members per Ray trial (tune.trainable.population_trial); 1: one each
    report_every: int = 0               # epochs between a trial's reports (tune.trainable.ReportGate); 0: each second
    tensorboard: bool = False           # TensorBoard logs beside Tune's CSV and JSON results

    def __post_init__(self):
        if not self.rungs:  # a sweep.json from before issue 23: its ASHA counted plain epochs
            self.rungs = "after_warmup" if self.asha_after_warmup else "epochs"

    @property
    def objective_label(self) -> str:
        return f"peak_val_{self.metric}" if self.objective == "source_val" else self.objective

    @property
    def storage(self) -> str:
        """Where Tune keeps results and checkpoints (a path or a URI, for messages)."""
        return self.storage_uri or str(self.output / "ray_results")

    def storage_location(self):
        """(pyarrow file system, path) of the storage (xfer.data.fs.Location)."""
        from xfer.data.fs import resolve

        return resolve(self.storage)

    @property
    def study_db(self) -> Path:
        return self.output / "optuna_study.db"

    def save(self) -> None:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        write_json(self.output / SETTINGS_FILE, d, sort_keys=True)

    @classmethod
    def load(cls, output: Path) -> "Sweep":
        p = output / SETTINGS_FILE
        if not p.exists():
            raise XferError(f"--resume: {p} not found (no sweep was started in {output})")
        d = json.loads(p.read_text())
        d["output"] = Path(d["output"])
        return cls(**d)


# ----------------------------------------------------------------------------- set-up

def _split_fixed(args) -> tuple[Namespace, dict]:
    """Command-line settings that fix search parameters (seed flags and --set) go to the
    space; the rest build the base config."""
    fixed = {}
    for flag, key in (("arch_type", "arch"), ("divergence_type", "divergence")):
        v = getattr(args, flag, None)
        if v is not None:
            choices = [c.strip() for c in v.split(",") if c.strip()]
            fixed[key] = choices[0] if len(choices) == 1 else {"type": "categorical", "choices": choices}
    fixed.update(parse_set(getattr(args, "set", None)))
    rest = Namespace(**{k: v for k, v in vars(args).items() if k not in ("arch_type", "divergence_type", "set")})
    return rest, fixed


def build_space(args, fixed: dict) -> SearchSpace:
    """The --space file (or the default space) with the command line's fixes (values or specs)."""
    return load_space(getattr(args, "space", None), fixed)


def base_config(args) -> dict:
    """Non-searched settings (flat): --config_path and flags, epochs = --search_epochs.
    Architecture parameters are left out: they come from the space, for the arch a trial draws."""
    from xfer.pipeline import build_config

    cfg = build_config(args)
    flat = {k: v for k, v in cfg.to_flat(live_only=True).items() if k not in ALL_ARCH_PARAMS}
    flat["epochs"] = args.search_epochs
    TrainConfig.from_dict(flat)  # validates
    return flat


def ingest_for_trials(args) -> dict:
    """Put the sweep's datasets into the store (file inputs are ingested; the test line's without
    its labels, which only the final scoring reads from the given files) and return the DataSpec."""
    from xfer.data.inputs import STORE_PREFIX, load_inputs
    from xfer.data.store import CellStore

    from .data import DataSpec

    roles = ["src", "tgt"] + [r for r in ("test", "sup_peak") if getattr(args, f"{r}_csv", None)]
    data = load_inputs(args, roles, require=("src", "tgt"))
    store = CellStore(args.store)
    names, hashes = {}, {}
    for role in roles:
        given = getattr(args, f"{role}_csv")
        ds = data[role]
        if given.startswith(STORE_PREFIX) and not getattr(args, f"{role}_label_csv", None):
            names[role] = given[len(STORE_PREFIX):]
        elif role in ("test", "sup_peak"):
            names[role] = store.write(ds.without_labels(), f"{ds.name}_unlabelled").name
        else:
            names[role] = store.write(ds, ds.name).name
        hashes[f"{role}_hash"] = store.manifest(names[role]).content_hash
    return DataSpec(store=store.root.uri, **names, **hashes).to_dict()


def default_grace(search_epochs: int) -> int:
    """ASHA's first rung when --grace_period is not given: a quarter of the budget (5 adapted epochs
    at the default 20, the study's pick)."""
    return max(1, search_epochs // 4)


def shortest_warmup(space: SearchSpace, base: dict) -> int:
    """The fewest warm-up epochs a trial of this space can get (no epoch inside it has an objective value)."""
    p = space.params.get("warmup_epochs")
    if p is None:
        return int(base["warmup_epochs"])
    return int(p.low) if p.kind in ("int", "float") else int(min(p.values()))


def new_sweep(args) -> Sweep:
    out = Path(args.output_folder).resolve()
    if (out / SETTINGS_FILE).exists():
        raise XferError(f"{out} already holds a sweep; use --resume to finish it or choose another --output_folder")
    rest, fixed = _split_fixed(args)
    space = build_space(args, fixed)          # a malformed space fails here, before anything starts
    base = base_config(rest)
    if args.n_trials < 1 or args.search_epochs < 1:
        raise ConfigError("n_trials" if args.n_trials < 1 else "search_epochs", "must be >= 1")
    if args.checkpoint_every < 0:
        raise ConfigError("checkpoint_every", "must be >= 0 (0: as often as the cost allows)")
    shortest = shortest_warmup(space, base)
    if shortest >= args.search_epochs:
        raise ConfigError("search_epochs", f"{args.search_epochs} ends inside every trial's warm-up (warmup_epochs "
                          f">= {shortest} in the space), so no trial could ever be judged; raise --search_epochs "
                          "or fix a shorter warm-up with --set warmup_epochs=N")
    scheduler = getattr(args, "scheduler", "asha")
    rungs = "after_warmup" if getattr(args, "asha_after_warmup", False) else getattr(args, "rungs", "adapted")
    if scheduler not in SCHEDULERS:
        raise ConfigError("scheduler", f"unknown {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    if rungs not in RUNG_CLOCKS:
        raise ConfigError("rungs", f"unknown {rungs!r}; choose from {', '.join(RUNG_CLOCKS)}")
    from .final_model import FINAL_RULES

    final_rule = getattr(args, "final_model", "greedy")
    if final_rule not in FINAL_RULES:
        raise ConfigError("final_model", f"unknown {final_rule!r}; choose from {', '.join(FINAL_RULES)}")
    if not 1 <= args.final_ensemble <= 32:
        raise ConfigError("final_ensemble", f"must be in 1..32, got {args.final_ensemble}")
    population = getattr(args, "population", None)
    population = 1 if population is None else int(population)
    if not 1 <= population <= 1024:
        raise ConfigError("population", f"must be in 1..1024, got {population}")
    if population > 1 and _pick_trainer(args.trainer, args.num_workers) != "function":
        raise ConfigError("population", "populations run in the function fast path: not with --trainer torch or "
                          "--num_workers > 1")
    report_every = int(getattr(args, "report_every", 0) or 0)
    if report_every < 0:
        raise ConfigError("report_every", f"must be >= 0 (0: at most one report a second), got {report_every}")
    # every value a trial can get must make a valid config with the base
    TrainConfig.from_dict({**base, **{k: p.value for k, p in space.params.items() if p.kind == "fixed"
                                      and k not in ALL_ARCH_PARAMS and k != "arch"}})
    if args.store and "://" not in args.store:
        args.store = str(Path(args.store).resolve())
    # the objective must be computable from what is given (before anything is written)
    from xfer.selection import resolve_for  # imports torch: not at module import (the CLI imports this module)
    objective = resolve_for(TrainConfig.from_dict(base), bool(getattr(args, "sup_peak_csv", None)),
                            bool(getattr(args, "test_csv", None)))
    storage = _check_storage(getattr(args, "storage", None))
    spec = ingest_for_trials(args)
    space = transductive_space(space, spec["sup_peak"] != "" and base["adapt_test_peaks"])
    out.mkdir(parents=True, exist_ok=True)
    return Sweep(
        name=args.name, output=out, spec=spec, base=base, space=space.describe(),
        n_trials=args.n_trials, search_epochs=args.search_epochs, metric=base["metric"],
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, num_workers=args.num_workers,
        trainer=_pick_trainer(args.trainer, args.num_workers), grace_period=args.grace_period or
        default_grace(args.search_epochs), reduction_factor=args.reduction_factor,
        checkpoint_every=args.checkpoint_every, max_failures=args.max_failures, seed=base["seed"],
        data_args={k: getattr(args, k, None) for k in DATA_FLAGS}, objective=objective,
        objective_setting=base["objective"], storage_uri=storage,
        reuse_actors=bool(getattr(args, "reuse_actors", True)), final_ensemble=args.final_ensemble,
        scheduler=scheduler, rungs=rungs, final_model=final_rule, population=population,
        report_every=report_every, tensorboard=bool(getattr(args, "tensorboard", False)))


def _check_storage(storage: str | None) -> str:
    """--storage as a sweep keeps it: a local path made absolute, or a URI that pyarrow opens
    and whose server answers ("" = the output folder's ray_results)."""
    from xfer.data.fs import resolve

    if not storage:
        return ""
    try:
        loc = resolve(storage)
        loc.fs.get_file_info(loc.path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI or an unreachable server
        raise ConfigError("storage", f"{storage}: cannot be opened ({str(e).splitlines()[0]})") from None
    return storage if "://" in storage else loc.path


def transductive_space(space: SearchSpace, adapting: bool) -> SearchSpace:
    """Without a test line to adapt to, self-training is inert and the joint basis is the
    training line's own: drop them from the space (with a log line)."""
    from .space import TRANSDUCTIVE_ONLY

    if adapting:
        return space
    raw = space.describe()
    dropped = [k for k in TRANSDUCTIVE_ONLY if isinstance(raw.get(k), dict)]
    for k in dropped:
        del raw[k]
    rep = raw.get("peak_repr")
    if isinstance(rep, dict) and "joint_lsi" in rep.get("choices", []):
        rest = [c for c in rep["choices"] if c != "joint_lsi"]
        raw["peak_repr"] = {"type": "categorical", "choices": rest} if len(rest) > 1 else rest[0]
        dropped.append("peak_repr=joint_lsi")
    if dropped:
        log.info("no test line to adapt to: not searching %s", ", ".join(dropped))
    return parse_space(raw, space.source)


def default_point(space: SearchSpace, base: dict) -> dict | None:
    """The configuration a sweep's settings give without a search (the shipped defaults overridden
    by `base`, the sweep's fixed settings), as a point of `space`: enqueued as the first trial.
    None (with a log line) when the space cannot produce it."""
    from xfer.config import ARCH_PARAMS

    defaults = {**TrainConfig().to_flat(live_only=False), **base}
    arch = space.params["arch"].value if "arch" in space.params and space.params["arch"].kind == "fixed" \
        else defaults["arch"]
    point = {}
    for key, p in space.params.items():
        if p.kind == "fixed" or (key in ALL_ARCH_PARAMS and key not in ARCH_PARAMS[arch]):
            continue
        v = defaults[key]
        inside = (p.low <= v <= p.high) if p.kind in ("float", "int") else v in p.choices
        if not inside:
            log.info("the defaults are not a point of this space (%s=%r); not enqueued", key, v)
            return None
        point[key] = v
    return point


def _pick_trainer(choice: str, num_workers: int) -> str:
    """function (fast path) unless several workers per trial are asked for; see README."""
    if choice == "auto":
        return "torch" if num_workers > 1 else "function"
    if choice == "function" and num_workers > 1:
        raise ConfigError("num_workers", "several workers per trial need --trainer torch (or auto)")
    return choice


# ----------------------------------------------------------------------------- ray

# Trial processes get these (the job's runtime environment): Ray Train's state tracking lists each
# TorchTrainer trial's run (`train-<trial id>`) in the dashboard.
TRIAL_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def start_ray(address: str | None, num_cpus: int | None, num_gpus: int | None, sweep: str = "",
              quiet: bool = False):
    """quiet: Ray's own loggers in this process show warnings and errors, not INFO lines
    (`xfer tune -v` keeps them)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    from ray.job_config import JobConfig

    # the sweep's name goes into the job's metadata (the dashboard's job view; a submitted job's own
    # metadata wins); set variables stay as they are (a submitted job's runtime env must not conflict)
    env = {k: v for k, v in TRIAL_ENV.items() if k not in os.environ}
    kw = {"log_to_driver": False, "job_config": JobConfig(metadata={"xfer_sweep": sweep}),
          "runtime_env": {"env_vars": env} if env else None,
          "logging_level": logging.WARNING if quiet else logging.INFO}
    if address:
        return ray.init(address=address, **kw)
    # The dashboard stays on: without it Ray Train never frees the placement groups of
    # stopped trials (measured with ray 2.60) and a sweep hangs.
    return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1", **kw)


def slots(sw: Sweep) -> int:
    """Concurrent trials the cluster can hold."""
    import ray

    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 1) / max(sw.cpus_per_trial, 1e-9) + 1e-9)
    if sw.gpus_per_trial > 0:
        n = min(n, math.floor(res.get("GPU", 0) / sw.gpus_per_trial + 1e-9))
    if n < 1:
        raise XferError(f"the cluster ({res.get('CPU', 0)} CPUs, {res.get('GPU', 0)} GPUs) cannot hold one trial of "
                        f"{sw.cpus_per_trial} CPUs and {sw.gpus_per_trial} GPUs")
    return n


def make_trainable(sw: Sweep):
    from ray import tune

    from xfer.report import asha_rungs

    from .trainable import function_trial, labelled, trainer_trial

    # where ASHA may stop a trial, on the sweep's rung clock (none under FIFO)
    rungs = tuple(asha_rungs(sw.grace_period, sw.reduction_factor, sw.search_epochs)) if sw.scheduler == "asha" else ()
    if sw.population > 1:
        from .trainable import population_trial

        fn = partial(population_trial, spec=sw.spec, base=sw.base, checkpoint_every=sw.checkpoint_every,
                     rungs=rungs, clock=sw.rungs, board=board_name(sw), report_every=sw.report_every)
        return labelled(tune.with_resources(fn, {"cpu": sw.cpus_per_trial, "gpu": sw.gpus_per_trial}))
    if sw.trainer == "function":
        fn = partial(function_trial, spec=sw.spec, base=sw.base, checkpoint_every=sw.checkpoint_every,
                     rungs=rungs, clock=sw.rungs, report_every=sw.report_every)
        return labelled(tune.with_resources(fn, {"cpu": sw.cpus_per_trial, "gpu": sw.gpus_per_trial}))
    per_worker = {"CPU": max(0.01, sw.cpus_per_trial / sw.num_workers - 0.01)}
    if sw.gpus_per_trial > 0:
        per_worker["GPU"] = sw.gpus_per_trial / sw.num_workers
    fn = partial(trainer_trial, spec=sw.spec, base=sw.base, checkpoint_every=sw.checkpoint_every, rungs=rungs,
                 clock=sw.rungs,
                 num_workers=sw.num_workers, resources_per_worker=per_worker,
                 train_storage=_train_storage(sw))
    return labelled(tune.with_resources(fn, {"cpu": 0.01}))


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


def make_tuner(sw: Sweep, restore: bool, verbose: bool = False, progress_every: float = 30.0):
    """The Tuner of a new sweep, or the restored one (restore); verbose: Tune's own tables
    instead of the compact progress display (see `display`)."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import EpochAwareOptunaSearch, SweepSearchGenerator, make_scheduler
    from .trainable import KEEP_CHECKPOINTS

    trainable = make_trainable(sw)
    loc = sw.storage_location()
    fs = None if loc.is_local else loc.fs
    path = f"{loc.path.rstrip('/')}/{sw.name}"
    if restore:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise XferError(f"--resume: no restorable sweep state under {sw.storage} ({sw.name})")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, storage_filesystem=fs)
        _redisplay(tuner, sw, verbose, progress_every)
        return tuner
    space = parse_space(sw.space, "sweep.json")
    point = default_point(space, sw.base)
    n_startup = min(10, max(2, sw.n_trials // 3))
    if sw.population > 1:
        from xfer.report import asha_rungs

        from .searcher import PopulationSearch

        searcher = PopulationSearch(
            space, size=sw.population, n_members=sw.n_trials, study_name=sw.name,
            storage_url=f"sqlite:///{sw.study_db}", seed=sw.seed, n_startup_trials=n_startup, first=point,
            max_t=sw.search_epochs, board=board_name(sw), reduction_factor=sw.reduction_factor,
            rungs=asha_rungs(sw.grace_period, sw.reduction_factor, sw.search_epochs) if sw.scheduler == "asha" else ())
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


# ----------------------------------------------------------------------------- results

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
    import pandas as pd

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
    from xfer.checkpoint import ensemble_checkpoint, save_checkpoint

    from . import final_model

    df = trial_table(grid, sw)
    df.to_csv(sw.output / "trials.csv", index=False)
    df.astype({c: "string" for c in df.columns if df[c].dtype == object}).to_parquet(sw.output / "trials.parquet",
                                                                                     index=False)
    ok = df[df["status"] != "errored"].dropna(subset=["best_objective"])
    if ok.empty:
        raise XferError(f"no trial finished without error; see {sw.output / 'trials.csv'} and the logs under "
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
        search_epochs=sw.search_epochs, defaults_point=default_point(parse_space(sw.space, "sweep.json"), sw.base),
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
    write_json(sw.output / "best_params.json", best_params)
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
    from xfer.checkpoint import export_best, read_checkpoint

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
    from .trainable import CHECKPOINT_FILE, member_file

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


def final_model_source(final: dict) -> str:
    """How a sweep's final model was made, in words (best_params.json's final_model)."""
    n = len(final.get("members", []))
    if final.get("guarded"):
        return "the shipped defaults' trial (the rule's average had a lower objective)"
    what = "one trial" if n == 1 else f"{n} trials averaged"
    return f"{what} ({final.get('rule', 'top')} rule)"


def score_best(sw: Sweep, ckpt: dict, final: dict | None = None) -> dict | None:
    """The sweep's final model (what best_model.pt holds) on the four splits (test line only
    here) + baselines; `final`: best_params.json's final_model (how it was made)."""
    from xfer.pipeline import baselines_for, evaluate_checkpoint

    metrics, p = evaluate_checkpoint(Namespace(**sw.data_args), ckpt, sw.output)
    metrics["baselines"] = baselines_for(p)
    n = len(ckpt.get("ensemble", [ckpt]))
    metrics["model"] = {"source": "the sweep's final model: " + final_model_source(final or {"members": [0] * n}),
                        "objective": sw.objective_label, "config": p.cfg.to_flat(), "n_members": n}
    write_json(sw.output / "metrics.json", metrics)
    return metrics


def run(args) -> dict:
    """Start (or resume) a sweep, wait for it, export and score. Returns a summary."""
    ray_environment()
    out = Path(args.output_folder).resolve()
    sw = Sweep.load(out) if args.resume else new_sweep(args)
    if not args.resume:
        # validates and prepares the training data once before any trial (and warms this node's cache)
        from xfer.config import TrainConfig as _TC

        from .data import DataSpec, load_trial_data
        load_trial_data(DataSpec(**sw.spec), _TC.from_dict(sw.base))
        sw.save()
    verbose = bool(getattr(args, "tune_verbose", False))  # a display choice of this invocation, not in sweep.json
    ctx = start_ray(getattr(args, "address", None), getattr(args, "num_cpus", None), getattr(args, "num_gpus", None),
                    sw.name, quiet=not verbose)
    dashboard = getattr(ctx, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    t0 = time.perf_counter()
    if not verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines ("A new study created ...")
    tuner = make_tuner(sw, restore=args.resume, verbose=verbose,
                       progress_every=float(getattr(args, "progress_every", 30.0)))
    try:
        grid = tuner.fit()
    finally:
        from .progress import close_all

        close_all()  # a live display still drawn when fit() raised
    wall = time.perf_counter() - t0
    exported = export(grid, sw)
    metrics = None
    if exported["final"] is not None and (sw.data_args.get("test_csv") or sw.data_args.get("sup_peak_csv")):
        metrics = score_best(sw, exported["final"], exported["best"]["final_model"])
    from xfer.report import try_write_report  # report.html: a failure is a warning, never a failed sweep

    return {"sweep": sw, "table": exported["table"], "best": exported["best"], "metrics": metrics,
            "dashboard": dashboard, "wall_seconds": wall, "report": try_write_report(sw.output)}
