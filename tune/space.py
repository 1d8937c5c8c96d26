"""The one search-space file: every live parameter of a sweep.

Keys are the flat config keys of `xfer.config.TrainConfig`, so a trial's
parameters are a valid config and `best_params.json` loads straight into
`xfer train --config_path`. The space is define-by-run: the architecture is
sampled first and each architecture's own parameters (`xfer.config.ARCH_PARAMS`)
are sampled only when it is chosen, so no trial carries an inert parameter.

The built-in spaces (`SPACES`) hold the settings every model has, written here,
and each registered encoder's parameters with their entries for that space,
declared with the encoder (xfer.registry.Param.search; xfer/builtin.py): the
broad space chooses among every registered encoder.

A space is a mapping key -> spec, where a spec is one of

    {"type": "float", "low": 1e-4, "high": 3e-3, "log": true}
    {"type": "int", "low": 1, "high": 3}            (optional "step", "log")
    {"type": "categorical", "choices": ["dae", "vae"]}
    a plain value (JSON/YAML scalar or list)         -> fixed, not searched

Users replace or extend the default with a YAML/JSON file (`xfer tune
--space FILE`) and fix single keys from the command line (`--arch_type`,
`--divergence_type`, `--set KEY=VALUE`). `parse_space` validates a space (and `load_space`, which
reads the file and applies the command-line fixes, goes through it) before any
trial starts: unknown keys, bad types and ranges, values that make no valid
config, architecture parameters for an architecture the space cannot choose.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfer import registry
from xfer.config import (ALIASES, ALL_ARCH_PARAMS, ARCH_PARAMS, ARCHS, DIVERGENCES, FLAT_KEYS, TrainConfig,
                         drop_other_arch_params, load_mapping_file)
from xfer.errors import ConfigError

# The broad space (`--space broad`): every architecture and divergence, every width. Ranges follow
# the original research code's (λ_target_class 1-15, log) and what trained well on the simulator.
# Each encoder's own parameters follow these (`builtin_space`).
_BROAD_COMMON: dict[str, Any] = {
    # optimisation
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "batch_size": {"type": "categorical", "choices": [128, 256, 512]},
    # loss weights
    "lambda_class": {"type": "float", "low": 0.3, "high": 3.0, "log": True},
    "lambda_target_class": {"type": "float", "low": 1.0, "high": 15.0, "log": True},
    "lambda_domain": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    "lambda_divergence": {"type": "float", "low": 0.01, "high": 3.0, "log": True},
    "lambda_balance": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    "lambda_entropy": {"type": "float", "low": 0.0, "high": 0.3},
    "lambda_pseudo": {"type": "float", "low": 0.0, "high": 3.0},                   # self-training (test line)
    "pseudo_fraction": {"type": "float", "low": 0.1, "high": 1.0},
    "grl_gamma": {"type": "float", "low": 1.0, "high": 20.0, "log": True},
    "warmup_epochs": {"type": "int", "low": 0, "high": 20},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "use_cdann": {"type": "categorical", "choices": [True, False]},
    "entropy_conditioning": {"type": "categorical", "choices": [True, False]},
    # inputs (each distinct combination is prepared once per node and cached)
    "peak_repr": {"type": "categorical", "choices": ["lsi", "joint_lsi"]},
    "bin_size": {"type": "categorical", "choices": [0, 1_000_000]},
    # architecture
    "arch": {"type": "categorical", "choices": ARCHS},          # every registered encoder
    "divergence": {"type": "categorical", "choices": list(DIVERGENCES)},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "peak_dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "hidden_dim": {"type": "categorical", "choices": [256, 512, 1024, 2048]},
    "n_layers": {"type": "int", "low": 1, "high": 3},
    "latent_dim": {"type": "categorical", "choices": [64, 128, 256, 512]},
    "proj_hidden": {"type": "categorical", "choices": [256, 512, 1024]},
    "cls_hidden": {"type": "categorical", "choices": [64, 128, 256, 512]},
    "disc_hidden": {"type": "categorical", "choices": [256, 512, 1024]},
}

# The centred space (`--space centred`): every searched parameter of the broad space in a narrow range
# around its shipped default (xfer/config.py: log ranges about x/÷3, linear ones about ±half the
# default's span); the architecture (dae), divergence (mmd), conditioning and the coverage channel
# are the defaults'. bench/sweep_design_study.py compares the two. The encoder's own parameters
# follow these (`builtin_space`).
_CENTRED_COMMON: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
    "weight_decay": {"type": "float", "low": 3e-5, "high": 3e-4, "log": True},
    "batch_size": {"type": "categorical", "choices": [128, 256, 512]},
    "lambda_class": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
    "lambda_target_class": {"type": "float", "low": 2.0, "high": 12.0, "log": True},
    "lambda_domain": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
    "lambda_divergence": {"type": "float", "low": 0.3, "high": 3.0, "log": True},
    "lambda_balance": {"type": "float", "low": 0.03, "high": 0.3, "log": True},
    "lambda_entropy": {"type": "float", "low": 0.0, "high": 0.1},
    "lambda_pseudo": {"type": "float", "low": 0.3, "high": 2.0},
    "pseudo_fraction": {"type": "float", "low": 0.3, "high": 0.7},
    "grl_gamma": {"type": "float", "low": 3.0, "high": 20.0, "log": True},
    "warmup_epochs": {"type": "int", "low": 5, "high": 15},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
    "use_cdann": True,
    "entropy_conditioning": True,
    "peak_repr": {"type": "categorical", "choices": ["lsi", "joint_lsi"]},
    "bin_size": 1_000_000,
    "arch": "dae",
    "divergence": "mmd",
    "dropout": {"type": "float", "low": 0.3, "high": 0.6},
    "peak_dropout": {"type": "float", "low": 0.1, "high": 0.3},
    "hidden_dim": {"type": "categorical", "choices": [128, 256, 512]},
    "n_layers": {"type": "int", "low": 1, "high": 2},
    "latent_dim": {"type": "categorical", "choices": [256, 512]},
    "proj_hidden": {"type": "categorical", "choices": [512, 1024]},
    "cls_hidden": {"type": "categorical", "choices": [128, 256, 512]},
    "disc_hidden": {"type": "categorical", "choices": [512, 1024]},
}
_COMMON = {"broad": _BROAD_COMMON, "centred": _CENTRED_COMMON}


def builtin_space(name: str) -> dict[str, Any]:
    """A built-in space as the registry stands now: its common entries, then, in the registry's
    order (`xfer.registry.all_params`), the parameters that have an entry for it and belong to an
    architecture the space can choose."""
    out = {k: _materialise(v) for k, v in _COMMON[name].items()}
    archs = set(_choices(out.get("arch", TrainConfig().model.arch)))
    for key, p in registry.all_params().items():
        if name in p.search and archs & set(registry.param_owners(key)):
            out[key] = copy.deepcopy(dict(p.search[name]))
    return out


def _materialise(spec):
    """A spec as plain data (a registry view such as ARCHS becomes a list)."""
    if isinstance(spec, dict):
        return {k: _materialise(v) for k, v in spec.items()}
    return list(spec) if isinstance(spec, registry.LiveNames) else copy.deepcopy(spec)


# The built-in spaces, read from the registry each time they are used.
BROAD_SPACE: Mapping[str, Any] = registry.LiveMapping(lambda: builtin_space("broad"))
CENTRED_SPACE: Mapping[str, Any] = registry.LiveMapping(lambda: builtin_space("centred"))
SPACES: dict[str, Mapping[str, Any]] = {"broad": BROAD_SPACE, "centred": CENTRED_SPACE}
DEFAULT_SPACE_NAME = "centred"   # the pick of bench/sweep_design_study.py (BENCHMARKS.md, "A sweep that pays")

# Keys that never belong in a search space (they are sweep settings, not trial parameters).
NOT_SEARCHABLE = {"epochs", "seed", "metric", "objective"}

# Searched only when the sweep adapts to a test line (tune.configure.transductive_space drops them otherwise).
TRANSDUCTIVE_ONLY = ("lambda_pseudo", "pseudo_fraction")

_DATA = ("data preparation: each distinct value is prepared once per node (a searched peak_repr and "
         "bin_size cover the input choice); search it in a space file or fix it with --set")
_TEST_LINE = "how the test line's peaks are matched to the training line's: a property of the inputs, not the model"
# Every config key the broad space deliberately leaves out, and why (a space file or
# --set can still search or fix most of them). tests/test_space.py derives the live keys
# from TrainConfig and checks that each is either in BROAD_SPACE or here.
NOT_SEARCHED: dict[str, str] = {
    "epochs": "sweep setting (--search_epochs)",
    "seed": "sweep setting (--seed)",
    "metric": "sweep setting: defines source_val",
    "objective": "sweep setting (--objective): what ranks the trials",
    "patience": "sweep setting: trials run --search_epochs epochs and ASHA stops the weak ones",
    "grad_clip": "a numerical safety bound, not a model choice",
    "cuda_graph": "speed only: the same training either way",
    "ensemble": "a property of the final model (xfer train): each trial trains one member",
    "randomized_dim": "CDAN's randomised-map width: used only when classes x latent_dim > 4096, which the "
                      "default latent_dim choices never reach",
    "class_weighted": "part of the objective: balanced accuracy needs the class-weighted loss",
    "val_fraction": "defines source_val's validation split (and the cells every candidate validates on)",
    "adapt_test_peaks": "sweep setting: trials adapt to the test line whenever it is given",
    "source_model": "the expression embeddings are computed (or stored by `xfer embed`) before the sweep",
    **{k: _DATA for k in ("n_components", "peak_filter", "peak_transform", "lsi_components", "bin_components",
                          "line_norm")},
    **{k: _TEST_LINE for k in ("use_peak_mapper", "peak_mapper_method", "peak_impute_strategy",
                               "peak_max_distance")},
    "peak_mapper": "a file (the mapper.pt of `xfer map-peaks`), fixed with --peak_mapper",
}


@dataclass(frozen=True)
class Param:
    key: str
    kind: str                   # float | int | categorical | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    value: Any = None

    def sample(self, trial):
        if self.kind == "fixed":
            return self.value
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log,
                                       **({"step": self.step} if self.step else {}))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     **({"step": int(self.step)} if self.step else {}))
        return trial.suggest_categorical(self.key, list(self.choices))

    def values(self) -> tuple:
        """The values this parameter can take (for categorical / fixed)."""
        if self.kind == "fixed":
            return (self.value,)
        return tuple(self.choices or ())


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    source: str = "default space"

    def archs(self) -> tuple[str, ...]:
        p = self.params.get("arch")
        return p.values() if p is not None else (TrainConfig().model.arch,)

    def __call__(self, trial) -> dict:
        """Define-by-run: sample one trial's parameters (used by OptunaSearch)."""
        out: dict[str, Any] = {}
        arch = self.params["arch"].sample(trial) if "arch" in self.params else TrainConfig().model.arch
        out["arch"] = arch
        for key, p in self.params.items():
            if key == "arch":
                continue
            if key in ALL_ARCH_PARAMS and key not in ARCH_PARAMS[arch]:
                continue  # not live for this architecture: never sampled
            out[key] = p.sample(trial)
        return out

    def searched(self) -> list[str]:
        return [k for k, p in self.params.items() if p.kind != "fixed"]

    def with_fixed(self, fixed: dict) -> "SearchSpace":
        """Override keys from the command line, each with a single value or a spec
        (e.g. `--divergence_type mmd,coral` -> a categorical); validated again.

        When `arch` is overridden, the base space's parameters of architectures no
        longer chosen drop out (keys given here stay, so a user who set one for an
        architecture the space cannot choose gets the error)."""
        fixed = {ALIASES.get(k, k): v for k, v in fixed.items()}
        raw = {k: _unparse(p) for k, p in self.params.items()}
        raw.update(fixed)
        if "arch" in fixed:
            raw = drop_other_arch_params(raw, _choices(fixed["arch"]), keep=fixed)
        return parse_space(raw, source=f"{self.source} + command line")

    def describe(self) -> dict:
        return {k: _unparse(p) for k, p in self.params.items()}


