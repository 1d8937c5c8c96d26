"""A new sweep from the command line: flags to the base config and the search space, each
checked before anything is written or started (`new_sweep`), and the points of the space the
sweep needs (the shipped defaults' point, the space without a test line to adapt to)."""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path

from xfer.config import ALL_ARCH_PARAMS, ARCH_PARAMS, TrainConfig, parse_set
from xfer.data.fs import resolve
from xfer.errors import ConfigError, XferError
from xfer.sweep_files import SETTINGS_FILE

from .final_model import FINAL_RULES
from .ingest import ingest_for_trials
from .settings import DATA_FLAGS, RUNG_CLOCKS, SCHEDULERS, Sweep
from .space import TRANSDUCTIVE_ONLY, SearchSpace, load_space, parse_space

log = logging.getLogger(__name__)


def _split_fixed(args) -> tuple[Namespace, dict]:
    """Command-line settings that fix search parameters (the research code's flags and --set) go to the
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
    from xfer.selection import resolve_for  # imports torch: not at module import
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
