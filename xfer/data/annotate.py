"""Predicted phases written onto AnnData / MuData objects and labelled copies of input files.

`annotate` adds, for every cell of an AnnData (or a MuData's own obs):
- obs['<prefix>_phase']: categorical over PHASES (G1, S, G2M);
- obs['<prefix>_prob_<phase>']: the predicted probability of each phase.
Cells without a prediction (e.g. dropped by pairing, or in another modality only) get a
missing phase and NaN probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..phases import N_PHASES, PHASES
from .fs import atomic_path
from .readers import DEFAULT_MODALITIES, file_format, get_modality, load_anndata, load_mudata


def annotate(adata, barcodes, probs, prefix: str = "xfer") -> None:
    """Write obs['<prefix>_phase'] and obs['<prefix>_prob_<phase>'] onto `adata` in place.

    `barcodes` (n) and `probs` (n x 3, columns in PHASES order) are the predictions; each
    cell of `adata` is matched by its obs name. Works on anything with `obs`, `obs_names`
    and `n_obs` (an AnnData, or a MuData's own obs).

    >>> annotate(adata, predictions.index, predictions[["prob_G1", "prob_S", "prob_G2M"]].to_numpy())
    >>> adata.obs["xfer_phase"].value_counts()
    """
    barcodes = np.asarray(barcodes).astype(str)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(barcodes), N_PHASES):
        raise ValueError(f"probs must be {len(barcodes)} x {N_PHASES} (one row per barcode, columns "
                         f"{', '.join(PHASES)}), got {probs.shape}")
    pos = pd.Index(barcodes).get_indexer(np.asarray(adata.obs_names).astype(str))
    has = pos >= 0
    phase = np.full(adata.n_obs, None, dtype=object)
    phase[has] = np.asarray(PHASES, dtype=object)[probs.argmax(1)[pos[has]]]
    adata.obs[f"{prefix}_phase"] = pd.Categorical(phase, categories=list(PHASES))
    for i, p in enumerate(PHASES):
        col = np.full(adata.n_obs, np.nan)
        col[has] = probs[pos[has], i]
        adata.obs[f"{prefix}_prob_{p}"] = col


def write_labelled_copy(source_path, barcodes, probs, target, mod_name: str | None = None) -> Path:
    """A copy of an input .h5ad or .h5mu at `target`, with the predictions (see `annotate`).

    An .h5ad gets them on its obs. An .h5mu gets them on the modality `mod_name` (the one
    predicted from; default DEFAULT_MODALITIES["peak"], "atac") and on the MuData's own obs.
    Written atomically: `target` is the whole new file or untouched. Returns `target`.
    """
    source_path, target = str(source_path), Path(target)
    fmt = file_format(source_path)
    if fmt == "h5ad":
        adata = load_anndata(source_path)
        annotate(adata, barcodes, probs)
        with atomic_path(target) as tmp:
            adata.write_h5ad(tmp)
        return target
    if fmt != "h5mu":
        raise InputError(source_path, None, "a labelled copy is written for .h5ad and .h5mu inputs only")
    import mudata as md

    mdata = load_mudata(source_path)
    mod_name = mod_name or DEFAULT_MODALITIES["peak"]
    annotate(get_modality(mdata, "peak", mod_name, source_path), barcodes, probs)
    annotate(mdata, barcodes, probs)
    with md.set_options(pull_on_update=False), atomic_path(target) as tmp:
        mdata.write(tmp)
    return target
