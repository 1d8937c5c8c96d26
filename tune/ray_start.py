"""Starting Ray for a sweep: the environment Ray must see first, the checks that the cluster can run
the sweep at all (`check_cluster` before any data work: it answers at --address, takes this
process's token, has a node one trial fits; `check_trial_fits` once Ray has started), the connection
(a local cluster or an existing one) and how many trials the cluster holds at once. Ray is imported
inside the functions: `ray_environment` runs before the first import of Ray."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from xfer.errors import ConfigError, XferError

from .settings import Sweep


def ray_environment() -> None:
    """Environment Ray must see before it is imported (inherited by trial processes)."""
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # snapshot the sweep state every second (resume)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune's automatic loggers include TensorBoardX's, ~4 ms of the driver's time per report (CSV and
    # JSON: ~0.2 ms; BENCHMARKS.md "Ray's costs that are ours"): the sweep adds its loggers itself
    # (tune.tuner.loggers), TensorBoard's only with --tensorboard
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


# Trial processes get these (the job's runtime environment): Ray Train's state tracking lists each
# TorchTrainer trial's run (`train-<trial id>`) in the dashboard.
TRIAL_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def start_ray(address: str | None, num_cpus: int | None, num_gpus: int | None, sweep: str = "",
              quiet: bool = False):
    """quiet: Ray's own loggers in this process show warnings and errors, not INFO lines
    (`xfer tune -v` keeps them)."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    from ray.job_config import JobConfig

    # the sweep's name goes into the job's metadata (the dashboard's job view; a submitted job's own
    # metadata wins); set variables stay as they are (a submitted job's runtime env must not conflict)
    env = {k: v for k, v in TRIAL_ENV.items() if k not in os.environ}
    # xfer extensions named in the driver's environment (xfer.registry) are imported by every trial
    # process; a submitted job's own runtime env already carries them to its workers
    if os.environ.get("XFER_EXTENSIONS") and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        env["XFER_EXTENSIONS"] = os.environ["XFER_EXTENSIONS"]
    kw = {"log_to_driver": False, "job_config": JobConfig(metadata={"xfer_sweep": sweep}),
          "runtime_env": {"env_vars": env} if env else None,
          "logging_level": logging.WARNING if quiet else logging.INFO}
    if address:
        return ray.init(address=address, **kw)
    # The dashboard stays on: without it Ray Train never frees the placement groups of
    # stopped trials (measured with ray 2.60) and a sweep hangs.
    return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1", **kw)


def slots(sw: Sweep) -> int:
    """Concurrent trials the cluster can hold (its totals; whether one trial fits a node at all is
    `check_trial_fits`, run before)."""
    import ray

    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 1) / max(sw.cpus_per_trial, 1e-9) + 1e-9)
    if sw.gpus_per_trial > 0:
        n = min(n, math.floor(res.get("GPU", 0) / sw.gpus_per_trial + 1e-9))
    return max(1, n)


# ----------------------------------------------------------------------------- can the cluster run the sweep?
# Checked before any data work (check_cluster, the first step of tune.driver.run) and again once Ray has
# started (check_trial_fits, tune.tuner.make_tuner): a sweep that cannot run fails in seconds with one line,
# instead of preparing its data and then waiting on Ray's GCS for minutes, or keeping its trials pending
# for ever.

CHECK_TIMEOUT_S = 5.0   # each step of check_cluster (TCP connect, each of at most two GCS calls): 15 s at most
TRIAL_CPU = 0.01        # a TorchTrainer trial's own Tune actor; its Ray Train workers hold the rest of the share
SKIP_RESOURCE_CHECK = "XFER_SKIP_RESOURCE_CHECK"  # =1: no per-node check (a cluster whose nodes join on demand)
TOKEN_HELP = ("set the cluster's token: `eval \"$(cluster/local_cluster.sh env)\"` for a "
              "cluster/local_cluster.sh cluster, else `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<token file>` "
              "(or RAY_AUTH_TOKEN=<the token>); cluster/README.md, 'Token authentication'")
