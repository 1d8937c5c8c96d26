"""Issue 15, item 3: what ASHA saves.

    python -m bench.asha_savings run bench/_data/transfer --pairs 408 [407 403] [--n_trials 16] [--epochs 20]
    python -m bench.asha_savings report bench/results/asha_savings.json

On each evaluation pair of model_vs_plain_recipe (prepared when missing, as its `prepare` does; the test
line's expression and accessibility given, so the sweep's default objective is `transfer` =
`agreement`), two sweeps over the SAME trials:

  asha  exactly what users run: `xfer tune` (OptunaSearch TPE + ASHA, default grace period
        max(1, E // 8) and reduction factor 2, 2 concurrent trials on 2 CPUs, seed 0), n
        trials of up to E epochs.
  fifo  every trial of that sweep run for all E epochs with no scheduler: the trial's own
        parameters (ray_results/<trial>/params.json) and the sweep's base config and data
        (sweep.json) through what a trial runs (tune.trainable: `trial_config`,
        `load_trial_data`, `xfer.training.fit`, one torch thread on the CPU), minus Ray and
        checkpoint writing (which do not touch the training). Early stopping by patience is
        the trial's own (`patience` of the base config, 20, not searched) in both: a trial that
        stops itself in one stops at the same epoch in the other. A trial that ASHA let end by
        itself already ran exactly this: its curve is its own reports; every other trial runs
        again from epoch 1, two at a time.

"Objective" is the same quantity in both: a trial's `best_objective`, its best objective over
its eligible epochs (after the warm-up, or the last epoch), what trials.csv ranks. The sweep's
best-so-far at a moment is the best `best_objective` reported so far by any trial.

Measured (epochs, not seconds: the machine's load does not bias it):
  - ASHA's epochs in the order they ran: every per-epoch report of every trial, ordered by the
    driver's wall time at which Tune processed it (the TensorBoard event written in the same
    driver step as ASHA's decision; fallback: result.json's timestamp); the cumulative count
    when ASHA's best-so-far first came within 0.01 of the FIFO sweep's best, / (n x E);
  - ASHA's total epochs / (n x E), and whether ASHA's final best is the FIFO sweep's best;
  - the same for the FIFO sweep itself run in the same trial order (2 slots): the reference
    (the shipped defaults are always the first trial, so both may get there early);
  - the same with stricter targets (within 0.005, 0.0025, 0), and Spearman rho between a
    trial's objective at each epoch (what a rung there compares) and its full-budget best;
  - check: each re-run trial's FIFO curve over the epochs ASHA ran equals what the trial
    reported (CPU training is seeded and reproducible, so the difference must be 0).

ASHA replayed (`Asha`): Ray's AsyncHyperBandScheduler rule (one bracket, stop_last_trials):
rungs at grace x rf^k below or at max_t; when a trial reaches a rung first it is stopped if its
objective THAT epoch is below the (1 - 1/rf) quantile (numpy linear interpolation) of the values
recorded at that rung so far, and its value is recorded; the first trial at a rung always
continues. Validated twice: (1) fed the real sweep's own reports in their real order it must
reproduce every stop of the real sweep (and, in every run, `check_against_ray` compares it with
Ray's own scheduler on random report sequences); (2) replayed from the FIFO curves with the simulated
schedule (2 slots, trials started in the real order, each epoch lasting the FIFO run's measured
epoch_seconds) its stops are compared with the real ones. The grid then replays grace periods x
reduction factors on the FIFO curves (same trials: a real sweep's TPE would propose differently
after different stops).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import struct
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.harness import (ROOT, XFER, Asha, git_head, pair_flags, pairs_cli, prepare_pairs, read_results, run,
                           write_results)

SEED = 0                       # the sweep's --seed (TPE, trial seeds)
WITHIN = 0.01                  # "came within 0.01 of the full-budget sweep's best"
TOLERANCES = (0.01, 0.005, 0.0025, 0.0)  # the same measure, stricter (reported beside it)
GOAL = 0.35                    # the fraction the issue asks for
GRID_GRACE = (1, 2, 3, 4, 5)
GRID_RF = (2, 3, 4)
KEEP = ("epoch", "objective", "best_objective", "best_epoch", "stopped_early", "epoch_seconds")
WATCHED = ("xfer/training.py", "xfer/checkpoint.py", "tune/trainable.py", "tune/driver.py", "xfer/selection.py")


# ----------------------------------------------------------------------------- ASHA, replayed

def check_against_ray(n_sequences: int = 300) -> dict:
    """`Asha` against Ray's own AsyncHyperBandScheduler on random report sequences (random grace
    periods, reduction factors, max_t, trial counts, interleavings, tied values, trials ending by
    themselves): the number of decisions and of decisions that differ (must be 0)."""
    import random

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler

    class _Trial:
        def __init__(self, tid: str):
            self.trial_id = tid

    decisions = differ = 0
    for seed in range(n_sequences):
        rng = random.Random(seed)
        E, g, rf = rng.choice([8, 12, 20, 30]), rng.randint(1, 5), rng.choice([2, 3, 4])
        ray_s = AsyncHyperBandScheduler(time_attr="epoch", metric="objective", mode="max", max_t=E,
                                        grace_period=g, reduction_factor=rf)
        ours, trials = Asha(g, rf, E), {f"t{i}": _Trial(f"t{i}") for i in range(rng.randint(3, 25))}
        for t in trials.values():
            ray_s.on_trial_add(None, t)
        alive = dict.fromkeys(trials, 0)
        while alive:
            tid = rng.choice(list(alive))
            alive[tid] += 1
            ep, v = alive[tid], rng.choice([round(rng.random(), 2), 0.5])
            a = ray_s.on_trial_result(None, trials[tid], {"epoch": ep, "objective": v}) == TrialScheduler.STOP
            b = ours.on_result(tid, ep, v)
            decisions, differ = decisions + 1, differ + int(bool(a) != bool(b))
            if a or ep >= E or rng.random() < 0.03:
                ray_s.on_trial_complete(None, trials[tid], {"epoch": ep, "objective": v})
                ours.on_complete(tid, ep, v)
                del alive[tid]
    return {"sequences": n_sequences, "decisions": decisions, "differ": differ}


def replay_events(events: list[dict], grace: int, rf: float, max_t: int) -> dict[str, int]:
    """Validation 1: ASHA fed the real reports in their real order; returns the epoch at which
    each trial would have been stopped by ASHA (absent: not stopped by ASHA before it ended)."""
    asha, stopped, ended = Asha(grace, rf, max_t), {}, set()
    for e in events:
        tid = e["trial"]
        if tid in stopped or tid in ended:
            continue
        stop = asha.on_result(tid, e["epoch"], e["objective"])
        if stop and e["epoch"] < max_t:
            stopped[tid] = e["epoch"]
        if stop or e["last"]:
            asha.on_complete(tid, e["epoch"], e["objective"])
            ended.add(tid)
    return stopped


def simulate(curves: dict[str, list[dict]], order: list[str], slots: int, max_t: int,
             grace: int | None, rf: float | None, clock: str = "seconds") -> dict:
    """A sweep replayed on the full-budget curves: `slots` trials at a time, started in `order`,
    each epoch lasting its measured epoch_seconds (clock "seconds") or 1 (clock "epochs");
    grace None: no scheduler (FIFO). Returns the events in time order and each trial's epochs."""
    asha = Asha(grace, rf, max_t) if grace else None
    queue, running, now, seq = list(order), {}, 0.0, 0
    events, epochs_run = [], {}

    def start(at: float) -> None:
        nonlocal seq
        if queue:
            tid = queue.pop(0)
            running[tid] = [1, at + _dur(curves[tid][0], clock), seq]
            seq += 1

    for _ in range(slots):
        start(0.0)
    while running:
        tid = min(running, key=lambda k: (running[k][1], running[k][2]))
        ep, now, _ = running[tid]
        rec = curves[tid][ep - 1]
        last = ep >= len(curves[tid])           # E epochs, its own early stopping, or an error
        stop = asha.on_result(tid, ep, rec["objective"]) if asha else ep >= max_t
        events.append({"trial": tid, "epoch": ep, "objective": rec["objective"],
                       "best_objective": rec["best_objective"], "time": now})
        if stop or last:
            if asha:
                asha.on_complete(tid, ep, rec["objective"])
            epochs_run[tid] = ep
            del running[tid]
            start(now)
        else:
            running[tid][0] = ep + 1
            running[tid][1] = now + _dur(curves[tid][ep], clock)
    return {"events": events, "epochs_run": epochs_run}


