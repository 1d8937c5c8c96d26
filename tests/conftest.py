"""Shared fixtures: small hand-built datasets and files in temporary directories."""

from __future__ import annotations

import os

# Tests run two xdist workers on two cores: one thread each, or OpenMP spin-waits
# make small torch ops ~20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pytest

from xfer.data.dataset import make_matrix

BARCODES = [f"AAACGT{''.join('ACGT'[(i >> (2 * k)) & 3] for k in range(6))}CA-1" for i in range(12)]
GENES = ["MCM5", "PCNA", "TOP2A", "MKI67", "GAPDH", "ACTB"]
PEAKS = ["chr1:100-600", "chr1:1000-1500", "chr2:50-400", "chr2:900-1300", "chrX:10-300"]
PHASES_OF = ["G1", "S", "G2M", "G1"] * 3


def real_data(name: str):
    """A file of the shared real data sets (../shared/data/real beside the checkout, or
    $XFER_REAL_DATA); tests that need it skip when it is absent."""
    from pathlib import Path
    here = Path(__file__).resolve().parent
    for d in (os.environ.get("XFER_REAL_DATA"), here.parent.parent / "shared" / "data" / "real",
              Path("/work/shared/data/real")):
        if d and (Path(d) / name).exists():
            return Path(d) / name
    pytest.skip(f"real data set {name} not found (set XFER_REAL_DATA)")


def pytest_configure(config):
    import torch
    torch.set_num_threads(1)


def _counts(n, m, seed, density=0.4):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n, m)) * (rng.random((n, m)) < density)
    X[:, 0] += 1  # no all-zero rows
    return X.astype(np.float32)


@pytest.fixture
def gex_ds():
    X = _counts(len(BARCODES), len(GENES), 0)
    from xfer.phases import encode_phases
    return make_matrix(X, BARCODES, GENES, encode_phases(PHASES_OF, "t", "phase"), modality="gex", name="gex")


@pytest.fixture
def peak_ds():
    X = _counts(len(BARCODES), len(PEAKS), 1)
    from xfer.phases import encode_phases
    return make_matrix(X, BARCODES, PEAKS, encode_phases(PHASES_OF, "t", "phase"), modality="peak", name="peak")


def write_csv(path, barcodes, features, X, phase=None, index_name="barcode"):
    df = pd.DataFrame(np.asarray(X), index=pd.Index(barcodes, name=index_name), columns=features)
    if phase is not None:
        df["phase"] = phase
    df.to_csv(path)
    return path


def write_labels(path, barcodes, phases, cols=("barcode", "phase")):
    pd.DataFrame({cols[0]: barcodes, cols[1]: phases}).to_csv(path, index=False)
    return path


@pytest.fixture
def research_files(tmp_path):
    """One paired line in the original research code's CSV layout: GEX/PEAK CSVs and a labels CSV."""
    gx = _counts(len(BARCODES), len(GENES), 0)
    pk = _counts(len(BARCODES), len(PEAKS), 1)
    return {
        "gex": write_csv(tmp_path / "L_GEX.csv", BARCODES, GENES, gx),
        "peak": write_csv(tmp_path / "L_PEAK.csv", BARCODES, PEAKS, pk),
        "labels": write_labels(tmp_path / "L_labels.csv", BARCODES, PHASES_OF),
        "X_gex": gx, "X_peak": pk, "dir": tmp_path,
    }


def study_states(db) -> dict:
    """{state: count} of a sweep's Optuna study (SQLite); empty while it does not exist or is locked."""
    import sqlite3
    from pathlib import Path

    if not Path(db).exists():
        return {}
    try:
        with sqlite3.connect(db) as c:
            return dict(c.execute("select state, count(*) from trials group by state").fetchall())
    except sqlite3.Error:
        return {}



def free_port_block(n: int = 50) -> int:
    """A port P with P..P+n free on 127.0.0.1, in 20000-32000 (clear of Ray's worker ports and the
    ephemeral range): a Ray head's ports start at P."""
    import random
    import socket

    for _ in range(200):
        p = random.randrange(20000, 32000 - n, 10)
        socks = []
        try:
            for q in range(p, p + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", q))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return p
    raise RuntimeError("no free port block")


def stop_process(proc, timeout: float = 30) -> None:
    """Terminate a server a test started; kill it if it does not exit within `timeout` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- training fixtures

SMALL_MODEL = {"hidden_dim": 64, "latent_dim": 32, "proj_hidden": 64, "cls_hidden": 32, "disc_hidden": 64,
               "batch_size": 64, "epochs": 3, "n_components": 16, "warmup_epochs": 1,
               "ensemble": 1}  # one member (the shipped default is 3): the ensemble tests set it themselves


@pytest.fixture(scope="session")
def tiny_pair():
    from xfer.data.simulate import simulate_pair
    return simulate_pair("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_train(tiny_pair):
    """(cfg, TrainData, PeakPreprocessor, test LineInputs) on the tiny simulated pair."""
    from xfer.config import TrainConfig
    from xfer.embed import PCAEmbedder, embed_lines
    from xfer.prepare import prepare_line, prepare_training

    A, B = tiny_pair
    cfg = TrainConfig.from_dict(SMALL_MODEL)
    emb = embed_lines(PCAEmbedder(cfg.data.n_components), A.gex, {"test": B.gex})
    data, pre = prepare_training(A.gex, A.peak, emb["train"], cfg.data, cfg.optim.seed)
    test = prepare_line("B", pre, gex=B.gex, emb=emb["test"], peaks=B.peak)
    return cfg, data, pre, test


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_pair):
    """The tiny pair in a store: A_GEX, A_PEAK (training line), B_GEX, B_PEAK (test line),
    and the test line again with every label changed (B_*_relabelled: G1->S->G2M->G1)."""
    from xfer.data.store import CellStore

    root = tmp_path_factory.mktemp("tiny_store")
    store = CellStore(str(root))
    A, B = tiny_pair
    for ds, name in ((A.gex, "A_GEX"), (A.peak, "A_PEAK"), (B.gex, "B_GEX"), (B.peak, "B_PEAK")):
        store.write(ds, name)
    for ds, name in ((B.gex, "B_GEX_relabelled"), (B.peak, "B_PEAK_relabelled")):
        store.write(ds.with_labels((ds.labels + 1) % 3), name)
    return root


# ----------------------------------------------------------------------------- a tiny Geneformer

def write_tiny_bert(path, *, layers=2, max_pos=4096, vocab=28, seed=0) -> str:
    """A tiny random Geneformer-shaped BERT checkpoint (hidden size 16) saved under `path`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=max_pos, pad_token_id=0, hidden_act="relu")
    BertForMaskedLM(cfg).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sim_geneformer(tmp_path_factory, tiny_pair):
    """`xfer embed` flags of a tiny Geneformer-style model whose dictionaries cover the simulator's genes."""
    import json

    A, _ = tiny_pair
    ids = list(A.gex.feature_ids[:300])
    d = tmp_path_factory.mktemp("sim_gf")
    tok = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(ids)}}
    (d / "tok.json").write_text(json.dumps(tok))
    (d / "med.json").write_text(json.dumps({g: 1.0 + (i % 7) / 3 for i, g in enumerate(ids)}))
    (d / "map.tsv").write_text("symbol\tensembl_id\n" + "".join(
        f"{s}\t{e}\n" for s, e in zip(A.gex.features[:300], ids)))
    return ["--model_path", write_tiny_bert(d / "model", vocab=len(tok)), "--token_dictionary_file",
            str(d / "tok.json"), "--gene_median_file", str(d / "med.json"), "--gene_mapping_file", str(d / "map.tsv")]
