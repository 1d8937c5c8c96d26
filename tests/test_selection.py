"""Label-free model selection (xfer.selection) and transductive trials: the scores' formulas,
objective resolution, and that no test-line label reaches a trial."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import SMALL_MODEL
from xfer import selection as S
from xfer.config import TrainConfig
from xfer.errors import ConfigError


def test_entropy_and_information_maximisation():
    certain = torch.eye(3)[[0, 1, 2, 0]]
    uniform = torch.full((4, 3), 1 / 3)
    assert S.entropy_score(certain) == pytest.approx(1.0)
    assert S.entropy_score(uniform) == pytest.approx(0.0, abs=1e-6)
    # IM: confident and spread over the classes scores high; confident but all one class does not
    assert S.information_maximisation(torch.eye(3)) == pytest.approx(1.0)
    assert S.information_maximisation(torch.eye(3)[[0, 0, 0]]) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    h = -(p * p.log()).sum(1)
    assert S.entropy_score(p) == pytest.approx(float(1 - h.mean() / math.log(3)), rel=1e-5)


def test_snd_per_row_softmax_without_self():
    p = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.05, 0.05, 0.9]])
    f = p / p.norm(dim=1, keepdim=True)
    sim = (f @ f.T / 0.05).numpy()
    ent = []
    for i in range(3):
        row = np.delete(sim[i], i)
        q = np.exp(row - row.max())
        q /= q.sum()
        ent.append(-(q * np.log(q)).sum())
    assert S.soft_neighbourhood_density(p) == pytest.approx(float(np.mean(ent)), rel=1e-5)


def test_dev_risk_control_variate():
    rng = np.random.default_rng(0)
    w, loss = rng.uniform(0.2, 3, 50), rng.uniform(0, 2, 50)
    wl = w * loss
    eta = -np.cov(np.stack([wl, w]))[0, 1] / np.var(w, ddof=1)
    expected = wl.mean() + eta * w.mean() - eta  # You et al. 2019, Algorithm 1
    assert S.dev_risk(torch.tensor(loss), torch.tensor(w)) == pytest.approx(expected, rel=1e-9)
    assert S.dev_risk(torch.tensor(loss), torch.ones(50, dtype=torch.float64)) == pytest.approx(loss.mean())


def test_domain_weights_upweight_test_like_cells():
    g = torch.Generator().manual_seed(0)
    z_train = torch.randn(400, 4, generator=g)
    z_test = torch.randn(400, 4, generator=g) + torch.tensor([2.0, 0, 0, 0])
    probe = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [2.0, 0, 0, 0]])
    w = S.domain_weights(z_train, z_test, probe)
    # the true density ratio is exp(2x - 2): e^-2, 1 and e^2 at x = 0, 1, 2 (the midpoint weighs 1)
    assert w[0] < w[1] < w[2]
    assert w.log().tolist() == pytest.approx([-2.0, 0.0, 2.0], abs=0.4)
    y, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    # class 0: weighted recall 3/4; class 1: 1 -> mean 0.875
    assert S.iwcv_balanced_accuracy(y, pred, torch.tensor([3.0, 1.0, 1.0, 1.0])) == pytest.approx(0.875)


def test_domain_weights_reach_the_logistic_regression_optimum():
    """The Newton solver fits the L2-regularised logistic regression: scikit-learn's lbfgs on the
    same objective (C = 1 / (2 l2 n), intercept unpenalised) gives the same log-weights."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    z_train = torch.randn(300, 20, generator=g)
    z_test = 1.2 * torch.randn(300, 20, generator=g) + 0.4 * torch.randn(20, generator=g)
    probe = torch.randn(50, 20, generator=g)
    X = torch.cat([z_train, z_test])
    mu, sd = X.mean(0), X.std(0)
    clf = LogisticRegression(C=1 / (2 * 1e-3 * 600), tol=1e-10, max_iter=10_000).fit(
        ((X - mu) / sd).numpy(), np.r_[np.zeros(300), np.ones(300)])
    expected = clf.decision_function(((probe - mu) / sd).numpy())
    got = S.domain_weights(z_train, z_test, probe).log().numpy()
    assert got == pytest.approx(expected, abs=2e-3)


def test_agreement_is_balanced_accuracy_against_the_expression_head():
    gex = torch.eye(3)[[0, 0, 1, 2]]
    peak = torch.eye(3)[[0, 1, 1, 2]]
    assert S.agreement(peak, gex) == pytest.approx((0.5 + 1 + 1) / 3)


