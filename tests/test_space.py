"""The search space: define-by-run without inert parameters, and bad spaces fail before any trial."""

from __future__ import annotations

import json
from dataclasses import fields

import optuna
import pytest

from tune.space import BROAD_SPACE, NOT_SEARCHABLE, NOT_SEARCHED, load_space, parse_space
from xfer.config import (ALL_ARCH_PARAMS, ARCH_PARAMS, ARCHS, DataConfig, LossConfig, ModelConfig, OptimConfig,
                         TrainConfig)
from xfer.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space, n, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n):
        yield space(study.ask())


def test_define_by_run_never_yields_an_inert_parameter():
    space = load_space("broad")
    seen = set()
    for params in _sample(space, 300):
        arch = params["arch"]
        seen.add(arch)
        arch_keys = set(params) & ALL_ARCH_PARAMS
        assert arch_keys == set(ARCH_PARAMS[arch]), (arch, arch_keys)
        TrainConfig.from_dict(params)  # raises on an inert parameter or a bad value
    assert seen == set(ARCHS)


def test_the_broad_space_covers_every_live_parameter():
    """Every config key (from the config dataclasses, not a hand-written list) is either searched
    by the broad space or deliberately left out with a reason; never both, and no stale entry."""
    config_keys = {f.name for section in (ModelConfig, LossConfig, OptimConfig, DataConfig) for f in fields(section)
                   if f.name != "arch_params"} | set(ALL_ARCH_PARAMS)
    assert set(BROAD_SPACE) <= config_keys
    unaccounted = config_keys - set(BROAD_SPACE) - set(NOT_SEARCHED)
    assert not unaccounted, f"config keys neither in BROAD_SPACE nor in NOT_SEARCHED: {sorted(unaccounted)}"
    assert not set(BROAD_SPACE) & set(NOT_SEARCHED)
    assert set(NOT_SEARCHED) <= config_keys and NOT_SEARCHABLE <= set(NOT_SEARCHED)
    assert all(isinstance(r, str) and r for r in NOT_SEARCHED.values())
    for key in ("cls_hidden", "label_smoothing"):  # searched (a spec), not fixed
        assert isinstance(BROAD_SPACE[key], dict), key


def test_the_broad_space_reaches_optuna_as_written():
    """What Optuna samples from is the default space's spec: the research code's lambda_target_class range
    (1-15, log), the new cls_hidden / label_smoothing ranges; and samples stay within them."""
    space = load_space("broad")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {"lambda_target_class": [], "label_smoothing": [], "cls_hidden": set()}
    for _ in range(200):
        trial = study.ask()
        params = space(trial)
        d = trial.distributions
        assert d["lambda_target_class"] == optuna.distributions.FloatDistribution(1.0, 15.0, log=True)
        assert d["label_smoothing"] == optuna.distributions.FloatDistribution(0.0, 0.2)
        assert d["cls_hidden"] == optuna.distributions.CategoricalDistribution([64, 128, 256, 512])
        seen["lambda_target_class"].append(params["lambda_target_class"])
        seen["label_smoothing"].append(params["label_smoothing"])
        seen["cls_hidden"].add(params["cls_hidden"])
        study.tell(trial, 0.0)
    ltc = seen["lambda_target_class"]
    assert 1.0 <= min(ltc) and max(ltc) <= 15.0
    assert 0.0 <= min(seen["label_smoothing"]) and max(seen["label_smoothing"]) <= 0.2
    assert seen["cls_hidden"] == {64, 128, 256, 512}
    # log scale: about half the draws fall below the geometric midpoint sqrt(15) ~ 3.9
    assert 0.35 < sum(v < 15 ** 0.5 for v in ltc) / len(ltc) < 0.65


def _request(*flags):
    """`xfer tune`'s flags as the sweep request they make (tune.cli.sweep_request)."""
    from tune.cli import sweep_request
    from xfer.cli import build_parser

    return sweep_request(build_parser().parse_args(["tune", "--src_csv", "a.csv", "--tgt_csv", "b.csv",
                                                    "--output_folder", "out", *flags]))


