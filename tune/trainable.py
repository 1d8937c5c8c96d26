"""What one trial runs: xfer's one training loop, reporting to Ray every epoch.

Two ways to run a trial, both around the same `_run` body:

- `function_trial` (the fast path, default): the loop runs inside the Tune
  trial's own process (an actor Tune reuses across trials), with the trial's
  CPU and GPU share. Start-up is a fraction of a second.
- `trainer_trial`: the Tune function builds a Ray Train `TorchTrainer` with
  `num_workers` workers (data parallel: each rank takes its shard of every
  batch, gradients are all-reduced) and forwards its reports to Tune through
  `TuneReportCallback`. The Train run is named `train-<trial id>`, so a
  restored trial resumes from its own Train checkpoint. Costs ~20 s of
  start-up per trial on 2 cores; use it when a trial needs several workers.

Every report carries `epoch` (ASHA's time attribute and Optuna's step: Tune's
iteration counter restarts after a restore), `timesteps_total` = epoch (the
TensorBoard step), `objective` (the sweep's `--objective`, see xfer.selection)
and every selection candidate as `sel/<name>`, and `node_id`, the Ray node the epoch ran on
(rank 0's node for TorchTrainer trials): a trial restored elsewhere after a node died
shows both.
A checkpoint (`checkpoint.pt`, loaded with weights_only=True) is written
every `checkpoint_every` epochs, at every new best epoch and at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch

from xfer.checkpoint import read_checkpoint
from xfer.config import TrainConfig
from xfer.train import fit

from .data import DataSpec, load_trial_data

CHECKPOINT_FILE = "checkpoint.pt"
# Checkpoints Tune (and Ray Train) keep per trial. A restored sweep restarts each trial from the
# newest checkpoint its last state snapshot (every second) names; Tune deletes checkpoints beyond
# this many as new ones arrive, so the named one survives unless the trial wrote this many more
# in the last second before the crash. With 2, one trial of a fast test sweep (4 epochs, S3
# storage, driver SIGKILLed, --resume) errored in Tune's restore, the step that fails when the
# checkpoint is gone from storage.
KEEP_CHECKPOINTS = 4


def trial_config(base: dict, params: dict) -> TrainConfig:
    """The Ray param dict becomes a frozen TrainConfig once, here at the worker boundary."""
    return TrainConfig.from_dict({**base, **params}, source="trial parameters")


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) and not isinstance(v, complex)}


def _run(params: dict, spec: dict, base: dict, checkpoint_every: int, device: str,
         get_checkpoint: Callable, report: Callable, is_rank0: bool = True) -> None:
    cfg = trial_config(base, params)
    data = load_trial_data(DataSpec(**spec), cfg)
    resume = None
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = read_checkpoint(Path(d) / CHECKPOINT_FILE)
    epochs = cfg.optim.epochs

    def on_epoch(metrics: dict, make_checkpoint) -> None:
        m = _scalars(metrics)
        m["timesteps_total"] = m["epoch"]
        last = m["epoch"] >= epochs or m.get("stopped_early", False)
        save = m.get("improved") or m["epoch"] % checkpoint_every == 0 or last
        if save and is_rank0:
            with tempfile.TemporaryDirectory() as d:
                torch.save(make_checkpoint(), Path(d) / CHECKPOINT_FILE)
                report(m, d)
        else:
            report(m, None)

    fit(cfg, data, on_epoch, device=device, resume=resume)


def _threads(n_cpus: float) -> None:
    torch.set_num_threads(max(1, int(n_cpus)))


def function_trial(params: dict, *, spec: dict, base: dict, checkpoint_every: int = 5) -> None:
    """Tune function trainable (fast path)."""
    import ray
    from ray import tune

    res = ray.get_runtime_context().get_assigned_resources()
    _threads(res.get("CPU", 1))
    device = "cuda" if res.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"

    node_id = ray.get_runtime_context().get_node_id()

    def report(m, ckpt_dir):
        tune.report({**m, "node_id": node_id},
                    checkpoint=tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    _run(params, spec, base, checkpoint_every, device, tune.get_checkpoint, report)


def _worker_loop(loop_config: dict) -> None:
    """Ray Train worker: the same loop; every rank reports, rank 0 attaches checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    node_id = ray.get_runtime_context().get_node_id()
    res = loop_config["resources_per_worker"]
    _threads(res.get("CPU", 1))
    device = str(ray.train.torch.get_device()) if res.get("GPU", 0) > 0 else "cpu"

    def report(m, ckpt_dir):
        ray.train.report({**m, "node_id": node_id},
                         checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    _run(loop_config["params"], loop_config["spec"], loop_config["base"], loop_config["checkpoint_every"], device,
         ray.train.get_checkpoint, report, is_rank0=ctx.get_world_rank() == 0)


def trainer_trial(params: dict, *, spec: dict, base: dict, checkpoint_every: int = 5, num_workers: int = 1,
                  resources_per_worker: dict | None = None, train_storage: str = "") -> None:
    """Tune function that runs the trial as a Ray Train TorchTrainer (multi-worker path)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources_per_worker = dict(resources_per_worker or {"CPU": 1})
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"params": params, "spec": spec, "base": base, "checkpoint_every": checkpoint_every,
                           "resources_per_worker": resources_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=resources_per_worker.get("GPU", 0) > 0,
                                               resources_per_worker=resources_per_worker),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=train_storage,
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=KEEP_CHECKPOINTS),
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
