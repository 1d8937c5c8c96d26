"""The Python API: what `xfer train` and `xfer predict` do, for notebooks.

    import anndata as ad, xfer

    inputs = xfer.Inputs(src=rna_a, tgt=atac_a, sup_peak=atac_b)   # AnnData, MuData, files or store:NAME
    model = xfer.train(inputs, epochs=40, output_folder="run")      # the same run as `xfer train`
    model.metrics["peak_test"]["balanced_accuracy"]
    phases = xfer.load("run/best_model.pt").predict(atac_b)          # a DataFrame indexed by barcode

The command line is a thin layer over these functions (xfer/cli.py parses flags into
`Inputs` and a config and calls them). A sweep from Python is `tune.sweep(...)` (tune/api.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data.inputs import DataSources

Inputs = DataSources
"""The data of the two lines (`xfer.data.inputs.DataSources`): `src` / `tgt` the training line's
expression and accessibility, `test` / `sup_peak` the test line's (optional; their labels only
score); each a file, `store:NAME`, an AnnData or a MuData (its `rna` / `atac` modality, or
`gex_modality=` / `peak_modality=`); `store=` the cell and embedding store.

    >>> inputs = xfer.Inputs(src=mdata_a, tgt=mdata_a, test=mdata_b, sup_peak=mdata_b)  # doctest: +SKIP
"""


@dataclass
class Model:
    """A trained model (what `xfer.train` returns): its predictor, its scores and its history."""

    predictor: object               # xfer.predict.Predictor (or EnsemblePredictor for a seed ensemble)
    metrics: dict                   # metrics.json: the four splits, the baselines, the run's summary
    history: list[dict]             # the (first) member's epoch history (training_history.json)
    checkpoint: dict                # best_model.pt's content
    output_folder: Path | None = None

    def predict(self, data=None, **kw):
        """`Predictor.predict`: phase probabilities of new cells (a DataFrame indexed by barcode)."""
        return self.predictor.predict(data, **kw)

    def save(self, path) -> Path:
        """Write the model as a checkpoint that `xfer.load` and `xfer predict` read."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self.checkpoint, Path(path))
        return Path(path)


def train(inputs: DataSources, *, config=None, output_folder=None, device: str = "auto", **params) -> Model:
    """Train on `inputs` as `xfer train` does and return the model.

    config: a config file (best_params.json of a sweep, JSON/YAML) or a `TrainConfig`;
    params: config keys on top of it (`epochs=40`, `arch="vae"`, `lambda_pseudo=0.5`, ...);
    output_folder: where to write what `xfer train` writes (best_model.pt, metrics.json,
    training_history.json, predictions_<split>.csv); None writes nothing.

        >>> model = xfer.train(xfer.Inputs(src=rna, tgt=atac, sup_peak=atac_b), epochs=30)  # doctest: +SKIP
        >>> model.metrics["peak_test"]["balanced_accuracy"]                                  # doctest: +SKIP
        0.71
    """
    from .config import TrainConfig
    from .pipeline import make_config, run_train
    from .predict import Predictor

    if isinstance(config, TrainConfig):
        cfg = TrainConfig.from_dict(params, base=config, source="xfer.train") if params else config
    else:
        cfg = make_config(config, params)
    run = run_train(inputs, cfg, output_folder, device)
    predictor = Predictor.from_saved(run.checkpoint, store=inputs.store)
    return Model(predictor=predictor, metrics=run.metrics, history=run.histories[0], checkpoint=run.checkpoint,
                 output_folder=None if output_folder is None else Path(output_folder))


def load(path, *, store=None, device: str = "cpu"):
    """The predictor of any best_model.pt (of `xfer train`, `xfer.train` or a sweep).

    store: the embedding store, for models whose expression embedder is a foundation model
    (its vectors are read there); default $XFER_STORE or ./xfer_store.

        >>> predictor = xfer.load("run/best_model.pt")        # doctest: +SKIP
        >>> predictor.predict(atac_b, inplace=True)            # doctest: +SKIP
        >>> atac_b.obs["xfer_phase"].value_counts()            # doctest: +SKIP
    """
    from .data.inputs import default_store
    from .device import resolve_device
    from .predict import Predictor

    return Predictor.load(path, store=store or default_store(), device=resolve_device(device))
