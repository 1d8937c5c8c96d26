"""`xfer train` and `xfer baseline`: inputs -> embeddings -> the one loop -> honest evaluation.

The test line (--test_csv / --sup_peak_csv) is featurised like any new line
(`xfer.predict.featurise`: mapped onto the training line's feature spaces and
standardised with its own label-free statistics). Its unlabelled peaks may be
an adaptation domain of training (`adapt_test_peaks`, self-training); its
labels are read by the final evaluation alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .baselines import run_baselines
from .config import ARCHS, DIVERGENCES, TrainConfig, drop_other_arch_params, parse_set
from .data.dataset import CellMatrix
from .data.embed_store import EmbeddingStore
from .data.fs import write_json
from .data.inputs import load_inputs
from .embed import embed_lines, make_embedder, predictor_state
from .evaluate import classification_metrics, predictions_table
from .predict import Predictor, featurise, predict_probs
from .prepare import LineInputs, PeakPreprocessor, TrainData, prepare_training
from .selection import resolve_for

log = logging.getLogger(__name__)

SPLITS = ("gex_val", "gex_test", "peak_val", "peak_test")  # the seed's four table columns

# command-line flags that set config keys (seed spellings where the seed had them)
CONFIG_FLAGS = {
    "arch_type": "arch", "divergence_type": "divergence", "epochs": "epochs", "seed": "seed",
    "source_model": "source_model", "peak_filter": "peak_filter", "use_peak_mapper": "use_peak_mapper",
    "peak_mapper_method": "peak_mapper_method", "peak_impute_strategy": "peak_impute_strategy",
    "use_cdann": "use_cdann", "batch_size": "batch_size", "lr": "lr", "patience": "patience",
    "lambda_balance": "lambda_balance", "lambda_entropy": "lambda_entropy",
    "lambda_target_class": "lambda_target_class", "lambda_pseudo": "lambda_pseudo", "metric": "metric",
    "objective": "objective",
}


def add_train_arguments(parser) -> None:
    import argparse

    g = parser.add_argument_group("model and training (override --config_path)")
    g.add_argument("--config_path", help="best_params.json from `xfer tune` (or a JSON/YAML of config keys)")
    g.add_argument("--source_model", help="expression embedder (default pca)")
    g.add_argument("--n_components", type=int, help="pca: embedding width (default 64)")
    g.add_argument("--ensemble_model1", help="with --source_model ensemble: the first stored embedding")
    g.add_argument("--ensemble_model2", help="with --source_model ensemble: the second stored embedding")
    g.add_argument("--arch_type", help=f"peak encoder: {' | '.join(ARCHS)}")
    g.add_argument("--divergence_type", help=' | '.join(DIVERGENCES))
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
    g.add_argument("--peak_mapper_method", help="exact | overlap | overlap_50pct | nearest")
    g.add_argument("--peak_impute_strategy", help="zero | mean")
    g.add_argument("--peak_filter", type=float, help="keep peaks non-zero in >= this fraction of training cells")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key (repeatable), e.g. --set lambda_domain=0.5")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--output_folder", required=True)


def build_config(args) -> TrainConfig:
    cfg = TrainConfig.from_file(args.config_path) if getattr(args, "config_path", None) else TrainConfig()
    over = {}
    for flag, key in CONFIG_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            over[key] = v
    if getattr(args, "n_components", None) is not None:
        over["n_components"] = args.n_components
    if "source_model" in over:
        from .embed import resolve_source_model
        over["source_model"] = resolve_source_model(over["source_model"], getattr(args, "ensemble_model1", None),
                                                    getattr(args, "ensemble_model2", None))
    over.update(parse_set(getattr(args, "set", None)))
    # an --arch_type that differs from the config file's drops that arch's own parameters
    if "arch" in over and over["arch"] != cfg.model.arch:
        cfg = TrainConfig.from_dict({**drop_other_arch_params(cfg.to_flat(), over["arch"]), "arch": over["arch"]})
    return TrainConfig.from_dict(over, base=cfg, source="command line")


# ----------------------------------------------------------------------------- preparation

@dataclass
class Prepared:
    cfg: TrainConfig
    inputs: dict[str, CellMatrix]
    train: TrainData
    pre: PeakPreprocessor
    embedder: object          # xfer.embed.Embedder of the run
    test: LineInputs | None
    test_peak_counts: object  # the test line's raw peak counts on the kept peaks (or None)
    embeddings: dict


@dataclass
class Loaded:
    """What every member of a run shares: the validated inputs and their expression embeddings."""
    inputs: dict[str, CellMatrix]
    embedder: object
    embeddings: dict


def load_for_training(args, cfg: TrainConfig) -> Loaded:
    return embed_inputs(load_inputs(args, require=("src", "tgt")), cfg, EmbeddingStore(args.store))


def embed_inputs(inputs: dict[str, CellMatrix], cfg: TrainConfig, store: EmbeddingStore) -> Loaded:
    """The expression embeddings of the training line and (when given) the test line."""
    src, test_gex = inputs["src"], inputs.get("test")
    # foundation models (no model files here) read what `xfer embed` stored for the training line
    embedder = make_embedder(cfg.data.source_model, n_components=cfg.data.n_components, store=store, train=src)
    embs = embed_lines(embedder, src, {"test": test_gex} if test_gex is not None else {}, store=store)
    return Loaded(inputs=inputs, embedder=embedder, embeddings=embs)


def prepare_member(loaded: Loaded, cfg: TrainConfig) -> Prepared:
    """The split (by cfg.optim.seed), the peak preprocessing and the test line's features."""
    inputs, embedder, embs = loaded.inputs, loaded.embedder, loaded.embeddings
    src, tgt = inputs["src"], inputs["tgt"]
    test_gex, test_peak = inputs.get("test"), inputs.get("sup_peak")
    train, pre = prepare_training(src, tgt, embs["train"], cfg.data, cfg.optim.seed,
                                  embedder_state=predictor_state(embedder, src), other_peaks=test_peak)
    test, counts = None, None
    if test_gex is not None or test_peak is not None:
        test, counts = featurise(pre, embedder, gex=test_gex, peaks=test_peak, emb=embs.get("test"))
    return Prepared(cfg=cfg, inputs=inputs, train=train, pre=pre, embedder=embedder, test=test,
                    test_peak_counts=counts, embeddings=embs)


