"""`xfer tune` fails in seconds, with one line and exit status 2, before any data work, when the
cluster cannot run the sweep (tune/ray_start.py: check_cluster, check_trial_fits; issue 27):

- nothing listens at --address (today: the data are prepared, then Ray waits on its GCS for minutes);
- the cluster wants a token and none is sent, or the one sent is wrong (a real head started with
  token authentication by cluster/local_cluster.sh, as the project's recipes do);
- one trial asks for more than any node has (--num_cpus 0, a GPU share on a CPU-only cluster, more
  Ray Train workers than the cluster holds): today its trials stay pending for ever;

and a sweep names a trial left pending too long (tune/progress.py), tested with stub trials.
Nothing may be written: no output folder, no store (the inputs are CSV files, which a sweep
ingests into the store first). Every subprocess and the cluster's start and stop are bounded.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port_block

pytest.importorskip("ray.tune")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
XFER = [sys.executable, "-m", "xfer.cli"]
BOUND_S = 40  # a failing check answers within ~20 s; the rest is Python's and Ray's imports on a busy machine


@pytest.fixture(scope="module")
def csv_inputs(tmp_path_factory, tiny_pair):
    from xfer.data.simulate import write_simulation

    d = tmp_path_factory.mktemp("csv_inputs")
    write_simulation(tiny_pair, d, formats=("csv",))
    return d


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def _env(home, **extra) -> dict:
    """The environment of a user with no Ray settings and no ~/.ray/auth_token (an empty HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def _tune(csv_inputs, tmp_path, env, *extra, resume=False):
    """Run `xfer tune` on the CSV inputs; returns (returncode, stderr, seconds, output folder, store)."""
    out, store = tmp_path / "sweep", tmp_path / "store"
    d = csv_inputs
    args = ["tune", "--store", str(store), "--output_folder", str(out), "--n_trials", "2", "--search_epochs", "2"]
    if not resume:
        args += ["--src_csv", str(d / "A_GEX.csv"), "--src_label_csv", str(d / "A_labels.csv"),
                 "--tgt_csv", str(d / "A_PEAK.csv"), "--test_csv", str(d / "B_GEX.csv"),
                 "--sup_peak_csv", str(d / "B_PEAK.csv")]
    else:
        args.append("--resume")
    t0 = time.monotonic()
    r = subprocess.run(XFER + args + list(extra), env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr, time.monotonic() - t0, out, store


def _one_line_error(rc, err, secs, out, store) -> str:
    """The failure every check gives: status 2, one `xfer tune: error:` line, quickly, nothing written."""
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("xfer tune: error: "), err[-3000:]
    assert secs < BOUND_S, secs
    assert not out.exists() and not store.exists(), "the check must run before any data work"
    return lines[0]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- no cluster needed

def test_nothing_listening_at_the_address(csv_inputs, tmp_path, home):
    port = _free_port()
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, _env(home), "--address", f"127.0.0.1:{port}"))
    assert f"--address 127.0.0.1:{port}" in msg and "nothing is listening" in msg
    assert "cluster/local_cluster.sh env" in msg                     # how to get the address and the token


def test_something_that_is_not_a_gcs_at_the_address():
    """A TCP server that accepts and says nothing (a wrong port): the GCS call times out, bounded."""
    from tune.ray_start import CHECK_TIMEOUT_S, ClusterError, check_cluster
    from tune.request import RunOptions, SweepRequest

    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(4)
    port, held = srv.getsockname()[1], []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(4)], daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ClusterError, match=rf"at --address 127\.0\.0\.1:{port} .*not as a Ray 2\.60 cluster's GCS"):
            check_cluster(RunOptions(address=f"127.0.0.1:{port}"), SweepRequest(sources=None, output_folder="x"))
    finally:
        srv.close()
        for c, _ in held:
            c.close()
    assert time.monotonic() - t0 < 3 * CHECK_TIMEOUT_S


@pytest.mark.parametrize("flags, needs, has", [
    (("--num_cpus", "0"), "it needs 1 CPU on one node", "its one node has 0 CPU"),
    (("--num_cpus", "2", "--num_gpus", "0", "--gpus_per_trial", "0.5"), "it needs 1 CPU, 0.5 GPU on one node",
     "its one node has 2 CPU, 0 GPU"),
    (("--num_cpus", "2", "--num_workers", "3", "--cpus_per_trial", "3"),
     "0.01 CPU for the trial and 3 Ray Train workers of 0.99 CPU each", "its one node has 2 CPU, 0 GPU"),
])
def test_a_trial_the_local_cluster_cannot_hold(csv_inputs, tmp_path, home, flags, needs, has):
    """Today: the data are prepared, Ray starts, and both trials stay pending for ever."""
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, _env(home), *flags))
    assert "one trial cannot run on the local Ray cluster" in msg and needs in msg and has in msg, msg
    assert "--num_cpus" in msg                                            # what to change


