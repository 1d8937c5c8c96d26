"""Building blocks of a population of same-shape networks trained as one batched model.

Every trainable tensor has a leading member axis P: a linear layer's weight is
[P, out, in] and its inputs are [P, n, in] (HFTA's horizontal fusion, one batched
matmul for all members). A single model is the population of one (P = 1). Inputs
without the member axis ([n, in], e.g. the same validation cells for every member)
broadcast to every member.

Randomness is per member and drawn outside the maths (`Noise`): on the CPU every
member has its own `torch.Generator`, seeded by its own seed, so a member's
initial weights, dropout masks and encoder corruption are the same whether it
trains alone or beside others; on a GPU one batched draw from the device
generator serves all members (one kernel, and capturable in a CUDA graph).

Per-member hyperparameters that act inside a layer (dropout rates) are [P]
buffers; a rate that is 0 for every member is left out of the maths (no draw).

    Noise          per-member uniform / normal draws
    PLinear        y = x W_m^T + b_m per member (nn.Linear's layout and init, per member)
    PLayerNorm     LayerNorm with per-member affine parameters
    PDropout       inverted dropout with a per-member rate
    drop_entries   masking noise (no rescaling) with a per-member rate
    mlp            Linear -> LayerNorm -> GELU -> Dropout stacks
    ResidualBlock  pre-norm residual GELU block
    grad_reverse   gradient reversal with a per-member strength
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def member_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-member vector v [P] shaped to broadcast over `like` [P, ...]."""
    return v.view(-1, *([1] * (like.ndim - 1)))


class Noise:
    """Per-member random draws. CPU: one generator per member (seeded by the member's seed),
    so a member draws the same numbers alone or in any population. CUDA: one batched draw
    from the device's default generator (graph-safe). Not a module: never in a state dict."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.skip: list[bool] | None = None   # members that draw nothing now (`only`)

    @contextlib.contextmanager
    def only(self, needed: Sequence[bool]):
        """Within this block, members whose `needed` is False draw nothing from their generators
        (their entries are filled with a constant): a member whose rate or term weight is 0 uses no
        randomness there, as it uses none when it trains alone (where that op is not run at all)."""
        prev = self.skip
        self.skip = [not n or bool(prev and prev[i]) for i, n in enumerate(needed)]
        try:
            yield
        finally:
            self.skip = prev

    @property
    def size(self) -> int:
        return len(self.seeds)

    def to(self, device) -> "Noise":
        self.device = torch.device(device)
        return self

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype, normal: bool) -> Tensor:
        if self.device.type == "cuda":
            fn = torch.randn if normal else torch.rand
            return fn((self.size, *shape), device=self.device, dtype=dtype)
        out = torch.empty((self.size, *shape), dtype=dtype)
        for m, g in enumerate(self.generators):
            if self.skip is not None and self.skip[m]:
                out[m].fill_(0.0 if normal else 1.0)  # u = 1 keeps every entry; z = 0 adds no noise
            else:
                (out[m].normal_ if normal else out[m].uniform_)(generator=g)
        return out.to(self.device)

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """U[0, 1) of shape [P, *shape]."""
        return self._draw(tuple(shape), dtype, False)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, 1) of shape [P, *shape]."""
        return self._draw(tuple(shape), dtype, True)

    def member_states(self) -> list[Tensor]:
        return [g.get_state() for g in self.generators]

    def set_member_state(self, m: int, state: Tensor) -> None:
        self.generators[m].set_state(state)

    def reseed(self, m: int, seed: int) -> None:
        self.seeds[m] = int(seed)
        self.generators[m] = torch.Generator().manual_seed(int(seed))


def _members(x: Tensor, size: int) -> Tensor:
    """x with the member axis: [n, d] -> [P, n, d] (a broadcast view); [P, n, d] unchanged."""
    return x.unsqueeze(0).expand(size, *x.shape) if x.ndim == 2 else x


class PLinear(nn.Module):
    """One linear layer per member: weight [P, out, in], bias [P, out]; x [P, n, in] (or [n, in],
    shared by all members) -> [P, n, out]. Each member is initialised as nn.Linear (uniform in
    +-1/sqrt(in)) from its own generator."""

    def __init__(self, size: int, in_features: int, out_features: int, noise: Noise):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        w = torch.empty(size, out_features, in_features)
        b = torch.empty(size, out_features)
        for m, g in enumerate(noise.generators):
            w[m].uniform_(-bound, bound, generator=g)
            b[m].uniform_(-bound, bound, generator=g)
        self.weight, self.bias = nn.Parameter(w), nn.Parameter(b)

    @torch.no_grad()
    def reset_member(self, m: int, generator: torch.Generator) -> None:
        """Member m's fresh initial weights, drawn as at construction."""
        bound = 1.0 / math.sqrt(self.in_features)
        w = torch.empty(self.weight.shape[1:]).uniform_(-bound, bound, generator=generator)
        b = torch.empty(self.bias.shape[1:]).uniform_(-bound, bound, generator=generator)
        self.weight[m].copy_(w)
        self.bias[m].copy_(b)

    def forward(self, x: Tensor) -> Tensor:
        # one batched matmul for every member (autocast runs baddbmm in bf16 on a GPU)
        return torch.baddbmm(self.bias.unsqueeze(1), _members(x, self.weight.shape[0]), self.weight.transpose(1, 2))