def test_command_line_fixes_parameters():
    req = _request("--arch_type", "vae", "--divergence_type", "mmd,coral", "--set", "lr=0.001", "--set", "beta=2.0",
                   "--space", "broad", "--lambda_pseudo", "0.5")
    space = load_space(req.space, req.fixed)
    assert req.overrides == {"lambda_pseudo": 0.5}  # the space's settings are not the base config's
    for params in _sample(space, 20):
        assert params["arch"] == "vae" and params["lr"] == 0.001 and params["beta"] == 2.0
        assert params["divergence"] in ("mmd", "coral")
        assert "corruption" not in params and "temperature" not in params


def test_command_line_arch_choices_drop_other_architectures_parameters():
    """`--arch_type dae,vae` (a categorical spec) keeps exactly the two architectures' own
    parameters of the base space; a parameter the user set for a dropped architecture is an error."""
    req = _request("--arch_type", "dae,vae", "--set", "lambda_recon=0.5", "--space", "broad")
    space = load_space(req.space, req.fixed)
    assert set(space.params) & ALL_ARCH_PARAMS == {"corruption", "beta", "lambda_recon"}
    assert space.params["lambda_recon"].kind == "fixed" and space.params["arch"].values() == ("dae", "vae")
    seen = {params["arch"] for params in _sample(space, 20)}
    assert seen == {"dae", "vae"}
    req = _request("--arch_type", "vae", "--set", "temperature=0.2", "--space", "broad")
    with pytest.raises(ConfigError, match="only used by arch contrastive, which this space never chooses") as e:
        load_space(req.space, req.fixed)
    assert e.value.key == "temperature" and "command line" in str(e.value)


def test_space_file_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text("lr: {type: float, low: 0.0001, high: 0.01, log: true}\n"
                                     "arch: {type: categorical, choices: [dae, hybrid]}\n"
                                     "corruption: {type: float, low: 0.0, high: 0.2}\n"
                                     "n_blocks: {type: int, low: 1, high: 3}\n"
                                     "lambda_domain: 0.5\n")
    space = load_space(tmp_path / "s.yaml")
    (tmp_path / "s.json").write_text(json.dumps(space.describe()))
    assert load_space(tmp_path / "s.json").describe() == space.describe()
    for params in _sample(space, 30):
        assert params["lambda_domain"] == 0.5
        assert ("corruption" in params) == (params["arch"] == "dae")
        assert ("n_blocks" in params) == (params["arch"] == "hybrid")


