"""Embedders: one contract for all; Geneformer tokeniser / loader / pooling against transformers;
safe dictionaries; scFoundation import and wrapper; ensemble; store hand-off and `xfer embed`.

Everything runs on tiny random models and dictionaries written to temporary directories."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import write_tiny_bert
from xfer.data.dataset import make_matrix
from xfer.data.embed_store import EmbeddingKey, EmbeddingStore
from xfer.embed import PCAEmbedder, embed_lines, make_embedder, resolve_source_model
from xfer.embed.dictionaries import dictionary_hash, load_dictionary
from xfer.embed.geneformer import (GeneformerEmbedder, GeneformerVocab, add_special_tokens, map_genes, plan_batches,
                                   rank_value_tokens)
from xfer.embed.scfoundation import ScFoundationImport, ScFoundationRunner
from xfer.embed.stored import StoredEmbedder, data_flags_from_argv
from xfer.errors import ConfigError, InputError, StoreError

N_GENES = 24
ENS = [f"ENSG{i:011d}" for i in range(1, N_GENES + 1)]
SYMS = [f"GENE{i}" for i in range(1, N_GENES + 1)]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gf(tmp_path_factory):
    """Tiny Geneformer-style files: V2 model, V1 model, dictionaries in JSON / TSV."""
    d = tmp_path_factory.mktemp("gf")
    tok = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(ENS)}}
    rng = np.random.default_rng(0)
    med = {g: float(m) for g, m in zip(ENS, rng.uniform(0.5, 4.0, N_GENES))}
    (d / "tok.json").write_text(json.dumps(tok))
    (d / "tok_v1.json").write_text(json.dumps({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(ENS)}}))
    (d / "med.json").write_text(json.dumps(med))
    (d / "map.tsv").write_text("symbol\tensembl_id\n" + "".join(f"{s}\t{e}\n" for s, e in zip(SYMS, ENS)))
    return {"dir": d, "tok": str(d / "tok.json"), "tok_v1": str(d / "tok_v1.json"), "med": str(d / "med.json"),
            "map": str(d / "map.tsv"), "model": write_tiny_bert(d / "v2"),
            "model_v1": write_tiny_bert(d / "v1", max_pos=2048, vocab=N_GENES + 2, seed=1)}


def expr(n=14, seed=0, ids=True, name="lineA"):
    """Counts over the 24 symbols plus two genes outside the vocabulary."""
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.5, (n, N_GENES + 2)) * (rng.random((n, N_GENES + 2)) < 0.6)
    X[:, 0] += 1
    feats = SYMS + ["MT-CO1", "LINC0001"]
    fids = ENS + ["ENSG99999999998", "ENSG99999999999"] if ids else None
    return make_matrix(X.astype(np.float32), [f"{name}_{i:03d}" for i in range(n)], feats, modality="gex",
                       name=name, source=f"{name}.csv", feature_ids=fids)


def geneformer(gf, **kw):
    kw.setdefault("progress", False)
    return GeneformerEmbedder(gf["model"], gf["tok"], gf["med"], gf["map"], **kw)


def scf_files(tmp, datasets, dim=768, seed=0):
    """scFoundation-like outputs: one shuffled .npy + barcodes file per dataset."""
    npys, bcs = [], []
    for k, ds in enumerate(datasets):
        rng = np.random.default_rng(seed + k)
        perm = rng.permutation(ds.n_cells)
        emb = rng.normal(size=(ds.n_cells, dim)).astype(np.float32)
        np.save(tmp / f"scf{k}.npy", emb[perm])
        (tmp / f"scf{k}.txt").write_text("\n".join(ds.barcodes[perm]) + "\n")
        npys.append(str(tmp / f"scf{k}.npy"))
        bcs.append(str(tmp / f"scf{k}.txt"))
    return npys, bcs


def _hf_reference(model_dir, seqs, hidden_index, pooling, special):
    import torch
    from transformers import BertModel

    m = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            h = m(input_ids=torch.tensor(s)[None], output_hidden_states=True).hidden_states[hidden_index][0]
            out.append((h[0] if pooling == "cls" else (h[1:-1] if special else h).mean(0)).numpy())
    return np.stack(out)


# ----------------------------------------------------------------------------- contract

def _stored_factory(gf, tmp, train, others):
    store = EmbeddingStore(str(tmp / "store"))
    live = geneformer(gf)
    for ds in [train, *others]:
        store.put(EmbeddingKey(ds.content_hash(), live.name, live.settings()), ds.barcodes, live.transform(ds))
    return make_embedder("geneformer", store=store, train=train)


def _ensemble_factory(gf, tmp, train, others):
    store = EmbeddingStore(str(tmp / "store"))
    npys, bcs = scf_files(tmp, [train])
    embed_lines(ScFoundationImport(npys, bcs), train, {f"o{i}": o for i, o in enumerate(others)}, store)
    embed_lines(geneformer(gf), train, {f"o{i}": o for i, o in enumerate(others)}, store)
    return make_embedder("ensemble", ensemble_model1="geneformer", ensemble_model2="scfoundation", store=store,
                         train=train)


FACTORIES = {
    "pca": lambda gf, tmp, train, others: PCAEmbedder(n_components=5),
    "geneformer-packed": lambda gf, tmp, train, others: geneformer(gf, attention="packed", batch_tokens=64),
    "geneformer-padded": lambda gf, tmp, train, others: geneformer(gf, attention="padded", batch_tokens=64),
    "geneformer-v1-layer0": lambda gf, tmp, train, others: GeneformerEmbedder(
        gf["model_v1"], gf["tok_v1"], gf["med"], gf["map"], layer=0, progress=False),
    "scfoundation-import": lambda gf, tmp, train, others: ScFoundationImport(*scf_files(tmp, [train])),
    "scfoundation-run": lambda gf, tmp, train, others: make_embedder("scfoundation",
                                                                     scfoundation_dir=fake_scfoundation(tmp)),
    "stored": _stored_factory,
    "ensemble": _ensemble_factory,
}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_embedder_contract(kind, gf, tmp_path):
    """Shape, dtype, finite, deterministic, and the rows follow the cells' order."""
    train = expr(14, seed=1)
    perm = np.random.default_rng(5).permutation(train.n_cells)
    shuffled = train.subset_cells(perm)
    emb = FACTORIES[kind](gf, tmp_path, train, [shuffled])
    emb.fit(train)
    a = emb.transform(train)
    assert a.dtype == np.float32 and a.ndim == 2 and a.shape[0] == train.n_cells and a.shape[1] > 0
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(emb.transform(train), a)  # deterministic
    np.testing.assert_allclose(emb.transform(shuffled), a[perm], rtol=1e-5, atol=1e-5)  # order preserved
    s = emb.settings()
    assert json.loads(json.dumps(s)) == s and "device" not in json.dumps(s)  # JSON as it is: part of the store key
    assert emb.name and emb.state()["name"] == emb.name