def test_placement_of_one_trial():
    from tune.ray_start import nodes_text, placeable, trial_bundles

    one_cpu = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert placeable(trial_bundles(1, 0, 1, torch=False), one_cpu)
    assert not placeable(trial_bundles(2, 0, 1, torch=False), one_cpu)       # 2 CPUs in all, but not on one node
    assert not placeable(trial_bundles(1, 0.25, 1, torch=False), one_cpu)    # a GPU share, no GPU
    assert placeable(trial_bundles(1, 0.25, 1, torch=False), one_cpu + [{"CPU": 1.0, "GPU": 1.0}])
    # TorchTrainer: the trial's 0.01 CPU and its workers, spread over nodes (PACK), each whole on one node
    assert placeable(trial_bundles(2, 0, 2, torch=True), one_cpu)
    assert not placeable(trial_bundles(2, 0, 3, torch=True), one_cpu)        # 3 x 0.66 CPU: one per 1-CPU node
    assert placeable(trial_bundles(2, 0, 3, torch=True), [{"CPU": 2.0}])
    assert not placeable(trial_bundles(1, 0, 1, torch=False), [])
    uneven = [{"CPU": 1.0 + i / 1000} for i in range(30)]                   # one 0.6-CPU bundle each, 31 asked
    assert not placeable([{"CPU": 0.6}] * 31, [{"CPU": 1.0}] * 30)
    assert placeable([{"CPU": 0.6}] * 31, uneven, budget=10)                 # out of budget: never a refusal
    assert nodes_text([{"CPU": 1.0, "GPU": 0.0}] * 2 + [{"CPU": 4.0, "GPU": 1.0}]) == \
        "its 3 nodes have 2 x (1 CPU, 0 GPU), 1 x (4 CPU, 1 GPU)"


# ----------------------------------------------------------------------------- the pending trial named

def test_a_trial_pending_too_long_is_named_once(monkeypatch):
    from ray.tune.execution.placement_groups import PlacementGroupFactory
    from ray.tune.experiment import Trial

    import tune.progress as progress

    monkeypatch.setattr(progress, "free_text", lambda: "0 of 2 CPU, 0 of 0 GPU")
    now = [0.0]
    out = io.StringIO()
    cb = progress.SweepProgress(3, 4, mode="plain", stream=out, clock=lambda: now[0])
    waiting, running = (Trial("xfer", stub=True, config={}, trial_id=t) for t in ("p1", "r1"))
    waiting.placement_group_factory = PlacementGroupFactory([{"CPU": 2, "GPU": 1}])
    running.set_status(Trial.RUNNING)
    trials = [waiting, running]
    cb.setup()
    for t in (0.0, 30.0, progress.PENDING_NOTE_S - 1):
        now[0] = t
        cb.on_step_end(iteration=0, trials=trials)
    assert "pending for" not in out.getvalue()
    for t in (progress.PENDING_NOTE_S + 15, 300.0):
        now[0] = t
        cb.on_step_end(iteration=0, trials=trials)
    named = [ln for ln in out.getvalue().splitlines() if "pending for" in ln]
    assert named == ["trial p1 pending for 75 s: needs 2 CPU, 1 GPU; free: 0 of 2 CPU, 0 of 0 GPU"]


# ----------------------------------------------------------------------------- a cluster with a token