REACH_HELP = ("start the cluster first, or check the head's address and its GCS port (`ray start --head --port`, "
              "6379 by default); cluster/local_cluster.sh start prints it on its last line, and "
              "`eval \"$(cluster/local_cluster.sh env)\"` sets it with the token (then --address auto)")


class ClusterError(XferError):
    """The cluster cannot run the sweep: nothing answers at --address, its token is missing or wrong, or one
    trial asks for more than any of its nodes has."""


def check_cluster(options, request=None, resume=None) -> None:
    """Before any data work: with --address (or RAY_ADDRESS), a Ray GCS answers there and accepts this
    process's token; then one trial of the sweep (`request`, or the sweep in the folder `resume`) fits some
    node of that cluster, or of the local cluster start_ray would start (--num_cpus / --num_gpus, else this
    machine's). Each failure is one ClusterError line that names the case and the address as given.
    Nothing is checked when this process is already connected to Ray (start_ray keeps that connection)."""
    ray_environment()
    import ray

    if ray.is_initialized():
        return
    given = options.address or os.environ.get("RAY_ADDRESS") or None
    if given and given != "local":
        label = f"--address {options.address}" if options.address else f"RAY_ADDRESS={given}"
        nodes = cluster_nodes(given, label, auto_token=options.address in (None, "auto"))
        where = f"the Ray cluster at {label}"
        if nodes is None:  # a Ray Client address (ray://): ray.init checks it; the trial's fit, once started
            return
    else:
        nodes = [local_node(options.num_cpus, options.num_gpus)]
        flags = " ".join(f"--{k} {v}" for k, v in (("num_cpus", options.num_cpus), ("num_gpus", options.num_gpus))
                         if v is not None)
        where = f"the local Ray cluster ({flags or 'all of this machine'})"
    sw = request if request is not None else Sweep.load(Path(resume).resolve())
    check_fits(sweep_bundles(sw), nodes, where, _asked(sw), local=not given or given == "local")


def check_trial_fits(sw: Sweep) -> None:
    """Once Ray has started, before any trial: one trial of the sweep fits some live node (ray.nodes())."""
    import ray

    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    check_fits(sweep_bundles(sw), nodes, "the Ray cluster", _asked(sw))


# ------------------------------------------------------------------ the address and the token

def cluster_nodes(address: str, label: str, auto_token: bool) -> list[dict] | None:
    """The live nodes' resources of the Ray cluster at `address` (Ray's own resolution of `auto`), read
    from its GCS with this process's token as Ray 2.60 would send it. ClusterError when nothing answers
    there, when something that is not a GCS does, when the cluster wants a token this process does not
    send, or rejects the one it sends. None for a Ray Client address (ray://), which is not probed.
    label: the address as the user gave it, for messages; auto_token: ray.init's address is None or
    `auto`, where Ray sends a token it finds even without RAY_AUTH_MODE=token."""
    if address.startswith("ray://"):
        return None
    from ray._private import services

    try:
        target = services.canonicalize_bootstrap_address(address)
    except ConnectionError as e:  # auto, and no cluster found
        raise ClusterError(f"{label}: no running Ray cluster found ({_first_line(e)}); start one "
                           "(cluster/local_cluster.sh start) and `eval \"$(cluster/local_cluster.sh env)\"` "
                           "(its address and token), or give --address HOST:PORT") from None
    except ValueError as e:
        raise ClusterError(f"{label}: not a Ray cluster's address (HOST:PORT or auto): {_first_line(e)}") from None
    parsed = services.parse_address(target) if target else None
    if parsed is None or not str(parsed[1]).isdigit():
        raise ClusterError(f"{label}: not a Ray cluster's address (HOST:PORT or auto)")
    host, port = parsed[0], int(parsed[1])
    at = f"{label}" + (f" ({target})" if target != address else "")
    _probe_tcp(host, port, at)
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None  # a TLS GCS: ray.init checks the connection, check_trial_fits the resources
    return _gcs_nodes(target, at, auto_token)


