"""cluster/slurm_ray.sbatch under a real single-node SLURM (Debian's slurm-wlm and munge):
the test configures munged, slurmctld and slurmd in a temp dir (no systemd, no cgroups,
its own ports on loopback), submits the script with `sbatch --wait`, and checks that the
sweep completed with its outputs where the script says; then it stops every daemon.

`make test` installs slurm-wlm and munge (Makefile: system-packages); without them (or
without root) the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import SMALL_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm_ray.sbatch"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in NEEDED if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and slurm-wlm + munge ({', '.join(missing) or 'not root'}); "
                    "`make test` installs them")
    d = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    os.chmod(d, 0o755)  # the munge user must reach its own directory inside
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir()
    # munged runs as the munge user with its own socket, key and state here
    shutil.chown(d / "munge", "munge", "munge")
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    os.chmod(key, 0o400)
    sock = d / "munge" / "munge.socket"
    munged = subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={sock}",
                             f"--key-file={key}", f"--pid-file={d / 'munge' / 'munged.pid'}",
                             f"--log-file={d / 'munge' / 'munged.log'}", f"--seed-file={d / 'munge' / 'seed'}",
                             "--force"], capture_output=True, text=True, timeout=30)
    assert munged.returncode == 0, munged.stderr
    ctld, slurmd = _free_port(), _free_port()
    cpus = os.cpu_count() or 2
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=xfertest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmctldPort={ctld}
SlurmdPort={slurmd}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([f"/usr/sbin/{daemon}", "-f", str(conf)], env=env, capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0, f"{daemon}: {r.stderr}"
        _wait(lambda: _port_open(ctld) and _port_open(slurmd), 30, "slurmctld and slurmd")
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                               text=True).stdout, 60, "the node to be idle")
        yield env, d
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        # stopped daemons stay zombies here (PID 1 does not reap): wait on the ports, not on kill -0
        _wait(lambda: not _port_open(ctld) and not _port_open(slurmd), 30, "slurm to stop")
        pid = (d / "munge" / "munged.pid").read_text().strip() if (d / "munge" / "munged.pid").exists() else ""
        if pid:
            subprocess.run(["kill", pid], capture_output=True)
        _wait(lambda: not sock.exists(), 30, "munged to stop")


def test_slurm_script_runs_a_sweep(slurm, tiny_store):
    env, d = slurm
    out = d / "sweeps" / "run1"
    fix = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k in ("hidden_dim", "latent_dim", "batch_size")]
    job_env = {**env, "REPO": str(ROOT), "STORE": str(tiny_store), "OUT": str(out), "SRC": "store:A_GEX",
               "TGT": "store:A_PEAK", "TEST": "store:B_GEX", "SUP_PEAK": "store:B_PEAK", "N_TRIALS": "2",
               "EPOCHS": "2", "CPUS_PER_TRIAL": "1", "PORT": str(_free_port()), "NAME": "slurmsweep",
               "EXTRA": " ".join([*fix, "--space", "broad", "--set=n_layers=1", "--set=n_components=16"]),
               "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        job_env.pop(k, None)
    log = d / "job.out"
    r = subprocess.run(["sbatch", "--wait", "--nodes=1", f"--cpus-per-task={os.cpu_count() or 2}",
                        "--export=ALL", f"--output={log}", str(SBATCH)], env=job_env, capture_output=True,
                       text=True, timeout=900, cwd=d)
    text = log.read_text() if log.exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + text[-4000:]
    assert "Ray cluster of 1 node(s)" in text and f"sweep output in {out}" in text
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 2 and (df["status"] != "errored").all()
    for f in ("best_params.json", "best_model.pt", "metrics.json", "optuna_study.db", "sweep.json"):
        assert (out / f).exists(), f
    assert (out / "ray_results" / "slurmsweep").is_dir()
