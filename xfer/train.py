"""The one training loop: `fit(config, data, report)`.

`xfer train` calls it directly; Ray Tune trials (the `tune` package) call the
same function inside their workers, passing a `report(metrics, checkpoint)`
callback. It sees the training line's labelled cells (both modalities) and,
when `data.adapt` is set, another line's *unlabelled* peaks (`TrainData.
with_adaptation` drops that line's labels before they get here).

`fit` is a short loop over the named parts of a `Trainer`:

    begin_epoch            the warm-up factor of the adaptation weights
    refresh_pseudo_labels  self-training: class-balanced pseudo-labels of the adaptation
                           line from the model's own predictions, once per epoch after
                           the warm-up (lambda_pseudo > 0)
    train_epoch            shuffled mini-batches through `step`: one optimiser step on the
                           objective of `xfer.objective.batch_loss` (eager, or replayed as a
                           CUDA graph, `xfer.cuda_graph.StepGraph`)
    validate               the GEX and PEAK validation splits of the training line and, when
                           adapting, every label-free selection candidate (xfer.selection)
    TrainState.choose      best-epoch choice and early stopping by the objective (`objective`:
                           transfer or source_val, see xfer.selection): the best epoch is chosen
                           among the epochs after the warm-up (the adaptation fully on; the
                           last epoch if training ends sooner), and the patience counts
                           epochs from there
    checkpoint             the whole predictor plus what resuming needs (`xfer.checkpoint`)

`report` is called exactly once per epoch. The `TrainState` (model, optimiser,
best epoch and its weights, patience, RNG states, history) round-trips through
the checkpoint, so `fit(..., resume=checkpoint)` continues a run exactly. On a
GPU the inputs stay resident in GPU memory, the step runs under bf16 autocast
with fused AdamW, and the whole step is captured once as a CUDA graph and
replayed (`cuda_graph=false` turns it off). On the CPU the loop is seeded and
reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import losses as L
from . import selection
from .checkpoint import FORMAT, cpu_copy, to_tensors
from .config import TrainConfig
from .cuda_graph import StepGraph
from .device import Rows, allreduce_grads, distributed, resolve_device
from .errors import XferError
from .evaluate import METRIC_KEYS, classification_metrics
from .model import CDANN, build_model
from .objective import Batch, Weights, batch_loss
from .phases import N_PHASES, UNLABELLED
from .prepare import TrainData

Report = Callable[[dict, Callable[[], dict]], None]


@dataclass
class FitResult:
    model: CDANN                  # with the best epoch's weights loaded
    best_epoch: int
    best_metric: float
    history: list[dict]
    checkpoint: dict              # the best epoch's predictor (what best_model.pt holds)
    stopped_early: bool = False
    seconds: float = 0.0
    objective: str = ""           # what chose the best epoch (Trainer.objective_name)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- training state

@dataclass
class TrainState:
    """What a run has learnt so far; `resume_state` / `load` round-trip it through a checkpoint."""

    model: CDANN
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator              # host RNG: epoch order (and adaptation draws on the CPU)
    epoch: int = 0                        # the last finished epoch
    best_epoch: int = 0                   # 0: none chosen yet (still in the warm-up)
    best_metric: float = -math.inf
    best_weights: dict | None = None      # the best epoch's weights (a copy on the device)
    since_best: int = 0                   # eligible epochs since the best one (patience)
    history: list[dict] = field(default_factory=list)

    def choose(self, epoch: int, objective: float, eligible: bool) -> bool:
        """Best-epoch choice: keep this epoch's weights when it is eligible and better."""
        improved = eligible and objective > self.best_metric
        if improved:
            self.best_metric, self.best_epoch, self.since_best = objective, epoch, 0
            # a copy on the device (microseconds on a GPU; the host copy is made only for a checkpoint)
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif eligible:
            self.since_best += 1
        return improved

    def resume_state(self) -> dict:
        return {
            "optimizer": cpu_copy(self.optimizer.state_dict()),
            "best_model": None if self.best_epoch == self.epoch else cpu_copy(self.best_weights),
            "since_best": self.since_best, "history": list(self.history),
            "rng": {"torch": torch.get_rng_state(), "numpy": self.rng.bit_generator.state},
        }

    def load(self, ckpt: dict) -> None:
        """Continue from a training checkpoint (`Trainer.checkpoint`)."""
        ts = ckpt["train_state"]
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ts["optimizer"])
        self.epoch = int(ckpt["epoch"])
        self.history = list(ts.get("history", []))
        self.best_metric, self.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
        self.best_weights = ts.get("best_model") or cpu_copy(ckpt["model"])
        self.since_best = int(ts.get("since_best", 0))
        torch.set_rng_state(ts["rng"]["torch"])
        self.rng.bit_generator.state = ts["rng"]["numpy"]


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """One run's model, optimiser and device-resident data, and the parts of an epoch."""

    def __init__(self, cfg: TrainConfig, data: TrainData, device: str | torch.device | None = None,
                 memory_budget: int | None = None):
        self.cfg, self.data = cfg, data
        o, lo = cfg.optim, cfg.loss
        dev = self.dev = resolve_device(device)
        torch.manual_seed(o.seed)
        rng = np.random.default_rng(o.seed)
        self.adapt = data.adapt is not None
        self.dims = {"emb_dim": data.emb_dim, "n_peaks": data.n_peaks, "n_domains": 3 if self.adapt else 2}
        model = build_model(data.emb_dim, data.n_peaks, cfg.model, use_cdann=lo.use_cdann, seed=o.seed,
                            n_domains=self.dims["n_domains"])
        model.set_line_stats(data.line_stats)
        model.to(dev)
        # fused AdamW on CUDA, capturable so that a CUDA graph can hold the whole step
        opt_kwargs = {"fused": True, "capturable": True} if dev.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, **opt_kwargs)
        self.state = TrainState(model, opt, rng)
        self.model = model
        self.finished = False

        # the data, on the device when it fits (rows are densified per batch otherwise)
        self.on_cuda = self.amp = dev.type == "cuda"
        dtype = torch.bfloat16 if self.amp else torch.float32
        line = data.line
        self.E = Rows(line.emb, dev, torch.float32, memory_budget)
        self.P = Rows(line.peaks, dev, dtype, memory_budget)
        self.Y = torch.as_tensor(line.labels.astype(np.int64), device=dev)
        self.tr = torch.as_tensor(data.train_idx, dtype=torch.long, device=dev)
        self.va = torch.as_tensor(data.val_idx, dtype=torch.long, device=dev)
        self.y_val = line.labels[data.val_idx]
        self.prior = torch.as_tensor(data.class_prior, device=dev)
        self.class_weight = None
        if lo.class_weighted:
            w = 1.0 / np.maximum(data.class_prior, 1e-3)
            self.class_weight = torch.as_tensor(w / (w * data.class_prior).sum(), dtype=torch.float32, device=dev)
        self.PB = self.stats_b = None
        self.EB = self.stats_eb = None
        if self.adapt:
            self.PB = Rows(data.adapt.peaks, dev, dtype, memory_budget)
            stats_b = data.adapt.stats_tensors(dev)
            self.stats_b = stats_b["peaks"] if cfg.data.line_norm else None
            if data.adapt.emb is not None:  # the test line's expression (unlabelled): the agreement candidate
                self.EB = Rows(data.adapt.emb, dev, torch.float32, memory_budget)
                self.stats_eb = stats_b["emb"] if cfg.data.line_norm else None
        # model selection (xfer.selection): the candidate that chooses the best epoch, and the fixed
        # random subsets of cells the domain classifier and SND use
        self.objective = selection.resolve(o.objective, self.adapt, self.EB is not None)
        self.sel_train = self.sel_test = None
        if self.adapt:
            self.sel_train = self.tr[torch.as_tensor(selection.subset(len(data.train_idx), o.seed), device=dev)]
            self.sel_test = torch.as_tensor(selection.subset(len(self.PB), o.seed + 1), device=dev)
        # self-training: pseudo-labels of the adaptation line live in a device buffer refreshed in place
        self.self_training = self.adapt and lo.lambda_pseudo > 0
        self.YB = self.pseudo_weight = None
        if self.self_training:
            self.YB = torch.full((len(self.PB),), UNLABELLED, dtype=torch.long, device=dev)
            self.pseudo_weight = torch.zeros(N_PHASES, device=dev)

        # batches: drop the ragged last one (MMD likes equal sizes); with several data-parallel
        # ranks each takes its own shard of every step's cells
        self.n_train = len(data.train_idx)
        self.bs = min(o.batch_size, self.n_train)
        self.world, self.rank = distributed()
        self.steps = max(1, self.n_train // (self.bs * self.world))
        # On CUDA the per-step scalars live on the device (no host round trip, and a captured
        # CUDA graph reads them); on the CPU they stay Python floats.
        self.warm = 0.0
        self.warm_t = torch.zeros((), device=dev) if self.on_cuda else None
        self.grl_t = torch.zeros((), device=dev) if self.on_cuda else None
        self.graph = StepGraph(self.step, self.bs, dev, list(model.parameters())) if (
            self.on_cuda and o.cuda_graph and self.world == 1 and self.E.resident and self.P.resident
            and (self.PB is None or self.PB.resident)) else None

    # ------------------------------------------------------------------ the step
    def batch(self, idx: torch.Tensor) -> Batch:
        """The training cells `idx` and, when adapting, as many random cells of the other line."""
        if not self.adapt:
            return Batch(self.E[idx], self.P[idx], self.Y[idx])
        bi = (torch.randint(0, len(self.PB), (self.bs,), device=self.dev) if self.on_cuda
              else torch.as_tensor(self.state.rng.integers(0, len(self.PB), size=self.bs)))
        return Batch(self.E[idx], self.P[idx], self.Y[idx], xb=self.PB[bi], stats_b=self.stats_b,
                     yb=self.YB[bi.to(self.dev)] if self.self_training else None)

    def step(self, idx: torch.Tensor, warm, grl, autocast_cache: bool = True) -> dict[str, torch.Tensor]:
        """One optimiser step on the training cells `idx`; returns the detached loss parts."""
        model, opt = self.model, self.state.optimizer
        b = self.batch(idx)
        w = Weights(warm=warm, grl=grl, prior=self.prior, class_weight=self.class_weight,
                    pseudo_weight=self.pseudo_weight)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=autocast_cache):
            parts = batch_loss(model, self.cfg.loss, b, w)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        if self.world > 1:
            allreduce_grads(model, self.world)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        opt.step()
        return parts.detached()

    # ------------------------------------------------------------------ an epoch's parts
    def begin_epoch(self, epoch: int) -> float:
        """Training mode and the warm-up factor of this epoch (1.0: the adaptation fully on)."""
        self.model.train()
        self.warm = L.warmup_factor(epoch - 1, self.cfg.loss.warmup_epochs)
        if self.on_cuda:
            self.warm_t.fill_(self.warm)
        return self.warm

    @torch.no_grad()
    def refresh_pseudo_labels(self) -> int:
        """From the adaptation line's predictions (eval mode), keep the most confident
        `pseudo_fraction` of each predicted class as its pseudo-label (in place; -1 elsewhere)
        and weights that balance the kept classes. Returns how many cells were kept."""
        PB = self.PB
        probs = _predict_rows(self.model, {"peak": lambda i: self.model.predict_peaks(PB[i], self.stats_b)},
                              torch.arange(len(PB), device=self.dev), self.amp)["peak"]
        labels = L.select_pseudo_labels(probs, self.cfg.loss.pseudo_fraction)
        self.YB.copy_(labels)
        counts = torch.bincount(labels[labels >= 0], minlength=N_PHASES).float()
        kept = counts.sum()
        self.pseudo_weight.copy_(torch.where(counts > 0, kept / (N_PHASES * counts.clamp_min(1)),
                                             torch.zeros_like(counts)))
        return int(kept.item())

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Every step of one epoch over the shuffled training cells; the mean of each loss part."""
        o, lo, steps = self.cfg.optim, self.cfg.loss, self.steps
        order = self.tr[torch.as_tensor(self.state.rng.permutation(self.n_train), device=self.dev)]
        sums: dict[str, torch.Tensor] = {}
        for s in range(steps):
            grl = L.grl_lambda(((epoch - 1) * steps + s) / max(1, o.epochs * steps), lo.grl_gamma)
            start = (s * self.world + self.rank) * self.bs
            idx = order[start:start + self.bs]
            if self.on_cuda:
                self.grl_t.fill_(grl)
            if self.graph is not None and self.graph.run(idx, self.warm_t, self.grl_t):
                continue
            parts = self.step(idx, *((self.warm_t, self.grl_t) if self.on_cuda else (self.warm, grl)))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.float()
        if self.graph is not None:
            for k, v in self.graph.take_sums().items():
                sums[k] = sums.get(k, 0) + v
        means = (torch.stack(list(sums.values())) / steps).tolist()  # waits for the device
        return {f"loss/{k}": v for k, v in zip(sums, means)}

    def validate(self) -> dict[str, dict]:
        """Metrics of both heads on the training line's validation cells and, when adapting,
        every label-free selection candidate (`xfer.selection`) under "selection"."""
        model, E, P = self.model, self.E, self.P
        val = _predict_rows(model, {"gex": lambda i: model.predict_source(E[i]),
                                    "peak": lambda i: model.peak_latent(P[i]).z.float()}, self.va, self.amp)
        z_val = val["peak"]
        val["peak"] = self._classify(z_val)  # the PEAK latents are encoded once, for the metrics and the candidates
        out = {k: classification_metrics(self.y_val, v.cpu().numpy().argmax(1)) for k, v in val.items()}
        source_val = out["peak"][self.cfg.optim.metric]
        if not self.adapt:
            out["selection"] = {"source_val": source_val}
            return out
        PB, EB = self.PB, self.EB
        heads = {"z": lambda i: model.peak_latent(PB[i], self.stats_b).z.float()}
        if EB is not None:
            heads["gex"] = lambda i: model.predict_source(EB[i], self.stats_eb)
        test = _predict_rows(model, heads, torch.arange(len(PB), device=self.dev), self.amp)
        z_train = _predict_rows(model, {"z": lambda i: model.peak_latent(P[i]).z.float()}, self.sel_train,
                                self.amp)["z"]
        out["selection"] = selection.candidate_values(
            source_val, y_val=self.Y[self.va], p_val=val["peak"], z_val=z_val, z_train=z_train,
            p_test=self._classify(test["z"]), z_test=test["z"], p_test_gex=test.get("gex"), snd_rows=self.sel_test)
        return out

    @torch.no_grad()
    def _classify(self, z: torch.Tensor) -> torch.Tensor:
        """Class probabilities of PEAK latents (eval mode, float32), as `CDANN.predict_peaks`."""
        self.model.eval()
        probs = torch.softmax(self.model.classify(z).float(), -1)
        self.model.train()
        return probs

    # ------------------------------------------------------------------ outputs
    def checkpoint_builder(self) -> Callable[[], dict]:
        """What `report` gets: builds this epoch's checkpoint when called (most epochs need
        none). It must be called during that report: afterwards the state has moved on."""
        epoch = self.state.epoch

        def build() -> dict:
            if self.state.epoch != epoch or self.finished:
                raise RuntimeError(f"the checkpoint of epoch {epoch} was requested after epoch {self.state.epoch} "
                                   f"{'ended the run' if self.finished else 'began'}; build it inside the report "
                                   "callback")
            return self.checkpoint()
        return build

    def _predictor(self) -> dict:
        """The checkpoint entries that describe the predictor (all but the weights and epoch)."""
        s = self.state
        return {"format": FORMAT, "config": self.cfg.to_dict(), "dims": dict(self.dims),
                "preprocess": to_tensors(self.data.preprocess), "best_epoch": int(s.best_epoch),
                "best_metric": float(s.best_metric), "metric_name": self.objective_name}

    @property
    def objective_name(self) -> str:
        """What the best epoch was chosen by (source_val: the validation metric's own name)."""
        return f"peak_val_{self.cfg.optim.metric}" if self.objective == "source_val" else self.objective

    def checkpoint(self) -> dict:
        """The whole predictor at this epoch plus what resuming needs (see xfer.checkpoint)."""
        s = self.state
        return {**self._predictor(), "epoch": s.epoch,
                "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "train_state": s.resume_state()}

    def result(self, stopped_early: bool, seconds: float) -> FitResult:
        s = self.state
        if s.best_weights is None:  # resumed after the last epoch: nothing new
            s.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # the best epoch's predictor, without the resume state (what best_model.pt holds)
        best = {**self._predictor(), "epoch": s.best_epoch or s.epoch, "model": cpu_copy(s.best_weights)}
        self.finished = True  # the model now holds the best epoch's weights, not the last one's
        self.model.load_state_dict(s.best_weights)
        self.model.eval()
        return FitResult(model=self.model, best_epoch=s.best_epoch, best_metric=s.best_metric, history=s.history,
                         checkpoint=best, stopped_early=stopped_early, seconds=seconds,
                         objective=self.objective_name,
                         extra={"cuda_graph": self.graph.summary() if self.graph is not None else None})


def fit(cfg: TrainConfig, data: TrainData, report: Report | None = None, *,
        device: str | torch.device | None = None, resume: dict | None = None,
        memory_budget: int | None = None) -> FitResult:
    """Train the CDANN; report once per epoch; return the best epoch's model."""
    t_start = time.perf_counter()
    trainer = Trainer(cfg, data, device, memory_budget)
    state, o = trainer.state, cfg.optim
    if resume is not None:
        state.load(resume)
    stopped_early = False
    for epoch in range(state.epoch + 1, o.epochs + 1):
        t0 = time.perf_counter()
        warmed = trainer.begin_epoch(epoch) >= 1.0  # the adaptation fully on
        n_pseudo = trainer.refresh_pseudo_labels() if trainer.self_training and warmed else None
        losses = trainer.train_epoch(epoch)
        train_seconds = time.perf_counter() - t0
        val = trainer.validate()
        # a model is chosen only once the adaptation is fully on: before that it has not yet
        # been aligned to the other line, whatever the training line's validation says
        objective = val["selection"][trainer.objective]
        if not math.isfinite(objective):
            raise XferError(f"the selection objective {trainer.objective} is not finite at epoch {epoch}")
        improved = state.choose(epoch, objective, eligible=warmed or epoch == o.epochs)
        state.epoch = epoch
        metrics = _epoch_record(cfg, state, objective, val, losses, n_pseudo, trainer.warm, improved,
                                epoch_seconds=time.perf_counter() - t0, train_seconds=train_seconds)
        state.history.append(metrics)
        _check_finite(losses, epoch)
        stopped_early = state.since_best >= o.patience
        if stopped_early:
            metrics["stopped_early"] = True
        if report is not None:
            report(metrics, trainer.checkpoint_builder())
        if stopped_early:
            break
    return trainer.result(stopped_early, time.perf_counter() - t_start)


def _epoch_record(cfg: TrainConfig, state: TrainState, objective: float, val: dict, losses: dict,
                  n_pseudo: int | None, warm: float, improved: bool, **seconds) -> dict:
    """What `report` and training_history.json get for one epoch: `objective` (what chooses the
    best epoch), every selection candidate as `sel/<name>`, the validation metrics, the losses."""
    o = cfg.optim
    return {
        "epoch": state.epoch, "objective": objective, "best_epoch": state.best_epoch,
        "best_objective": state.best_metric if state.best_epoch else None,  # None: no epoch chosen yet (warm-up)
        **{f"gex_val_{k}": val["gex"][k] for k in METRIC_KEYS}, **{f"peak_val_{k}": val["peak"][k] for k in METRIC_KEYS},
        **{f"sel/{k}": v for k, v in val["selection"].items()},
        **losses, **({"pseudo_labels": n_pseudo} if n_pseudo is not None else {}),
        "warmup": warm, "adapted_epochs": adapted_epochs(state.epoch, cfg.loss.warmup_epochs),
        "grl_lambda": L.grl_lambda((state.epoch - 1) / o.epochs, cfg.loss.grl_gamma),
        **seconds, "improved": improved,
    }


def adapted_epochs(epoch: int, warmup_epochs: int) -> int:
    """Epochs so far with the adaptation fully on (`Trainer.begin_epoch`'s factor 1.0: from epoch
    warmup_epochs + 1): a sweep's ASHA counts its rungs in these, so that every trial is judged
    after the same number of epochs in which a model could be chosen (tune.searcher)."""
    return max(0, int(epoch) - max(0, int(warmup_epochs)))


def _check_finite(losses: dict, epoch: int) -> None:
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise XferError(f"training diverged at epoch {epoch} (non-finite loss: {bad}); lower lr")


@torch.no_grad()
def _predict_rows(model: CDANN, heads: dict[str, Callable[[torch.Tensor], torch.Tensor]], idx: torch.Tensor,
                  amp: bool, batch: int = 4096) -> dict[str, torch.Tensor]:
    """Class probabilities of the rows `idx` from each head (e.g. `lambda i: model.predict_peaks(P[i])`),
    in eval mode, from device-resident rows (no host round trip of inputs); float32 device tensors."""
    model.eval()
    out: dict[str, list] = {k: [] for k in heads}
    for s in range(0, len(idx), batch):
        i = idx[s:s + batch]
        with torch.autocast(i.device.type, dtype=torch.bfloat16, enabled=amp):
            for k, head in heads.items():
                out[k].append(head(i))
    model.train()
    return {k: torch.cat(v).float() for k, v in out.items()}