def prepare(args, cfg: TrainConfig) -> Prepared:
    return prepare_member(load_for_training(args, cfg), cfg)


def training_data(p: Prepared):
    """What the loop trains on: the training line and, with adapt_test_peaks, the test line's
    unlabelled cells (`TrainData.with_adaptation` drops their labels)."""
    return p.train.with_adaptation(p.test) if p.cfg.data.adapt_test_peaks else p.train


def member_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The configs of a run's members: seeds seed, seed + 1, ... (`ensemble` of them)."""
    return [cfg.replace(seed=cfg.optim.seed + i) if i else cfg for i in range(cfg.optim.ensemble)]


def baselines_for(p: Prepared) -> dict:
    t = p.test
    return run_baselines(
        peaks_a=p.pre.training_counts(p.inputs["tgt"]), y_a=p.train.line.labels,
        train_idx=p.train.train_idx, val_idx=p.train.val_idx,
        peaks_b=p.test_peak_counts, y_b=None if t is None else t.labels,
        emb_a=p.train.line.emb, emb_b=None if t is None else t.emb,
        gex_a=p.inputs["src"], gex_b=p.inputs.get("test"), seed=p.cfg.optim.seed)


# ----------------------------------------------------------------------------- outputs

def format_table(metrics: dict, key: str = "balanced_accuracy") -> str:
    """The seed's four columns for the model and every baseline (one metric)."""
    rows = [("model", {s: metrics.get(s, {}) for s in SPLITS})]
    rows += [(f"  {name}", res) for name, res in metrics.get("baselines", {}).items()]
    lines = [f"{key:24s}" + "".join(f"{s:>11s}" for s in SPLITS)]
    for name, res in rows:
        cells = "".join(f"{res[s][key]:11.3f}" if s in res and key in res[s] else f"{'-':>11s}" for s in SPLITS)
        lines.append(f"{name:24s}{cells}")
    maj = {s: metrics[s]["majority_rate"] for s in SPLITS if s in metrics and "majority_rate" in metrics[s]}
    lines.append(f"{'majority-class rate':24s}" + "".join(f"{maj[s]:11.3f}" if s in maj else f"{'-':>11s}" for s in SPLITS))
    return "\n".join(lines)


def evaluate_model(model, p: Prepared, out: Path | None = None) -> dict:
    """Score one model on the four splits (see `evaluate_members`)."""
    return evaluate_members([(model, p)], out)


def evaluate_members(members: list[tuple[object, Prepared]], out: Path | None = None) -> dict:
    """Score the final model (one member, or a seed ensemble) on the four splits and write
    predictions_<split>.csv. The test line goes through the same `Predictor` as `xfer
    predict`: an ensemble averages its members' probabilities. Validation: each member
    predicts its own validation cells (pooled over members, with a `member` column, when
    there are several; no member scores cells it trained on)."""
    res, splits = {}, {}
    val = {"gex_val": ([], [], []), "peak_val": ([], [], [])}
    for i, (model, p) in enumerate(members):
        line, va = p.train.line, p.train.val_idx
        preds = predict_probs(model, line.emb[va], line.peaks[va])
        for split, head in (("gex_val", "gex"), ("peak_val", "peak")):
            val[split][0].append(line.barcodes[va])
            val[split][1].append(line.labels[va])
            val[split][2].append(preds[head])
    for split, (bcs, ys, probs) in val.items():
        splits[split] = (np.concatenate(bcs), np.concatenate(ys), np.concatenate(probs))
    test = members[0][1].test
    if test is not None:
        heads = [Predictor(model=m, cfg=p.cfg, peaks=p.pre, embedder=p.embedder).predict(p.test) for m, p in members]
        for head in ("gex", "peak"):
            if head in heads[0]:
                splits[f"{head}_test"] = (test.barcodes, test.labels, sum(h[head] for h in heads) / len(heads))
    for split, (bc, y, probs) in splits.items():
        if y is not None:
            res[split] = classification_metrics(y, probs.argmax(1))
        if out is not None:
            table = predictions_table(bc, y, probs)
            if len(members) > 1 and split.endswith("_val"):
                table.insert(1, "member", np.repeat(np.arange(len(members)), [len(p.train.val_idx) for _, p in
                                                                               members]))
            table.to_csv(out / f"predictions_{split}.csv", index=False)
    return res


