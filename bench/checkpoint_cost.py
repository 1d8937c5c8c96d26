"""Issue 15, item 2: what a trial's checkpoints cost, before and after `CheckpointPolicy`.

    python -m bench.checkpoint_cost [--size small] [--epochs 50] [--out bench/results/checkpoint_cost.json]
    python -m bench.checkpoint_cost --replay bench/results/checkpoint_cost.json   # the policies again, no training

One real training run (`xfer.training.fit`, the shipped defaults, one member, the training line
of a simulated pair, adapting to the other line as a sweep's trials do) of `--epochs` epochs.
At every epoch either policy would checkpoint, the real checkpoint is built and written with
torch.save (timed, sized). Then for a trial that ASHA stops at each rung (grace
epochs/8, reduction factor 2: the sweep's defaults) and for one that runs every epoch, the
checkpoints each policy writes on that same run:

  before   at every new best epoch, every 5 epochs and at the end (the old trainable)
  after    tune.trainable.CheckpointPolicy: at the end, at a rung after a new best epoch, and
           periodically at the cost-driven interval (writing within 5 % of the compute)

A projection replays the same run's best-epoch sequence with a GPU's times (`--project`: the
H100 `adapt` epoch of bench/results/gpu_epoch_time.json, 0.101 s, and 0.13 s to write the
default model's 76 MB checkpoint on research-sized data, the middle of the 0.11-0.16 s measured for
issue 15): that is where checkpoint cost matters, and where the cost-driven interval stretches.

Also what the trial's last checkpoint holds: its best epoch (the sweep exports the best trial's
best weights from it), which both policies must keep. Also the checkpoint's parts (weights,
AdamW state, the best epoch's weights when they differ from the current ones).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import RESULTS, write_results
from tune.trainable import CheckpointPolicy
from xfer.config import TrainConfig
from xfer.data.simulate import simulate_pair
from xfer.embed import PCAEmbedder, embed_lines
from xfer.prepare import prepare_line, prepare_training
from xfer.sweep_files import asha_rungs
from xfer.training import fit


def _nbytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def run(size: str, epochs: int, seed: int) -> dict:
    A, B = simulate_pair(size, seed=seed)
    cfg = TrainConfig.from_dict({"epochs": epochs, "ensemble": 1, "patience": epochs + 1})
    emb = embed_lines(PCAEmbedder(cfg.data.n_components), A.gex, {"test": B.gex})
    data, pre = prepare_training(A.gex, A.peak, emb["train"], cfg.data, cfg.optim.seed, other_peaks=B.peak)
    data = data.with_adaptation(prepare_line("B", pre, peaks=B.peak))
    rungs = asha_rungs(max(1, epochs // 8), 2, epochs)
    per_epoch, parts = [], None
    tmp = Path(tempfile.mkdtemp())

    def report(m, build):
        nonlocal parts
        ck = build()
        t0 = time.perf_counter()
        torch.save(ck, tmp / "checkpoint.pt")
        secs = time.perf_counter() - t0
        size_b = (tmp / "checkpoint.pt").stat().st_size
        if parts is None or (ck["train_state"]["best_model"] is not None and "best_weights" not in parts):
            parts = {"weights": _nbytes(ck["model"]), "adamw_state": _nbytes(ck["train_state"]["optimizer"]),
                     **({"best_weights": _nbytes(ck["train_state"]["best_model"])}
                        if ck["train_state"]["best_model"] is not None else {})}
        per_epoch.append({"epoch": int(m["epoch"]), "improved": bool(m.get("improved")),
                          "epoch_seconds": float(m["epoch_seconds"]), "best_epoch": int(m["best_epoch"]),
                          "write_seconds": secs, "bytes": size_b})

    fit(cfg, data, report, device="cpu")
    return {"rungs": rungs, "epochs": per_epoch, "parts_bytes": parts}


def replay(per_epoch: list[dict], rungs: list[int], stop: int, project: tuple[float, float] | None = None) -> dict:
    """Both policies on the run's first `stop` epochs (a trial stopped there); with `project`
    (epoch seconds, write seconds) the run's times are replaced by those."""
    if project is not None:
        per_epoch = [{**r, "epoch_seconds": project[0], "write_seconds": project[1]} for r in per_epoch]
    out = {}
    for name in ("before", "after"):
        policy = CheckpointPolicy(0, rungs)
        writes = []
        for r in per_epoch[:stop]:
            last = r["epoch"] == len(per_epoch)  # a trial ASHA stops at a rung does not know it is its last
            if name == "before":
                due = r["improved"] or r["epoch"] % 5 == 0 or last
            else:
                due = policy.due(r, last)
            if due:
                writes.append(r)
                policy.saved(r["epoch"], r["write_seconds"])
        best = max((r["best_epoch"] for r in per_epoch[:stop]), default=0)
        compute = sum(r["epoch_seconds"] for r in per_epoch[:stop])
        out[name] = {"writes": len(writes), "epochs": [w["epoch"] for w in writes],
                     "seconds": sum(w["write_seconds"] for w in writes), "bytes": sum(w["bytes"] for w in writes),
                     "share_of_compute": sum(w["write_seconds"] for w in writes) / compute,
                     "last_holds_best": bool(writes) and writes[-1]["epoch"] >= best}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "checkpoint_cost.json"))
    ap.add_argument("--project", default="0.101,0.13", help="EPOCH_S,WRITE_S of the GPU projection")
    ap.add_argument("--replay", help="a results JSON of an earlier run: replay its epochs, train nothing")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    if a.replay:
        old = json.loads(Path(a.replay).read_text())
        res = {k: old[k] for k in ("rungs", "epochs", "parts_bytes")}
        a.size, a.epochs, a.seed = old["settings"]["size"], old["settings"]["epochs"], old["settings"]["seed"]
    else:
        res = run(a.size, a.epochs, a.seed)
    ep = res["epochs"]
    stops = {f"stopped at rung {r}": r for r in res["rungs"] if r < a.epochs} | {"ran every epoch": a.epochs}
    res["policies"] = {k: replay(ep, res["rungs"], s) for k, s in stops.items()}
    proj = tuple(float(x) for x in a.project.split(","))
    res["projected"] = {"epoch_seconds": proj[0], "write_seconds": proj[1],
                        "policies": {k: replay(ep, res["rungs"], s, proj) for k, s in stops.items()}}
    res["per_checkpoint"] = {"median_write_seconds": sorted(r["write_seconds"] for r in ep)[len(ep) // 2],
                             "median_bytes": sorted(r["bytes"] for r in ep)[len(ep) // 2],
                             "median_epoch_seconds": sorted(r["epoch_seconds"] for r in ep)[len(ep) // 2]}
    res["settings"] = {"size": a.size, "epochs": a.epochs, "seed": a.seed, "config": "shipped defaults, ensemble 1",
                       "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch "
                                  f"{torch.__version__}, {torch.get_num_threads()} threads",
                       "date": time.strftime("%Y-%m-%d"), "wall_seconds": time.time() - t0}
    if a.replay:
        res["settings"] = {**old["settings"], "replayed": time.strftime("%Y-%m-%d")}
    write_results(a.out, res)
    pc = res["per_checkpoint"]
    print(f"checkpoint: {pc['median_bytes'] / 1e6:.1f} MB, {pc['median_write_seconds']:.3f} s to write; "
          f"epoch {pc['median_epoch_seconds']:.3f} s; parts (MB): "
          + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in res["parts_bytes"].items()))
    for title, table in (("measured here", res["policies"]),
                         (f"projected: epoch {proj[0]} s, write {proj[1]} s", res["projected"]["policies"])):
        print(f"\n{title}\n{'trial':24s} {'before: writes / s / MB / % compute':>40s} "
              f"{'after: writes / s / MB / % compute':>40s}")
        for k, v in table.items():
            cells = [f"{p['writes']} / {p['seconds']:.2f} / {p['bytes'] / 1e6:.0f} / {100 * p['share_of_compute']:.1f}%"
                     + ("" if p["last_holds_best"] else " LOST BEST") for p in (v["before"], v["after"])]
            print(f"{k:24s} {cells[0]:>40s} {cells[1]:>40s}")
        assert all(p["last_holds_best"] for v in table.values() for p in v.values())
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
