"""The one training loop: `fit(config, data, report)` and `fit_population(configs, data, report)`.

`xfer train` calls `fit`; Ray Tune trials (the `tune` package) call the same loop inside
their workers, passing a `report(metrics, checkpoint)` callback. It sees the training line's
labelled cells (both modalities) and, when `data.adapt` is set, another line's *unlabelled*
peaks (`TrainData.with_adaptation` drops that line's labels before they get here).

A run is a population: P configurations that share a shape (`xfer.config.shape_of`) are
trained together as one batched model on one device (HFTA; `xfer.model.layers`), each member
with its own seed, scalars, validation, best epoch, early stopping and checkpoint. `fit` is
the population of one; there is no second copy of the model, the losses or the schedule.

`fit_population` is a short loop over the named parts of a `Population`:

    begin_epoch            each member's warm-up factor of the adaptation weights
    refresh_pseudo_labels  self-training: class-balanced pseudo-labels of the adaptation
                           line from each member's own predictions, once per epoch after
                           its warm-up (lambda_pseudo > 0)
    train_epoch            each member's shuffled mini-batches through `step`: one optimiser
                           step of every member on the objective of `xfer.objective.batch_loss`
                           (eager, or replayed as a CUDA graph, `xfer.cuda_graph.StepGraph`)
    validate               the GEX and PEAK validation splits of the training line and, when
                           adapting, every label-free selection candidate (xfer.selection)
    MemberState.choose     best-epoch choice and early stopping by the objective (`objective`:
                           transfer or source_val, see xfer.selection): the best epoch is chosen
                           among the epochs after the warm-up (the adaptation fully on; the
                           last epoch if training ends sooner), and the patience counts
                           epochs from there
    checkpoint             a member's whole predictor plus what resuming it needs (`xfer.checkpoint`)

`report` is called exactly once per epoch and member; a member that stops early, ends its
epochs or is stopped by its report is masked (its weights no longer move) while the others
train on. A member's state (weights, optimiser moments, best epoch and its weights, patience,
RNG states, history) round-trips through its checkpoint, so `resume=` continues a run
exactly. On the CPU every member's randomness comes from its own generators, so a member
trained in a population learns what it learns alone with the same seed (tests/test_population.py).
On a GPU the inputs stay resident in GPU memory, the step runs under bf16 autocast, and the
whole step (optimiser included, `xfer.optim`) is captured once as a CUDA graph and replayed
(`cuda_graph=false` turns it off).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import losses as L
from . import selection
from .checkpoint import FORMAT, cpu_copy, to_tensors
from .config import TrainConfig, check_population
from .cuda_graph import StepGraph
from .device import Rows, allreduce_grads, distributed, resolve_device
from .errors import XferError
from .evaluate import METRIC_KEYS, classification_metrics
from .model import CDANN, build_model
from .model.layers import MemberScalars
from .objective import LOSS_SCALARS, Batch, Weights, batch_loss, unweighted_parts
from .optim import PopulationAdamW, clip_grad_norm
from .phases import N_PHASES, UNLABELLED
from .prepare import TrainData

Report = Callable[[dict, Callable[[], dict]], None]
# A population's report: (member index, that member's epoch metrics, its checkpoint builder);
# returning True stops that member (a scheduler's decision), the others train on.
MemberReport = Callable[[int, dict, Callable[[], dict]], "bool | None"]

# What a member is doing: training, or why it stopped.
TRAINING, STOPPED_EARLY, FINISHED, HALTED, DIVERGED = "training", "stopped_early", "finished", "halted", "diverged"


@dataclass
class FitResult:
    model: CDANN                  # with the best epoch's weights loaded (a population of one)
    best_epoch: int
    best_metric: float
    history: list[dict]
    checkpoint: dict              # the best epoch's predictor (what best_model.pt holds)
    stopped_early: bool = False
    seconds: float = 0.0
    objective: str = ""           # what chose the best epoch (Population.objective_name)
    extra: dict = field(default_factory=dict)
    status: str = FINISHED        # FINISHED, STOPPED_EARLY, HALTED (stopped by the report) or DIVERGED
    error: str | None = None      # DIVERGED: why


# ----------------------------------------------------------------------------- one member's state

@dataclass
class MemberState:
    """What one member has learnt so far; `Population.checkpoint` / `load_member` round-trip it."""

    cfg: TrainConfig
    rng: np.random.Generator              # host RNG: epoch order (and adaptation draws on the CPU)
    epoch: int = 0                        # the member's last finished epoch
    best_epoch: int = 0                   # 0: none chosen yet (still in the warm-up)
    best_metric: float = -math.inf
    best_weights: dict | None = None      # the best epoch's weights (a population of one, on the device)
    since_best: int = 0                   # eligible epochs since the best one (patience)
    history: list[dict] = field(default_factory=list)
    status: str = TRAINING
    error: str | None = None
    seconds: float = 0.0                  # wall time until the member stopped
    number: int = 0                       # the order members started in (replacements follow the first P)
    started: float = 0.0                  # perf_counter when it started

    def choose(self, epoch: int, objective: float, eligible: bool, weights: Callable[[], dict]) -> bool:
        """Best-epoch choice: keep this epoch's weights when it is eligible and better."""
        improved = eligible and objective > self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.since_best = objective, epoch, 0
            self.best_weights = weights()  # a copy on the device (a host copy only for a checkpoint)
        elif eligible:
            self.since_best += 1
        return improved


