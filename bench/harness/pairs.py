"""Simulated pairs in a cell store, and the data flags and arguments that name them.

Every benchmark's pair lives in a cell store under four dataset names: A_GEX and A_PEAK, the
training line (labelled), B_GEX and B_PEAK, the test line (whose labels only score). A
"prepared pair" is a folder ROOT/pair<seed>/ with that store and settings.json (the pair's
drawn sizes and assumptions, `xfer simulate --vary`): the studies over varied pairs read those.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .commands import XFER

TRAIN, TEST = ("A_GEX", "A_PEAK"), ("B_GEX", "B_PEAK")


def data_flags(store: str | Path, test: bool = True) -> list[str]:
    """The data flags of `xfer train` / `xfer tune` for the pair in `store`: the training line,
    and with `test` the test line's expression and (unlabelled) accessibility."""
    flags = ["--store", str(store), "--src_csv", f"store:{TRAIN[0]}", "--tgt_csv", f"store:{TRAIN[1]}"]
    if test:
        flags += ["--test_csv", f"store:{TEST[0]}", "--sup_peak_csv", f"store:{TEST[1]}"]
    return flags


def pair_flags(pair_dir: Path) -> list[str]:
    """data_flags of a prepared pair (its store under pair_dir/store)."""
    return data_flags(Path(pair_dir) / "store")


def pair_data(pair_dir: Path, test: bool = True):
    """The data sources (xfer.data.inputs.DataSources) that `xfer.pipeline.load_for_training`,
    `prepare` and `evaluate_checkpoint` take for a prepared pair: the same inputs as pair_flags
    (without `test`: the training line alone)."""
    from xfer.data.inputs import DataSources

    return DataSources(src=f"store:{TRAIN[0]}", tgt=f"store:{TRAIN[1]}",
                       test=f"store:{TEST[0]}" if test else None, sup_peak=f"store:{TEST[1]}" if test else None,
                       store=str(Path(pair_dir) / "store"))


def simulate_into_store(stores: str | Path | list, size="small", seed: int = 0, *, vary: bool = False,
                        lines: str = "AB", test_cells: int | None = None) -> dict:
    """Simulate a pair (`xfer.data.simulate.simulate_pair`) and write its lines into each store
    (a path or URI, or a list of them) as A_GEX, A_PEAK (and B_GEX, B_PEAK), replacing what was
    there. `size`: a simulator size name or SimSize; `vary`: the pair's sizes and assumptions
    drawn with `seed` from the documented ranges (`xfer simulate --vary`); `lines`: which lines
    to write; `test_cells`: simulate the test line with at most that many cells (the training
    line is the same cell for cell: each line is drawn from its own streams). Returns the sizes,
    the drawn settings (None without `vary`) and the seconds taken."""
    from dataclasses import asdict

    from xfer.data.simulate import SIZES, SimSize, draw_settings, simulate_pair
    from xfer.data.store import CellStore

    sz, settings = (draw_settings(seed, size) if vary else (SIZES[size] if isinstance(size, str) else size, None))
    if test_cells is not None:
        sz = SimSize(sz.n_cells_a, min(test_cells, sz.n_cells_b), sz.n_genes, sz.n_peaks)
    t = time.perf_counter()
    a, b = simulate_pair(sz, seed=seed, settings=settings)
    t_sim = time.perf_counter() - t
    for store in (stores if isinstance(stores, list) else [stores]):
        st = CellStore(str(store))
        for line, names in (("A", TRAIN), ("B", TEST)):
            if line in lines:
                ln = a if line == "A" else b
                st.write(ln.gex, names[0], overwrite=True)
                st.write(ln.peak, names[1], overwrite=True)
    return {"seed": seed, "size": asdict(sz), "settings": settings.to_dict() if settings else None,
            "cells": [a.gex.n_cells, b.gex.n_cells], "genes": a.gex.n_features, "peaks": a.peak.n_features,
            "simulate_s": t_sim, "store_write_s": time.perf_counter() - t - t_sim}


def prepare_pairs(root: Path, seeds, size: str = "medium") -> None:
    """Prepared pairs ROOT/pair<seed>/ (store and settings.json) with varied settings, each drawn
    from its seed; a pair whose settings.json exists is kept."""
    from xfer.data.fs import write_json

    for seed in seeds:
        d = Path(root) / f"pair{seed}"
        if (d / "settings.json").exists():
            continue
        info = simulate_into_store(d / "store", size, seed, vary=True)
        write_json(d / "settings.json", {k: info[k] for k in ("seed", "size", "settings")})
        print(f"pair {seed}: {info['size']['n_cells_a']} / {info['size']['n_cells_b']} cells, prepared in "
              f"{info['simulate_s'] + info['store_write_s']:.0f} s", flush=True)


def pair_settings(pair_dir: Path) -> dict | None:
    """A prepared pair's settings.json (None when absent)."""
    f = Path(pair_dir) / "settings.json"
    return json.loads(f.read_text()) if f.exists() else None


def population_tune_argv(store: Path, out: Path, population: int, n_trials: int, epochs: int, num_cpus: int,
                         *extra: str) -> list[str]:
    """The demo's `xfer tune` (the shipped design) on the pair in `store`, its test line's cells
    unlabelled, one CPU per trial, each trial a population of `population` members."""
    return [*XFER, "tune", *data_flags(store), "--n_trials", str(n_trials),
            "--search_epochs", str(epochs), "--num_cpus", str(num_cpus), "--cpus_per_trial", "1",
            "--population", str(population), "--output_folder", str(out), "--progress_every", "600", *extra]
