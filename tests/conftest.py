"""Shared fixtures: small hand-built datasets and files in temporary directories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from xfer.data.dataset import make_matrix

BARCODES = [f"AAACGT{''.join('ACGT'[(i >> (2 * k)) & 3] for k in range(6))}CA-1" for i in range(12)]
GENES = ["MCM5", "PCNA", "TOP2A", "MKI67", "GAPDH", "ACTB"]
PEAKS = ["chr1:100-600", "chr1:1000-1500", "chr2:50-400", "chr2:900-1300", "chrX:10-300"]
PHASES_OF = ["G1", "S", "G2M", "G1"] * 3


def _counts(n, m, seed, density=0.4):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n, m)) * (rng.random((n, m)) < density)
    X[:, 0] += 1  # no all-zero rows
    return X.astype(np.float32)


@pytest.fixture
def gex_ds():
    X = _counts(len(BARCODES), len(GENES), 0)
    from xfer.phases import encode_phases
    return make_matrix(X, BARCODES, GENES, encode_phases(PHASES_OF, "t", "phase"), modality="gex", name="gex")


@pytest.fixture
def peak_ds():
    X = _counts(len(BARCODES), len(PEAKS), 1)
    from xfer.phases import encode_phases
    return make_matrix(X, BARCODES, PEAKS, encode_phases(PHASES_OF, "t", "phase"), modality="peak", name="peak")


def write_csv(path, barcodes, features, X, phase=None, index_name="barcode"):
    df = pd.DataFrame(np.asarray(X), index=pd.Index(barcodes, name=index_name), columns=features)
    if phase is not None:
        df["phase"] = phase
    df.to_csv(path)
    return path


def write_labels(path, barcodes, phases, cols=("barcode", "phase")):
    pd.DataFrame({cols[0]: barcodes, cols[1]: phases}).to_csv(path, index=False)
    return path


@pytest.fixture
def seed_files(tmp_path):
    """The seed layout for one paired line: GEX/PEAK CSVs and a labels CSV."""
    gx = _counts(len(BARCODES), len(GENES), 0)
    pk = _counts(len(BARCODES), len(PEAKS), 1)
    return {
        "gex": write_csv(tmp_path / "L_GEX.csv", BARCODES, GENES, gx),
        "peak": write_csv(tmp_path / "L_PEAK.csv", BARCODES, PEAKS, pk),
        "labels": write_labels(tmp_path / "L_labels.csv", BARCODES, PHASES_OF),
        "X_gex": gx, "X_peak": pk, "dir": tmp_path,
    }
