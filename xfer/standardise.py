"""Per-line standardisation: the one place that computes feature means and standard
deviations of a cell line and divides by them.

Each cell line's inputs are standardised with that line's own statistics (label-free),
which removes line-level baseline shifts. Standard deviations are floored at 1 % of the
median non-zero standard deviation (and at 1e-6), so a near-constant feature is not blown
up into noise; a constant feature becomes 0.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def mean_std(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and floored standard deviation (float32) of a dense or sparse matrix;
    accumulated in float64."""
    if sp.issparse(X):
        mean = np.asarray(X.mean(axis=0, dtype=np.float64)).ravel()
        sq = np.asarray(X.multiply(X).mean(axis=0, dtype=np.float64)).ravel()
        std = np.sqrt(np.maximum(sq - mean ** 2, 0))
    else:
        X = np.asarray(X)
        mean, std = X.mean(axis=0, dtype=np.float64), X.std(axis=0, dtype=np.float64)
    floor = max(float(np.median(std[std > 0])) * 1e-2, 1e-6) if (std > 0).any() else 1.0
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def standardise(Z: np.ndarray) -> np.ndarray:
    """Z standardised column-wise with its own statistics (`mean_std`)."""
    mean, std = mean_std(Z)
    return (np.asarray(Z) - mean) / std
