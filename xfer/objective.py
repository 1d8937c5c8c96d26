"""One batch's training objective: the model's forward passes and the weighted sum of the
named loss parts of `xfer.losses` (every part is logged unweighted).

    class_source   CE of the phase classifier on projected expression embeddings (lambda_class)
    class_target   CE on the paired PEAK encodings of the same cells (lambda_target_class)
    adversarial    CDANN: discriminator on the multilinear map of the detached class
                   probabilities and the latents, behind gradient reversal (lambda_domain)
    divergence     mmd / kl / jensen / coral between source and target latents, and between
                   the training line's and the adaptation line's peaks (lambda_divergence)
    balance        KL(mean prediction on the unlabelled side || training class prior)
    entropy        mean entropy of those predictions (lambda_entropy)
    pseudo         class-balanced CE on the adaptation line's pseudo-labels (lambda_pseudo)
    + the encoder's own objective (recon / kl / contrastive), also on the adaptation line

The adaptation weights (adversarial, divergence, entropy) are multiplied by the warm-up
factor. Everything is per population member: the inputs are [P, bs, ...], each member has its
own weights, warm-up factor and GRL strength ([P] device tensors, read in place by a CUDA
graph), and every loss of `xfer.losses` (a pure function of one member's tensors) is mapped
over the members with torch.vmap, so each part is [P].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import losses as L
from . import registry
from .config import LossConfig
from .model import CDANN
from .model.encoders import per_member
from .model.layers import MemberScalars

# The per-member LossConfig scalars `batch_loss` reads (a population's MemberScalars).
LOSS_SCALARS = ("lambda_class", "lambda_target_class", "lambda_domain", "lambda_divergence", "lambda_balance",
                "lambda_entropy", "lambda_pseudo", "label_smoothing")


# Which weight of a member's config a loss part is scaled by; the encoders' parts are weighted by the
# parameters their registrations say (xfer.registry.Param.weighs).
LOSS_PART_WEIGHTS = {"class_source": "lambda_class", "class_target": "lambda_target_class",
                     "adversarial": "lambda_domain", "divergence": "lambda_divergence", "balance": "lambda_balance",
                     "entropy": "lambda_entropy", "pseudo": "lambda_pseudo"}


def part_weights() -> dict[str, str]:
    """Every loss part -> the config key that weights it (the encoders' from the registry)."""
    own = {part: k for k, p in registry.all_params().items() for part in p.weighs}
    return {**LOSS_PART_WEIGHTS, **own}


def unweighted_parts(cfg) -> set[str]:
    """The loss parts a configuration weights 0 (a run of it alone never computes them; in a
    population they are computed for the members that weight them, and left out of this one's record)."""
    flat = cfg.to_flat(live_only=False)
    zero = {part for part, lam in part_weights().items() if flat.get(lam, 1.0) == 0}
    return zero | {f"{p}_adapt" for p in zero}


@dataclass(frozen=True)
class Batch:
    """One step's inputs, one row of cells per population member ([P, bs, ...]). Domains: the
    training line's expression (emb) and its paired peaks (x, labels y); when adapting, the
    other line's unlabelled peaks (xb, with its own LineNorm statistics stats_b, and
    pseudo-labels yb, -1 where a cell has none)."""

    emb: Tensor
    x: Tensor
    y: Tensor
    xb: Tensor | None = None
    stats_b: tuple[Tensor, Tensor] | None = None
    yb: Tensor | None = None


@dataclass(frozen=True)
class Weights:
    """The step's schedule and class weights (fixed within an epoch), per member."""

    warm: Tensor                          # [P] warm-up factor of the adaptation terms, 0..1
    grl: Tensor                           # [P] gradient-reversal strength
    prior: Tensor                         # the training line's class prior (balance term)
    class_weight: Tensor | None = None    # CE weights of the labelled terms
    pseudo_weight: Tensor | None = None   # [P, C] CE weights of the pseudo-labelled classes


def batch_loss(model: CDANN, lo: LossConfig, hp: MemberScalars, b: Batch, w: Weights) -> L.LossParts:
    """The population's losses: every part and the total are [P], one value per member.
    `lo` gives the shape (divergence, conditioning); `hp` each member's weights (LOSS_SCALARS)."""
    z_s = model.source_latent(b.emb)
    x_norm = model.normalise_peaks(b.x)
    out_t = model.peak_latent(b.x, normalised=x_norm)
    z_t = out_t.z
    logit_s, logit_t = model.classify(z_s), model.classify(z_t)
    p_s, p_t = torch.softmax(logit_s.float(), -1), torch.softmax(logit_t.float(), -1)
    latents, probs = [z_s, z_t], [p_s, p_t]
    adapting = b.xb is not None
    if adapting:
        xb_norm = model.normalise_peaks(b.xb, b.stats_b)
        out_b = model.peak_latent(b.xb, normalised=xb_norm)
        latents.append(out_b.z)
        logit_b = model.classify(out_b.z)
        probs.append(torch.softmax(logit_b.float(), -1))
    p_unl = probs[-1]  # the predictions the entropy and balance terms act on

    def adversarial():
        with model.noise.only(hp.nonzero("lambda_domain")):  # no discriminator dropout where it weighs 0
            logits = [model.discriminate(z, p, w.grl).float() for z, p in zip(latents, probs)]
        k = len(logits)
        if lo.use_cdann and lo.entropy_conditioning:
            weights = [p.detach() for p in probs]
            return per_member(lambda *a: L.adversarial(a[:k], [L.entropy_weights(p) for p in a[k:]]), *logits, *weights)
        return per_member(lambda *a: L.adversarial(a), *logits)

    def divergence():
        d = per_member(lambda a, c: L.divergence(lo.divergence, a, c), z_s, z_t)
        if adapting:
            d = d + per_member(lambda a, c: L.divergence(lo.divergence, a, c), z_t, latents[2])
        return d

    def ramped(name: str):  # a weight that is 0 for every member stays a static 0 (not computed)
        lam = hp.get(name)
        return 0.0 if isinstance(lam, float) else lam * w.warm

    def labelled(logits):
        return lambda: per_member(lambda lg, y, ls: L.classification(lg, y, w.class_weight, label_smoothing=ls),
                                  logits.float(), b.y, hp.label_smoothing)

    terms = {
        "class_source": (hp.get("lambda_class"), labelled(logit_s)),
        "class_target": (hp.get("lambda_target_class"), labelled(logit_t)),
        "adversarial": (ramped("lambda_domain"), adversarial),
        "divergence": (ramped("lambda_divergence"), divergence),
        "balance": (hp.get("lambda_balance"), lambda: per_member(lambda p: L.class_balance(p, w.prior), p_unl)),
        "entropy": (ramped("lambda_entropy"), lambda: per_member(L.entropy, p_unl)),
    }
    if b.yb is not None:
        terms["pseudo"] = (hp.get("lambda_pseudo"),
                           lambda: per_member(L.classification, logit_b.float(), b.yb, w.pseudo_weight))
    terms.update(model.encoder.objective(x_norm, out_t, z_s))
    if adapting:
        terms.update({f"{k}_adapt": v for k, v in model.encoder.objective(xb_norm, out_b, None).items()})
    return L.combine(terms)
