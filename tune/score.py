"""The sweep's final model scored on the test line (the only place a sweep reads the test line's
labels, after the search), beside the plain baselines: <output_folder>/metrics.json."""

from __future__ import annotations

from xfer.data.fs import write_json
from xfer.data.inputs import DataSources

from .final_model import final_model_source
from .settings import Sweep


def score_best(sw: Sweep, ckpt: dict, final: dict | None = None) -> dict | None:
    """The sweep's final model (what best_model.pt holds) on the four splits (test line only
    here) + baselines; `final`: best_params.json's final_model (how it was made)."""
    from xfer.pipeline import baselines_for, evaluate_checkpoint

    metrics, p = evaluate_checkpoint(DataSources.from_dict(sw.data_args), ckpt, sw.output)
    metrics["baselines"] = baselines_for(p)
    n = len(ckpt.get("ensemble", [ckpt]))
    metrics["model"] = {"source": "the sweep's final model: " + final_model_source(final or {"members": [0] * n}),
                        "objective": sw.objective_label, "config": p.cfg.to_flat(), "n_members": n}
    write_json(sw.output / "metrics.json", metrics)
    return metrics
