"""The data of the two lines: four roles, each a file, a stored dataset or an in-memory object.

Roles (the names of the original research code's flags):

    src       training line, expression         --src_csv / --src_label_csv
    tgt       training line, accessibility      --tgt_csv / --tgt_label_csv
    test      test line, expression             --test_csv / --test_label_csv
    sup_peak  test line, accessibility          --sup_peak_csv / --sup_peak_label_csv

Each role's matrix is a file (.csv/.tsv(.gz), .h5ad, .h5mu, 10x .h5), `store:NAME` (a
dataset ingested into the store `DataSources.store`), or an in-memory AnnData, MuData or
CellMatrix (the Python API). A MuData gives a GEX role its `rna` modality and a PEAK role its
`atac` modality (`gex_modality` / `peak_modality` name others). The pairs (src, tgt) and
(test, sup_peak) are the two modalities of the same cells (10x Multiome) and must share
barcodes. `DataSources` is built once, at the edge (the command line's flags:
`xfer.flags.sources_from_args`; the Python API: `xfer.Inputs`), and everything below reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError
from .dataset import CellMatrix
from .readers import attach_labels, read_labels, read_matrix
from .store import DEFAULT_STORE, CellStore

log = logging.getLogger(__name__)

STORE_PREFIX = "store:"


@dataclass(frozen=True)
class Role:
    name: str
    modality: str
    flag: str
    label_flag: str
    help: str


ROLES: dict[str, Role] = {
    r.name: r for r in (
        Role("src", "gex", "--src_csv", "--src_label_csv", "training line expression (GEX)"),
        Role("tgt", "peak", "--tgt_csv", "--tgt_label_csv", "training line accessibility (PEAK), paired with --src_csv"),
        Role("test", "gex", "--test_csv", "--test_label_csv", "test line expression (GEX); labels used only to score"),
        Role("sup_peak", "peak", "--sup_peak_csv", "--sup_peak_label_csv",
             "test line accessibility (PEAK), paired with --test_csv; labels used only to score"),
    )
}
PAIRS = (("src", "tgt"), ("test", "sup_peak"))


def default_store() -> str:
    return os.environ.get("XFER_STORE", DEFAULT_STORE)


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


@dataclass(frozen=True)
class DataSources:
    """Where each role's cells come from (None: not given), its labels CSV, and how to read them
    (the Python API's `xfer.Inputs`).

        >>> inputs = xfer.Inputs(src="REH_GEX.csv", tgt="REH_PEAK.csv", src_labels="REH_labels.csv",
        ...                      sup_peak=mdata_sup)                   # doctest: +SKIP
        >>> inputs.load()["tgt"].n_cells                               # doctest: +SKIP
        7432
    """

    src: object = None
    tgt: object = None
    test: object = None
    sup_peak: object = None
    src_labels: str | None = None
    tgt_labels: str | None = None
    test_labels: str | None = None
    sup_peak_labels: str | None = None
    store: str = dataclasses.field(default_factory=default_store)
    label_column: str | None = None
    orient: str = "auto"
    gex_modality: str | None = None
    peak_modality: str | None = None

    def given(self) -> list[str]:
        """The roles given, in ROLES order."""
        return [r for r in ROLES if getattr(self, r) is not None]

    def matrix(self, role: str):
        return getattr(self, role)

    def labels(self, role: str) -> str | None:
        return getattr(self, f"{role}_labels")

    def from_store(self, role: str) -> str | None:
        """The dataset name when the role is `store:NAME`, else None."""
        m = getattr(self, role)
        return m[len(STORE_PREFIX):] if isinstance(m, str) and m.startswith(STORE_PREFIX) else None

    def in_memory(self) -> list[str]:
        """The roles given as objects rather than a file or store:NAME."""
        return [r for r in self.given() if not _is_path(getattr(self, r))]

    def replace(self, **kw) -> "DataSources":
        return dataclasses.replace(self, **kw)

    def only(self, roles) -> "DataSources":
        """These sources with every other role (and its labels) left out."""
        return self.replace(**{k: None for r in ROLES if r not in roles for k in (r, f"{r}_labels")})

    # --- as saved in sweep.json and shown in messages: the command line's flag names

    def to_dict(self) -> dict:
        """JSON-ready, keyed by the flags' destinations (src_csv, src_label_csv, ...); files and
        store datasets only (`persist` first stores in-memory roles)."""
        if self.in_memory():
            raise ConfigError(self.in_memory()[0], "an in-memory object cannot be saved; store it first "
                              "(DataSources.persist)")
        d = {}
        for r in ROLES:
            d[f"{r}_csv"] = None if getattr(self, r) is None else str(getattr(self, r))
            d[f"{r}_label_csv"] = self.labels(r)
        return {**d, "label_column": self.label_column, "orient": self.orient, "store": self.store,
                "gex_modality": self.gex_modality, "peak_modality": self.peak_modality}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSources":
        kw = {}
        for r in ROLES:
            kw[r], kw[f"{r}_labels"] = d.get(f"{r}_csv"), d.get(f"{r}_label_csv")
        for k in ("label_column", "gex_modality", "peak_modality"):
            kw[k] = d.get(k)
        return cls(**kw, orient=d.get("orient") or "auto", store=d.get("store") or default_store())

    def flags(self) -> list[str]:
        """These sources as command-line flags (for the commands that messages suggest)."""
        out = []
        for r, spec in ROLES.items():
            m = getattr(self, r)
            if m is not None:
                out += [spec.flag, str(m) if _is_path(m) else f"<{type(m).__name__}>"]
            if self.labels(r):
                out += [spec.label_flag, str(self.labels(r))]
        for k in ("label_column", "gex_modality", "peak_modality", "store"):
            if getattr(self, k):
                out += [f"--{k}", str(getattr(self, k))]
        return out

    # --- reading

    def load(self, roles: list[str] | None = None, *, require: tuple[str, ...] = ()) -> dict[str, CellMatrix]:
        """The given roles (default: all given), validated and paired."""
        return load_inputs(self, roles, require=require)

    def persist(self, labelled: bool = True) -> "DataSources":
        """These sources with every in-memory role written to the store as `store:<role>_<hash>`
        (content-addressed: the same cells give the same name), so that they can be saved and read
        by other processes (a sweep's trials)."""
        todo = self.in_memory()
        if not todo:
            return self
        store = CellStore(self.store)
        new = {}
        for r in todo:
            ds = load_role(self, r)
            if not labelled:
                ds = ds.without_labels()
            name = f"{r}_{ds.content_hash()[:12]}"
            if name not in store.names():
                store.write(ds, name)
            new[r], new[f"{r}_labels"] = STORE_PREFIX + name, None
        return self.replace(**new)


def _mod_name(sources: DataSources, modality: str) -> str | None:
    return sources.gex_modality if modality == "gex" else sources.peak_modality


def load_role(sources: DataSources, role: str, store: CellStore | None = None) -> CellMatrix:
    """Read one role's matrix (+ labels) from a file, the store or an in-memory object."""
    spec = ROLES[role]
    given, label_path = getattr(sources, role), sources.labels(role)
    if not _is_path(given):
        ds = _from_object(given, role, sources)
    elif str(given).startswith(STORE_PREFIX):
        store = store or CellStore(sources.store)
        ds = store.read(str(given)[len(STORE_PREFIX):])
        if ds.modality != spec.modality:
            raise InputError(given, spec.flag, f"store dataset is {ds.modality}, but {spec.flag} expects "
                             f"{spec.modality}")
    else:
        return read_matrix(str(given), modality=spec.modality, label_path=label_path, label_column=sources.label_column,
                           orient=sources.orient, mod_name=_mod_name(sources, spec.modality))
    if label_path:
        ds = attach_labels(ds.without_labels(), *read_labels(label_path, sources.label_column), label_path)
    return ds


def _from_object(obj, role: str, sources: DataSources) -> CellMatrix:
    """An in-memory AnnData, MuData or CellMatrix as a role's CellMatrix (named by its content)."""
    from .readers import _check_modality, matrix_from_anndata, matrix_from_mudata

    spec = ROLES[role]
    kind = type(obj).__module__.split(".")[0]
    source = f"<{type(obj).__name__} given as {role}>"
    if isinstance(obj, CellMatrix):
        if obj.modality != spec.modality:
            raise InputError(source, "modality", f"is {obj.modality}, but {role} expects {spec.modality}")
        return obj
    if kind == "mudata":
        ds = matrix_from_mudata(obj, modality=spec.modality, mod_name=_mod_name(sources, spec.modality),
                                source=source, name=role, label_column=sources.label_column)
    elif kind == "anndata":
        ds = matrix_from_anndata(obj, modality=spec.modality, source=source, name=role,
                                 label_column=sources.label_column)
    else:
        raise ConfigError(role, f"expects a file path, store:NAME, an AnnData, a MuData or a CellMatrix; got a "
                          f"{type(obj).__name__}")
    _check_modality(ds)
    return ds


def pair_cells(gex: CellMatrix, peak: CellMatrix) -> tuple[CellMatrix, CellMatrix]:
    """Restrict a GEX/PEAK pair to their shared barcodes, in GEX order; merge labels.

    No shared barcode is an error; a partial overlap is logged with counts.
    """
    pos = {b: i for i, b in enumerate(peak.barcodes)}
    gi = np.array([i for i, b in enumerate(gex.barcodes) if b in pos], dtype=np.int64)
    if len(gi) == 0:
        raise InputError(peak.source, "barcode",
                         f"shares no barcode with the paired expression matrix {gex.source} "
                         f"(e.g. '{gex.barcodes[0]}' vs '{peak.barcodes[0]}'); GEX and PEAK must be the same cells")
    pi = np.array([pos[b] for b in gex.barcodes[gi]], dtype=np.int64)
    if len(gi) < gex.n_cells or len(pi) < peak.n_cells:
        log.warning("%s and %s share %d cells (%d GEX-only, %d PEAK-only dropped)", gex.source, peak.source,
                    len(gi), gex.n_cells - len(gi), peak.n_cells - len(pi))
    g, p = gex.subset_cells(gi), peak.subset_cells(pi)
    if g.labels is not None and p.labels is not None:
        both = (g.labels >= 0) & (p.labels >= 0)
        clash = np.flatnonzero(both & (g.labels != p.labels))
        if len(clash):
            raise InputError(peak.source, "phase", f"{len(clash)} paired cells have different phase labels in the "
                             f"GEX and PEAK inputs (e.g. '{g.barcodes[clash[0]]}')")
        merged = np.where(g.labels >= 0, g.labels, p.labels).astype(np.int8)
        g, p = g.with_labels(merged), p.with_labels(merged)
    elif g.labels is not None:
        p = p.with_labels(g.labels)
    elif p.labels is not None:
        g = g.with_labels(p.labels)
    return g, p


def load_inputs(sources: DataSources, roles: list[str] | None = None, *,
                require: tuple[str, ...] = ()) -> dict[str, CellMatrix]:
    """Load the given roles (default: every role given), validated and paired."""
    roles = roles or sources.given()
    for r in require:
        if getattr(sources, r) is None:
            raise InputError(ROLES[r].flag, None, f"is required here ({ROLES[r].help})")
    store = CellStore(sources.store) if any(sources.from_store(r) for r in roles) else None
    data = {r: load_role(sources, r, store) for r in roles}
    for a, b in PAIRS:
        if a in data and b in data:
            data[a], data[b] = pair_cells(data[a], data[b])
    return data


def cells_to_predict(data=None, *, peaks=None, gex=None, gex_modality: str | None = None,
                     peak_modality: str | None = None) -> tuple[dict[str, CellMatrix], list | None]:
    """The cells a predictor labels (`Predictor.predict`) as the test line's roles ("sup_peak" for
    accessibility, "test" for expression), paired when both are given; and the in-memory objects
    that `inplace=True` writes onto (None when the cells came from files)."""
    if data is not None and (peaks is not None or gex is not None):
        raise ValueError("predict: give the cells either as one object or as peaks= / gex=, not both")
    kw = {"gex_modality": gex_modality, "peak_modality": peak_modality}
    if data is None:
        if peaks is None and gex is None:
            raise ValueError("predict: give the cells to label (an AnnData or MuData, or peaks= / gex=)")
        sources = DataSources(test=gex, sup_peak=peaks, **kw)
        targets = [o for o in (peaks, gex) if o is not None and not _is_path(o)] or None
        return sources.load(), targets
    kind = type(data).__module__.split(".")[0]
    if kind == "mudata":
        mods = {"test": gex_modality or "rna", "sup_peak": peak_modality or "atac"}
        have = {r: m for r, m in mods.items() if m in data.mod}
        if not have:
            raise InputError("<MuData>", "mod", f"has neither an '{mods['sup_peak']}' nor an '{mods['test']}' "
                             f"modality (it has: {', '.join(data.mod)}); name one with peak_modality= / gex_modality=")
        sources = DataSources(**{r: data for r in have}, **kw)
        return sources.load(), [data.mod[have.get("sup_peak", have.get("test"))], data]
    if kind == "anndata":
        from .readers import looks_like_peak

        names = [str(v) for v in data.var_names[:500]]
        role = "sup_peak" if names and sum(map(looks_like_peak, names)) / len(names) > 0.5 else "test"
        return DataSources(**{role: data}, **kw).load(), [data]
    raise ValueError(f"predict: expected an AnnData or a MuData, got a {type(data).__name__}")