@pytest.fixture(scope="module")
def token_cluster(home):
    """A Ray head (1 CPU, no GPU) with token authentication, started as cluster/local_cluster.sh does;
    yields (address, the client environment of `local_cluster.sh env`, token file)."""
    d = Path(tempfile.mkdtemp(prefix="xk", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port_block(30)
    env = {**_env(home), "XFER_CLUSTER_DIR": str(d)}
    try:
        r = subprocess.run([str(SCRIPT), "start", "--workers", "0", "--cpus", "1", "--port", str(port),
                            "--dashboard-port", str(port + 2)], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        address = r.stdout.strip().splitlines()[-1]
        exports = subprocess.run([str(SCRIPT), "env"], env=env, capture_output=True, text=True, timeout=30).stdout
        client = dict(ln.removeprefix("export ").split("=", 1) for ln in exports.splitlines() if "=" in ln)
        assert client["RAY_AUTH_MODE"] == "token" and client["RAY_ADDRESS"] == address
        yield address, client, d / "auth_token"
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.cluster
def test_the_token_missing(csv_inputs, tmp_path, home, token_cluster):
    """Today: "ConnectionError: Failed to connect to Ray cluster at 192.0.2.2:6390" after ~20 s, with
    neither the token nor the address given named."""
    address, _, _ = token_cluster
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, _env(home), "--address", address))
    assert f"Ray cluster at --address {address}" in msg and "requires a token" in msg, msg
    assert "RAY_AUTH_MODE is not set" in msg
    assert 'eval "$(cluster/local_cluster.sh env)"' in msg and "RAY_AUTH_TOKEN_PATH" in msg
    # a token without RAY_AUTH_MODE=token is not sent (Ray 2.60, an explicit address): said so
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, _env(home, RAY_AUTH_TOKEN="0" * 64), "--address", address))
    assert "so the token in RAY_AUTH_TOKEN is not sent" in msg, msg
    # --resume with an address: checked before the sweep's folder is read
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, _env(home), "--address", address, resume=True))
    assert "requires a token" in msg, msg


@pytest.mark.cluster
def test_the_token_wrong(csv_inputs, tmp_path, home, token_cluster):
    address, _, _ = token_cluster
    env = _env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, env, "--address", address))
    assert f"Ray cluster at --address {address}" in msg and "rejected this process's token (from RAY_AUTH_TOKEN)" in msg
    assert 'eval "$(cluster/local_cluster.sh env)"' in msg
    bad = tmp_path / "bad_token"
    bad.write_text("1" * 64)
    env = _env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(bad))
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, env, "--address", address))
    assert f"(from RAY_AUTH_TOKEN_PATH={bad})" in msg, msg


@pytest.mark.cluster
@pytest.mark.parametrize("flags, needs", [
    (("--gpus_per_trial", "1"), "it needs 1 CPU, 1 GPU on one node (--cpus_per_trial 1, --gpus_per_trial 1)"),
    (("--num_workers", "2", "--cpus_per_trial", "2"), "0.01 CPU for the trial and 2 Ray Train workers of 0.99 CPU"),
])
def test_a_trial_the_cluster_cannot_hold(csv_inputs, tmp_path, home, token_cluster, flags, needs):
    """With the right token (`eval "$(cluster/local_cluster.sh env)"` and --address auto)."""
    _, client, _ = token_cluster
    msg = _one_line_error(*_tune(csv_inputs, tmp_path, _env(home, **client), "--address", "auto", *flags))
    assert "one trial cannot run on the Ray cluster at --address auto" in msg and needs in msg, msg
    assert "its one node has 1 CPU, 0 GPU" in msg


@pytest.mark.cluster
def test_the_right_token_passes_and_the_check_after_ray_starts(token_cluster, tmp_path, home):
    """check_cluster passes with the cluster's token (RAY_AUTH_TOKEN_PATH); once connected,
    check_trial_fits reads the live nodes from Ray itself (ray.nodes())."""
    address, client, token = token_cluster
    code = f"""
import ray
from pathlib import Path
from tune.ray_start import ClusterError, check_cluster, check_trial_fits, slots
from tune.request import RunOptions, SweepRequest
from tune.settings import Sweep
check_cluster(RunOptions(address={address!r}), SweepRequest(sources=None, output_folder="x"))
ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
sw = Sweep(name="s", output=Path({str(tmp_path)!r}), spec={{}}, base={{}}, space={{}}, n_trials=1, search_epochs=2,
           metric="balanced_accuracy", cpus_per_trial=1, gpus_per_trial=0, num_workers=1, trainer="function",
           grace_period=1, reduction_factor=2, checkpoint_every=0, max_failures=0, seed=0, data_args={{}})
check_trial_fits(sw)
assert slots(sw) == 1
sw.cpus_per_trial = 2
try:
    check_trial_fits(sw)
except ClusterError as e:
    print("REFUSED:", e)
assert slots(sw) == 1  # concurrency only: never raises
from tune.progress import free_text
print("FREE:", free_text())
"""
    env = _env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REFUSED: one trial cannot run on the Ray cluster: it needs 2 CPU on one node" in r.stdout, r.stdout
    assert "its one node has 1 CPU, 0 GPU" in r.stdout
    assert "FREE: 1 of 1 CPU, 0 of 0 GPU" in r.stdout                     # what a pending trial's line shows
