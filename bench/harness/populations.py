"""Populations of configurations trained on prepared pairs, and where the studies keep them
(selection_objective, sweep_design_study and the replay of sweep_design_replay)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .pairs import pair_data

STUDY_EPOCHS = 30  # sweep_design_study's populations: every configuration trained this long


def population(space_name: str, n: int, seed: int) -> list[dict]:
    """Configuration 0: the shipped defaults (every searched key of the broad space at its
    default); then n - 1 draws of the space `space_name` (tune.space.load_space) by Optuna's
    RandomSampler with `seed`."""
    import optuna

    from tune.space import load_space
    from tune.configure import default_point

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(space_name)
    configs = [default_point(load_space("broad"), {})]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(n - 1):
        t = study.ask()
        configs.append(space(t))
        study.tell(t, 0.0)
    return configs


_DATA: dict = {}


def transductive_data(pair_dir: Path, cfg):
    """(TrainData with the test line's cells unlabelled, the test line's inputs) of a prepared
    pair, as a transductive trial trains on it (`xfer.pipeline.prepare_member` + `training_data`),
    memoised per process for one pair at a time (memory)."""
    key = (str(pair_dir), cfg.data, cfg.optim.seed)
    if key not in _DATA:
        from xfer.pipeline import load_for_training, prepare_member, training_data

        p = prepare_member(load_for_training(pair_data(pair_dir), cfg), cfg)
        train = training_data(p)
        assert train.adapt is not None and train.adapt.labels is None
        if any(k[0] != key[0] for k in _DATA):
            _DATA.clear()
        _DATA[key] = (train, p.test)
    return _DATA[key]


class EpochPredictions:
    """The test line's class probabilities under each epoch's checkpoint (a fit's report callback
    hands them out): the network is built once, then loaded with each epoch's weights, and predicts
    through `xfer.predict.predict_probs` with the test line's own statistics (LineNorm)."""

    def __init__(self, test, cfg):
        self.test, self.stats = test, (test.stats_tensors("cpu") if cfg.data.line_norm else None)
        self.model = None

    def __call__(self, make_checkpoint, heads=("peak",)) -> dict:
        from xfer.checkpoint import build_model
        from xfer.predict import predict_probs

        ck = make_checkpoint()
        if self.model is None:
            self.model = build_model(ck, "cpu")[0]
        self.model.load_state_dict(ck["model"])
        return predict_probs(self.model, self.test.emb if "gex" in heads else None,
                             self.test.peaks if "peak" in heads else None, stats=self.stats)


def run_key(params: dict, seed: int) -> str:
    """A run's file name: the same configuration and seed is one run, whichever population drew it."""
    return hashlib.sha1(json.dumps({"p": params, "s": seed}, sort_keys=True).encode()).hexdigest()[:12]


def study_runs_dir(root: Path, pair: int) -> Path:
    """Where sweep_design_study keeps a pair's runs (<key>.json records, <key>.npz probabilities)."""
    return Path(root) / "sweep_study" / f"pair{pair}" / "runs"


def load_population(root: Path, pair: int, space: str) -> list[dict]:
    """A sweep_design_study population's runs (seed 0) with their records, in configuration
    order; the extra seeds of a configuration under "seeds" when they were trained."""
    man = json.loads((Path(root) / "sweep_study" / f"pair{pair}" / f"population_{space}.json").read_text())
    out = []
    for r in man["runs"]:
        f = study_runs_dir(root, pair) / f"{r['key']}.json"
        if not f.exists():
            continue
        rec = json.loads(f.read_text())
        rec.update(config=r["config"], key=r["key"], seeds={})
        for s in (1, 2):
            k = run_key(r["params"], s)
            if (study_runs_dir(root, pair) / f"{k}.json").exists():
                rec["seeds"][s] = k
        out.append(rec)
    return out
