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


def _job_env(env: dict, store, out: Path, name: str, n_trials: int, epochs: int, extra=()) -> dict:
    """The environment of a cluster/slurm_ray.sbatch job: a small sweep of the tiny store into `out`,
    with no Ray address or token of this process's (the script makes its own)."""
    fix = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k in ("hidden_dim", "latent_dim", "batch_size")]
    job_env = {**env, "REPO": str(ROOT), "STORE": str(store), "OUT": str(out), "SRC": "store:A_GEX",
               "TGT": "store:A_PEAK", "TEST": "store:B_GEX", "SUP_PEAK": "store:B_PEAK", "N_TRIALS": str(n_trials),
               "EPOCHS": str(epochs), "CPUS_PER_TRIAL": "1", "PORT": str(_free_port()), "NAME": name,
               "EXTRA": " ".join([*fix, "--space", "broad", "--set=n_layers=1", "--set=n_components=16", *extra]),
               "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        job_env.pop(k, None)
    return job_env


def test_slurm_script_runs_a_sweep(slurm, tiny_store):
    env, d = slurm
    out = d / "sweeps" / "run1"
    job_env = _job_env(env, tiny_store, out, "slurmsweep", n_trials=2, epochs=2)
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


def test_slurm_script_passes_sigterm_to_the_driver_and_resumes(slurm, tiny_store):
    """SIGTERM to the batch shell (what `#SBATCH --signal=B:TERM@120` sends before the time limit;
    here `scancel --batch --signal=TERM`) once a trial finished: the shell passes it to the driver,
    which saves the sweep and exits with 143, and the job's log says how to resubmit it; the job
    resubmitted with RESUME=1 finishes the sweep, no trial run twice (tests/test_sigterm.py: the
    driver's side)."""
    from conftest import study_states

    env, d = slurm
    out = d / "sweeps" / "term"
    job_env = _job_env(env, tiny_store, out, "termsweep", n_trials=4, epochs=6, extra=("--grace_period", "6"))
    sbatch = ["sbatch", "--wait", "--nodes=1", f"--cpus-per-task={os.cpu_count() or 2}", "--export=ALL",
              "--job-name=xfertermtest"]
    log = d / "term1.out"
    job = subprocess.Popen([*sbatch, f"--output={log}", str(SBATCH)], env=job_env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=d)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and job.poll() is None:
            st = study_states(out / "optuna_study.db")
            if st.get("COMPLETE", 0) + st.get("PRUNED", 0) >= 1:
                break
            time.sleep(0.5)
        assert job.poll() is None, (log.read_text() if log.exists() else "")[-4000:]
        t0 = time.time()
        subprocess.run(["scancel", "--batch", "--signal=TERM", "--name=xfertermtest"], env=env, check=True,
                       capture_output=True, timeout=30)
        job.wait(timeout=120)
        took = time.time() - t0
    finally:
        if job.poll() is None:
            subprocess.run(["scancel", "--name=xfertermtest"], env=env, capture_output=True, timeout=30)
            job.wait(timeout=120)
    text = log.read_text()
    assert job.returncode == 143, text[-4000:]
    assert took < 30, f"the job ended {took:.0f} s after SIGTERM, past SLURM's default KillWait"
    assert f"resume with: xfer tune --resume --output_folder {out}" in text
    assert f"sbatch --export=ALL,OUT={out},RESUME=1 cluster/slurm_ray.sbatch" in text
    assert not (out / "trials.csv").exists()
    st = study_states(out / "optuna_study.db")
    assert 1 <= st.get("COMPLETE", 0) + st.get("PRUNED", 0) < 4

    log2 = d / "term2.out"
    r = subprocess.run([*sbatch, f"--output={log2}", str(SBATCH)], env={**job_env, "RESUME": "1"},
                       capture_output=True, text=True, timeout=900, cwd=d)
    text2 = log2.read_text() if log2.exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + text2[-4000:]
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 4 and df["trial_id"].is_unique and (df["status"] != "errored").all()
    st = study_states(out / "optuna_study.db")
    assert st.get("COMPLETE", 0) + st.get("PRUNED", 0) == 4 and sum(st.values()) == 4  # nothing run twice
    assert (out / "metrics.json").exists()