# ----------------------------------------------------------------------------- tokeniser

def test_rank_value_tokens_hand_computed(tmp_path):
    vocab = GeneformerVocab(token_ids={"<pad>": 0, "<cls>": 2, "<eos>": 3, "ENSA": 4, "ENSB": 5, "ENSC": 6,
                                       "ENSD": 7, "ENSE": 8},
                            medians={"ENSA": 1.0, "ENSB": 2.0, "ENSC": 0.5, "ENSD": 4.0, "ENSE": 1.0},
                            mapping={"A": "ENSA", "B": "ENSB", "C": "ENSC", "D": "ENSD", "A_ALIAS": "ENSA"},
                            token_file="tok", median_file="med", mapping_file="map")
    # columns: A, B, C, D, X (not in the vocabulary: still counts in the cell total), A_ALIAS (summed into A)
    X = np.array([[2, 4, 1, 0, 3, 1],    # total 11: A (2+1)/11e4/1 = 2727; B 4/11e4/2 = 1818; C 1/11e4/0.5 = 1818
                  [0, 1, 0, 8, 0, 0],    # total 9:  D 8/9e4/4 = 2222; B 1/9e4/2 = 556
                  [0, 0, 0, 0, 5, 0]],   # only an unknown gene: no token
                 dtype=np.float32)
    ds = make_matrix(X, ["c1", "c2", "c3"], ["A", "B", "C", "D", "X", "A_ALIAS"], modality="gex")
    gmap = map_genes(ds, vocab)
    assert gmap.n_genes == 4 and gmap.n_columns_mapped == 5
    toks = rank_value_tokens(ds.X, gmap, max_genes=2048)
    # B and C tie (1818.18): column order decides (B first)
    assert [t.tolist() for t in toks] == [[4, 5, 6], [7, 5], []]
    assert [t.tolist() for t in rank_value_tokens(ds.X, gmap, max_genes=2)] == [[4, 5], [7, 5], []]
    assert [s.tolist() for s in add_special_tokens(toks, vocab, "V2")] == [[2, 4, 5, 6, 3], [2, 7, 5, 3], [2, 3]]
    assert [s.tolist() for s in add_special_tokens(toks, vocab, "V1")] == [[4, 5, 6], [7, 5], []]


