"""Starting Ray for a sweep: the environment Ray must see first, the connection (a local cluster or
an existing one) and how many trials the cluster holds at once. Ray is imported inside the
functions: `ray_environment` runs before the first import of Ray."""

from __future__ import annotations

import logging
import math
import os

from xfer.errors import XferError

from .settings import Sweep


def ray_environment() -> None:
    """Environment Ray must see before it is imported (inherited by trial processes)."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # snapshot the sweep state every second (resume)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune's automatic loggers include TensorBoardX's, ~4 ms of the driver's time per report (CSV and
    # JSON: ~0.2 ms; BENCHMARKS.md "Ray's costs that are ours"): the sweep adds its loggers itself
    # (tune.tuner.loggers), TensorBoard's only with --tensorboard
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


# Trial processes get these (the job's runtime environment): Ray Train's state tracking lists each
# TorchTrainer trial's run (`train-<trial id>`) in the dashboard.
TRIAL_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def start_ray(address: str | None, num_cpus: int | None, num_gpus: int | None, sweep: str = "",
              quiet: bool = False):
    """quiet: Ray's own loggers in this process show warnings and errors, not INFO lines
    (`xfer tune -v` keeps them)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    from ray.job_config import JobConfig

    # the sweep's name goes into the job's metadata (the dashboard's job view; a submitted job's own
    # metadata wins); set variables stay as they are (a submitted job's runtime env must not conflict)
    env = {k: v for k, v in TRIAL_ENV.items() if k not in os.environ}
    # xfer extensions named in the driver's environment (xfer.registry) are imported by every trial
    # process; a submitted job's own runtime env already carries them to its workers
    if os.environ.get("XFER_EXTENSIONS") and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        env["XFER_EXTENSIONS"] = os.environ["XFER_EXTENSIONS"]
    kw = {"log_to_driver": False, "job_config": JobConfig(metadata={"xfer_sweep": sweep}),
          "runtime_env": {"env_vars": env} if env else None,
          "logging_level": logging.WARNING if quiet else logging.INFO}
    if address:
        return ray.init(address=address, **kw)
    # The dashboard stays on: without it Ray Train never frees the placement groups of
    # stopped trials (measured with ray 2.60) and a sweep hangs.
    return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1", **kw)


def slots(sw: Sweep) -> int:
    """Concurrent trials the cluster can hold."""
    import ray

    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 1) / max(sw.cpus_per_trial, 1e-9) + 1e-9)
    if sw.gpus_per_trial > 0:
        n = min(n, math.floor(res.get("GPU", 0) / sw.gpus_per_trial + 1e-9))
    if n < 1:
        raise XferError(f"the cluster ({res.get('CPU', 0)} CPUs, {res.get('GPU', 0)} GPUs) cannot hold one trial of "
                        f"{sw.cpus_per_trial} CPUs and {sw.gpus_per_trial} GPUs")
    return n
