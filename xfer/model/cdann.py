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

import torch
from torch import Tensor, nn

from .. import losses as L
from ..config import ModelConfig
from ..phases import N_PHASES
from .encoders import ENCODERS, EncoderOutput, PeakEncoder
from .layers import grad_reverse, mlp

FULL_MAP_LIMIT = 4096  # classes x features above this use the randomised multilinear map


class LineNorm(nn.Module):
    """(x - mean) / std with fixed per-feature statistics (buffers, not trained)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        mean, std = stats if stats is not None else (self.mean, self.std)
        return (x - mean.to(x.dtype)) / std.to(x.dtype)


class CDANN(nn.Module):
    def __init__(self, emb_dim: int, n_peaks: int, cfg: ModelConfig, use_cdann: bool = True, seed: int = 0,
                 n_domains: int = 2):
        super().__init__()
        self.cfg = cfg
        self.emb_dim, self.n_peaks, self.n_domains = emb_dim, n_peaks, n_domains
        self.src_norm = LineNorm(emb_dim)
        self.peak_norm = LineNorm(n_peaks)
        self.projection = mlp([emb_dim, cfg.proj_hidden, cfg.latent_dim], cfg.dropout)
        self.encoder: PeakEncoder = ENCODERS[cfg.arch](n_peaks, cfg)
        self.classifier = mlp([cfg.latent_dim, cfg.cls_hidden, N_PHASES], cfg.dropout)
        self.use_cdann = use_cdann
        self.randomized = use_cdann and N_PHASES * cfg.latent_dim > FULL_MAP_LIMIT
        if not use_cdann:
            disc_in = cfg.latent_dim
        elif self.randomized:
            disc_in = cfg.randomized_dim
            R_f, R_g = L.random_projection_matrices(cfg.latent_dim, N_PHASES, cfg.randomized_dim, seed=seed)
            self.register_buffer("R_f", R_f)
            self.register_buffer("R_g", R_g)
        else:
            disc_in = N_PHASES * cfg.latent_dim
        # domains: 0 training-line expression, 1 training-line peaks, (2 test-line peaks, unlabelled)
        self.discriminator = mlp([disc_in, cfg.disc_hidden, cfg.disc_hidden, n_domains],
                                 0.5 if cfg.dropout > 0 else 0.0)

    @torch.no_grad()
    def set_line_stats(self, stats: dict) -> None:
        """The training line's LineNorm statistics ({"emb": (mean, std), "peaks": (mean, std)})."""
        if "emb" in stats:
            self.src_norm.set_stats(*(torch.as_tensor(a) for a in stats["emb"]))
        if "peaks" in stats:
            self.peak_norm.set_stats(*(torch.as_tensor(a) for a in stats["peaks"]))

    # ------------------------------------------------------------------ encoders
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

    def discriminate(self, z: Tensor, probs: Tensor, grl: float) -> Tensor:
        """Domain logits (n, n_domains) for latents z conditioned on (detached) class probabilities."""
        probs = probs.detach()
        if not self.use_cdann:
            h = z
        elif self.randomized:
            h = L.randomized_multilinear_map(z, probs.to(z.dtype), self.R_f, self.R_g)
        else:
            h = L.multilinear_map(z, probs.to(z.dtype))
        return self.discriminator(grad_reverse(h, grl))

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_source(self, emb: Tensor, stats=None) -> Tensor:
        return torch.softmax(self.classify(self.source_latent(emb, stats)).float(), -1)

    @torch.no_grad()
    def predict_peaks(self, x: Tensor, stats=None) -> Tensor:
        return torch.softmax(self.classify(self.peak_latent(x, stats).z).float(), -1)


def build_model(emb_dim: int, n_peaks: int, cfg: ModelConfig, use_cdann: bool = True, seed: int = 0,
                n_domains: int = 2) -> CDANN:
    return CDANN(emb_dim, n_peaks, cfg, use_cdann=use_cdann, seed=seed, n_domains=n_domains)
