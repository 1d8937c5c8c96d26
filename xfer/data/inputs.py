"""The data flags every `xfer` subcommand shares, and loading the four roles.

Roles (the seed's names):

    src       training line, expression         --src_csv / --src_label_csv
    tgt       training line, accessibility      --tgt_csv / --tgt_label_csv
    test      test line, expression             --test_csv / --test_label_csv
    sup_peak  test line, accessibility          --sup_peak_csv / --sup_peak_label_csv

Each matrix flag takes a file (.csv/.tsv(.gz), .h5ad, 10x .h5) or
`store:NAME`, a dataset ingested into the store given by --store. The pairs
(src, tgt) and (test, sup_peak) are the two modalities of the same cells
(10x Multiome) and must share barcodes.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .dataset import CellMatrix
from .readers import ORIENTATIONS, read_labels, read_matrix, attach_labels
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


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=default_store(), metavar="PATH_OR_URI",
                        help="cell + embedding store root: a directory or a URI (file://, s3://); "
                             "default $XFER_STORE or ./xfer_store")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared data flags (seed spellings) plus --store, --orient, --label_column."""
    g = parser.add_argument_group("data (a file: .csv/.tsv[.gz], .h5ad, 10x .h5; or store:NAME)")
    for role in ROLES.values():
        g.add_argument(role.flag, dest=f"{role.name}_csv", metavar="FILE|store:NAME", help=role.help)
        g.add_argument(role.label_flag, dest=f"{role.name}_label_csv", metavar="CSV",
                       help="labels CSV (barcode + phase columns); optional when the matrix has a phase column")
    g.add_argument("--label_column", default=None, help="name of the phase column (default: phase/label/...)")
    g.add_argument("--orient", choices=ORIENTATIONS, default="auto",
                   help="CSV orientation: cells as rows (seed layout) or features as rows (default: detect)")
    add_store_argument(parser)


def given_roles(args) -> list[str]:
    return [r for r in ROLES if getattr(args, f"{r}_csv", None)]


def load_role(args, role: str, store: CellStore | None = None) -> CellMatrix:
    """Read one role's matrix (+ labels) from a file or the store."""
    spec = ROLES[role]
    path = getattr(args, f"{role}_csv")
    label_path = getattr(args, f"{role}_label_csv", None)
    if path.startswith(STORE_PREFIX):
        store = store or CellStore(args.store)
        ds = store.read(path[len(STORE_PREFIX):])
        if ds.modality != spec.modality:
            raise InputError(path, spec.flag, f"store dataset is {ds.modality}, but {spec.flag} expects {spec.modality}")
        if label_path:
            ds = attach_labels(ds.without_labels(), *read_labels(label_path, args.label_column), label_path)
        return ds
    return read_matrix(path, modality=spec.modality, label_path=label_path,
                       label_column=getattr(args, "label_column", None), orient=getattr(args, "orient", "auto"))


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


def load_inputs(args, roles: list[str] | None = None, *, require: tuple[str, ...] = ()) -> dict[str, CellMatrix]:
    """Load the given roles (default: every flag that was set), validated and paired."""
    roles = roles or given_roles(args)
    for r in require:
        if not getattr(args, f"{r}_csv", None):
            raise InputError(ROLES[r].flag, None, f"is required here ({ROLES[r].help})")
    store = CellStore(args.store) if any(str(getattr(args, f"{r}_csv")).startswith(STORE_PREFIX) for r in roles) else None
    data = {r: load_role(args, r, store) for r in roles}
    for a, b in PAIRS:
        if a in data and b in data:
            data[a], data[b] = pair_cells(data[a], data[b])
    return data