def _choices(spec) -> list:
    """The values a spec (or a fixed value) allows, as a list."""
    if isinstance(spec, dict):
        return list(spec.get("choices") or [])
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _unparse(p: Param):
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return {"type": "categorical", "choices": list(p.choices)}
    d = {"type": p.kind, "low": p.low, "high": p.high, "log": p.log}
    if p.step:
        d["step"] = p.step
    return d


def _number(source, key, spec, name):
    v = spec.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(key, f"'{name}' must be a finite number, got {v!r}", source)
    return v


def parse_space(raw: dict, source: str = "search space") -> SearchSpace:
    """Parse and validate a space mapping; every error names the key."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("space", "a search space must be a non-empty mapping of config keys", source)
    params: dict[str, Param] = {}
    for key0, spec in raw.items():
        key = ALIASES.get(key0, key0)
        if key not in FLAT_KEYS:
            import difflib
            close = difflib.get_close_matches(key, list(FLAT_KEYS), n=1)
            raise ConfigError(key0, "not a config key" + (f" (did you mean '{close[0]}'?)" if close else ""), source)
        if key in NOT_SEARCHABLE and isinstance(spec, dict):
            raise ConfigError(key, "is a sweep setting, not a searchable parameter (set it with its own flag)", source)
        if isinstance(spec, dict):
            kind = spec.get("type")
            extra = set(spec) - {"type", "low", "high", "log", "step", "choices"}
            if extra:
                raise ConfigError(key, f"unknown spec field(s) {sorted(extra)}", source)
            if kind in ("float", "int"):
                low, high = _number(source, key, spec, "low"), _number(source, key, spec, "high")
                if not low < high:
                    raise ConfigError(key, f"needs low < high, got low={low}, high={high}", source)
                log = bool(spec.get("log", False))
                if log and low <= 0:
                    raise ConfigError(key, f"a log range needs low > 0, got {low}", source)
                if kind == "int" and (float(low) != int(low) or float(high) != int(high)):
                    raise ConfigError(key, "an int range needs integer bounds", source)
                step = spec.get("step")
                if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
                    raise ConfigError(key, "'step' must be > 0 and cannot be combined with log", source)
                p = Param(key, kind, low=low, high=high, log=log, step=step)
                _check_values(key, [low, high], source)
            elif kind == "categorical":
                choices = spec.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise ConfigError(key, "'choices' must be a non-empty list", source)
                _check_values(key, choices, source)
                p = Param(key, "categorical", choices=tuple(choices))
            else:
                raise ConfigError(key, f"unknown spec type {kind!r}; use float, int or categorical", source)
        else:
            _check_values(key, [spec], source)
            p = Param(key, "fixed", value=spec)
        params[key] = p
    space = SearchSpace(params, source)
    archs = space.archs()
    for key in params:
        if key in ALL_ARCH_PARAMS:
            owners = registry.param_owners(key)
            if not set(owners) & set(archs):
                raise ConfigError(key, f"only used by arch {' / '.join(owners)}, which this space never chooses "
                                  f"(arch choices: {', '.join(archs)})", source)
    return space


# Values that are valid only beside another setting, and a stand-in for it when a value is checked
# on its own (the sweep checks the real one: tune.configure).
_NEEDS_BESIDE = {("peak_mapper_method", "neural"): {"peak_mapper": "mapper.pt"}}


def _check_values(key: str, values: list, source: str) -> None:
    """Each value must make a valid config on its own (type and range)."""
    for v in values:
        cfg = {key: v, **_NEEDS_BESIDE.get((key, v), {})}
        if key in ALL_ARCH_PARAMS:
            cfg["arch"] = registry.param_owners(key)[0]
        try:
            TrainConfig.from_dict(cfg)
        except ConfigError as e:
            raise ConfigError(key, f"value {v!r} is invalid: {str(e).split(': ', 2)[-1]}", source) from None


def load_space(path: str | Path | None, fixed: dict | None = None) -> SearchSpace:
    """The default space, a built-in one by name (SPACES: `broad`, `centred`), or a YAML/JSON
    file's; then command-line fixes.

    File errors (missing, not YAML/JSON, not a mapping) name the file and the
    flag `space`; errors inside the space name the file and the key."""
    if path is None or str(path) in SPACES:
        name = DEFAULT_SPACE_NAME if path is None else str(path)
        space = parse_space(builtin_space(name), f"{name} space")
    else:
        space = parse_space(load_mapping_file(path, "space"), str(path))
    return space.with_fixed(fixed) if fixed else space
