"""One registration per extension (xfer.registry): a toy encoder and a toy selection objective,
each registered in one place (tests/toy_extension.py), are seen by the config, the search space,
the model, the per-epoch candidates and a one-trial sweep whose Ray trial process loads the
extension itself (XFER_EXTENSIONS); entry points of group xfer.extensions load an installed one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from conftest import SMALL_MODEL
from xfer import registry
from xfer.config import ALL_ARCH_PARAMS, ARCH_PARAMS, ARCHS, MEMBER_KEYS, OBJECTIVES, TrainConfig
from xfer.errors import ConfigError, XferError

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def toy():
    """The toy extension loaded as a user's would be (XFER_EXTENSIONS, on PYTHONPATH), registered
    in this process; afterwards the registries are as before."""
    registry.load_extensions()  # the built-ins first, as in any process
    saved = [(d, dict(d)) for d in (registry._ENCODERS, registry._OBJECTIVES)]
    env = {k: os.environ.get(k) for k in (registry.EXTENSIONS_ENV, "PYTHONPATH")}
    os.environ[registry.EXTENSIONS_ENV] = "toy_extension"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env["PYTHONPATH"]]))
    import toy_extension
    yield toy_extension
    sys.modules.pop("toy_extension", None)
    for registered, before in saved:
        registered.clear()
        registered.update(before)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_the_toy_encoder_is_a_valid_config_with_its_parameters(toy):
    assert "toy" in ARCHS and ARCH_PARAMS["toy"] == ("toy_width", "toy_weight")
    assert {"toy_width", "toy_weight"} <= ALL_ARCH_PARAMS
    assert "toy_weight" in MEMBER_KEYS and "toy_width" not in MEMBER_KEYS   # a width is the population's shape
    cfg = TrainConfig.from_dict({"arch": "toy", "toy_width": 8})
    assert cfg.model.params == {"toy_width": 8, "toy_weight": 0.1} and cfg.model.toy_width == 8
    assert {"toy_width": 8, "toy_weight": 0.1}.items() <= cfg.to_flat().items()
    assert "toy_width" not in TrainConfig().to_flat() and TrainConfig().to_flat(live_only=False)["toy_width"] == 16
    assert TrainConfig.from_dict(cfg.to_dict(), allow_inert=True) == cfg
    with pytest.raises(ConfigError, match="must be >= 1, got 0") as e:
        TrainConfig.from_dict({"arch": "toy", "toy_width": 0})
    assert e.value.key == "toy_width"
    with pytest.raises(ConfigError, match="only used by arch toy, but arch is 'dae'"):
        TrainConfig.from_dict({"toy_weight": 0.5})
    with pytest.raises(ConfigError, match="expected int"):
        TrainConfig.from_dict({"arch": "toy", "toy_width": "wide"})


def test_the_toy_objective_is_a_valid_objective_with_its_needs(toy):
    from xfer import selection as S

    assert "toy_confidence" in OBJECTIVES and "toy_confidence" in S.CANDIDATES
    assert TrainConfig.from_dict({"objective": "toy_confidence"}).optim.objective == "toy_confidence"
    assert S.resolve("toy_confidence", adapting=True, has_test_gex=False) == "toy_confidence"
    with pytest.raises(ConfigError, match="'toy_confidence' scores the test line's unlabelled cells"):
        S.resolve("toy_confidence", adapting=False, has_test_gex=False)


def test_registrations_that_would_clash_are_refused(toy):
    with pytest.raises(XferError, match="already registered"):
        registry.register_encoder(registry.EncoderSpec("toy", toy.ToyEncoder))
    with pytest.raises(XferError, match="'lr' is a config key of its own"):
        registry.register_encoder(registry.EncoderSpec("toy2", toy.ToyEncoder, params=(registry.Param("lr", 0.1),)))
    with pytest.raises(XferError, match="'toy_width' is declared differently"):
        registry.register_encoder(registry.EncoderSpec("toy2", toy.ToyEncoder,
                                                       params=(registry.Param("toy_width", 32, at_least=1),)))
    assert "toy2" not in ARCHS


def test_the_toy_encoder_is_in_the_broad_search_space(toy):
    from tune.space import BROAD_SPACE, CENTRED_SPACE, load_space

    assert "toy" in BROAD_SPACE["arch"]["choices"]
    assert BROAD_SPACE["toy_width"] == {"type": "categorical", "choices": [8, 16]}
    assert "toy_width" not in CENTRED_SPACE   # no centred entry, and the centred space chooses dae alone
    space = load_space("broad").with_fixed({"arch": "toy"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        params = space(trial)
        assert params["arch"] == "toy" and params["toy_width"] in (8, 16) and 0.01 <= params["toy_weight"] <= 1.0
        assert set(params) & ALL_ARCH_PARAMS == {"toy_width", "toy_weight"}
        TrainConfig.from_dict(params)
        study.tell(trial, 0.0)


def test_the_toy_encoder_builds_and_the_toy_objective_is_computed(toy):
    from xfer.model import build_model
    from xfer.objective import unweighted_parts
    from xfer.selection import candidate_values, candidate_values_members

    cfgs = [TrainConfig.from_dict({**SMALL_MODEL, "arch": "toy", "toy_weight": w}) for w in (0.0, 0.5)]
    model = build_model(8, 30, [c.model for c in cfgs], seed=[0, 1])
    assert isinstance(model.encoder, toy.ToyEncoder) and model.encoder.hp.values["toy_weight"] == [0.0, 0.5]
    out = model.peak_latent(torch.rand(5, 30))
    weight, term = model.encoder.objective(None, out, None)["toy_norm"]
    assert weight.tolist() == [0.0, 0.5] and term().shape == (2,)
    assert "toy_norm" in unweighted_parts(cfgs[0]) and "toy_norm" not in unweighted_parts(cfgs[1])
    g = torch.Generator().manual_seed(0)
    P, n = 2, 40

    def draw(*shape):
        return torch.randn(*shape, generator=g)

    members = dict(p_val=torch.softmax(draw(P, n, 3), -1), z_val=draw(P, n, 4), z_train=draw(P, n, 4),
                   p_test=torch.softmax(draw(P, n, 3) * 3, -1), z_test=draw(P, n, 4))
    y_val = torch.randint(0, 3, (n,), generator=g)
    together = candidate_values_members([0.5, 0.6], y_val=y_val, **members)  # the toy has no batched function
    for m in range(P):
        alone = candidate_values([0.5, 0.6][m], y_val=y_val, **{k: v[m] for k, v in members.items()})
        expected = float(members["p_test"][m].max(-1).values.mean())
        assert alone["toy_confidence"] == together[m]["toy_confidence"] == pytest.approx(expected)
        assert list(alone) == list(together[m]) and list(alone)[-1] == "toy_confidence"


FIX = ["--set=hidden_dim=64", "--set=latent_dim=32", "--set=proj_hidden=64", "--set=batch_size=64", "--set=n_layers=1",
       "--set=n_components=16", "--set=disc_hidden=64", "--set=cls_hidden=32", "--set=warmup_epochs=1"]


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_a_one_trial_sweep_trains_the_toy_encoder_chosen_by_the_toy_objective(toy, tiny_store, tmp_path, monkeypatch):
    """`xfer tune --arch_type toy --objective toy_confidence`: the trial runs in a Ray worker process,
    which loads the extension from XFER_EXTENSIONS (it would refuse the arch and the objective
    otherwise); its parameters, candidate and final model are the toy's."""
    import ray

    from xfer.cli import main

    if ray.is_initialized():  # trial processes inherit this process's environment when Ray starts here
        ray.shutdown()
    monkeypatch.setenv("XFER_NODE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    try:
        rc = main(["tune", "--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
                   "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK", "--output_folder", str(out),
                   "--num_cpus", "2", "--cpus_per_trial", "1", "--space", "broad", "--n_trials", "1",
                   "--search_epochs", "3", "--arch_type", "toy", "--objective", "toy_confidence", *FIX])
    finally:
        ray.shutdown()
    assert rc == 0
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 1 and df.loc[0, "status"] == "completed", df.iloc[0].to_dict()
    row = df.iloc[0]
    assert row["param.arch"] == "toy" and row["param.toy_width"] == 16 and row["param.toy_weight"] == pytest.approx(0.1)
    assert row["best_objective"] == row["sel.toy_confidence"]
    best = json.loads((out / "best_params.json").read_text())
    assert best["objective"] == "toy_confidence" and best["params"]["arch"] == "toy"
    assert {"toy_width", "toy_weight"} <= set(best["params"])
    ck = torch.load(out / "best_model.pt", weights_only=True)
    assert ck["config"]["model"]["arch"] == "toy" and ck["config"]["model"]["toy_width"] == 16


def test_an_installed_packages_entry_point_is_loaded(tmp_path):
    """A package that declares `[project.entry-points."xfer.extensions"]` is loaded in any process that
    reads a config (here a fresh interpreter, as a trial worker is), and reading it imports no torch."""
    (tmp_path / "ep_ext.py").write_text(textwrap.dedent("""
        from xfer.registry import EncoderSpec, Param, register_encoder
        register_encoder(EncoderSpec("ep_toy", "toy_extension:ToyEncoder", params=(Param("ep_width", 4, at_least=1),)))
    """))
    dist = tmp_path / "ep_ext-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[xfer.extensions]\nep_ext = ep_ext\n")
    code = ("import sys; from xfer.config import TrainConfig; "
            "c = TrainConfig.from_dict({'arch': 'ep_toy', 'ep_width': 3}); "
            "print(c.model.params, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS.parent)])}
    env.pop(registry.EXTENSIONS_ENV, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "{'ep_width': 3} False"


def test_an_extension_that_cannot_be_imported_is_one_clear_error(tmp_path):
    env = {**os.environ, registry.EXTENSIONS_ENV: "no_such_extension_module", "PYTHONPATH": str(TESTS.parent)}
    r = subprocess.run([sys.executable, "-c", "from xfer.config import TrainConfig; TrainConfig()"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "XFER_EXTENSIONS: cannot import extension module 'no_such_extension_module'" in r.stderr