# ----------------------------------------------------------------------------- the population's named parts

@dataclass
class TrainingLine:
    """The training line on the device: its cells' two modalities and labels, the split, and
    what the labelled losses weigh classes by. Matrices are resident when they fit the memory
    budget (`xfer.device.Rows`)."""

    emb: Rows                             # expression embeddings (float32)
    peaks: Rows                           # peak-encoder inputs (bf16 on a GPU)
    labels: torch.Tensor                  # every cell's phase code, int64
    train_rows: torch.Tensor              # the training split's row indices
    val_rows: torch.Tensor                # the validation split's row indices
    val_labels: np.ndarray                # the validation cells' phases, on the host (for the metrics)
    class_prior: torch.Tensor             # class frequencies of the training cells (the balance term)
    class_weight: torch.Tensor | None     # inverse-frequency CE weights (class_weighted), else None

    @classmethod
    def load(cls, data: TrainData, class_weighted: bool, dev: torch.device, dtype: torch.dtype,
             memory_budget: int | None) -> "TrainingLine":
        line = data.line
        weight = None
        if class_weighted:
            w = 1.0 / np.maximum(data.class_prior, 1e-3)
            weight = torch.as_tensor(w / (w * data.class_prior).sum(), dtype=torch.float32, device=dev)
        return cls(emb=Rows(line.emb, dev, torch.float32, memory_budget),
                   peaks=Rows(line.peaks, dev, dtype, memory_budget),
                   labels=torch.as_tensor(line.labels.astype(np.int64), device=dev),
                   train_rows=torch.as_tensor(data.train_idx, dtype=torch.long, device=dev),
                   val_rows=torch.as_tensor(data.val_idx, dtype=torch.long, device=dev),
                   val_labels=line.labels[data.val_idx], class_prior=torch.as_tensor(data.class_prior, device=dev),
                   class_weight=weight)


@dataclass
class AdaptationLine:
    """The other line's unlabelled cells on the device: its peaks and, when given, its expression
    (what the `agreement` selection candidate compares the peak head with). The LineNorm
    statistics are this line's own (None without `line_norm`)."""

    peaks: Rows
    peak_stats: tuple | None
    emb: Rows | None = None
    emb_stats: tuple | None = None

    @classmethod
    def load(cls, data: TrainData, line_norm: bool, dev: torch.device, dtype: torch.dtype,
             memory_budget: int | None) -> "AdaptationLine":
        other = data.adapt
        stats = other.stats_tensors(dev)
        line = cls(Rows(other.peaks, dev, dtype, memory_budget), stats["peaks"] if line_norm else None)
        if other.emb is not None:
            line.emb = Rows(other.emb, dev, torch.float32, memory_budget)
            line.emb_stats = stats["emb"] if line_norm else None
        return line


@dataclass
class CandidateRows:
    """Each member's fixed random cells (`xfer.selection.subset`, drawn from its seed) that the
    label-free selection candidates use every epoch: [P, k] row indices."""

    domain_train: torch.Tensor            # training-line rows the domain classifier (IWCV, DEV) fits on
    snd: torch.Tensor                     # adaptation-line rows SND scores

    @classmethod
    def draw(cls, seeds: Sequence[int], train_rows: torch.Tensor, n_other: int, dev: torch.device) -> "CandidateRows":
        return cls(train_rows[torch.as_tensor(np.stack([selection.subset(len(train_rows), s) for s in seeds]),
                                              device=dev)],
                   torch.as_tensor(np.stack([selection.subset(n_other, s + 1) for s in seeds]), device=dev))

    def redraw(self, m: int, seed: int, train_rows: torch.Tensor, n_other: int, dev: torch.device) -> None:
        self.domain_train[m] = train_rows[torch.as_tensor(selection.subset(len(train_rows), seed), device=dev)]
        self.snd[m] = torch.as_tensor(selection.subset(n_other, seed + 1), device=dev)


@dataclass
class PseudoLabels:
    """Self-training: each member's pseudo-labels of the adaptation line and the CE weights that
    balance its kept classes; device buffers that `refresh_pseudo_labels` fills in place (a
    captured CUDA graph reads them there)."""

    labels: torch.Tensor                  # [P, adaptation cells]; UNLABELLED where none is kept
    class_weight: torch.Tensor            # [P, N_PHASES]

    @classmethod
    def empty(cls, size: int, n_cells: int, dev: torch.device) -> "PseudoLabels":
        return cls(torch.full((size, n_cells), UNLABELLED, dtype=torch.long, device=dev),
                   torch.zeros(size, N_PHASES, device=dev))

    def clear(self, m: int) -> None:
        self.labels[m].fill_(UNLABELLED)
        self.class_weight[m].zero_()