def test_resolve_objective():
    t = S.TRANSFER
    assert S.resolve("auto", adapting=False, has_test_gex=False) == "source_val"
    assert S.resolve("auto", adapting=True, has_test_gex=True) == t["with_expression"]
    assert S.resolve("auto", adapting=True, has_test_gex=False) == t["peaks_only"]
    assert t["peaks_only"] not in S.NEEDS_TEST_GEX and set(t.values()) <= set(S.CANDIDATES)
    with pytest.raises(ConfigError, match="objective.*needs the test line's peaks"):
        S.resolve("transfer", adapting=False, has_test_gex=False)
    with pytest.raises(ConfigError, match="needs the test line's expression"):
        S.resolve("agreement", adapting=True, has_test_gex=False)
    with pytest.raises(ConfigError, match="config key 'objective': unknown 'nope'"):
        TrainConfig.from_dict({"objective": "nope"})
    with pytest.raises(ConfigError, match="'entropy' scores the test line's unlabelled cells"):
        S.resolve("entropy", adapting=False, has_test_gex=True)


def test_candidates_and_their_needs_come_from_the_registry():
    """The candidates are the registrations, in their order; what each needs is declared there, and
    a mean candidate needs what its parts need."""
    from xfer import registry
    from xfer.config import OBJECTIVES

    assert tuple(S.CANDIDATES) == ("source_val", "entropy", "im", "snd", "iwcv", "dev", "agreement",
                                   "source_val_entropy", "source_val_im", "source_val_agreement")
    assert tuple(OBJECTIVES) == ("auto", "transfer", *S.CANDIDATES)
    assert set(S.NEEDS_TEST_GEX) == {"agreement", "source_val_agreement"}
    assert registry.objective("source_val").needs == frozenset()
    assert registry.objective("source_val_im").needs == {"test_peaks"}
    assert registry.objective("source_val_agreement").mean_of == ("source_val", "agreement")
    from xfer.errors import XferError
    with pytest.raises(XferError, match="must include 'test_peaks'"):
        registry.register_objective(registry.ObjectiveSpec("needs_nothing", needs=frozenset(), value=len))
    with pytest.raises(XferError, match="already registered"):
        registry.register_objective(registry.ObjectiveSpec("entropy", value=len))
    with pytest.raises(XferError, match="a setting of its own"):
        registry.register_objective(registry.ObjectiveSpec("auto", value=len))
    assert "needs_nothing" not in S.CANDIDATES


def test_every_candidate_is_reported_each_epoch_and_chooses_the_best_epoch(tiny_train):
    from xfer.training import fit

    cfg, data, _, test = tiny_train
    cfg = cfg.replace(objective="entropy", epochs=4)
    seen = []
    res = fit(cfg, data.with_adaptation(test), lambda m, _c: seen.append(m))
    assert {f"sel/{c}" for c in S.CANDIDATES} <= set(seen[0])  # the test line's expression is given
    assert all(m["objective"] == m["sel/entropy"] for m in seen)
    assert res.best_metric == max(m["objective"] for m in seen if m["warmup"] >= 1)
    assert res.objective == "entropy" and res.checkpoint["metric_name"] == "entropy"
    # without a test line only source_val exists, and auto means it
    seen = []
    res = fit(cfg.replace(objective="auto"), data, lambda m, _c: seen.append(m))
    assert [k for k in seen[0] if k.startswith("sel/")] == ["sel/source_val"]
    assert res.objective == "peak_val_balanced_accuracy"


# ----------------------------------------------------------------------------- no test label reaches a trial

def _trial_reports(store, test, sup_peak, params, tmp_path, monkeypatch):
    from tune.data import DataSpec
    from tune.trainable import _run
    from xfer.data.store import CellStore

    monkeypatch.setenv("XFER_NODE_CACHE", str(tmp_path / "cache"))
    st = CellStore(str(store))
    spec = DataSpec(store=str(store), src="A_GEX", tgt="A_PEAK", test=test, sup_peak=sup_peak,
                    src_hash=st.manifest("A_GEX").content_hash, tgt_hash=st.manifest("A_PEAK").content_hash,
                    test_hash=st.manifest(test).content_hash, sup_peak_hash=st.manifest(sup_peak).content_hash)
    from xfer.config import ALL_ARCH_PARAMS
    base = {k: v for k, v in TrainConfig.from_dict({**SMALL_MODEL, "epochs": 4}).to_flat().items()
            if k not in ALL_ARCH_PARAMS}
    reports = []
    _run(params, spec.to_dict(), base, 2, "cpu", lambda: None, lambda m, _d: reports.append(m), report_every=1)
    return reports


