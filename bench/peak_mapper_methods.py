"""Issue 26, "Measure": does the neural peak mapper beat the coordinate mapper?

    python -m bench.peak_mapper_methods run [--root bench/_data/peak_mapper] [--dev 2601:hard,2602:varied]
                                           [--eval 2611:hard,2612:hard,2613:varied,2614:varied] [--epochs 40]
                                           [--workers 2] [--quick] [--json bench/results/peak_mapper_methods.json]
    python -m bench.peak_mapper_methods research [--root bench/_data/peak_mapper_research] [--flags --design joint --fill all]
    python -m bench.peak_mapper_methods report [bench/results/peak_mapper_methods.json]    # BENCHMARKS.md tables

Pairs (size `small`: 3,000 genes, 10,000 peaks in the training line; cells per line drawn):
  varied  `xfer.data.simulate.draw_settings(seed, "small")`: every assumption drawn from the
          documented VARIED_RANGES, as in every study over varied pairs;
  hard    the same draw with the six peak-calling settings set to the end of their documented
          range (VARIED_RANGES, unchanged) at which the two lines' peak sets share least
          (HARD_PEAK_CALLING): no shared site called with identical boundaries, the widest
          boundary jitter, the most line-only sites, the most split peaks, the largest per-site
          accessibility offset, and the test line calling the fewest peaks (0.7x), so that the
          most of the training line's peaks have no partner in the test line. Nothing outside
          the documented ranges, nothing set towards any model.
Each pair is ROOT/pair<seed>/ (its store: A_GEX, A_PEAK the training line; B_GEX, B_PEAK the
test line, whose labels only score) with settings.json (its kind, sizes and settings).

`run`:
  1. development pairs: the neural mapper of every design x fill switch the module offers
     (NEURAL_CANDIDATES) is fitted on the pair (`xfer map-peaks --source_peaks store:A_PEAK
     --target_peaks store:B_PEAK`, no labels) and the shipped defaults are trained with it
     (`xfer train --peak_mapper_method neural --peak_mapper DIR/mapper.pt`);
  2. the choice, by the rule fixed here before any evaluation pair is simulated or run: the
     candidate with the highest mean PEAK-test balanced accuracy over the development pairs;
     a candidate within 0.002 of the best goes to the simpler one (the order of
     NEURAL_CANDIDATES, simplest first);
  3. evaluation pairs (disjoint seeds): the shipped defaults under every method (METHODS): the
     chosen neural mapper, overlap_50pct (the shipped default), exact, overlap, nearest, and
     joint_lsi (`--set peak_repr=joint_lsi`, with the shipped coordinate mapper).
Every run is exactly `xfer train` on the pair's store, the test line given as --test_csv /
--sup_peak_csv (its labels only score), with the shipped defaults except what the 2-core CPU
budget forces: `--epochs E` (default 40, shipped 100) and `--set ensemble=1` (shipped 3). Runs
whose metrics.json exists are read, not repeated (a cut run resumes); a mapper whose mapper.pt
exists is not refitted (its first fit's time is kept in fit.json). A run `xfer train` refuses
(`exact` where no boundary is shared) is recorded with its one-line error. Every command runs in a copy
of the committed xfer package (ROOT/xfer_<commit>/, `snapshot`), so that work-tree edits during
the study (others' work) cannot mix versions; the commit and neural_mapper.py's blob are recorded.

`research`: `xfer map-peaks` of the chosen design (or --flags) on the research-sized pair
(92,328 peaks in the training line; simulated into ROOT/store, deleted afterwards unless --keep),
in the study's copy of the package: its wall time and peak memory (/usr/bin/time -v).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.harness import (RESULTS, ROOT, TEST, TRAIN, XFER, machine, mean_se, pair_flags, read_results, run,
                           run_xfer, summary, summary_se, with_se, write_results)

DEV = {2601: "hard", 2602: "varied"}
EVAL = {2611: "hard", 2612: "hard", 2613: "varied", 2614: "varied"}
EPOCHS = 40
# The peak-calling settings at the end of their documented range (xfer.data.simulate.VARIED_RANGES)
# where the lines' peak sets share least; every other setting of a hard pair is drawn as usual.
HARD_PEAK_CALLING = {"shared_identical": "lo", "boundary_jitter_sd": "hi", "site_line_only": "hi",
                     "split_fraction_b": "hi", "site_line_sd": "hi", "peaks_b_ratio": "lo"}
# Neural candidates, simplest first: (name, `xfer map-peaks` flags): every design x fill of
# xfer.data.neural_mapper (DESIGNS, FILLS). Simpler: the source adapter (trained on the training
# line alone) before the joint design (target cells in every step) before the shared design (a second
# encoder, pair and MMD terms), and "unmapped" (the network fills only the reference peaks without a
# coordinate partner) before "all" (it predicts every one).
NEURAL_CANDIDATES: list[tuple[str, list[str]]] = [
    ("source_adapter_unmapped", ["--design", "source_adapter", "--fill", "unmapped"]),
    ("source_adapter_all", ["--design", "source_adapter", "--fill", "all"]),
    ("joint_unmapped", ["--design", "joint", "--fill", "unmapped"]),
    ("joint_all", ["--design", "joint", "--fill", "all"]),
    ("shared_unmapped", ["--design", "shared", "--fill", "unmapped"]),
    ("shared_all", ["--design", "shared", "--fill", "all"]),
]
TIE = 0.002  # within this of the best mean, the simpler candidate is chosen
# The methods compared on the evaluation pairs: name -> `xfer train` flags ("neural" is the choice).
METHODS = {
    "neural": None,
    "overlap_50pct": ["--peak_mapper_method", "overlap_50pct"],
    "exact": ["--peak_mapper_method", "exact"],
    "overlap": ["--peak_mapper_method", "overlap"],
    "nearest": ["--peak_mapper_method", "nearest"],
    "joint_lsi": ["--set", "peak_repr=joint_lsi"],
}
DEFAULT_JSON = RESULTS / "peak_mapper_methods.json"


# ----------------------------------------------------------------------------- pairs

def hard_settings(seed: int, size: str = "small"):
    """draw_settings(seed, size) with HARD_PEAK_CALLING's settings at their range's end."""
    from xfer.data.simulate import VARIED_RANGES, draw_settings

    sz, st = draw_settings(seed, size)
    return sz, dataclasses.replace(st, **{k: VARIED_RANGES[k][0 if end == "lo" else 1]
                                          for k, end in HARD_PEAK_CALLING.items()})


def prepare_pair(root: Path, seed: int, kind: str, size: str = "small") -> Path:
    """ROOT/pair<seed>/ (store and settings.json) of that kind; kept when settings.json exists."""
    from xfer.data.fs import write_json
    from xfer.data.simulate import draw_settings, simulate_pair
    from xfer.data.store import CellStore

    d = root / f"pair{seed}"
    if (d / "settings.json").exists():
        old = json.loads((d / "settings.json").read_text())
        if old.get("kind") != kind:
            raise SystemExit(f"{d} holds a {old.get('kind')} pair, asked for {kind}: remove it or use another seed")
        return d
    sz, st = hard_settings(seed, size) if kind == "hard" else draw_settings(seed, size)
    t = time.perf_counter()
    a, b = simulate_pair(sz, seed=seed, settings=st)
    store = CellStore(str(d / "store"))
    for ln, names in ((a, TRAIN), (b, TEST)):
        store.write(ln.gex, names[0], overwrite=True)
        store.write(ln.peak, names[1], overwrite=True)
    write_json(d / "settings.json", {"seed": seed, "kind": kind, "size": dataclasses.asdict(sz),
                                     "settings": st.to_dict(), "peaks": [a.peak.n_features, b.peak.n_features]})
    print(f"pair {seed} ({kind}): {sz.n_cells_a} / {sz.n_cells_b} cells, {a.peak.n_features} / "
          f"{b.peak.n_features} peaks, prepared in {time.perf_counter() - t:.0f} s", flush=True)
    return d


def pair_kinds(text: str) -> dict[int, str]:
    """'2601:hard,2602:varied' -> {2601: 'hard', 2602: 'varied'} (a bare seed is varied)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        seed, _, kind = part.partition(":")
        kind = kind or "varied"
        if kind not in ("hard", "varied"):
            raise SystemExit(f"pair {part!r}: the kind is hard or varied")
        out[int(seed)] = kind
    return out


