"""A sweep from Python: `tune.sweep(...)`, the same search as `xfer tune`.

    import tune, xfer

    result = tune.sweep(xfer.Inputs(src=rna_a, tgt=atac_a, test=sample_b, sup_peak=sample_b),
                        "sweep", n_trials=24, search_epochs=20, num_cpus=8)
    result.trials.head()                  # trials.csv as a DataFrame, best first
    result.model.predict(sample_b)        # the sweep's final model (best_model.pt) as a predictor
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .request import RunOptions, SweepRequest


@dataclass
class SweepResult:
    """What a sweep leaves: its trials (one row per trial, best first), its final model as a
    predictor (None when no trial finished with a checkpoint), best_params.json, the final
    model's scores on the test line (metrics.json; None without a test line) and its folder."""

    trials: object                      # pandas.DataFrame
    model: object                       # xfer.predict.Predictor / EnsemblePredictor
    best_params: dict
    metrics: dict | None
    output_folder: Path
    report: str | None = None           # report.html


_OPTIONS = {f.name for f in dataclasses.fields(RunOptions)}
_SETTINGS = {f.name for f in dataclasses.fields(SweepRequest)} - {"sources", "output_folder", "overrides", "fixed"}


def sweep(inputs=None, output_folder="sweep", *, params: dict | None = None, fixed: dict | None = None,
          resume: bool = False, **settings) -> SweepResult:
    """Run a sweep (Ray Tune + OptunaSearch + ASHA) and return its trials and final model.

    inputs: an `xfer.Inputs` (files, store:NAME, AnnData or MuData; in-memory data is written to
    the store first, so that every trial reads it); params: config keys every trial gets
    (`{"lambda_pseudo": 0.5}`); fixed: search parameters fixed or narrowed (`{"arch": "vae"}`,
    `{"divergence": {"type": "categorical", "choices": ["mmd", "coral"]}}`); settings: the
    sweep's flags (`n_trials`, `search_epochs`, `space`, `population`, `scheduler`,
    `final_model`, `config_path`, ...) and where it runs (`address`, `num_cpus`, `num_gpus`,
    `verbose`, `progress_every`). resume=True finishes the sweep already in `output_folder`.

        >>> result = tune.sweep(inputs, "sweep", n_trials=8, search_epochs=10, num_cpus=2)  # doctest: +SKIP
        >>> result.trials[["trial_id", "status", "best_objective"]].head(3)                 # doctest: +SKIP
        >>> result.model.predict(atac_b)                                                     # doctest: +SKIP
    """
    from xfer.errors import ConfigError
    from xfer.predict import Predictor

    from .driver import run

    unknown = sorted(set(settings) - _OPTIONS - _SETTINGS)
    if unknown:
        raise ConfigError(unknown[0], f"is not a sweep setting; choose from {', '.join(sorted(_SETTINGS | _OPTIONS))}")
    options = RunOptions(**{k: v for k, v in settings.items() if k in _OPTIONS})
    if resume:
        res = run(None, resume=output_folder, options=options)
    else:
        if inputs is None:
            raise ConfigError("inputs", "a new sweep needs its data (xfer.Inputs)")
        request = SweepRequest(sources=inputs, output_folder=str(output_folder), overrides=dict(params or {}),
                               fixed=dict(fixed or {}), **{k: v for k, v in settings.items() if k in _SETTINGS})
        res = run(request, options=options)
    sw = res["sweep"]
    best = sw.output / "best_model.pt"
    model = Predictor.load(best, store=sw.data_args.get("store")) if best.exists() else None
    return SweepResult(trials=res["table"], model=model, best_params=res["best"], metrics=res["metrics"],
                       output_folder=sw.output, report=res.get("report"))
