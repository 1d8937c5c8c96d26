"""Frozen configuration dataclasses for the one training loop.

A config is built once from defaults, a best_params.json / YAML file and
command-line overrides, and never changes afterwards. Keys may be given flat
(`{"lr": 1e-3, "beta": 1.7}`, the form best_params.json and the Ray Tune
search space use: every key name is unique across sections) or nested
(`{"optim": {"lr": 1e-3}}`). An unknown key, a wrong type or an out-of-range
value is a ConfigError that names the key (with a close match when there is one).

Architecture-specific keys (ARCH_PARAMS) are live only for their
architecture: setting `beta` while `arch` is `dae` is an error, so no config
carries an inert parameter. They are declared with their encoder (xfer.registry,
xfer.builtin): their names, defaults, types and valid ranges come from there, as
do the architectures, the selection objectives and the peak representations a
config may name. Reading a config imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import registry
from .errors import ConfigError
from .registry import ALL_ARCH_PARAMS, ARCH_PARAMS, ARCHS, PEAK_REPRS, SELECTION_CANDIDATES, LiveNames, LiveSet

# ARCHS, ARCH_PARAMS, ALL_ARCH_PARAMS, SELECTION_CANDIDATES and PEAK_REPRS come from the registrations
# (xfer.registry): views that always show what is registered now, extensions included.
# The divergence names: the one list config validation, the search space and the benches use.
# xfer.losses.DIVERGENCES maps exactly these names to their functions (checked when it is imported;
# kept here so that reading a config does not import torch).
DIVERGENCES = ("mmd", "kl", "jensen", "coral")
METRICS = ("balanced_accuracy", "accuracy", "macro_f1")
# Model-selection objectives: "auto", "transfer" (the study's pick) and the registered label-free
# candidates (SELECTION_CANDIDATES; xfer.selection computes them).
OBJECTIVES = LiveNames(lambda: (*registry.META_OBJECTIVES, *SELECTION_CANDIDATES))
SOURCE_MODELS_BUILTIN = ("pca",)
# "neural": a mapper trained by `xfer map-peaks` (xfer.data.neural_mapper), named by `peak_mapper`
MAPPER_METHODS = ("exact", "overlap", "overlap_50pct", "nearest", "neural")
IMPUTE = ("zero", "mean")
PEAK_TRANSFORMS = ("tfidf", "binary", "log1p")


# Settings each member of a population has for itself: the scalars of the model, the losses and
# the optimiser (xfer.training trains P configurations that differ only in these as one batched
# model). Every other setting is the population's shape, the same for all of its members
# (`shape_of`, `check_population`). An encoder's parameters are members' own when declared so
# (xfer.registry.Param.member).
_MEMBER_FIELDS = frozenset({
    "dropout", "peak_dropout",
    "lambda_class", "lambda_target_class", "lambda_domain", "lambda_divergence", "lambda_balance",
    "lambda_entropy", "lambda_pseudo", "pseudo_fraction", "grl_gamma", "warmup_epochs", "label_smoothing",
    "lr", "weight_decay", "patience", "seed", "grad_clip",
})
MEMBER_KEYS = LiveSet(lambda: _MEMBER_FIELDS | {k for k, p in registry.all_params().items() if p.member})


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "dae"
    latent_dim: int = 512          # shared space (projection head and peak encoder outputs)
    hidden_dim: int = 256          # peak encoder hidden width (dae/vae/contrastive/mlp)
    n_layers: int = 1              # peak encoder hidden layers (dae/vae/contrastive/mlp)
    proj_hidden: int = 1024        # projection head hidden width (source embedding -> shared space)
    cls_hidden: int = 256          # phase classifier hidden width
    disc_hidden: int = 1024        # domain discriminator hidden width
    dropout: float = 0.5
    peak_dropout: float = 0.2      # dropout on the peak input (all archs)
    randomized_dim: int = 1024     # CDAN randomised multilinear map width (used when C*latent > 4096)
    # The architecture's own parameters (ARCH_PARAMS[arch], declared with its encoder: xfer.builtin for
    # the built-in ones) as (name, value) pairs in their declared order; a parameter not given takes its
    # declared default. Read as attributes (cfg.beta) or as the mapping `params`.
    arch_params: tuple[tuple[str, typing.Any], ...] = ()

    def __post_init__(self):
        given = dict(self.arch_params)
        if self.arch in ARCHS:   # an unknown arch keeps what it was given; validate() refuses it
            given = {p.name: given.get(p.name, p.default) for p in registry.encoder(self.arch).params}
        object.__setattr__(self, "arch_params", tuple(given.items()))

    @property
    def params(self) -> dict[str, typing.Any]:
        return dict(self.arch_params)

    def __getattr__(self, name: str):
        for k, v in self.__dict__.get("arch_params", ()):
            if k == name:
                return v
        raise AttributeError(f"ModelConfig of arch {self.__dict__.get('arch')!r} has no setting {name!r}")


@dataclass(frozen=True)
class LossConfig:
    divergence: str = "mmd"
    lambda_class: float = 1.0         # source (expression) classification
    lambda_target_class: float = 5.0  # training line's paired PEAK labels (semi-supervised)
    lambda_domain: float = 0.3        # adversarial (CDANN) term
    lambda_divergence: float = 1.0    # divergence between source and target latents
    lambda_balance: float = 0.1       # KL(mean target prediction || training class prior)
    lambda_entropy: float = 0.0       # entropy of target predictions
    lambda_pseudo: float = 1.0        # CE on class-balanced pseudo-labels of the adaptation line (self-training)
    pseudo_fraction: float = 0.5      # share of each predicted class kept as pseudo-labels (most confident)
    use_cdann: bool = True            # class-conditional adversary (False: plain DANN on features)
    entropy_conditioning: bool = True  # CDAN+E sample weights
    grl_gamma: float = 10.0           # GRL annealing: lambda_p = 2/(1+exp(-gamma p)) - 1
    warmup_epochs: int = 10           # linear curriculum ramp of the adaptation weights
    label_smoothing: float = 0.0
    class_weighted: bool = True       # CE weighted by inverse training class frequency (balanced accuracy)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 100
    patience: int = 20               # early stopping: epochs without improvement of the objective
    metric: str = "balanced_accuracy"  # on the training line's PEAK validation split
    objective: str = "auto"          # best-epoch choice, early stopping, a sweep's ranking (xfer.selection):
                                     # auto = transfer when adapting to a test line, else source_val
    seed: int = 0
    grad_clip: float = 5.0
    cuda_graph: bool = True          # CUDA: capture the training step once as a CUDA graph and replay it
    ensemble: int = 3                # xfer train: members trained with seeds seed, seed+1, ... (each its own
                                     # validation split, initialisation and batches), probabilities averaged


@dataclass(frozen=True)
class DataConfig:
    source_model: str = "pca"
    n_components: int = 64           # pca: embedding width
    peak_filter: float = 0.05        # keep peaks non-zero in >= this fraction of training cells
    val_fraction: float = 0.2        # stratified validation split of the training line
    # What the peak encoder reads (channels are concatenated, then standardised per line):
    peak_repr: str = "lsi"           # peaks: the filtered peaks | lsi: LSI of the training line | joint_lsi:
                                     # LSI of both lines, per-line IDF (transductive) | none
    peak_transform: str = "tfidf"    # peaks channel: tfidf (binary x IDF, no depth normalisation) | binary | log1p
    lsi_components: int = 50         # lsi channel: log TF-IDF -> truncated SVD fitted on training cells
    bin_size: int = 1_000_000        # coverage channel: fragments in genomic bins of this many bp (0 = off)
    bin_components: int = 20         # coverage channel: PCA components of the binned profile (0 = every bin)
    line_norm: bool = True           # standardise each cell line's inputs with its own statistics
    adapt_test_peaks: bool = True    # xfer train: align to the test line's unlabelled peaks (never its labels)
    use_peak_mapper: bool = True
    peak_mapper_method: str = "overlap_50pct"
    peak_impute_strategy: str = "zero"
    peak_max_distance: int = 1000
    peak_mapper: str = ""            # peak_mapper_method "neural": the mapper.pt of `xfer map-peaks`


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "loss", "optim", "data")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict | None = None, *, source: str | None = None,
                  base: "TrainConfig | None" = None, allow_inert: bool = False) -> "TrainConfig":
        """Build (or update `base`) from flat or nested keys; validates everything.

        allow_inert: accept (and drop) parameters of other architectures (a checkpoint's config
        may hold them); user-given configs keep the default (refuse)."""
        base = base or cls()
        updates: dict[str, dict] = {s: {} for s in (*cls.SECTIONS, "arch_params")}
        for key, value in dict(d or {}).items():
            if key in cls.SECTIONS and isinstance(value, dict):
                for k, v in value.items():
                    updates[_section_of(k, source, nested_in=key)][k] = v
                continue
            updates[_section_of(key, source)][ALIASES.get(key, key)] = value
        given = {k for sec in updates.values() for k in sec}
        sections = {}
        for s in cls.SECTIONS:
            vals = {k: _coerce(k, v, _FIELD_TYPES[s][k], source) for k, v in updates[s].items()}
            if s == "model":  # the base's values of parameters the (new) arch shares, then the given ones
                types = {k: p.type for k, p in registry.all_params().items()}
                own = {k: _coerce(k, v, types[k], source) for k, v in updates["arch_params"].items()}
                vals["arch_params"] = tuple({**base.model.params, **own}.items())
            sections[s] = dataclasses.replace(getattr(base, s), **vals)
        cfg = cls(**sections)
        cfg.validate(source=source, given=set() if allow_inert else given)
        return cfg

    @classmethod
    def from_file(cls, path, *, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A best_params.json (flat or nested) or a YAML file with the same keys.

        A best_params.json written by `xfer tune` holds {"params": {...}, ...}; its
        "params" are used."""
        d = load_mapping_file(path, "config_path")
        if "params" in d and isinstance(d["params"], dict):
            d = d["params"]
        return cls.from_dict(d, source=str(path), base=base)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        """Nested dict of every value (what checkpoints store); the model section holds the
        architecture's own parameters beside its fields."""
        return {s: _section_values(getattr(self, s)) for s in self.SECTIONS}

    def to_flat(self, live_only: bool = True) -> dict:
        """Flat dict; without live_only it also holds every other registered architecture's
        parameters, at their defaults (inert)."""
        out = {}
        for s in self.SECTIONS:
            out.update(_section_values(getattr(self, s), every_arch=not live_only))
        return out

    def replace(self, **flat) -> "TrainConfig":
        return TrainConfig.from_dict(flat, base=self)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str | None = None, given: set[str] | None = None) -> None:
        m, lo, o, d = self.model, self.loss, self.optim, self.data

        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(key, msg, source)

        need(m.arch in ARCHS, "arch", f"unknown architecture {m.arch!r}; choose from {', '.join(ARCHS)}")
        need(lo.divergence in DIVERGENCES, "divergence",
             f"unknown divergence {lo.divergence!r}; choose from {', '.join(DIVERGENCES)}")
        need(o.metric in METRICS, "metric", f"unknown metric {o.metric!r}; choose from {', '.join(METRICS)}")
        need(o.objective in OBJECTIVES, "objective", f"unknown {o.objective!r}; choose from {', '.join(OBJECTIVES)}")
        need(d.peak_repr in PEAK_REPRS, "peak_repr", f"unknown {d.peak_repr!r}; choose from {', '.join(PEAK_REPRS)}")
        need(registry.peak_repr(d.peak_repr).features or d.bin_size > 0, "peak_repr",
             f"{d.peak_repr!r} needs the coverage channel (bin_size > 0): the encoder would have no input")
        need(d.lsi_components >= 2, "lsi_components", f"must be >= 2, got {d.lsi_components}")
        need(d.bin_size == 0 or d.bin_size >= 1000, "bin_size", f"must be 0 (off) or >= 1000 bp, got {d.bin_size}")
        need(d.bin_components >= 0, "bin_components", f"must be >= 0, got {d.bin_components}")
        need(d.peak_transform in PEAK_TRANSFORMS, "peak_transform",
             f"unknown {d.peak_transform!r}; choose from {', '.join(PEAK_TRANSFORMS)}")
        need(d.peak_mapper_method in MAPPER_METHODS, "peak_mapper_method",
             f"unknown {d.peak_mapper_method!r}; choose from {', '.join(MAPPER_METHODS)}")
        need(d.peak_mapper_method != "neural" or bool(d.peak_mapper), "peak_mapper",
             "peak_mapper_method 'neural' needs the mapper: --peak_mapper DIR/mapper.pt (from `xfer map-peaks`)")
        need(d.peak_mapper_method != "neural" or d.use_peak_mapper, "use_peak_mapper",
             "peak_mapper_method 'neural' maps the test line's peaks: not with --no-use_peak_mapper")
        need(d.peak_impute_strategy in IMPUTE, "peak_impute_strategy",
             f"unknown {d.peak_impute_strategy!r}; choose from {', '.join(IMPUTE)}")
        for key in ("latent_dim", "hidden_dim", "n_layers", "proj_hidden", "cls_hidden", "disc_hidden",
                    "randomized_dim"):
            need(getattr(m, key) >= 1, key, f"must be >= 1, got {getattr(m, key)}")
        for key in ("dropout", "peak_dropout"):
            v = getattr(m, key)
            need(0.0 <= v < 1.0, key, f"must be in [0, 1), got {v}")
        for p in registry.encoder(m.arch).params:  # the ranges its encoder declares
            problem = p.problem(getattr(m, p.name))
            need(problem is None, p.name, problem)
        for f in fields(lo):
            if f.name.startswith("lambda_"):
                v = getattr(lo, f.name)
                need(v >= 0 and math.isfinite(v), f.name, f"must be a finite number >= 0, got {v}")
        need(0 < lo.pseudo_fraction <= 1, "pseudo_fraction", f"must be in (0, 1], got {lo.pseudo_fraction}")
        need(lo.grl_gamma > 0, "grl_gamma", f"must be > 0, got {lo.grl_gamma}")
        need(lo.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {lo.warmup_epochs}")
        need(0 <= lo.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {lo.label_smoothing}")
        need(o.lr > 0, "lr", f"must be > 0, got {o.lr}")
        need(o.weight_decay >= 0, "weight_decay", f"must be >= 0, got {o.weight_decay}")
        need(o.batch_size >= 2, "batch_size", f"must be >= 2, got {o.batch_size}")
        need(o.epochs >= 1, "epochs", f"must be >= 1, got {o.epochs}")
        need(o.patience >= 1, "patience", f"must be >= 1, got {o.patience}")
        need(o.grad_clip >= 0, "grad_clip", f"must be >= 0, got {o.grad_clip}")
        need(1 <= o.ensemble <= 32, "ensemble", f"must be in 1..32, got {o.ensemble}")
        need(d.n_components >= 2, "n_components", f"must be >= 2, got {d.n_components}")
        need(0 <= d.peak_filter < 1, "peak_filter", f"must be in [0, 1), got {d.peak_filter}")
        need(0 < d.val_fraction < 0.9, "val_fraction", f"must be in (0, 0.9), got {d.val_fraction}")
        need(d.peak_max_distance >= 0, "peak_max_distance", f"must be >= 0, got {d.peak_max_distance}")
        for key in sorted((given or set()) & ALL_ARCH_PARAMS):
            owners = [a for a, ps in ARCH_PARAMS.items() if key in ps]
            need(m.arch in owners, key, f"only used by arch {' / '.join(owners)}, but arch is '{m.arch}' "
                 "(an inert parameter; remove it)")


def shape_of(cfg: "TrainConfig") -> dict:
    """The settings a population's members share (all but MEMBER_KEYS; `ensemble` is not one:
    it is how many models `xfer train` builds, not how one is trained)."""
    return {k: v for k, v in cfg.to_flat(live_only=False).items() if k not in MEMBER_KEYS and k != "ensemble"}


def check_population(cfgs: "list[TrainConfig]", source: str | None = None) -> None:
    """Refuse member configs that do not share one shape, naming the first setting that differs."""
    if not cfgs:
        raise ConfigError("population", "a population needs at least one member configuration", source)
    first = shape_of(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        for k, v in shape_of(cfg).items():
            if v != first[k]:
                raise ConfigError(k, f"member {i} has {v!r} but member 0 has {first[k]!r}: the members of a population "
                                  "share every setting but their scalars (xfer.config.MEMBER_KEYS)", source)


def _section_values(section, every_arch: bool = False) -> dict:
    """A section's values by key; a ModelConfig's architecture parameters follow its fields (with
    every_arch, every registered architecture's, in the registry's order, inert ones at their defaults)."""
    out = {f.name: getattr(section, f.name) for f in fields(section) if f.name != "arch_params"}
    if isinstance(section, ModelConfig):
        own = section.params
        out.update({k: own.get(k, p.default) for k, p in registry.all_params().items()} if every_arch else own)
    return out


_FIELD_TYPES: dict[str, dict[str, type]] = {
    s: {f.name: typing.get_type_hints(cls)[f.name] for f in fields(cls) if f.name != "arch_params"}
    for s, cls in (("model", ModelConfig), ("loss", LossConfig), ("optim", OptimConfig), ("data", DataConfig))
}
_FIELD_SECTION: dict[str, str] = {k: s for s, ks in _FIELD_TYPES.items() for k in ks}
assert len(_FIELD_SECTION) == sum(len(v) for v in _FIELD_TYPES.values()), "config key names must be unique"
# The original research code's spellings of the same settings.
ALIASES = {"arch_type": "arch", "divergence_type": "divergence"}
# Every flat key (aliases and the registered architecture parameters included) -> its section.
FLAT_KEYS = registry.LiveMapping(lambda: {**_FIELD_SECTION, **{a: _FIELD_SECTION[k] for a, k in ALIASES.items()},
                                          **{k: "model" for k in registry.all_params()}})
registry.reserve({*_FIELD_SECTION, *ALIASES, *TrainConfig.SECTIONS, "arch_params", "params"})


def _section_of(key: str, source, nested_in: str | None = None) -> str:
    """Where a given key goes: its section, or "arch_params" (an architecture parameter)."""
    known = _FIELD_TYPES[nested_in] if nested_in else _FIELD_SECTION
    if key in known:
        return nested_in or known[key]
    if not nested_in and key in ALIASES:
        return _FIELD_SECTION[ALIASES[key]]
    if nested_in in (None, "model") and key in ALL_ARCH_PARAMS:
        return "arch_params"
    if nested_in:
        raise ConfigError(f"{nested_in}.{key}", _unknown_msg(key, [*known, *(ALL_ARCH_PARAMS if nested_in == "model"
                                                                              else ())]), source)
    raise ConfigError(key, _unknown_msg(key, FLAT_KEYS), source)


# ----------------------------------------------------------------------------- shared helpers

def load_mapping_file(path, key: str) -> dict:
    """A JSON or YAML (.yaml / .yml) file holding a mapping; errors name `key` (the flag)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(key, f"file not found: {p}" if not p.exists() else f"{p} is not a file")
    kind = "YAML" if p.suffix in (".yaml", ".yml") else "JSON"
    try:
        text = p.read_text()
        if kind == "YAML":
            import yaml
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # json / yaml / decoding errors
        raise ConfigError(key, f"{p} is not valid {kind}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(key, f"{p} must hold a mapping of config keys")
    return d


def parse_value(text: str):
    """A command-line value: int, float, true/false, else the string itself."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_set(items) -> dict:
    """`--set KEY=VALUE` items (repeatable) -> {key: parsed value}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(item, "--set takes KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def drop_other_arch_params(flat: dict, archs, keep=()) -> dict:
    """`flat` without the parameters that belong only to architectures outside `archs`
    (keys in `keep` stay: a user who set them explicitly gets the validation error)."""
    archs = {archs} if isinstance(archs, str) else set(archs)
    live = {p for a in archs for p in ARCH_PARAMS.get(a, ())}
    return {k: v for k, v in flat.items() if k not in ALL_ARCH_PARAMS or k in live or k in keep}


def _unknown_msg(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")


def _coerce(key: str, value, typ, source):
    """Check and convert one value to its field's type (ints accept integral floats)."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise TypeError
        if typ is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
            if not math.isfinite(v):
                raise TypeError
            return v
        if typ is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(key, f"expected {typ.__name__}, got {value!r} ({type(value).__name__})", source)
