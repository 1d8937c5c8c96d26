"""Frozen config dataclasses: flat/nested keys, files, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from xfer.config import ARCH_PARAMS, FLAT_KEYS, TrainConfig
from xfer.errors import ConfigError


def test_defaults_are_valid_and_frozen():
    cfg = TrainConfig()
    cfg.validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_flat_and_nested_keys_and_seed_aliases():
    a = TrainConfig.from_dict({"lr": 0.01, "arch_type": "vae", "beta": 2.0, "divergence_type": "coral"})
    b = TrainConfig.from_dict({"optim": {"lr": 0.01}, "model": {"arch": "vae", "beta": 2.0},
                               "loss": {"divergence": "coral"}})
    assert a == b and a.model.beta == 2.0 and a.loss.divergence == "coral"


def test_flat_view_holds_only_live_parameters():
    flat = TrainConfig.from_dict({"arch": "contrastive"}).to_flat()
    assert "temperature" in flat and "beta" not in flat and "corruption" not in flat
    assert TrainConfig.from_dict(flat) == TrainConfig.from_dict({"arch": "contrastive"})


@pytest.mark.parametrize("bad, key, msg", [
    ({"learning_rate": 0.1}, "learning_rate", "unknown key"),
    ({"lamda_domain": 0.1}, "lamda_domain", "did you mean 'lambda_domain'"),
    ({"lr": "fast"}, "lr", "expected float"),
    ({"epochs": 2.5}, "epochs", "expected int"),
    ({"lr": -1.0}, "lr", "must be > 0"),
    ({"dropout": 1.0}, "dropout", r"must be in \[0, 1\)"),
    ({"arch": "transformer"}, "arch", "unknown architecture"),
    ({"divergence": "wasserstein"}, "divergence", "unknown divergence"),
    ({"beta": 2.0}, "beta", "only used by arch vae, but arch is 'dae'"),
    ({"use_cdann": "maybe"}, "use_cdann", "expected bool"),
    ({"model": {"depth": 3}}, "model.depth", "unknown key"),
    ({"lambda_domain": float("nan")}, "lambda_domain", "expected float"),
])
def test_bad_config_names_the_key(bad, key, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        TrainConfig.from_dict(bad)
    assert e.value.key == key
    assert f"'{key}'" in str(e.value)


def test_every_arch_param_is_a_model_key_with_its_registered_default_and_range():
    from xfer import registry

    assert tuple(ARCH_PARAMS) == ("dae", "vae", "contrastive", "hybrid", "mlp")
    for arch, params in ARCH_PARAMS.items():
        cfg = TrainConfig.from_dict({"arch": arch})
        assert tuple(cfg.model.params) == params
        for spec in registry.encoder(arch).params:
            assert FLAT_KEYS[spec.name] == "model", (arch, spec.name)
            assert getattr(cfg.model, spec.name) == spec.default and spec.problem(spec.default) is None
    with pytest.raises(AttributeError, match="arch 'dae' has no setting 'beta'"):
        TrainConfig().model.beta  # noqa: B018 - not a parameter of dae


@pytest.mark.parametrize("key, bad, msg", [
    ("corruption", 1.0, r"must be in \[0, 1\), got 1.0"), ("beta", -0.5, "must be >= 0, got -0.5"),
    ("temperature", 0.0, "must be > 0, got 0.0"), ("n_blocks", 0, "must be >= 1, got 0"),
    ("proj_dim", 1.5, "expected int"),
])
def test_arch_params_are_checked_against_their_registration(key, bad, msg):
    from xfer import registry

    arch = registry.param_owners(key)[0]
    with pytest.raises(ConfigError, match=msg) as e:
        TrainConfig.from_dict({"arch": arch, key: bad})
    assert e.value.key == key


def test_changing_arch_keeps_the_parameters_both_share():
    """A base config's value of a parameter the new architecture shares carries over; the others
    take the new architecture's defaults."""
    dae = TrainConfig.from_dict({"arch": "dae", "lambda_recon": 0.5, "corruption": 0.2})
    vae = dae.replace(arch="vae")
    assert vae.model.params == {"beta": 1.7, "lambda_recon": 0.5}
    assert vae.replace(arch="dae").model.params == {"corruption": 0.05, "lambda_recon": 0.5}


def test_from_file_json_yaml_and_best_params(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.002, "arch": "hybrid", "n_blocks": 3}))
    (tmp_path / "c.yaml").write_text("lr: 0.002\narch: hybrid\nn_blocks: 3\n")
    (tmp_path / "best_params.json").write_text(json.dumps({"params": {"lr": 0.002, "arch": "hybrid", "n_blocks": 3},
                                                          "objective": 0.7}))
    cfgs = [TrainConfig.from_file(tmp_path / n) for n in ("c.json", "c.yaml", "best_params.json")]
    assert cfgs[0] == cfgs[1] == cfgs[2] and cfgs[0].model.n_blocks == 3


def test_from_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        TrainConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "k.json").write_text(json.dumps({"lr": 0.1, "foo": 1}))
    with pytest.raises(ConfigError, match=r"k\.json: config key 'foo': unknown key"):
        TrainConfig.from_file(tmp_path / "k.json")
    with pytest.raises(ConfigError, match="file not found"):
        TrainConfig.from_file(tmp_path / "missing.json")


def test_checkpoint_config_round_trip():
    cfg = TrainConfig.from_dict({"arch": "vae", "beta": 0.5})
    assert TrainConfig.from_dict(cfg.to_dict(), allow_inert=True) == cfg
    assert cfg.to_dict()["model"]["beta"] == 0.5 and "corruption" not in cfg.to_dict()["model"]
    # a checkpoint config holding every architecture's parameters (inert ones at their defaults)
    full = {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], **{k: v for k, v in
                                                                    cfg.to_flat(live_only=False).items()
                                                                    if k in ("corruption", "n_blocks")}}}
    assert TrainConfig.from_dict(full, allow_inert=True) == cfg
    with pytest.raises(ConfigError, match="only used by arch dae"):
        TrainConfig.from_dict(full)


def test_ensemble_size_is_validated():
    from xfer.config import TrainConfig
    from xfer.errors import ConfigError

    assert TrainConfig.from_dict({"ensemble": 3}).optim.ensemble == 3
    for bad in (0, 33, 1.5):
        with pytest.raises(ConfigError, match="ensemble"):
            TrainConfig.from_dict({"ensemble": bad})
