"""`xfer tune` on one GPU: what orchestration costs, and how many trials a GPU should hold (issue 15).

Run by bench/gpu_sweep.sh (which brings Ray, Optuna and the rest onto PYTHONPATH first):

    python -m bench.gpu_sweep --out DIR [--size research] [--n_trials 12] [--epochs 20]
                              [--shares 1,plain,0.25,0.125,0.5] [--budget_s 330] [--cpu]

1. Simulates the training line (A_GEX, A_PEAK) of a pair (`research` size: 7,432 cells, 28,105 genes,
   92,328 peaks; the test line, unused here, is cut to 256 cells unless --full_pair) and writes
   it into a store.
2. Prepares the trial data into the node cache that every sweep's driver and trials then read
   (the default 5 % peak filter; both choices of the searched bin_size), so that no sweep pays
   for preparing data the one before it prepared.
3. For each share g in --shares: `xfer tune --gpus_per_trial g` (1/g trials per GPU) with the
   same trials, epochs, seed and space, fixed batch_size=256 (--set), on the training line only
   (objective source_val, ASHA), as bench.orchestration_cost's sweep: the command's wall time and
   `Tuner.fit`'s alone, the trials' own compute (the sum of every trial's epoch_seconds,
   bench.harness.sweeps.sweep_figures), the ideal wall = compute / concurrent slots, per-trial start-up,
   epochs per second; per trial its process's torch.cuda.max_memory_allocated (a wrapper around
   tune.trainable.function_trial: the sweep is otherwise exactly `xfer tune`) and the most GPU
   memory nvidia-smi saw that process use; the GPU's utilisation and memory (nvidia-smi every
   500 ms) over the step. `plain` in --shares: bench.harness.sweeps.plain_optuna, a sequential Optuna loop
   (TPE + MedianPruner) in one process over the same data (read from the same cache), space and
   epochs, no Ray.
4. Writes DIR/gpu_sweep.json after every step (a time-out keeps what was measured). A step starts
   only if the longest step so far fits in what is left of --budget_s, and is stopped at it.

--prepare_only --work W: steps 1-2 alone, into W; a later run with --work W and the same settings
reuses them (gpu_sweep.sh prepares while the GPU runs the epoch benchmark).

The original research sweep (issue 24: research-sized, 100 trials x 50 epochs, the architecture and
divergence fixed), populations against today's sweep and the sequential Optuna loop of the same
trials, in one device call:

    bash bench/gpu_sweep.sh --n_trials 100 --epochs 50 --shares pop50,plain,0.125 \
        --set batch_size=256 --set arch=dae --set divergence=mmd

where one call's time cannot hold all three, cut --epochs the same for all (the script's budget
skips a step that cannot finish; say so with the figures).

--cpu (XFER_GPU_SWEEP_CPU=1 in gpu_sweep.sh): no GPU; each share g becomes g x --num_cpus CPUs
per trial (the same 1/g concurrency), tiny sizes, orchestration_cost's fixed small model; to test the script
end to end on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import TRAIN, data_flags, fit_seconds, run, simulate_into_store
from bench.harness.sweeps import SMALL_MODEL, plain_optuna, set_flags, slot_breakdown, sweep_figures

MEM_ENV = "XFER_GPU_SWEEP_MEM"


# ----------------------------------------------------------------------------- `xfer tune`, measured

def measured_trial(params, **kw):
    """tune.trainable.function_trial, recording this trial's peak GPU memory to $XFER_GPU_SWEEP_MEM.
    Pickled by value into each trial actor, where `tune.trainable` is the unpatched module."""
    import json as _json
    import os as _os
    import time as _time

    import torch as _torch
    from ray import tune as _rt

    from tune.trainable import function_trial

    cuda = _torch.cuda.is_available() and _torch.cuda.is_initialized()
    if cuda:
        _torch.cuda.reset_peak_memory_stats()
    rec = {"trial_id": _rt.get_context().get_trial_id(), "pid": _os.getpid(), "start": _time.time()}
    try:
        function_trial(params, **kw)
    finally:
        rec["end"] = _time.time()
        if _torch.cuda.is_available() and _torch.cuda.is_initialized():
            rec["max_allocated_mib"] = _torch.cuda.max_memory_allocated() / 2**20
            rec["max_reserved_mib"] = _torch.cuda.max_memory_reserved() / 2**20
        path = _os.environ.get(MEM_ENV)
        if path:
            with open(path, "a") as f:
                f.write(_json.dumps(rec) + "\n")


def xfer_tune(argv: list[str]) -> int:
    """`xfer tune ARGV` with measured_trial in place of the fast path's trial function."""
    import tune.trainable

    from xfer.cli import main

    tune.trainable.function_trial = measured_trial  # tune.tuner.make_trainable imports it at call time
    return main(["tune", *argv])


