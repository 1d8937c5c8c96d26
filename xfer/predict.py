"""A trained model as a predictor, and `xfer predict`: label new cells with a checkpoint.

`Predictor` is what a checkpoint rebuilds (xfer.checkpoint): the network, its config, the
fitted peak preprocessing and the expression embedder. It featurises another line exactly
as training did for the test line:

    peaks       mapped onto the training line's kept peaks by coordinates with the run's
                method and imputation (chromosome names that differ only by a "chr" prefix
                are matched), then the run's peak channels: IDF-weighted peaks or LSI with
                the training IDF and components, and the coverage bins projected on the
                training PCA
    expression  the run's embedder: PCA from the checkpoint's components, or a foundation
                model's vectors from the embedding store (computed once by `xfer embed`)
    both        standardised with the new line's own statistics (label-free), as the test
                line was

`xfer train` scores its test line through the same `Predictor`, so `xfer predict` with the
same files reproduces that run's predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .config import TrainConfig
from .data.dataset import CellMatrix
from .evaluate import METRIC_KEYS, classification_metrics, predictions_table
from .model import CDANN
from .phases import PHASES
from .prepare import LineInputs, PeakPreprocessor, prepare_line

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probs(model: CDANN, emb=None, peaks=None, stats: dict | None = None, device=None,
                  batch: int = 4096) -> dict[str, np.ndarray]:
    """Class probabilities from expression embeddings ("gex") and/or peak features ("peak")
    (numpy or CSR in). `stats`: the line's own LineNorm statistics (None: the training line's).
    `model` is one model (a population of one: an exported member)."""
    if model.size != 1:
        raise ValueError(f"predict_probs: a population of {model.size} models; export one member "
                         "(xfer.model.member_state) and predict with it")
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out = {}
    amp = torch.device(device).type == "cuda"
    try:
        for key, X in (("gex", emb), ("peak", peaks)):
            if X is None:
                continue
            st = None if stats is None else stats.get("emb" if key == "gex" else "peaks")
            probs = []
            for s in range(0, X.shape[0], batch):
                chunk = X[s:s + batch]
                chunk = chunk.toarray() if sp.issparse(chunk) else np.asarray(chunk)
                t = torch.tensor(chunk, dtype=torch.float32, device=device)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                    p = model.predict_source(t, st) if key == "gex" else model.predict_peaks(t, st)
                probs.append(p[0].float().cpu().numpy())
            out[key] = np.concatenate(probs) if probs else np.zeros((0, len(PHASES)), np.float32)
    finally:
        model.train(was)
    return out


def featurise(pre: PeakPreprocessor, embedder, gex: CellMatrix | None = None, peaks: CellMatrix | None = None,
              emb: np.ndarray | None = None) -> tuple[LineInputs, sp.csr_matrix | None]:
    """Another line's model inputs on the training line's feature spaces, and its raw counts
    on the kept peaks (for the baselines). `emb`: its expression embedding when already
    computed (else `embedder` makes it). Labels ride along for scoring; nothing here reads them."""
    counts = pre.map_counts(peaks) if peaks is not None else None
    if gex is not None and emb is None:
        if embedder is None:
            from .errors import ConfigError
            raise ConfigError("source_model", "the checkpoint holds no expression embedder")
        emb = embedder.transform(gex)
    name = (gex or peaks).name
    return prepare_line(name, pre, gex=gex, emb=emb, peaks=peaks, peak_counts=counts), counts


class _Predicts:
    """`predict`: the notebook's entry point, shared by one model and an ensemble."""

    def predict(self, data=None, *, peaks=None, gex=None, inplace: bool = False,
                gex_modality: str | None = None, peak_modality: str | None = None) -> pd.DataFrame | None:
        """Phase probabilities of cells given as an AnnData of accessibility or of expression
        (which one is read from its features: peak coordinates or genes), a MuData with both
        (`rna` and `atac` modalities, or those named), or `peaks=` / `gex=` (AnnData, a file or
        store:NAME). With accessibility the accessibility head predicts (as `xfer predict`
        writes predictions.csv); with expression alone the expression head.

        Returns a DataFrame indexed by barcode: `predicted` and `prob_G1`, `prob_S`, `prob_G2M`.
        `inplace=True` writes obs['xfer_phase'] and obs['xfer_prob_<phase>'] onto the AnnData (or
        the MuData and its predicted modality) instead and returns None.

            >>> model = xfer.load("run/best_model.pt")
            >>> model.predict(atac).head()          # doctest: +SKIP
                               predicted  prob_G1  prob_S  prob_G2M
            barcode
            AAACAGCCAAGGTCGA-1        G1    0.91    0.06      0.03
        """
        from .data.annotate import annotate
        from .data.inputs import cells_to_predict

        cells, target = cells_to_predict(data, peaks=peaks, gex=gex, gex_modality=gex_modality,
                                         peak_modality=peak_modality)
        probs, _ = self.predict_cells(gex=cells.get("test"), peaks=cells.get("sup_peak"))
        head = "peak" if "sup_peak" in cells else "gex"
        barcodes = next(iter(cells.values())).barcodes
        if inplace:
            if target is None:
                raise ValueError("predict(inplace=True) needs an AnnData or MuData to write onto")
            for obj in target:
                annotate(obj, barcodes, probs[head])
            return None
        df = pd.DataFrame(probs[head], columns=[f"prob_{p}" for p in PHASES],
                          index=pd.Index(np.asarray(barcodes).astype(str), name="barcode"))
        df.insert(0, "predicted", pd.Categorical(np.asarray(PHASES)[probs[head].argmax(1)], categories=list(PHASES)))
        return df


