"""What one trial runs: xfer's one training loop, reporting to Ray as `ReportGate` allows.

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
and every selection candidate as `sel/<name>`, the values at the trial's best epoch as
`at_best/<name>`, the objectives of the epochs held back since the last report as `curve`
(`ReportGate`: at most one report a second by default, always at ASHA's judgements, checkpoints
and the end; TorchTrainer trials report every epoch, so that every rank reports the same ones),
and `node_id`, the Ray node the epoch ran on
(rank 0's node for TorchTrainer trials): a trial restored elsewhere after a node died
shows both.
A checkpoint (`checkpoint.pt`, loaded with weights_only=True; the whole training state) is
written as `CheckpointPolicy` says: at the end, at an ASHA rung when the best epoch changed
since the last one, and periodically at a cost-driven interval (or every `checkpoint_every`).

Inspection. A trial's actor is named after its trial (`trial <id> <arch>/<divergence>`,
`trial_label`): Ray shows an actor's `__repr__` in the dashboard's actor view and in the
prefix of its log lines. Ray 2.60 records the dashboard's name once, when the actor is
created (from the creation task's reply; no API changes it later), so an actor that Tune
reuses for later trials (the fast path's default, ~2 s saved per trial) keeps its first
trial's name there; its log lines follow the current trial (each trial prints Ray's
actor-name marker when it starts). `xfer tune --no-reuse_actors` gives every trial its own
actor, so the dashboard's actor list names every running trial. Every report is also
exported as Ray metrics (`TrialMetrics`), tagged with the trial id, architecture, divergence
and sweep, for Prometheus.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from xfer.checkpoint import read_checkpoint
from xfer.config import TrainConfig
from xfer.training import fit

from .data import DataSpec, load_trial_data

CHECKPOINT_FILE = "checkpoint.pt"
# Checkpoints Tune (and Ray Train) keep per trial. A restored sweep restarts each trial from the
# checkpoint named in the sweep's last state snapshot (taken every second), and Tune deletes the
# oldest checkpoints beyond this many as new ones arrive: the count must cover what a trial can
# write within one second. Fast trials (a few epochs a second, e.g. the S3 resume test in
# tests/test_cluster.py) write more than 2.
KEEP_CHECKPOINTS = 4


def trial_label(trial_id: str, params: dict) -> str:
    """How a trial names itself in the Ray dashboard and in log prefixes (a population: with its
    members' Optuna trial numbers)."""
    if "population" in params:
        first = params["population"][0] if params["population"] else {}
        numbers = ",".join(str(n) for n in params.get("numbers", []))
        return f"population {trial_id} {first.get('arch', '?')}/{first.get('divergence', '?')} trials {numbers}"
    return f"trial {trial_id} {params.get('arch', '?')}/{params.get('divergence', '?')}"


def announce(label: str) -> None:
    """Rename this actor in Ray's log prefixes from here on: Ray's log monitor reads this marker
    line (ray_constants.LOG_PREFIX_ACTOR_NAME, the one Ray prints itself after creating an
    actor) from the worker's stdout/stderr and prefixes the following lines with `label`."""
    import sys

    try:
        from ray._private.ray_constants import LOG_PREFIX_ACTOR_NAME as marker
    except ImportError:  # the marker moved: log prefixes keep the actor's first name
        return
    for stream in (sys.stdout, sys.stderr):
        print(f"{marker}{label}", file=stream, flush=True)


class TrialMetrics:
    """Each report as Ray metrics, tagged trial_id, arch, divergence and sweep: Ray's metrics
    agent on every node exports them (as `ray_xfer_trial_epoch`, `ray_xfer_trial_objective`,
    `ray_xfer_trial_loss{part=...}`) and Prometheus scrapes them through Ray's service-discovery
    file (README: "Inspecting sweeps")."""

    TAGS = ("trial_id", "arch", "divergence", "sweep")
    _gauges: dict | None = None  # one set per process (a reused actor records every trial it runs)

    def __init__(self, trial_id: str, params: dict, sweep: str):
        self.tags = {"trial_id": trial_id, "arch": str(params.get("arch", "")),
                     "divergence": str(params.get("divergence", "")), "sweep": sweep}

    @classmethod
    def gauges(cls) -> dict:
        if cls._gauges is None:
            from ray.util.metrics import Gauge

            cls._gauges = {
                "epoch": Gauge("xfer_trial_epoch", "epochs a trial has run", tag_keys=cls.TAGS),
                "objective": Gauge("xfer_trial_objective", "the sweep objective at a trial's last epoch",
                                   tag_keys=cls.TAGS),
                "loss": Gauge("xfer_trial_loss", "a trial's loss parts (epoch means)", tag_keys=cls.TAGS + ("part",)),
            }
        return cls._gauges

    def record(self, m: dict) -> None:
        try:
            g = self.gauges()
            g["epoch"].set(float(m["epoch"]), tags=self.tags)
            if m.get("objective") is not None:
                g["objective"].set(float(m["objective"]), tags=self.tags)
            for k, v in m.items():
                if k.startswith("loss/"):
                    g["loss"].set(float(v), tags={**self.tags, "part": k[len("loss/"):]})
        except Exception as e:  # noqa: BLE001 - metrics must never stop a trial
            import logging

            logging.getLogger(__name__).debug("trial metrics not recorded: %r", e)


def trial_config(base: dict, params: dict) -> TrainConfig:
    """The Ray param dict becomes a frozen TrainConfig once, here at the worker boundary."""
    return TrainConfig.from_dict({**base, **params}, source="trial parameters")


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) and not isinstance(v, complex)}


