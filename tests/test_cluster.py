"""Cluster-wide sweeps on a real multi-node Ray cluster on this machine (cluster/local_cluster.sh:
a head and two worker nodes, one CPU each, token authentication on, every port on loopback
where Ray allows it), with the stores and Tune's storage on a local S3 server (moto):

- a sweep with everything on S3 whose trials run on several nodes, its driver SIGKILLed
  mid-sweep and finished with --resume;
- a sweep submitted as a Ray job (the sweep's name as the submission id), followed with
  `ray job logs`, stopped with `ray job stop` and finished by a resubmission with --resume;
- inspection: the dashboard's actor list (token-authenticated API) names every running trial,
  Prometheus (Debian's) scrapes per-trial metrics, TorchTrainer trials are listed as Train runs;
- a worker node killed mid-sweep (SIGKILL to its raylet): its trials resume from their
  checkpoints on the surviving nodes and every trial is accounted for once.

The module starts and stops its own cluster and S3 server; each step is bounded in time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from conftest import SMALL_MODEL, free_port_block, stop_process, study_states

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]
moto_server = pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
RAY = str(Path(sys.executable).with_name("ray"))
XFER = [sys.executable, "-m", "xfer.cli"]
FIX = [f"--set={k}={v}" for k, v in SMALL_MODEL.items()
       if k in ("hidden_dim", "latent_dim", "proj_hidden", "batch_size")]
FIX += ["--set=n_layers=1", "--set=n_components=16", "--set=disc_hidden=64", "--set=cls_hidden=32"]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="xfer")
    yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1", f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    """A head and two worker nodes; yields (env for clients, dashboard URL, cluster dir)."""
    d = Path(tempfile.mkdtemp(prefix="xc", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port_block()
    env = {**os.environ, **AWS, "OMP_NUM_THREADS": "1", "XFER_CLUSTER_DIR": str(d)}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "XFER_NODE_CACHE"):
        env.pop(k, None)
    r = subprocess.run([str(SCRIPT), "start", "--workers", "2", "--cpus", "1", "--port", str(port),
                        "--dashboard-port", str(port + 2)], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        address = r.stdout.strip().splitlines()[-1]
        assert address == f"127.0.0.1:{port}"                  # the address is the last line
        token = d / "auth_token"
        assert token.stat().st_mode & 0o077 == 0 and not str(token).startswith(str(ROOT))
        client = {**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        st = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and st.stdout.count(" 1 node_") == 3, st.stdout + st.stderr
        wrong = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True, timeout=60,
                               env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
        assert wrong.returncode != 0 and "InvalidAuthToken" in wrong.stderr   # the token is checked
        yield client, f"http://127.0.0.1:{port + 2}", d
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        left = subprocess.run(["pgrep", "-f", f"{d}/(head|w[0-9]+)/"], capture_output=True, text=True).stdout.split()
        live = [p for p in left if Path(f"/proc/{p}/stat").exists()
                and Path(f"/proc/{p}/stat").read_text().split(") ")[-1][0] != "Z"]
        assert not live, f"processes of the cluster still running after stop: {live}"
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_store(s3, tiny_store):
    """The tiny pair's datasets copied into a store on S3 (in a child process: pyarrow's S3
    client, the AWS SDK, stays out of the pytest worker, which goes on to run other modules)."""
    q, _ = s3
    uri = f"s3://xfer/store?{q}"
    code = ("import sys; from xfer.data.store import CellStore; a, b = CellStore(sys.argv[1]), CellStore(sys.argv[2])\n"
            "for n in ('A_GEX', 'A_PEAK', 'B_GEX', 'B_PEAK'): b.write(a.read(n), n)")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_store), uri], env={**os.environ, **AWS},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return uri


def _sweep_args(store: str, out: Path, name: str, n: int, epochs: int, *extra: str) -> list[str]:
    return ["tune", "--address", "auto", "--store", store, "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--output_folder", str(out), "--name", name, "--n_trials", str(n), "--search_epochs", str(epochs),
            "--grace_period", str(epochs), "--cpus_per_trial", "1", "--space", "broad", *FIX, *extra]


@contextmanager
def _driver(args: list[str], env: dict, stderr=subprocess.PIPE):
    """`xfer` + args in a process group of its own; SIGKILLed, with the Ray processes it started,
    if it still runs when the block ends."""
    proc = subprocess.Popen(XFER + args, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _finished(db: Path) -> dict:
    with sqlite3.connect(db) as c:
        return dict(c.execute("select t.number, v.value from trials t join trial_values v using(trial_id) "
                              "where t.state in ('COMPLETE','PRUNED')").fetchall())


def _wait(pred, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _running_on(results: Path, node_id: str, before_epoch: int) -> str | None:
    """A trial (or population) under `results` whose last report came from `node_id` at an epoch
    <= before_epoch, so it still has epochs left: its trial id, else None."""
    for f in results.glob("*/result.json"):
        lines = f.read_text().strip().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        if last.get("node_id") == node_id and last.get("epoch", before_epoch + 1) <= before_epoch:
            return last["trial_id"]
    return None


def _accounted(out: Path, n: int, epochs: int, restarted: bool = False) -> pd.DataFrame:
    """Every trial once in trials.csv and in the Optuna study, each with the right status. After
    a driver restart the study may also hold trials the dead driver had proposed but Tune never
    started: FAIL, tagged orphaned_by_restore (tune/searcher.py)."""
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == n and df["trial_id"].is_unique, df[["trial_id", "status"]]
    assert (df["status"] == "completed").all() and (df["epochs_run"] == epochs).all(), \
        df[["status", "epochs_run", "error"]].to_string()
    st = study_states(out / "optuna_study.db")
    assert st.get("COMPLETE") == n and len(_finished(out / "optuna_study.db")) == n, st
    if restarted:
        with sqlite3.connect(out / "optuna_study.db") as c:
            failed = c.execute("select count(*) from trials where state = 'FAIL'").fetchone()[0]
            orphans = c.execute("select count(*) from trial_system_attributes where key = 'orphaned_by_restore'"
                                ).fetchone()[0]
        assert set(st) <= {"COMPLETE", "FAIL"} and failed == orphans, st
    else:
        assert st == {"COMPLETE": n}
    return df


@pytest.mark.parametrize("population", [1, 2])
def test_s3_sweep_spans_nodes_and_resumes_after_the_driver_dies(cluster, s3, s3_store, tmp_path, population):
    """The stores and Tune's storage on S3, trials on three nodes, the driver SIGKILLed and the sweep
    resumed; with --population 2 each Ray trial is a population whose members' checkpoints
    (member_<i>.pt) go to S3 and come back for the final model."""
    client, _, _ = cluster
    q, endpoint = s3
    # more Ray trials than the three slots, so they end in two waves and the kill lands between them
    # (6 members in 3 populations of 2 would all run at once and could all end before the kill)
    n = 6 if population == 1 else 8
    out, epochs, name = tmp_path / "sweep", 4, f"s3sweep{population}"
    args = _sweep_args(s3_store, out, name, n, epochs, "--storage", f"s3://xfer/sweeps?{q}",
                       "--population", str(population))
    with _driver(args, client, stderr=subprocess.DEVNULL) as proc:
        _wait(lambda: sum(study_states(out / "optuna_study.db").get(s, 0) for s in ("COMPLETE", "PRUNED")) >= 2,
              300, "two trials finished", proc)
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    done = _finished(out / "optuna_study.db")
    assert 2 <= len(done) < n
    r = subprocess.run(XFER + ["tune", "--resume", "--address", "auto", "--output_folder", str(out)], env=client,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out / "trials.csv")
    assert df["node_id"].nunique() >= 2, df[["trial_id", "node_id"]]                  # several nodes
    assert (df["status"] != "errored").all(), df[["trial_id", "status", "error"]].to_string()
    assert all(_finished(out / "optuna_study.db").get(k) == v for k, v in done.items())  # kept, not rerun
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{
        k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"}).list_objects_v2(
        Bucket="xfer", Prefix=f"sweeps/{name}/")["Contents"]]
    ckpt = "/checkpoint.pt" if population == 1 else "/member_1.pt"
    assert any(k.endswith(ckpt) for k in keys)                                          # checkpoints on S3
    if population > 1:
        assert df["population_id"].nunique() == n // population and len(df) == n
    assert not (out / "ray_results").exists() and (out / "best_model.pt").exists()
    assert not (out / ".best_checkpoint.pt").exists()                                 # the download is gone
    assert json.loads((out / "sweep.json").read_text())["storage_uri"].startswith("s3://xfer/sweeps")
    # Exactly n trials, each once, although the driver was killed, perhaps while its state files uploaded to S3
    # (they reach S3 separately and may restore from different moments: tune/searcher.py reconciles)
    _accounted(out, n, epochs, restarted=True)


def _job(client, *argv, timeout=120):
    return subprocess.run([RAY, "job", *argv], env=client, capture_output=True, text=True, timeout=timeout)


def _job_status(client, dash, sid) -> str:
    """The job's status as `ray job status` words it (ray/dashboard/modules/job/cli.py)."""
    text = (lambda r: r.stdout + r.stderr)(_job(client, "status", "--address", dash, sid))
    for phrase, status in ((f"Job '{sid}' succeeded", "SUCCEEDED"), (f"Job '{sid}' was stopped", "STOPPED"),
                           (f"Job '{sid}' failed", "FAILED")):
        if phrase in text:
            return status
    m = re.search(rf"Status for job '{re.escape(sid)}': (\w+)", text)
    return m.group(1) if m else "?"


