"""Label-free model selection for transfer: which epoch and which trial to keep.

Every epoch the training loop computes each candidate below from what it may
see: the training line's labelled validation cells and the test line's
*unlabelled* cells (its accessibility; its expression when --test_csv is
given). No test-line label reaches any of them. Higher is better for all.

    source_val            the training line's PEAK validation metric (no transfer signal)
    entropy               1 - mean entropy of the test line's PEAK predictions / log C
                          (Morerio et al. 2018; SKADA-Bench's most reliable scorer)
    im                    information maximisation: (H(mean p) - mean H(p)) / log C, confident
                          and diverse predictions (Shi & Sha 2012; Liang et al. 2020)
    snd                   soft neighbourhood density (Saito et al. 2021): the mean entropy of each
                          test cell's softmax similarity (T = 0.05) to the other test cells'
                          L2-normalised predictions, self excluded
    iwcv                  importance-weighted validation (Sugiyama et al. 2007): the training
                          line's validation balanced accuracy with each cell weighted by
                          p(test | z) / p(train | z), from a logistic domain classifier on the
                          PEAK latents z (fitted on training cells vs test cells)
    dev                   deep embedded validation (You et al. 2019): minus the importance-weighted
                          validation cross-entropy with its control variate
    agreement             the balanced accuracy of the test line's PEAK predictions against the
                          expression head's predictions on the same cells (needs --test_csv,
                          unlabelled: the expression head transfers well, GEX test ~ gex_lr)
    source_val_entropy    the mean of source_val and entropy
    source_val_im         the mean of source_val and im
    source_val_agreement  the mean of source_val and agreement

A population (xfer.train.Population) computes every candidate of all its members at once
(`candidate_values_members`: the same formulas batched over a leading member axis, one Newton
solve for every member's domain classifier), so validating P members costs a few kernels and
host round trips per candidate rather than P times as many.

`objective=transfer` is the candidate the study `bench/bench_selection.py` chose on
development pairs by its fixed rule (TRANSFER: `agreement`, and `iwcv` when the test line's
expression is not given); `auto` (the default) is `transfer` when training adapts to a test line and
`source_val` otherwise.

skada (BSD-3) implements entropy, SND, IWCV and DEV as scikit-learn scorers over an
estimator's `predict_proba` on NumPy arrays. They are not used here: these run inside
every epoch of every trial on the trial's device (no host round trip, no estimator
wrapper, no refit of the model's feature extractor through skorch); and skada's
importance weights come from kernel density estimates on the inputs rather than a domain
classifier on the learned features. The formulas are the papers' (skada's SND and DEV
compute the same ones); tests/test_selection.py checks each against its definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import OBJECTIVES, SELECTION_CANDIDATES as CANDIDATES
from .errors import ConfigError

NEEDS_TEST_GEX = frozenset({"agreement", "source_val_agreement"})
# The study's picks (bench/bench_selection.py, BENCHMARKS.md): the lowest mean selection regret
# on the development pairs, among all candidates and among those that need no test expression.
TRANSFER = {"with_expression": "agreement", "peaks_only": "iwcv"}

SND_TEMPERATURE = 0.05
MAX_CELLS = 2000  # cells per domain for SND and the domain classifier (a fixed random subset)


def resolve(objective: str, adapting: bool, has_test_gex: bool) -> str:
    """The candidate an objective setting means for a run."""
    if objective not in OBJECTIVES:
        raise ConfigError("objective", f"unknown {objective!r}; choose from {', '.join(OBJECTIVES)}")
    if objective == "auto":
        objective = "transfer" if adapting else "source_val"
    if objective == "transfer":
        if not adapting:
            raise ConfigError("objective", "'transfer' needs the test line's peaks (--sup_peak_csv) and "
                              "adapt_test_peaks; without them use source_val")
        return TRANSFER["with_expression" if has_test_gex else "peaks_only"]
    if objective != "source_val" and not adapting:
        raise ConfigError("objective", f"{objective!r} scores the test line's unlabelled cells: give "
                          "--sup_peak_csv (and keep adapt_test_peaks on)")
    if objective in NEEDS_TEST_GEX and not has_test_gex:
        raise ConfigError("objective", f"{objective!r} needs the test line's expression (--test_csv)")
    return objective


def resolve_for(cfg, test_peaks: bool, test_gex: bool) -> str:
    """The candidate a run's config means given which test-line inputs it has: it adapts when
    the test line's peaks are given and adapt_test_peaks is on (as `TrainData.with_adaptation`)."""
    return resolve(cfg.optim.objective, test_peaks and cfg.data.adapt_test_peaks, test_gex)


