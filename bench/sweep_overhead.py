"""Issue 15, item 4: where a sweep's orchestration overhead goes on the 2-core machine.

    python bench/bench_overhead.py [--size small] [--n_trials 8] [--epochs 10] [--json out.json]
                                   [--snapshot_s 1]

Runs the sweep of "Sweep orchestration" (bench_tune.py's settings: `xfer tune`, function
fast path, 2 slots) and splits its slot-time, Tuner.fit wall x slots, from the trials'
result.json (every epoch's report) into:

  compute      the loop's own epochs (`epoch_seconds`: steps + validation)
  startup      trial start -> first report, less that epoch (actor, imports, data from the
               node cache)
  reporting    per epoch: Tune's `time_this_iter_s` - `epoch_seconds` - `checkpoint_seconds`
               (the report call and the loop's bookkeeping between epochs)
  checkpoints  `checkpoint_seconds` (build + torch.save; their upload is in `reporting`)
  idle slots   slot-time no trial ran: before the first trial, gaps between trials, the ASHA
               tail (fewer trials left than slots), and after the last trial until fit returns

and samples the CPU time of every process (from /proc) while the sweep runs, grouped as the
trials, the driver (Tune's controller, the searcher, snapshots), and Ray's own processes
(GCS, raylet, dashboard and its agents, log monitor): what competes with the trials for the
two cores. `--snapshot_s` sets TUNE_GLOBAL_CHECKPOINT_S (how often the driver snapshots the
sweep; `xfer tune` uses 1 s for an exact resume).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_tune import FIX  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
GROUPS = (("trials", ("ray::XferTrial", "ray::ImplicitFunc", "ray::_Inner", "ray::IDLE")),
          ("ray", ("raylet", "gcs_server", "dashboard", "DashboardAgent", "runtime_env", "log_monitor",
                   "monitor.py", "ray::", "default_worker")))


def _procs() -> dict[int, tuple[str, float]]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d.name)] = (cmd, (int(fields[11]) + int(fields[12])) / TICK)
    return out


class CpuSampler(threading.Thread):
    """The CPU seconds each process used since the sampler started (its last sample)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.base = {pid: t for pid, (_, t) in _procs().items()}
        self.seen: dict[int, tuple[str, float]] = {}
        self.stop_ = threading.Event()

    def run(self):
        while not self.stop_.is_set():
            for pid, (cmd, t) in _procs().items():
                known = self.seen.get(pid, ("", 0.0))[0]  # an exited process (a zombie) has no command line
                self.seen[pid] = (cmd or known, t - self.base.get(pid, 0.0))
            time.sleep(0.25)

    def grouped(self, driver_pid: int) -> dict[str, float]:
        g = {"trials": 0.0, "driver": 0.0, "ray": 0.0, "other": 0.0}
        self.other: dict[str, float] = {}
        for pid, (cmd, t) in self.seen.items():
            if pid == driver_pid or "xfer.cli tune" in cmd:
                g["driver"] += t
                continue
            for name, keys in GROUPS:
                if any(k in cmd for k in keys):
                    g[name] += t
                    break
            else:
                if "bench_overhead" not in cmd and t > 0:
                    g["other"] += t
                    self.other[cmd[:120]] = self.other.get(cmd[:120], 0.0) + t
        return g


