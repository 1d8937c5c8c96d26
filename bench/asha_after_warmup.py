"""Should ASHA judge a trial before its warm-up ends? A replay on development curves, then real sweeps.

    python -m bench.asha_after_warmup replay bench/results/selection_objective_dev.json [--sweeps 200]
    python -m bench.asha_after_warmup sweeps bench/_data/transfer --pairs 504 503 502 501

selection_objective.py trained 48 configurations of the default search space for all 30 epochs on
development pairs 101 and 102 and kept every epoch's objective (`agreement`), its warm-up
factor and the PEAK-test balanced accuracy (`truth`, read here only to score the pick). Each
replayed sweep draws 30 of the 48 (the shipped defaults first, as `xfer tune` does; the rest
in a random order), runs them 2 at a time with each epoch lasting its measured time, and
lets a scheduler stop trials at its rungs (grace 3, reduction factor 2, max_t 30: `xfer tune
--search_epochs 30`'s defaults). The sweep's pick is the trial with the best objective over its
eligible epochs (after its warm-up, or its 30th epoch), as trials.csv ranks.

  asha         Ray's AsyncHyperBandScheduler as `xfer tune` runs it (asha_savings.Asha, checked
               against Ray's own decisions there): every trial judged at every rung it reaches
  asha_warm    the same, except that a trial still in its warm-up at a rung is neither judged
               nor recorded there: it is judged at the first rung it reaches with the
               adaptation fully on (or runs on when none is left)
  fifo         every trial runs all 30 epochs

The replay uses development pairs only and chooses nothing shipped. `sweeps` then runs the
real thing on the evaluation pairs of sweep_final_ensemble.py (501-504), whose plain-ASHA
sweeps it reuses: the same command with `--asha_after_warmup` (an option, off by default),
its final model scored as `xfer tune` scores it. The test line's labels only score.
"""

from __future__ import annotations

import heapq
import json
import random
from pathlib import Path

import numpy as np

from bench.harness import Asha, pair_flags, read_results, run_xfer, summary, write_results

MAX_T, GRACE, RF, SLOTS, N_TRIALS = 30, 3, 2, 2, 30


def _eligible(h: list[dict], upto: int) -> list[int]:
    """Epochs (1-based) a trial that ran `upto` epochs may choose: fully warmed, or the 30th."""
    return [e for e in range(1, upto + 1) if h[e - 1]["warmup"] >= 1.0 or e == MAX_T]


def replay(runs: list[dict], policy: str) -> dict:
    """One sweep over `runs` in order: epochs run, the pick and its truth."""
    sched = Asha(GRACE, RF, MAX_T) if policy != "fifo" else None
    upto = {}
    events, nxt = [], 0

    def start(slot: int, t0: float) -> None:
        nonlocal nxt
        if nxt < len(runs):
            i, nxt = nxt, nxt + 1
            heapq.heappush(events, (t0 + runs[i]["epoch_s"], i, 1, slot))

    for s in range(SLOTS):
        start(s, 0.0)
    while events:
        t, i, e, slot = heapq.heappop(events)
        h = runs[i]["history"]
        upto[i] = e
        stop = e >= MAX_T
        if sched is not None:
            warm = h[e - 1]["warmup"] >= 1.0
            if policy == "asha_warm" and not warm and e < MAX_T:
                stop = False  # not judged, not recorded: judged at its first warmed rung
            else:
                stop = sched.on_result(str(i), e, h[e - 1]["agreement"])
        if stop:
            start(slot, t)
        else:
            heapq.heappush(events, (t + runs[i]["epoch_s"], i, e + 1, slot))
    best = None
    for i, n in upto.items():
        h = runs[i]["history"]
        el = _eligible(h, n)
        if not el:
            continue
        e = max(el, key=lambda k: h[k - 1]["agreement"])
        if best is None or h[e - 1]["agreement"] > best[0]:
            best = (h[e - 1]["agreement"], i, e)
    _, i, e = best
    return {"epochs": sum(upto.values()), "truth": runs[i]["history"][e - 1]["truth"],
            "ranked": sum(bool(_eligible(runs[j]["history"], n)) for j, n in upto.items())}