# ----------------------------------------------------------------------------- runs

def fit_mapper_cli(pair_dir: Path, out: Path, flags: list[str], epochs: int | None = None,
                   cwd: Path | None = None) -> dict:
    """`xfer map-peaks` of the pair's training line (source) and test line (target), one thread;
    its wall time, the size of mapper.pt and the fit's own statistics. A mapper already fitted is
    read (its first fit's figures kept in fit.json)."""
    if (out / "fit.json").exists() and (out / "mapper.pt").exists():
        return json.loads((out / "fit.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*XFER, "map-peaks", "--store", str(pair_dir / "store"), "--source_peaks", f"store:{TRAIN[1]}",
           "--target_peaks", f"store:{TEST[1]}", "--output_folder", str(out), "--device", "cpu", *flags]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    ran = run(cmd, log=out.with_name(out.name + ".log"), cwd=cwd)
    fit = {"flags": flags, "seconds": ran.seconds, "mapper_bytes": (out / "mapper.pt").stat().st_size,
           "module_blob": module_blob(cwd), "stats": _fit_stats(out)}
    (out / "fit.json").write_text(json.dumps(fit, indent=1))
    print(f"{out}: mapper fitted in {ran.seconds:.0f} s", flush=True)
    return fit


def _fit_stats(folder: Path) -> dict:
    """The statistics `xfer map-peaks` writes beside mapper.pt (every JSON file there)."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        if f.name != "fit.json":
            try:
                out[f.stem] = json.loads(f.read_text())
            except ValueError:
                pass
    return out


def _job(job: dict) -> dict:
    """One run in a process of its own: the neural mapper fitted first when the method needs it,
    then `xfer train` with the shipped defaults (but --epochs E --set ensemble=1)."""
    pair_dir, run_dir = Path(job["pair_dir"]), Path(job["run_dir"])
    cwd = Path(job["cwd"]) if job.get("cwd") else None
    flags = list(job["train_flags"])
    fit = None
    if job.get("mapper_flags") is not None:
        mdir = Path(job["mapper_dir"])
        fit = fit_mapper_cli(pair_dir, mdir, job["mapper_flags"], job.get("mapper_epochs"), cwd)
        flags += ["--peak_mapper_method", "neural", "--peak_mapper", str(mdir / "mapper.pt")]
    argv = ["train", *pair_flags(pair_dir), "--device", "cpu", "--seed", "0", "--epochs", str(job["epochs"]),
            "--set", "ensemble=1", *flags, "--output_folder", str(run_dir)]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    head = {"method": job["method"], "pair": job["pair"], "kind": job["kind"],
            "argv": argv[len(pair_flags(pair_dir)) + 1:]}
    try:
        m = run_xfer(argv, run_dir, run_dir.with_name(run_dir.name + ".log"), cwd=cwd)
    except SystemExit:
        # a method that cannot run on a pair (`exact` where no peak has identical boundaries in both
        # lines: xfer train refuses a test line sharing no peak) is a result: its one-line error
        log = run_dir.with_name(run_dir.name + ".log").read_text().strip().splitlines()
        err = next((x for x in reversed(log) if "error" in x), log[-1] if log else "failed")
        print(f"{run_dir}: failed: {err}", flush=True)
        return {**head, "error": err, "peak_test": None, "mapper_fit": fit}
    model = m["model"]
    return {**head,
            **summary(m), "peak_val": m["peak_val"]["balanced_accuracy"], "gex_test": m["gex_test"]["balanced_accuracy"],
            "best_epoch": model["best_epoch"], "epochs_run": model["epochs_run"],
            "train_seconds": model.get("train_seconds"), "wall_seconds": model.get("wall_seconds"),
            "peak_mapping": model.get("peak_mapping"), "mapper_fit": fit}


def _pool_map(workers: int, jobs: list[dict]):
    if workers <= 1:
        yield from map(_job, jobs)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_job, jobs)


def choose(dev_runs: list[dict], candidates: list[str], dev: list[int]) -> tuple[str, dict]:
    """THE RULE (fixed before any evaluation pair is simulated or run): the neural candidate with
    the highest mean PEAK-test balanced accuracy over the development pairs; a candidate within TIE
    of the best mean goes to the simplest such (the order of NEURAL_CANDIDATES)."""
    mean = {}
    for c in candidates:
        vals = [r["peak_test"] for r in dev_runs if r["method"] == f"neural:{c}" and r["pair"] in dev]
        if len(vals) == len(dev):
            mean[c] = sum(vals) / len(vals)
    if not mean:
        raise SystemExit("no neural candidate finished on every development pair")
    best = max(mean.values())
    return next(c for c in candidates if c in mean and mean[c] >= best - TIE), mean


def snapshot(root: Path, res: dict, fresh: bool = False) -> Path:
    """The committed xfer package, copied once (`git archive <commit> xfer`) to ROOT/xfer_<commit>/;
    every command of the study runs there (`python -m xfer.cli` imports the package of its working
    directory), so that edits to the work tree during a study cannot mix versions of the code. A
    resumed study keeps the commit it started with (`fresh`: the current HEAD instead)."""
    commit = res.get("xfer_commit")
    if fresh or not commit:
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
    d = root / f"xfer_{commit[:12]}"
    if not (d / "xfer" / "cli.py").exists():
        d.mkdir(parents=True, exist_ok=True)
        run(["bash", "-c", f"git archive {commit} xfer | tar -x -C {d}"])
    res["xfer_commit"] = commit
    return d


def module_blob(cwd: Path | None) -> str:
    """The git blob id of the xfer/data/neural_mapper.py that ran (in `cwd`, else the work tree)."""
    f = (cwd or ROOT) / "xfer" / "data" / "neural_mapper.py"
    return run(["git", "hash-object", str(f)]).stdout.strip()


def run_study(root: Path, out_json: Path, dev: dict[int, str], evl: dict[int, str], epochs: int, workers: int,
              size: str = "small", mapper_epochs: int | None = None, use_snapshot: bool = True,
              fresh_snapshot: bool = False, dev_only: bool = False) -> dict:
    if set(dev) & set(evl):
        raise SystemExit(f"development and evaluation pairs share seeds {sorted(set(dev) & set(evl))}")
    cands = [name for name, _ in NEURAL_CANDIDATES]
    flags_of = dict(NEURAL_CANDIDATES)
    res = read_results(out_json, {})
    res.update({"machine": machine(), "size": size, "epochs": epochs, "ensemble": 1, "workers": workers,
                "shipped_differences": f"--epochs {epochs} (shipped 100), --set ensemble=1 (shipped 3): CPU budget",
                "hard_peak_calling": HARD_PEAK_CALLING, "tie": TIE, "candidates": dict(NEURAL_CANDIDATES),
                "methods": {k: v for k, v in METHODS.items()}, "dev": {str(k): v for k, v in dev.items()},
                "eval": {str(k): v for k, v in evl.items()}})
    res.setdefault("pairs", {})
    root.mkdir(parents=True, exist_ok=True)
    cwd = str(snapshot(root, res, fresh_snapshot)) if use_snapshot else None
    if not use_snapshot:
        res["xfer_commit"] = "work tree at " + run(["git", "rev-parse", "HEAD"]).stdout.strip()
    res["neural_mapper_blob"] = module_blob(Path(cwd) if cwd else None)
    t0 = time.perf_counter()

    def save():
        write_results(out_json, res)

    def pair(seed, kind):
        d = prepare_pair(root, seed, kind, size)
        res["pairs"][str(seed)] = json.loads((d / "settings.json").read_text())
        return d

    # 1. development pairs: every neural candidate, and the shipped coordinate mapper as a reference
    jobs = []
    for seed, kind in dev.items():
        d = pair(seed, kind)
        for c in cands:
            jobs.append({"method": f"neural:{c}", "pair": seed, "kind": kind, "pair_dir": str(d), "epochs": epochs,
                         "train_flags": [], "mapper_flags": flags_of[c], "mapper_dir": str(d / "mappers" / c),
                         "mapper_epochs": mapper_epochs, "run_dir": str(root / "runs" / f"dev_{c}_pair{seed}"),
                         "cwd": cwd})
        jobs.append({"method": "overlap_50pct", "pair": seed, "kind": kind, "pair_dir": str(d), "epochs": epochs,
                     "train_flags": METHODS["overlap_50pct"],
                     "run_dir": str(root / "runs" / f"dev_overlap_50pct_pair{seed}"), "cwd": cwd})
    save()
    res["dev_runs"] = list(_pool_map(workers, jobs))
    save()
    # 2. the choice, by the rule above, before any evaluation pair exists
    pick, mean = choose(res["dev_runs"], cands, list(dev))
    res["choice"] = {"pick": pick, "flags": flags_of[pick], "dev_mean": mean,
                     "rule": "highest mean PEAK-test balanced accuracy of the shipped defaults over the development "
                             f"pairs; within {TIE} of the best, the simpler candidate (order: {', '.join(cands)})"}
    save()
    print(f"choice: {pick} (development means {json.dumps({k: round(v, 4) for k, v in mean.items()})})", flush=True)
    if dev_only:
        res["dev_only"] = True
        res.setdefault("invocation_wall_s", []).append(time.perf_counter() - t0)
        save()
        return res
    # 3. evaluation pairs: every method
    jobs = []
    for seed, kind in evl.items():
        d = pair(seed, kind)
        for name, flags in METHODS.items():
            job = {"method": name, "pair": seed, "kind": kind, "pair_dir": str(d), "epochs": epochs,
                   "train_flags": flags or [], "run_dir": str(root / "runs" / f"eval_{name}_pair{seed}"), "cwd": cwd}
            if name == "neural":
                job.update(mapper_flags=flags_of[pick], mapper_dir=str(d / "mappers" / pick),
                           mapper_epochs=mapper_epochs, run_dir=str(root / "runs" / f"eval_neural_{pick}_pair{seed}"))
            jobs.append(job)
    save()
    res["eval_runs"] = []
    for r in _pool_map(workers, jobs):
        res["eval_runs"].append(r)
        save()
    res.setdefault("invocation_wall_s", []).append(time.perf_counter() - t0)  # one per (resumed) run
    save()
    return res


# ----------------------------------------------------------------------------- research size

def research(root: Path, out_json: Path, design_flags: list[str] | None, keep: bool = False) -> dict:
    """`xfer map-peaks` on the research-sized pair (the unvaried simulator at size `research`,
    seed 0: 7,432 / 7,728 cells, 92,328 peaks in the training line), one thread, under
    /usr/bin/time -v: wall seconds, peak resident memory, mapper.pt's size. The design is the
    study's choice (read from the results) unless given. The store is deleted afterwards."""
    import shutil

    from bench.harness import simulate_into_store

    res = read_results(out_json, {})
    if design_flags is None:
        if "choice" not in res:
            raise SystemExit(f"{out_json} holds no choice yet: run the study first, or give --design")
        design_flags = res["choice"]["flags"]
    store = root / "store"
    root.mkdir(parents=True, exist_ok=True)
    cwd = snapshot(root, dict(res))  # the study's commit (HEAD when there is none)
    if not (root / "simulated.json").exists():
        info = simulate_into_store(store, "research", seed=0)
        (root / "simulated.json").write_text(json.dumps(info, indent=1))
        print(f"research pair simulated in {info['simulate_s']:.0f} s, written in {info['store_write_s']:.0f} s",
              flush=True)
    info = json.loads((root / "simulated.json").read_text())
    out = root / "mapper"
    if out.exists():
        shutil.rmtree(out)
    cmd = ["/usr/bin/time", "-v", *XFER, "map-peaks", "--store", str(store), "--source_peaks", f"store:{TRAIN[1]}",
           "--target_peaks", f"store:{TEST[1]}", "--output_folder", str(out), "--device", "cpu", *design_flags]
    log = root / "map_peaks.log"
    ran = run(cmd, log=log, cwd=cwd)
    text = log.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    rec = {"flags": design_flags, "wall_s": ran.seconds, "max_rss_bytes": rss,
           "mapper_bytes": (out / "mapper.pt").stat().st_size, "stats": _fit_stats(out), "machine": machine(),
           "xfer_commit": cwd.name[5:], "module_blob": module_blob(cwd),
           "load_before": os.getloadavg()}
    rec["pair"] = {k: info[k] for k in ("size", "cells", "genes", "peaks", "simulate_s", "store_write_s")}
    res["research"] = [r for r in res.get("research", []) if r["flags"] != design_flags] + [rec]
    write_results(out_json, res)
    print(f"research size: map-peaks {ran.seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB, mapper.pt "
          f"{rec['mapper_bytes'] / 2**20:.1f} MiB", flush=True)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return rec


# ----------------------------------------------------------------------------- report

def _cell(r: dict | None) -> str:
    if r and r.get("error"):
        return "refused¹"
    return with_se(r["peak_test"], r) if r else "–"


def _ok(r: dict | None) -> dict | None:
    """The run when it trained (not refused), else None."""
    return r if r and not r.get("error") else None


def _mean(xs: list[float], sign: str = "") -> str:
    """The mean over pairs, ± its SE over the pairs when there are two or more."""
    if not xs:
        return "–"
    m, se = mean_se(xs)
    return f"{m:{sign}.3f}" if len(xs) < 2 else f"{m:{sign}.3f} ± {se:.3f}"


def reproduced(path: Path, reference: Path) -> str:
    """The development runs both studies made (same candidate and pair), side by side."""
    a, b = read_results(path), read_results(reference)
    ref = {(r["method"], r["pair"]): r for r in b.get("dev_runs", [])}
    rows, same = [], 0
    for r in a.get("dev_runs", []):
        o = ref.get((r["method"], r["pair"]))
        if o is None:
            continue
        eq = r.get("peak_test") == o.get("peak_test") and r.get("class_correct") == o.get("class_correct")
        same += eq
        rows.append(f"| {r['method']} | {r['pair']} | {_cell(r)} | {_cell(o)} | {'yes' if eq else 'no'} |")
    head = [f"Development runs in both studies (this: xfer {a.get('xfer_commit', '?')[:12]}; reference "
            f"{reference.name}: xfer {b.get('xfer_commit', '?')[:12]}): {same} of {len(rows)} identical.", "",
            "| method | pair | PEAK-test BA here | in the reference | identical |", "|---|---|---|---|---|"]
    return "\n".join(head + rows)


def report(path: Path) -> str:
    d = read_results(path)
    out = [f"Machine: {d['machine']}; size {d['size']}; `xfer train` with the shipped defaults but "
           f"{d['shipped_differences']}; {d['workers']} runs at a time, one thread each.", ""]
    pairs = d.get("pairs", {})

    def pair_head(seed):
        p = pairs.get(str(seed), {})
        sz = p.get("size", {})
        return f"{seed} ({p.get('kind', '?')}, {sz.get('n_cells_a', '?')}/{sz.get('n_cells_b', '?')} cells)"

    # development
    dev = [int(s) for s in d["dev"]]
    runs = {(r["method"], r["pair"]): r for r in d.get("dev_runs", [])}
    if runs:
        out += ["Development pairs: PEAK-test balanced accuracy ± SE (per class), mapper fit seconds / mapper.pt MiB:",
                "", "| candidate (map-peaks flags) | " + " | ".join(pair_head(s) for s in dev) + " | mean |",
                "|---|" + "---|" * (len(dev) + 1)]
        pick = d.get("choice", {}).get("pick")
        for c, flags in d["candidates"].items():
            rs = [runs.get((f"neural:{c}", s)) for s in dev]
            cells = [f"{_cell(r)} ({r['mapper_fit']['seconds']:.0f} s, {r['mapper_fit']['mapper_bytes'] / 2**20:.1f} MiB)"
                     if r else "–" for r in rs]
            mean = d.get("choice", {}).get("dev_mean", {}).get(c)
            out.append(f"| neural {c}{' **(choice)**' if c == pick else ''} (`{' '.join(flags) or 'defaults'}`) | "
                       + " | ".join(cells) + (f" | {mean:.3f} |" if mean is not None else " | – |"))
        rs = [runs.get(("overlap_50pct", s)) for s in dev]
        vals = [r["peak_test"] for r in rs if r]
        out.append("| overlap_50pct (shipped; reference, not a candidate) | " + " | ".join(_cell(r) for r in rs)
                   + (f" | {sum(vals) / len(vals):.3f} |" if vals else " | – |"))
        if "choice" in d:
            out += ["", f"Rule: {d['choice']['rule']}. Choice: **{d['choice']['pick']}**."]
    # evaluation
    ev = [int(s) for s in d["eval"]]
    runs = {(r["method"], r["pair"]): r for r in d.get("eval_runs", [])}
    if runs:
        methods = list(d["methods"])
        kinds = {s: pairs.get(str(s), {}).get("kind") for s in ev}
        out += ["", "Evaluation pairs: PEAK-test balanced accuracy ± SE (per class); means over pairs ± SE over pairs:",
                "", "| method | " + " | ".join(pair_head(s) for s in ev) + " | mean hard | mean varied | mean |",
                "|---|" + "---|" * (len(ev) + 3)]
        for m in methods:
            rs = [runs.get((m, s)) for s in ev]
            name = f"neural ({d['choice']['pick']})" if m == "neural" and "choice" in d else m
            name += " (shipped)" if m == "overlap_50pct" else ""
            row = [_cell(r) for r in rs]
            for k in ("hard", "varied", None):
                xs = [r["peak_test"] for r, s in zip(rs, ev) if _ok(r) and (k is None or kinds[s] == k)]
                n_k = sum(1 for s in ev if k is None or kinds[s] == k)
                row.append(_mean(xs) + (f" ({len(xs)} of {n_k} pairs)" if xs and len(xs) < n_k else ""))
            out.append(f"| {name} | " + " | ".join(row) + " |")
        first = [next((r for (m, s), r in runs.items() if s == p and _ok(r)), None) for p in ev]
        out.append("| best plain PEAK baseline (of overlap_50pct's run) | " + " | ".join(
            f"{r['best_baseline_value']:.3f} ({r['best_baseline']})" if r else "–"
            for r in [runs.get(("overlap_50pct", s)) for s in ev]) + " | | | |")
        out.append("| majority-class rate | " + " | ".join(f"{r['majority_rate']:.3f}" if r else "–" for r in first)
                   + " | | | |")
        # differences to the shipped coordinate mapper
        out += ["", "Each method minus overlap_50pct (the shipped default), PEAK-test balanced accuracy; per pair, "
                "with that run's SE for scale; mean ± SE over pairs:", "",
                "| method | " + " | ".join(str(s) for s in ev) + " | mean hard | mean varied | mean | above on |",
                "|---|" + "---|" * (len(ev) + 4)]
        for m in methods:
            if m == "overlap_50pct":
                continue
            diffs = {}
            for s in ev:
                a, b = _ok(runs.get((m, s))), _ok(runs.get(("overlap_50pct", s)))
                if a and b:
                    diffs[s] = a["peak_test"] - b["peak_test"]
            row = [f"{diffs[s]:+.3f} (SE {summary_se(runs[(m, s)]):.3f})" if s in diffs
                   else "refused¹" if runs.get((m, s), {}).get("error") else "–" for s in ev]
            for k in ("hard", "varied", None):
                xs = [v for s, v in diffs.items() if k is None or kinds[s] == k]
                row.append(_mean(xs, "+"))
            row.append(f"{sum(v > 0 for v in diffs.values())} of {len(diffs)}")
            name = f"neural ({d['choice']['pick']})" if m == "neural" and "choice" in d else m
            out.append(f"| {name} | " + " | ".join(row) + " |")
        # accuracy, macro-F1, mapping, times
        out += ["", "Accuracy / macro-F1 (PEAK test), the test line's kept peaks mapped (coordinate methods: share "
                "matched; neural: as the mapper reports), training seconds:", "",
                "| method | " + " | ".join(str(s) for s in ev) + " |", "|---|" + "---|" * len(ev)]
        for m in methods:
            cells = []
            for s in ev:
                r = runs.get((m, s))
                if not _ok(r):
                    cells.append("refused¹" if r else "–")
                    continue
                pm = r.get("peak_mapping") or {}
                frac = pm.get("fraction_ref_mapped")
                cells.append(f"{r['accuracy']:.3f} / {r['macro_f1']:.3f}; "
                             + (f"{frac:.0%} mapped; " if frac is not None else "")
                             + f"{r['train_seconds'] or 0:.0f} s")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        errors = sorted({re.sub(r"'s \d+ peaks", "'s kept peaks", r["error"].split("]: ", 1)[-1].split(" (method")[0])
                         for r in runs.values() if r.get("error")})
        if errors:
            out += ["", "¹ `xfer train` refused the run (its one-line error): " + "; ".join(errors) + "."]
        fits = [(s, runs[("neural", s)]["mapper_fit"]) for s in ev if ("neural", s) in runs]
        if fits:
            out += ["", "The chosen mapper's fit (`xfer map-peaks`, one thread, wall with the machine shared), its "
                    "size, and its held-out quality on the training-line peaks without a coordinate partner (test "
                    "source cells; F1 of its calls against the zero fill's 0 and the mean fill's; per-peak AUROC):", "",
                    "| pair | fit s | mapper.pt MiB | peaks filled | F1 (mean fill) | AUROC |", "|---|---|---|---|---|---|"]
            for s, f in fits:
                st = f["stats"].get("mapper_stats", {})
                q = st.get("quality", {}).get("unmapped", {})
                nq, mq = q.get("neural", {}), q.get("mean", {})
                out.append(f"| {s} | {f['seconds']:.0f} | {f['mapper_bytes'] / 2**20:.2f} | "
                           f"{st.get('n_network_outputs', '?')} of {st.get('source', {}).get('n_ref_peaks', '?')} | "
                           f"{nq.get('f1') or 0:.3f} ({mq.get('f1') or 0:.3f}) | {nq.get('auroc') or 0:.3f} |")
    if d.get("research"):
        out += ["", "Research size (the unvaried simulator, seed 0: 7,432 / 7,728 cells, 92,328 / 95,098 peaks), "
                "`xfer map-peaks`, one thread, under /usr/bin/time -v:", "",
                "| flags | peaks kept (source) | filled by the network | fit s (map-peaks' own) | wall s | peak RSS GiB "
                "| mapper.pt MiB | parameters | load before |", "|---|---|---|---|---|---|---|---|---|"]
        for r in d["research"]:
            st = r["stats"].get("mapper_stats", {})
            out.append(f"| `{' '.join(r['flags'])}` | {st.get('source', {}).get('n_ref_peaks', '?')} | "
                       f"{st.get('n_network_outputs', '?')} | {st.get('fit_seconds', 0):.0f} | {r['wall_s']:.0f} | "
                       f"{r['max_rss_bytes'] / 2**30:.2f} | {r['mapper_bytes'] / 2**20:.1f} | "
                       f"{st.get('n_parameters', 0):,} | {r['load_before'][0]:.1f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--root", default="bench/_data/peak_mapper")
    r.add_argument("--dev", default=",".join(f"{k}:{v}" for k, v in DEV.items()))
    r.add_argument("--eval", default=",".join(f"{k}:{v}" for k, v in EVAL.items()))
    r.add_argument("--epochs", type=int, default=EPOCHS)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--json", default=str(DEFAULT_JSON))
    r.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="run the work tree's xfer, not a copy of the committed package (see snapshot())")
    r.add_argument("--fresh-snapshot", action="store_true", help="a resumed study: copy the current HEAD instead")
    r.add_argument("--dev-only", action="store_true",
                   help="the development pairs and the choice only (a design study; --json elsewhere, and "
                        "`report JSON --reference bench/results/peak_mapper_methods.json` compares)")
    r.add_argument("--quick", action="store_true",
                   help="smoke test: size tiny, one pair of each, 2 epochs (mapper too), under ROOT/quick, its own JSON")
    q = sub.add_parser("research")
    q.add_argument("--root", default="bench/_data/peak_mapper_research")
    q.add_argument("--json", default=str(DEFAULT_JSON))
    q.add_argument("--flags", nargs=argparse.REMAINDER, help="the rest: map-peaks flags, e.g. --flags --design joint --fill all (default: the study's choice)")
    q.add_argument("--keep", action="store_true", help="keep the research-sized store")
    p = sub.add_parser("report")
    p.add_argument("json", nargs="?", default=str(DEFAULT_JSON))
    p.add_argument("--reference", default=None,
                   help="another study's JSON: its development runs beside these (the same candidate, pair and "
                        "settings at another commit: do they reproduce?)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        root = Path(args.root).resolve()
        if args.quick:
            root = root / "quick"
            out = root / "peak_mapper_methods_quick.json"
            run_study(root, out, {2601: "hard"}, {2611: "varied"}, 2, args.workers, size="tiny", mapper_epochs=2,
                      use_snapshot=args.snapshot, fresh_snapshot=args.fresh_snapshot)
        else:
            out = Path(args.json)
            run_study(root, out, pair_kinds(args.dev), pair_kinds(args.eval), args.epochs, args.workers,
                      use_snapshot=args.snapshot, fresh_snapshot=args.fresh_snapshot, dev_only=args.dev_only)
        print(report(out))
    elif args.cmd == "research":
        research(Path(args.root).resolve(), Path(args.json), args.flags, args.keep)
    else:
        print(report(Path(args.json)))
        if args.reference:
            print("\n" + reproduced(Path(args.json), Path(args.reference)))


if __name__ == "__main__":
    main()