def _dur(rec: dict, clock: str) -> float:
    return 1.0 if clock == "epochs" else max(float(rec.get("epoch_seconds") or 0.0), 1e-6)


def reach(events: list[dict], target: float) -> dict:
    """Epochs (cumulative, in event order) until the best-so-far best_objective reached target;
    the final best and its trial."""
    best, who, n, hit = -math.inf, None, 0, None
    for e in events:
        n += 1
        b = e["best_objective"]
        if b is not None and b > best:
            best, who = b, e["trial"]
        if hit is None and best >= target:
            hit = n
    return {"epochs_to_target": hit, "total_epochs": n, "final_best": best if who else None, "final_trial": who}


# ----------------------------------------------------------------------------- the sweeps

def _hashes() -> dict:
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in WATCHED if (ROOT / f).exists()}


def run_sweep(pair_dir: Path, out: Path, n: int, epochs: int, num_cpus: int, name: str) -> dict:
    """`xfer tune` exactly as a user types it (default objective, grace period, reduction factor)."""
    meta = out.parent / "sweep_run.json"
    if (out / "trials.csv").exists() and meta.exists():
        return json.loads(meta.read_text())
    shutil.rmtree(out, ignore_errors=True)          # a cut sweep starts again
    argv = ["tune", *pair_flags(pair_dir), "--n_trials", str(n), "--space", "broad", "--search_epochs", str(epochs), "--seed", str(SEED),
            "--num_cpus", str(num_cpus), "--output_folder", str(out), "--name", name]
    files = _hashes()
    ran = run(XFER + argv, log=out.parent / "sweep.log")
    m = {"command": "xfer " + " ".join(argv), "wall_seconds": round(ran.seconds, 1),
         "files_before": files, "files_after": _hashes(), "git_head": git_head(),
         "date": time.strftime("%Y-%m-%d %H:%M")}
    meta.write_text(json.dumps(m, indent=1))
    print(f"{out}: sweep {m['wall_seconds']:.0f} s", flush=True)
    return m