def cmd_replay(args) -> None:
    d = json.loads(Path(args.dev_json).read_text())
    out = {"source": args.dev_json, "sweeps": args.sweeps, "grace": GRACE, "rf": RF, "max_t": MAX_T,
           "slots": SLOTS, "n_trials": N_TRIALS, "pairs": {}}
    for pair in d["pairs"]:
        runs = sorted((r for r in d["runs"] if r["pair"] == pair), key=lambda r: r["config"])
        for r in runs:
            r["epoch_s"] = r["seconds"] / len(r["history"])
        best_truth = max(max(h["truth"] for h in r["history"]) for r in runs)
        rng = random.Random(pair)
        res = {p: [] for p in ("asha", "asha_warm", "fifo")}
        for _ in range(args.sweeps):
            order = [runs[0]] + rng.sample(runs[1:], N_TRIALS - 1)  # config 0: the shipped defaults
            for p in res:
                res[p].append(replay(order, p))
        summ = {}
        for p, rs in res.items():
            tr = np.array([r["truth"] for r in rs])
            summ[p] = {"truth_mean": float(tr.mean()), "truth_se": float(tr.std(ddof=1) / np.sqrt(len(tr))),
                       "epochs_mean": float(np.mean([r["epochs"] for r in rs])),
                       "ranked_mean": float(np.mean([r["ranked"] for r in rs]))}
        diff = np.array([a["truth"] - b["truth"] for a, b in zip(res["asha_warm"], res["asha"])])
        summ["asha_warm_minus_asha"] = {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
                                        "better": int((diff > 0).sum()), "worse": int((diff < 0).sum())}
        summ["defaults_truth"] = float(runs[0]["history"][max(_eligible(runs[0]["history"], MAX_T),
                                                              key=lambda k: runs[0]["history"][k - 1]["agreement"]) - 1]
                                       ["truth"])
        summ["best_of_48_truth_any_epoch"] = best_truth
        out["pairs"][str(pair)] = summ
        print(f"pair {pair}: " + "; ".join(
            f"{p} truth {summ[p]['truth_mean']:.4f} ± {summ[p]['truth_se']:.4f}, {summ[p]['epochs_mean']:.0f} epochs, "
            f"{summ[p]['ranked_mean']:.1f} ranked" for p in ("asha", "asha_warm", "fifo"))
              + f"; warm − asha {summ['asha_warm_minus_asha']['mean']:+.4f} ± {summ['asha_warm_minus_asha']['se']:.4f}"
              f" (better in {summ['asha_warm_minus_asha']['better']}, worse in {summ['asha_warm_minus_asha']['worse']})"
              f"; defaults alone {summ['defaults_truth']:.4f}", flush=True)
    write_results(args.json, out)


def cmd_sweeps(root: Path, pairs: list[int], out_json: Path) -> None:
    import pandas as pd

    res = read_results(out_json, default={"pairs": {}})
    for p in pairs:
        base = root / "sweep_ensemble" / f"pair{p}"
        plain = json.loads((base / "sweep" / "sweep.json").read_text())
        run_xfer(["tune", *pair_flags(root / f"pair{p}"), "--objective", "transfer", "--n_trials",
                  str(plain["n_trials"]), "--space", "broad", "--search_epochs", str(plain["search_epochs"]),
                  "--num_cpus", "2", "--asha_after_warmup", "--output_folder", str(base / "sweep_warm"),
                  "--name", f"warm_{p}"], base / "sweep_warm", base / "sweep_warm.log")
        r = {}
        for arm, d in (("asha", base / "sweep"), ("asha_after_warmup", base / "sweep_warm")):
            df = pd.read_csv(d / "trials.csv")
            mm = json.loads((d / "metrics.json").read_text())
            r[arm] = {**summary(mm), "epochs_run": int(df["epochs_run"].sum()),
                      "ranked": int(df["best_objective"].notna().sum()), "n_trials": len(df),
                      "best_objective": float(df["best_objective"].max())}
        res["pairs"][str(p)] = r
        write_results(out_json, res)
        print(f"pair {p}: " + "; ".join(f"{a} {v['peak_test']:.3f} ({v['epochs_run']} epochs, {v['ranked']} ranked)"
                                       for a, v in r.items()), flush=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay")
    rp.add_argument("dev_json")
    rp.add_argument("--sweeps", type=int, default=200, help="replayed sweeps per pair (random trial orders)")
    rp.add_argument("--json", default="bench/results/asha_after_warmup.json")
    sw = sub.add_parser("sweeps")
    sw.add_argument("root")
    sw.add_argument("--pairs", type=int, nargs="+", required=True)
    sw.add_argument("--json", default="bench/results/asha_after_warmup_sweeps.json")
    args = ap.parse_args()
    if args.cmd == "replay":
        cmd_replay(args)
    else:
        cmd_sweeps(Path(args.root).resolve(), args.pairs, Path(args.json))


if __name__ == "__main__":
    main()