def available(adapting: bool, has_test_gex: bool) -> tuple[str, ...]:
    """The candidates a run can compute."""
    if not adapting:
        return ("source_val",)
    return tuple(c for c in CANDIDATES if has_test_gex or c not in NEEDS_TEST_GEX)


# ----------------------------------------------------------------------------- the scores (pure)

def _entropy_rows(p: Tensor) -> Tensor:
    """The entropy of each row of class probabilities (the last axis)."""
    p = p.float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1)


def entropy_score(p: Tensor) -> float:
    """1 - mean entropy / log C of predictions p (n, C): 1 = every prediction certain."""
    return float(1.0 - _entropy_rows(p).mean() / math.log(p.shape[1]))


def information_maximisation(p: Tensor) -> float:
    """(H(mean prediction) - mean H(prediction)) / log C: high when predictions are both
    confident and spread over the classes."""
    marginal = _entropy_rows(p.float().mean(0, keepdim=True))[0]
    return float((marginal - _entropy_rows(p).mean()) / math.log(p.shape[1]))


def soft_neighbourhood_density(p: Tensor, temperature: float = SND_TEMPERATURE) -> float:
    """SND (Saito et al. 2021): mean over cells of the entropy of the softmax (per row,
    self excluded) of similarities between L2-normalised predictions."""
    f = torch.nn.functional.normalize(p.float(), dim=1)
    sim = f @ f.T / temperature
    sim.fill_diagonal_(-math.inf)
    q = torch.softmax(sim, dim=1)
    return float(-(q * q.clamp_min(1e-30).log()).sum(1).mean())


def domain_weights(z_train: Tensor, z_test: Tensor, z_eval: Tensor, iters: int = 50,
                   l2: float = 1e-3, solver: str = "newton") -> Tensor:
    """Importance weights p(test | z) / p(train | z) * n_train / n_test of the rows z_eval, from an
    L2-regularised logistic domain classifier fitted on z_train (0) vs z_test (1); the features
    are standardised with the pooled statistics. solver: "newton" (damped Newton to convergence,
    at most `iters` steps, typically 5-10) or "lbfgs" (at most `iters` L-BFGS iterations,
    strong-Wolfe line search; the solver before issue 15). They reach the same optimum; on a
    GPU (an H200, research-sized `adapt` validation) Newton's few large kernels took 8-9 ms where
    L-BFGS's thousands of small ones took 180-270 ms (bench/bench_gpu_epoch.py, BENCHMARKS.md)."""
    X = torch.cat([z_train, z_test]).float()
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    X = (X - mu) / sd
    y = torch.cat([torch.zeros(len(z_train)), torch.ones(len(z_test))]).to(X.device)
    if solver == "newton":
        w, b = _logistic_newton(X, y, l2, iters)
    elif solver == "lbfgs":
        w, b = _logistic_lbfgs(X, y, l2, iters)
    else:
        raise ValueError(f"domain_weights: unknown solver {solver!r} (lbfgs, newton)")
    with torch.no_grad():
        logit = ((z_eval.float() - mu) / sd) @ w + b
        return logit.clamp(-20, 20).exp() * (len(z_train) / len(z_test))


def _logistic_lbfgs(X: Tensor, y: Tensor, l2: float, iters: int) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        w = torch.zeros(X.shape[1], device=X.device, requires_grad=True)
        b = torch.zeros((), device=X.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), b.detach()


