"""Running a command: the one way every benchmark runs `xfer` (or anything else) in a subprocess.

`run` runs a command to its end from the repository root with one BLAS thread per process
(OMP_NUM_THREADS=1 unless the environment given says otherwise), times it, captures its output
(or writes it to a log file) and, unless told not to, stops the benchmark with one line naming
the command and where its output is when it fails. `run_xfer` is `run` of `python -m xfer.cli`
for a run that writes metrics.json: a run whose metrics.json exists is read, not repeated, so
a study cut short resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
XFER = [sys.executable, "-m", "xfer.cli"]


@dataclass
class Ran:
    """A finished command: its exit status ("timeout" when it was stopped at its time-out), its
    output (empty when it went to a log file), its wall seconds and its process id."""
    cmd: list[str]
    returncode: int | str
    stdout: str
    stderr: str
    seconds: float
    pid: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(cmd: list[str], *, log: Path | None = None, env: dict | None = None, cwd: Path | None = None,
        timeout: float | None = None, check: bool = True, threads: int | None = 1) -> Ran:
    """Run `cmd` to its end in a process group of its own (at `timeout` seconds the whole group
    is killed: Ray's daemons die with their driver). `env`: its whole environment (default this
    process's); `threads`: its OMP_NUM_THREADS (None: as the environment has it). `log`: stdout
    and stderr together into that file; otherwise both captured. `check`: a non-zero exit stops
    the benchmark (SystemExit) naming the command and its log, or the tail of its output."""
    env = dict(os.environ if env is None else env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out = open(log, "w") if log is not None else subprocess.PIPE
    t = time.perf_counter()
    try:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                             text=True, env=env, cwd=cwd or ROOT, start_new_session=True)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
            rc: int | str = p.returncode
        except subprocess.TimeoutExpired:
            _kill_group(p.pid)
            stdout, stderr = p.communicate()
            rc = "timeout"
        except BaseException:  # Ctrl-C included: the command's group does not outlive the benchmark
            _kill_group(p.pid)
            p.wait()
            raise
    finally:
        if log is not None:
            out.close()
    ran = Ran(list(map(str, cmd)), rc, stdout or "", stderr or "", time.perf_counter() - t, p.pid)
    if check and not ran.ok:
        where = f"see {log}" if log is not None else (ran.stderr or ran.stdout)[-3000:]
        raise SystemExit(f"{_short(ran.cmd)} failed ({rc}): {where}")
    return ran


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _short(cmd: list[str]) -> str:
    if cmd[:3] == XFER:
        return "xfer " + cmd[3]
    return " ".join(cmd[:3])


def run_xfer(argv: list[str], out: Path, log: Path, cwd: Path | None = None) -> dict:
    """`xfer ARGV` (its --output_folder is `out`), its output into `log`; returns its metrics.json.
    A run whose metrics.json exists is read, not run again. `cwd`: another checkout to run in
    (its `python -m xfer.cli` imports its own packages)."""
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    ran = run(XFER + argv, log=log, cwd=cwd)
    print(f"{out}: {ran.seconds:.0f} s", flush=True)
    return json.loads((out / "metrics.json").read_text())


def fit_seconds(stdout: str) -> float | None:
    """Tuner.fit's wall time, from the line `xfer tune` prints when its trials end."""
    m = re.search(r"trials in ([0-9.]+) s", stdout)
    return float(m.group(1)) if m else None


def git_head() -> str:
    r = run(["git", "rev-parse", "--short", "HEAD"], check=False)
    return r.stdout.strip()
