"""One contract for every peak encoder and every divergence, plus the CDANN pieces. A model is
a population of P members (here P = 1 unless said): outputs carry a leading member axis."""

from __future__ import annotations

import pytest
import torch

from xfer import losses as L
from xfer import registry
from xfer.config import ARCHS, DIVERGENCES, TrainConfig
from xfer.model import PeakEncoder, build_model, encoder_class
from xfer.model.layers import grad_reverse

from conftest import SMALL_MODEL


def _cfg(arch, **kw):
    return TrainConfig.from_dict({**{k: v for k, v in SMALL_MODEL.items()}, "arch": arch, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_contract(arch):
    """Shape, finite objective with gradients into the encoder, deterministic eval, train-time perturbation."""
    torch.manual_seed(0)
    cfg = _cfg(arch)
    model = build_model(emb_dim=16, n_peaks=200, cfg=cfg.model)
    x = (torch.rand(24, 200) < 0.2).float() * torch.rand(24, 200) * 3
    emb = torch.randn(24, 16)
    model.train()
    out = model.peak_latent(x)
    assert out.z.shape == (1, 24, cfg.model.latent_dim)
    z_s = model.source_latent(emb)
    terms = model.encoder.objective(model.normalise_peaks(x), out, z_s)
    expected = {"dae": {"recon"}, "vae": {"recon", "kl"}, "contrastive": {"contrastive"}, "hybrid": set(), "mlp": set()}
    assert set(terms) == expected[arch]
    parts = L.combine({"cls": (1.0, model.classify(out.z).logsumexp(-1).mean(1)), **terms})
    assert parts.total.shape == (1,) and torch.isfinite(parts.total).all()
    parts.total.sum().backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    a, b = model.peak_latent(x).z, model.peak_latent(x).z
    assert torch.equal(a, b)  # deterministic at evaluation (VAE: posterior mean, no corruption)
    assert type(model.encoder) is encoder_class(arch)


def test_every_registered_encoder_loads_and_reads_its_member_parameters():
    """ARCHS is the registry's; each name loads its class, and the encoder's per-member scalars are
    peak_dropout and the parameters its registration declares per member, with each member's value."""
    expected = {"dae": {"corruption", "lambda_recon"}, "vae": {"beta", "lambda_recon"},
                "contrastive": {"temperature", "aug_dropout", "lambda_contrastive"}, "hybrid": set(), "mlp": set()}
    assert tuple(ARCHS) == tuple(expected)
    for arch in ARCHS:
        assert issubclass(encoder_class(arch), PeakEncoder), arch
        spec = registry.encoder(arch)
        assert set(spec.member_params()) == expected[arch], arch
        cfgs = [_cfg(arch).model, _cfg(arch, peak_dropout=0.05, **{p: 0.5 for p in spec.member_params()}).model]
        model = build_model(16, 40, cfgs, seed=[0, 1])
        assert set(model.encoder.hp.names) == {"peak_dropout", *expected[arch]}
        for name in model.encoder.hp.names:
            assert model.encoder.hp.values[name] == [getattr(c, name) for c in cfgs], (arch, name)


def test_dae_corrupts_and_vae_samples_only_in_training():
    torch.manual_seed(0)
    x = torch.ones(8, 500)
    dae = build_model(16, 500, _cfg("dae", corruption=0.3, peak_dropout=0.0).model).train()
    frac = (dae.encoder.perturb(x) == 0).float().mean().item()
    assert 0.2 < frac < 0.4
    vae = build_model(16, 500, _cfg("vae").model).train()
    assert not torch.equal(vae.peak_latent(x).z, vae.peak_latent(x).z)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_contract_on_latents(name):
    torch.manual_seed(0)
    z = torch.randn(64, 32, requires_grad=True)
    assert L.divergence(name, z, z.detach().clone()).item() == pytest.approx(0.0, abs=1e-5)
    shifted = L.divergence(name, z, z.detach() * 2 + 1)
    assert shifted.item() > 0
    shifted.backward()
    assert torch.isfinite(z.grad).all()


def test_gradient_reversal():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -0.5))
    lam = torch.tensor(0.0)  # a tensor lambda is read when backward runs (what a CUDA graph replays)
    y = grad_reverse(x, lam)
    lam.fill_(2.0)
    x.grad = None
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))
    x = torch.ones(2, 3, requires_grad=True)  # one strength per member
    grad_reverse(x, torch.tensor([0.5, 2.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[-0.5] * 3, [-2.0] * 3]))


@pytest.mark.parametrize("use_cdann, latent, expect", [(True, 32, 96), (False, 32, 32), (True, 2048, 1024)])
def test_discriminator_input(use_cdann, latent, expect):
    cfg = _cfg("mlp", latent_dim=latent)
    m = build_model(16, 50, cfg.model, use_cdann=use_cdann)
    assert build_model(16, 50, cfg.model, n_domains=3).discriminator[-1].out_features == 3
    assert m.discriminator[0].in_features == expect
    z = torch.randn(1, 5, latent, requires_grad=True)
    p = torch.softmax(torch.randn(1, 5, 3), -1)
    d = m.discriminate(z, p, grl=1.0)
    assert d.shape == (1, 5, 2)
    d.sum().backward()
    assert z.grad is not None