def evaluate_checkpoint(args, ckpt: dict, out: Path | None = None, cache: dict | None = None
                        ) -> tuple[dict, Prepared]:
    """Score a saved predictor (one model, or an ensemble whose members may differ in config,
    as a sweep's top trials do) the way `xfer train` scores what it trains: each member is
    prepared with its own config from the same inputs. Returns (metrics, the first member's
    Prepared, for the baselines). `cache`: a dict kept between calls on the same inputs, so
    members that share their inputs are read and prepared once."""
    from dataclasses import replace

    from .checkpoint import build_model

    cache = {} if cache is None else cache
    loaded, prepared, members = cache.setdefault("loaded", {}), cache.setdefault("prepared", {}), []
    for m in ckpt["ensemble"] if "ensemble" in ckpt else [ckpt]:
        model, cfg = build_model(m)
        key = (cfg.data.source_model, cfg.data.n_components)  # what the expression embedding depends on
        if key not in loaded:
            loaded[key] = load_for_training(args, cfg)
        pkey = (repr(cfg.data), cfg.optim.seed)  # what the split and the preprocessing depend on
        if pkey not in prepared:
            prepared[pkey] = prepare_member(loaded[key], cfg)
        members.append((model, replace(prepared[pkey], cfg=cfg)))
    return evaluate_members(members, out), members[0][1]


def run_train(args) -> dict:
    from .checkpoint import ensemble_checkpoint, save_checkpoint
    from .train import fit

    t0 = time.perf_counter()
    cfg = build_config(args)
    out = Path(args.output_folder)
    loaded = load_for_training(args, cfg)  # every input is read and checked before the output folder is made
    resolve_for(cfg, "sup_peak" in loaded.inputs, "test" in loaded.inputs)  # the objective must be computable
    configs = member_configs(cfg)
    members, results = [], []
    for i, cfg_i in enumerate(configs):
        p = prepare_member(loaded, cfg_i)
        out.mkdir(parents=True, exist_ok=True)
        if len(configs) > 1:
            log.info("ensemble member %d of %d (seed %d)", i + 1, len(configs), cfg_i.optim.seed)
        log.info("training line: %d cells (%d train / %d val), %d encoder inputs per cell, %d-D %s embedding",
                 p.train.line.barcodes.shape[0], len(p.train.train_idx), len(p.train.val_idx), p.train.n_peaks,
                 p.train.emb_dim, cfg.data.source_model)

        def report(m, _ckpt):
            if m["epoch"] == 1 or m["epoch"] % 10 == 0 or m.get("improved") or m.get("stopped_early"):
                log.info("epoch %3d  loss %.3f  gex_val %.3f  peak_val %.3f  objective %.3f%s", m["epoch"],
                         m["loss/total"], m[f"gex_val_{cfg.optim.metric}"], m[f"peak_val_{cfg.optim.metric}"],
                         m["objective"], "  *" if m.get("improved") else "")

        train = training_data(p)
        if train.adapt is not None:
            log.info("adapting to the test line's %d unlabelled PEAK cells (its labels are not read)",
                     train.adapt.peaks.shape[0])
        result = fit(cfg_i, train, report, device=args.device)
        members.append((result.model, p))
        results.append(result)
        write_json(out / ("training_history.json" if i == 0 else f"training_history_member{i}.json"), result.history)
    best = results[0].checkpoint if len(results) == 1 else ensemble_checkpoint([r.checkpoint for r in results])
    save_checkpoint(best, out / "best_model.pt")
    metrics = evaluate_members(members, out)
    p0, r0 = members[0][1], results[0]
    metrics["baselines"] = baselines_for(p0)
    metrics["model"] = {"best_epoch": r0.best_epoch, "best_objective": r0.best_metric, "objective": r0.objective,
                        "stopped_early": r0.stopped_early,
                        "epochs_run": len(r0.history), "train_seconds": round(sum(r.seconds for r in results), 2),
                        "config": cfg.to_flat(), "peak_mapping": p0.pre.mapping_stats,
                        "n_peaks": p0.train.n_peaks, "wall_seconds": round(time.perf_counter() - t0, 2)}
    if len(results) > 1:
        metrics["model"]["members"] = [{"seed": c.optim.seed, "best_epoch": r.best_epoch,
                                        "best_objective": r.best_metric, "epochs_run": len(r.history)}
                                       for c, r in zip(configs, results)]
    write_json(out / "metrics.json", metrics)
    return metrics


def run_baseline(args) -> dict:
    cfg = build_config(args)
    out = Path(args.output_folder)
    p = prepare(args, cfg)
    metrics = {"baselines": baselines_for(p)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    return metrics
