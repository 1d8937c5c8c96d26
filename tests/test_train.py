"""The one training loop: report cadence, reproducibility, resume, checkpoints, early stopping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from xfer.config import DIVERGENCES
from xfer.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from xfer.predict import predict_probs
from xfer.training import fit


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reports_once_per_epoch_with_named_metrics(tiny_train):
    cfg, data, _, _ = tiny_train
    seen = []
    res = fit(cfg, data, lambda m, ck: seen.append((m, ck, ck() if m["epoch"] == 1 else None)))
    assert [m["epoch"] for m, _, _ in seen] == [1, 2, 3]
    m = seen[-1][0]
    for key in ("objective", "peak_val_balanced_accuracy", "peak_val_accuracy", "peak_val_macro_f1",
                "gex_val_balanced_accuracy", "loss/total", "loss/class_source", "loss/class_target",
                "loss/adversarial", "loss/divergence", "loss/recon"):
        assert key in m, key
    assert m["objective"] == m["peak_val_balanced_accuracy"]
    ck = seen[0][2]  # the lazy checkpoint of epoch 1, built during its report
    assert ck["epoch"] == 1 and ck["format"] == FORMAT
    with pytest.raises(RuntimeError, match="requested after epoch 3"):
        seen[0][1]()  # built later it would hold another epoch's weights: refused
    # the best epoch is chosen once the warm-up (1 epoch here) is over
    assert res.best_metric == max(m["objective"] for m, _, _ in seen if m["warmup"] >= 1)
    assert res.best_epoch >= 2 and seen[0][0]["best_epoch"] == 0 and seen[0][0]["best_objective"] is None


def test_reproducible_on_cpu(tiny_train):
    cfg, data, _, _ = tiny_train
    a, b = fit(cfg, data), fit(cfg, data)
    assert _same_state(a.checkpoint["model"], b.checkpoint["model"])
    assert [h["loss/total"] for h in a.history] == [h["loss/total"] for h in b.history]
    c = fit(cfg.replace(seed=1), data)
    assert not _same_state(a.checkpoint["model"], c.checkpoint["model"])


def test_resume_continues_exactly(tiny_train):
    cfg, data, _, _ = tiny_train
    cfg = cfg.replace(epochs=4, patience=10)
    ckpts = {}
    full = fit(cfg, data, lambda m, ck: ckpts.__setitem__(m["epoch"], ck()))
    resumed = fit(cfg, data, resume=ckpts[2])
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert _same_state(full.checkpoint["model"], resumed.checkpoint["model"])
    assert resumed.best_epoch == full.best_epoch


def test_early_stopping_counts_epochs(tiny_train):
    cfg, data, _, _ = tiny_train
    # nothing can improve after epoch 2, the first after the 1-epoch warm-up (epoch 1 is never chosen)
    res = fit(cfg.replace(lr=1e-12, epochs=20, patience=2), data)
    assert res.stopped_early and len(res.history) == 4 and res.best_epoch == 2
    assert res.history[-1]["stopped_early"]


def test_a_run_shorter_than_the_warmup_keeps_its_last_epoch(tiny_train):
    cfg, data, _, _ = tiny_train
    res = fit(cfg.replace(epochs=2, warmup_epochs=5), data)
    assert res.best_epoch == 2 and [h["best_epoch"] for h in res.history] == [0, 2]


def test_self_training_uses_class_balanced_pseudo_labels_after_warmup(tiny_train):
    cfg, data, _, test = tiny_train
    cfg = cfg.replace(lambda_pseudo=1.0, pseudo_fraction=0.5, warmup_epochs=2, epochs=4, patience=10)
    res = fit(cfg, data.with_adaptation(test))
    h = res.history
    assert h[0]["loss/pseudo"] == 0 and "pseudo_labels" not in h[0]  # none before the warm-up ends
    n_b = test.peaks.shape[0]
    for e in h[2:]:  # refreshed every epoch once warm: about half of the line, per class
        assert 0.5 * n_b <= e["pseudo_labels"] <= 0.5 * n_b + 3 and e["loss/pseudo"] > 0
    # resuming mid-run rebuilds the pseudo-labels from the restored weights: the same run
    ckpts = {}
    full = fit(cfg, data.with_adaptation(test), lambda m, ck: ckpts.__setitem__(m["epoch"], ck()))
    resumed = fit(cfg, data.with_adaptation(test), resume=ckpts[3])
    assert _same_state(full.checkpoint["model"], resumed.checkpoint["model"])
    assert [e["pseudo_labels"] for e in resumed.history[2:]] == [e["pseudo_labels"] for e in h[2:]]
    # without an adaptation line there is nothing to pseudo-label: the term is absent
    assert "loss/pseudo" not in fit(cfg.replace(epochs=1), data).history[0]


ENCODER_PARTS = {"vae": {"loss/recon", "loss/kl"}, "contrastive": {"loss/contrastive"}, "hybrid": set()}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("arch", sorted(ENCODER_PARTS))
def test_every_arch_and_divergence_trains(tiny_train, arch, divergence):
    """Each encoder with each divergence: its own loss parts are recorded (and no other encoder's),
    the divergence term is computed, and four epochs lower the classification loss and lift the
    expression head's validation balanced accuracy well above chance (1/3)."""
    cfg, data, _, _ = tiny_train
    res = fit(cfg.replace(arch=arch, divergence=divergence, epochs=4, lr=3e-3, patience=10), data)
    first, last = res.history[0], res.history[-1]
    encoder_parts = set().union(*ENCODER_PARTS.values())
    assert {k for k in last if k in encoder_parts} == ENCODER_PARTS[arch]
    assert last["loss/divergence"] > 0
    assert last["loss/class_source"] < first["loss/class_source"]
    assert last["gex_val_balanced_accuracy"] > 0.6


def test_training_learns_the_tiny_pair(tiny_train):
    """The default encoder on the tiny pair: both classification losses fall, and both heads
    predict the validation cells' phases clearly better than chance (balanced accuracy 1/3)."""
    cfg, data, _, _ = tiny_train
    res = fit(cfg.replace(epochs=8, lr=3e-3, patience=10), data)
    first, last = res.history[0], res.history[-1]
    assert last["loss/class_source"] < 0.85 * first["loss/class_source"]
    assert last["loss/class_target"] < first["loss/class_target"]
    assert last["gex_val_balanced_accuracy"] > 0.8
    assert res.best_metric == max(h["peak_val_balanced_accuracy"] for h in res.history[1:]) > 0.45


def test_a_non_finite_loss_stops_training_with_a_clear_error(tiny_train):
    """Expression embeddings with a NaN make the losses NaN in the first epoch: `fit` raises one
    line naming the epoch and the non-finite parts instead of training on."""
    from xfer.errors import XferError

    cfg, data, _, _ = tiny_train
    emb = data.line.emb.copy()
    emb[data.train_idx[0], 0] = np.nan
    bad = dataclasses.replace(data, line=dataclasses.replace(data.line, emb=emb))
    seen = []
    with pytest.raises(XferError, match=r"training diverged at epoch 1 \(non-finite loss: .*'loss/class_source': nan") as e:
        fit(cfg, bad, lambda m, ck: seen.append(m))
    assert seen == [] and "\n" not in str(e.value)


def test_checkpoint_rebuilds_model(tmp_path, tiny_train):
    cfg, data, _, test = tiny_train
    res = fit(cfg, data)
    save_checkpoint(res.checkpoint, tmp_path / "best_model.pt")
    model, cfg2, ck = load_checkpoint(tmp_path / "best_model.pt")  # weights_only=True inside
    assert cfg2 == cfg and ck["epoch"] == res.best_epoch
    st = test.stats_tensors("cpu")
    a = predict_probs(res.model, test.emb, test.peaks, stats=st)
    b = predict_probs(model, test.emb, test.peaks, stats=st)
    np.testing.assert_allclose(a["peak"], b["peak"], rtol=1e-5, atol=1e-6)
    assert ck["preprocess"]["peaks"]["peak_names"][:3] == list(data.preprocess["peaks"]["peak_names"][:3])


def test_checkpoint_rejects_foreign_pickle(tmp_path):
    import pickle
    from xfer.errors import StoreError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(StoreError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def _ddp_rank(rank, world, port, data, cfg, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = fit(cfg, data)
        torch.save(res.checkpoint["model"], out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_stay_identical(tmp_path, tiny_train):
    """With a process group up (as in Ray Train workers) each rank trains on its shard
    and the all-reduced updates keep the replicas identical."""
    import socket
    import torch.multiprocessing as tmp
    cfg, data, _, _ = tiny_train
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_ddp_rank, args=(2, port, data, cfg.replace(epochs=2), tmp_path), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert _same_state(a, b)
    single = fit(cfg.replace(epochs=2), data).checkpoint["model"]
    assert not _same_state(a, single)  # the shards did change what was learnt