def _probe_tcp(host: str, port: int, at: str) -> None:
    import socket

    try:
        socket.create_connection((host, port), timeout=CHECK_TIMEOUT_S).close()
    except socket.gaierror as e:
        raise ClusterError(f"cannot reach a Ray cluster at {at}: unknown host {host!r} ({e.strerror}); "
                           f"{REACH_HELP}") from None
    except ConnectionRefusedError:
        raise ClusterError(f"cannot reach a Ray cluster at {at}: nothing is listening there (connection refused); "
                           f"{REACH_HELP}") from None
    except (socket.timeout, TimeoutError):
        raise ClusterError(f"cannot reach a Ray cluster at {at}: no answer within {CHECK_TIMEOUT_S:g} s (a host that "
                           f"is down, not reachable from here, or behind a firewall); {REACH_HELP}") from None
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {at}: {e.strerror or e}; {REACH_HELP}") from None


def _gcs_nodes(target: str, at: str, auto_token: bool) -> list[dict]:
    """GetAllNodeInfo from the GCS at `target`: first without a token (a cluster without token
    authentication answers), then, if the GCS asks for one, with the token this process would send."""
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc

    def not_gcs(e) -> ClusterError:
        return ClusterError(f"something answers at {at} but not as a Ray 2.60 cluster's GCS ({e.code().name}: "
                            f"{_first_line(e.details())}); give the head's GCS port (`ray start --head --port`, 6379 "
                            "by default), not the dashboard's or another service's")

    opts = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 512 * 1024 * 1024)]
    with grpc.insecure_channel(target, options=opts) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)

        def call(metadata):
            return stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=CHECK_TIMEOUT_S,
                                       metadata=metadata)

        try:
            reply = call(None)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise not_gcs(e) from None
            token, source, missing = client_token(auto_token)
            if missing:
                raise ClusterError(f"the Ray cluster at {at} requires a token and this process sends none "
                                   f"({missing}); {TOKEN_HELP}") from None
            try:
                reply = call((("authorization", f"Bearer {token}"),))
            except grpc.RpcError as e2:
                if e2.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise ClusterError(f"the Ray cluster at {at} rejected this process's token (from {source}): it is "
                                       f"not the token the cluster was started with; {TOKEN_HELP}") from None
                raise not_gcs(e2) from None
    return [dict(n.resources_total) for n in reply.node_info_list if n.state == gcs_pb2.GcsNodeInfo.ALIVE]