@pytest.mark.parametrize("raw, key, msg", [
    ({"learning_rate": {"type": "float", "low": 0.1, "high": 1}}, "learning_rate", "not a config key"),
    ({"lr": {"type": "float", "low": 0.1, "high": 0.01}}, "lr", "needs low < high"),
    ({"lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}, "lr", "log range needs low > 0"),
    ({"lr": {"type": "gaussian", "low": 0.0, "high": 1.0}}, "lr", "unknown spec type"),
    ({"lr": {"type": "float", "low": "a", "high": 1.0}}, "lr", "'low' must be a finite number"),
    ({"n_layers": {"type": "int", "low": 1.5, "high": 3}}, "n_layers", "integer bounds"),
    ({"arch": {"type": "categorical", "choices": ["dae", "transformer"]}}, "arch", "value 'transformer' is invalid"),
    ({"arch": "dae", "beta": {"type": "float", "low": 0.1, "high": 2}}, "beta", "never chooses"),
    ({"dropout": {"type": "float", "low": 0.1, "high": 1.5}}, "dropout", "value 1.5 is invalid"),
    ({"lr": {"type": "float", "low": 0.1, "high": 0.2, "stepp": 1}}, "lr", "unknown spec field"),
    ({"epochs": {"type": "int", "low": 10, "high": 20}}, "epochs", "sweep setting"),
    ({"batch_size": {"type": "categorical", "choices": []}}, "batch_size", "non-empty list"),
])
def test_bad_space_fails_with_the_key(raw, key, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_space(raw, "bad.yaml")
    assert e.value.key == key and "bad.yaml" in str(e.value)


@pytest.mark.parametrize("name, text, msg", [
    ("bad.yaml", "lr: {type: float, low: [\n", r"bad\.yaml is not valid YAML"),
    ("bad.json", '{"lr": ', r"bad\.json is not valid JSON"),
    ("list.yaml", "- lr\n- beta\n", r"list\.yaml must hold a mapping of config keys"),
    ("empty.yaml", "", r"empty\.yaml must hold a mapping of config keys"),
    ("missing.yaml", None, r"file not found: .*missing\.yaml"),
])
def test_malformed_space_file(tmp_path, name, text, msg):
    """Every file problem is one ConfigError naming the --space flag and the file."""
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=msg) as e:
        load_space(tmp_path / name)
    assert e.value.key == "space" and name in str(e.value)


def test_empty_mapping_and_bad_key_in_a_space_file_name_the_file(tmp_path):
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(ConfigError, match="non-empty mapping") as e:
        load_space(tmp_path / "s.json")
    assert "s.json" in str(e.value)
    (tmp_path / "s.yaml").write_text("lr: {type: float, low: 0.1, high: 0.01}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: config key 'lr': needs low < high"):
        load_space(tmp_path / "s.yaml")


@pytest.mark.parametrize("name", ["broad", "centred"])
def test_built_in_spaces_by_name_hold_the_shipped_defaults(name):
    """`--space broad|centred`: the shipped defaults are a point of each (a sweep enqueues them first)."""
    from tune.space import SPACES
    from tune.configure import default_point
    space = load_space(name)
    assert space.source == f"{name} space" and set(space.params) == set(SPACES[name])
    assert default_point(space, {}) is not None


def test_the_centred_space_narrows_the_broad_one_around_each_default():
    from tune.space import BROAD_SPACE, CENTRED_SPACE
    from xfer.config import TrainConfig
    defaults = TrainConfig().to_flat(live_only=False)
    for key, spec in CENTRED_SPACE.items():
        broad = BROAD_SPACE[key]
        if not isinstance(spec, dict):
            assert spec == defaults[key], key                       # fixed at the default
        elif spec["type"] == "categorical":
            assert defaults[key] in spec["choices"], key
            assert set(spec["choices"]) <= set(broad["choices"]) | {128}, key
        else:
            assert spec["low"] <= defaults[key] <= spec["high"], key
            assert spec["high"] - spec["low"] < broad["high"] - broad["low"], key


def test_a_sweep_ships_the_studys_pick():
    """`xfer tune` with no design flags runs the design bench/sweep_design_study.py's rule picked on
    development pairs (BENCHMARKS.md, "A sweep that pays"): the centred space, 24 trials of 20
    epochs, ASHA on adapted epochs with grace 5 and reduction factor 2, the greedy final model of
    at most 8 trials."""
    from tune.space import CENTRED_SPACE, DEFAULT_SPACE_NAME
    from tune.configure import default_grace, shortest_warmup
    from xfer.cli import build_parser
    a = build_parser().parse_args(["tune", "--output_folder", "x"])
    assert (a.n_trials, a.search_epochs, a.scheduler, a.rungs, a.reduction_factor, a.final_model,
            a.final_ensemble) == (24, 20, "asha", "adapted", 2, "greedy", 8)
    assert a.grace_period == 0 and default_grace(a.search_epochs) == 5 and default_grace(3) == 1
    assert DEFAULT_SPACE_NAME == "centred" and set(load_space(None).params) == set(CENTRED_SPACE)
    assert shortest_warmup(load_space(None), {}) == 5 < a.search_epochs
    assert shortest_warmup(load_space("broad"), {}) == 0
    assert shortest_warmup(load_space(None).with_fixed({"warmup_epochs": 3}), {}) == 3
    assert shortest_warmup(parse_space({"lr": 1e-3}), {"warmup_epochs": 10}) == 10
