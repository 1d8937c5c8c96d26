"""The one training loop: `fit(config, data, report)`.

`xfer train` calls it directly; Ray Tune trials (the `tune` package) call the
same function inside their workers, passing a `report(metrics, checkpoint)`
callback. It sees only the training line (TrainData): the test line and its
labels never reach it.

Per epoch: shuffled mini-batches of the training cells of the training line;
each batch's loss is the weighted sum of named parts (xfer.losses):

    class_source   CE of the phase classifier on projected expression embeddings
    class_target   CE on the paired PEAK encodings (lambda_target_class)
    adversarial    CDANN: discriminator on the multilinear map of the detached
                   class probabilities and the latents, behind gradient
                   reversal with lambda_p = 2/(1+exp(-gamma p)) - 1
    divergence     mmd / kl / jensen / coral between source and target latents
    balance        KL(mean target prediction || training class prior)
    entropy        mean entropy of target predictions
    + the encoder's own objective (recon / kl / contrastive)

The adaptation weights (adversarial, divergence, entropy) ramp up linearly
over warmup_epochs. After each epoch the GEX and PEAK validation splits are
scored and `report` is called exactly once; early stopping watches the PEAK
validation metric with a patience counted in epochs. The best epoch is chosen
among the epochs after the warm-up (the adaptation fully on; the last epoch if
training ends sooner), and the patience counts from there. With self-training
(lambda_pseudo > 0) the test line's cells get class-balanced pseudo-labels from
the model's own predictions, refreshed at the start of every epoch after the
warm-up.

On a GPU the inputs stay resident in GPU memory, the step runs under bf16
autocast with fused AdamW, and the whole step is captured once as a CUDA graph
and replayed (`_StepGraph`; `cuda_graph=false` turns it off). On the CPU the
loop is seeded and reproducible.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from . import losses as L
from .config import TrainConfig
from .evaluate import METRIC_KEYS, classification_metrics
from .model import CDANN, build_model
from .phases import N_PHASES, UNLABELLED
from .prepare import LineInputs, TrainData

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "xfer.cdann/1"
Report = Callable[[dict, Callable[[], dict]], None]


# ----------------------------------------------------------------------------- device data

def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError
        raise ConfigError("device", "CUDA was requested but no GPU is available")
    return dev


class Rows:
    """Row access to a (sparse) matrix on a device: the whole matrix lives on the
    device when it fits the memory budget, else rows are densified per batch."""

    def __init__(self, X, device: torch.device, dtype: torch.dtype, budget_bytes: int | None = None):
        self.device, self.dtype = device, dtype
        self.shape = X.shape
        nbytes = X.shape[0] * X.shape[1] * torch.tensor([], dtype=dtype).element_size()
        if budget_bytes is None:
            budget_bytes = _memory_budget(device)
        self.resident = nbytes <= budget_bytes
        if self.resident:
            dense = X.toarray() if sp.issparse(X) else np.asarray(X)
            self.full = torch.tensor(dense, dtype=torch.float32).to(device, dtype)
            self.host = None
        else:
            self.full = None
            self.host = sp.csr_matrix(X, dtype=np.float32)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.full.index_select(0, idx)
        rows = self.host[idx.cpu().numpy()].toarray()
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, self.dtype, non_blocking=True)


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 6 << 30


# ----------------------------------------------------------------------------- results

@dataclass
class FitResult:
    model: CDANN                  # with the best epoch's weights loaded
    best_epoch: int
    best_metric: float
    history: list[dict]
    checkpoint: dict              # the best epoch's checkpoint (what best_model.pt holds)
    stopped_early: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _cpu_copy(obj):
    """A detached CPU copy of a (nested) state dict: later training steps must not
    change a checkpoint that was already handed out."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _np_to_torch(obj):
    """Checkpoints hold tensors, not numpy arrays (torch.load(weights_only=True))."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _np_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_np_to_torch(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- data parallelism

def _distributed() -> tuple[int, int]:
    """(world size, rank) when a torch.distributed process group is up (Ray Train
    workers), else (1, 0)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _allreduce_grads(model: torch.nn.Module, world: int) -> None:
    """Average gradients over ranks (every rank starts from the same seeded weights
    and applies the same averaged update, so the replicas stay identical)."""
    import torch.distributed as dist
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