def client_token(auto: bool) -> tuple[str, str, str]:
    """(token, where it comes from, why none is sent: "" when one is) for this process, by Ray 2.60's
    rules: the token is RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; it is
    sent with RAY_AUTH_MODE=token, or, when ray.init's address is None or `auto` (`auto`), with
    RAY_AUTH_MODE unset and a token found."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        source = "RAY_AUTH_TOKEN"
    elif path:
        source = f"RAY_AUTH_TOKEN_PATH={path}"
    else:
        source = (f"{Path.home() / '.ray' / 'auth_token'}, Ray's default token file (neither RAY_AUTH_TOKEN nor "
                  "RAY_AUTH_TOKEN_PATH is set)")
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # this process's environment as it is now
    try:
        header = loader.get_token_for_http_header(ignore_auth_mode=True)
    except AuthenticationError:
        return "", source, f"RAY_AUTH_TOKEN_PATH={path}: no such file, unreadable or empty"
    finally:
        loader.reset_cache()
    token = (header or {}).get("authorization", "").removeprefix("Bearer ").strip()
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and auto and token:
        mode = "token"
    if (mode or "").lower() != "token":
        why = "RAY_AUTH_MODE is not set" if mode is None else f"RAY_AUTH_MODE is {mode!r}, not 'token'"
        return token, source, why + (f", so the token in {source.split(',')[0]} is not sent" if token else "")
    if not token:
        return "", source, ("RAY_AUTH_MODE=token, but neither RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH nor "
                            "~/.ray/auth_token holds a token")
    return token, source, ""


def _first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ------------------------------------------------------------------ one trial against the nodes

def worker_resources(cpus_per_trial: float, gpus_per_trial: float, num_workers: int) -> dict:
    """Each Ray Train worker's resources in a TorchTrainer trial: the trial's share split between its workers."""
    per_worker = {"CPU": max(0.01, cpus_per_trial / num_workers - TRIAL_CPU)}
    if gpus_per_trial > 0:
        per_worker["GPU"] = gpus_per_trial / num_workers
    return per_worker


def trial_bundles(cpus_per_trial: float, gpus_per_trial: float, num_workers: int, torch: bool) -> list[dict]:
    """What one trial holds while it runs, as Ray bundles (tune.tuner.make_trainable): the Tune trial's CPU
    and GPU share (the fast path, a population); or, for a TorchTrainer trial, the Tune trial's TRIAL_CPU
    and one bundle per Ray Train worker (Ray Train's placement group, strategy PACK: the workers may
    spread over nodes, each worker whole on one)."""
    if not torch:
        return [{k: float(v) for k, v in (("CPU", cpus_per_trial), ("GPU", gpus_per_trial)) if v > 0}]
    if num_workers < 1:
        raise ConfigError("num_workers", f"must be >= 1, got {num_workers}")
    return [{"CPU": TRIAL_CPU}] + [worker_resources(cpus_per_trial, gpus_per_trial, num_workers)] * num_workers


def _is_torch(sw) -> bool:
    """Whether `sw` (a Sweep, or a SweepRequest before its trainer is picked) runs TorchTrainer trials, as
    tune.tuner.make_trainable decides."""
    if sw.population > 1:
        return False
    trainer = sw.trainer
    if not isinstance(sw, Sweep):
        from .configure import _pick_trainer

        trainer = _pick_trainer(sw.trainer, sw.num_workers)
    return trainer != "function"


def sweep_bundles(sw) -> list[dict]:
    """One trial's bundles for a Sweep or a SweepRequest."""
    return trial_bundles(sw.cpus_per_trial, sw.gpus_per_trial, sw.num_workers, _is_torch(sw))


def _asked(sw) -> str:
    flags = f"--cpus_per_trial {sw.cpus_per_trial:g}, --gpus_per_trial {sw.gpus_per_trial:g}"
    return flags + (f", --num_workers {sw.num_workers}" if _is_torch(sw) else "")


def placeable(bundles: list[dict], nodes: list[dict], budget: int = 20000) -> bool:
    """Whether all the bundles can be held at once, each whole on one node, a node holding several (a
    depth-first search, the largest bundles first, nodes with the same room tried once). True when the
    search runs out of `budget` steps: the check never refuses a sweep Ray might run."""
    keys = sorted({k for b in bundles for k in b})
    if any(sum(b.get(k, 0.0) for b in bundles) > sum(float(n.get(k, 0.0)) for n in nodes) + 1e-6 for k in keys):
        return False  # more than all the nodes together have
    order = sorted(bundles, key=lambda b: tuple(b.get(k, 0.0) for k in ("GPU", "CPU", *keys)), reverse=True)
    room = [{k: float(n.get(k, 0.0)) for k in keys} for n in nodes]
    steps = [budget]

    def place(i: int) -> bool:
        if i == len(order):
            return True
        steps[0] -= 1
        if steps[0] < 0:
            return True
        tried = set()
        for r in room:
            shape = tuple(round(r[k], 6) for k in keys)
            if shape in tried or any(r[k] + 1e-6 < v for k, v in order[i].items()):
                continue
            tried.add(shape)
            for k, v in order[i].items():
                r[k] -= v
            ok = place(i + 1)
            for k, v in order[i].items():
                r[k] += v
            if ok:
                return True
        return False

    return place(0)


