"""Issue 15, item 4: where a sweep's orchestration overhead goes on the 2-core machine.

    python -m bench.sweep_overhead [--size small] [--n_trials 8] [--epochs 10] [--json out.json]
                                   [--snapshot_s 1]

Runs the sweep of "Sweep orchestration" (orchestration_cost.py's settings: `xfer tune`, function
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
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import XFER, data_flags, fit_seconds, run, simulate_into_store, write_results
from bench.harness.sweeps import SMALL_MODEL, set_flags, slot_breakdown

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
                if "sweep_overhead" not in cmd and t > 0:
                    g["other"] += t
                    self.other[cmd[:120]] = self.other.get(cmd[:120], 0.0) + t
        return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--n_trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--num_cpus", type=int, default=2)
    ap.add_argument("--snapshot_s", default="1")
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    simulate_into_store(work / "store", a.size, seed=0)
    out = work / "sweep"
    cmd = [*XFER, "tune", *data_flags(work / "store", test=False), "--n_trials", str(a.n_trials), "--space", "broad",
           "--search_epochs", str(a.epochs), "--num_cpus", str(a.num_cpus), "--output_folder", str(out),
           *set_flags(SMALL_MODEL)]
    sampler = CpuSampler()
    sampler.start()
    try:
        ran = run(cmd, env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": a.snapshot_s})
    finally:
        sampler.stop_.set()
        sampler.join()
    wall, fit_wall = ran.seconds, fit_seconds(ran.stdout)
    res = slot_breakdown(out / "ray_results", fit_wall, a.num_cpus)
    res.update({"command_wall_s": wall, "fit_wall_s": fit_wall, "cpu_seconds": sampler.grouped(ran.pid),
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
        write_results(a.json, res)


if __name__ == "__main__":
    main()