# ----------------------------------------------------------------------------- the loop

def _set_line_stats(model: CDANN, stats: dict) -> None:
    if "emb" in stats:
        model.src_norm.set_stats(*(torch.as_tensor(a) for a in stats["emb"]))
    if "peaks" in stats:
        model.peak_norm.set_stats(*(torch.as_tensor(a) for a in stats["peaks"]))


def line_stats_tensors(line: LineInputs, device) -> dict:
    """Another line's own LineNorm statistics (label-free), as device tensors."""
    return {k: tuple(torch.as_tensor(a, device=device) for a in v) for k, v in line.stats().items()}


@torch.no_grad()
def predict(model: CDANN, emb=None, peaks=None, stats: dict | None = None, device=None,
            batch: int = 4096) -> dict[str, np.ndarray]:
    """Class probabilities from expression embeddings and/or peaks (numpy / CSR in).
    `stats`: another line's LineNorm statistics (None: the training line's)."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out = {}
    amp = device.type == "cuda"
    try:
        for key, X in (("gex", emb), ("peak", peaks)):
            if X is None:
                continue
            probs = []
            for s in range(0, X.shape[0], batch):
                chunk = X[s:s + batch]
                chunk = chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk)
                t = torch.tensor(chunk, dtype=torch.float32, device=device)
                st = None if stats is None else stats.get("emb" if key == "gex" else "peaks")
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    p = model.predict_source(t, st) if key == "gex" else model.predict_peaks(t, st)
                probs.append(p.float().cpu().numpy())
            out[key] = np.concatenate(probs) if probs else np.zeros((0, 3), np.float32)
    finally:
        model.train(was)
    return out


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


def fit(cfg: TrainConfig, data: TrainData, report: Report | None = None, *,
        device: str | torch.device | None = None, resume: dict | None = None,
        memory_budget: int | None = None) -> FitResult:
    """Train the CDANN on the training line; report once per epoch; return the best model."""
    t_start = time.perf_counter()
    dev = resolve_device(device)
    o, lo = cfg.optim, cfg.loss
    torch.manual_seed(o.seed)
    rng = np.random.default_rng(o.seed)
    adapt = data.adapt
    n_domains = 3 if adapt is not None else 2
    model = build_model(data.emb_dim, data.n_peaks, cfg.model, use_cdann=lo.use_cdann, seed=o.seed,
                        n_domains=n_domains)
    _set_line_stats(model, data.line_stats)
    model.to(dev)
    # fused AdamW on CUDA, capturable so that a CUDA graph can hold the whole step
    opt_kwargs = {"fused": True, "capturable": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, **opt_kwargs)

    amp = dev.type == "cuda"
    dtype = torch.bfloat16 if amp else torch.float32
    line = data.line
    tr = torch.as_tensor(data.train_idx, dtype=torch.long, device=dev)
    E = Rows(line.emb, dev, torch.float32, memory_budget)
    P = Rows(line.peaks, dev, dtype, memory_budget)
    Y = torch.as_tensor(line.labels.astype(np.int64), device=dev)
    prior = torch.as_tensor(data.class_prior, device=dev)
    class_weight = None
    if lo.class_weighted:
        w = 1.0 / np.maximum(data.class_prior, 1e-3)
        class_weight = torch.as_tensor(w / (w * data.class_prior).sum(), dtype=torch.float32, device=dev)
    y_val = line.labels[data.val_idx]
    va = torch.as_tensor(data.val_idx, dtype=torch.long, device=dev)
    n_train, bs = len(data.train_idx), min(o.batch_size, len(data.train_idx))
    if adapt is not None:
        PB = Rows(adapt.peaks, dev, dtype, memory_budget)
        stats_b = line_stats_tensors(adapt, dev)["peaks"] if cfg.data.line_norm else None
        n_b = adapt.peaks.shape[0]
    # self-training: class-balanced pseudo-labels of the adaptation line, refreshed from the
    # model's own predictions once per epoch after the warm-up (never from its labels)
    pseudo = adapt is not None and lo.lambda_pseudo > 0
    if pseudo:
        YB = torch.full((n_b,), UNLABELLED, dtype=torch.long, device=dev)
        all_b = torch.arange(n_b, device=dev)
        pseudo_weight = torch.zeros(N_PHASES, device=dev)
    world, rank = _distributed()
    # drop the ragged last batch (MMD likes equal sizes); with several data-parallel
    # ranks each takes its own shard of every step's cells
    steps = max(1, n_train // (bs * world))

    history: list[dict] = []
    best = {"metric": -math.inf, "epoch": 0, "state": None}
    since_best, start_epoch = 0, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        start_epoch = int(resume["epoch"]) + 1
        history = list(resume.get("history", []))
        best = {"metric": float(resume["best_metric"]), "epoch": int(resume["best_epoch"]),
                "state": resume.get("best_model") or copy.deepcopy(resume["model"])}
        since_best = int(resume.get("since_best", 0))
        torch.set_rng_state(resume["rng"]["torch"])
        rng.bit_generator.state = resume["rng"]["numpy"]

    def make_checkpoint(epoch: int) -> Callable[[], dict]:
        def build() -> dict:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return {
                "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch,
                "best_metric": float(best["metric"]), "best_epoch": int(best["epoch"]),
                "metric_name": f"peak_val_{o.metric}", "model": state,
                "best_model": None if best["epoch"] == epoch else _cpu_copy(best["state"]),
                "optimizer": _cpu_copy(opt.state_dict()), "since_best": since_best,
                "dims": {"emb_dim": data.emb_dim, "n_peaks": data.n_peaks, "n_domains": n_domains},
                "preprocess": _np_to_torch(data.preprocess), "history": list(history),
                "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state},
            }
        return build

    # On CUDA the per-step scalars live on the device (no host round trip, and a captured
    # CUDA graph reads them); on the CPU they stay Python floats.
    on_cuda = dev.type == "cuda"
    warm_t = torch.zeros((), device=dev) if on_cuda else None
    grl_t = torch.zeros((), device=dev) if on_cuda else None

    def train_step(idx: torch.Tensor, warm, grl, autocast_cache: bool = True) -> dict[str, torch.Tensor]:
        """One optimiser step on the training cells `idx`; returns the detached loss parts."""
        emb, x, y = E[idx], P[idx], Y[idx]
        xb = yb = None
        if adapt is not None:
            bi = (torch.randint(0, n_b, (bs,), device=dev) if on_cuda
                  else torch.as_tensor(rng.integers(0, n_b, size=bs)))
            xb = PB[bi]
            if pseudo:
                yb = YB[bi.to(dev)]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=autocast_cache):
            parts = _batch_loss(model, cfg, emb, x, y, prior, warm, grl, class_weight,
                                xb, stats_b if adapt is not None else None,
                                yb, pseudo_weight if pseudo else None)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        if world > 1:
            _allreduce_grads(model, world)
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        return parts.detached()

    graph = _StepGraph(train_step, bs, dev, list(model.parameters())) if (
        on_cuda and o.cuda_graph and world == 1 and E.resident and P.resident
        and (adapt is None or PB.resident)) else None

    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, o.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        warm = L.warmup_factor(epoch - 1, lo.warmup_epochs)
        if on_cuda:
            warm_t.fill_(warm)
        warmed = warm >= 1.0  # the adaptation fully on
        if pseudo and warmed:
            probs_b = _predict_rows(model, {"peak": lambda i: model.predict_peaks(PB[i], stats_b)}, all_b, amp)
            n_pseudo = _set_pseudo_labels(probs_b["peak"], lo.pseudo_fraction, YB, pseudo_weight)
        order = tr[torch.as_tensor(rng.permutation(n_train), device=dev)]
        sums: dict[str, torch.Tensor] = {}
        for s in range(steps):
            progress = ((epoch - 1) * steps + s) / max(1, o.epochs * steps)
            grl = L.grl_lambda(progress, lo.grl_gamma)
            lo_i = (s * world + rank) * bs
            idx = order[lo_i:lo_i + bs]
            if on_cuda:
                grl_t.fill_(grl)
            if graph is not None and graph.run(idx, warm_t, grl_t):
                continue
            parts = train_step(idx, *((warm_t, grl_t) if on_cuda else (warm, grl)))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.float()
        if graph is not None:
            for k, v in graph.take_sums().items():
                sums[k] = sums.get(k, 0) + v
        loss_means = {f"loss/{k}": v for k, v in zip(sums, (torch.stack(list(sums.values())) / steps).tolist())}
        train_seconds = time.perf_counter() - t0  # .tolist() above waited for the device

        probs = {k: v.cpu().numpy() for k, v in _predict_rows(
            model, {"gex": lambda i: model.predict_source(E[i]), "peak": lambda i: model.predict_peaks(P[i])},
            va, amp).items()}
        m_gex = classification_metrics(y_val, probs["gex"].argmax(1))
        m_peak = classification_metrics(y_val, probs["peak"].argmax(1))
        objective = m_peak[o.metric]
        # a model is chosen only once the adaptation is fully on: before that it has not yet
        # been aligned to the other line, whatever the training line's validation says
        eligible = warmed or epoch == o.epochs
        improved = eligible and objective > best["metric"]
        if improved:
            # a copy on the device (a GPU-to-GPU copy takes microseconds; the host copy is made
            # only when a checkpoint is built)
            best = {"metric": objective, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            since_best = 0
        elif eligible:
            since_best += 1
        metrics = {
            "epoch": epoch, "objective": objective, "best_epoch": best["epoch"],
            "best_objective": best["metric"] if best["epoch"] else None,  # None: no epoch chosen yet (warm-up)
            **{f"gex_val_{k}": m_gex[k] for k in METRIC_KEYS}, **{f"peak_val_{k}": m_peak[k] for k in METRIC_KEYS},
            **loss_means, **({"pseudo_labels": n_pseudo} if pseudo and warmed else {}),
            "warmup": warm, "grl_lambda": L.grl_lambda((epoch - 1) / o.epochs, lo.grl_gamma),
            "epoch_seconds": time.perf_counter() - t0, "train_seconds": train_seconds, "improved": improved,
        }
        history.append(metrics)
        if not all(math.isfinite(v) for k, v in loss_means.items()):
            from .errors import XferError
            raise XferError(f"training diverged at epoch {epoch} (non-finite loss: "
                            f"{ {k: v for k, v in loss_means.items() if not math.isfinite(v)} }); lower lr")
        if since_best >= o.patience:
            stopped_early = True
            metrics["stopped_early"] = True
        if report is not None:
            report(metrics, make_checkpoint(epoch))
        if stopped_early:
            break

    if best["state"] is None:  # resumed after the last epoch: nothing new
        best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final_ckpt = make_checkpoint(epoch)()
    model.load_state_dict(best["state"])
    best_ckpt = {**final_ckpt, "model": _cpu_copy(best["state"]), "best_model": None, "epoch": best["epoch"]}
    model.eval()
    return FitResult(model=model, best_epoch=best["epoch"], best_metric=best["metric"], history=history,
                     checkpoint=best_ckpt, stopped_early=stopped_early, seconds=time.perf_counter() - t_start,
                     extra={"cuda_graph": graph.summary() if graph is not None else None})


@torch.no_grad()
def _set_pseudo_labels(probs: torch.Tensor, fraction: float, YB: torch.Tensor, weight: torch.Tensor) -> int:
    """From the adaptation cells' predictions, keep the most confident `fraction` of each
    predicted class as its pseudo-label (in place in YB, -1 elsewhere) and set class
    weights that balance the kept cells. Returns how many cells were kept."""
    labels = L.select_pseudo_labels(probs, fraction)
    YB.copy_(labels)
    counts = torch.bincount(labels[labels >= 0], minlength=N_PHASES).float()
    kept = counts.sum()
    weight.copy_(torch.where(counts > 0, kept / (N_PHASES * counts.clamp_min(1)), torch.zeros_like(counts)))
    return int(kept.item())


def _batch_loss(model: CDANN, cfg: TrainConfig, emb, x, y, prior, warm, grl,
                class_weight=None, xb=None, stats_b=None, yb=None, pseudo_weight=None) -> L.LossParts:
    """One batch's loss. Domains: training-line expression (emb), training-line peaks
    (x, paired with emb, labels y) and, when adapting, test-line peaks (xb, unlabelled;
    yb: their pseudo-labels when self-training, -1 for cells without one)."""
    lo = cfg.loss
    z_s = model.source_latent(emb)
    x_norm = model.normalise_peaks(x)
    out_t = model.peak_latent(x, normalised=x_norm)
    z_t = out_t.z
    logit_s, logit_t = model.classify(z_s), model.classify(z_t)
    p_s, p_t = torch.softmax(logit_s.float(), -1), torch.softmax(logit_t.float(), -1)
    latents, probs = [z_s, z_t], [p_s, p_t]
    if xb is not None:
        xb_norm = model.normalise_peaks(xb, stats_b)
        out_b = model.peak_latent(xb, normalised=xb_norm)
        latents.append(out_b.z)
        logit_b = model.classify(out_b.z)
        probs.append(torch.softmax(logit_b.float(), -1))
    p_unl = probs[-1]  # the predictions the entropy and balance terms act on

    def adversarial():
        logits = [model.discriminate(z, p, grl).float() for z, p in zip(latents, probs)]
        weights = None
        if lo.use_cdann and lo.entropy_conditioning:
            weights = [L.entropy_weights(p.detach()) for p in probs]
        return L.adversarial(logits, weights)

    def divergence():
        d = L.divergence(lo.divergence, z_s, z_t)
        if xb is not None:
            d = d + L.divergence(lo.divergence, z_t, latents[2])
        return d

    def ramped(lam: float):  # warm may be a 0-d device tensor (CUDA): a weight of 0 stays a static 0
        return 0.0 if lam == 0 else lam * warm

    terms = {
        "class_source": (lo.lambda_class, lambda: L.classification(logit_s.float(), y, class_weight,
                                                                   label_smoothing=lo.label_smoothing)),
        "class_target": (lo.lambda_target_class,
                         lambda: L.classification(logit_t.float(), y, class_weight,
                                                  label_smoothing=lo.label_smoothing)),
        "adversarial": (ramped(lo.lambda_domain), adversarial),
        "divergence": (ramped(lo.lambda_divergence), divergence),
        "balance": (lo.lambda_balance, lambda: L.class_balance(p_unl, prior)),
        "entropy": (ramped(lo.lambda_entropy), lambda: L.entropy(p_unl)),
    }
    if yb is not None:
        terms["pseudo"] = (lo.lambda_pseudo, lambda: L.classification(logit_b.float(), yb, pseudo_weight))
    terms.update(model.encoder.objective(x_norm, out_t, z_s))
    if xb is not None:
        terms.update({f"{k}_adapt": v for k, v in model.encoder.objective(xb_norm, out_b, None).items()})
    return L.combine(terms)


# ----------------------------------------------------------------------------- CUDA graph

class _StepGraph:
    """The whole training step (gather, forward, backward, clipping, fused AdamW) captured once
    as a CUDA graph and replayed: one launch per step instead of hundreds, so a small model's
    step costs the GPU's time rather than Python's. Steps run eagerly (on a side stream, as
    PyTorch's whole-network capture recipe asks) until WARMUP steps have run, then the next
    step is captured. The step's inputs are static tensors (the batch's cell indices, the
    warm-up and GRL weights as 0-d device tensors); the adaptation line's cells are drawn on
    the device inside the graph; dropout and the other random ops use the CUDA generator,
    which graph replays advance. If capture fails (an op that needs the host), the loop logs
    why and goes on eagerly."""

    WARMUP = 3

    def __init__(self, step: Callable, bs: int, dev: torch.device, params: list[torch.Tensor]):
        self.step, self.dev, self.params = step, dev, params
        self.idx = torch.zeros(bs, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.names: list[str] = []
        self.vec: torch.Tensor | None = None     # the captured step's loss parts, stacked
        self.acc: torch.Tensor | None = None     # their sum over this epoch's replays
        self.seen = 0
        self.failed = False
        self.replays = 0

    def run(self, idx: torch.Tensor, warm: torch.Tensor, grl: torch.Tensor) -> bool:
        """Do this step through the graph (capturing it first when due); False: run it eagerly."""
        if self.failed:
            return False
        if self.graph is None:
            self.seen += 1
            if self.seen <= self.WARMUP:
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(torch.cuda.current_stream(self.dev))
                with torch.cuda.stream(side):
                    self._add(self.step(idx, warm, grl))
                torch.cuda.current_stream(self.dev).wait_stream(side)
                return True
            if not self._capture(warm, grl):
                return False
        self.idx.copy_(idx)
        self.graph.replay()
        self.replays += 1
        self._accumulate(self.vec)
        return True

    def _add(self, parts: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = list(parts)
        self._accumulate(torch.stack([v.float() for v in parts.values()]))

    def _accumulate(self, vec: torch.Tensor) -> None:
        self.acc = vec.clone() if self.acc is None else self.acc.add_(vec)

    def _capture(self, warm: torch.Tensor, grl: torch.Tensor) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.dev)
            # thread_local: a thread beside this one (a Ray Tune worker's) may use CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                parts = self.step(self.idx, warm, grl, autocast_cache=False)
                vec = torch.stack([v.float() for v in parts.values()])
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager steps
            log.warning("CUDA graph capture of the training step failed (%s: %s); training on eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.failed = True
            for p in self.params:  # drop gradients that point into the abandoned capture
                p.grad = None
            return False
        if self.names and list(parts) != self.names:
            log.warning("CUDA graph: loss parts changed between steps (%s vs %s); training on eagerly",
                        list(parts), self.names)
            self.failed = True
            return False
        self.graph, self.vec, self.names = graph, vec, list(parts)
        return True

    def summary(self) -> dict:
        return {"captured": self.graph is not None, "failed": self.failed, "replays": self.replays}

    def take_sums(self) -> dict[str, torch.Tensor]:
        """This epoch's summed loss parts of the steps done here (graph or warm-up), then reset."""
        if self.acc is None:
            return {}
        out = dict(zip(self.names, self.acc.unbind(0)))
        self.acc = None
        return out


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt: dict, path) -> None:
    import os
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu") -> tuple[CDANN, TrainConfig, dict]:
    """Rebuild the model a checkpoint describes (torch.load with weights_only=True)."""
    from .errors import StoreError

    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise StoreError(path, f"not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(path, f"not an xfer checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'})")
    cfg = TrainConfig.from_dict(ckpt["config"], source=str(path), allow_inert=True)
    dims = ckpt["dims"]
    model = build_model(dims["emb_dim"], dims["n_peaks"], cfg.model, use_cdann=cfg.loss.use_cdann,
                        seed=cfg.optim.seed, n_domains=dims.get("n_domains", 2))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, cfg, ckpt