def _tb_epoch_times(trial_dir: Path) -> list[tuple[float, int]]:
    """(driver wall time, epoch) of each `ray/tune/epoch` scalar in the trial's TensorBoard events,
    in file order (Tune's TBX logger writes it in the driver step that asked ASHA)."""
    try:
        from tensorboardX.proto import event_pb2
    except ImportError:
        return []
    out = []
    for f in sorted(trial_dir.glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):
            size = struct.unpack("<Q", data[i:i + 8])[0]
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + size])
            i += 12 + size + 4
            for v in ev.summary.value:
                if v.tag == "ray/tune/epoch":
                    out.append((ev.wall_time, int(v.simple_value)))
    return out


def read_sweep(out: Path) -> dict:
    """The sweep's settings, each trial's parameters and per-epoch reports, the events in order."""
    import pandas as pd

    sw = json.loads((out / "sweep.json").read_text())
    table = pd.read_csv(out / "trials.csv")
    exp = out / "ray_results" / sw["name"]
    trials, events, order_source = {}, [], "tensorboard"
    for tid in table["trial_id"]:
        d = exp / tid
        rows = [json.loads(ln) for ln in (d / "result.json").read_text().splitlines() if ln.strip()]
        tb = _tb_epoch_times(d)
        if len(tb) != len(rows) or any(e != r["epoch"] for (_, e), r in zip(tb, rows)):
            order_source = "result.json timestamp"
            tb = [(float(r["timestamp"]) + (r["time_total_s"] % 1) * 1e-3, r["epoch"]) for r in rows]
        row = table[table["trial_id"] == tid].iloc[0]
        trials[tid] = {"params": json.loads((d / "params.json").read_text()), "status": row["status"],
                       "epochs_run": int(row["epochs_run"]),
                       "best_objective": None if pd.isna(row["best_objective"]) else float(row["best_objective"]),
                       "reports": [{k: r.get(k) for k in KEEP} for r in rows],
                       "start": tb[0][0] - rows[0]["time_total_s"] if rows else math.inf}
        for (wall, _), r in zip(tb, rows):
            events.append({"trial": tid, "epoch": r["epoch"], "objective": r["objective"],
                           "best_objective": r.get("best_objective"), "time": wall,
                           "last": bool(r.get("stopped_early")) or r is rows[-1]})
    events.sort(key=lambda e: (e["time"], e["epoch"]))
    order = sorted(trials, key=lambda k: trials[k]["start"])
    return {"sweep": sw, "trials": trials, "events": events, "order": order, "order_source": order_source}