def test_truncation_to_model_input(gf):
    e = geneformer(gf)
    e.max_length = 6  # 4 genes + <cls>/<eos>
    seqs = e.tokenize(expr(5, seed=2))
    assert all(len(s) <= 6 and s[0] == 2 and s[-1] == 3 for s in seqs)
    assert max(len(s) for s in seqs) == 6


def test_gene_ids_win_over_symbols_and_versions_are_stripped(gf):
    vocab = GeneformerVocab.load(gf["tok"], gf["med"], gf["map"])
    # symbol GENE1 maps to ENS[0], but its Ensembl id (with a version) says ENS[5]
    ds = make_matrix(np.ones((2, 2), np.float32), ["a", "b"], ["GENE1", "GENE2"], modality="gex",
                     feature_ids=[ENS[5] + ".7", "not-an-id"])
    gm = map_genes(ds, vocab)
    assert sorted(gm.tokens.tolist()) == sorted([vocab.token_ids[ENS[5]], vocab.token_ids[ENS[1]]])
    # without a mapping file, symbols do not reach the vocabulary
    bare = GeneformerVocab.load(gf["tok"], gf["med"], None)
    with pytest.raises(InputError, match="gene_mapping_file") as ei:
        map_genes(expr(3, ids=False), bare)
    assert ei.value.field == "features"


def test_plan_batches_token_budget():
    lens = np.array([5, 30, 12, 30, 7, 1, 18])
    for padded in (False, True):
        bs = plan_batches(lens, 40, padded=padded)
        flat = np.concatenate(bs)
        assert sorted(flat.tolist()) == list(range(len(lens)))
        assert list(lens[flat]) == sorted(lens, reverse=True)
        for b in bs:
            cost = len(b) * lens[b].max() if padded else lens[b].sum()
            assert cost <= 40 or len(b) == 1
    assert all(len(b) <= 2 for b in plan_batches(lens, 10_000, padded=False, max_cells=2))


# ----------------------------------------------------------------------------- model and pooling

@pytest.mark.parametrize("attention,pooling,layer", [("packed", "mean", -1), ("padded", "mean", 0),
                                                     ("packed", "cls", 0), ("padded", "cls", -1)])
def test_geneformer_matches_transformers(gf, attention, pooling, layer):
    e = geneformer(gf, attention=attention, pooling=pooling, layer=layer, batch_tokens=40)
    ds = expr(9, seed=3)
    got = e.transform(ds)
    ref = _hf_reference(gf["model"], e.tokenize(ds), 2 + layer, pooling, special=True)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    s = e.settings()
    assert (s["layer"], s["pooling"], s["version"], s["max_length"]) == (layer, pooling, "V2", 4096)


