"""Building blocks: gradient reversal, MLP stacks, residual GELU blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float | Tensor) -> Tensor:
    """Identity forward; multiplies the gradient by -lam backward (Ganin & Lempitsky 2015).
    lam may be a 0-d tensor (read when the backward pass runs, as a CUDA graph needs)."""
    return _GradReverse.apply(x, lam if isinstance(lam, Tensor) else float(lam))


def mlp(dims: list[int], dropout: float = 0.0, final_act: bool = False) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Dropout between each pair of dims; the last layer
    is plain Linear unless final_act."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2 or final_act:
            layers += [nn.LayerNorm(dims[i + 1]), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: x + Dropout(W2 GELU(W1 LayerNorm(x)))."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.fc2(nn.functional.gelu(self.fc1(self.norm(x)))))