class CheckpointPolicy:
    """When a trial writes a checkpoint (always the whole training state: what resume needs,
    with the best epoch's weights, which stay on the device between checkpoints).

    - At the last epoch (all epochs, or stopped early by patience).
    - At each epoch where ASHA may stop the trial, when the best epoch changed since the last
      checkpoint, so the best weights are in storage wherever ASHA stops the trial (the sweep
      exports its final model's members from their last checkpoints). Those epochs follow
      Ray's rule on the sweep's rung clock (`tune.settings.RUNG_CLOCKS`): an epoch whose clock
      value is at or past a rung of `rungs` where the trial has not been judged yet (the highest
      such rung is then judged). `adapted`: the clock is `adapted_epochs`, zero through the
      warm-up; `after_warmup`: epochs, counted only once the adaptation is fully on (the first
      judged epoch may fall between rungs); `epochs`: plain epochs. No rungs under FIFO.
    - Periodically, for resume after a failure: `every` epochs after the last checkpoint, or with `every` = 0
      (auto, the default) as often as keeps writing within `budget` (5 %) of the trial's compute:
      after each write the interval becomes ceil(write seconds / (budget x mean epoch seconds)),
      the write timed from building the checkpoint to its report's return (Tune copies it to the
      storage then: an upload to S3 counts),
      at most `max_every` epochs (the epochs a failure can cost); 5 until a write was timed.
    """

    def __init__(self, every: int = 0, rungs=(), *, budget: float = 0.05, max_every: int = 25, first: int = 5,
                 clock: str = "epochs"):
        self.fixed = int(every) > 0
        self.every = int(every) if self.fixed else first
        self.pending = sorted(int(r) for r in rungs)   # rungs ASHA has not judged this trial at yet
        self.clock = clock
        self.budget, self.max_every = budget, max_every
        self.last_saved = 0          # the epoch of the last checkpoint (0: none in this run)
        self.dirty = False           # a best epoch since the last checkpoint
        self.epoch_seconds: list[float] = []
        self.judged_now = False      # whether ASHA judges the epoch `due` was last asked about

    def due(self, m: dict, last: bool) -> bool:
        epoch = int(m["epoch"])
        if m.get("improved"):
            self.dirty = True
        if isinstance(m.get("epoch_seconds"), (int, float)):
            self.epoch_seconds.append(float(m["epoch_seconds"]))
        t = int(m.get("adapted_epochs", epoch)) if self.clock == "adapted" else epoch
        judged = self.judged_now = self.judged(t, float(m.get("warmup", 1.0)) >= 1.0)
        return last or (self.dirty and judged) or epoch - self.last_saved >= self.every

    def judged(self, t: int, warm: bool) -> bool:
        """Whether ASHA judges (and may stop) the trial at this report, whose rung-clock value is
        `t`, as Ray's AsyncHyperBandScheduler decides with a report every epoch; call once per epoch."""
        if self.clock == "after_warmup" and not warm:
            return False
        below = [r for r in self.pending if r <= t]
        if below:
            self.pending.remove(max(below))
        return bool(below)

    def resumed_at(self, epoch: int) -> None:
        """After a restore at `epoch`: its rungs were judged before (the driver kept ASHA's state).
        On the other clocks which of them were judged depends on the trial's warm-up: all stay
        pending, so a judgement is never missed (at worst a checkpoint too many)."""
        self.last_saved = int(epoch)
        if self.clock == "epochs":
            self.pending = [r for r in self.pending if r > epoch]

    def saved(self, epoch: int, seconds: float) -> None:
        self.last_saved, self.dirty = int(epoch), False
        if not self.fixed and self.epoch_seconds:
            per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
            self.every = max(1, min(self.max_every, math.ceil(seconds / (self.budget * max(per_epoch, 1e-9)))))


