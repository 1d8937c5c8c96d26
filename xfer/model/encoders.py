"""The five peak encoders. Each maps (normalised) accessibility to the shared space
and owns its objective, trained and weighted by config:

    dae          input corruption + reconstruction through a decoder
    vae          reparameterised latent, beta-weighted KL + reconstruction;
                 the posterior mean at evaluation (deterministic)
    contrastive  NT-Xent between a cell's accessibility view (augmented by peak
                 dropout) and its expression view (paired multiome)
    hybrid       residual GELU blocks (2,048 hidden units by default)
    mlp          plain feed-forward baseline

Interface: `perturb(x)` (training-time corruption of the line-standardised
input: masking noise, a masked entry set to 0 = the line's mean), `forward(x)
-> EncoderOutput`, and `objective(x_clean, out, z_source) -> {name: (weight,
term)}` whose terms the loop adds to its loss. Reconstruction is the mean
squared error against the clean standardised input, whatever the input
representation (peaks, LSI, coverage bins).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import losses as L
from ..config import ModelConfig
from .layers import ResidualBlock, mlp


@dataclass
class EncoderOutput:
    z: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def _drop_entries(x: Tensor, p: float) -> Tensor:
    """Masking noise: zero each entry with probability p (no rescaling)."""
    if p <= 0:
        return x
    return x * (torch.rand_like(x, dtype=torch.float32) >= p).to(x.dtype)


class PeakEncoder(nn.Module):
    arch = "base"

    def __init__(self, n_peaks: int, cfg: ModelConfig):
        super().__init__()
        self.n_peaks = n_peaks
        self.cfg = cfg

    def perturb(self, x: Tensor) -> Tensor:
        return _drop_entries(x, self.cfg.peak_dropout)

    def forward(self, x: Tensor) -> EncoderOutput:
        raise NotImplementedError

    def objective(self, x_clean: Tensor, out: EncoderOutput, z_source: Tensor | None) -> dict:
        return {}


def _hidden(cfg: ModelConfig) -> list[int]:
    return [cfg.hidden_dim] * cfg.n_layers


class MLPEncoder(PeakEncoder):
    arch = "mlp"

    def __init__(self, n_peaks: int, cfg: ModelConfig):
        super().__init__(n_peaks, cfg)
        self.net = mlp([n_peaks, *_hidden(cfg), cfg.latent_dim], cfg.dropout)

    def forward(self, x: Tensor) -> EncoderOutput:
        return EncoderOutput(self.net(x))


class DAEEncoder(MLPEncoder):
    arch = "dae"

    def __init__(self, n_peaks: int, cfg: ModelConfig):
        super().__init__(n_peaks, cfg)
        self.decoder = mlp([cfg.latent_dim, *reversed(_hidden(cfg)), n_peaks], cfg.dropout)

    def perturb(self, x: Tensor) -> Tensor:
        return _drop_entries(super().perturb(x), self.cfg.corruption)

    def objective(self, x_clean, out, z_source):
        return {"recon": (self.cfg.lambda_recon, lambda: L.reconstruction_mse(self.decoder(out.z).float(), x_clean.float()))}


class VAEEncoder(PeakEncoder):
    arch = "vae"

    def __init__(self, n_peaks: int, cfg: ModelConfig):
        super().__init__(n_peaks, cfg)
        h = _hidden(cfg)
        self.body = mlp([n_peaks, *h], cfg.dropout, final_act=True)
        self.mu = nn.Linear(h[-1], cfg.latent_dim)
        self.logvar = nn.Linear(h[-1], cfg.latent_dim)
        self.decoder = mlp([cfg.latent_dim, *reversed(h), n_peaks], cfg.dropout)

    def forward(self, x: Tensor) -> EncoderOutput:
        h = self.body(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu  # deterministic posterior mean at evaluation
        return EncoderOutput(z, {"mu": mu, "logvar": logvar})

    def objective(self, x_clean, out, z_source):
        return {
            "recon": (self.cfg.lambda_recon, lambda: L.reconstruction_mse(self.decoder(out.z).float(), x_clean.float())),
            "kl": (self.cfg.lambda_recon * self.cfg.beta,
                   lambda: L.gaussian_kl_standard(out.extras["mu"].float(), out.extras["logvar"].float())
                   / self.cfg.latent_dim),
        }


class ContrastiveEncoder(MLPEncoder):
    arch = "contrastive"

    def __init__(self, n_peaks: int, cfg: ModelConfig):
        super().__init__(n_peaks, cfg)
        # one projection head for both views (they already live in the shared space)
        self.projection = mlp([cfg.latent_dim, cfg.latent_dim, cfg.proj_dim])

    def perturb(self, x: Tensor) -> Tensor:
        return _drop_entries(super().perturb(x), self.cfg.aug_dropout)

    def objective(self, x_clean, out, z_source):
        if z_source is None:
            return {}
        return {"contrastive": (self.cfg.lambda_contrastive,
                                lambda: L.nt_xent(self.projection(out.z), self.projection(z_source),
                                                  self.cfg.temperature))}


class HybridEncoder(PeakEncoder):
    arch = "hybrid"

    def __init__(self, n_peaks: int, cfg: ModelConfig):
        super().__init__(n_peaks, cfg)
        width = cfg.hybrid_width
        self.inp = nn.Sequential(nn.Linear(n_peaks, width), nn.GELU(), nn.Dropout(cfg.dropout))
        self.blocks = nn.Sequential(*[ResidualBlock(width, width, cfg.dropout) for _ in range(cfg.n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.latent_dim))

    def forward(self, x: Tensor) -> EncoderOutput:
        return EncoderOutput(self.out(self.blocks(self.inp(x))))


ENCODERS: dict[str, type[PeakEncoder]] = {
    cls.arch: cls for cls in (DAEEncoder, VAEEncoder, ContrastiveEncoder, HybridEncoder, MLPEncoder)
}
