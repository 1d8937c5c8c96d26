"""`xfer results`: one row per model folder (the original research code's generate_comprehensive_results.py).

A model folder is what `xfer train` or `xfer tune` wrote: its metrics.json holds
the four splits (`gex_val`, `gex_test`, `peak_val`, `peak_test`), the plain
baselines on the same splits and the model's config. The CSV has, per folder:
the embedder, architecture and divergence; each split's accuracy, balanced
accuracy, macro-F1 and majority-class rate; and the best plain baseline (the
PEAK baseline, `majority` aside, with the highest balanced accuracy on
`peak_test`) with its three metrics there. Every folder is read and checked
before the CSV is written (atomically).

The readers here (`read_json`, `read_metrics`) are shared with `xfer report`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .evaluate import METRIC_KEYS

SPLITS = ("gex_val", "gex_test", "peak_val", "peak_test")  # metrics.json's four scored splits, in table order
SPLIT_FIELDS = (*METRIC_KEYS, "majority_rate", "n", "confusion")
CONFIG_FIELDS = ("source_model", "arch", "divergence")
SPLIT_NAMES = {"gex_val": "GEX val", "gex_test": "GEX test", "peak_val": "PEAK val", "peak_test": "PEAK test"}


def read_json(path: Path):
    """The parsed file; InputError naming it when it is missing or not JSON."""
    if not path.is_file():
        raise InputError(path, None, "not found")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, None, f"not valid JSON ({e})") from None


def _check_split(res, path: Path, where: str) -> None:
    if not isinstance(res, dict):
        raise InputError(path, where, "not an object of metrics")
    for k in SPLIT_FIELDS:
        if k not in res:
            raise InputError(path, f"{where}.{k}", "missing")
        v = res[k]
        if k == "confusion":
            ok = isinstance(v, list) and len(v) == 3 and all(
                isinstance(r, list) and len(r) == 3 and all(isinstance(c, int) for c in r) for r in v)
            if not ok:
                raise InputError(path, f"{where}.{k}", "not a 3 x 3 matrix of counts")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(path, f"{where}.{k}", f"not a number: {v!r}")


def read_metrics(path: Path, require=SPLITS) -> dict:
    """metrics.json of `xfer train` / `xfer tune`, checked: the splits in `require` and every
    split present (model and baselines) have all their fields; `model.config` names the
    embedder, architecture and divergence."""
    m = read_json(path)
    if not isinstance(m, dict):
        raise InputError(path, None, "not a JSON object")
    if not isinstance(m.get("baselines"), dict):
        raise InputError(path, "baselines", "missing" if "baselines" not in m else "not an object")
    for name, res in [(None, m), *m["baselines"].items()]:
        where = "" if name is None else f"baselines.{name}."
        if not isinstance(res, dict):
            raise InputError(path, where[:-1], "not an object of splits")
        for split in SPLITS:
            if res.get(split) == {"n": 0}:  # a split without labelled cells was not scored
                del res[split]
            if split in res:
                _check_split(res[split], path, where + split)
            elif name is None and split in require:
                raise InputError(path, split, "missing (was the model scored on the test line's labels?)")
    cfg = m.get("model", {}).get("config") if isinstance(m.get("model"), dict) else None
    if not isinstance(cfg, dict):
        raise InputError(path, "model.config", "missing")
    for k in CONFIG_FIELDS:
        if not isinstance(cfg.get(k), str):
            raise InputError(path, f"model.config.{k}", "missing" if k not in cfg else f"not a name: {cfg[k]!r}")
    return m


def best_baseline(m: dict, path: Path) -> tuple[str, dict]:
    """The plain PEAK baseline (majority aside) with the highest balanced accuracy on peak_test."""
    scored = {k: v["peak_test"] for k, v in m["baselines"].items() if k != "majority" and "peak_test" in v}
    if not scored:
        raise InputError(path, "baselines", "no PEAK baseline scored on peak_test")
    name = max(scored, key=lambda k: scored[k]["balanced_accuracy"])
    return name, scored[name]


def result_row(folder: str) -> dict:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise InputError(path, None, "not found (give folders that `xfer train` or `xfer tune` wrote)")
    m = read_metrics(path)
    row = {"model_dir": str(folder), **{k: m["model"]["config"][k] for k in CONFIG_FIELDS}}
    for s in SPLITS:
        row.update({f"{s}_accuracy": m[s]["accuracy"], f"{s}_balanced_accuracy": m[s]["balanced_accuracy"]})
    row.update({f"{s}_macro_f1": m[s]["macro_f1"] for s in SPLITS})
    row.update({f"{s}_majority_rate": m[s]["majority_rate"] for s in SPLITS})
    name, res = best_baseline(m, path)
    row["best_baseline"] = name
    row.update({f"best_baseline_peak_test_{k}": res[k] for k in METRIC_KEYS})
    return row


def _pct(row: dict, prefix: str) -> str:
    return f"{100 * row[f'{prefix}_accuracy']:.2f}% / {100 * row[f'{prefix}_balanced_accuracy']:.2f}%"


def markdown_table(rows: list[dict]) -> str:
    """The research code's "Results Summary" table: accuracy / balanced accuracy in percent."""
    head = ["Model", "Embedder", *SPLIT_NAMES.values(), "Best plain baseline, PEAK test", "Majority rate, PEAK test"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['arch'].upper()}-{r['divergence'].upper()} ({Path(r['model_dir']).name})", r["source_model"],
                 *(_pct(r, s) for s in SPLITS), f"{r['best_baseline']} {_pct(r, 'best_baseline_peak_test')}",
                 f"{100 * r['peak_test_majority_rate']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_results(model_dirs: list[str], output_csv: str) -> list[dict]:
    import pandas as pd

    from .data.fs import atomic_path

    rows = [result_row(d) for d in model_dirs]  # every folder is checked before anything is written
    with atomic_path(output_csv) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return rows
