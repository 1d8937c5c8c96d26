"""Loss functions for the CDANN expression -> accessibility transfer model.

Every function here is pure: tensors (and plain numbers) in, tensors (or
plain numbers) out, no module state, no in-place changes to the inputs. The
training loop combines the terms by config weights with :func:`combine`, which
records every unweighted part by name for logging.

Conventions
-----------
* ``x`` / ``z_s`` are source latents (gene-expression encoder), ``y`` / ``z_t``
  target latents (chromatin-accessibility encoder), both 2-D ``(cells, dim)``.
* Class order is fixed by :data:`xfer.phases.PHASES` (G1, S, G2M); ``C`` is the
  number of classes.
* Numerics: the divergences, the contrastive loss and the other reductions run
  in float32 with autocast switched off inside the function, so they are safe
  to call from a ``torch.autocast(dtype=torch.bfloat16)`` region with bf16
  inputs; the returned scalar is float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DIVERGENCES as DIVERGENCE_NAMES
from .errors import ConfigError
from .phases import UNLABELLED

__all__ = [
    "MMD_BANDWIDTH_FACTORS",
    "DIVERGENCES",
    "LossParts",
    "adversarial",
    "class_balance",
    "classification",
    "combine",
    "coral",
    "divergence",
    "entropy",
    "entropy_weights",
    "gaussian_kl_standard",
    "grl_lambda",
    "jensen_shannon_gaussian",
    "kl_gaussian",
    "mmd",
    "multilinear_map",
    "nt_xent",
    "random_projection_matrices",
    "randomized_multilinear_map",
    "reconstruction_mse",
    "select_pseudo_labels",
    "warmup_factor",
]

#: Multipliers of the median pairwise squared distance giving the default
#: squared bandwidths sigma^2 of :func:`mmd`.
MMD_BANDWIDTH_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

# Floor for the median squared distance (all-identical batches give 0).
_MIN_MEDIAN_SQ_DIST = 1e-12
# Floor inside log(p) for probabilities, so p = 0 gives finite gradients.
_PROB_EPS = 1e-12


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _autocast_off(t: Tensor) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``t``'s device type (no-op if unsupported)."""
    try:
        return torch.autocast(device_type=t.device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def _check_pair(x: Tensor, y: Tensor, fn: str, min_rows: int = 1) -> None:
    """Validate two latent batches: 2-D, same width, at least ``min_rows`` rows each."""
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"{fn}: expected 2-D (cells, dim) tensors, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{fn}: latent widths differ ({x.shape[1]} vs {y.shape[1]})")
    if x.shape[0] < min_rows or y.shape[0] < min_rows:
        raise ValueError(
            f"{fn}: needs at least {min_rows} row(s) per batch, got {x.shape[0]} and {y.shape[0]}"
        )


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``(len(a), len(b))``, clamped at 0.

    Expanded form ||a||^2 + ||b||^2 - 2 a.b; the caller centres the data first
    so the cancellation error stays small.
    """
    a2 = a.pow(2).sum(dim=1, keepdim=True)
    b2 = b.pow(2).sum(dim=1, keepdim=True)
    return (a2 + b2.T - 2.0 * (a @ b.T)).clamp_min(0.0)


def _moments(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and maximum-likelihood variance (divide by n) plus ``eps``."""
    mean = x.mean(dim=0)
    var = x.var(dim=0, correction=0) + eps
    return mean, var


