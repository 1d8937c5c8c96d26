"""Benchmark: cluster-wide sweeps on this machine (issue 13).

    python -m bench.cluster_costs [--size small] [--json bench/results/cluster_costs.json]

Three figures, each from the real components (cluster/local_cluster.sh: a head and worker
nodes, one CPU each, token auth; moto's S3 server on 127.0.0.1):

  store_read      reading a sweep's datasets (tune.data.read_inputs: both lines' GEX and
                  PEAK) from a local store and from the same store on S3; best of 3, after
                  one warm-up read of each
  trial_startup   a sweep of 6 one-epoch trials on a head + 1 worker cluster: per trial, the
                  seconds from Tune starting it to its first report minus that epoch's own
                  time (process start or actor reuse, imports, the trial data from the node's
                  cache or prepared from the store), by node and by cold (first on its
                  node) or warm
  node_death      a sweep on a head + 2 workers; worker 1's raylet is SIGKILLed while a trial
                  runs there; seconds from the kill until that trial reports again from
                  another node (its result.json polled every 0.2 s), and the sweep's outcome

On one machine "nodes" share the CPUs and disk: the figures measure Ray's and xfer's own
costs (scheduling, start-up, caches, failure detection), not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, TEST, TRAIN, XFER, data_flags, read_results, run, simulate_into_store, write_results

SCRIPT = ROOT / "cluster" / "local_cluster.sh"
RAY = str(Path(sys.executable).with_name("ray"))
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SMALL = ["--set=hidden_dim=128", "--set=latent_dim=32", "--set=n_layers=1", "--set=batch_size=128"]


def s3_server():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="xfer")
    return server, f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"


def make_store(size: str, root: Path, s3_query: str) -> tuple[str, str]:
    """The pair in a local store and in the same store on S3."""
    local, remote = str(root / "store"), f"s3://xfer/store?{s3_query}"
    simulate_into_store([local, remote], size, seed=0)
    return local, remote


def store_read(local: str, remote: str) -> dict:
    from tune.data import DataSpec, read_inputs
    from xfer.data.store import CellStore

    out = {}
    for label, uri in (("local", local), ("s3", remote)):
        st = CellStore(uri)
        roles = dict(zip(("src", "tgt", "test", "sup_peak"), (*TRAIN, *TEST)))
        spec = DataSpec(store=uri, **roles, **{f"{r}_hash": st.manifest(n).content_hash for r, n in roles.items()})
        read_inputs(spec)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            data = read_inputs(spec)
            times.append(time.perf_counter() - t)
        out[label] = round(min(times), 3)
    out["cells"] = {k: int(v.n_cells) for k, v in data.items()}
    out["peaks"] = int(data["tgt"].n_features)
    out["s3_over_local"] = round(out["s3"] / out["local"], 1)
    return out


def start_cluster(d: Path, workers: int, env: dict) -> tuple[dict, str]:
    port = random.randrange(20000, 31000, 50)
    r = run([str(SCRIPT), "start", "--workers", str(workers), "--cpus", "1", "--port", str(port),
             "--dashboard-port", str(port + 2), "--dir", str(d)], env=env, timeout=240)
    client = {**env, "RAY_ADDRESS": r.stdout.strip().splitlines()[-1], "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN_PATH": str(d / "auth_token")}
    return client, f"http://127.0.0.1:{port + 2}"


def stop_cluster(d: Path, env: dict) -> None:
    run([str(SCRIPT), "stop", "--dir", str(d)], env=env, timeout=120, check=False)


def list_nodes(client: dict, dash: str) -> list[dict]:
    """The cluster's nodes as Ray's state API lists them (node_id, is_head_node, resources_total)."""
    return json.loads(run([RAY, "list", "nodes", "--address", dash, "--format", "json"], env=client,
                          timeout=60).stdout)


def _results(out: Path, name: str) -> dict:
    res = {}
    for f in (out / "ray_results" / name).glob("*/result.json"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if rows:
            res[f.parent.name] = rows
    return res


def trial_startup(store: str, work: Path, env: dict) -> dict:
    d = Path(tempfile.mkdtemp(prefix="xb", dir="/tmp"))
    client, dash = start_cluster(d, 1, env)
    try:
        names = {x["node_id"]: ("head" if x["is_head_node"] else "worker") for x in list_nodes(client, dash)}
        out = work / "startup"
        run([*XFER, "tune", "--address", "auto", *data_flags(store), "--n_trials", "6", "--space", "broad",
             "--search_epochs", "1", "--name", "startup", "--output_folder", str(out), *SMALL], env=client,
            timeout=1200)
        rows = sorted((rs[0] for rs in _results(out, "startup").values()), key=lambda m: m["timestamp"])
        seen, trials = set(), []
        for m in rows:
            node = names.get(m["node_id"], "?")
            trials.append({"node": node, "cold": node not in seen,
                           "startup_s": round(m["time_total_s"] - m["epoch_seconds"], 2),
                           "epoch_s": round(m["epoch_seconds"], 2)})
            seen.add(node)
        return {"trials": trials}
    finally:
        stop_cluster(d, env)


def node_death(store: str, work: Path, env: dict) -> dict:
    d = Path(tempfile.mkdtemp(prefix="xb", dir="/tmp"))
    client, dash = start_cluster(d, 2, env)
    try:
        w1 = next(x["node_id"] for x in list_nodes(client, dash) if "w1" in x["resources_total"])
        out, epochs, n = work / "death", 12, 6
        # in the background: the node dies while it runs
        proc = subprocess.Popen([*XFER, "tune", "--address", "auto", *data_flags(store, test=False), "--n_trials",
                                 str(n), "--space", "broad", "--search_epochs", str(epochs), "--grace_period",
                                 str(epochs), "--checkpoint_every", "1", "--name", "death", "--output_folder", str(out),
                                 *SMALL],
                                env=client, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            victim, deadline = None, time.time() + 900
            while victim is None and time.time() < deadline and proc.poll() is None:
                for tid, rows in _results(out, "death").items():
                    if rows[-1].get("node_id") == w1 and rows[-1]["epoch"] <= epochs - 5:
                        victim = tid
                time.sleep(0.2)
            if victim is None:
                raise SystemExit("no trial ran on worker 1")
            t_kill = time.time()
            run([str(SCRIPT), "kill-node", "1", "--dir", str(d)], env=env, timeout=30)
            back = None
            while back is None and time.time() < t_kill + 600:
                rows = _results(out, "death").get(victim, [])
                if any(r.get("node_id") != w1 for r in rows):
                    back = time.time() - t_kill
                time.sleep(0.2)
            _, err = proc.communicate(timeout=1200)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        import pandas as pd

        df = pd.read_csv(out / "trials.csv") if (out / "trials.csv").exists() else pd.DataFrame()
        rows = _results(out, "death")[victim]
        resumed = [r for r in rows if r.get("node_id") != w1]
        return {"seconds_to_report_again": round(back, 1) if back else None,
                "last_epoch_on_w1": max(r["epoch"] for r in rows if r.get("node_id") == w1),
                "first_epoch_elsewhere": resumed[0]["epoch"] if resumed else None,
                "sweep_rc": proc.returncode, "trials": len(df),
                "statuses": df["status"].value_counts().to_dict() if len(df) else {},
                "error_tail": err[-500:] if proc.returncode else ""}
    finally:
        stop_cluster(d, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--json", default="bench/results/cluster_costs.json")
    ap.add_argument("--parts", nargs="+", default=["store_read", "trial_startup", "node_death"],
                    choices=["store_read", "trial_startup", "node_death"], help="run these (merged into --json)")
    args = ap.parse_args()
    env = {**os.environ, **AWS, "OMP_NUM_THREADS": "1"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "XFER_NODE_CACHE"):
        env.pop(k, None)
    os.environ.update(AWS)
    server, q = s3_server()
    work = Path(tempfile.mkdtemp(prefix="cluster_costs_"))
    try:
        local, remote = make_store(args.size, work, q)
        res = read_results(args.json, default={})
        res.update({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                    "size": args.size})
        parts = {"store_read": lambda: store_read(local, remote),
                 "trial_startup": lambda: trial_startup(local, work, env),
                 "node_death": lambda: node_death(local, work, env)}
        for part in args.parts:
            res[part] = {**parts[part](), "date": time.strftime("%Y-%m-%d %H:%M")}
            print(part, res[part], flush=True)
    finally:
        server.stop()
    write_results(args.json, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
