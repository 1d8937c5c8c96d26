"""Label-free model selection for transfer: which epoch and which trial to keep.

Every epoch the training loop computes each registered candidate (xfer.registry; the built-in
ones below are registered in xfer/builtin.py) from what it may see: the training line's
labelled validation cells and the test line's *unlabelled* cells (its accessibility; its
expression when --test_csv is given), gathered in a `SelectionInputs`. No test-line label
reaches any of them. Higher is better for all.

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

Each candidate has two functions: `<name>_value` scores one member (`candidate_values`, the
formulas as written) and `<name>_members` every member of a population (xfer.training.Population)
at once (`candidate_values_members`: the same formulas batched over a leading member axis, one
Newton solve for every member's domain classifier), so validating P members costs a few kernels
and host round trips per candidate rather than P times as many. The means (source_val_<x>) are
computed from the others' values on the host.

`objective=transfer` is the candidate the study `bench/selection_objective.py` chose on
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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import registry
from .config import OBJECTIVES, SELECTION_CANDIDATES as CANDIDATES
from .errors import ConfigError

# The candidates that need the test line's expression (from their registrations).
NEEDS_TEST_GEX = registry.LiveSet(lambda: frozenset(n for n, s in registry.objectives().items()
                                                    if "test_gex" in s.needs))
# The study's picks (bench/selection_objective.py, BENCHMARKS.md): the lowest mean selection regret
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
    needs = registry.objective(objective).needs
    if "test_peaks" in needs and not adapting:
        raise ConfigError("objective", f"{objective!r} scores the test line's unlabelled cells: give "
                          "--sup_peak_csv (and keep adapt_test_peaks on)")
    if "test_gex" in needs and not has_test_gex:
        raise ConfigError("objective", f"{objective!r} needs the test line's expression (--test_csv)")
    return objective


def resolve_for(cfg, test_peaks: bool, test_gex: bool) -> str:
    """The candidate a run's config means given which test-line inputs it has: it adapts when
    the test line's peaks are given and adapt_test_peaks is on (as `TrainData.with_adaptation`)."""
    return resolve(cfg.optim.objective, test_peaks and cfg.data.adapt_test_peaks, test_gex)


# ----------------------------------------------------------------------------- what a candidate reads

