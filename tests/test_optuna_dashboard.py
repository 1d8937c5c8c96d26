"""optuna-dashboard (the `dashboard` extra) serves a sweep's study: the searcher's SQLite study,
with a completed and an ASHA-pruned trial, read back through optuna-dashboard's own HTTP API.
Starts and stops its own server on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from conftest import stop_process
from tune.searcher import EpochAwareOptunaSearch
from tune.space import load_space

EXE = Path(sys.executable).with_name("optuna-dashboard")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_optuna_dashboard_serves_the_sweep_study(tmp_path):
    if not EXE.exists() and not shutil.which("optuna-dashboard"):
        pytest.skip("optuna-dashboard not installed (pip install -e '.[dashboard]')")
    db = tmp_path / "optuna_study.db"
    s = EpochAwareOptunaSearch(space=load_space(None), metric="objective", mode="max", max_t=4,
                               sampler=optuna.samplers.RandomSampler(seed=0), study_name="demo",
                               storage=optuna.storages.RDBStorage(f"sqlite:///{db}"))
    s.suggest("full")
    s.suggest("stopped")
    for e in range(1, 5):
        s.on_trial_result("full", {"epoch": e, "objective": 0.1 * e})
    s.on_trial_complete("full", {"epoch": 4, "objective": 0.4})
    s.on_trial_result("stopped", {"epoch": 1, "objective": 0.2})
    s.on_trial_complete("stopped", {"epoch": 1, "objective": 0.2})
    port = _port()
    proc = subprocess.Popen([str(EXE) if EXE.exists() else "optuna-dashboard", f"sqlite:///{db}", "--host",
                             "127.0.0.1", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, studies = time.time() + 60, None
        while time.time() < deadline and studies is None:
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"optuna-dashboard exited: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer within 60 s"
        [study] = [x for x in studies if x["study_name"] == "demo"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
        states = sorted(t["state"] for t in detail["trials"])
        assert states == ["Complete", "Pruned"], states
        [pruned] = [t for t in detail["trials"] if t["state"] == "Pruned"]
        assert [v["step"] for v in pruned["intermediate_values"]] == [1]
    finally:
        stop_process(proc, timeout=10)