def check_fits(bundles: list[dict], nodes: list[dict], where: str, asked: str, local: bool = False) -> None:
    """ClusterError (one line: what a trial needs, what the nodes have) when the bundles of one trial
    cannot be placed on `nodes`; skipped with XFER_SKIP_RESOURCE_CHECK=1. local: the nodes are the local
    cluster start_ray would start."""
    if os.environ.get(SKIP_RESOURCE_CHECK) == "1" or placeable(bundles, nodes):
        return
    fix = ("give the local cluster more (--num_cpus, --num_gpus) or ask for less per trial" if local else
           f"ask for less per trial, or add nodes that have it ({SKIP_RESOURCE_CHECK}=1 skips this check, "
           "for a cluster whose nodes join on demand)")
    raise ClusterError(f"one trial cannot run on {where}: it needs {need_text(bundles)} ({asked}), and "
                       f"{nodes_text(nodes, bundles)}; {fix}")


def _amount(key: str, v: float) -> str:
    if v == math.inf:
        return f"? {key}"
    if key in ("memory", "object_store_memory"):
        return f"{v / 2 ** 30:.3g} GiB {key}"
    return f"{v:g} {key}"


def resources_text(res: dict, keys=("CPU", "GPU")) -> str:
    """"2 CPU, 1 GPU": the given keys always, any other key of `res` only when it is positive."""
    shown = list(keys) + sorted(k for k, v in res.items() if k not in keys and v > 0)
    return ", ".join(_amount(k, float(res.get(k, 0.0))) for k in shown) or "nothing"


def need_text(bundles: list[dict]) -> str:
    if len(bundles) == 1:
        return f"{resources_text(bundles[0], keys=())} on one node"
    n = len(bundles) - 1
    return (f"{resources_text(bundles[0], keys=())} for the trial and {n} Ray Train worker{'s' if n > 1 else ''} "
            f"of {resources_text(bundles[1], keys=())} each")


def nodes_text(nodes: list[dict], bundles: list[dict] = ()) -> str:
    """What the nodes have, identical nodes counted once: "its 3 nodes have 2 x (1 CPU, 0 GPU), 1 x (...)"."""
    if not nodes:
        return "it has no live node"
    keys = ("CPU", "GPU") + tuple(sorted({k for b in bundles for k in b} - {"CPU", "GPU"}))
    groups: dict[str, int] = {}
    for n in nodes:
        text = resources_text({k: n.get(k, 0.0) for k in keys}, keys)
        groups[text] = groups.get(text, 0) + 1
    if len(nodes) == 1:
        return f"its one node has {next(iter(groups))}"
    return f"its {len(nodes)} nodes have " + ", ".join(f"{c} x ({t})" for t, c in groups.items())


def local_node(num_cpus: int | None, num_gpus: int | None) -> dict:
    """The resources of the one node of the local cluster start_ray would start: --num_cpus / --num_gpus,
    else what Ray detects (inf where detection fails: the check after Ray starts has the real number)."""
    node = {"CPU": float(num_cpus) if num_cpus is not None else math.inf,
            "GPU": float(num_gpus) if num_gpus is not None else math.inf}
    try:
        if num_cpus is None:
            from ray._private.utils import get_num_cpus

            node["CPU"] = float(get_num_cpus())
        if num_gpus is None:
            from ray._private import accelerators

            gpus = accelerators.get_accelerator_manager_for_resource("GPU")
            n = gpus.get_current_node_num_accelerators()
            visible = gpus.get_current_process_visible_accelerator_ids()
            node["GPU"] = float(min(n, len(visible)) if visible is not None else n)
    except Exception as e:  # noqa: BLE001 - Ray's private detection: never a reason to refuse a sweep
        logging.getLogger(__name__).debug("local resources not detected: %s", e)
    return node