# Seconds between a trial's reports when it sends them as time allows (`xfer tune --report_every 0`,
# the default). A Tune report is a round trip: the trial's training thread waits until the driver
# has processed it (searcher, scheduler, loggers, callbacks): 1.5-6 ms on CPU-2 with no other work,
# more on a busy driver (BENCHMARKS.md "Ray's costs that are ours").
REPORT_SECONDS = 1.0


class ReportGate:
    """Which of a trial's epochs are sent to the driver as a Tune report.

    Always sent: the last epoch, an epoch that ASHA judges (`CheckpointPolicy.judged`, Ray's own
    rule: so every decision falls on the epoch it would with a report every epoch, and a stopped
    trial stops there), and an epoch with a checkpoint. The others: every `every` epochs, or with
    `every` = 0 (auto) once `seconds` have passed since the last report. An epoch not sent is
    held: the next report carries the objectives of the held epochs as `curve`
    ([[epoch, value], ...]), which the searchers pass on to Optuna, so its study keeps whole curves.
    """

    def __init__(self, every: int = 0, seconds: float = REPORT_SECONDS):
        self.every, self.seconds = int(every), float(seconds)
        self.last_epoch, self.last_time = 0, time.perf_counter()
        self.held: list[list] = []

    def send(self, epoch: int, must: bool) -> bool:
        if must:
            return True
        if self.every > 0:
            return epoch - self.last_epoch >= self.every
        return time.perf_counter() - self.last_time >= self.seconds

    def hold(self, epoch: int, objective) -> None:
        if objective is not None:
            self.held.append([int(epoch), float(objective)])

    def sent(self, epoch: int) -> list:
        """The held epochs' curve for the report of `epoch` (then forgotten)."""
        curve, self.held = self.held, []
        self.last_epoch, self.last_time = int(epoch), time.perf_counter()
        return curve


def at_best(record: dict | None, metric: str) -> dict:
    """The values trials.csv shows for a trial's best epoch, from that epoch's record, as `at_best/...`
    (each report carries them: the history of reports may skip the best epoch)."""
    if not record:
        return {}
    return {f"at_best/{k}": v for k, v in record.items() if k.startswith("sel/") or k == f"peak_val_{metric}"}