@pytest.mark.parametrize("params", [{}, {"arch": "mlp", "lambda_pseudo": 2.0, "pseudo_fraction": 0.3,
                                         "peak_repr": "joint_lsi"}])
def test_relabelling_every_test_cell_leaves_every_reported_objective_identical(tiny_store, tmp_path, monkeypatch,
                                                                               params):
    """A trial given the test line (as store datasets that hold labels: the worst case) reports
    the same objective and candidates, epoch by epoch, when every test cell's label changes."""
    a = _trial_reports(tiny_store, "B_GEX", "B_PEAK", params, tmp_path, monkeypatch)
    b = _trial_reports(tiny_store, "B_GEX_relabelled", "B_PEAK_relabelled", params, tmp_path, monkeypatch)
    keys = [k for k in a[0] if k == "objective" or k.startswith(("sel/", "loss/", "peak_val_", "gex_val_"))]
    assert "sel/agreement" in keys and len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}


def test_the_sweep_stores_file_test_inputs_without_labels(tmp_path, tiny_pair):
    """`xfer tune` ingests a test line given as files without its labels (only the driver's
    final scoring reads them, from the files)."""
    from conftest import write_csv
    from tune.ingest import ingest_for_trials
    from xfer.data.inputs import DataSources
    from xfer.data.store import CellStore

    A, B = tiny_pair
    files = {}
    for role, ds in (("src", A.gex), ("tgt", A.peak), ("test", B.gex), ("sup_peak", B.peak)):
        from xfer.phases import decode_phases
        files[role] = str(write_csv(tmp_path / f"{role}.csv", ds.barcodes, ds.features, ds.X.toarray(),
                                    phase=decode_phases(ds.labels)))
    spec = ingest_for_trials(DataSources(store=str(tmp_path / "store"), **files), 0.2)
    store = CellStore(str(tmp_path / "store"))
    assert store.manifest(spec["src"]).has_labels
    for role in ("test", "sup_peak"):
        assert spec[role].endswith("_unlabelled") and not store.manifest(spec[role]).has_labels
        assert store.read(spec[role]).labels is None


def test_candidates_of_a_population_at_once_are_each_members_own():
    """candidate_values_members (a population's validation) gives every member what
    candidate_values gives it alone: the same formulas, batched."""
    import torch

    from xfer.selection import candidate_values, candidate_values_members

    g = torch.Generator().manual_seed(0)
    P, n_val, n_test, n_tr, d, C = 4, 120, 300, 200, 16, 3
    shift = torch.linspace(0, 1.5, P).view(P, 1, 1)
    z_train = torch.randn(P, n_tr, d, generator=g)
    z_test = torch.randn(P, n_test, d, generator=g) + shift
    z_val = torch.randn(P, n_val, d, generator=g)
    p_val = torch.softmax(torch.randn(P, n_val, C, generator=g) * 2, -1)
    p_test = torch.softmax(torch.randn(P, n_test, C, generator=g) * 2, -1)
    p_gex = torch.softmax(torch.randn(P, n_test, C, generator=g) * 2, -1)
    p_gex[2, :, 1] = -1.0  # a member whose expression head never predicts class 1
    p_gex[2] = torch.softmax(p_gex[2] * 5, -1)
    y_val = torch.randint(0, C, (n_val,), generator=g)
    rows = torch.stack([torch.randperm(n_test, generator=g)[:150].sort().values for _ in range(P)])
    src = [0.5, 0.6, 0.7, 0.8]
    together = candidate_values_members(src, y_val=y_val, p_val=p_val, z_val=z_val, z_train=z_train, p_test=p_test,
                                        z_test=z_test, p_test_gex=p_gex, snd_rows=rows, chunk=3)
    for m in range(P):
        alone = candidate_values(src[m], y_val=y_val, p_val=p_val[m], z_val=z_val[m], z_train=z_train[m],
                                 p_test=p_test[m], z_test=z_test[m], p_test_gex=p_gex[m], snd_rows=rows[m])
        assert together[m].keys() == alone.keys()
        for k, v in alone.items():
            assert together[m][k] == pytest.approx(v, abs=2e-5), (m, k)
    assert len({round(t["iwcv"], 6) for t in together}) == P  # the members differ: no mix-up