def test_sweep_as_a_ray_job_stopped_and_resubmitted(cluster, tiny_store, tmp_path):
    client, dash, _ = cluster
    # enough work that the stop lands mid-sweep on an idle machine too: 12 trials of 10 epochs
    # on 3 slots, stopped as soon as the first has finished
    out, n, epochs, name = tmp_path / "sweep", 12, 10, "jobsweep"
    entry = [*XFER, *_sweep_args(str(tiny_store), out, name, n, epochs)]
    r = _job(client, "submit", "--address", dash, "--submission-id", name, "--no-wait", "--", *entry)
    assert r.returncode == 0, r.stdout + r.stderr
    _wait(lambda: sum(study_states(out / "optuna_study.db").get(s, 0) for s in ("COMPLETE", "PRUNED")) >= 1, 300,
          "a trial finished")
    logs = _job(client, "logs", "--address", dash, name).stdout
    assert "trial slot" in logs, logs[-2000:]                                          # the driver's progress
    r = _job(client, "stop", "--address", dash, name)
    assert r.returncode == 0, r.stdout + r.stderr
    _wait(lambda: _job_status(client, dash, name) == "STOPPED", 60, "the job to stop")
    done = _finished(out / "optuna_study.db")
    assert len(done) < n
    sid = f"{name}-resume"
    r = _job(client, "submit", "--address", dash, "--submission-id", sid, "--no-wait", "--",
             *XFER, "tune", "--resume", "--address", "auto", "--output_folder", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    status = _wait(lambda: (s := _job_status(client, dash, sid)) in ("SUCCEEDED", "FAILED", "STOPPED") and s, 600,
                   "the resubmitted job to end")
    assert status == "SUCCEEDED", _job(client, "logs", "--address", dash, sid).stdout[-3000:]
    _accounted(out, n, epochs, restarted=True)
    assert all(_finished(out / "optuna_study.db")[k] == v for k, v in done.items())


def _api(dash: str, d: Path, path: str):
    """A token-authenticated call to the dashboard's HTTP API (JSON, or the text of an error)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(dash + path, headers={"Authorization": f"Bearer {(d / 'auth_token').read_text().strip()}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ValueError, OSError) as e:
        return {"error": repr(e)}


@pytest.fixture
def prometheus(cluster, tmp_path):
    """Debian's Prometheus, configured from cluster/prometheus.yml with the head's service-discovery file
    (1 s intervals), on loopback; yields its URL."""
    import shutil

    import yaml

    if not shutil.which("prometheus"):
        pytest.skip("prometheus not installed (make test installs Debian's package as root)")
    _, _, d = cluster
    cfg = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    sd = cfg["scrape_configs"][0]["file_sd_configs"][0]
    sd["files"], sd["refresh_interval"] = [str(d / "head" / "prom_metrics_service_discovery.json")], "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port_block(2)
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _prom(url, "up"), 60, "Prometheus to answer")
        yield url
    finally:
        stop_process(proc)


def _prom(url: str, query: str) -> list:
    """The instant vector Prometheus answers for `query` ([] while it cannot answer)."""
    import urllib.parse
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(query)}", timeout=10) as r:
            return json.loads(r.read())["data"]["result"]
    except (OSError, ValueError, KeyError):
        return []


def test_dashboard_and_prometheus_show_every_running_trial(cluster, prometheus, tiny_store, tmp_path):
    """During a sweep with one actor per trial (--no-reuse_actors), the dashboard's actor list (a
    token-authenticated API call) names every trial while it runs, Prometheus scrapes each trial's
    metrics tagged with its id, and the driver's job carries the sweep's name."""
    client, dash, d = cluster
    out, n, epochs = tmp_path / "sweep", 4, 10
    named, scraped, polls = set(), {}, 0
    with _driver(_sweep_args(str(tiny_store), out, "inspect", n, epochs, "--no-reuse_actors"), client) as proc:
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            actors = _api(dash, d, "/api/v0/actors?detail=1&limit=1000").get("data", {}).get("result", {}).get(
                "result", [])
            named |= {a["repr_name"].split()[1] for a in actors
                      if a["state"] == "ALIVE" and (a.get("repr_name") or "").startswith("trial ")}
            for r in _prom(prometheus, 'ray_xfer_trial_epoch{sweep="inspect"}'):
                scraped[r["metric"]["trial_id"]] = r["metric"]
            polls += 1
            time.sleep(0.5)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    df = _accounted(out, n, epochs).set_index("trial_id")
    assert set(df.index) <= named, (sorted(df.index), sorted(named), polls)         # every trial, by its id
    assert scraped and set(scraped) <= set(df.index), scraped                          # per-trial metrics
    for tid, tags in scraped.items():
        assert (tags["arch"], tags["divergence"]) == (df.loc[tid, "param.arch"], df.loc[tid, "param.divergence"])
    jobs = _api(dash, d, "/api/jobs/")
    assert any((j.get("metadata") or {}).get("xfer_sweep") == "inspect" for j in jobs), jobs


def test_torch_trials_are_listed_as_train_runs(cluster, tiny_store, tmp_path):
    """A TorchTrainer trial runs with Ray Train's state tracking on: the dashboard lists its run,
    named train-<trial id> (Ray 2.60 serves Train V2 runs at /api/train/v2/runs/v1)."""
    client, dash, d = cluster
    out = tmp_path / "sweep"
    r = subprocess.run(XFER + _sweep_args(str(tiny_store), out, "trainruns", 1, 2, "--trainer", "torch"), env=client,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    [tid] = pd.read_csv(out / "trials.csv")["trial_id"]
    runs = _api(dash, d, "/api/train/v2/runs/v1").get("train_runs", [])
    assert f"train-{tid}" in {x["name"] for x in runs}, runs


def test_worker_node_killed_mid_sweep(cluster, tiny_store, tmp_path):
    """Last in the module: the cluster loses a node for good."""
    client, dash, d = cluster
    nodes = json.loads(subprocess.run([RAY, "list", "nodes", "--address", dash, "--format", "json"], env=client,
                                      capture_output=True, text=True, timeout=60).stdout)
    w1 = next(x["node_id"] for x in nodes if "w1" in x["resources_total"])
    # long trials: a worker outlives its killed raylet by a second or two and may finish a short one
    out, n, epochs = tmp_path / "sweep", 6, 100
    running_on_w1 = partial(_running_on, out / "ray_results" / "killsweep", w1, epochs // 10)

    with _driver(_sweep_args(str(tiny_store), out, "killsweep", n, epochs, "--checkpoint_every", "1",
                             "--set=patience=100"), client) as proc:
        _wait(running_on_w1, 300, "a trial running on worker 1", proc)
        k = subprocess.run([str(SCRIPT), "kill-node", "1"], env=client, capture_output=True, text=True, timeout=30)
        assert k.returncode == 0, k.stderr
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    df = _accounted(out, n, epochs).set_index("trial_id")
    # the trials that ran on worker 1 when it died went on elsewhere (which ones is timing: a trial
    # Tune placed on the node in the second before Ray marked it dead moves too)
    moved = [t for t, ids in df["node_ids"].items() if ids.split(";")[0] == w1 and len(ids.split(";")) >= 2]
    assert moved, df["node_ids"]
    for t in moved:
        assert w1 not in df.loc[t, "node_ids"].split(";")[1:]
        # resumed from its last checkpoint (one every epoch), not from scratch: the epoch in flight when
        # the node died may run again (its report can reach the driver before its checkpoint is
        # registered: seen once, epoch 18 reported on the dead node and again elsewhere), no more
        hist = [json.loads(x) for x in (out / "ray_results" / "killsweep" / t / "result.json").read_text().splitlines()]
        on_w1 = [h["epoch"] for h in hist if h.get("node_id") == w1]
        after = [h["epoch"] for h in hist if h.get("node_id") != w1]
        assert after and after == list(range(after[0], epochs + 1)), (on_w1, after)
        assert 1 < after[0] and max(on_w1) - 1 <= after[0] <= max(on_w1) + 1, (on_w1, after)



def test_worker_node_killed_mid_population_sweep(cluster, tiny_store, tmp_path):
    """After the test above (the last two in the module): a population sweep loses its other worker
    node; the population that ran there goes on elsewhere from its last checkpoint (every member's),
    and every member is accounted for once."""
    client, dash, d = cluster
    nodes = json.loads(subprocess.run([RAY, "list", "nodes", "--address", dash, "--format", "json"], env=client,
                                      capture_output=True, text=True, timeout=60).stdout)
    w2 = next(x["node_id"] for x in nodes if "w2" in x["resources_total"] and x["state"] == "ALIVE")
    out, n, epochs = tmp_path / "sweep", 16, 40
    running_on_w2 = partial(_running_on, out / "ray_results" / "popkill", w2, epochs // 6)

    with _driver(_sweep_args(str(tiny_store), out, "popkill", n, epochs, "--population", "8", "--checkpoint_every",
                             "1", "--set=patience=100"), client) as proc:
        _wait(running_on_w2, 300, "a population running on worker 2", proc)
        k = subprocess.run([str(SCRIPT), "kill-node", "2"], env=client, capture_output=True, text=True, timeout=30)
        assert k.returncode == 0, k.stderr
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    df = _accounted(out, n, epochs)
    assert df["population_id"].nunique() == 2
    moved = df[df["node_ids"].str.split(";").map(lambda ids: ids[0] == w2 and len(ids) >= 2)]
    assert len(moved) == 8 and moved["population_id"].nunique() == 1, df[["trial_id", "node_ids"]]
