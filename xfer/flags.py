"""The command line's flags, and what they become: typed data sources and a config.

Only the command-line layer (xfer/cli.py, tune/cli.py) imports this module; everything below it
takes `xfer.data.inputs.DataSources` and `xfer.config.TrainConfig`.
"""

from __future__ import annotations

import argparse

from .config import ARCHS, DIVERGENCES, TrainConfig, parse_set
from .data.inputs import ROLES, DataSources, default_store
from .data.readers import ORIENTATIONS

# command-line flags that set config keys (the original research code's spellings where it had them)
CONFIG_FLAGS = {
    "arch_type": "arch", "divergence_type": "divergence", "epochs": "epochs", "seed": "seed",
    "source_model": "source_model", "peak_filter": "peak_filter", "use_peak_mapper": "use_peak_mapper",
    "peak_mapper_method": "peak_mapper_method", "peak_impute_strategy": "peak_impute_strategy",
    "use_cdann": "use_cdann", "batch_size": "batch_size", "lr": "lr", "patience": "patience",
    "lambda_balance": "lambda_balance", "lambda_entropy": "lambda_entropy",
    "lambda_target_class": "lambda_target_class", "lambda_pseudo": "lambda_pseudo", "metric": "metric",
    "objective": "objective", "peak_mapper": "peak_mapper",
}


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=default_store(), metavar="PATH_OR_URI",
                        help="cell + embedding store root: a directory or a URI (file://, s3://); "
                             "default $XFER_STORE or ./xfer_store")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared data flags plus --store, --orient, --label_column and the MuData modality names."""
    g = parser.add_argument_group("data (a file: .csv/.tsv[.gz], .h5ad, .h5mu, 10x .h5; or store:NAME)")
    for role in ROLES.values():
        g.add_argument(role.flag, dest=f"{role.name}_csv", metavar="FILE|store:NAME", help=role.help)
        g.add_argument(role.label_flag, dest=f"{role.name}_label_csv", metavar="CSV",
                       help="labels CSV (barcode + phase columns); optional when the matrix has a phase column")
    g.add_argument("--label_column", default=None, help="name of the phase column (default: phase/label/...)")
    g.add_argument("--orient", choices=ORIENTATIONS, default="auto",
                   help="CSV orientation: cells as rows (the research code's layout) or features as rows "
                        "(default: detect)")
    g.add_argument("--gex_modality", default=None, metavar="NAME",
                   help=".h5mu inputs: the expression modality (default rna)")
    g.add_argument("--peak_modality", default=None, metavar="NAME",
                   help=".h5mu inputs: the accessibility modality (default atac)")
    add_store_argument(parser)


def sources_from_args(args) -> DataSources:
    """The data flags of a parsed command line as typed sources."""
    kw = {}
    for r in ROLES:
        kw[r], kw[f"{r}_labels"] = getattr(args, f"{r}_csv", None), getattr(args, f"{r}_label_csv", None)
    return DataSources(**kw, store=getattr(args, "store", None) or default_store(),
                       label_column=getattr(args, "label_column", None), orient=getattr(args, "orient", "auto"),
                       gex_modality=getattr(args, "gex_modality", None),
                       peak_modality=getattr(args, "peak_modality", None))


def add_train_arguments(parser, sweep: bool = False) -> None:
    """The model and training flags of `xfer train` / `xfer baseline`; `sweep`: those of `xfer tune`,
    which has no --epochs (its trials run --search_epochs) and no --device (a trial's device is its
    Ray resources: --gpus_per_trial)."""
    g = parser.add_argument_group("model and training (override --config_path)")
    g.add_argument("--config_path", help="best_params.json from `xfer tune` (or a JSON/YAML of config keys)")
    g.add_argument("--source_model", help="expression embedder (default pca)")
    g.add_argument("--n_components", type=int, help="pca: embedding width (default 64)")
    g.add_argument("--ensemble_model1", help="with --source_model ensemble: the first stored embedding")
    g.add_argument("--ensemble_model2", help="with --source_model ensemble: the second stored embedding")
    g.add_argument("--arch_type", help=f"peak encoder: {' | '.join(ARCHS)}")
    g.add_argument("--divergence_type", help=' | '.join(DIVERGENCES))
    if not sweep:
        g.add_argument("--epochs", type=int)
    g.add_argument("--batch_size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--patience", type=int, help="early stopping patience in epochs")
    g.add_argument("--metric", help="validation metric: balanced_accuracy | accuracy | macro_f1")
    g.add_argument("--objective", help="model selection (best epoch, early stopping, a sweep's ranking): transfer "
                   "(label-free, on the test line's unlabelled cells; the default when --sup_peak_csv is given) | "
                   "source_val (the training line's validation split) | a candidate of xfer.selection")
    g.add_argument("--lambda_balance", type=float)
    g.add_argument("--lambda_entropy", type=float)
    g.add_argument("--lambda_target_class", type=float)
    g.add_argument("--lambda_pseudo", type=float,
                   help="self-training on the test line's unlabelled peaks (class-balanced pseudo-labels; 0 = off)")
    g.add_argument("--use_cdann", action=argparse.BooleanOptionalAction, default=None,
                   help="class-conditional adversary (default on); --no-use_cdann: plain DANN")
    g.add_argument("--use_peak_mapper", action=argparse.BooleanOptionalAction, default=None,
                   help="map the test line's peaks by genomic coordinates (default on)")
    g.add_argument("--peak_mapper_method", help="exact | overlap | overlap_50pct | nearest | neural (with --peak_mapper)")
    g.add_argument("--peak_mapper", metavar="MAPPER_PT",
                   help="--peak_mapper_method neural: the mapper.pt written by `xfer map-peaks` (the trained model's "
                        "checkpoint then carries it)")
    g.add_argument("--peak_impute_strategy", help="zero | mean")
    g.add_argument("--peak_filter", type=float, help="keep peaks non-zero in >= this fraction of training cells")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key (repeatable), e.g. --set lambda_domain=0.5")
    g.add_argument("--seed", type=int)
    if not sweep:
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--output_folder", required=True)


def config_overrides(args, skip: tuple[str, ...] = ()) -> dict:
    """The config keys a parsed command line sets (flags, then --set), as a flat dict; `skip`:
    flags left out (a sweep reads --arch_type, --divergence_type and --set as space settings)."""
    over = {key: getattr(args, flag) for flag, key in CONFIG_FLAGS.items()
            if flag not in skip and getattr(args, flag, None) is not None}
    if getattr(args, "n_components", None) is not None:
        over["n_components"] = args.n_components
    if "source_model" in over:
        from .embed import resolve_source_model
        over["source_model"] = resolve_source_model(over["source_model"], getattr(args, "ensemble_model1", None),
                                                    getattr(args, "ensemble_model2", None))
    if "set" not in skip:
        over.update(parse_set(getattr(args, "set", None)))
    if over.get("peak_mapper") and "://" not in str(over["peak_mapper"]):
        from pathlib import Path

        over["peak_mapper"] = str(Path(over["peak_mapper"]).resolve())  # trials run elsewhere: an absolute path
    return over


def config_from_args(args) -> TrainConfig:
    """--config_path, then the flags."""
    from .pipeline import make_config

    return make_config(getattr(args, "config_path", None), config_overrides(args))


def add_predict_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="best_model.pt of `xfer train` or `xfer tune`")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--output_folder", required=True)
