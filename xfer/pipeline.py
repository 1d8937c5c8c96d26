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
from .config import TrainConfig, drop_other_arch_params
from .data.dataset import CellMatrix
from .data.embed_store import EmbeddingStore
from .data.fs import check_output_folder, write_json
from .data.inputs import DataSources
from .embed import embed_lines, make_embedder, predictor_state
from .evaluate import classification_metrics, predictions_table
from .predict import Predictor, featurise, predict_probs
from .prepare import LineInputs, PeakPreprocessor, TrainData, check_training_labels, prepare_training
from .results import SPLITS
from .selection import resolve_for

log = logging.getLogger(__name__)


def make_config(config_path=None, overrides: dict | None = None) -> TrainConfig:
    """A config file (or the defaults) with flat overrides (`xfer train`'s flags, the Python API's
    keywords); an `arch` that differs from the file's drops that arch's own parameters."""
    cfg = TrainConfig.from_file(config_path) if config_path else TrainConfig()
    over = dict(overrides or {})
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


def load_for_training(sources: DataSources, cfg: TrainConfig) -> Loaded:
    inputs = sources.load(require=("src", "tgt"))
    store = EmbeddingStore(sources.store)                          # a store path that cannot be one: first
    check_training_labels(inputs["src"], cfg.data.val_fraction)   # before anything is embedded or trained
    return embed_inputs(inputs, cfg, store)


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


def prepare(sources: DataSources, cfg: TrainConfig) -> Prepared:
    return prepare_member(load_for_training(sources, cfg), cfg)


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
    """The original research code's four columns for the model and every baseline (one metric)."""
    rows = [("model", {s: metrics.get(s, {}) for s in SPLITS})]
    rows += [(f"  {name}", res) for name, res in metrics.get("baselines", {}).items()]
    lines = [f"{key:24s}" + "".join(f"{s:>11s}" for s in SPLITS)]
    for name, res in rows:
        cells = "".join(f"{res[s][key]:11.3f}" if s in res and key in res[s] else f"{'-':>11s}" for s in SPLITS)
        lines.append(f"{name:24s}{cells}")
    maj = {s: metrics[s]["majority_rate"] for s in SPLITS if s in metrics and "majority_rate" in metrics[s]}
    lines.append(f"{'majority-class rate':24s}" + "".join(f"{maj[s]:11.3f}" if s in maj else f"{'-':>11s}" for s in SPLITS))
    return "\n".join(lines)


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
        heads = [Predictor(model=m, cfg=p.cfg, peaks=p.pre, embedder=p.embedder).predict_line(p.test)
                 for m, p in members]
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


def evaluate_checkpoint(sources: DataSources, ckpt: dict, out: Path | None = None, cache: dict | None = None
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
            loaded[key] = load_for_training(sources, cfg)
        pkey = (repr(cfg.data), cfg.optim.seed)  # what the split and the preprocessing depend on
        if pkey not in prepared:
            prepared[pkey] = prepare_member(loaded[key], cfg)
        members.append((model, replace(prepared[pkey], cfg=cfg)))
    return evaluate_members(members, out), members[0][1]


@dataclass
class TrainRun:
    """What `xfer train` (and `xfer.train`) produce: the metrics (metrics.json), the final model
    (best_model.pt's content), each member's epoch history and the members with their inputs."""
    metrics: dict
    checkpoint: dict
    histories: list[list[dict]]
    members: list[tuple[object, Prepared]]


def _epoch_logger(cfg: TrainConfig):
    def report(m, _ckpt):
        if m["epoch"] == 1 or m["epoch"] % 10 == 0 or m.get("improved") or m.get("stopped_early"):
            log.info("epoch %3d  loss %.3f  gex_val %.3f  peak_val %.3f  objective %.3f%s", m["epoch"],
                     m["loss/total"], m[f"gex_val_{cfg.optim.metric}"], m[f"peak_val_{cfg.optim.metric}"],
                     m["objective"], "  *" if m.get("improved") else "")
    return report


def _fit_member(loaded: Loaded, cfg: TrainConfig, device: str, out: Path | None):
    from .training import fit

    p = prepare_member(loaded, cfg)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    log.info("training line: %d cells (%d train / %d val), %d encoder inputs per cell, %d-D %s embedding",
             p.train.line.barcodes.shape[0], len(p.train.train_idx), len(p.train.val_idx), p.train.n_peaks,
             p.train.emb_dim, cfg.data.source_model)
    train = training_data(p)
    if train.adapt is not None:
        log.info("adapting to the test line's %d unlabelled PEAK cells (its labels are not read)",
                 train.adapt.peaks.shape[0])
    return fit(cfg, train, _epoch_logger(cfg), device=device), p


def run_train(sources: DataSources, cfg: TrainConfig, output_folder=None, device: str = "auto") -> TrainRun:
    """`xfer train`: train the run's members (one, or a seed ensemble), score the final model on
    the four splits beside the plain baselines; with `output_folder`, write best_model.pt,
    metrics.json, training_history.json and predictions_<split>.csv there (nothing is written
    before every input has been read and checked)."""
    from .checkpoint import ensemble_checkpoint, save_checkpoint

    t0 = time.perf_counter()
    out = None if output_folder is None else check_output_folder(output_folder)
    loaded = load_for_training(sources, cfg)
    resolve_for(cfg, "sup_peak" in loaded.inputs, "test" in loaded.inputs)  # the objective must be computable
    configs = member_configs(cfg)
    members, results = [], []
    for i, cfg_i in enumerate(configs):
        if len(configs) > 1:
            log.info("ensemble member %d of %d (seed %d)", i + 1, len(configs), cfg_i.optim.seed)
        result, p = _fit_member(loaded, cfg_i, device, out)
        members.append((result.model, p))
        results.append(result)
        if out is not None:
            write_json(out / ("training_history.json" if i == 0 else f"training_history_member{i}.json"),
                       result.history)
    best = results[0].checkpoint if len(results) == 1 else ensemble_checkpoint([r.checkpoint for r in results])
    if out is not None:
        save_checkpoint(best, out / "best_model.pt")
    metrics = evaluate_members(members, out)
    metrics["baselines"] = baselines_for(members[0][1])
    metrics["model"] = _model_summary(configs, results, members[0][1], round(time.perf_counter() - t0, 2))
    if out is not None:
        write_json(out / "metrics.json", metrics)
    return TrainRun(metrics=metrics, checkpoint=best, histories=[r.history for r in results], members=members)


def _model_summary(configs: list[TrainConfig], results: list, p0: Prepared, wall: float) -> dict:
    r0 = results[0]
    model = {"best_epoch": r0.best_epoch, "best_objective": r0.best_metric, "objective": r0.objective,
             "stopped_early": r0.stopped_early, "epochs_run": len(r0.history),
             "train_seconds": round(sum(r.seconds for r in results), 2), "config": configs[0].to_flat(),
             "peak_mapping": p0.pre.mapping_stats, "n_peaks": p0.train.n_peaks, "wall_seconds": wall}
    if len(results) > 1:
        model["members"] = [{"seed": c.optim.seed, "best_epoch": r.best_epoch, "best_objective": r.best_metric,
                             "epochs_run": len(r.history)} for c, r in zip(configs, results)]
    return model


def run_baseline(sources: DataSources, cfg: TrainConfig, output_folder) -> dict:
    """`xfer baseline`: the plain baselines alone (metrics.json)."""
    out = Path(output_folder)
    p = prepare(sources, cfg)
    metrics = {"baselines": baselines_for(p)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    return metrics