def _fifo_trial(job: tuple[str, dict, dict, dict]) -> tuple[str, dict]:
    """One trial's configuration for all its epochs, as tune.trainable runs it (one torch thread)."""
    tid, spec, base, params = job
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from tune.data import DataSpec, load_trial_data
    from tune.trainable import trial_config
    from xfer.training import fit

    cfg = trial_config(base, params)
    data = load_trial_data(DataSpec(**spec), cfg)
    recs, error, t = [], None, time.perf_counter()
    try:
        fit(cfg, data, lambda m, _ckpt: recs.append({k: m.get(k) for k in KEEP}), device="cpu")
    except Exception as e:  # noqa: BLE001 - a diverged trial errors in the sweep too: its curve ends there
        error = f"{type(e).__name__}: {e}"[:300]
    return tid, {"curve": recs, "error": error, "seconds": round(time.perf_counter() - t, 1)}


def run_fifo(sweep: dict, fifo_dir: Path, workers: int) -> dict:
    """Every trial's full-budget curve. A trial that ASHA let end by itself (all E epochs, or its
    own early stopping) already ran exactly what FIFO runs: its curve is its reports. Every other
    trial runs again from its first epoch (longest first, `workers` at a time)."""
    fifo_dir.mkdir(parents=True, exist_ok=True)
    sw, done = sweep["sweep"], {}
    jobs = []
    for tid in sweep["order"]:
        tr = sweep["trials"][tid]
        f = fifo_dir / f"{tid}.json"
        if tr["status"] == "completed":
            done[tid] = {"curve": tr["reports"], "error": None, "seconds": None, "source": "its ASHA reports"}
        elif f.exists():
            done[tid] = json.loads(f.read_text())
        else:
            cost = sum(r.get("epoch_seconds") or 0 for r in tr["reports"]) / max(1, len(tr["reports"]))
            jobs.append((cost, (tid, sw["spec"], sw["base"], tr["params"])))
    if jobs:
        import multiprocessing as mp
        from concurrent.futures import as_completed

        t = time.perf_counter()
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_fifo_trial, job) for _, job in sorted(jobs, key=lambda j: -j[0])]
            for fut in as_completed(futs):
                tid, res = fut.result()
                res.update(source="run again", files=_hashes())
                (fifo_dir / f"{tid}.json").write_text(json.dumps(res))
                done[tid] = res
                print(f"  fifo {tid}: {len(res['curve'])} epochs, {res['seconds']:.0f} s"
                      f"{', ' + res['error'] if res['error'] else ''}", flush=True)
        wall = round(time.perf_counter() - t, 1)
        (fifo_dir / "_run.json").write_text(json.dumps({"trials_run_again": len(jobs), "wall_seconds": wall,
                                                        "workers": workers, "date": time.strftime("%Y-%m-%d %H:%M")}))
        print(f"{fifo_dir}: {len(jobs)} trials run again in {wall:.0f} s", flush=True)
    return done


# ----------------------------------------------------------------------------- analysis