def _run(params: dict, spec: dict, base: dict, checkpoint_every: int, device: str,
         get_checkpoint: Callable, report: Callable, is_rank0: bool = True, rungs=(),
         clock: str = "epochs", report_every: int = 0) -> None:
    """One trial: xfer's loop, its epochs reported as `ReportGate(report_every)` allows (every rank
    of a TorchTrainer trial must report the same epochs: give it report_every=1)."""
    cfg = trial_config(base, params)
    data = load_trial_data(DataSpec(**spec), cfg)
    resume = None
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = read_checkpoint(Path(d) / CHECKPOINT_FILE)
    epochs = cfg.optim.epochs
    policy = CheckpointPolicy(checkpoint_every, rungs, clock=clock)
    gate = ReportGate(report_every)
    best = {}
    if resume is not None:
        policy.resumed_at(int(resume["epoch"]))
        history, b = resume["train_state"].get("history", []), int(resume.get("best_epoch", 0))
        best = at_best(history[b - 1] if 0 < b <= len(history) else None, cfg.optim.metric)

    def on_epoch(metrics: dict, make_checkpoint) -> None:
        nonlocal best
        m = _scalars(metrics)
        m["timesteps_total"] = m["epoch"]
        if m.get("improved"):
            best = at_best(m, cfg.optim.metric)
        m.update(best)
        last = m["epoch"] >= epochs or m.get("stopped_early", False)
        write = is_rank0 and policy.due(m, last)
        if not gate.send(m["epoch"], last or write or policy.judged_now):
            gate.hold(m["epoch"], m.get("objective"))
            return
        m["curve"] = gate.sent(m["epoch"])
        if write:
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                torch.save(make_checkpoint(), Path(d) / CHECKPOINT_FILE)
                m["checkpoint_seconds"] = time.perf_counter() - t0  # built and written
                report(m, d)
                policy.saved(m["epoch"], time.perf_counter() - t0)  # + the report, which copies it to storage
        else:
            report(m, None)

    fit(cfg, data, on_epoch, device=device, resume=resume)


def _threads(n_cpus: float) -> None:
    torch.set_num_threads(max(1, int(n_cpus)))


def _trial_setup(params: dict):
    """A Tune function trial's start: torch threads from its CPU share, its device, its node, its
    name in the dashboard and log prefixes. Returns (device, node id, Tune's trial context)."""
    import ray
    from ray import tune

    res = ray.get_runtime_context().get_assigned_resources()
    _threads(res.get("CPU", 1))
    device = "cuda" if res.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    ctx = tune.get_context()
    announce(trial_label(ctx.get_trial_id(), params))
    return device, ray.get_runtime_context().get_node_id(), ctx