@dataclass
class Optimiser:
    """Every member's optimiser: per-member AdamW and gradient-norm clipping (`xfer.optim`) over
    the batched model's parameters, and the mask of members still training, which the AdamW
    reads in place (a masked member's weights do not move)."""

    params: list[torch.Tensor]
    adamw: PopulationAdamW
    grad_clip: torch.Tensor               # [P] maximum gradient norm (0: unclipped)
    active: torch.Tensor                  # [P] 1.0 training, 0.0 masked

    @classmethod
    def build(cls, model: CDANN, cfgs: Sequence[TrainConfig], dev: torch.device) -> "Optimiser":
        def vec(get) -> torch.Tensor:
            return torch.tensor([float(get(c)) for c in cfgs], dtype=torch.float32, device=dev)

        active = torch.ones(len(cfgs), device=dev)
        grad_clip = vec(lambda c: c.optim.grad_clip)
        params = list(model.parameters())
        adamw = PopulationAdamW(params, vec(lambda c: c.optim.lr), vec(lambda c: c.optim.weight_decay), active)
        return cls(params, adamw, grad_clip, active)

    def reset_member(self, m: int, cfg: TrainConfig) -> None:
        """A fresh optimiser for member m, with cfg's learning rate, weight decay and clipping."""
        self.adamw.reset_member(m)
        self.adamw.lr[m], self.adamw.weight_decay[m] = cfg.optim.lr, cfg.optim.weight_decay
        self.grad_clip[m] = cfg.optim.grad_clip

    def step(self) -> None:
        clip_grad_norm(self.params, self.grad_clip)
        self.adamw.step()