def analyse(sweep: dict, fifo: dict) -> dict:
    sw = sweep["sweep"]
    n, E, grace, rf = sw["n_trials"], sw["search_epochs"], sw["grace_period"], sw["reduction_factor"]
    budget = n * E
    curves = {t: fifo[t]["curve"] for t in sweep["order"]}
    fifo_best = {t: max((r["best_objective"] for r in c if r["best_objective"] is not None), default=None)
                 for t, c in curves.items()}
    best_trial = max((t for t in fifo_best if fifo_best[t] is not None), key=lambda t: fifo_best[t])
    target = fifo_best[best_trial] - WITHIN

    # the check: the FIFO run of a trial reproduces what the trial reported, epoch by epoch
    diffs, short = [], []
    rerun = [t for t in sweep["order"] if fifo[t].get("source") == "run again"]
    for t in rerun:
        tr, c = sweep["trials"][t], curves[t]
        if len(c) < len(tr["reports"]):
            short.append(t)
        for r, f in zip(tr["reports"], c):
            diffs.append(abs(r["objective"] - f["objective"]))

    real = reach(sweep["events"], target)
    real["stops"] = {t: tr["epochs_run"] for t, tr in sweep["trials"].items()}
    real["statuses"] = {t: tr["status"] for t, tr in sweep["trials"].items()}
    replay = replay_events(sweep["events"], grace, rf, E)
    asha_stopped = {t for t, tr in sweep["trials"].items() if tr["status"] == "stopped_by_asha"}
    validation_events = {"trials": n, "agree": sum((t in replay) == (t in asha_stopped) and
                                                   (t not in replay or replay[t] == sweep["trials"][t]["epochs_run"])
                                                   for t in sweep["trials"])}

    # how well a trial's objective at epoch e (what a rung at e compares) ranks the trials' full-budget bests
    from scipy.stats import spearmanr

    ranked = [t for t in curves if fifo_best[t] is not None]
    rank_by_epoch = {}
    for e in range(1, E + 1):
        ts = [t for t in ranked if len(curves[t]) >= e]
        if len(ts) >= 3:
            rank_by_epoch[e] = float(spearmanr([curves[t][e - 1]["objective"] for t in ts],
                                               [fifo_best[t] for t in ts])[0])
    tol = {str(w): {"asha": reach(sweep["events"], fifo_best[best_trial] - w)["epochs_to_target"],
                    "fifo_same_order": reach(simulate(curves, sweep["order"], 2, E, None, None)["events"],
                                             fifo_best[best_trial] - w)["epochs_to_target"]}
           for w in TOLERANCES}
    fifo_ordered = {clock: reach(simulate(curves, sweep["order"], 2, E, None, None, clock)["events"], target)
                    for clock in ("seconds", "epochs")}
    grid, validation_sim = {}, {}
    for clock in ("seconds", "epochs"):
        for g in sorted({*GRID_GRACE, grace}):
            for f in GRID_RF:
                if g > E:
                    continue
                s = simulate(curves, sweep["order"], 2, E, g, f, clock)
                r = reach(s["events"], target)
                r["rungs"] = Asha(g, f, E).milestones
                r["final_is_fifo_best"] = r["final_trial"] == best_trial
                r["fraction_to_target"] = None if r["epochs_to_target"] is None else r["epochs_to_target"] / budget
                r["fraction_total"] = r["total_epochs"] / budget
                grid[f"{clock}/g{g}/rf{f}"] = r
                if (g, f) == (grace, rf):
                    validation_sim[clock] = {"trials": n, "same_stop": sum(s["epochs_run"][t] == sweep["trials"][t]
                                                                          ["epochs_run"] for t in sweep["trials"]),
                                             "epochs_run": s["epochs_run"], "total_epochs": r["total_epochs"]}
    return {
        "n_trials": n, "epochs": E, "grace_period": grace, "reduction_factor": rf, "objective": sw["objective"],
        "budget_epochs": budget, "fifo_total_epochs": sum(len(c) for c in curves.values()),
        "fifo_best": fifo_best[best_trial], "fifo_best_trial": best_trial, "target": target,
        "fifo_best_per_trial": fifo_best,
        "asha": {**real, "fraction_to_target": None if real["epochs_to_target"] is None
                 else real["epochs_to_target"] / budget, "fraction_total": real["total_epochs"] / budget,
                 "final_is_fifo_best": real["final_trial"] == best_trial,
                 "final_gap": None if real["final_best"] is None else fifo_best[best_trial] - real["final_best"]},
        "tolerances": tol, "spearman_epoch_objective_vs_fifo_best": rank_by_epoch,
        "fifo_same_order": {k: {**v, "fraction_to_target": None if v["epochs_to_target"] is None
                                else v["epochs_to_target"] / budget} for k, v in fifo_ordered.items()},
        "check_max_abs_diff": max(diffs) if diffs else None, "check_fifo_shorter_than_asha": short,
        "check_trials_run_again": len(rerun), "check_epochs_compared": len(diffs),
        "validation_replay_real_events": {**validation_events, "replayed_stops": replay},
        "validation_simulated_schedule": validation_sim,
        "order": sweep["order"], "order_source": sweep["order_source"],
        "grid": grid,
    }