# ----------------------------------------------------------------------------- nvidia-smi

class Smi:
    """nvidia-smi writing a sample every 500 ms into two CSV files (device; per process)."""

    def __init__(self, out: Path):
        self.files = {"gpu": out / "smi_gpu.csv", "apps": out / "smi_apps.csv"}
        self.procs = []
        if not shutil.which("nvidia-smi"):
            return
        q = {"gpu": "--query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used,power.draw",
             "apps": "--query-compute-apps=timestamp,pid,used_memory"}
        for k, query in q.items():
            self.procs.append(subprocess.Popen(["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "500",
                                                "-f", str(self.files[k])], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()

    def figures(self, run: dict) -> None:
        """(Re)compute a run's nvidia-smi figures from the files: after each step, and once more
        after nvidia-smi has stopped (in case it had not written every sample yet)."""
        if "window" not in run:
            return
        run["gpu"] = self.window(*run["window"])
        for t in run.get("trials", []):
            if "pid" in t and "start" in t and "end" in t:
                t["smi_process_max_mib"] = self.process_memory(t["pid"], t["start"], t["end"])
        vals = [t["smi_process_max_mib"] for t in run.get("trials", []) if t.get("smi_process_max_mib") is not None]
        run["smi_process_max_mib_per_trial"] = {"median": statistics.median(vals), "max": max(vals)} if vals else None

    @staticmethod
    def _rows(path: Path):
        if not path.exists():
            return []
        rows = []
        for r in csv.reader(path.read_text().splitlines()):
            try:
                t = dt.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((t, [x.strip() for x in r[1:]]))
            except (ValueError, IndexError):
                continue
        return rows

    def window(self, t0: float, t1: float) -> dict | None:
        """The device's utilisation and memory between t0 and t1."""
        rows = [v for t, v in self._rows(self.files["gpu"]) if t0 <= t <= t1]
        if not rows:
            return None
        num = [[_num(x) for x in v] for v in rows]
        util = [r[0] for r in num if r[0] is not None]
        mem = [r[2] for r in num if r[2] is not None]
        return {"samples": len(rows), "util_mean_pct": statistics.mean(util) if util else None,
                "util_median_pct": statistics.median(util) if util else None,
                "util_max_pct": max(util) if util else None,
                "memory_used_max_mib": max(mem) if mem else None,
                "memory_used_mean_mib": statistics.mean(mem) if mem else None}

    def process_memory(self, pid: int, t0: float, t1: float) -> float | None:
        """The largest GPU memory nvidia-smi saw the process use between t0 and t1 (MiB)."""
        vals = [_num(v[1]) for t, v in self._rows(self.files["apps"])
                if t0 <= t <= t1 and len(v) >= 2 and _num(v[0]) == pid]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- steps

def simulate(size: str, store: Path, full_pair: bool) -> dict:
    """The pair's training line (A) into the store. The sweeps read only that line, so unless
    full_pair the test line is cut to one chunk of 256 cells: the training line is the same, cell
    for cell (the simulator draws each line from its own streams), in about half the time."""
    info = simulate_into_store(store, size, seed=0, lines="A", test_cells=None if full_pair else 256)
    return {"size": size, "cells": info["cells"][0], "test_line_cells_simulated": info["cells"][1],
            "genes": info["genes"], "peaks": info["peaks"], "simulate_s": info["simulate_s"],
            "store_write_s": info["store_write_s"]}


def warm_cache(store: Path, epochs: int, fixed: dict) -> dict:
    """Prepare the sweep's trial data once into the node cache that every later driver and trial
    reads: the DataSpec and data settings `xfer tune` builds, for each choice of the searched
    input setting bin_size (else the first sweep alone would prepare a variant inside a trial)."""
    from tune.data import DataSpec, load_trial_data
    from tune.space import BROAD_SPACE
    from xfer.config import TrainConfig
    from xfer.data.store import CellStore

    s = CellStore(str(store.resolve()))
    spec = DataSpec(store=s.root.uri, src=TRAIN[0], tgt=TRAIN[1], src_hash=s.manifest(TRAIN[0]).content_hash,
                    tgt_hash=s.manifest(TRAIN[1]).content_hash)
    bins = BROAD_SPACE.get("bin_size")
    variants = [{"bin_size": v} for v in bins["choices"]] if isinstance(bins, dict) and "bin_size" not in fixed \
        else [{}]
    res = {"prepare_s": 0.0, "variants": []}
    for v in variants:
        t = time.perf_counter()
        data = load_trial_data(spec, TrainConfig.from_dict({"epochs": epochs, **fixed, **v}))
        secs = time.perf_counter() - t
        peaks = getattr(getattr(data, "line", None), "peaks", None)
        res["variants"].append({**v, "prepare_s": secs, "peak_input_shape": list(getattr(peaks, "shape", []))})
        res["prepare_s"] += secs
    return res


def run_sweep(store: Path, work: Path, out: Path, args, share: float, smi: Smi, timeout: float,
              population: int = 1) -> dict:
    """One `xfer tune` (measured) with 1/share trials per GPU (or per --num_cpus CPUs with --cpu);
    population > 1: `xfer tune --population P`, each trial a population of P members."""
    tag = f"g{share:g}" if population == 1 else f"pop{population}"
    sweep_out = work / tag
    shutil.rmtree(sweep_out, ignore_errors=True)
    mem_file = work / f"{tag}_memory.jsonl"
    mem_file.unlink(missing_ok=True)
    if args.cpu:
        res = ["--num_gpus", "0", "--gpus_per_trial", "0", "--cpus_per_trial", f"{share * args.num_cpus:g}"]
    else:
        res = ["--num_gpus", "1", "--gpus_per_trial", f"{share:g}", "--cpus_per_trial", f"{args.cpus_per_trial:g}"]
    argv = [*data_flags(store, test=False), "--n_trials", str(args.n_trials), "--space", "broad",
            "--search_epochs", str(args.epochs), "--num_cpus", str(args.num_cpus), *res,
            *(["--checkpoint_every", str(args.checkpoint_every)] if args.checkpoint_every is not None else []),
            "--output_folder", str(sweep_out), "--name", tag, "--progress_every", "10", *set_flags(args.fixed),
            *(["--population", str(population)] if population > 1 else [])]
    cmd = [sys.executable, "-m", "bench.gpu_sweep", "_xfer_tune", *argv]
    t0w = time.time()
    ran = run(cmd, env={**os.environ, MEM_ENV: str(mem_file)}, timeout=max(1.0, timeout), check=False)
    rc, stdout, stderr, wall = ran.returncode, ran.stdout, ran.stderr, ran.seconds
    t1w = time.time()
    with open(out / "sweeps.log", "a") as f:
        f.write(f"\n===== xfer tune {' '.join(argv)}\n--- rc {rc}, {wall:.1f} s\n--- stdout\n{stdout[-60000:]}"
                f"\n--- stderr\n{stderr[-60000:]}\n")
    res_d = {"share": share, "trials_per_device": round(1 / share), "population": population,
             "command": "xfer tune " + " ".join(argv), "rc": rc, "wall_s": wall}
    if rc != 0:
        res_d["error"] = (stderr or stdout)[-2000:]
        try:  # what the trials reported before the failure or time-out
            res_d["partial"] = sweep_figures(sweep_out)
        except Exception:  # noqa: BLE001 - no trial reported
            pass
        return res_d
    f = sweep_figures(sweep_out)
    f["sweep_wall_s"] = fit_seconds(stdout)
    f["dashboard"] = "Ray dashboard: http" in (stdout + stderr)
    slots = min(round(1 / share), -(-args.n_trials // population))
    if population > 1:  # members, their epochs and their statuses (trials.csv: one row per member)
        import pandas as pd

        df = pd.read_csv(sweep_out / "trials.csv")
        f["members"], f["member_epochs"] = int(len(df)), int(df["epochs_run"].sum())
        f["statuses"] = df["status"].value_counts().to_dict()
        f["best_objective"] = float(df["best_objective"].max())
    f["slots"] = slots
    f["ideal_wall_s"] = f["compute_s"] / slots
    if f["sweep_wall_s"]:
        f["fit_vs_compute"] = f["sweep_wall_s"] / f["compute_s"]
        f["overhead_vs_ideal"] = f["sweep_wall_s"] / f["ideal_wall_s"] - 1
        f["epochs_per_s"] = f["epochs_total"] / f["sweep_wall_s"]
    f["epoch_s_median"] = _median_epoch(sweep_out)
    if f["sweep_wall_s"]:  # Tuner.fit's slot-time split as sweep_overhead splits it (from every epoch's report)
        b = slot_breakdown(sweep_out / "ray_results", f["sweep_wall_s"], slots)
        f["slot_time"] = {"slot_seconds": b["slot_seconds"], "parts": b["parts"]}
    # per trial: torch's peak and what nvidia-smi saw of its process
    mem = {}
    if mem_file.exists():
        for line in mem_file.read_text().splitlines():
            rec = json.loads(line)
            mem[rec["trial_id"]] = rec
    for t, rid in zip(f["trials"], _trial_ids(sweep_out)):
        t["trial_id"] = rid
        t.update({k: v for k, v in mem.get(rid, {}).items() if k not in ("trial_id",)})
    alloc = [t["max_allocated_mib"] for t in f["trials"] if t.get("max_allocated_mib") is not None]
    f["max_allocated_mib_per_trial"] = {"median": statistics.median(alloc), "max": max(alloc)} if alloc else None
    f["window"] = [t0w, t1w]
    for ck in [p for p in (sweep_out / "ray_results").rglob("checkpoint_*") if p.is_dir()]:
        shutil.rmtree(ck, ignore_errors=True)  # up to 4 per trial, tens of MB each at seed size
    res_d.update(f)
    smi.figures(res_d)
    return res_d


def _trial_ids(sweep_out: Path) -> list[str]:
    """Trial ids in sweep_figures' order (sorted result.json paths; the trial folder is its id)."""
    return [p.parent.name for p in sorted((sweep_out / "ray_results").rglob("result.json"))
            if p.read_text().strip()]


def _median_epoch(sweep_out: Path) -> float | None:
    vals = []
    for res in (sweep_out / "ray_results").rglob("result.json"):
        vals += [json.loads(x).get("epoch_seconds") for x in res.read_text().splitlines() if x.strip()]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def plain_loop(store: str, epochs: int, n_trials: int, fixed: dict) -> dict:
    """harness.sweeps.plain_optuna over the same data, space (the same fixed keys) and epochs; run in a
    process of its own (python -m bench.gpu_sweep _plain ...) so that its GPU memory is gone afterwards."""
    import torch

    import tune.data

    cuda = torch.cuda.is_available()
    prepare, timed = tune.data.prepare_from_store, {}

    def cached_prepare(spec, cfg):
        """plain_optuna prepares the data itself (prepare_from_store) inside its wall_s: read the
        node cache the sweeps read instead (the same data), and time it apart."""
        t = time.perf_counter()
        tune.data.prepare_from_store = prepare  # a cache miss prepares for real
        try:
            return tune.data.load_trial_data(spec, cfg)
        finally:
            tune.data.prepare_from_store = cached_prepare
            timed["prepare_s"] = time.perf_counter() - t
    tune.data.prepare_from_store = cached_prepare
    r = plain_optuna(Path(store), epochs, n_trials, fixed)
    r["prepare_s"] = timed.get("prepare_s")
    r["loop_s"] = r["wall_s"] - (r["prepare_s"] or 0.0)   # the trials alone, as Tuner.fit for a sweep
    r["loop_vs_compute"] = r["loop_s"] / r["compute_s"] if r["compute_s"] else None
    if cuda:
        r["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        r["max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return r


def run_plain(store: Path, out: Path, args, timeout: float, smi: Smi) -> dict:
    cmd = [sys.executable, "-m", "bench.gpu_sweep", "_plain", str(store), str(args.epochs), str(args.n_trials),
           json.dumps(args.fixed)]
    t0w, t0 = time.time(), time.perf_counter()
    ran = run(cmd, timeout=max(1.0, timeout), check=False)
    rc, stdout, stderr = ran.returncode, ran.stdout, ran.stderr
    with open(out / "sweeps.log", "a") as f:
        f.write(f"\n===== plain Optuna loop\n--- rc {rc}, {time.perf_counter() - t0:.1f} s\n--- stdout\n"
                f"{stdout[-20000:]}\n--- stderr\n{stderr[-20000:]}\n")
    if rc != 0:
        return {"rc": rc, "error": (stderr or stdout)[-2000:]}
    r = json.loads(stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    r["window"] = [t0w, time.time()]
    smi.figures(r)
    return r


# ----------------------------------------------------------------------------- main

def summary(res: dict) -> str:
    lines = [f"{'run':>10s} {'trials':>6s} {'command s':>9s} {'fit s':>7s} {'compute s':>9s} {'slots':>5s} "
             f"{'ideal s':>7s} {'fit/ideal':>9s} {'epochs/s':>8s} {'GPU util %':>10s} {'GPU MiB':>8s} {'torch MiB':>9s}"]
    for key, r in res["runs"].items():
        if "error" in r:
            lines.append(f"{key:>10s} error: {r['error'][-300:]!r}")
        elif key == "plain":
            g = r.get("gpu") or {}
            lines.append(f"{key:>10s} {r['n_trials']:6d} {r['process_s']:9.1f} {r['loop_s']:7.1f} {r['compute_s']:9.1f} "
                         f"{1:5d} {r['compute_s']:7.1f} {r['loop_vs_compute']:9.2f} {'':>8s} "
                         f"{g.get('util_mean_pct') or 0:10.0f} {g.get('memory_used_max_mib') or 0:8.0f} "
                         f"{r.get('max_allocated_mib') or 0:9.0f}")
        else:
            g = r.get("gpu") or {}
            a = r.get("max_allocated_mib_per_trial") or {}
            lines.append(f"{key:>10s} {r['n_trials']:6d} {r['wall_s']:9.1f} {r['sweep_wall_s'] or 0:7.1f} "
                         f"{r['compute_s']:9.1f} {r['slots']:5d} {r['ideal_wall_s']:7.1f} "
                         f"{r.get('overhead_vs_ideal', 0) + 1:9.2f} {r.get('epochs_per_s', 0):8.1f} "
                         f"{g.get('util_mean_pct') or 0:10.0f} {g.get('memory_used_max_mib') or 0:8.0f} "
                         f"{a.get('max') or 0:9.0f}")
    for key, r in res["runs"].items():
        st = r.get("slot_time")
        if st:
            lines.append(f"{key}: slot-time {st['slot_seconds']:.1f} s = " + ", ".join(
                f"{k} {100 * v / st['slot_seconds']:.0f} %" for k, v in st["parts"].items()))
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_xfer_tune":
        return xfer_tune(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        store, epochs, n_trials, fixed = sys.argv[2:6]
        print(json.dumps(plain_loop(store, int(epochs), int(n_trials), json.loads(fixed))))
        return 0
    cpu_default = os.environ.get("XFER_GPU_SWEEP_CPU") == "1"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu", action="store_true", default=cpu_default, help="no GPU: tiny sizes, shares of the CPUs")
    ap.add_argument("--size", help="simulated size (default research; tiny with --cpu)")
    ap.add_argument("--n_trials", type=int, help="trials per sweep (default 12; 4 with --cpu)")
    ap.add_argument("--epochs", type=int, help="epochs per trial, ASHA's max_t (default 20; 3 with --cpu)")
    ap.add_argument("--shares", default="1,plain,0.25,0.125,0.5",
                    help="GPU share per trial of each sweep, in order; `plain` = the plain Optuna loop; `popP` = "
                         "`xfer tune --population P` with one population per GPU")
    ap.add_argument("--num_cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--cpus_per_trial", type=float, default=1.0)
    ap.add_argument("--checkpoint_every", type=int, help="xfer tune --checkpoint_every (default: xfer tune's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="fixed search keys for every run (default batch_size=256; with --cpu the small model of orchestration_cost)")
    ap.add_argument("--budget_s", type=float, default=330.0,
                    help="seconds from start by which every step has ended: a step starts only if the longest step "
                         "so far still fits, and is stopped at the budget (default 330)")
    ap.add_argument("--full_pair", action="store_true",
                    help="simulate the test line in full too (unused by the sweeps; about twice the time)")
    ap.add_argument("--work", help="working folder, kept (default: a fresh temporary one, removed at the end); "
                                   "data prepared there before with the same settings is reused")
    ap.add_argument("--prepare_only", action="store_true",
                    help="simulate and prepare the data into --work, then exit (gpu_sweep.sh runs this beside the "
                         "epoch benchmark)")
    args = ap.parse_args()
    if args.prepare_only and not args.work:
        ap.error("--prepare_only needs --work (the folder the sweeps then read)")
    args.size = args.size or ("tiny" if args.cpu else "research")
    args.n_trials = args.n_trials or (4 if args.cpu else 12)
    args.epochs = args.epochs or (3 if args.cpu else 20)
    args.num_cpus = args.num_cpus or os.cpu_count() or 1
    if args.set:
        from xfer.config import parse_set

        args.fixed = parse_set(args.set)
    else:
        args.fixed = dict(SMALL_MODEL) if args.cpu else {"batch_size": 256}
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_sweep_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XFER_NODE_CACHE", str(work / "node_cache"))  # fresh cache, inherited by Ray's workers

    import torch

    res = {"machine": f"{os.cpu_count()} CPU cores", "cpu_mode": args.cpu, "python": sys.version.split()[0],
           "torch": torch.__version__, "size": args.size, "n_trials": args.n_trials, "epochs": args.epochs,
           "num_cpus": args.num_cpus, "fixed": args.fixed, "checkpoint_every": args.checkpoint_every,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}, "skipped": []}
    if torch.cuda.is_available():  # (no CUDA context in this process: nvidia-smi -L names the GPU)
        res["cuda_devices"] = torch.cuda.device_count()
    elif not args.cpu:
        raise SystemExit("gpu_sweep: no CUDA device (use --cpu / XFER_GPU_SWEEP_CPU=1 to test without one)")
    try:
        import optuna
        import ray

        res["ray"], res["optuna"] = ray.__version__, optuna.__version__
    except ImportError as e:
        raise SystemExit(f"gpu_sweep: {e} (bench/gpu_sweep.sh puts the pack of bench/pack_deps.py on PYTHONPATH)")
    out_json = out / "gpu_sweep.json"

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        out_json.write_text(json.dumps(res, indent=1, default=str))

    store = work / "store"
    data_json = work / "data.json"  # written once the store and the node cache are complete
    key = {"size": args.size, "epochs": args.epochs, "fixed": args.fixed, "full_pair": args.full_pair}
    prior = json.loads(data_json.read_text()) if data_json.exists() else None
    if prior and prior.get("key") == key:
        res["data"] = {**prior["data"], "prepared_by": "an earlier --prepare_only run (its timings)"}
        print(f"reusing the data prepared in {work}: {prior['data']}", flush=True)
    else:
        data_json.unlink(missing_ok=True)
        res["data"] = simulate(args.size, store, args.full_pair)
        print(f"simulated {res['data']}", flush=True)
        res["data"].update(warm_cache(store, args.epochs, args.fixed))
        print(f"prepared the trial data in {res['data']['prepare_s']:.1f} s", flush=True)
        tmp = data_json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "data": res["data"]}, default=str))
        tmp.replace(data_json)
    if args.prepare_only:
        print(f"gpu_sweep: data prepared in {work} ({time.perf_counter() - t_start:.0f} s)", flush=True)
        return 0
    save()
    smi = Smi(out)
    steps = [s.strip() for s in args.shares.split(",") if s.strip()]
    durations = []
    try:
        for step in steps:
            elapsed = time.perf_counter() - t_start
            need = max(durations) if durations else 30.0
            left = args.budget_s - elapsed
            if need > left:
                res["skipped"].append(step)
                print(f"skipped {step}: {elapsed:.0f} s elapsed, a step needs about {need:.0f} s (the longest so far, or 30 s), budget "
                      f"{args.budget_s:.0f} s", flush=True)
                continue
            t = time.perf_counter()
            if step == "plain":
                try:
                    res["runs"]["plain"] = run_plain(store, out, args, left, smi)
                except Exception as e:  # noqa: BLE001 - keep the sweeps' figures
                    res["runs"]["plain"] = {"error": repr(e)}
            elif step.startswith("pop"):  # a population sweep: one population of P members per device
                res["runs"][step] = run_sweep(store, work, out, args, 1.0, smi, left, population=int(step[3:]))
            else:
                share = float(step)
                res["runs"][f"g{share:g}"] = run_sweep(store, work, out, args, share, smi, left)
            res["cache_files"] = sorted(p.name for p in Path(os.environ["XFER_NODE_CACHE"]).glob("*.pt"))
            durations.append(time.perf_counter() - t)
            print(f"{step}: {durations[-1]:.1f} s", flush=True)
            save()
    finally:
        smi.stop()
    for r in res["runs"].values():
        smi.figures(r)
    save()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(summary(res))
    print(f"gpu_sweep: {out_json} ({res['elapsed_s']:.0f} s)")
    return 0 if all("error" not in r for r in res["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