def test_equal_length_batch_takes_dense_sdpa_and_matches_transformers(gf):
    """A batch whose cells all have the same length runs as one dense (B, L) SDPA call."""
    import torch
    from transformers import BertModel

    from xfer.embed.geneformer import BertCellEncoder

    rng = np.random.default_rng(5)
    seqs = [np.r_[2, rng.integers(4, 4 + N_GENES, 10), 3] for _ in range(5)]
    m = BertModel.from_pretrained(gf["model"], add_pooling_layer=False).eval()
    enc = BertCellEncoder(m, attention="packed", device="cpu")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **k):
        calls.append(tuple(q.shape))
        return real(q, *a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        got = enc.embed(seqs, pooling="mean", special=True, batch_tokens=10_000, progress=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls and all(c[0] == 5 for c in calls)  # whole batch at once, not one call per cell
    ref = _hf_reference(gf["model"], seqs, enc.n_layers, "mean", special=True)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_varlen_attention_plumbing(gf, monkeypatch):
    """The GPU path's varlen_attn call (cu_seqlens, (T, H, D) layout) against per-cell SDPA on the CPU."""
    import torch
    import torch.nn.attention.varlen as varlen

    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        assert q.shape == k.shape == v.shape and q.dim() == 3 and cu_q.dtype == torch.int32
        assert int(cu_q[-1]) == q.shape[0] and max_q == int((cu_q[1:] - cu_q[:-1]).max())
        calls.append(len(cu_q) - 1)
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
        return out

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen)
    ds = expr(8, seed=4)
    ref = geneformer(gf, attention="packed").transform(ds)
    e = geneformer(gf, attention="packed", batch_tokens=50)
    e.encoder.varlen = True
    np.testing.assert_allclose(e.transform(ds), ref, rtol=1e-5, atol=1e-6)
    # layer -1 of 2: one layer runs; batches whose cells all have one length go to dense SDPA instead
    lens = np.array([len(t) for t in e.tokenize(ds)])
    mixed = [b for b in plan_batches(lens, 50, padded=False) if len(set(lens[b])) > 1]
    assert mixed and sum(calls) == sum(len(b) for b in mixed) * e.encoder.n_layers


def test_zero_cells_get_zero_vectors(gf, caplog):
    ds = expr(4, seed=6)
    X = ds.X.toarray()
    X[2, :N_GENES] = 0
    ds2 = replace(ds, X=sp.csr_matrix(X))
    with caplog.at_level(logging.WARNING):
        v = geneformer(gf).transform(ds2)
    assert (v[2] == 0).all() and (np.abs(v[[0, 1, 3]]).sum(1) > 0).all()
    assert "no gene of the token dictionary" in caplog.text


# ----------------------------------------------------------------------------- bad inputs

def test_preset_shape_mismatch_names_file_and_field(gf):
    with pytest.raises(InputError) as ei:
        make_embedder("geneformer-316m", model_path=gf["model"], token_dictionary_file=gf["tok"],
                      gene_median_file=gf["med"], gene_mapping_file=gf["map"])
    assert ei.value.field == "num_hidden_layers" and ei.value.path.endswith("config.json")
    assert "geneformer-316m" in str(ei.value) and "--source_model geneformer" in str(ei.value)


def test_missing_and_bad_dictionaries(gf, tmp_path):
    with pytest.raises(InputError, match="no such file") as ei:
        GeneformerEmbedder(gf["model"], str(tmp_path / "nope.pkl"), gf["med"])
    assert "nope.pkl" in str(ei.value)
    with pytest.raises(InputError, match="is required"):
        GeneformerEmbedder(gf["model"], gf["tok"], None)
    (tmp_path / "bad.json").write_text(json.dumps({"ENSG1": "x"}))
    with pytest.raises(InputError, match="token id must be a non-negative integer") as ei:
        GeneformerEmbedder(gf["model"], str(tmp_path / "bad.json"), gf["med"])
    assert ei.value.field == "ENSG1"
    with pytest.raises(InputError, match="<cls>") as ei:  # a V1 dictionary with a V2 model
        GeneformerEmbedder(gf["model"], gf["tok_v1"], gf["med"], model_version="V2")
    assert ei.value.field == "<cls>"
    big = {"<pad>": 0, "<cls>": 2, "<eos>": 3, ENS[0]: 999}
    (tmp_path / "big.json").write_text(json.dumps(big))
    with pytest.raises(InputError, match="vocab_size"):
        GeneformerEmbedder(gf["model"], str(tmp_path / "big.json"), gf["med"])


def test_bad_settings_and_model_dirs(gf, tmp_path):
    with pytest.raises(ConfigError, match="needs a V2 model"):
        GeneformerEmbedder(gf["model_v1"], gf["tok_v1"], gf["med"], pooling="cls")
    with pytest.raises(ConfigError, match="layer"):
        GeneformerEmbedder(gf["model"], gf["tok"], gf["med"], layer=-3)
    with pytest.raises(ConfigError, match="V1 or V2"):
        GeneformerEmbedder(gf["model"], gf["tok"], gf["med"], model_version="V3")
    v1 = GeneformerEmbedder(gf["model"], gf["tok"], gf["med"], model_version="V1")  # V1 mode: no special tokens
    assert (v1.version, v1.max_length, v1.special) == ("V1", 2048, False)
    assert make_embedder("pca", n_components=7).n_components == 7
    with pytest.raises(InputError, match="config.json"):
        GeneformerEmbedder(str(tmp_path), gf["tok"], gf["med"])
    with pytest.raises(ConfigError, match="unknown source model"):
        make_embedder("geneformer-7b")
    with pytest.raises(ConfigError, match="ensemble_model1"):
        resolve_source_model("ensemble")


def test_safe_dictionary_formats(tmp_path):
    d = {"ENSG1": 1.5, "ENSG2": 2.0}
    (tmp_path / "m.json").write_text(json.dumps(d))
    (tmp_path / "m.tsv").write_text("gene\tmedian\nENSG1\t1.5\nENSG2\t2\n")
    with open(tmp_path / "m.pkl", "wb") as f:  # values as numpy scalars, as Geneformer's own pickles
        pickle.dump({"ENSG1": np.float64(1.5), "ENSG2": np.float32(2.0)}, f, protocol=2)
    with open(tmp_path / "m4.pkl", "wb") as f:
        pickle.dump(d, f, protocol=4)
    loaded = [load_dictionary(tmp_path / n, "median", "--gene_median_file") for n in ("m.json", "m.tsv", "m.pkl",
                                                                                       "m4.pkl")]
    assert all(x == d for x in loaded) and len({dictionary_hash(x) for x in loaded}) == 1
    assert all(type(v) is float for v in loaded[2].values())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "evil.pkl"
    with open(p, "wb") as f:
        pickle.dump({"ENSG1": _Evil()}, f)
    with pytest.raises(InputError, match="forbidden global") as ei:
        load_dictionary(p, "token", "--token_dictionary_file")
    assert str(p) in str(ei.value)
    with open(tmp_path / "cls.pkl", "wb") as f:
        pickle.dump({"ENSG1": sp.csr_matrix((1, 1))}, f)
    with pytest.raises(InputError, match="forbidden global"):
        load_dictionary(tmp_path / "cls.pkl", "token", "--token_dictionary_file")


# ----------------------------------------------------------------------------- scFoundation

def test_scfoundation_import_validates(tmp_path):
    a, b = expr(10, seed=1, name="A"), expr(6, seed=2, name="B")
    npys, bcs = scf_files(tmp_path, [a, b], dim=3072)
    imp = ScFoundationImport(npys, bcs)
    assert imp.settings()["pool"] == "all"
    va = imp.transform(a)
    rows = np.load(npys[0])
    order = {bc: i for i, bc in enumerate((tmp_path / "scf0.txt").read_text().split())}
    np.testing.assert_array_equal(va, rows[[order[x] for x in a.barcodes]])
    assert imp.transform(a.subset_cells(np.arange(4))).shape == (4, 3072)  # a subset of the file's cells
    assert imp.transform(b).shape == (6, 3072)
    with pytest.raises(InputError, match="lists all"):
        imp.transform(expr(3, seed=0, name="C"))
    np.save(tmp_path / "w.npy", np.zeros((10, 100), np.float32))
    with pytest.raises(InputError, match="3,072"):
        ScFoundationImport([str(tmp_path / "w.npy")], [bcs[0]])
    np.save(tmp_path / "short.npy", np.zeros((9, 768), np.float32))
    with pytest.raises(InputError, match="9 rows, but 10 barcodes"):
        ScFoundationImport([str(tmp_path / "short.npy")], [bcs[0]]).transform(a)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}] * 10, dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a numeric"):
        ScFoundationImport([str(tmp_path / "obj.npy")], [bcs[0]])
    with pytest.raises(ConfigError, match="one barcodes file per"):
        ScFoundationImport(npys, bcs[:1])


