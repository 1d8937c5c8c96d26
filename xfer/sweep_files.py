"""The files a sweep (`xfer tune`) leaves in its output folder, and how they are read.

    sweep.json        the sweep's settings (tune.settings.Sweep writes and reloads it)
    trials.csv        one row per trial (tune.export.trial_table); trials.parquet the same
    optuna_study.db   the Optuna study (SQLite): every trial's intermediate values and state
    best_params.json  the best trial's configuration and how the final model was made

ASHA's rungs are derived from sweep.json's settings (`asha_rungs`), with the clock they count
on (`rung_clock`). The sweep (tune) and `xfer report` both read through here. No torch and no
Ray: `xfer report` imports it; Optuna and pandas are imported by the readers that need them.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .results import read_json

SETTINGS_FILE = "sweep.json"
TRIALS_CSV = "trials.csv"
TRIALS_PARQUET = "trials.parquet"
STUDY_DB = "optuna_study.db"
BEST_PARAMS_FILE = "best_params.json"


def asha_rungs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """ASHA's milestones: grace_period * reduction_factor^k up to max_t epochs."""
    rungs, r = [], grace_period
    while r <= max_t:
        rungs.append(r)
        r *= reduction_factor
    return rungs


def rung_clock(rungs: str | None, asha_after_warmup: bool = False) -> str:
    """What a sweep's ASHA rungs count (tune.settings.RUNG_CLOCKS). A sweep.json without `rungs`
    counted plain epochs, or epochs after warm-up when it has `asha_after_warmup`."""
    if rungs:
        return rungs
    return "after_warmup" if asha_after_warmup else "epochs"


def read_settings(path: Path) -> dict:
    """sweep.json, checked: the fields every reader needs (name, metric, the budget and ASHA's
    grace period and reduction factor); InputError naming the file and the field."""
    sw = read_json(path)
    if not isinstance(sw, dict):
        raise InputError(path, None, "not a JSON object")
    for k in ("name", "metric"):
        if not isinstance(sw.get(k), str):
            raise InputError(path, k, "missing or not a string")
    for k, low in (("search_epochs", 1), ("grace_period", 1), ("reduction_factor", 2)):
        if not isinstance(sw.get(k), int) or sw[k] < low:
            raise InputError(path, k, f"missing or not an integer >= {low}")
    return sw


def read_trials(path: Path, columns: list[str]):
    """trials.csv as a DataFrame, checked: every name in `columns` is a column, and those after
    the first two (trial id and status) are numeric."""
    import pandas as pd

    if not path.is_file():
        raise InputError(path, None, "not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(path, None, f"not a readable CSV ({str(e).splitlines()[0]})") from None
    for c in columns:
        if c not in df.columns:
            raise InputError(path, c, "missing column")
    for c in columns[2:]:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise InputError(path, c, "not numeric")
    return df


def load_study(path: Path, name: str):
    """The sweep's Optuna study; the file is checked read-only first (never created or changed)."""
    import sqlite3

    import optuna

    if not path.is_file():
        raise InputError(path, None, "not found")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
            names = {r[0] for r in c.execute("select study_name from studies")}
    except sqlite3.Error as e:
        raise InputError(path, "studies", f"not an Optuna study database ({e})") from None
    if name not in names:
        raise InputError(path, f"study '{name}'", f"not in the database (it holds {sorted(names)})")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")