def run_pairs(root: Path, pairs: list[int], n: int, epochs: int, num_cpus: int, workers: int,
              out_json: Path) -> None:
    results = read_results(out_json, default={})
    if results.get("n_trials") not in (None, n) or results.get("epochs") not in (None, epochs):
        results = {}
    results.update({"machine": f"CPU-2 dev machine: {platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} CPU cores, shared with other work (epochs are counted, not seconds)",
                    "date": time.strftime("%Y-%m-%d"), "n_trials": n, "epochs": epochs, "seed": SEED,
                    "within": WITHIN, "goal": GOAL, "git_head": git_head()})
    results["asha_replay_vs_ray"] = check_against_ray()
    results.setdefault("pairs", {})
    for p in pairs:
        pd_ = root / f"pair{p}"
        if not (pd_ / "settings.json").exists():
            prepare_pairs(root, (p,), "medium")
        base = root / "asha" / f"n{n}_e{epochs}" / f"pair{p}"
        base.mkdir(parents=True, exist_ok=True)
        meta = run_sweep(pd_, base / "sweep", n, epochs, num_cpus, f"asha_{p}")
        sweep = read_sweep(base / "sweep")
        fifo = run_fifo(sweep, base / "fifo", workers)
        res = analyse(sweep, fifo)
        st = json.loads((pd_ / "settings.json").read_text())
        res.update({"cells": [st["size"]["n_cells_a"], st["size"]["n_cells_b"]], "sweep_run": meta,
                    "fifo_run": json.loads((base / "fifo" / "_run.json").read_text())
                    if (base / "fifo" / "_run.json").exists() else None,
                    "fifo_trial_seconds": {t: fifo[t]["seconds"] for t in sweep["order"]},
                    "fifo_errors": {t: fifo[t]["error"] for t in sweep["order"] if fifo[t]["error"]},
                    "fifo_files": sorted({json.dumps(fifo[t]["files"], sort_keys=True) for t in fifo
                                          if fifo[t].get("files")}),
                    "fifo_source": {t: fifo[t]["source"] for t in sweep["order"]},
                    "fifo_curves": {t: fifo[t]["curve"] for t in sweep["order"]},
                    "asha_reports": {t: sweep["trials"][t]["reports"] for t in sweep["order"]},
                    "asha_events": [{k: e[k] for k in ("trial", "epoch", "objective", "best_objective", "time")}
                                    for e in sweep["events"]],
                    "params": {t: sweep["trials"][t]["params"] for t in sweep["order"]},
                    })
        results["pairs"][str(p)] = res
        write_results(out_json, results)
        print(report(out_json), flush=True)


# ----------------------------------------------------------------------------- report

def _pct(x) -> str:
    return "not reached" if x is None else f"{100 * x:.0f} %"