FAKE_GET_EMBEDDING = '''
import argparse, os, numpy as np, scipy.sparse
p = argparse.ArgumentParser()
for a in ("task_name", "input_type", "output_type", "pool_type", "tgthighres", "data_path", "save_path",
          "pre_normalized", "version", "ckpt_name"):
    p.add_argument("--" + a)
a = p.parse_args()
assert os.path.exists("./OS_scRNA_gene_index.19264.tsv") and os.path.exists("./models/models.ckpt")
X = scipy.sparse.load_npz(a.data_path).toarray()
d = 3072 if a.pool_type == "all" else 768
emb = np.repeat(np.log1p(X), d // X.shape[1] + 1, axis=1)[:, :d]
np.save(os.path.join(a.save_path, a.task_name + "_" + a.ckpt_name + "_" + a.input_type + "_" + a.output_type
                     + "_embedding_" + a.tgthighres + "_resolution.npy"), emb)
'''


def fake_scfoundation(tmp, checkpoint=True):
    """A stand-in scFoundation checkout: its file layout and get_embedding.py's arguments and output name."""
    code = tmp / "scFoundation" / "model"
    (code / "models").mkdir(parents=True, exist_ok=True)
    (code / "get_embedding.py").write_text(FAKE_GET_EMBEDDING)
    genes = SYMS[:5] + ["NOTINDATA"]
    (code / "OS_scRNA_gene_index.19264.tsv").write_text("gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in
                                                                                         enumerate(genes)))
    if checkpoint:
        (code / "models" / "models.ckpt").write_bytes(b"")
    return str(tmp / "scFoundation")