@dataclass(frozen=True)
class BatchPlan:
    """How an epoch is cut into optimiser steps: each member's training cells in its own shuffled
    order, the ragged last batch dropped (MMD likes equal sizes); with several data-parallel
    ranks each takes its own shard of every step's cells."""

    n_train: int                          # training cells
    batch_size: int                       # cells per member and step (per rank)
    world: int                            # data-parallel ranks (1 without a process group)
    rank: int
    steps: int                            # optimiser steps per epoch

    @classmethod
    def of(cls, n_train: int, batch_size: int) -> "BatchPlan":
        bs = min(batch_size, n_train)
        world, rank = distributed()
        return cls(n_train, bs, world, rank, max(1, n_train // (bs * world)))

    def rows(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's cells of `step` from each member's epoch order [P, n_train]: [P, batch_size]."""
        start = (step * self.world + self.rank) * self.batch_size
        return order[:, start:start + self.batch_size]


@dataclass
class EpochSchedule:
    """Each member's adaptation schedule: the warm-up factor of its current epoch (1.0: the
    adaptation fully on) and the gradient-reversal strength of the current step, [P] device
    tensors that the step (and a captured CUDA graph) reads in place."""

    warmup: torch.Tensor
    grl: torch.Tensor

    @classmethod
    def zeros(cls, size: int, dev: torch.device) -> "EpochSchedule":
        return cls(torch.zeros(size, device=dev), torch.zeros(size, device=dev))


# ----------------------------------------------------------------------------- the population

class Population:
    """P configurations of one shape trained as one batched model on one device: the model,
    optimiser and device-resident data, and the parts of an epoch. A single run is P = 1.

    The members share the data (the training line's split, the adaptation line) and every
    setting of their shape (`xfer.config.shape_of`); each has its own seed (initial weights,
    dropout masks, batch order, adaptation draws), its own scalars (`xfer.config.MEMBER_KEYS`:
    learning rate, weight decay, every lambda, warm-up and GRL schedules, label smoothing,
    dropout rates, pseudo-label settings, patience, clipping), validation, best epoch, early
    stopping and checkpoint. A member that stops is masked: its weights no longer move.

    Its parts: `model` (the batched CDANN), `members` (each one's `MemberState`), `loss_scalars`
    (each member's loss weights, read by `xfer.objective.batch_loss`), `optimiser`, `line` (the
    training line on the device), `adaptation` (the other line's unlabelled cells, or None),
    `candidate_rows` (the cells the selection candidates use, when adapting), `pseudo` (the
    self-training buffers, or None), `batches` (how an epoch is cut into steps), `schedule`
    (the warm-up and GRL strengths the step reads) and `graph` (the captured step, on a GPU)."""

    def __init__(self, cfgs: Sequence[TrainConfig], data: TrainData, device: str | torch.device | None = None,
                 memory_budget: int | None = None):
        cfgs = list(cfgs)
        check_population(cfgs)
        self.data = data
        cfg = self.cfg = cfgs[0]            # the shape (every member's is the same)
        dev = self.dev = resolve_device(device)
        self.size = len(cfgs)
        seeds = [c.optim.seed for c in cfgs]
        torch.manual_seed(seeds[0])         # the GPU's generator (the CPU's members have their own)
        adapting = data.adapt is not None
        self.dims = {"emb_dim": data.emb_dim, "n_peaks": data.n_peaks, "n_domains": 3 if adapting else 2}
        model = build_model(data.emb_dim, data.n_peaks, [c.model for c in cfgs], use_cdann=cfg.loss.use_cdann,
                            seed=seeds, n_domains=self.dims["n_domains"])
        model.set_line_stats(data.line_stats)
        self.model = model.to(dev)
        now = time.perf_counter()
        self.members = [MemberState(c, np.random.default_rng(c.optim.seed), number=i, started=now)
                        for i, c in enumerate(cfgs)]
        self.n_started = len(cfgs)             # members started so far (numbers the next one)
        self.loss_scalars = MemberScalars({k: [getattr(c.loss, k) for c in cfgs] for k in LOSS_SCALARS}).to(dev)
        self.optimiser = Optimiser.build(model, cfgs, dev)
        self.finished = False

        # the data, on the device when it fits (rows are densified per batch otherwise); bf16 autocast on a GPU
        self.amp = dev.type == "cuda"
        dtype = torch.bfloat16 if self.amp else torch.float32
        self.line = TrainingLine.load(data, cfg.loss.class_weighted, dev, dtype, memory_budget)
        self.adaptation = AdaptationLine.load(data, cfg.data.line_norm, dev, dtype, memory_budget) if adapting else None
        # model selection (xfer.selection): the candidate that chooses the best epoch
        self.objective = selection.resolve(cfg.optim.objective, adapting, adapting and self.adaptation.emb is not None)
        self.candidate_rows = CandidateRows.draw(seeds, self.line.train_rows, len(self.adaptation.peaks), dev) \
            if adapting else None
        self.pseudo: PseudoLabels | None = None
        if adapting and not self.loss_scalars.zero["lambda_pseudo"]:
            self.pseudo = PseudoLabels.empty(self.size, len(self.adaptation.peaks), dev)
        self.batches = BatchPlan.of(len(data.train_idx), cfg.optim.batch_size)
        self.schedule = EpochSchedule.zeros(self.size, dev)
        self.graph = self._step_graph() if cfg.optim.cuda_graph else None

    def _step_graph(self) -> StepGraph | None:
        """The step captured as a CUDA graph: on one GPU (no data-parallel ranks) with every matrix resident."""
        rows = [self.line.emb, self.line.peaks] + ([self.adaptation.peaks] if self.adaptation is not None else [])
        if self.dev.type != "cuda" or self.batches.world != 1 or not all(r.resident for r in rows):
            return None
        return StepGraph(self.step, (self.size, self.batches.batch_size), self.dev, self.optimiser.params)

    @property
    def adapting(self) -> bool:
        """Whether an adaptation line is given (its unlabelled cells join the objective and the selection)."""
        return self.adaptation is not None

    @property
    def self_training(self) -> bool:
        """Whether any member learns from pseudo-labels of the adaptation line (lambda_pseudo > 0)."""
        return self.pseudo is not None

    # ------------------------------------------------------------------ members
    def training(self) -> list[int]:
        return [m for m, ms in enumerate(self.members) if ms.status == TRAINING]

    def stop(self, m: int, status: str, error: str | None = None, seconds: float = 0.0) -> None:
        """Member m stops training (masked: its weights no longer move)."""
        ms = self.members[m]
        if ms.status == TRAINING:
            ms.status, ms.error, ms.seconds = status, error, seconds
            self.optimiser.active[m] = 0.0

    @torch.no_grad()
    def replace(self, m: int, cfg: TrainConfig) -> None:
        """A fresh configuration of this population's shape takes member m's place (after member m
        stopped and its result was taken): new weights, optimiser state, scalars, schedules and RNGs,
        exactly as if it started alone; the other members are untouched."""
        check_population([self.cfg, cfg])
        if self.members[m].status == TRAINING:
            raise RuntimeError(f"member {m} is still training; stop it before replacing it")
        before = self._structure()
        seed = cfg.optim.seed
        self.model.reset_member(m, cfg.model, seed)
        for k in LOSS_SCALARS:
            self.loss_scalars.set_member(m, {k: getattr(cfg.loss, k)})
        self.optimiser.reset_member(m, cfg)
        self.members[m] = MemberState(cfg, np.random.default_rng(seed), number=self.n_started,
                                      started=time.perf_counter())
        self.n_started += 1
        if self.adapting:
            self.candidate_rows.redraw(m, seed, self.line.train_rows, len(self.adaptation.peaks), self.dev)
            if self.pseudo is None and not self.loss_scalars.zero["lambda_pseudo"]:
                self.pseudo = PseudoLabels.empty(self.size, len(self.adaptation.peaks), self.dev)
            if self.pseudo is not None:
                self.pseudo.clear(m)
        self.optimiser.active[m] = 1.0
        if self.graph is not None and self._structure() != before:
            # the step now runs other operations: capture it again
            self.graph = StepGraph(self.step, (self.size, self.batches.batch_size), self.dev, self.optimiser.params)

    def _structure(self) -> tuple:
        return self.model.structure(), tuple(sorted(self.loss_scalars.zero.items())), self.self_training

    def _member_weights(self, m: int) -> dict:
        return {k: v[m:m + 1].detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ the step
    def batch(self, rows: torch.Tensor) -> Batch:
        """Each member's training cells rows [P, bs] and, when adapting, as many random cells of the other line."""
        P, bs = rows.shape
        flat = rows.reshape(-1)
        line = self.line
        emb, peaks, labels = line.emb[flat].view(P, bs, -1), line.peaks[flat].view(P, bs, -1), line.labels[rows]
        if not self.adapting:
            return Batch(emb, peaks, labels)
        other = self.adaptation
        if self.dev.type == "cuda":
            drawn = torch.randint(0, len(other.peaks), (P, bs), device=self.dev)
        else:
            drawn = torch.as_tensor(np.stack([ms.rng.integers(0, len(other.peaks), size=bs) for ms in self.members]))
        drawn = drawn.to(self.dev)
        return Batch(emb, peaks, labels, xb=other.peaks[drawn.reshape(-1)].view(P, bs, -1), stats_b=other.peak_stats,
                     yb=self.pseudo.labels.gather(1, drawn) if self.pseudo is not None else None)

    def step(self, rows: torch.Tensor, warm: torch.Tensor, grl: torch.Tensor,
             autocast_cache: bool = True) -> dict[str, torch.Tensor]:
        """One optimiser step of every member on its cells rows [P, bs]; the detached loss parts, [P] each."""
        batch = self.batch(rows)
        weights = Weights(warm=warm, grl=grl, prior=self.line.class_prior, class_weight=self.line.class_weight,
                          pseudo_weight=self.pseudo.class_weight if self.pseudo is not None else None)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=autocast_cache):
            parts = batch_loss(self.model, self.cfg.loss, self.loss_scalars, batch, weights)
        self.optimiser.adamw.zero_grad()
        parts.total.sum().backward()  # the members are independent: each gets its own gradient
        if self.batches.world > 1:
            allreduce_grads(self.model, self.batches.world)
        self.optimiser.step()
        return parts.detached()

    # ------------------------------------------------------------------ an epoch's parts
    def begin_epoch(self) -> list[float]:
        """Training mode and each member's warm-up factor of its next epoch (1.0: the adaptation fully on)."""
        self.model.train()
        warmup = [L.warmup_factor(ms.epoch, ms.cfg.loss.warmup_epochs) for ms in self.members]
        self.schedule.warmup.copy_(torch.tensor(warmup, dtype=torch.float32))
        return warmup

    @torch.no_grad()
    def refresh_pseudo_labels(self, members: list[int]) -> dict[int, int]:
        """For each of `members`, from its predictions of the adaptation line (eval mode), keep the
        most confident `pseudo_fraction` of each predicted class as its pseudo-label (in place; -1
        elsewhere) and weights that balance the kept classes. Returns how many cells each kept."""
        if not members:
            return {}
        other, model = self.adaptation, self.model
        probs = _predict_rows(model, {"peak": lambda i: model.predict_peaks(other.peaks[i], other.peak_stats)},
                              torch.arange(len(other.peaks), device=self.dev), self.amp)["peak"]
        kept = {}
        for m in members:
            labels = L.select_pseudo_labels(probs[m], self.members[m].cfg.loss.pseudo_fraction)
            self.pseudo.labels[m].copy_(labels)
            counts = torch.bincount(labels[labels >= 0], minlength=N_PHASES).float()
            total = counts.sum()
            self.pseudo.class_weight[m].copy_(torch.where(counts > 0, total / (N_PHASES * counts.clamp_min(1)),
                                                          torch.zeros_like(counts)))
            kept[m] = int(total.item())
        return kept

    def _grl_schedule(self) -> torch.Tensor:
        """Each member's GRL strength at every step of its next epoch: [steps, P] on the device."""
        steps = self.batches.steps
        rows = [[L.grl_lambda((ms.epoch * steps + s) / max(1, ms.cfg.optim.epochs * steps), ms.cfg.loss.grl_gamma)
                 for ms in self.members] for s in range(steps)]
        return torch.tensor(rows, dtype=torch.float32).to(self.dev)

    def train_epoch(self) -> dict[str, torch.Tensor]:
        """Every step of one epoch, each member over its own shuffled training cells; the mean of
        each loss part, [P]."""
        plan, schedule = self.batches, self.schedule
        order = self.line.train_rows[torch.as_tensor(
            np.stack([ms.rng.permutation(plan.n_train) for ms in self.members]), device=self.dev)]
        grl = self._grl_schedule()
        sums: dict[str, torch.Tensor] = {}
        for s in range(plan.steps):
            rows = plan.rows(order, s)
            schedule.grl.copy_(grl[s])
            if self.graph is not None and self.graph.run(rows, schedule.warmup, schedule.grl):
                continue
            for k, v in self.step(rows, schedule.warmup, schedule.grl).items():
                sums[k] = sums.get(k, 0) + v.float()
        if self.graph is not None:
            for k, v in self.graph.take_sums().items():
                sums[k] = sums.get(k, 0) + v
        return {k: (v / plan.steps).cpu() for k, v in sums.items()}  # waits for the device

    def validate(self, members: list[int]) -> dict[int, dict]:
        """For each of `members`: the metrics of both heads on the training line's validation cells
        and, when adapting, every label-free selection candidate (`xfer.selection`) under "selection".
        The forward passes are batched over the whole population."""
        model, line = self.model, self.line
        val = _predict_rows(model, {"gex": lambda i: model.predict_source(line.emb[i]),
                                    "peak": lambda i: model.peak_latent(line.peaks[i]).z.float()},
                            line.val_rows, self.amp)
        z_val = val["peak"]
        p_val = self._classify(z_val)  # the PEAK latents are encoded once, for the metrics and the candidates
        gex_pred = val["gex"].argmax(-1).cpu().numpy()
        peak_pred = p_val.argmax(-1).cpu().numpy()
        metrics = {m: {"gex": classification_metrics(line.val_labels, gex_pred[m]),
                       "peak": classification_metrics(line.val_labels, peak_pred[m])} for m in members}
        source_val = [metrics[m]["peak"][self.members[m].cfg.optim.metric] for m in members]
        if not self.adapting:
            sel = [{"source_val": v} for v in source_val]
        else:
            sel = self._candidates(members, source_val, p_val, z_val)
        return {m: {**metrics[m], "selection": s} for m, s in zip(members, sel)}

    def _candidates(self, members: list[int], source_val: list[float], p_val: torch.Tensor,
                    z_val: torch.Tensor) -> list[dict]:
        """Every label-free selection candidate of every member in `members` at once
        (xfer.selection.candidate_values_members), from the adaptation line's cells."""
        model, other = self.model, self.adaptation
        heads = {"z": lambda i: model.peak_latent(other.peaks[i], other.peak_stats).z.float()}
        if other.emb is not None:
            heads["gex"] = lambda i: model.predict_source(other.emb[i], other.emb_stats)
        test = _predict_rows(model, heads, torch.arange(len(other.peaks), device=self.dev), self.amp)
        z_train = self._member_latents(self.candidate_rows.domain_train)
        p_test = self._classify(test["z"])
        i = torch.as_tensor(members, device=self.dev)
        return selection.candidate_values_members(
            source_val, y_val=self.line.labels[self.line.val_rows], p_val=p_val[i], z_val=z_val[i], z_train=z_train[i],
            p_test=p_test[i], z_test=test["z"][i], p_test_gex=test["gex"][i] if "gex" in test else None,
            snd_rows=self.candidate_rows.snd[i])

    @torch.no_grad()
    def _member_latents(self, rows: torch.Tensor) -> torch.Tensor:
        """PEAK latents of each member's own training rows rows [P, k] (eval mode), float32 [P, k, latent]."""
        P, k = rows.shape
        self.model.eval()
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            z = self.model.peak_latent(self.line.peaks[rows.reshape(-1)].view(P, k, -1)).z.float()
        self.model.train()
        return z

    @torch.no_grad()
    def _classify(self, z: torch.Tensor) -> torch.Tensor:
        """Class probabilities of PEAK latents (eval mode, float32), as `CDANN.predict_peaks`."""
        self.model.eval()
        probs = torch.softmax(self.model.classify(z).float(), -1)
        self.model.train()
        return probs

    def run_epoch(self) -> dict[int, dict]:
        """One epoch of every training member: train, validate, choose. Returns each training
        member's epoch record (what its report gets); a member whose objective or losses are not
        finite is stopped as DIVERGED (a population of one raises XferError instead)."""
        t0 = time.perf_counter()
        members = self.training()
        warm = self.begin_epoch()
        warmed = {m: warm[m] >= 1.0 for m in members}  # the adaptation fully on
        pseudo = [m for m in members if warmed[m] and self.members[m].cfg.loss.lambda_pseudo > 0]
        n_pseudo = self.refresh_pseudo_labels(pseudo) if self.self_training else {}
        losses = self.train_epoch()
        train_seconds = time.perf_counter() - t0
        val = self.validate(members)
        records = {}
        for m in members:
            ms = self.members[m]
            epoch = ms.epoch + 1
            skip = unweighted_parts(ms.cfg)
            loss_m = {f"loss/{k}": float(v[m]) for k, v in losses.items() if k not in skip}
            # a model is chosen only once the adaptation is fully on: before that it has not yet
            # been aligned to the other line, whatever the training line's validation says
            objective = val[m]["selection"][self.objective]
            problem = (f"the selection objective {self.objective} is not finite at epoch {epoch}"
                       if not math.isfinite(objective) else _non_finite(loss_m, epoch))
            if problem:
                if self.size == 1:
                    raise XferError(problem)
                self.stop(m, DIVERGED, problem, time.perf_counter() - ms.started)
                continue
            eligible = warmed[m] or epoch == ms.cfg.optim.epochs
            improved = ms.choose(epoch, objective, eligible, lambda: self._member_weights(m))
            ms.epoch = epoch
            metrics = _epoch_record(ms.cfg, ms, objective, val[m], loss_m, n_pseudo.get(m), warm[m], improved,
                                    epoch_seconds=time.perf_counter() - t0, train_seconds=train_seconds)
            if ms.since_best >= ms.cfg.optim.patience:
                metrics["stopped_early"] = True
            ms.history.append(metrics)
            records[m] = metrics
        return records

    def after_report(self, m: int, metrics: dict, halt: bool, seconds: float) -> None:
        """Member m's state after its epoch was reported: stopped early, at its last epoch, or halted."""
        ms = self.members[m]
        if metrics.get("stopped_early"):
            self.stop(m, STOPPED_EARLY, seconds=seconds)
        elif ms.epoch >= ms.cfg.optim.epochs:
            self.stop(m, FINISHED, seconds=seconds)
        elif halt:
            self.stop(m, HALTED, seconds=seconds)

    # ------------------------------------------------------------------ outputs
    def checkpoint_builder(self, m: int = 0) -> Callable[[], dict]:
        """What `report` gets: builds member m's checkpoint of this epoch when called (most epochs
        need none). It must be called during that report: afterwards the state has moved on."""
        epoch = self.members[m].epoch

        def build() -> dict:
            now = self.members[m].epoch
            if now != epoch or self.finished:
                raise RuntimeError(f"the checkpoint of epoch {epoch} was requested after epoch {now} "
                                   f"{'ended the run' if self.finished else 'began'}; build it inside the report "
                                   "callback")
            return self.checkpoint(m)
        return build

    def _predictor(self, m: int) -> dict:
        """The checkpoint entries that describe member m's predictor (all but the weights and epoch)."""
        ms = self.members[m]
        return {"format": FORMAT, "config": ms.cfg.to_dict(), "dims": dict(self.dims),
                "preprocess": to_tensors(self.data.preprocess), "best_epoch": int(ms.best_epoch),
                "best_metric": float(ms.best_metric), "metric_name": self.objective_name}

    @property
    def objective_name(self) -> str:
        """What the best epoch was chosen by (source_val: the validation metric's own name)."""
        return f"peak_val_{self.cfg.optim.metric}" if self.objective == "source_val" else self.objective

    def checkpoint(self, m: int = 0) -> dict:
        """Member m's whole predictor at its current epoch plus what resuming it needs (see
        xfer.checkpoint): a population of one, whatever this population's size."""
        ms = self.members[m]
        return {**self._predictor(m), "epoch": ms.epoch, "model": cpu_copy(self._member_weights(m)),
                "train_state": {  # a member that has ended never steps again: no optimiser state
                    "optimizer": self.optimiser.adamw.member_state(m) if ms.status == TRAINING else None,
                    "best_model": None if ms.best_epoch == ms.epoch else cpu_copy(ms.best_weights),
                    "since_best": ms.since_best, "history": list(ms.history), "status": ms.status,
                    "rng": {"torch": self.model.noise.member_states()[m], "numpy": ms.rng.bit_generator.state}}}

    @torch.no_grad()
    def load_member(self, m: int, ckpt: dict) -> None:
        """Continue member m from its training checkpoint (`checkpoint`)."""
        ms, ts = self.members[m], ckpt["train_state"]
        state = self.model.state_dict()
        for k, v in ckpt["model"].items():
            state[k][m].copy_(v.reshape(state[k][m].shape))
        if ts.get("optimizer") is not None:
            self.optimiser.adamw.load_member_state(m, ts["optimizer"])
        ms.epoch = int(ckpt["epoch"])
        ms.history = list(ts.get("history", []))
        ms.best_metric, ms.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
        best = ts.get("best_model") or ckpt["model"]
        ms.best_weights = {k: v.to(self.dev) for k, v in cpu_copy(best).items()}
        ms.since_best = int(ts.get("since_best", 0))
        self.model.noise.set_member_state(m, ts["rng"]["torch"])
        ms.rng.bit_generator.state = ts["rng"]["numpy"]
        status = ts.get("status", TRAINING)
        if status == TRAINING and ms.epoch >= ms.cfg.optim.epochs:
            status = FINISHED
        if status == TRAINING and ms.history and ms.history[-1].get("stopped_early"):
            status = STOPPED_EARLY
        if status != TRAINING:  # it had ended (a population checkpoint keeps members that stopped)
            self.stop(m, status)

    def result(self, m: int, seconds: float) -> FitResult:
        """Member m's best epoch as a model of its own (eval mode) and its predictor checkpoint."""
        ms = self.members[m]
        if ms.best_weights is None:  # resumed after the last epoch, or diverged before any choice
            ms.best_weights = self._member_weights(m)
        # the best epoch's predictor, without the resume state (what best_model.pt holds)
        best = {**self._predictor(m), "epoch": ms.best_epoch or ms.epoch, "model": cpu_copy(ms.best_weights)}
        model = build_model(self.data.emb_dim, self.data.n_peaks, ms.cfg.model, use_cdann=ms.cfg.loss.use_cdann,
                            seed=ms.cfg.optim.seed, n_domains=self.dims["n_domains"]).to(self.dev)
        model.load_state_dict(ms.best_weights)
        model.eval()
        return FitResult(model=model, best_epoch=ms.best_epoch, best_metric=ms.best_metric, history=ms.history,
                         checkpoint=best, stopped_early=ms.status == STOPPED_EARLY, seconds=ms.seconds or seconds,
                         objective=self.objective_name, status=ms.status, error=ms.error,
                         extra={"cuda_graph": self.graph.summary() if self.graph is not None else None,
                                "population": self.size})


def fit_population(cfgs: Sequence[TrainConfig], data: TrainData, report: MemberReport | None = None, *,
                   device: str | torch.device | None = None, resume: Sequence[dict | None] | None = None,
                   memory_budget: int | None = None, refill: Callable[[int], TrainConfig | None] | None = None,
                   on_done: Callable[[int, FitResult], None] | None = None,
                   epoch_done: Callable[["Population"], None] | None = None) -> list[FitResult]:
    """Train P same-shape configurations together as one batched model (see `Population`).

    report(m, metrics, checkpoint): once per epoch of each training member m (its place in the
    population); returning True stops that member. resume: one training checkpoint (or None) per
    member. When a member stops, on_done(m, its result) is called and refill(m) may return a fresh
    configuration of the same shape to train in its place (None: the place stays empty).
    epoch_done(population): after each epoch's reports (and stops), before any place is refilled
    (a sweep writes its population checkpoint there). Returns every member's result (its best
    epoch), in the order the members started."""
    pop = Population(cfgs, data, device, memory_budget)
    for m, ckpt in enumerate(resume or []):
        if ckpt is not None:
            pop.load_member(m, ckpt)
    results: dict[int, FitResult] = {}

    def collect(m: int) -> None:
        ms = pop.members[m]
        if ms.number in results:
            return
        results[ms.number] = res = pop.result(m, time.perf_counter() - ms.started)
        if on_done is not None:
            on_done(m, res)
        cfg = refill(m) if refill is not None else None
        if cfg is not None:
            pop.replace(m, cfg)

    for m in range(pop.size):  # resumed members that had already ended
        if pop.members[m].status != TRAINING:
            collect(m)
    while pop.training():
        for m, metrics in pop.run_epoch().items():
            halt = report(m, metrics, pop.checkpoint_builder(m)) if report is not None else None
            pop.after_report(m, metrics, bool(halt), time.perf_counter() - pop.members[m].started)
        if epoch_done is not None:
            epoch_done(pop)
        for m in range(pop.size):
            if pop.members[m].status != TRAINING:
                collect(m)
    pop.finished = True
    return [results[k] for k in sorted(results)]


def fit(cfg: TrainConfig, data: TrainData, report: Report | None = None, *,
        device: str | torch.device | None = None, resume: dict | None = None,
        memory_budget: int | None = None) -> FitResult:
    """Train the CDANN (a population of one); report once per epoch; return the best epoch's model."""
    member_report = None if report is None else (lambda m, metrics, build: report(metrics, build))
    return fit_population([cfg], data, member_report, device=device, resume=None if resume is None else [resume],
                          memory_budget=memory_budget)[0]


def _epoch_record(cfg: TrainConfig, state: MemberState, objective: float, val: dict, losses: dict,
                  n_pseudo: int | None, warm: float, improved: bool, **seconds) -> dict:
    """What `report` and training_history.json get for one epoch: `objective` (what chooses the
    best epoch), every selection candidate as `sel/<name>`, the validation metrics, the losses."""
    return {
        "epoch": state.epoch, "objective": objective, "best_epoch": state.best_epoch,
        "best_objective": state.best_metric if state.best_epoch else None,  # None: no epoch chosen yet (warm-up)
        **{f"gex_val_{k}": val["gex"][k] for k in METRIC_KEYS},
        **{f"peak_val_{k}": val["peak"][k] for k in METRIC_KEYS},
        **{f"sel/{k}": v for k, v in val["selection"].items()},
        **losses, **({"pseudo_labels": n_pseudo} if n_pseudo is not None else {}),
        "warmup": warm, "adapted_epochs": adapted_epochs(state.epoch, cfg.loss.warmup_epochs),
        "grl_lambda": L.grl_lambda((state.epoch - 1) / cfg.optim.epochs, cfg.loss.grl_gamma),
        **seconds, "improved": improved,
    }


def adapted_epochs(epoch: int, warmup_epochs: int) -> int:
    """Epochs so far with the adaptation fully on (`Population.begin_epoch`'s factor 1.0: from epoch
    warmup_epochs + 1): a sweep's ASHA counts its rungs in these, so that every trial is judged
    after the same number of epochs in which a model could be chosen (tune.searcher)."""
    return max(0, int(epoch) - max(0, int(warmup_epochs)))


def _non_finite(losses: dict, epoch: int) -> str | None:
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    return f"training diverged at epoch {epoch} (non-finite loss: {bad}); lower lr" if bad else None


@torch.no_grad()
def _predict_rows(model: CDANN, heads: dict[str, Callable[[torch.Tensor], torch.Tensor]], idx: torch.Tensor,
                  amp: bool, batch: int = 4096) -> dict[str, torch.Tensor]:
    """Each head's outputs ([P, rows, ...], e.g. `lambda i: model.predict_peaks(peaks[i])`) for the rows `idx`,
    in eval mode, from device-resident rows (no host round trip of inputs); float32 device tensors."""
    model.eval()
    out: dict[str, list] = {k: [] for k in heads}
    for s in range(0, len(idx), batch):
        i = idx[s:s + batch]
        with torch.autocast(i.device.type, dtype=torch.bfloat16, enabled=amp):
            for k, head in heads.items():
                out[k].append(head(i))
    model.train()
    return {k: torch.cat(v, dim=1).float() for k, v in out.items()}
