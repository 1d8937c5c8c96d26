"""Result files: every benchmark writes its figures as JSON (bench/results/<script>.json by
default), after every finished part, so that a run cut short keeps what it measured."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .commands import ROOT

RESULTS = ROOT / "bench" / "results"


def write_results(path: str | Path, data: dict, **dumps) -> Path:
    """Write `data` as JSON to `path` (its folder made when missing), indented by one space unless
    `dumps` (json.dumps' options) says otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, **{"indent": 1, **dumps}))
    return path


def read_results(path: str | Path, default: dict | None = None) -> dict:
    """A result file's figures; `default` (a copy) when it does not exist and one is given."""
    path = Path(path)
    if not path.exists() and default is not None:
        return json.loads(json.dumps(default))
    return json.loads(path.read_text())


def machine() -> str:
    """The machine, as the result files name it."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