def test_scfoundation_runner_command_and_import(tmp_path):
    with pytest.raises(InputError, match="models.ckpt"):
        ScFoundationRunner(fake_scfoundation(tmp_path, checkpoint=False))
    fake_scfoundation(tmp_path)
    r = ScFoundationRunner(str(tmp_path / "scFoundation"), pool="max")
    assert r.command("in.npz", "/out", "T") == [
        sys.executable, "get_embedding.py", "--task_name", "T", "--input_type", "singlecell", "--output_type", "cell",
        "--pool_type", "max", "--tgthighres", "t4", "--data_path", "in.npz", "--save_path", "/out",
        "--pre_normalized", "F", "--version", "ce", "--ckpt_name", "01B-resolution"]
    assert r.output_path("/out", "T").name == "T_01B-resolution_singlecell_cell_embedding_t4_resolution.npy"
    ds = expr(5, seed=3)
    v = r.transform(ds)
    aligned = np.log1p(np.hstack([ds.X.toarray()[:, :5], np.zeros((5, 1))]))
    np.testing.assert_allclose(v, np.repeat(aligned, 768 // 6 + 1, axis=1)[:, :768], rtol=1e-6)
    assert r.settings() == ScFoundationImport(*scf_files(tmp_path, [ds])).settings()  # same store key


# ----------------------------------------------------------------------------- ensemble and store

def test_ensemble_blocks_standardised_on_the_training_line(gf, tmp_path):
    store = EmbeddingStore(str(tmp_path / "s"))
    a, b = expr(12, seed=1, name="A"), expr(9, seed=2, name="B")
    embed_lines(ScFoundationImport(*scf_files(tmp_path, [a, b])), a, {"test": b}, store)
    embed_lines(geneformer(gf), a, {"test": b}, store)
    ens = make_embedder("geneformer+scfoundation", store=store, train=a)
    assert ens.name == resolve_source_model("ensemble", "geneformer", "scfoundation") == "geneformer+scfoundation"
    out = embed_lines(ens, a, {"test": b}, store)
    assert out["train"].shape == (12, 16 + 768) and out["test"].shape == (9, 16 + 768)
    np.testing.assert_allclose(out["train"].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out["train"].std(0), 1, atol=1e-3)
    assert store.has(EmbeddingKey(b.content_hash(), ens.name, {**ens.settings(), "fit_on": a.content_hash()}))
    with pytest.raises(StoreError, match="no 'geneformer-104m' embedding"):
        embed_lines(make_embedder("geneformer-104m+scfoundation", store=store, train=a), a, {}, store)


def test_stored_embedder_picks_entry_and_explains_missing(gf, tmp_path, caplog, monkeypatch):
    store = EmbeddingStore(str(tmp_path / "s"))
    a, b = expr(10, seed=1, name="A"), expr(7, seed=2, name="B")
    monkeypatch.setattr(sys, "argv", ["xfer", "train", "--src_csv", "a.csv", "--tgt_csv", "p.csv", "--epochs", "3",
                                      "--store", "S"])
    st = make_embedder("geneformer", store=store, train=a)
    assert isinstance(st, StoredEmbedder)
    with pytest.raises(StoreError) as ei:
        embed_lines(st, a, {"test": b}, store)
    msg = str(ei.value)
    assert "xfer embed --source_model geneformer --model_path DIR" in msg
    assert "--src_csv a.csv --tgt_csv p.csv --store S" in msg and "--epochs" not in msg
    old = geneformer(gf, layer=0)
    embed_lines(old, a, {}, store)
    time.sleep(0.02)
    new = geneformer(gf)
    ref = embed_lines(new, a, {"test": b}, store)
    assert [e["settings"]["layer"] for e in store.find(a.content_hash(), "geneformer")] == [-1, 0]
    with caplog.at_level(logging.INFO):
        got = embed_lines(make_embedder("geneformer", store=store, train=a), a, {"test": b}, store)
    assert "using the most recent" in caplog.text
    np.testing.assert_array_equal(got["train"], ref["train"])
    np.testing.assert_array_equal(got["test"], ref["test"])
    # a test line embedded with other settings only: named as such
    c = expr(5, seed=3, name="C")
    embed_lines(old, c, {}, store)
    with pytest.raises(StoreError, match="other settings"):
        embed_lines(make_embedder("geneformer", store=store, train=a), a, {"test": c}, store)
    assert data_flags_from_argv(["train", "--test_csv=x.csv", "--lr", "1"]) == ["--test_csv=x.csv"]


def test_xfer_embed_writes_then_hits(gf, tmp_path, capsys):
    from conftest import write_csv
    from xfer.cli import build_parser, main
    from xfer.flags import sources_from_args

    a, b = expr(10, seed=1, ids=False, name="A"), expr(8, seed=2, ids=False, name="B")
    fa = write_csv(tmp_path / "A.csv", a.barcodes, a.features, a.X.toarray())
    fb = write_csv(tmp_path / "B.csv", b.barcodes, b.features, b.X.toarray())
    store = str(tmp_path / "store")
    data = ["--src_csv", str(fa), "--test_csv", str(fb), "--store", store]
    argv = ["embed", "--source_model", "geneformer", "--model_path", gf["model"], "--token_dictionary_file", gf["tok"],
            "--gene_median_file", gf["med"], "--gene_mapping_file", gf["map"], *data]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("wrote") == 2 and "geneformer" in out
    t0 = time.perf_counter()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("cached") == 2 and time.perf_counter() - t0 < 10
    # what `xfer train --source_model geneformer` does with the same data flags: all hits
    args = build_parser().parse_args(["embed", "--source_model", "geneformer", *data])
    inputs = sources_from_args(args).load()
    emb = make_embedder("geneformer", store=EmbeddingStore(store), train=inputs["src"])
    res = embed_lines(emb, inputs["src"], {"test": inputs["test"]}, EmbeddingStore(store))
    assert res["train"].shape == (10, 16) and res["test"].shape == (8, 16)
    # a missing model flag is a one-line error naming the flag
    assert main(["embed", "--source_model", "geneformer", "--model_path", gf["model"], *data]) == 2
    err = capsys.readouterr().err
    assert "--token_dictionary_file" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- end to end through the store

def test_embed_then_train_with_source_model_geneformer(tmp_path, tiny_store, sim_geneformer, capsys):
    from conftest import SMALL_MODEL
    from xfer.cli import main

    data = ["--store", str(tiny_store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--test_csv", "store:B_GEX", "--sup_peak_csv", "store:B_PEAK"]
    assert main(["embed", "--source_model", "geneformer", *sim_geneformer, *data]) == 0
    sets = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k not in ("epochs", "n_components")]
    assert main(["train", "--source_model", "geneformer", *data, "--epochs", "2", *sets,
                 "--output_folder", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["model"]["config"]["source_model"] == "geneformer" and m["gex_test"]["n"] > 0
    ck = __import__("torch").load(tmp_path / "out" / "best_model.pt", weights_only=True)
    assert ck["dims"]["emb_dim"] == 16  # the tiny model's hidden size, not PCA's
    # a sweep's trials find the same entry: the trial-side data preparation reads it from the store
    from tune.data import DataSpec, prepare_from_store
    from xfer.config import TrainConfig
    from xfer.data.store import CellStore
    s = CellStore(str(tiny_store))
    spec = DataSpec(store=str(tiny_store), src="A_GEX", tgt="A_PEAK", src_hash=s.manifest("A_GEX").content_hash,
                    tgt_hash=s.manifest("A_PEAK").content_hash)
    td = prepare_from_store(spec, TrainConfig.from_dict({"source_model": "geneformer"}))
    assert td.emb_dim == 16