def _kl_diag(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> Tensor:
    """Per-dimension KL(N(m1, v1) || N(m2, v2)), shape ``(d,)``.

    0.5 * [log(v2/v1) + (v1 + (m1-m2)^2)/v2 - 1], computed as
    0.5 * [u - log1p(u) + (m1-m2)^2/v2] with u = (v1 - v2)/v2, which avoids the
    cancellation of the textbook form when v1 ~ v2. Clamped at 0 (the exact
    value is never negative; this only removes rounding noise).
    """
    u = (v1 - v2) / v2
    kl = 0.5 * (u - torch.log1p(u) + (m1 - m2).pow(2) / v2)
    return kl.clamp_min(0.0)


def _row_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of ``probs`` ``(n, C)`` -> ``(n,)``."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(_PROB_EPS))).sum(dim=-1)


# --------------------------------------------------------------------------
# divergences between two batches of latents
# --------------------------------------------------------------------------


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> Tensor:
    r"""Multi-kernel Gaussian MMD^2 between batches ``x`` (n, d) and ``y`` (m, d).

    Kernel: k(a, b) = (1/K) \sum_{k=1}^{K} exp(-||a - b||^2 / (2 \sigma_k^2)).

    Estimator (biased V-statistic, every pair including i = j):

        MMD^2 = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j')
                - 2 mean_{i,j} k(x_i, y_j)

    i.e. the squared RKHS distance between the two empirical mean embeddings,
    so it is >= 0 and exactly 0 when ``x`` and ``y`` are the same batch.
    Its expectation exceeds the population MMD^2 by
    (1/n + 1/m) * (1 - E k(a, a')) (the diagonal terms).

    Bandwidths: ``bandwidths`` is a list of sigmas (standard deviations of the
    Gaussian kernels). When ``None``, the squared bandwidths are
    sigma_k^2 = q * {1/4, 1/2, 1, 2, 4} (:data:`MMD_BANDWIDTH_FACTORS`), where
    q is the median squared Euclidean distance over all distinct pairs of the
    pooled batch (x and y together), computed without gradient (detached).

    Distances are computed in float32 (autocast off) via the expanded form on
    the pooled-mean-centred data, clamped at 0. Memory is O(n^2 + m^2 + nm).

    Returns a float32 scalar.
    """
    _check_pair(x, y, "mmd")
    with _autocast_off(x):
        x = x.float()
        y = y.float()
        centre = torch.cat([x, y]).mean(dim=0).detach()
        x = x - centre
        y = y - centre
        d_xx = _sq_dists(x, x)
        d_yy = _sq_dists(y, y)
        d_xy = _sq_dists(x, y)

        if bandwidths is None:
            with torch.no_grad():
                n, m = x.shape[0], y.shape[0]
                iu_x = torch.triu_indices(n, n, offset=1, device=x.device)
                iu_y = torch.triu_indices(m, m, offset=1, device=y.device)
                pooled = torch.cat(
                    [d_xx[iu_x[0], iu_x[1]], d_yy[iu_y[0], iu_y[1]], d_xy.reshape(-1)]
                )
                median = pooled.median().clamp_min(_MIN_MEDIAN_SQ_DIST)
            sq_sigmas = [median * f for f in MMD_BANDWIDTH_FACTORS]
        else:
            sigmas = [float(s) for s in bandwidths]
            if not sigmas or any(not (s > 0.0 and math.isfinite(s)) for s in sigmas):
                raise ValueError(
                    f"mmd: bandwidths must be a non-empty list of positive sigmas, got {bandwidths!r}"
                )
            sq_sigmas = [s * s for s in sigmas]

        def kernel_mean(dist: Tensor) -> Tensor:
            total = sum(torch.exp(-dist / (2.0 * s2)).mean() for s2 in sq_sigmas)
            return total / len(sq_sigmas)

        value = kernel_mean(d_xx) + kernel_mean(d_yy) - 2.0 * kernel_mean(d_xy)
        return value.clamp_min(0.0)


def kl_gaussian(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    r"""KL divergence between moment-matched diagonal Gaussians of two batches.

    P = N(mu_x, diag v_x), Q = N(mu_y, diag v_y), with mu the per-dimension
    batch mean and v the per-dimension maximum-likelihood variance
    (divide by the batch size) plus ``eps``. With d the latent width:

        KL(P || Q) = (1/d) * 0.5 * \sum_{k=1}^{d} [ log(v_y,k / v_x,k)
                     + (v_x,k + (mu_x,k - mu_y,k)^2) / v_y,k - 1 ]

    i.e. the closed-form KL summed over dimensions, divided by d (a per-dimension
    mean, so the scale does not depend on the latent width). Not symmetric.
    ``x`` (n, d), ``y`` (m, d); computed in float32; returns a float32 scalar,
    0 for identical batches.
    """
    _check_pair(x, y, "kl_gaussian")
    with _autocast_off(x):
        mx, vx = _moments(x.float(), eps)
        my, vy = _moments(y.float(), eps)
        return _kl_diag(mx, vx, my, vy).mean()


def jensen_shannon_gaussian(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Jensen-Shannon divergence between moment-matched diagonal Gaussians (approximation).

    P = N(mu_x, diag v_x), Q = N(mu_y, diag v_y) as in :func:`kl_gaussian`.
    The exact JS divergence of two Gaussians has no closed form (the mixture
    0.5(P + Q) is not Gaussian), so the mixture is replaced by its
    moment-matched Gaussian M = N(mu_m, diag v_m) with

        mu_m = (mu_x + mu_y) / 2,
        v_m  = (v_x + v_y) / 2 + (mu_x - mu_y)^2 / 4   (the mixture's exact variance)

    and JS ~= 0.5 KL(P || M) + 0.5 KL(Q || M), each KL per dimension in closed
    form, then averaged over the d dimensions (like :func:`kl_gaussian`).

    Symmetric in x and y, >= 0, 0 for identical batches. For equal variances
    v_x = v_y = v and mean difference delta it equals, per dimension,
    0.5 * log(1 + delta^2 / (4 v)) (bounded growth, unlike KL's delta^2/(2v)).
    ``x`` (n, d), ``y`` (m, d); computed in float32; returns a float32 scalar.
    """
    _check_pair(x, y, "jensen_shannon_gaussian")
    with _autocast_off(x):
        mx, vx = _moments(x.float(), eps)
        my, vy = _moments(y.float(), eps)
        mm = 0.5 * (mx + my)
        vm = 0.5 * (vx + vy) + 0.25 * (mx - my).pow(2)
        js = 0.5 * _kl_diag(mx, vx, mm, vm) + 0.5 * _kl_diag(my, vy, mm, vm)
        return js.mean()


def coral(x: Tensor, y: Tensor) -> Tensor:
    r"""Deep CORAL loss (Sun & Saenko 2016) between ``x`` (n, d) and ``y`` (m, d).

        CORAL = 1 / (4 d^2) * || C_x - C_y ||_F^2

    with the unbiased covariances C_x = (X - 1 mu_x^T)^T (X - 1 mu_x^T) / (n - 1)
    (likewise C_y), so it needs n, m >= 2. Symmetric, >= 0, invariant to
    translations of either batch (only second moments are compared).
    Computed in float32; returns a float32 scalar.
    """
    _check_pair(x, y, "coral", min_rows=2)
    with _autocast_off(x):
        x = x.float()
        y = y.float()
        d = x.shape[1]
        xc = x - x.mean(dim=0, keepdim=True)
        yc = y - y.mean(dim=0, keepdim=True)
        cx = xc.T @ xc / (x.shape[0] - 1)
        cy = yc.T @ yc / (y.shape[0] - 1)
        return (cx - cy).pow(2).sum() / (4.0 * d * d)


#: Divergence name (config value of ``divergence`` / ``divergence_type``) -> function.
#: Keys are exactly :data:`xfer.config.DIVERGENCES`, in its order.
DIVERGENCES: Mapping[str, Callable[..., Tensor]] = MappingProxyType(
    {"mmd": mmd, "kl": kl_gaussian, "jensen": jensen_shannon_gaussian, "coral": coral}
)
if tuple(DIVERGENCES) != DIVERGENCE_NAMES:
    raise ImportError(f"xfer.losses.DIVERGENCES {tuple(DIVERGENCES)} and xfer.config.DIVERGENCES "
                      f"{DIVERGENCE_NAMES} differ: a divergence the config accepts has no function (or the reverse)")


def divergence(name: str, x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """Look up the divergence ``name`` in :data:`DIVERGENCES` and apply it to ``(x, y)``.

    Extra keyword arguments go to the function (e.g. ``bandwidths`` for mmd,
    ``eps`` for kl / jensen). Raises :class:`xfer.errors.ConfigError` for key
    ``divergence_type`` when the name is unknown.
    """
    fn = DIVERGENCES.get(name)
    if fn is None:
        valid = ", ".join(sorted(DIVERGENCES))
        raise ConfigError("divergence_type", f"unknown divergence {name!r}; valid: {valid}")
    return fn(x, y, **kwargs)


# --------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------


def classification(
    logits: Tensor,
    y: Tensor,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Cross-entropy of class ``logits`` (n, C) against integer labels ``y`` (n,).

    With log-probabilities lp_i = log_softmax(logits_i), class weights w
    (``weight`` (C,); all 1 when ``None``) and smoothing ls = ``label_smoothing``:

        l_i = (1 - ls) * w_{y_i} * (-lp_{i,y_i}) + (ls / C) * \sum_c w_c * (-lp_{i,c})
        CE  = \sum_{i labelled} l_i / \sum_{i labelled} w_{y_i}

    i.e. the (weighted) mean over labelled cells, as
    ``torch.nn.functional.cross_entropy(..., reduction="mean")`` (written out, so that
    ``label_smoothing`` may be one value per population member under ``torch.vmap``). Cells labelled
    :data:`xfer.phases.UNLABELLED` (-1) are ignored; a batch with no labelled
    cell gives 0 (still connected to the graph) instead of NaN, without a
    host-device sync. Float32; scalar.
    """
    logits = logits.float()
    y = y.to(device=logits.device, dtype=torch.long)
    lp = torch.log_softmax(logits, dim=-1)
    labelled = (y != UNLABELLED).to(torch.float32)
    y0 = y.clamp_min(0)
    nll = -lp.gather(-1, y0.unsqueeze(-1)).squeeze(-1)
    if weight is None:
        w_y = labelled
        smooth = -lp.sum(-1)
    else:
        weight = weight.to(device=logits.device, dtype=torch.float32)
        w_y = weight[y0] * labelled
        smooth = -(lp * weight).sum(-1)
    # label_smoothing may be a tensor (one per population member, under torch.vmap)
    per_cell = (1.0 - label_smoothing) * w_y * nll + (label_smoothing / logits.shape[-1]) * smooth * labelled
    return per_cell.sum() / w_y.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _weighted_mean(per_cell: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return per_cell.mean()
    w = weights.to(device=per_cell.device, dtype=torch.float32).reshape(-1)
    if w.shape != per_cell.shape:
        raise ValueError(f"adversarial: {w.numel()} weights for {per_cell.numel()} domain logits")
    return (w * per_cell).sum() / w.sum()


def adversarial(
    domain_logits: Sequence[Tensor],
    weights: Sequence[Tensor | None] | None = None,
) -> Tensor:
    r"""Domain-discriminator loss over K domains: cross-entropy of each domain's
    discriminator logits (n_k, K) against its own domain index k.

        L = (1/K) \sum_k  \sum_i w^k_i CE(l^k_i, k) / \sum_i w^k_i

    Each domain is averaged on its own and the K averages are weighted equally,
    so the loss does not depend on the batch sizes. Optional per-sample weights
    (e.g. :func:`entropy_weights`, CDAN+E) give weighted means within a domain
    (w = 1 when ``None``). With K = 2 this is the usual binary DANN / CDAN loss
    (softmax over two logits = a sigmoid of their difference); log K when the
    discriminator cannot tell the domains apart. The gradient reversal is
    applied in the model, not here. Float32; scalar.
    """
    K = len(domain_logits)
    if K < 2:
        raise ValueError("adversarial: needs logits of at least two domains")
    weights = list(weights) if weights is not None else [None] * K
    if len(weights) != K:
        raise ValueError(f"adversarial: {len(weights)} weight entries for {K} domains")
    total = None
    for k, (logits, w) in enumerate(zip(domain_logits, weights)):
        logits = logits.float()
        if logits.ndim != 2 or logits.shape[1] != K:
            raise ValueError(f"adversarial: domain {k} logits must be (n, {K}), got {tuple(logits.shape)}")
        target = torch.full((logits.shape[0],), k, dtype=torch.long, device=logits.device)
        term = _weighted_mean(F.cross_entropy(logits, target, reduction="none"), w)
        total = term if total is None else total + term
    return total / K


def reconstruction_mse(pred: Tensor, target: Tensor) -> Tensor:
    r"""Mean squared error, L = mean_{i,f} (pred_{if} - target_{if})^2. Float32; scalar."""
    return F.mse_loss(pred.float(), target.to(device=pred.device, dtype=torch.float32))


def gaussian_kl_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    r"""VAE KL term KL(q(z|x) || N(0, I)) for q = N(mu, diag exp(logvar)).

        KL_i = -0.5 * \sum_k (1 + logvar_{ik} - mu_{ik}^2 - exp(logvar_{ik}))

    summed over the latent dimensions k, then averaged over the cells i.
    ``mu``, ``logvar`` (n, d). 0 for mu = 0, logvar = 0. Float32; scalar.
    """
    mu = mu.float()
    logvar = logvar.float()
    per_cell = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)
    return per_cell.mean()


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float = 0.1) -> Tensor:
    r"""Symmetric NT-Xent / InfoNCE (SimCLR) between two views of the same N cells.

    Row i of ``z_a`` (a cell's expression view) and row i of ``z_b`` (its
    accessibility view) are the positive pair. With u = the 2N L2-normalised
    rows of [z_a; z_b] and s_{kl} = cos(u_k, u_l) / temperature:

        loss_k = -log( exp(s_{k,p(k)}) / \sum_{l != k} exp(s_{kl}) )

    where p(k) is k's partner (k +- N). The denominator holds the positive and
    the 2N - 2 negatives (all other rows of both views). The result is the
    mean of loss_k over the 2N anchors. Equals log(2N - 1) when all
    similarities are equal. Computed in float32 (autocast off); scalar.
    """
    _check_pair(z_a, z_b, "nt_xent")
    if z_a.shape[0] != z_b.shape[0]:
        raise ValueError(
            f"nt_xent: views need the same number of rows, got {z_a.shape[0]} and {z_b.shape[0]}"
        )
    if not isinstance(temperature, Tensor) and not temperature > 0.0:  # a tensor: one per member (vmap)
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    with _autocast_off(z_a):
        n = z_a.shape[0]
        u = F.normalize(torch.cat([z_a.float(), z_b.float()]), dim=1)
        sim = (u @ u.T) / temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=sim.device)
        sim = sim.masked_fill(self_mask, float("-inf"))
        idx = torch.arange(n, device=sim.device)
        partner = torch.cat([idx + n, idx])
        return F.cross_entropy(sim, partner)


def class_balance(probs: Tensor, prior: Tensor) -> Tensor:
    r"""KL of the batch-mean prediction from a class prior, against collapse onto one class.

        pbar = mean_i probs_i,   L = KL(pbar || prior) = \sum_c pbar_c log(pbar_c / prior_c)

    ``probs`` (n, C) rows of class probabilities; ``prior`` (C,) non-negative
    (normalised to sum 1 here), e.g. the training-line class frequencies.
    0 when the mean prediction equals the prior. Float32; scalar.
    """
    p = probs.float()
    if p.ndim != 2 or prior.ndim != 1 or prior.shape[0] != p.shape[1]:
        raise ValueError(
            f"class_balance: expected probs (n, C) and prior (C,), "
            f"got {tuple(p.shape)} and {tuple(prior.shape)}"
        )
    q = prior.to(device=p.device, dtype=torch.float32)
    q = q / q.sum()
    pbar = p.mean(dim=0)
    kl = pbar * (torch.log(pbar.clamp_min(_PROB_EPS)) - torch.log(q.clamp_min(_PROB_EPS)))
    return kl.sum().clamp_min(0.0)


def select_pseudo_labels(probs: Tensor, fraction: float) -> Tensor:
    r"""Class-balanced pseudo-labels for unlabelled cells (CBST, Zou et al. 2018).

    ``probs`` (n, C): predicted class probabilities. Each cell's candidate label
    is its arg-max class c_i; within every predicted class the ``fraction`` most
    confident cells (largest p_{i,c_i}; at least one per predicted class) keep
    their label, the others get :data:`xfer.phases.UNLABELLED` (-1):

        keep_i  <=>  rank of p_{i,c_i} among {j : c_j = c_i} < ceil(fraction * |{j : c_j = c_i}|)

    Selecting per class rather than above one global confidence stops the
    commonest (most confidently predicted) class from taking over. Ties break
    by row order. Returns int64 (n,); ``fraction`` in (0, 1].
    """
    if probs.ndim != 2:
        raise ValueError(f"select_pseudo_labels: expected probs (n, C), got {tuple(probs.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_pseudo_labels: fraction must be in (0, 1], got {fraction}")
    conf, label = probs.float().max(dim=1)
    out = torch.full_like(label, UNLABELLED)
    for c in range(probs.shape[1]):
        members = torch.nonzero(label == c).flatten()
        if members.numel() == 0:
            continue
        k = math.ceil(fraction * members.numel())
        order = torch.sort(conf[members], descending=True, stable=True).indices
        out[members[order[:k]]] = c
    return out


def entropy(probs: Tensor) -> Tensor:
    r"""Mean Shannon entropy (nats) of predicted class distributions ``probs`` (n, C).

        H = mean_i ( -\sum_c p_{ic} log p_{ic} )

    0 <= H <= log C (uniform rows). Minimised on unlabelled target cells to
    push predictions away from the class boundaries. p log p is taken as 0 at
    p = 0 (log clamped at 1e-12, so gradients stay finite). Float32; scalar.
    """
    return _row_entropy(probs).mean()


# --------------------------------------------------------------------------
# CDAN conditioning and schedules
# --------------------------------------------------------------------------


def multilinear_map(features: Tensor, probs: Tensor) -> Tensor:
    r"""CDAN multilinear conditioning: row-wise flattened outer product g (x) f.

    out_{i, c*d + k} = probs_{i,c} * features_{i,k}

    ``features`` (n, d), ``probs`` (n, C) -> (n, C*d) (C-major, as
    ``bmm(probs.unsqueeze(2), features.unsqueeze(1)).view(n, -1)`` in the
    reference CDAN code).
    """
    if features.ndim != 2 or probs.ndim != 2 or features.shape[0] != probs.shape[0]:
        raise ValueError(
            f"multilinear_map: expected features (n, d) and probs (n, C), "
            f"got {tuple(features.shape)} and {tuple(probs.shape)}"
        )
    n = features.shape[0]
    return (probs.unsqueeze(2) * features.unsqueeze(1)).reshape(n, -1)


def randomized_multilinear_map(features: Tensor, probs: Tensor, R_f: Tensor, R_g: Tensor) -> Tensor:
    r"""CDAN randomized multilinear map (Long et al. 2018) for large C*d.

        T(f, g) = (f R_f) \odot (g R_g) / sqrt(out_dim)

    ``features`` (n, d), ``probs`` (n, C), fixed random matrices ``R_f``
    (d, out_dim) and ``R_g`` (C, out_dim) (e.g. from
    :func:`random_projection_matrices`; never trained) -> (n, out_dim).
    """
    if R_f.ndim != 2 or R_g.ndim != 2 or R_f.shape[1] != R_g.shape[1]:
        raise ValueError(
            f"randomized_multilinear_map: R_f {tuple(R_f.shape)} and R_g {tuple(R_g.shape)} "
            "must be (d, k) and (C, k)"
        )
    if features.shape[-1] != R_f.shape[0] or probs.shape[-1] != R_g.shape[0]:
        raise ValueError(
            f"randomized_multilinear_map: features {tuple(features.shape)} / probs {tuple(probs.shape)} "
            f"do not match R_f {tuple(R_f.shape)} / R_g {tuple(R_g.shape)}"
        )
    out_dim = R_f.shape[1]
    return (features @ R_f.to(features.dtype)) * (probs @ R_g.to(probs.dtype)) / math.sqrt(out_dim)


def random_projection_matrices(
    feature_dim: int,
    n_classes: int,
    out_dim: int,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Fixed standard-normal ``R_f`` (feature_dim, out_dim) and ``R_g`` (n_classes, out_dim).

    Deterministic for a given seed (a private generator; the global RNG is
    untouched), as in the reference CDAN ``RandomLayer`` (``torch.randn``).
    """
    gen = torch.Generator().manual_seed(seed)
    r_f = torch.randn(feature_dim, out_dim, generator=gen)
    r_g = torch.randn(n_classes, out_dim, generator=gen)
    return r_f.to(device), r_g.to(device)


def entropy_weights(probs: Tensor) -> Tensor:
    r"""CDAN+E per-sample weights from prediction certainty, normalised to mean 1.

        w_i = (1 + exp(-H(p_i))) / mean_j (1 + exp(-H(p_j)))

    with H the Shannon entropy (nats) of row i of ``probs`` (n, C) -> (n,).
    Confident predictions (low entropy) weigh more in :func:`adversarial`.
    Pass ``probs.detach()`` to use them as fixed weights. Float32.
    """
    w = 1.0 + torch.exp(-_row_entropy(probs))
    return w / w.mean()


def grl_lambda(progress: float, gamma: float = 10.0) -> float:
    r"""DANN gradient-reversal schedule lambda(p) = 2 / (1 + exp(-gamma * p)) - 1.

    ``progress`` p is training progress in [0, 1] (clamped); lambda(0) = 0 and
    lambda -> 1 as p -> 1 (0.9999 at p = 1 for gamma = 10).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear ramp min(1, epoch / warmup_epochs): 0 at epoch 0, 1 from ``warmup_epochs`` on.

    ``warmup_epochs <= 0`` means no warm-up (always 1); negative epochs give 0.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, float(epoch) / float(warmup_epochs)))


# --------------------------------------------------------------------------
# combining weighted terms
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LossParts:
    """A combined loss: ``total`` (scalar tensor, differentiable) and the unweighted ``parts`` by name."""

    total: Tensor
    parts: Mapping[str, Tensor]

    def detached(self) -> dict[str, Tensor]:
        """``{"total": ..., name: ...}`` as detached tensors (no graph kept alive)."""
        out = {"total": self.total.detach()}
        out.update({name: value.detach() for name, value in self.parts.items()})
        return out


LossTerm = Tensor | Callable[[], Tensor]


def combine(weighted: Mapping[str, tuple[float, LossTerm]]) -> LossParts:
    r"""Weighted sum of named scalar loss terms: total = \sum_name w_name * value_name.

    ``weighted`` maps a part name to ``(weight, value)``, where value is a
    scalar tensor or a zero-argument callable returning one (lazy). Every
    computed part is recorded unweighted in ``LossParts.parts``. A term with
    weight 0 is left out of the total (so a NaN there cannot poison it); if it
    is lazy it is not computed at all and not recorded, if it is an already
    computed tensor it is still recorded for logging. With no weighted term
    the total is a zero scalar (on the parts' device when there are any).
    Weights must be finite; "total" is reserved and may not be a part name.
    A weight may also be a 0-d tensor (e.g. a warm-up factor kept on the GPU so
    that a captured CUDA graph can read it): such a term is always computed and
    added (its value is not inspected, which would need a device sync).

    Populations (P same-shape models trained together): a value may be a vector
    of shape (P,) (one per member) and a weight a (P,) tensor of per-member
    weights; the total is then (P,) too, each member's own weighted sum.
    """
    parts: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, (weight, value) in weighted.items():
        if name == "total":
            raise ValueError("combine: 'total' is reserved and cannot name a loss part")
        if isinstance(weight, Tensor):
            if weight.ndim > 1:
                raise ValueError(f"combine: weight of {name!r} must be a scalar or (P,), "
                                 f"got shape {tuple(weight.shape)}")
            w = weight
        else:
            w = float(weight)
            if not math.isfinite(w):
                raise ValueError(f"combine: weight of {name!r} is not finite ({weight!r})")
        dynamic = isinstance(w, Tensor)
        if callable(value) and not isinstance(value, Tensor):
            if not dynamic and w == 0.0:
                continue
            value = value()
        if not isinstance(value, Tensor) or value.ndim > 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"combine: part {name!r} must be a scalar tensor (or one per member), got {shape}")
        parts[name] = value
        if dynamic or w != 0.0:
            term = value.float() * w
            total = term if total is None else total + term
    if total is None:
        device = next(iter(parts.values())).device if parts else None
        total = torch.zeros((), device=device)
    return LossParts(total=total, parts=MappingProxyType(parts))
