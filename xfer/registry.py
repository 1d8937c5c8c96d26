"""Extension points: one registration per peak encoder, selection objective and peak representation.

    register_encoder(EncoderSpec(name, impl, params))        a peak encoder (`arch`): its class and its
                                                             own parameters (default, valid range,
                                                             search-space entries)
    register_objective(ObjectiveSpec(name, needs, value))    a label-free selection candidate (`objective`)
    register_peak_repr(PeakReprSpec(name, impl))             what the encoder reads from a line's peaks
                                                             (`peak_repr`)

Everything that lists or checks these derives from the registrations: the config's ARCHS,
ARCH_PARAMS, ALL_ARCH_PARAMS, SELECTION_CANDIDATES and PEAK_REPRS (views that always show the
registry as it is now), config validation, the built-in search spaces (tune.space), the encoder a
model builds (xfer.model), the candidates every epoch computes (xfer.selection) and the peak
channel (xfer.prepare).

This module imports no torch: reading a config goes through it. `impl`, `value` and `members` are
either the object itself or a "module:attribute" reference, imported when first used (a model
is built, a candidate computed), so that a registration can stay as light as this module.

Loading. The registries are filled the first time one is read, in every process (a Ray trial's
worker included), from, in this order:
  - `xfer.builtin`, the built-in registrations;
  - the entry points of group `xfer.extensions` of installed packages, each naming a module, e.g.
    in a package's pyproject.toml: [project.entry-points."xfer.extensions"] mine = "mypkg.xfer_ext";
  - the modules named in the environment variable XFER_EXTENSIONS (comma-separated, importable:
    on PYTHONPATH). A local Ray cluster's trial processes inherit the variable from the driver;
    on a cluster started separately, set it (and PYTHONPATH) on every node, or install the
    extension as a package with an entry point.
A module registers by calling register_* when it is imported.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import XferError

ENTRY_POINT_GROUP = "xfer.extensions"
EXTENSIONS_ENV = "XFER_EXTENSIONS"
BUILTIN_MODULE = "xfer.builtin"

# What a selection objective may need of the test line: "test_peaks", its accessibility (unlabelled;
# the trainer computes the candidates only when a run adapts to it), "test_gex", its expression.
NEEDS = ("test_peaks", "test_gex")
# Objective settings that are not candidates: they choose one (xfer.selection.resolve).
META_OBJECTIVES = ("auto", "transfer")


# ----------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Param:
    """An encoder's own parameter. Its type is its default's; valid values satisfy every bound
    given (at_least <= v, above < v, v < below, v <= at_most). member: each member of a
    population has its own value (a scalar the encoder reads per member, `PeakEncoder.hp`);
    otherwise the members share it (a width: the population's shape). search: its entry in each
    built-in search space that has one (tune.space: "broad", "centred"), sampled only when its
    encoder is drawn. weighs: the encoder's loss parts (keys of its `objective`) it weights."""

    name: str
    default: bool | int | float | str
    at_least: float | None = None
    above: float | None = None
    below: float | None = None
    at_most: float | None = None
    member: bool = False
    search: Mapping[str, Any] = field(default_factory=dict)
    weighs: tuple[str, ...] = ()
    help: str = ""

    @property
    def type(self) -> type:
        return type(self.default)

    def problem(self, v) -> str | None:
        """Why v is out of range (the ConfigError message), or None."""
        ok = ((self.at_least is None or v >= self.at_least) and (self.above is None or v > self.above)
              and (self.below is None or v < self.below) and (self.at_most is None or v <= self.at_most))
        return None if ok else f"must be {self.valid()}, got {v}"

    def valid(self) -> str:
        low = f"[{self.at_least}" if self.at_least is not None else f"({self.above}" if self.above is not None else ""
        high = f"{self.below})" if self.below is not None else f"{self.at_most}]" if self.at_most is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("< " if high[-1] == ")" else "<= ") + high[:-1] if high else "any value"


@dataclass(frozen=True)
class EncoderSpec:
    """A peak encoder: `arch` name, its class (a xfer.model.encoders.PeakEncoder subclass, or
    "module:Class") and its own parameters, in the order they are sampled."""

    name: str
    impl: Any
    params: tuple[Param, ...] = ()

    def load(self) -> type:
        return _resolve(self.impl, f"encoder {self.name!r}")

    def member_params(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.member)


@dataclass(frozen=True)
class ObjectiveSpec:
    """A selection candidate (higher is better). needs: what of the test line it reads (NEEDS; a
    registered candidate needs at least "test_peaks": the trainer computes the candidates when a
    run adapts to a test line, and a run without one has source_val alone). value(x) -> float
    scores one member, x a
    xfer.selection.SelectionInputs; members(x) -> [P] scores every member of a population at once
    (x with a leading member axis; optional: without it, value runs member by member). Or, instead
    of functions, mean_of: the mean of these registered candidates (its needs are theirs)."""

    name: str
    needs: frozenset = frozenset({"test_peaks"})
    value: Any = None
    members: Any = None
    mean_of: tuple[str, ...] = ()

    def value_fn(self) -> Callable:
        return _resolve(self.value, f"objective {self.name!r}")

    def members_fn(self) -> Callable | None:
        return None if self.members is None else _resolve(self.members, f"objective {self.name!r}")


@dataclass(frozen=True)
class PeakReprSpec:
    """A peak representation: `peak_repr` name and its strategy class (a xfer.prepare.PeakRepr
    subclass, or "module:Class"). features=False: it gives the encoder no channel of its own (the
    coverage channel must be on)."""

    name: str
    impl: Any
    features: bool = True

    def load(self) -> type:
        return _resolve(self.impl, f"peak representation {self.name!r}")


def _resolve(ref, what: str):
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise XferError(f"{what}: cannot load {ref!r} ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- the registries

def _given_source_val(x):
    return x.source_val


_ENCODERS: dict[str, EncoderSpec] = {}
# source_val is the training line's own validation metric, which the trainer gives every run
# (xfer.training): the one candidate that needs nothing of the test line.
_OBJECTIVES: dict[str, ObjectiveSpec] = {
    "source_val": ObjectiveSpec("source_val", needs=frozenset(), value=_given_source_val, members=_given_source_val)}
_PEAK_REPRS: dict[str, PeakReprSpec] = {}
_RESERVED: set[str] = set()   # config keys an encoder parameter may not take (`reserve`)
_loading = {"started": False}


def register_encoder(spec: EncoderSpec, replace_existing: bool = False) -> EncoderSpec:
    """Register a peak encoder. A parameter name used by several encoders must be declared the same
    by each (e.g. dae's and vae's lambda_recon) and may not be a config key of its own."""
    _check_new(spec.name, _ENCODERS, "encoder", replace_existing)
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names):
        raise XferError(f"encoder {spec.name!r}: a parameter is declared twice ({', '.join(names)})")
    known = {p.name: p for name, s in _ENCODERS.items() if name != spec.name for p in s.params}
    for p in spec.params:
        if p.name in _RESERVED:
            raise XferError(f"encoder {spec.name!r}: parameter {p.name!r} is a config key of its own")
        if p.name in known and known[p.name] != p:
            raise XferError(f"encoder {spec.name!r}: parameter {p.name!r} is declared differently by another encoder")
    _ENCODERS[spec.name] = spec
    return spec


def register_objective(spec: ObjectiveSpec, replace_existing: bool = False) -> ObjectiveSpec:
    """Register a selection candidate (see ObjectiveSpec)."""
    if spec.name in META_OBJECTIVES:
        raise XferError(f"objective {spec.name!r}: a setting of its own ({', '.join(META_OBJECTIVES)})")
    _check_new(spec.name, _OBJECTIVES, "objective", replace_existing)
    if spec.mean_of:
        missing = [n for n in spec.mean_of if n not in _OBJECTIVES]
        if missing or spec.value is not None:
            raise XferError(f"objective {spec.name!r}: mean_of needs registered candidates and no function"
                            + (f" (not registered: {', '.join(missing)})" if missing else ""))
        spec = replace(spec, needs=frozenset().union(*(_OBJECTIVES[n].needs for n in spec.mean_of)))
    elif spec.value is None:
        raise XferError(f"objective {spec.name!r}: give its function (value) or mean_of")
    needs = frozenset(spec.needs)
    if not needs <= set(NEEDS) or "test_peaks" not in needs:
        raise XferError(f"objective {spec.name!r}: needs {sorted(needs)} must include 'test_peaks' (the trainer "
                        f"computes candidates when a run adapts to a test line) and lie in {', '.join(NEEDS)}")
    _OBJECTIVES[spec.name] = replace(spec, needs=needs)
    return _OBJECTIVES[spec.name]


def register_peak_repr(spec: PeakReprSpec, replace_existing: bool = False) -> PeakReprSpec:
    _check_new(spec.name, _PEAK_REPRS, "peak representation", replace_existing)
    _PEAK_REPRS[spec.name] = spec
    return spec


def _check_new(name: str, registry: dict, what: str, replace_existing: bool) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise XferError(f"{what} name {name!r}: must be an identifier")
    if name in registry and not replace_existing:
        raise XferError(f"{what} {name!r} is already registered")


def reserve(names) -> None:
    """Names encoder parameters may not take (xfer.config reserves its own keys when it is
    imported; encoders registered before that are checked here)."""
    _RESERVED.update(names)
    clash = sorted({p.name for spec in _ENCODERS.values() for p in spec.params} & _RESERVED)
    if clash:
        raise XferError(f"encoder parameter(s) {', '.join(clash)} clash with config keys")


# ----------------------------------------------------------------------------- reading

def load_extensions() -> None:
    """Fill the registries (once per process): the built-ins, then entry points, then XFER_EXTENSIONS."""
    if _loading["started"]:
        return
    _loading["started"] = True
    try:
        importlib.import_module(BUILTIN_MODULE)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _import(ep.value.partition(":")[0], f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}")
        for module in filter(None, (m.strip() for m in os.environ.get(EXTENSIONS_ENV, "").split(","))):
            _import(module, EXTENSIONS_ENV)
    except BaseException:
        _loading["started"] = False   # the next read reports the same problem
        raise


def _import(module: str, where: str) -> None:
    try:
        importlib.import_module(module)
    except XferError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a user's module is reported as one line
        raise XferError(f"{where}: cannot import extension module {module!r} ({type(e).__name__}: {e})") from e


def encoders() -> Mapping[str, EncoderSpec]:
    load_extensions()
    return dict(_ENCODERS)


def objectives() -> Mapping[str, ObjectiveSpec]:
    load_extensions()
    return dict(_OBJECTIVES)


def peak_reprs() -> Mapping[str, PeakReprSpec]:
    load_extensions()
    return dict(_PEAK_REPRS)


def encoder(name: str) -> EncoderSpec:
    return _lookup(encoders(), name, "encoder")


def objective(name: str) -> ObjectiveSpec:
    return _lookup(objectives(), name, "objective")


def peak_repr(name: str) -> PeakReprSpec:
    return _lookup(peak_reprs(), name, "peak representation")


def _lookup(registry: Mapping, name: str, what: str):
    if name not in registry:
        raise XferError(f"unknown {what} {name!r}; registered: {', '.join(registry)}")
    return registry[name]


def arch_params() -> dict[str, tuple[str, ...]]:
    """Each encoder's own parameter names, in its declared order."""
    return {name: tuple(p.name for p in spec.params) for name, spec in encoders().items()}


def all_params() -> dict[str, Param]:
    """Every encoder parameter once, in an order that keeps each encoder's own (a parameter is
    placed before the first of its encoder's later parameters already placed): the order a
    search space lists them in, so that a trial samples its encoder's parameters in its order."""
    order: list[str] = []
    by_name: dict[str, Param] = {}
    for spec in encoders().values():
        for i, p in enumerate(spec.params):
            if p.name in by_name:
                continue
            by_name[p.name] = p
            later = [order.index(q.name) for q in spec.params[i + 1:] if q.name in order]
            if later:
                order.insert(min(later), p.name)
            else:
                order.append(p.name)
    return {n: by_name[n] for n in order}


def param_owners(name: str) -> tuple[str, ...]:
    """The encoders that declare parameter `name`."""
    return tuple(a for a, ps in arch_params().items() if name in ps)


# ----------------------------------------------------------------------------- live views

class LiveNames(Sequence):
    """A tuple of names read from the registries each time it is used."""

    def __init__(self, read: Callable[[], Sequence[str]]):
        self._read = read

    def __getitem__(self, i):
        return tuple(self._read())[i]

    def __len__(self) -> int:
        return len(tuple(self._read()))

    def __iter__(self):
        return iter(tuple(self._read()))

    def __contains__(self, x) -> bool:
        return x in tuple(self._read())

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(tuple(self))


class LiveSet(Set):
    """A frozenset read from the registries each time it is used."""

    def __init__(self, read: Callable[[], Set]):
        self._read = read

    @classmethod
    def _from_iterable(cls, it):
        return frozenset(it)

    def __contains__(self, x) -> bool:
        return x in self._read()

    def __iter__(self):
        return iter(frozenset(self._read()))

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return repr(frozenset(self))


class LiveMapping(Mapping):
    """A mapping read from the registries each time it is used."""

    def __init__(self, read: Callable[[], Mapping]):
        self._read = read

    def __getitem__(self, k):
        return self._read()[k]

    def __iter__(self):
        return iter(dict(self._read()))

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return repr(dict(self._read()))


ARCHS = LiveNames(lambda: tuple(encoders()))
ARCH_PARAMS = LiveMapping(arch_params)
ALL_ARCH_PARAMS = LiveSet(lambda: frozenset(all_params()))
SELECTION_CANDIDATES = LiveNames(lambda: tuple(objectives()))
PEAK_REPRS = LiveNames(lambda: tuple(peak_reprs()))
