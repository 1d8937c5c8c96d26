"""GPU-only checks of the training loop (skipped without CUDA): the CUDA-graph step against
the eager step, on a small learnable problem."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xfer.config import TrainConfig
from xfer.prepare import LineInputs, TrainData
from xfer.training import fit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _data(n=1200, n_peaks=300, emb_dim=16, seed=0) -> TrainData:
    """Phases visible in both modalities: the class shifts some embedding dimensions and
    the accessibility of a block of peaks."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int8)
    emb = rng.normal(size=(n, emb_dim)).astype(np.float32)
    emb[:, :3] += 2.0 * np.eye(3, dtype=np.float32)[y]
    p = np.full((n, n_peaks), 0.1, np.float32)
    for c in range(3):
        p[y == c, c * 20:(c + 1) * 20] = 0.6
    peaks = sp.csr_matrix((rng.random((n, n_peaks)) < p).astype(np.float32))
    idx = rng.permutation(n)
    line = LineInputs(name="g", barcodes=np.array([f"c{i}" for i in range(n)], dtype=object),
                      emb=emb, peaks=peaks, labels=y)
    prior = (np.bincount(y, minlength=3) / n).astype(np.float32)
    return TrainData(line=line, train_idx=np.sort(idx[n // 5:]), val_idx=np.sort(idx[:n // 5]),
                     class_prior=prior, line_stats={}, preprocess={})


@pytest.mark.parametrize("adapt", [False, True, "pseudo"])
def test_cuda_graph_step_trains_like_eager(adapt):
    data = _data()
    if adapt:
        data = data.with_adaptation(_data(seed=1).line)
    # adapt=True: the adaptation domain alone (self-training off); "pseudo": with self-training
    cfg = TrainConfig.from_dict({"lambda_pseudo": 1.0 if adapt == "pseudo" else 0.0, "arch": "dae", "hidden_dim": 64,
                                 "latent_dim": 32, "batch_size": 128, "epochs": 12, "patience": 100,
                                 "peak_repr": "peaks", "bin_size": 0, "line_norm": False, "warmup_epochs": 3})
    graphed = fit(cfg, data, device="cuda")
    eager = fit(cfg.replace(cuda_graph=False), data, device="cuda")
    info = graphed.extra["cuda_graph"]
    assert info["captured"] and not info["failed"] and info["replays"] > 0, info
    assert eager.extra["cuda_graph"] is None
    for res in (graphed, eager):  # (a non-finite loss would have raised)
        losses = [h["loss/total"] for h in res.history]
        assert losses[-1] < losses[0]
        assert res.best_metric > 0.8  # the classes are easy: both paths must learn them
    # same parts logged, similar values (the random streams differ, the optimisation does not)
    g, e = graphed.history[-1], eager.history[-1]
    assert {k for k in g if k.startswith("loss/")} >= {k for k in e if k.startswith("loss/")}
    assert g["loss/class_source"] == pytest.approx(e["loss/class_source"], rel=0.5, abs=0.05)
    if adapt is True:  # no self-training: no pseudo-label term at all
        assert "loss/pseudo" not in g and "pseudo_labels" not in g and "loss/recon_adapt" in g
    if adapt == "pseudo":  # the pseudo-labels refreshed between replays reach the captured step
        assert g["pseudo_labels"] > 0 and g["loss/pseudo"] > 0
        assert g["loss/pseudo"] == pytest.approx(e["loss/pseudo"], rel=0.5, abs=0.05)


def test_a_population_trains_through_one_cuda_graph():
    """Eight members of one shape, their scalars different, through one captured step; a member
    stopped after its first epoch is replaced by a fresh configuration (the graph is captured
    again only where the step's operations change), and every member learns the easy classes."""
    from xfer.training import FINISHED, HALTED, fit_population

    data = _data().with_adaptation(_data(seed=1).line)
    base = TrainConfig.from_dict({"arch": "dae", "hidden_dim": 64, "latent_dim": 32, "batch_size": 128, "epochs": 10,
                                  "patience": 100, "peak_repr": "peaks", "bin_size": 0, "line_norm": False,
                                  "warmup_epochs": 2})
    rng = np.random.default_rng(0)
    cfgs = [base.replace(seed=i, lr=float(rng.uniform(3e-4, 1e-3)), lambda_domain=float(rng.uniform(0.1, 1)),
                         dropout=float(rng.uniform(0.2, 0.5)), warmup_epochs=int(rng.integers(1, 4)))
            for i in range(8)]
    queue = [base.replace(seed=99, dropout=0.0)]
    results = fit_population(cfgs, data, lambda m, metrics, ck: m == 3 and metrics["epoch"] == 1,
                             device="cuda", refill=lambda m: queue.pop(0) if queue else None)
    assert len(results) == 9 and results[3].status == HALTED
    info = results[0].extra["cuda_graph"]
    assert info["captured"] and not info["failed"] and info["replays"] > 0, info
    for r in results[:3] + results[4:]:
        assert r.status == FINISHED, (r.status, r.error)  # a member with a non-finite loss ends DIVERGED
        losses = [h["loss/total"] for h in r.history]
        assert losses[-1] < losses[0]
        assert r.best_metric > 0.8