def _logistic_newton(X: Tensor, y: Tensor, l2: float, iters: int, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """min mean BCE(X w + b, y) + l2 |w|^2 by Newton steps with Armijo backtracking; stops when
    half the Newton decrement is below tol (`_logistic_newton_members` with one member)."""
    theta = _logistic_newton_members(X.unsqueeze(0), y, l2, iters, tol)[0]
    return theta[:-1], theta[-1]


def iwcv_balanced_accuracy(y: Tensor, pred: Tensor, weights: Tensor) -> float:
    """Importance-weighted balanced accuracy: per true class the weighted share of correct
    predictions, averaged over the classes present."""
    recalls = []
    for c in torch.unique(y):
        m = y == c
        recalls.append(((pred[m] == c).float() * weights[m]).sum() / weights[m].sum().clamp_min(1e-12))
    return float(torch.stack(recalls).mean())


def dev_risk(losses: Tensor, weights: Tensor) -> float:
    """Deep embedded validation risk (You et al. 2019): mean(w l) + eta mean(w) - eta with the
    control variate eta = -Cov(w l, w) / Var(w)."""
    wl, w = (weights * losses).double(), weights.double()
    var = w.var()
    eta = 0.0 if var == 0 else float(-(((wl - wl.mean()) * (w - w.mean())).sum() / (len(w) - 1)) / var)
    return float(wl.mean() + eta * w.mean() - eta)


def agreement(p_peak: Tensor, p_gex: Tensor) -> float:
    """Balanced accuracy of the PEAK head's predictions against the expression head's."""
    ref, pred = p_gex.argmax(1), p_peak.argmax(1)
    return iwcv_balanced_accuracy(ref, pred, torch.ones_like(ref, dtype=torch.float32))


# ----------------------------------------------------------------------------- all of them

def subset(n: int, seed: int, k: int = MAX_CELLS) -> np.ndarray:
    """A fixed random subset of at most k of n rows (the same every epoch)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def candidate_values(source_val: float, *, y_val: Tensor | None = None, p_val: Tensor | None = None,
                     z_val: Tensor | None = None, z_train: Tensor | None = None, p_test: Tensor | None = None,
                     z_test: Tensor | None = None, p_test_gex: Tensor | None = None,
                     snd_rows: Tensor | None = None) -> dict[str, float]:
    """Every candidate computable from what is given. p_*: class probabilities, z_*: PEAK latents;
    *_val: the training line's validation cells (with their labels y_val), z_train: (a subset of)
    its training cells, *_test: the test line's cells (unlabelled), p_test_gex: the expression
    head on the same test cells; snd_rows: the test rows SND uses."""
    out = {"source_val": float(source_val)}
    if p_test is None:
        return out
    out["entropy"] = entropy_score(p_test)
    out["im"] = information_maximisation(p_test)
    out["snd"] = soft_neighbourhood_density(p_test if snd_rows is None else p_test[snd_rows])
    if z_val is not None and z_train is not None and z_test is not None:
        zt = z_test if snd_rows is None else z_test[snd_rows]
        w = domain_weights(z_train, zt, z_val)
        pred = p_val.argmax(1)
        out["iwcv"] = iwcv_balanced_accuracy(y_val, pred, w)
        ce = -p_val.float().clamp_min(1e-12).log().gather(1, y_val.view(-1, 1)).squeeze(1)
        out["dev"] = -dev_risk(ce, w)
    if p_test_gex is not None:
        out["agreement"] = agreement(p_test, p_test_gex)
    for other in ("entropy", "im", "agreement"):
        if other in out:
            out[f"source_val_{other}"] = 0.5 * (out["source_val"] + out[other])
    return out


# ----------------------------------------------------------------------------- a population's members at once

@torch.no_grad()
def _logistic_newton_members(X: Tensor, y: Tensor, l2: float, iters: int, tol: float = 1e-7) -> Tensor:
    """min mean BCE(X w + b, y) + l2 |w|^2 for every member at once by damped Newton steps: X
    [P, n, d] (standardised), y [n]; returns theta [P, d + 1] (weights, then the intercept). Each
    member stops when its own half Newton decrement is below tol, at most `iters` steps, and its
    Armijo backtracking halves its own step length: the steps it would take alone, with a few host
    round trips per iteration for all members instead of several per member."""
    P, n, d = X.shape
    Xb = torch.cat([X, X.new_ones(P, n, 1)], 2)
    reg = torch.full((d + 1,), 2 * l2, device=X.device)
    reg[-1] = 0.0
    yb = y.to(X.dtype).expand(P, n)

    def loss(t: Tensor) -> Tensor:  # [P]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.bmm(Xb, t.unsqueeze(2)).squeeze(2), yb, reduction="none").mean(1)
        return bce + l2 * (t[:, :-1] ** 2).sum(1)

    theta = Xb.new_zeros(P, d + 1)
    f = loss(theta)
    active = torch.ones(P, dtype=torch.bool, device=X.device)
    for _ in range(iters):
        p = torch.sigmoid(torch.bmm(Xb, theta.unsqueeze(2)).squeeze(2))                  # [P, n]
        g = torch.bmm(Xb.transpose(1, 2), (p - yb).unsqueeze(2)).squeeze(2) / n + reg * theta
        H = torch.bmm(Xb.transpose(1, 2) * (p * (1 - p) / n).unsqueeze(1), Xb)
        H.diagonal(dim1=1, dim2=2).add_(reg + 1e-9)
        step = _spd_solve(H, g)
        dec = (g * step).sum(1)
        active = active & (dec / 2 > tol)
        if not bool(active.any()):
            break
        t = torch.ones(P, device=X.device)
        accepted = ~active                      # members that take no step this iteration
        new_theta, new_f = theta.clone(), f.clone()
        while True:
            cand = theta - t.unsqueeze(1) * step
            fc = loss(cand)
            ok = ((fc <= f - 0.25 * t * dec) | (t < 1e-6)) & ~accepted
            new_theta = torch.where(ok.unsqueeze(1), cand, new_theta)
            new_f = torch.where(ok, fc, new_f)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, t / 2)
        theta, f = torch.where(active.unsqueeze(1), new_theta, theta), torch.where(active, new_f, f)
    return theta


def _spd_solve(H: Tensor, g: Tensor) -> Tensor:
    """H^-1 g for a batch of symmetric positive definite H [P, k, k], g [P, k]: Cholesky (batched
    LU solves fail in some CPU builds: torch 2.13's MKL, k >= 200, batch >= 2); a member whose
    Cholesky fails (not numerically positive definite) is solved alone by LU."""
    L, info = torch.linalg.cholesky_ex(H)
    step = torch.cholesky_solve(g.unsqueeze(2), L).squeeze(2)
    bad = torch.nonzero(info).flatten().tolist()
    for m in bad:
        step[m] = torch.linalg.solve(H[m], g[m])
    return step


def _balanced_agreement(ref: Tensor, pred: Tensor, weights: Tensor | None, classes: Tensor | None = None) -> Tensor:
    """`iwcv_balanced_accuracy` per member: ref, pred [P, n] (or ref [n], shared), weights [P, n]
    (None: 1); the mean over the classes present in each member's ref of its weighted recall."""
    if ref.ndim == 1:
        ref = ref.expand_as(pred)
    w = torch.ones_like(pred, dtype=torch.float32) if weights is None else weights
    classes = torch.unique(ref) if classes is None else classes
    total = torch.zeros(pred.shape[0], device=pred.device)
    present = torch.zeros(pred.shape[0], device=pred.device)
    for c in classes:
        m = (ref == c).float()
        den = (w * m).sum(1)
        has = (m.sum(1) > 0).float()
        total = total + has * ((pred == c).float() * w * m).sum(1) / den.clamp_min(1e-12)
        present = present + has
    return total / present.clamp_min(1)


def candidate_values_members(source_val: list[float], *, y_val: Tensor | None = None, p_val: Tensor | None = None,
                             z_val: Tensor | None = None, z_train: Tensor | None = None,
                             p_test: Tensor | None = None, z_test: Tensor | None = None,
                             p_test_gex: Tensor | None = None, snd_rows: Tensor | None = None,
                             chunk: int = 8) -> list[dict[str, float]]:
    """`candidate_values` for P members at once (a population, xfer.train.Population): every
    tensor has a leading member axis ([P, ...]; y_val [n] is shared), snd_rows [P, k] each
    member's fixed subset of test rows. The same formulas on the same numbers, batched (the SND
    similarity matrices `chunk` members at a time); tests/test_selection.py checks them
    member by member against `candidate_values`. Returns one dict per member."""
    out = [{"source_val": float(v)} for v in source_val]
    if p_test is None:
        return out
    P, log_c = p_test.shape[0], math.log(p_test.shape[-1])
    cols: dict[str, Tensor] = {}
    cols["entropy"] = 1.0 - _entropy_rows(p_test).mean(1) / log_c
    cols["im"] = (_entropy_rows(p_test.float().mean(1)) - _entropy_rows(p_test).mean(1)) / log_c
    rows = snd_rows if snd_rows is not None else torch.arange(p_test.shape[1], device=p_test.device).expand(P, -1)
    snd = []
    for s in range(0, P, chunk):
        p_sub = p_test[s:s + chunk].gather(1, rows[s:s + chunk].unsqueeze(2).expand(-1, -1, p_test.shape[2]))
        f = torch.nn.functional.normalize(p_sub.float(), dim=2)
        sim = torch.bmm(f, f.transpose(1, 2)) / SND_TEMPERATURE
        sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        q = torch.softmax(sim, dim=2)
        snd.append(-(q * q.clamp_min(1e-30).log()).sum(2).mean(1))
    cols["snd"] = torch.cat(snd)
    if z_val is not None and z_train is not None and z_test is not None:
        zt = z_test.gather(1, rows.unsqueeze(2).expand(-1, -1, z_test.shape[2])) if snd_rows is not None else z_test
        X = torch.cat([z_train, zt], 1).float()
        mu, sd = X.mean(1, keepdim=True), X.std(1, keepdim=True).clamp_min(1e-6)
        y = torch.cat([torch.zeros(z_train.shape[1]), torch.ones(zt.shape[1])]).to(X.device)
        theta = _logistic_newton_members((X - mu) / sd, y, 1e-3, 50)
        logit = torch.bmm((z_val.float() - mu) / sd, theta[:, :-1].unsqueeze(2)).squeeze(2) + theta[:, -1:]
        w = logit.clamp(-20, 20).exp() * (z_train.shape[1] / zt.shape[1])
        pred = p_val.argmax(2)
        cols["iwcv"] = _balanced_agreement(y_val, pred, w)
        ce = -p_val.float().clamp_min(1e-12).log().gather(2, y_val.view(1, -1, 1).expand(P, -1, 1)).squeeze(2)
        wl, wd = (w * ce).double(), w.double()
        var = wd.var(1)
        cov = ((wl - wl.mean(1, keepdim=True)) * (wd - wd.mean(1, keepdim=True))).sum(1) / (wd.shape[1] - 1)
        eta = torch.where(var == 0, torch.zeros_like(var), -cov / torch.where(var == 0, torch.ones_like(var), var))
        cols["dev"] = -(wl.mean(1) + eta * wd.mean(1) - eta)
    if p_test_gex is not None:
        cols["agreement"] = _balanced_agreement(p_test_gex.argmax(2), p_test.argmax(2), None,
                                                classes=torch.arange(p_test.shape[2], device=p_test.device))
    host = {k: v.double().cpu().tolist() for k, v in cols.items()}   # one transfer for every member
    for m, d in enumerate(out):
        for k in ("entropy", "im", "snd", "iwcv", "dev", "agreement"):
            if k in host:
                d[k] = float(host[k][m])
        for other in ("entropy", "im", "agreement"):
            if other in d:
                d[f"source_val_{other}"] = 0.5 * (d["source_val"] + d[other])
    return out
