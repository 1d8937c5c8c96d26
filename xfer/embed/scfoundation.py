"""scFoundation cell embeddings: import what its own get_embedding.py wrote, or run it on a local copy.

scFoundation (biomap-research/scFoundation) needs its own code, environment and checkpoint,
so xfer never reimplements it:

import  --scfoundation_npy EMB.npy --scfoundation_barcodes BARCODES.txt
        The .npy that model/get_embedding.py saves (`--output_type cell`): one row per cell
        in the order of its input, 3,072 columns with `--pool_type all` (the default) or 768
        with `--pool_type max`; the barcodes file lists the cells of its input in that order
        (one per line; or a CSV whose `barcode` column, else first column, holds them).
        The file is read with allow_pickle=False; its width, its row count and its
        barcodes are checked, and rows are matched to the dataset's cells by barcode (every
        cell must be there once; extra rows are ignored). Several files (one per line) may
        be given; each dataset takes the file that holds all its cells.

run     --scfoundation_dir DIR   (the repository, or its model/ directory, with
        get_embedding.py, OS_scRNA_gene_index.19264.tsv and models/models.ckpt)
        The wrapper writes the dataset's raw counts on scFoundation's 19,264 genes (by gene
        symbol, missing genes as zeros) to a temporary .npz, runs

            python get_embedding.py --task_name xfer_<hash> --input_type singlecell
                --output_type cell --pool_type all --tgthighres t4 --pre_normalized F
                --version ce --ckpt_name 01B-resolution --data_path <npz> --save_path <dir>

        in that directory (with --scfoundation_python, default this Python) and imports the
        .npy it writes. Both paths store under the same key settings.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.dataset import CellMatrix
from ..errors import ConfigError, InputError
from .base import Embedder
from .pca import align_genes

log = logging.getLogger(__name__)

NAME = "scfoundation"
POOL_DIMS = {3072: "all", 768: "max"}
GENE_LIST_FILE = "OS_scRNA_gene_index.19264.tsv"
CHECKPOINT_FILE = "models/models.ckpt"
SCRIPT = "get_embedding.py"


def scfoundation_settings(pool: str, tgthighres: str = "t4", version: str = "ce") -> dict:
    """What determines the output of get_embedding.py for cell embeddings (the store key settings)."""
    if pool not in ("all", "max"):
        raise ConfigError("scfoundation_pool", f"must be all or max, got {pool!r}")
    return {"model": "scFoundation", "script": SCRIPT, "input_type": "singlecell", "output_type": "cell",
            "pool": pool, "tgthighres": tgthighres, "version": version, "pre_normalized": "F"}


def read_barcodes(path: str | Path) -> np.ndarray:
    """Barcodes, one per line (a 'barcode' header line is skipped), or a CSV's barcode/first column."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(p, None, "--scfoundation_barcodes: no such file")
    if p.suffix.lower() == ".csv":
        df = pd.read_csv(p, dtype=str)
        col = next((c for c in df.columns if c.lower() in ("barcode", "barcodes", "cell", "obs_names")), df.columns[0])
        bcs = df[col].astype(str).str.strip().to_numpy(dtype=object)
    else:
        lines = [ln.split("\t")[0].strip() for ln in p.read_text().splitlines()]
        lines = [ln for ln in lines if ln]
        if lines and lines[0].lower() in ("barcode", "barcodes", "cell", "obs_names"):
            lines = lines[1:]
        bcs = np.array(lines, dtype=object)
    if len(bcs) == 0:
        raise InputError(p, "barcode", "no barcodes in the file")
    seen: set = set()
    for b in bcs:
        if b in seen:
            raise InputError(p, "barcode", f"barcode '{b}' appears twice")
        seen.add(b)
    return bcs