@dataclass
class Predictor(_Predicts):
    """One trained model and what it needs to featurise new cells (`xfer.load` returns it)."""

    model: CDANN
    cfg: TrainConfig
    peaks: PeakPreprocessor
    embedder: object = None              # xfer.embed.Embedder; None: the expression head cannot be fed
    info: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, store=None, device="cpu", argv: list[str] | None = None) -> "Predictor":
        """`argv`: the command's data flags (for the `xfer embed` command an error names)."""
        from .checkpoint import build_model
        from .embed import embedder_from_state

        model, cfg = build_model(ckpt, device)
        pre = ckpt["preprocess"]
        peaks = PeakPreprocessor.from_state(cfg.data, pre["peaks"])
        emb_state = pre.get("embedder") or {}
        embedder = None
        if emb_state.get("name"):
            from .data.embed_store import EmbeddingStore
            embedder = embedder_from_state(emb_state, EmbeddingStore(store) if isinstance(store, str) else store,
                                           argv)
        info = {k: ckpt.get(k) for k in ("epoch", "best_epoch", "best_metric", "metric_name")}
        return cls(model=model, cfg=cfg, peaks=peaks, embedder=embedder, info=info)

    @classmethod
    def load(cls, path, store=None, device="cpu", argv: list[str] | None = None) -> "Predictor | EnsemblePredictor":
        """The predictor of a checkpoint file: one model, or a seed ensemble of them."""
        from .checkpoint import read_checkpoint

        return cls.from_saved(read_checkpoint(path, device), store=store, device=device, argv=argv)

    @classmethod
    def from_saved(cls, ckpt: dict, store=None, device="cpu",
                   argv: list[str] | None = None) -> "Predictor | EnsemblePredictor":
        """The predictor of a checkpoint's content (best_model.pt's dict): one model or an ensemble."""
        if "ensemble" in ckpt:
            return EnsemblePredictor([cls.from_checkpoint(m, store=store, device=device, argv=argv)
                                      for m in ckpt["ensemble"]])
        return cls.from_checkpoint(ckpt, store=store, device=device, argv=argv)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def line(self, gex: CellMatrix | None = None, peaks: CellMatrix | None = None,
             emb: np.ndarray | None = None) -> tuple[LineInputs, sp.csr_matrix | None]:
        return featurise(self.peaks, self.embedder, gex=gex, peaks=peaks, emb=emb)

    def predict_line(self, line: LineInputs) -> dict[str, np.ndarray]:
        """Class probabilities of each head the line has inputs for ("gex", "peak")."""
        stats = line.stats_tensors(self.device) if self.cfg.data.line_norm else None
        return predict_probs(self.model, line.emb, line.peaks, stats=stats)

    def predict_cells(self, gex: CellMatrix | None = None,
                      peaks: CellMatrix | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
        """Featurise and predict another line's cells: (probabilities per head, peak-mapping stats)."""
        line, _ = self.line(gex=gex, peaks=peaks)
        return self.predict_line(line), (dict(self.peaks.mapping_stats) if peaks is not None else None)


@dataclass
class EnsemblePredictor(_Predicts):
    """A seed ensemble: each member featurises the cells with its own preprocessing; the
    members' probabilities are averaged."""

    members: list[Predictor]

    @property
    def info(self) -> dict:
        return {"members": len(self.members), "epoch": [m.info.get("epoch") for m in self.members],
                "best_metric": [m.info.get("best_metric") for m in self.members],
                "metric_name": self.members[0].info.get("metric_name")}

    def predict_cells(self, gex: CellMatrix | None = None,
                      peaks: CellMatrix | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
        outs = [m.predict_cells(gex=gex, peaks=peaks) for m in self.members]
        probs = {k: sum(o[0][k] for o in outs) / len(outs) for k in outs[0][0]}
        return probs, outs[0][1]  # mapping statistics of the first member (their kept peaks differ a little)


# ----------------------------------------------------------------------------- xfer predict

def predict_files(sources, checkpoint, output_folder, device: str = "auto") -> dict:
    """`xfer predict`: label the cells of the test line's accessibility (`sup_peak`) and/or
    expression (`test`) with a checkpoint; everything is computed before anything is written."""
    from .data.fs import write_bytes_atomic, write_json
    from .data.inputs import ROLES
    from .device import resolve_device
    from .errors import XferError

    for role in ("src", "tgt"):
        if getattr(sources, role) is not None:
            raise XferError(f"{ROLES[role].flag}: xfer predict labels the cells of --sup_peak_csv (accessibility) "
                            "and/or --test_csv (expression); the training line is already in the checkpoint")
    roles = [r for r in ("test", "sup_peak") if getattr(sources, r) is not None]
    if not roles:
        raise XferError("predict: give the cells to label: --sup_peak_csv (accessibility) and/or --test_csv "
                        "(expression), a file or store:NAME")
    predictor = Predictor.load(checkpoint, store=sources.store, device=resolve_device(device),
                               argv=sources.flags())
    data = sources.load(roles)
    gex, peaks = data.get("test"), data.get("sup_peak")
    probs, mapping = predictor.predict_cells(gex=gex, peaks=peaks)
    cells = gex if gex is not None else peaks  # paired: the same cells in the same order
    files, metrics = _prediction_files(sources, cells, gex, peaks, probs)
    summary = {"checkpoint": str(checkpoint), "model": predictor.info, "n_cells": int(cells.n_cells),
               "inputs": {r: data[r].source for r in roles}, "peak_mapping": mapping, "metrics": metrics}
    _print_summary(summary)

    from .data.annotate import write_labelled_copy

    out = Path(output_folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        if isinstance(obj, pd.DataFrame):
            write_bytes_atomic(out / name, obj.to_csv(index=False).encode())
        else:
            src, barcodes, probs_, mod = obj
            write_labelled_copy(src, barcodes, probs_, out / name, mod_name=mod)
    write_json(out / "predict.json", summary)
    print(f"outputs: {out}/ ({', '.join([*files, 'predict.json'])})")
    return summary


def _prediction_files(sources, cells: CellMatrix, gex, peaks, probs: dict) -> tuple[dict, dict]:
    """What `xfer predict` writes, in memory: predictions.csv (the accessibility head's, else the
    expression head's), predictions_gex.csv beside it when both heads predict, and a labelled copy
    of each .h5ad / .h5mu input; and the metrics where the cells have labels."""
    files: dict[str, object] = {}
    heads = []  # (head, its input, its predictions file)
    if peaks is not None:
        heads.append(("peak", peaks, "predictions.csv"))
    if gex is not None:
        heads.append(("gex", gex, "predictions.csv" if peaks is None else "predictions_gex.csv"))
    metrics: dict = {}
    for head, ds, name in heads:
        files[name] = _predictions(cells.barcodes, cells.labels, probs[head])
        if cells.labels is not None and (cells.labels >= 0).any():
            metrics[head] = classification_metrics(cells.labels, probs[head].argmax(1))
        src = str(ds.source)
        for suffix in (".h5ad", ".h5mu"):
            if src.endswith(suffix):
                mod = (sources.peak_modality or "atac") if head == "peak" else (sources.gex_modality or "rna")
                copy = f"{Path(src).name[:-len(suffix)]}.xfer{suffix}"
                if copy in files:  # one .h5mu holds both heads' cells: the accessibility head labels it
                    continue
                files[copy] = (src, cells.barcodes, probs[head], mod if suffix == ".h5mu" else None)
    return files, metrics


def _predictions(barcodes, labels, probs) -> pd.DataFrame:
    """barcode, [true,] predicted, prob_G1, prob_S, prob_G2M ("true" only when labels are given)."""
    has = labels is not None and (np.asarray(labels) >= 0).any()
    df = predictions_table(barcodes, labels if has else None, probs)
    return df if has else df.drop(columns="true")


def _print_summary(s: dict) -> None:
    m = s["peak_mapping"]
    if m is not None:
        if m.get("method") == "name":
            print(f"peak mapping: by name, {m['n_ref_mapped']} of {m['n_ref']} training peaks "
                  f"({m['fraction_ref_mapped']:.1%}) found")
        else:
            tiers = ", ".join(f"{k} {v}" for k, v in m.get("n_ref_by_tier", {}).items() if v)
            print(f"peak mapping ({m['method']}, impute {m.get('impute', 'zero')}"
                  f"{', chr prefix ignored' if m.get('normalise_chrom') else ''}): {m['n_ref_mapped']} of {m['n_ref']} "
                  f"training peaks mapped ({m['fraction_ref_mapped']:.1%}; {tiers}); {m['n_query_used']} of "
                  f"{m['n_query']} peaks here used ({m['fraction_query_used']:.1%})")
    ens = f", an ensemble of {s['model']['members']}" if "members" in s["model"] else ""
    print(f"{s['n_cells']} cells labelled with {s['checkpoint']} (epoch {s['model'].get('epoch')}{ens})")
    if s["metrics"]:
        print(f"{'head':6s}" + "".join(f"{k:>19s}" for k in (*METRIC_KEYS, "majority_rate")) + f"{'n':>7s}")
        for head, r in s["metrics"].items():
            print(f"{head:6s}" + "".join(f"{r[k]:19.3f}" for k in (*METRIC_KEYS, "majority_rate")) + f"{r['n']:7d}")