class PLayerNorm(nn.Module):
    """LayerNorm over the last axis with per-member weight and bias [P, d]."""

    def __init__(self, size: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(size, dim))
        self.bias = nn.Parameter(torch.zeros(size, dim))

    @torch.no_grad()
    def reset_member(self, m: int, generator: torch.Generator | None = None) -> None:
        self.weight[m].fill_(1.0)
        self.bias[m].zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = F.layer_norm(x, (self.dim,), eps=self.eps)  # float32 under autocast, as nn.LayerNorm
        return torch.addcmul(self.bias.unsqueeze(1), h, self.weight.unsqueeze(1))


def default_rate(cfg) -> float:
    """The dropout rate of most layers: the member's ModelConfig.dropout."""
    return float(cfg.dropout)


class PDropout(nn.Module):
    """Inverted dropout with a per-member rate p [P]: x * (u >= p) / (1 - p) in training.
    `rate_of(model config)` gives a member's rate (a member replaced by a new configuration)."""

    def __init__(self, rates: Sequence[float], noise: Noise, rate_of: Callable = default_rate):
        super().__init__()
        self.noise, self.rate_of = noise, rate_of
        self.rates = [float(r) for r in rates]
        self.live = any(r > 0 for r in rates)
        self.register_buffer("p", torch.tensor(self.rates, dtype=torch.float32), persistent=False)

    def set_rate(self, m: int, rate: float) -> None:
        self.p[m] = self.rates[m] = float(rate)
        self.live = any(r > 0 for r in self.rates)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.live):
            return x
        with self.noise.only([r > 0 for r in self.rates]):
            return x * dropout_mask(self.noise, self.p, x, rescale=True)


def dropout_mask(noise: Noise, p: Tensor, x: Tensor, rescale: bool) -> Tensor:
    """(u >= p_m) per entry of x [P, ...], divided by 1 - p_m when rescaling, in x's dtype."""
    u = noise.uniform(tuple(x.shape[1:]))
    pv = member_view(p, u)
    keep = (u >= pv).to(torch.float32)
    if rescale:
        keep = keep / (1.0 - pv)
    return keep.to(x.dtype)


def drop_entries(noise: Noise, x: Tensor, p: Tensor, rates: Sequence[float]) -> Tensor:
    """Masking noise: zero each entry of x [P, n, d] with its member's probability p [P] (host
    values: `rates`; no rescaling); x unchanged when no member has a rate above 0."""
    if not any(r > 0 for r in rates):
        return x
    x = _members(x, noise.size)
    with noise.only([r > 0 for r in rates]):
        return x * dropout_mask(noise, p, x, rescale=False)


def mlp(size: int, dims: list[int], rates: Sequence[float], noise: Noise, final_act: bool = False,
        rate_of: Callable = default_rate) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Dropout between each pair of dims; the last layer is plain
    Linear unless final_act. The dropout module is always there (names do not depend on the
    rates); it is the identity where every member's rate is 0."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(PLinear(size, dims[i], dims[i + 1], noise))
        if i < len(dims) - 2 or final_act:
            layers += [PLayerNorm(size, dims[i + 1]), nn.GELU(), PDropout(rates, noise, rate_of)]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: x + Dropout(W2 GELU(W1 LayerNorm(x)))."""

    def __init__(self, size: int, dim: int, hidden: int, rates: Sequence[float], noise: Noise):
        super().__init__()
        self.norm = PLayerNorm(size, dim)
        self.fc1 = PLinear(size, dim, hidden, noise)
        self.fc2 = PLinear(size, hidden, dim, noise)
        self.drop = PDropout(rates, noise)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lam) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        lam = ctx.lam
        if isinstance(lam, Tensor) and lam.ndim == 1:
            lam = member_view(lam, grad)
        return -lam * grad, None


def grad_reverse(x: Tensor, lam: float | Tensor) -> Tensor:
    """Identity forward; multiplies the gradient by -lam backward (Ganin & Lempitsky 2015).
    lam may be a 0-d tensor or one strength per member ([P], x [P, ...]); a tensor is read
    when the backward pass runs (as a CUDA graph needs)."""
    return _GradReverse.apply(x, lam if isinstance(lam, Tensor) else float(lam))


class MemberScalars(nn.Module):
    """Per-member hyperparameters as [P] float32 buffers (moved with the model, not saved: the
    members' configs hold them). `get(name)` is the buffer, or a plain 0.0 when every member's
    value is 0, so that a term nobody weights is not computed at all."""

    def __init__(self, values: dict[str, Sequence[float]]):
        super().__init__()
        self.names = tuple(values)
        self.values = {k: [float(v) for v in vs] for k, vs in values.items()}   # host copies
        self.zero = {k: all(float(v) == 0.0 for v in vs) for k, vs in values.items()}
        for k, vs in values.items():
            self.register_buffer(k, torch.tensor([float(v) for v in vs], dtype=torch.float32), persistent=False)

    def get(self, name: str) -> Tensor | float:
        return 0.0 if self.zero[name] else getattr(self, name)

    def nonzero(self, name: str) -> list[bool]:
        """Which members' value of `name` is not 0."""
        return [v != 0.0 for v in self.values[name]]

    def set_member(self, m: int, values: dict[str, float]) -> None:
        """Member m's values (a member replaced by a fresh configuration)."""
        for k, v in values.items():
            getattr(self, k)[m] = self.values[k][m] = float(v)
            self.zero[k] = all(x == 0.0 for x in self.values[k])