def load_embedding_file(npy: str | Path, barcodes: np.ndarray, barcodes_source: str = "") -> np.ndarray:
    """A get_embedding.py cell-embedding .npy, validated against its barcodes; float32 (n, d)."""
    p = Path(npy).expanduser()
    if not p.is_file():
        raise InputError(p, None, "--scfoundation_npy: no such file")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise InputError(p, None, f"not a numeric .npy array ({e})") from None
    except OSError as e:
        raise InputError(p, None, f"unreadable .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(p, None, "expected a .npy array, found an .npz archive")
    if arr.ndim == 1 and len(barcodes) == 1:  # get_embedding.py squeezes a single cell to 1-D
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(p, "shape", f"expected a 2-D array (cells x dimensions), got shape {arr.shape}")
    if arr.shape[1] not in POOL_DIMS:
        raise InputError(p, "shape", f"has {arr.shape[1]} columns; scFoundation cell embeddings have 3,072 "
                         "(--pool_type all) or 768 (--pool_type max)")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(p, "dtype", f"expected numbers, got {arr.dtype}")
    if arr.shape[0] != len(barcodes):
        raise InputError(p, "shape", f"{arr.shape[0]} rows, but {len(barcodes)} barcodes in "
                         f"{barcodes_source or 'the barcodes file'}: they must list the same cells in the same order")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputError(p, None, "holds non-finite values")
    return arr


def _npy_width(path: str | Path) -> int:
    p = Path(path).expanduser()
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputError(p, None, "--scfoundation_npy: no such file") from None
    except (ValueError, OSError) as e:
        raise InputError(p, None, f"not a numeric .npy array ({e})") from None
    return int(arr.shape[-1]) if arr.ndim else 0


def match_rows(ds: CellMatrix, file_barcodes: np.ndarray, source: str) -> np.ndarray:
    """Row of the file for each cell of ds (every cell must be present)."""
    pos = {b: i for i, b in enumerate(file_barcodes)}
    idx = np.array([pos.get(b, -1) for b in ds.barcodes], dtype=np.int64)
    missing = np.flatnonzero(idx < 0)
    if len(missing):
        raise InputError(source, "barcode", f"{len(missing)} of {ds.n_cells} cells of {ds.name or ds.source} are not "
                         f"in it (e.g. '{ds.barcodes[missing[0]]}')")
    if len(file_barcodes) > ds.n_cells:
        log.info("%s: using %d of its %d rows (the cells of %s)", source, ds.n_cells, len(file_barcodes),
                 ds.name or ds.source)
    return idx


class ScFoundationImport(Embedder):
    """scFoundation embeddings imported from get_embedding.py's .npy files (frozen)."""

    name = NAME

    def __init__(self, npy_files: list[str], barcode_files: list[str] | None, tgthighres: str = "t4",
                 version: str = "ce"):
        npy_files = [npy_files] if isinstance(npy_files, (str, Path)) else list(npy_files)
        barcode_files = [barcode_files] if isinstance(barcode_files, (str, Path)) else list(barcode_files or [])
        if len(barcode_files) != len(npy_files):
            raise ConfigError("scfoundation_barcodes", f"give one barcodes file per --scfoundation_npy file "
                              f"({len(npy_files)} .npy, {len(barcode_files)} barcodes files)")
        widths = {str(f): _npy_width(f) for f in npy_files}
        if len(set(widths.values())) > 1:
            raise InputError(npy_files[1], "shape", f"the .npy files differ in width ({widths}): use one --pool_type")
        width = next(iter(widths.values()))
        if width not in POOL_DIMS:
            raise InputError(npy_files[0], "shape", f"has {width} columns; scFoundation cell embeddings have 3,072 "
                             "(--pool_type all) or 768 (--pool_type max)")
        self.files = list(zip(map(str, npy_files), map(str, barcode_files)))
        self.pool = POOL_DIMS[width]
        self.tgthighres, self.version = tgthighres, version

    def settings(self) -> dict:
        return scfoundation_settings(self.pool, self.tgthighres, self.version)

    def transform(self, ds: CellMatrix) -> np.ndarray:
        cells = set(ds.barcodes)
        holders = []
        for npy, bc_file in self.files:
            bcs = read_barcodes(bc_file)
            if cells.issubset(bcs):
                holders.append((npy, bc_file, bcs))
        if not holders:
            raise InputError(ds.source or ds.name, "barcode", f"no --scfoundation_barcodes file lists all {ds.n_cells} "
                             f"cells of {ds.name or ds.source} (files: {', '.join(b for _, b in self.files)})")
        if len(holders) > 1:
            raise InputError(ds.source or ds.name, "barcode", f"several --scfoundation_barcodes files list all cells "
                             f"of {ds.name or ds.source} ({', '.join(h[1] for h in holders)}): embed one line at a time")
        npy, bc_file, bcs = holders[0]
        vec = load_embedding_file(npy, bcs, bc_file)
        return vec[match_rows(ds, bcs, npy)]


class ScFoundationRunner(Embedder):
    """Runs scFoundation's own get_embedding.py on a local copy of its code and checkpoint (frozen)."""

    name = NAME

    def __init__(self, code_dir: str, pool: str = "all", python: str | None = None, tgthighres: str = "t4",
                 version: str = "ce", ckpt_name: str = "01B-resolution", work_dir: str | None = None):
        self.script_dir = self.find_script_dir(code_dir)
        self.pool = pool
        scfoundation_settings(pool, tgthighres, version)  # validates
        self.python = python or sys.executable
        self.tgthighres, self.version, self.ckpt_name = tgthighres, version, ckpt_name
        self.work_dir = work_dir

    @staticmethod
    def find_script_dir(code_dir: str | Path) -> Path:
        d = Path(code_dir).expanduser()
        for cand in (d, d / "model"):
            if (cand / SCRIPT).is_file():
                for need in (GENE_LIST_FILE, CHECKPOINT_FILE):
                    if not (cand / need).is_file():
                        raise InputError(cand / need, None, "--scfoundation_dir: get_embedding.py needs this file "
                                         "(scFoundation's gene list / checkpoint, see its README)")
                return cand
        raise InputError(d, None, f"--scfoundation_dir: no {SCRIPT} here or in model/ (give scFoundation's "
                         "repository with its checkpoint)")

    def settings(self) -> dict:
        return scfoundation_settings(self.pool, self.tgthighres, self.version)

    def command(self, data_path: str, save_path: str, task_name: str) -> list[str]:
        """The get_embedding.py command line (run in `script_dir`)."""
        return [self.python, SCRIPT, "--task_name", task_name, "--input_type", "singlecell", "--output_type", "cell",
                "--pool_type", self.pool, "--tgthighres", self.tgthighres, "--data_path", data_path,
                "--save_path", save_path, "--pre_normalized", "F", "--version", self.version,
                "--ckpt_name", self.ckpt_name]

    def output_path(self, save_path: str, task_name: str) -> Path:
        """Where get_embedding.py saves the cell embeddings."""
        return Path(save_path) / f"{task_name}_{self.ckpt_name}_singlecell_cell_embedding_{self.tgthighres}_resolution.npy"

    def gene_list(self) -> np.ndarray:
        df = pd.read_csv(self.script_dir / GENE_LIST_FILE, sep="\t", dtype=str)
        if "gene_name" not in df.columns:
            raise InputError(self.script_dir / GENE_LIST_FILE, "gene_name", "column missing")
        return df["gene_name"].to_numpy(dtype=object)

    def transform(self, ds: CellMatrix) -> np.ndarray:
        genes = self.gene_list()
        X = align_genes(ds, genes)
        n_found = len(set(ds.features) & set(genes))
        log.info("scFoundation on %s: %d of its %d genes found in the data", ds.name or ds.source, n_found, len(genes))
        task = f"xfer_{ds.content_hash()[:12]}"
        with tempfile.TemporaryDirectory(prefix="xfer_scf_", dir=self.work_dir) as tmp:
            data_path = str(Path(tmp) / f"{task}.npz")
            sp.save_npz(data_path, sp.csr_matrix(X, dtype=np.float32))
            (Path(tmp) / f"{task}_barcodes.txt").write_text("\n".join(map(str, ds.barcodes)) + "\n")
            cmd = self.command(data_path, tmp, task)
            log.info("running scFoundation in %s: %s", self.script_dir, shlex.join(cmd))
            res = subprocess.run(cmd, cwd=self.script_dir)
            if res.returncode != 0:
                raise InputError(self.script_dir / SCRIPT, None, f"exited with status {res.returncode} "
                                 "(its output is above)")
            out = self.output_path(tmp, task)
            if not out.is_file():
                raise InputError(out, None, f"{SCRIPT} finished but did not write this file")
            vec = load_embedding_file(out, ds.barcodes, "the cells given to get_embedding.py")
        want = 3072 if self.pool == "all" else 768
        if vec.shape[1] != want:
            raise InputError(self.script_dir / SCRIPT, "pool_type", f"wrote {vec.shape[1]} columns, expected {want}")
        return vec


def scfoundation_from_settings(**kw) -> Embedder:
    """Import (--scfoundation_npy) or run (--scfoundation_dir) from command-line style keywords."""
    if kw.get("scfoundation_npy"):
        return ScFoundationImport(kw["scfoundation_npy"], kw.get("scfoundation_barcodes"))
    return ScFoundationRunner(kw["scfoundation_dir"], pool=kw.get("scfoundation_pool") or "all",
                              python=kw.get("scfoundation_python"))
