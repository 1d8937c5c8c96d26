"""The one fixed class order, and normalisation of phase names.

Every array of labels in the project holds int8 codes into PHASES
(G1=0, S=1, G2M=2); -1 marks a cell without a label.
"""

from __future__ import annotations

import re
from importlib import resources

import numpy as np

from .errors import InputError

PHASES: tuple[str, ...] = ("G1", "S", "G2M")
N_PHASES = len(PHASES)
UNLABELLED = -1

# The Tirosh et al. (2016) cell-cycle markers shipped in xfer/resources: the S genes
# first, then the G2/M genes, one symbol a line.
TIROSH_FILE = "resources/tirosh2016_cell_cycle_genes.txt"
N_TIROSH_S, N_TIROSH_G2M = 43, 54
N_TIROSH = N_TIROSH_S + N_TIROSH_G2M

# Canonical spellings after lower-casing and dropping separators (space / - _ . ,).
_ALIASES = {
    "g1": "G1",
    "g0g1": "G1",
    "g1g0": "G1",
    "s": "S",
    "sphase": "S",
    "g2m": "G2M",
    "g2andm": "G2M",
    "g2": None,  # refused: ambiguous on its own (G2 or G2/M?) - see message
}
_SEP = re.compile(r"[\s/\-_.,]+")
ACCEPTED = "G1 (also G0/G1), S, G2M (also G2/M, G2-M, g2m)"


def canonical_phase(value) -> str | None:
    """Return 'G1' / 'S' / 'G2M' for an accepted spelling, else None."""
    if value is None:
        return None
    key = _SEP.sub("", str(value).strip().lower())
    if key.endswith("phase") and key != "sphase":
        key = key[: -len("phase")]
    return _ALIASES.get(key)


def encode_phases(values, path, field: str) -> np.ndarray:
    """Phase names -> int8 codes into PHASES; unknown names are an InputError.

    The error lists every distinct unknown value (up to 10) with its count.
    """
    values = np.asarray(values, dtype=object)
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    canon = [canonical_phase(u) for u in uniq]
    bad = [(u, int((inverse == i).sum())) for i, (u, c) in enumerate(zip(uniq, canon)) if c is None]
    if bad:
        shown = ", ".join(f"'{u}' ({n} cells)" for u, n in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InputError(path, field, f"unknown phase name(s) {shown}{more}; accepted: {ACCEPTED}")
    lut = np.array([PHASES.index(c) for c in canon], dtype=np.int8)
    return lut[inverse].astype(np.int8)


def decode_phases(codes) -> np.ndarray:
    """int8 codes -> phase names ('' for unlabelled)."""
    codes = np.asarray(codes)
    names = np.array(list(PHASES) + [""], dtype=object)
    return names[np.where(codes < 0, N_PHASES, codes)]


def tirosh_genes() -> tuple[list[str], list[str]]:
    """The Tirosh et al. (2016) cell-cycle markers: (43 S genes, 54 G2/M genes).

    The one reader of the shipped list (the simulator plants these genes; the
    marker-score baseline scores them)."""
    text = resources.files("xfer").joinpath(TIROSH_FILE).read_text()
    genes = [g.strip() for g in text.splitlines() if g.strip()]
    if len(genes) != N_TIROSH:
        raise RuntimeError(f"expected {N_TIROSH} Tirosh genes in xfer/{TIROSH_FILE}, found {len(genes)}")
    return genes[:N_TIROSH_S], genes[N_TIROSH_S:]