def breakdown(results: Path, fit_wall: float, slots: int) -> dict:
    trials = []
    for f in sorted(results.rglob("result.json")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not rows:
            continue
        end = rows[-1]["timestamp"]
        start = end - rows[-1]["time_total_s"]
        compute = sum(r.get("epoch_seconds", 0.0) for r in rows)
        ckpt = sum(r.get("checkpoint_seconds", 0.0) for r in rows)
        startup = rows[0]["time_this_iter_s"] - rows[0].get("epoch_seconds", 0.0) - rows[0].get("checkpoint_seconds", 0.0)
        reporting = sum(r["time_this_iter_s"] - r.get("epoch_seconds", 0.0) - r.get("checkpoint_seconds", 0.0)
                        for r in rows[1:])
        trials.append({"start": start, "end": end, "epochs": rows[-1]["epoch"], "compute_s": compute,
                       "checkpoint_s": ckpt, "startup_s": startup, "reporting_s": reporting,
                       "wall_s": rows[-1]["time_total_s"]})
    t0 = min(t["start"] for t in trials)
    t_end = max(t["end"] for t in trials)
    # idle slot-seconds on a fine grid: before the first trial is not seen here (fit's start is not in
    # result.json), so it is what fit's wall leaves over once the trials' span is accounted for
    step, busy_idle, tail = 0.01, 0.0, 0.0
    last_start = max(t["start"] for t in trials)
    x = t0
    while x < t_end:
        running = sum(t["start"] <= x < t["end"] for t in trials)
        free = max(0, slots - running) * step
        if x >= last_start:
            tail += free
        else:
            busy_idle += free
        x += step
    span = t_end - t0
    outside = max(0.0, fit_wall - span) * slots
    # fit's start: Tune writes tuner.pkl when fit starts the experiment
    pkl = next(results.glob("*/tuner.pkl"), None)
    before = min(outside, max(0.0, t0 - pkl.stat().st_mtime) * slots) if pkl else None
    total = fit_wall * slots
    parts = {"compute": sum(t["compute_s"] for t in trials), "startup": sum(t["startup_s"] for t in trials),
             "reporting": sum(t["reporting_s"] for t in trials), "checkpoints": sum(t["checkpoint_s"] for t in trials),
             "idle: gaps between trials": busy_idle, "idle: ASHA tail": tail}
    if before is None:
        parts["idle: before the first trial and after the last"] = outside
    else:
        parts["idle: before the first trial"] = before
        parts["idle: after the last trial"] = outside - before
    parts["unaccounted"] = total - sum(parts.values())
    return {"slot_seconds": total, "parts": parts, "n_trials": len(trials),
            "epochs": sum(t["epochs"] for t in trials), "trials": trials}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--n_trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--num_cpus", type=int, default=2)
    ap.add_argument("--snapshot_s", default="1")
    ap.add_argument("--json")
    a = ap.parse_args()
    from xfer.data.simulate import simulate_pair
    from xfer.data.store import CellStore

    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    store = CellStore(str(work / "store"))
    for line in simulate_pair(a.size, seed=0):
        for ds in (line.gex, line.peak):
            store.write(ds)
    out = work / "sweep"
    cmd = [sys.executable, "-m", "xfer.cli", "tune", "--store", str(work / "store"), "--src_csv", "store:simA_GEX",
           "--tgt_csv", "store:simA_PEAK", "--n_trials", str(a.n_trials), "--space", "broad", "--search_epochs", str(a.epochs),
           "--num_cpus", str(a.num_cpus), "--output_folder", str(out), *FIX]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNE_GLOBAL_CHECKPOINT_S": a.snapshot_s}
    sampler = CpuSampler()
    sampler.start()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop_.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(stderr[-3000:])
    m = re.search(r"trials in ([0-9.]+) s", stdout)
    fit_wall = float(m.group(1))
    res = breakdown(out / "ray_results", fit_wall, a.num_cpus)
    res.update({"command_wall_s": wall, "fit_wall_s": fit_wall, "cpu_seconds": sampler.grouped(proc.pid),
                "cpu_other_top": dict(sorted(sampler.other.items(), key=lambda kv: -kv[1])[:8]),
                "settings": {**vars(a), "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
                             "date": time.strftime("%Y-%m-%d")}})
    p = res["parts"]
    print(f"Tuner.fit {fit_wall:.1f} s x {a.num_cpus} slots = {res['slot_seconds']:.1f} slot-s; "
          f"{res['n_trials']} trials, {res['epochs']} epochs; overhead over compute/slots: "
          f"{fit_wall / (p['compute'] / a.num_cpus) - 1:+.0%}")
    for k, v in p.items():
        print(f"  {k:48s} {v:7.1f} slot-s  {v / res['slot_seconds']:6.1%}")
    print("CPU seconds during the command: " + ", ".join(f"{k} {v:.1f}" for k, v in res["cpu_seconds"].items())
          + f" (of {wall * (os.cpu_count() or 2):.1f} available)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