def function_trial(params: dict, *, spec: dict, base: dict, checkpoint_every: int = 0, rungs=(),
                   clock: str = "epochs", report_every: int = 0) -> None:
    """Tune function trainable (fast path)."""
    from ray import tune

    device, node_id, ctx = _trial_setup(params)
    metrics = TrialMetrics(ctx.get_trial_id(), params, ctx.get_experiment_name())

    def report(m, ckpt_dir):
        metrics.record(m)
        tune.report({**m, "node_id": node_id},
                    checkpoint=tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    _run(params, spec, base, checkpoint_every, device, tune.get_checkpoint, report, rungs=rungs, clock=clock,
         report_every=report_every)


def labelled(fn):
    """Tune's trainable for the function `fn` (tune.with_resources' resources included), as a
    class `XferTrial` whose actor is named after its current trial (`trial_label`; see the
    module docstring for what the dashboard shows when actors are reused)."""
    from ray.tune.trainable import wrap_function

    class XferTrial(wrap_function(fn)):
        def __repr__(self):
            try:
                return trial_label(self.trial_id, self.config)
            except Exception:  # noqa: BLE001 - before setup, or a config without the keys
                return "xfer trial"

    return XferTrial


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
    metrics = TrialMetrics(loop_config["trial_id"], loop_config["params"], loop_config["sweep"])
    rank0 = ctx.get_world_rank() == 0

    def report(m, ckpt_dir):
        if rank0:
            metrics.record(m)
        ray.train.report({**m, "node_id": node_id},
                         checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    _run(loop_config["params"], loop_config["spec"], loop_config["base"], loop_config["checkpoint_every"], device,
         ray.train.get_checkpoint, report, is_rank0=rank0, rungs=loop_config.get("rungs", ()),
         clock=loop_config.get("clock", "epochs"), report_every=1)


def trainer_trial(params: dict, *, spec: dict, base: dict, checkpoint_every: int = 0, rungs=(),
                  clock: str = "epochs", num_workers: int = 1,
                  resources_per_worker: dict | None = None, train_storage: str = "") -> None:
    """Tune function that runs the trial as a Ray Train TorchTrainer (multi-worker path)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources_per_worker = dict(resources_per_worker or {"CPU": 1})
    trial_id = tune.get_context().get_trial_id()
    announce(trial_label(trial_id, params))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"params": params, "spec": spec, "base": base, "checkpoint_every": checkpoint_every,
                           "rungs": list(rungs), "clock": clock,
                           "resources_per_worker": resources_per_worker, "trial_id": trial_id,
                           "sweep": tune.get_context().get_experiment_name()},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=resources_per_worker.get("GPU", 0) > 0,
                                               resources_per_worker=resources_per_worker),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=train_storage,
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=KEEP_CHECKPOINTS),
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


# ----------------------------------------------------------------------------- populations

BOARD_ACTOR = "xfer_board_{}"


def member_file(i: int) -> str:
    return f"member_{i}.pt"


def member_metrics(i: int, m: dict, metric: str) -> dict:
    """Member i's part of a population's report: its epoch record under `m<i>/` (its best epoch and
    objective come with every member's summary, `population_trial`)."""
    keep = ("epoch", "objective", "warmup", "adapted_epochs", "improved", "stopped_early", "epoch_seconds",
            "train_seconds", "loss/total", f"peak_val_{metric}")
    out = {f"m{i}/{k}": m[k] for k in keep if k in m}
    out.update({f"m{i}/{k}": v for k, v in m.items() if k.startswith("sel/")})
    return out


def _at_best(i: int, ms, metric: str) -> dict:
    """Member i's record at its best epoch (the values trials.csv shows), under `m<i>/at_best/`."""
    if not ms.best_epoch:
        return {}
    best = ms.history[ms.best_epoch - 1]  # a member's history holds every epoch from 1 (a resume brings it back)
    return {f"m{i}/at_best/{k}": v for k, v in best.items() if k.startswith("sel/") or k == f"peak_val_{metric}"}


def _member_summary(i: int, ms, number: int, metric: str) -> dict:
    """Member i's summary under `m<i>/` (its status, epochs, Optuna trial number, best and last
    objective, its record at its best epoch) from its state in xfer.training's population."""
    m = {f"m{i}/status": ms.status, f"m{i}/epochs_run": ms.epoch, f"m{i}/trial": number,
         f"m{i}/best_objective": ms.best_metric if ms.best_epoch else None, f"m{i}/best_epoch": ms.best_epoch,
         f"m{i}/last_objective": ms.history[-1]["objective"] if ms.history else None,
         f"m{i}/seconds": ms.seconds or (time.perf_counter() - ms.started)}
    if ms.error:
        m[f"m{i}/error"] = ms.error
    m.update(_at_best(i, ms, metric))
    return m


def _population_resume(n: int) -> list[dict] | None:
    """Every member's training checkpoint from the trial's latest checkpoint, those that had stopped
    included; None when the trial starts afresh."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return [read_checkpoint(Path(d) / member_file(i)) for i in range(n)]


def _report_with_checkpoint(pop, m: dict, policy: CheckpointPolicy) -> None:
    """Report `m` with a checkpoint: a folder of every member's training checkpoint (each holds its
    member's status: one that had stopped stays stopped)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for i in range(pop.size):
            torch.save(pop.checkpoint(i), Path(d) / member_file(i))
        m["checkpoint_seconds"] = time.perf_counter() - t0
        tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        policy.saved(m["epoch"], time.perf_counter() - t0)


def population_trial(config: dict, *, spec: dict, base: dict, checkpoint_every: int = 0, rungs=(),
                     clock: str = "adapted", board: str = "", report_every: int = 0) -> None:
    """Tune function trainable of a population: its members (config["population"], one Optuna
    trial each, config["numbers"]) train together (xfer.training.fit_population) with the trial's
    CPU / GPU share. Each population epoch is one report: every member's record under `m<i>/`,
    its status, and `objective` (the best member's, for Tune's own bookkeeping). At each of a
    member's epochs the sweep's board actor (tune.population.RungBoard) may stop it (ASHA, member
    by member, across populations: not through Tune's reports, so those go out as `ReportGate`
    allows; each member's held objectives as `m<i>/curve`). A checkpoint is a folder with every member's training
    checkpoint (member_<i>.pt, its status included)."""
    import ray
    from ray import tune

    from xfer.training import TRAINING, fit_population

    device, node_id, ctx = _trial_setup(config)
    trial_id = ctx.get_trial_id()
    numbers = [int(n) for n in config["numbers"]]
    cfgs = [trial_config(base, p) for p in config["population"]]
    metric = cfgs[0].optim.metric
    gauges = [TrialMetrics(f"{trial_id}-m{i}", p, ctx.get_experiment_name())
              for i, p in enumerate(config["population"])]
    judge = ray.get_actor(board) if board and rungs else None
    data = load_trial_data(DataSpec(**spec), cfgs[0])

    resume = _population_resume(len(cfgs))
    policy = CheckpointPolicy(checkpoint_every)
    if resume is not None:
        policy.resumed_at(max(int(r["epoch"]) for r in resume))
    gate = ReportGate(report_every)
    curves: dict[int, list] = {}  # each member's objectives held since the last report
    epoch_report: dict = {}

    def report_member(i: int, metrics: dict, make_checkpoint) -> bool:
        gauges[i].record(metrics)
        epoch_report.update(member_metrics(i, metrics, metric))
        last = metrics.get("stopped_early") or metrics["epoch"] >= cfgs[i].optim.epochs
        if judge is None or last:
            return False
        t = int(metrics["adapted_epochs"]) if clock == "adapted" else int(metrics["epoch"])
        if clock == "after_warmup" and float(metrics.get("warmup", 1.0)) < 1.0:
            return False
        return bool(ray.get(judge.judge.remote(str(numbers[i]), t, metrics.get("objective"))))

    def epoch_done(pop) -> None:
        members = pop.members
        m = {"epoch": max(ms.epoch for ms in members), "node_id": node_id,
             "members_training": sum(ms.status == TRAINING for ms in members)}
        m["timesteps_total"] = m["epoch"]
        values = [v for k, v in epoch_report.items() if k.endswith("/objective") and v is not None]
        m["objective"] = max(values) if values else None
        m["epoch_seconds"] = max((v for k, v in epoch_report.items() if k.endswith("/epoch_seconds")), default=0.0)
        m.update(epoch_report)
        for i, ms in enumerate(members):  # every member's summary in every report: the last one has them all
            m.update(_member_summary(i, ms, numbers[i], metric))
        epoch_report.clear()
        last = m["members_training"] == 0
        write = policy.due(m, last)
        if not gate.send(m["epoch"], last or write):
            for i, ms in enumerate(members):
                if m.get(f"m{i}/epoch") == ms.epoch and m.get(f"m{i}/objective") is not None:
                    curves.setdefault(i, []).append([ms.epoch, float(m[f"m{i}/objective"])])
            return
        gate.sent(m["epoch"])
        m.update({f"m{i}/curve": c for i, c in curves.items()})
        curves.clear()
        if write:
            _report_with_checkpoint(pop, m, policy)
        else:
            tune.report(m)

    fit_population(cfgs, data, report_member, device=device, resume=resume, epoch_done=epoch_done)
