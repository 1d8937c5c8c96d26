"""The five built-in peak encoders. Each maps (normalised) accessibility to the shared space
and owns its objective, trained and weighted by config. Each is registered, with its own
parameters (defaults, ranges, search-space entries), in xfer/builtin.py; `encoder_class`
gives the class a config's `arch` names (an extension's encoder too: xfer.registry):

    dae          input corruption + reconstruction through a decoder
    vae          reparameterised latent, beta-weighted KL + reconstruction;
                 the posterior mean at evaluation (deterministic)
    contrastive  NT-Xent between a cell's accessibility view (augmented by peak
                 dropout) and its expression view (paired multiome)
    hybrid       residual GELU blocks (2,048 hidden units by default)
    mlp          plain feed-forward baseline

Every encoder is a population of P same-shape encoders (`xfer.model.layers`): inputs
[P, n, peaks] (or [n, peaks], shared), latents [P, n, latent]; its own weights (lambda_recon,
beta, temperature, ...) and corruption rates are per member: `hp` holds peak_dropout and the
parameters its registration declares `member=True`, read from each member's ModelConfig.

Interface: `perturb(x)` (training-time corruption of the line-standardised input:
masking noise, a masked entry set to 0 = the line's mean), `forward(x) -> EncoderOutput`,
and `objective(x_clean, out, z_source) -> {name: (weight, term)}` whose terms the loop adds
to its loss: weight is a [P] tensor (or 0.0 when every member's is 0), term a zero-argument
callable giving the [P] per-member values. Reconstruction is the mean squared error against
the clean standardised input, whatever the input representation (peaks, LSI, coverage bins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import losses as L
from .. import registry
from ..config import ModelConfig
from .layers import MemberScalars, Noise, PDropout, PLayerNorm, PLinear, ResidualBlock, drop_entries, mlp


@dataclass
class EncoderOutput:
    z: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def per_member(fn, *args):
    """fn (a pure loss of `xfer.losses` on one member's tensors) applied to every member: the
    member axis of each tensor argument is mapped (torch.func.vmap); returns [P]."""
    return torch.vmap(fn)(*args)


def encoder_class(arch: str) -> type["PeakEncoder"]:
    """The encoder class registered as `arch` (imported on first use)."""
    return registry.encoder(arch).load()


class PeakEncoder(nn.Module):
    """Built from the members' ModelConfigs (one arch: the first's); `hp` holds each member's
    peak_dropout and the member parameters of its arch's registration."""

    def __init__(self, n_peaks: int, cfgs: Sequence[ModelConfig], noise: Noise):
        super().__init__()
        self.n_peaks, self.cfg, self.noise, self.size = n_peaks, cfgs[0], noise, len(cfgs)
        scalars = ("peak_dropout", *registry.encoder(self.cfg.arch).member_params())
        self.hp = MemberScalars({k: [getattr(c, k) for c in cfgs] for k in scalars})

    def perturb(self, x: Tensor) -> Tensor:
        return drop_entries(self.noise, x, self.hp.peak_dropout, self.hp.values["peak_dropout"])

    def forward(self, x: Tensor) -> EncoderOutput:
        raise NotImplementedError

    def objective(self, x_clean: Tensor, out: EncoderOutput, z_source: Tensor | None) -> dict:
        return {}


def _hidden(cfg: ModelConfig) -> list[int]:
    return [cfg.hidden_dim] * cfg.n_layers


class MLPEncoder(PeakEncoder):
    def __init__(self, n_peaks: int, cfgs: Sequence[ModelConfig], noise: Noise):
        super().__init__(n_peaks, cfgs, noise)
        cfg = self.cfg
        self.net = mlp(self.size, [n_peaks, *_hidden(cfg), cfg.latent_dim], [c.dropout for c in cfgs], noise)

    def forward(self, x: Tensor) -> EncoderOutput:
        return EncoderOutput(self.net(x))


def _recon(enc: PeakEncoder, decoder: nn.Module, z: Tensor, x_clean: Tensor) -> Tensor:
    with enc.noise.only(enc.hp.nonzero("lambda_recon")):  # a member that weights it 0 draws no decoder dropout
        pred = decoder(z).float()
    return per_member(L.reconstruction_mse, pred, x_clean.float().expand_as(pred))


