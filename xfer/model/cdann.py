"""The dual-encoder CDANN: a projection head for frozen expression embeddings, a
trainable peak encoder, one shared phase classifier and a class-conditional
domain discriminator (Long et al. 2018) behind gradient reversal.

Inputs are standardised per cell line (`LineNorm`): the training line's
statistics are buffers of the model; another line's statistics are computed
from that line's own cells (no labels) and passed in at prediction time. This
removes line-level baseline shifts the way the aligned LSI baseline's
per-line standardisation does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .. import losses as L
from ..config import ModelConfig
from ..phases import N_PHASES
from .encoders import EncoderOutput, PeakEncoder, encoder_class
from .layers import Noise, PDropout, PLayerNorm, PLinear, grad_reverse, mlp

FULL_MAP_LIMIT = 4096  # classes x features above this use the randomised multilinear map


class LineNorm(nn.Module):
    """(x - mean) / std with fixed per-feature statistics (buffers [P, dim], the same for every
    member: they describe the data, not a member)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size, dim))
        self.register_buffer("std", torch.ones(size, dim))

    @torch.no_grad()
    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean).expand_as(self.mean))
        self.std.copy_(torch.as_tensor(std).expand_as(self.std))

    def forward(self, x: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if stats is not None:  # another line's statistics ([dim]): the same for every member
            mean, std = stats
        else:
            mean, std = self.mean.unsqueeze(1), self.std.unsqueeze(1)
        return (x - mean.to(x.dtype)) / std.to(x.dtype)


class CDANN(nn.Module):
    """A population of P same-shape CDANNs (P = 1: one model). `cfgs` holds each member's
    ModelConfig (the shape is the first's; the others may differ in their scalars only, see
    `xfer.config.MEMBER_KEYS`), `seeds` each member's seed (initial weights, dropout)."""

    def __init__(self, emb_dim: int, n_peaks: int, cfgs: Sequence[ModelConfig], use_cdann: bool = True,
                 seeds: Sequence[int] = (0,), n_domains: int = 2):
        super().__init__()
        if len(cfgs) != len(seeds) or not cfgs:
            raise ValueError(f"CDANN: {len(cfgs)} member configs for {len(seeds)} seeds")
        cfg = self.cfg = cfgs[0]
        P = self.size = len(cfgs)
        self.emb_dim, self.n_peaks, self.n_domains = emb_dim, n_peaks, n_domains
        self.noise = Noise(seeds)
        rates = [c.dropout for c in cfgs]
        self.src_norm = LineNorm(P, emb_dim)
        self.peak_norm = LineNorm(P, n_peaks)
        self.projection = mlp(P, [emb_dim, cfg.proj_hidden, cfg.latent_dim], rates, self.noise)
        self.encoder: PeakEncoder = encoder_class(cfg.arch)(n_peaks, cfgs, self.noise)
        self.classifier = mlp(P, [cfg.latent_dim, cfg.cls_hidden, N_PHASES], rates, self.noise)
        self.use_cdann = use_cdann
        self.randomized = use_cdann and N_PHASES * cfg.latent_dim > FULL_MAP_LIMIT
        if not use_cdann:
            disc_in = cfg.latent_dim
        elif self.randomized:
            disc_in = cfg.randomized_dim
            mats = [L.random_projection_matrices(cfg.latent_dim, N_PHASES, cfg.randomized_dim, seed=s) for s in seeds]
            self.register_buffer("R_f", torch.stack([f for f, _ in mats]))
            self.register_buffer("R_g", torch.stack([g for _, g in mats]))
        else:
            disc_in = N_PHASES * cfg.latent_dim
        # domains: 0 training-line expression, 1 training-line peaks, (2 test-line peaks, unlabelled)
        self.discriminator = mlp(P, [disc_in, cfg.disc_hidden, cfg.disc_hidden, n_domains],
                                 [_disc_rate(c) for c in cfgs], self.noise, rate_of=_disc_rate)

    @torch.no_grad()
    def reset_member(self, m: int, cfg: ModelConfig, seed: int) -> None:
        """Member m becomes a fresh model of configuration `cfg` (this population's shape) and seed
        `seed`: its weights drawn exactly as a model built alone with that seed draws them."""
        self.noise.reseed(m, seed)
        g = self.noise.generators[m]
        for mod in self.modules():  # construction order: the order the weights were first drawn in
            if isinstance(mod, (PLinear, PLayerNorm)):
                mod.reset_member(m, g)
            elif isinstance(mod, PDropout):
                mod.set_rate(m, mod.rate_of(cfg))
        self.encoder.hp.set_member(m, {k: getattr(cfg, k) for k in self.encoder.hp.names})
        if self.randomized:
            r_f, r_g = L.random_projection_matrices(cfg.latent_dim, N_PHASES, cfg.randomized_dim, seed=seed)
            self.R_f[m].copy_(r_f)
            self.R_g[m].copy_(r_g)

    def structure(self) -> tuple:
        """What decides which operations a training step runs (terms weighted by nobody, layers
        with no dropout anywhere): a captured CUDA graph is valid while this stays the same."""
        return (tuple(sorted(self.encoder.hp.zero.items())),
                tuple(mod.live for mod in self.modules() if isinstance(mod, PDropout)))

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.noise.to(self.src_norm.mean.device)  # the noise follows the model (CPU generators or the GPU's)
        return out

    @torch.no_grad()
    def set_line_stats(self, stats: dict) -> None:
        """The training line's LineNorm statistics ({"emb": (mean, std), "peaks": (mean, std)})."""
        if "emb" in stats:
            self.src_norm.set_stats(*(torch.as_tensor(a) for a in stats["emb"]))
        if "peaks" in stats:
            self.peak_norm.set_stats(*(torch.as_tensor(a) for a in stats["peaks"]))

    # ------------------------------------------------------------------ encoders
    # inputs are [n, features] (the same cells for every member) or [P, n, features]; outputs [P, n, ...]
    def source_latent(self, emb: Tensor, stats=None) -> Tensor:
        return self.projection(self.src_norm(emb, stats))

    def normalise_peaks(self, x: Tensor, stats=None) -> Tensor:
        """The encoder's clean input: the line-standardised features (also the
        reconstruction target of the DAE / VAE)."""
        return self.peak_norm(x, stats)

    def peak_latent(self, x: Tensor, stats=None, normalised: Tensor | None = None) -> EncoderOutput:
        h = self.normalise_peaks(x, stats) if normalised is None else normalised
        if self.training:
            h = self.encoder.perturb(h)
        return self.encoder(h)

    # ------------------------------------------------------------------ heads
    def classify(self, z: Tensor) -> Tensor:
        return self.classifier(z)

    def discriminate(self, z: Tensor, probs: Tensor, grl: float | Tensor) -> Tensor:
        """Domain logits [P, n, n_domains] for latents z conditioned on (detached) class probabilities;
        grl: the gradient-reversal strength (a number, or one per member)."""
        probs = probs.detach()
        if not self.use_cdann:
            h = z
        elif self.randomized:
            h = torch.vmap(L.randomized_multilinear_map)(z, probs.to(z.dtype), self.R_f, self.R_g)
        else:
            h = torch.vmap(L.multilinear_map)(z, probs.to(z.dtype))
        return self.discriminator(grad_reverse(h, grl))

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_source(self, emb: Tensor, stats=None) -> Tensor:
        """Class probabilities [P, n, C] of expression embeddings [n, emb_dim]."""
        return torch.softmax(self.classify(self.source_latent(emb, stats)).float(), -1)

    @torch.no_grad()
    def predict_peaks(self, x: Tensor, stats=None) -> Tensor:
        """Class probabilities [P, n, C] of peak features [n, n_peaks]."""
        return torch.softmax(self.classify(self.peak_latent(x, stats).z).float(), -1)


def _disc_rate(cfg: ModelConfig) -> float:
    """The discriminator's dropout: 0.5 when the member uses dropout at all."""
    return 0.5 if cfg.dropout > 0 else 0.0


def build_model(emb_dim: int, n_peaks: int, cfg: ModelConfig | Sequence[ModelConfig], use_cdann: bool = True,
                seed: int | Sequence[int] = 0, n_domains: int = 2) -> CDANN:
    """One model (cfg, seed) or a population (a list of member configs and one seed each)."""
    cfgs = [cfg] if isinstance(cfg, ModelConfig) else list(cfg)
    seeds = [seed] * len(cfgs) if isinstance(seed, int) else list(seed)
    return CDANN(emb_dim, n_peaks, cfgs, use_cdann=use_cdann, seeds=seeds, n_domains=n_domains)


def member_state(state: dict[str, Tensor], m: int) -> dict[str, Tensor]:
    """Member m's slice of a population's state dict: the state dict of a population of one."""
    return {k: v[m:m + 1] for k, v in state.items()}
