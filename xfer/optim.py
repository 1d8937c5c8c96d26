"""AdamW and gradient clipping for a population of models trained as one batched model.

Every parameter has a leading member axis P (`xfer.model.layers`). Each member has its own
learning rate, weight decay, gradient-clipping norm, step count and moments, and can be
switched off (`active`) without touching the others: an inactive member's weights do not move.
All of it is tensor arithmetic on the device (no host round trip), so the whole step can be
captured in a CUDA graph (HFTA's fused per-model optimiser, written out).

The update is torch.optim.AdamW's (decoupled weight decay, Loshchilov & Hutter 2019), per
member m with its own step count t_m:

    p <- p (1 - lr_m wd_m)
    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr_m / (1 - b1^t_m) * m / (sqrt(v) / sqrt(1 - b2^t_m) + eps)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checkpoint import cpu_copy
from .model.layers import member_view


class PopulationAdamW:
    def __init__(self, params: list[Tensor], lr: Tensor, weight_decay: Tensor, active: Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.active = lr, weight_decay, active   # [P] device tensors, read in place
        self.b1, self.b2 = betas
        self.eps = eps
        dev = lr.device
        self.t = torch.zeros(len(lr), device=dev)                            # each member's step count
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t.add_(self.active)
        t = self.t.clamp_min(1.0)
        lr = self.lr * self.active                                           # an inactive member does not move
        step_size = lr / (1.0 - torch.pow(self.b1, t))
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(self.b2, t))
        decay = 1.0 - lr * self.weight_decay
        live = [i for i, p in enumerate(self.params) if p.grad is not None]  # as torch's: no gradient, no step
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        exp_avg = [self.exp_avg[i] for i in live]
        exp_avg_sq = [self.exp_avg_sq[i] for i in live]
        torch._foreach_lerp_(exp_avg, grads, 1.0 - self.b1)
        torch._foreach_mul_(exp_avg_sq, self.b2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - self.b2)
        for p, m, v in zip(params, exp_avg, exp_avg_sq):
            denom = (v.sqrt() / member_view(bc2_sqrt, v)).add_(self.eps)
            p.mul_(member_view(decay, p)).sub_(member_view(step_size, p) * m / denom)

    # ------------------------------------------------------------------ members
    def member_state(self, m: int) -> dict:
        """Member m's optimiser state (a population of one's `state_dict`), on the CPU."""
        return cpu_copy({"step": self.t[m:m + 1], "exp_avg": [a[m:m + 1] for a in self.exp_avg],
                         "exp_avg_sq": [a[m:m + 1] for a in self.exp_avg_sq]})

    @torch.no_grad()
    def load_member_state(self, m: int, state: dict) -> None:
        self.t[m] = state["step"].reshape(-1)[0]
        for dst, src in zip(self.exp_avg, state["exp_avg"]):
            dst[m].copy_(src.reshape(dst[m].shape))
        for dst, src in zip(self.exp_avg_sq, state["exp_avg_sq"]):
            dst[m].copy_(src.reshape(dst[m].shape))

    @torch.no_grad()
    def reset_member(self, m: int) -> None:
        """A fresh start for member m (replaced by a new configuration)."""
        self.t[m] = 0
        for a in (*self.exp_avg, *self.exp_avg_sq):
            a[m].zero_()


@torch.no_grad()
def clip_grad_norm(params: list[Tensor], max_norm: Tensor) -> None:
    """Scale each member's gradients so that their joint L2 norm is at most max_norm[m]
    (torch.nn.utils.clip_grad_norm_ per member: coefficient max_norm / (norm + 1e-6), at most
    1); a max_norm of 0 leaves that member unclipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sq = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))
    for g in grads:
        g.mul_(member_view(coef, g).to(g.dtype))