class DAEEncoder(MLPEncoder):
    def __init__(self, n_peaks: int, cfgs: Sequence[ModelConfig], noise: Noise):
        super().__init__(n_peaks, cfgs, noise)
        self.decoder = mlp(self.size, [self.cfg.latent_dim, *reversed(_hidden(self.cfg)), n_peaks],
                           [c.dropout for c in cfgs], noise)

    def perturb(self, x: Tensor) -> Tensor:
        return drop_entries(self.noise, super().perturb(x), self.hp.corruption, self.hp.values["corruption"])

    def objective(self, x_clean, out, z_source):
        return {"recon": (self.hp.get("lambda_recon"), lambda: _recon(self, self.decoder, out.z, x_clean))}


class VAEEncoder(PeakEncoder):
    def __init__(self, n_peaks: int, cfgs: Sequence[ModelConfig], noise: Noise):
        super().__init__(n_peaks, cfgs, noise)
        cfg, rates = self.cfg, [c.dropout for c in cfgs]
        h = _hidden(cfg)
        self.body = mlp(self.size, [n_peaks, *h], rates, noise, final_act=True)
        self.mu = PLinear(self.size, h[-1], cfg.latent_dim, noise)
        self.logvar = PLinear(self.size, h[-1], cfg.latent_dim, noise)
        self.decoder = mlp(self.size, [cfg.latent_dim, *reversed(h), n_peaks], rates, noise)

    def forward(self, x: Tensor) -> EncoderOutput:
        h = self.body(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        if self.training:
            z = mu + self.noise.normal(tuple(mu.shape[1:])).to(mu.dtype) * torch.exp(0.5 * logvar)
        else:
            z = mu  # deterministic posterior mean at evaluation
        return EncoderOutput(z, {"mu": mu, "logvar": logvar})

    def objective(self, x_clean, out, z_source):
        lam = self.hp.get("lambda_recon")
        return {
            "recon": (lam, lambda: _recon(self, self.decoder, out.z, x_clean)),
            "kl": (0.0 if isinstance(lam, float) else lam * self.hp.beta,
                   lambda: per_member(L.gaussian_kl_standard, out.extras["mu"].float(), out.extras["logvar"].float())
                   / self.cfg.latent_dim),
        }


class ContrastiveEncoder(MLPEncoder):
    def __init__(self, n_peaks: int, cfgs: Sequence[ModelConfig], noise: Noise):
        super().__init__(n_peaks, cfgs, noise)
        cfg = self.cfg
        # one projection head for both views (they already live in the shared space)
        self.projection = mlp(self.size, [cfg.latent_dim, cfg.latent_dim, cfg.proj_dim], [0.0] * self.size, noise,
                              rate_of=lambda c: 0.0)

    def perturb(self, x: Tensor) -> Tensor:
        return drop_entries(self.noise, super().perturb(x), self.hp.aug_dropout, self.hp.values["aug_dropout"])

    def objective(self, x_clean, out, z_source):
        if z_source is None:
            return {}
        return {"contrastive": (self.hp.get("lambda_contrastive"),
                                lambda: per_member(L.nt_xent, self.projection(out.z), self.projection(z_source),
                                                   self.hp.temperature))}


class HybridEncoder(PeakEncoder):
    def __init__(self, n_peaks: int, cfgs: Sequence[ModelConfig], noise: Noise):
        super().__init__(n_peaks, cfgs, noise)
        cfg, rates, P = self.cfg, [c.dropout for c in cfgs], self.size
        width = cfg.hybrid_width
        self.inp = nn.Sequential(PLinear(P, n_peaks, width, noise), nn.GELU(), PDropout(rates, noise))
        self.blocks = nn.Sequential(*[ResidualBlock(P, width, width, rates, noise) for _ in range(cfg.n_blocks)])
        self.out = nn.Sequential(PLayerNorm(P, width), PLinear(P, width, cfg.latent_dim, noise))

    def forward(self, x: Tensor) -> EncoderOutput:
        return EncoderOutput(self.out(self.blocks(self.inp(x))))