def _main_table(d: dict, pairs: list[str]) -> list[str]:
    head = ("| pair | cells (training / test) | objective | grace / rf | FIFO best (trial) | ASHA: epochs to target | "
            "ASHA: all epochs | ASHA final best | FIFO in the same order: epochs to target | replay of real events: "
            "same stops | simulated schedule: same stops | FIFO = ASHA's reports (max diff) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        r = d["pairs"][p]
        a = r["asha"]
        same = "the same trial" if a["final_is_fifo_best"] else "another trial"
        fin = "—" if a["final_best"] is None else f"{a['final_best']:.3f} ({same}, {-a['final_gap']:+.3f})"
        v1, v2 = r["validation_replay_real_events"], r["validation_simulated_schedule"]["seconds"]
        lines.append(
            f"| {p} | {r['cells'][0]:,} / {r['cells'][1]:,} | {r['objective']} | {r['grace_period']} / "
            f"{r['reduction_factor']} | {r['fifo_best']:.3f} ({r['fifo_best_trial']}) | "
            f"{_pct(a['fraction_to_target'])} ({a['epochs_to_target']}) | {_pct(a['fraction_total'])} "
            f"({a['total_epochs']}) | {fin} | {_pct(r['fifo_same_order']['seconds']['fraction_to_target'])} | "
            f"{v1['agree']}/{v1['trials']} | {v2['same_stop']}/{v2['trials']} | {r['check_max_abs_diff']:.1e} |")
    return lines


def _tolerance_table(d: dict, pairs: list[str]) -> list[str]:
    ws = list(d["pairs"][pairs[0]]["tolerances"])
    lines = ["| pair | " + " | ".join(f"within {w}: ASHA / FIFO same order" for w in ws) + " |",
             "|---|" + "---|" * len(ws)]
    for p in pairs:
        b = d["pairs"][p]["budget_epochs"]

        def cell(v, b=b):
            return "not reached" if v is None else f"{v} ({100 * v / b:.0f} %)"

        tol = d["pairs"][p]["tolerances"]
        lines.append(f"| {p} | " + " | ".join(f"{cell(tol[w]['asha'])} / {cell(tol[w]['fifo_same_order'])}"
                                             for w in ws) + " |")
    return lines


def _grid_table(d: dict, pairs: list[str], clock: str) -> list[str]:
    keys = sorted({k.split("/", 1)[1] for p in pairs for k in d["pairs"][p]["grid"] if k.startswith(clock)},
                  key=lambda k: (int(k.split("/")[0][1:]), int(k.split("/")[1][2:])))
    lines = ["| grace | rf | rungs | " + " | ".join(f"pair {p}" for p in pairs) + " | mean to target | mean all |",
             "|---|---|---|" + "---|" * (len(pairs) + 2)]
    for k in keys:
        g, f = k.split("/")
        cells, tt, tot = [], [], []
        for p in pairs:
            r = d["pairs"][p]["grid"][f"{clock}/{k}"]
            gap = d["pairs"][p]["fifo_best"] - r["final_best"]
            cells.append(f"{_pct(r['fraction_to_target'])} / {_pct(r['fraction_total'])} / {-gap:+.3f}")
            tt.append(math.nan if r["fraction_to_target"] is None else r["fraction_to_target"])
            tot.append(r["fraction_total"])
        rungs = ", ".join(str(int(x)) for x in d["pairs"][pairs[0]]["grid"][f"{clock}/{k}"]["rungs"])
        mean_tt = "not reached" if any(map(math.isnan, tt)) else _pct(float(np.mean(tt)))
        lines.append(f"| {g[1:]} | {f[2:]} | {rungs} | " + " | ".join(cells)
                     + f" | {mean_tt} | {_pct(float(np.mean(tot)))} |")
    return lines


def report(path: Path) -> str:
    d = json.loads(Path(path).read_text())
    pairs = sorted(d["pairs"], key=int)
    c = d.get("asha_replay_vs_ray") or {}
    budget = d["n_trials"] * d["epochs"]
    rho = "; ".join(f"pair {p}: " + ", ".join(f"e={e} {v:+.2f}" for e, v in
                                              d["pairs"][p]["spearman_epoch_objective_vs_fifo_best"].items()
                                              if int(e) in (1, 2, 3, 4, 6, 8, 12, 16, 18, 20)) for p in pairs)
    check = (f"ASHA replayed (`Asha`) against Ray's AsyncHyperBandScheduler: {c.get('differ')} of "
             f"{c.get('decisions')} decisions differ ({c.get('sequences')} random report sequences)")
    settings = (f"{d['n_trials']} trials of up to {d['epochs']} epochs per sweep (n x E = {budget} epochs); "
                f"fractions of n x E; target = the FIFO sweep's best objective - {d['within']}")
    spearman = (f"Spearman rho between a trial's objective at epoch e (what a rung at e compares) and its "
                f"full-budget best: {rho}")
    stricter = ("Stricter targets: epochs (fraction of n x E) until the best-so-far came within w of the FIFO "
                "sweep's best, the real ASHA sweep and the FIFO sweep in the same trial order (2 slots)")
    lines = [check, "", settings, "", *_main_table(d, pairs), "", spearman, "", stricter, "",
             *_tolerance_table(d, pairs)]
    for clock, what in (("seconds", "each epoch lasting its measured time"), ("epochs", "every epoch 1 unit")):
        title = (f"Replayed on the FIFO curves ({what}): epochs to target / all epochs (fractions of n x E) / "
                 "final best - FIFO best")
        lines += ["", title, "", *_grid_table(d, pairs, clock)]
    return "\n".join(lines)


def main() -> None:
    def options(r):
        r.add_argument("--n_trials", type=int, default=16)
        r.add_argument("--epochs", type=int, default=20)
        r.add_argument("--num_cpus", type=int, default=2)
        r.add_argument("--workers", type=int, default=2, help="FIFO trials at a time (one torch thread each)")
        r.add_argument("--json", default="bench/results/asha_savings.json")

    args = pairs_cli(__doc__, options)
    if args.cmd == "run":
        run_pairs(Path(args.root).resolve(), args.pairs, args.n_trials, args.epochs, args.num_cpus, args.workers,
            Path(args.json))
    else:
        print(report(Path(args.json)))


if __name__ == "__main__":
    main()
