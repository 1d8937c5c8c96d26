"""A new sweep from its request (tune.request.SweepRequest): the base config and the search space,
each checked before anything is written or started (`new_sweep`), and the points of the space the
sweep needs (the shipped defaults' point, the space without a test line to adapt to)."""

from __future__ import annotations

import logging
from pathlib import Path

from xfer.config import ALL_ARCH_PARAMS, ARCH_PARAMS, TrainConfig
from xfer.data.fs import resolve
from xfer.errors import ConfigError, XferError
from xfer.sweep_files import SETTINGS_FILE

from .final_model import FINAL_RULES
from .ingest import ingest_for_trials
from .request import SweepRequest
from .settings import RUNG_CLOCKS, SCHEDULERS, Sweep
from .space import TRANSDUCTIVE_ONLY, SearchSpace, load_space, parse_space

log = logging.getLogger(__name__)


def base_config(request: SweepRequest) -> dict:
    """Non-searched settings (flat): the config file and overrides, epochs = search_epochs.
    Architecture parameters are left out: they come from the space, for the arch a trial draws."""
    from xfer.pipeline import make_config

    cfg = make_config(request.config_path, request.overrides)
    flat = {k: v for k, v in cfg.to_flat(live_only=True).items() if k not in ALL_ARCH_PARAMS}
    flat["epochs"] = request.search_epochs
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


def _check_settings(r: SweepRequest, space: SearchSpace, base: dict) -> None:
    """The search's own settings, each checked with the flag it came from named."""
    if r.n_trials < 1 or r.search_epochs < 1:
        raise ConfigError("n_trials" if r.n_trials < 1 else "search_epochs", "must be >= 1")
    if r.checkpoint_every < 0:
        raise ConfigError("checkpoint_every", "must be >= 0 (0: as often as the cost allows)")
    shortest = shortest_warmup(space, base)
    if shortest >= r.search_epochs:
        raise ConfigError("search_epochs", f"{r.search_epochs} ends inside every trial's warm-up (warmup_epochs "
                          f">= {shortest} in the space), so no trial could ever be judged; raise --search_epochs "
                          "or fix a shorter warm-up with --set warmup_epochs=N")
    for key, value, allowed in (("scheduler", r.scheduler, SCHEDULERS), ("rungs", r.rungs, RUNG_CLOCKS),
                                ("final_model", r.final_model, FINAL_RULES)):
        if value not in allowed:
            raise ConfigError(key, f"unknown {value!r}; choose from {', '.join(allowed)}")
    if not 1 <= r.final_ensemble <= 32:
        raise ConfigError("final_ensemble", f"must be in 1..32, got {r.final_ensemble}")
    if not 1 <= r.population <= 1024:
        raise ConfigError("population", f"must be in 1..1024, got {r.population}")
    if r.population > 1 and _pick_trainer(r.trainer, r.num_workers) != "function":
        raise ConfigError("population", "populations run in the function fast path: not with --trainer torch or "
                          "--num_workers > 1")
    if r.report_every < 0:
        raise ConfigError("report_every", f"must be >= 0 (0: at most one report a second), got {r.report_every}")
    method = space.params.get("peak_mapper_method")
    if method is not None and "neural" in method.values() and not base.get("peak_mapper"):
        raise ConfigError("peak_mapper", "the space can draw peak_mapper_method 'neural': give the mapper with "
                          "--peak_mapper DIR/mapper.pt (from `xfer map-peaks`)")
    # every value a trial can get must make a valid config with the base
    TrainConfig.from_dict({**base, **{k: p.value for k, p in space.params.items() if p.kind == "fixed"
                                      and k not in ALL_ARCH_PARAMS and k != "arch"}})


def new_sweep(r: SweepRequest) -> Sweep:
    """A new sweep's settings: everything checked, then the data put into the store for the trials."""
    out = Path(r.output_folder).resolve()
    if (out / SETTINGS_FILE).exists():
        raise XferError(f"{out} already holds a sweep; use --resume to finish it or choose another --output_folder")
    space = load_space(r.space, r.fixed)          # a malformed space fails here, before anything starts
    base = base_config(r)
    _check_settings(r, space, base)
    sources = r.sources
    if sources.store and "://" not in sources.store:
        sources = sources.replace(store=str(Path(sources.store).resolve()))
    # the objective must be computable from what is given (before anything is written)
    from xfer.selection import resolve_for  # imports torch: not at module import
    objective = resolve_for(TrainConfig.from_dict(base), sources.sup_peak is not None, sources.test is not None)
    storage = _check_storage(r.storage)
    sources = sources.persist()  # in-memory data (the Python API) into the store, so that sweep.json names it
    spec = ingest_for_trials(sources, TrainConfig.from_dict(base).data.val_fraction)
    space = transductive_space(space, spec["sup_peak"] != "" and base["adapt_test_peaks"])
    out.mkdir(parents=True, exist_ok=True)
    return Sweep(
        name=r.name, output=out, spec=spec, base=base, space=space.describe(),
        n_trials=r.n_trials, search_epochs=r.search_epochs, metric=base["metric"],
        cpus_per_trial=r.cpus_per_trial, gpus_per_trial=r.gpus_per_trial, num_workers=r.num_workers,
        trainer=_pick_trainer(r.trainer, r.num_workers), grace_period=r.grace_period or
        default_grace(r.search_epochs), reduction_factor=r.reduction_factor,
        checkpoint_every=r.checkpoint_every, max_failures=r.max_failures, seed=base["seed"],
        data_args=sources.to_dict(), objective=objective, objective_setting=base["objective"], storage_uri=storage,
        reuse_actors=r.reuse_actors, final_ensemble=r.final_ensemble, scheduler=r.scheduler, rungs=r.rungs,
        final_model=r.final_model, population=r.population, report_every=r.report_every,
        tensorboard=r.tensorboard)


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
    if choice == "function" and num_workers > 1:
        raise ConfigError("trainer", f"the function trainer runs one worker per trial; --num_workers {num_workers} "
                          "needs --trainer torch (or auto)")
    return choice