@dataclass
class SelectionInputs:
    """What the selection candidates of one epoch may read. p_*: class probabilities, z_*: PEAK
    latents; *_val: the training line's validation cells (labels y_val), z_train: (a subset of) its
    training cells, *_test: the test line's cells (unlabelled), p_test_gex: the expression head on
    the same test cells; snd_rows: the test rows SND and the domain classifier use (None: all).
    One member's tensors, or (`members`) every member's with a leading member axis [P, ...]
    (y_val [n] is shared; snd_rows [P, k]). `cached` keeps what several candidates share."""

    source_val: float | list[float]
    y_val: Tensor | None = None
    p_val: Tensor | None = None
    z_val: Tensor | None = None
    z_train: Tensor | None = None
    p_test: Tensor | None = None
    z_test: Tensor | None = None
    p_test_gex: Tensor | None = None
    snd_rows: Tensor | None = None
    members: bool = False
    chunk: int = 8                      # members whose SND similarity matrices are built at once
    cache: dict = field(default_factory=dict, repr=False)

    def given(self) -> frozenset[str]:
        """Which of registry.NEEDS these inputs hold."""
        if self.p_test is None:
            return frozenset()
        needed = {"y_val": self.y_val, "p_val": self.p_val, "z_val": self.z_val, "z_train": self.z_train,
                  "z_test": self.z_test}
        missing = [k for k, v in needed.items() if v is None]
        if missing:
            raise ValueError(f"selection: p_test is given without {', '.join(missing)}")
        return frozenset({"test_peaks"} | ({"test_gex"} if self.p_test_gex is not None else set()))

    def cached(self, key: str, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def member(self, m: int) -> "SelectionInputs":
        """Member m's inputs (of inputs with a member axis)."""
        one = {k: (v if k == "y_val" or v is None else v[m]) for k, v in vars(self).items()
               if k not in ("source_val", "members", "chunk", "cache")}
        return SelectionInputs(self.source_val[m], **one)

    def test_subset(self, t: Tensor) -> Tensor:
        """The test rows SND and the domain classifier use, of t ([n, ...], or [P, n, ...] for members)."""
        if self.snd_rows is None:
            return t
        if not self.members:
            return t[self.snd_rows]
        return t.gather(1, self.snd_rows.unsqueeze(2).expand(-1, -1, t.shape[2]))


def candidate_values(source_val: float, *, y_val: Tensor | None = None, p_val: Tensor | None = None,
                     z_val: Tensor | None = None, z_train: Tensor | None = None, p_test: Tensor | None = None,
                     z_test: Tensor | None = None, p_test_gex: Tensor | None = None,
                     snd_rows: Tensor | None = None) -> dict[str, float]:
    """Every registered candidate computable from what is given (see SelectionInputs), for one member."""
    x = SelectionInputs(source_val, y_val=y_val, p_val=p_val, z_val=z_val, z_train=z_train, p_test=p_test,
                        z_test=z_test, p_test_gex=p_test_gex, snd_rows=snd_rows)
    specs = _computable(x)
    values = {n: float(s.value_fn()(x)) for n, s in specs.items() if not s.mean_of}
    return _with_means(values, specs)


def candidate_values_members(source_val: list[float], *, y_val: Tensor | None = None, p_val: Tensor | None = None,
                             z_val: Tensor | None = None, z_train: Tensor | None = None,
                             p_test: Tensor | None = None, z_test: Tensor | None = None,
                             p_test_gex: Tensor | None = None, snd_rows: Tensor | None = None,
                             chunk: int = 8) -> list[dict[str, float]]:
    """`candidate_values` for P members at once (a population, xfer.training.Population): every
    tensor has a leading member axis ([P, ...]; y_val [n] is shared), snd_rows [P, k] each
    member's fixed subset of test rows. The same formulas on the same numbers, batched (a
    candidate registered without a batched function runs member by member); tests/test_selection.py
    checks them member by member against `candidate_values`. Returns one dict per member."""
    x = SelectionInputs(source_val, y_val=y_val, p_val=p_val, z_val=z_val, z_train=z_train, p_test=p_test,
                        z_test=z_test, p_test_gex=p_test_gex, snd_rows=snd_rows, members=True, chunk=chunk)
    specs = _computable(x)
    cols = {}
    for name, spec in specs.items():
        if spec.mean_of:
            continue
        batched = spec.members_fn()
        cols[name] = batched(x) if batched is not None else [spec.value_fn()(x.member(m))
                                                             for m in range(len(source_val))]
    host = {k: (v.double().cpu().tolist() if isinstance(v, Tensor) else list(v)) for k, v in cols.items()}
    return [_with_means({k: float(v[m]) for k, v in host.items()}, specs) for m in range(len(source_val))]


def _computable(x: SelectionInputs) -> dict:
    """The registered candidates whose needs the inputs meet, in the registry's order."""
    given = x.given()
    return {n: s for n, s in registry.objectives().items() if s.needs <= given}


def _with_means(values: dict[str, float], specs: dict) -> dict[str, float]:
    """values with the mean candidates added, every candidate in the registry's order."""
    for name, spec in specs.items():
        if spec.mean_of:
            values[name] = sum(values[n] for n in spec.mean_of) / len(spec.mean_of)
    return {n: values[n] for n in specs}


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


def domain_weights(z_train: Tensor, z_test: Tensor, z_eval: Tensor, iters: int = 50, l2: float = 1e-3) -> Tensor:
    """Importance weights p(test | z) / p(train | z) * n_train / n_test of the rows z_eval, from an
    L2-regularised logistic domain classifier fitted on z_train (0) vs z_test (1) by damped Newton
    steps (to convergence, at most `iters`, typically 5-10); the features are standardised with
    the pooled statistics."""
    X = torch.cat([z_train, z_test]).float()
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    X = (X - mu) / sd
    y = torch.cat([torch.zeros(len(z_train)), torch.ones(len(z_test))]).to(X.device)
    w, b = _logistic_newton(X, y, l2, iters)
    with torch.no_grad():
        logit = ((z_eval.float() - mu) / sd) @ w + b
        return logit.clamp(-20, 20).exp() * (len(z_train) / len(z_test))


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


def subset(n: int, seed: int, k: int = MAX_CELLS) -> np.ndarray:
    """A fixed random subset of at most k of n rows (the same every epoch)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


# ----------------------------------------------------------------------------- the candidates, one member
# (registered in xfer/builtin.py; x: SelectionInputs of one member)

def entropy_value(x: SelectionInputs) -> float:
    return entropy_score(x.p_test)


def im_value(x: SelectionInputs) -> float:
    return information_maximisation(x.p_test)


def snd_value(x: SelectionInputs) -> float:
    return soft_neighbourhood_density(x.test_subset(x.p_test))


def _weights(x: SelectionInputs) -> Tensor:
    """The validation cells' importance weights (one domain classifier for iwcv and dev)."""
    return x.cached("weights", lambda: domain_weights(x.z_train, x.test_subset(x.z_test), x.z_val))


def iwcv_value(x: SelectionInputs) -> float:
    return iwcv_balanced_accuracy(x.y_val, x.p_val.argmax(1), _weights(x))


def dev_value(x: SelectionInputs) -> float:
    ce = -x.p_val.float().clamp_min(1e-12).log().gather(1, x.y_val.view(-1, 1)).squeeze(1)
    return -dev_risk(ce, _weights(x))


def agreement_value(x: SelectionInputs) -> float:
    return agreement(x.p_test, x.p_test_gex)


# ----------------------------------------------------------------------------- the candidates, every member at once
# (x: SelectionInputs with a member axis; each returns [P])

def entropy_members(x: SelectionInputs) -> Tensor:
    return 1.0 - _entropy_rows(x.p_test).mean(1) / math.log(x.p_test.shape[-1])


def im_members(x: SelectionInputs) -> Tensor:
    p = x.p_test
    return (_entropy_rows(p.float().mean(1)) - _entropy_rows(p).mean(1)) / math.log(p.shape[-1])


def snd_members(x: SelectionInputs) -> Tensor:
    """SND of each member, the similarity matrices of `x.chunk` members at a time."""
    p_test, P = x.p_test, x.p_test.shape[0]
    rows = x.snd_rows if x.snd_rows is not None else torch.arange(p_test.shape[1], device=p_test.device).expand(P, -1)
    snd = []
    for s in range(0, P, x.chunk):
        p_sub = p_test[s:s + x.chunk].gather(1, rows[s:s + x.chunk].unsqueeze(2).expand(-1, -1, p_test.shape[2]))
        f = torch.nn.functional.normalize(p_sub.float(), dim=2)
        sim = torch.bmm(f, f.transpose(1, 2)) / SND_TEMPERATURE
        sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        q = torch.softmax(sim, dim=2)
        snd.append(-(q * q.clamp_min(1e-30).log()).sum(2).mean(1))
    return torch.cat(snd)


def _weights_members(x: SelectionInputs) -> Tensor:
    """`_weights` of every member [P, n_val]: one Newton solve for all members' domain classifiers."""
    def make():
        z_train, zt = x.z_train, x.test_subset(x.z_test)
        X = torch.cat([z_train, zt], 1).float()
        mu, sd = X.mean(1, keepdim=True), X.std(1, keepdim=True).clamp_min(1e-6)
        y = torch.cat([torch.zeros(z_train.shape[1]), torch.ones(zt.shape[1])]).to(X.device)
        theta = _logistic_newton_members((X - mu) / sd, y, 1e-3, 50)
        logit = torch.bmm((x.z_val.float() - mu) / sd, theta[:, :-1].unsqueeze(2)).squeeze(2) + theta[:, -1:]
        return logit.clamp(-20, 20).exp() * (z_train.shape[1] / zt.shape[1])
    return x.cached("weights", make)


def iwcv_members(x: SelectionInputs) -> Tensor:
    return _balanced_agreement(x.y_val, x.p_val.argmax(2), _weights_members(x))


def dev_members(x: SelectionInputs) -> Tensor:
    w, P = _weights_members(x), x.p_val.shape[0]
    ce = -x.p_val.float().clamp_min(1e-12).log().gather(2, x.y_val.view(1, -1, 1).expand(P, -1, 1)).squeeze(2)
    wl, wd = (w * ce).double(), w.double()
    var = wd.var(1)
    cov = ((wl - wl.mean(1, keepdim=True)) * (wd - wd.mean(1, keepdim=True))).sum(1) / (wd.shape[1] - 1)
    eta = torch.where(var == 0, torch.zeros_like(var), -cov / torch.where(var == 0, torch.ones_like(var), var))
    return -(wl.mean(1) + eta * wd.mean(1) - eta)


def agreement_members(x: SelectionInputs) -> Tensor:
    p_test = x.p_test
    return _balanced_agreement(x.p_test_gex.argmax(2), p_test.argmax(2), None,
                               classes=torch.arange(p_test.shape[2], device=p_test.device))


# ----------------------------------------------------------------------------- batched helpers

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
