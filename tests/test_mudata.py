"""MuData (.h5mu) and in-memory AnnData / MuData reading, and labelled copies of .h5ad / .h5mu.

Every .h5mu here is a real file written by the mudata package."""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import BARCODES, GENES, PEAKS, PHASES_OF, write_labels
from xfer.data.annotate import annotate, write_labelled_copy
from xfer.data.inputs import pair_cells
from xfer.data.readers import (DEFAULT_MODALITIES, file_format, matrix_from_anndata, matrix_from_mudata,
                               read_h5ad, read_h5mu, read_matrix)
from xfer.errors import InputError
from xfer.phases import PHASES, decode_phases, encode_phases


def _adata(X, barcodes, features, obs=None) -> ad.AnnData:
    obs = pd.DataFrame(obs or {}, index=pd.Index(list(barcodes)))
    return ad.AnnData(sp.csr_matrix(X, dtype=np.float32), obs=obs,
                      var=pd.DataFrame(index=pd.Index(list(features))))


def _counts(n, m, seed):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n, m)) * (rng.random((n, m)) < 0.5)
    X[:, 0] += 1
    return X.astype(np.float32)


def _mu(mods: dict) -> md.MuData:
    """A MuData as mudata 0.4 will build it (no modality columns pulled into its obs)."""
    with md.set_options(pull_on_update=False):
        return md.MuData(mods)


def _write(mdata: md.MuData, path) -> str:
    with md.set_options(pull_on_update=False):
        mdata.write(path)
    return str(path)


@pytest.fixture
def multiome():
    """12 cells; rna (6 genes, phases in its obs) and atac (5 peaks, no phases)."""
    X_rna, X_atac = _counts(12, len(GENES), 0), _counts(12, len(PEAKS), 1)
    rna = _adata(X_rna, BARCODES, GENES, {"phase": PHASES_OF})
    atac = _adata(X_atac, BARCODES, PEAKS)
    return _mu({"rna": rna, "atac": atac}), X_rna, X_atac


def test_file_format_recognises_h5mu():
    assert file_format("a/REH.h5mu") == "h5mu" and file_format("a/REH.h5ad") == "h5ad"
    assert file_format("a/filtered_feature_bc_matrix.h5") == "10x"
    assert DEFAULT_MODALITIES == {"gex": "rna", "peak": "atac"}


def test_reads_rna_as_gex_and_atac_as_peak(tmp_path, multiome):
    mdata, X_rna, X_atac = multiome
    p = _write(mdata, tmp_path / "REH.h5mu")
    gex = read_matrix(p, modality="gex")
    np.testing.assert_array_equal(gex.X.toarray(), X_rna)
    assert list(gex.barcodes) == BARCODES and list(gex.features) == GENES
    assert list(gex.phase_names()) == PHASES_OF
    assert gex.modality == "gex" and gex.name == "REH_rna" and gex.source == p
    peak = read_matrix(p, modality="peak")
    np.testing.assert_array_equal(peak.X.toarray(), X_atac)
    assert list(peak.features) == PEAKS and peak.name == "REH_atac"
    # atac has no phases of its own: the rna modality's labels are the same cells'
    assert list(peak.phase_names()) == PHASES_OF


def test_simulated_line_round_trips_through_h5mu(tmp_path, tiny_pair):
    line = tiny_pair[0]
    rna = _adata(line.gex.X, line.gex.barcodes, line.gex.features, {"phase": decode_phases(line.gex.labels)})
    rna.var["gene_ids"] = line.gex.feature_ids
    atac = _adata(line.peak.X, line.peak.barcodes, line.peak.features)
    p = _write(_mu({"rna": rna, "atac": atac}), tmp_path / "simA.h5mu")
    gex = read_h5mu(p, modality="gex", name=line.gex.name)
    peak = read_h5mu(p, modality="peak", name=line.peak.name)
    assert gex.content_hash() == line.gex.content_hash()
    assert peak.content_hash() == line.peak.content_hash()
    np.testing.assert_array_equal(gex.feature_ids, line.gex.feature_ids)


def test_modality_names_overridden(tmp_path, multiome):
    mdata, X_rna, X_atac = multiome
    prot = _adata(np.ones((12, 2)), BARCODES, ["CD3", "CD19"])
    renamed = _mu({"GEX": mdata.mod["rna"], "ATAC_peaks": mdata.mod["atac"], "prot": prot})
    p = _write(renamed, tmp_path / "x.h5mu")
    gex = read_matrix(p, modality="gex", mod_name="GEX")
    peak = read_matrix(p, modality="peak", mod_name="ATAC_peaks")
    np.testing.assert_array_equal(gex.X.toarray(), X_rna)
    np.testing.assert_array_equal(peak.X.toarray(), X_atac)
    with pytest.raises(InputError) as e:
        read_matrix(p, modality="peak")
    assert e.value.path == p and e.value.field == "mod['atac']"
    assert "has no 'atac' modality (it has: GEX, ATAC_peaks, prot); name one with --peak_modality" in str(e.value)
    with pytest.raises(InputError, match="--gex_modality") as e:
        read_matrix(p, modality="gex")
    assert e.value.field == "mod['rna']"
    # an override pointing at the wrong kind of data is caught by the modality check
    with pytest.raises(InputError, match="looks like chromatin accessibility") as e:
        read_matrix(p, modality="gex", mod_name="ATAC_peaks")
    assert e.value.path == p


def test_labels_from_the_mudata_obs(tmp_path, multiome):
    mdata, _, _ = multiome
    phases = ["S", "G2M", "G1"] * 4
    del mdata.mod["rna"].obs["phase"]
    mdata.obs["phase"] = phases
    p = _write(mdata, tmp_path / "m.h5mu")
    for modality in ("gex", "peak"):
        assert list(read_h5mu(p, modality=modality).phase_names()) == phases
    # a named column, and a prefixed per-modality copy ("atac:cc") as mudata's pull_obs writes it
    mdata.obs = pd.DataFrame({"atac:cc": PHASES_OF}, index=mdata.obs_names)
    p = _write(mdata, tmp_path / "n.h5mu")
    assert list(read_h5mu(p, modality="peak", label_column="cc").phase_names()) == PHASES_OF
    assert list(read_h5mu(p, modality="gex", label_column="cc").phase_names()) == PHASES_OF
    with pytest.raises(InputError, match="no such column") as e:
        read_h5mu(p, modality="gex", label_column="cycle")
    assert e.value.path == p and e.value.field == "obs['cycle']"


def test_modality_obs_labels_win_over_the_mudata_obs(tmp_path, multiome):
    mdata, _, _ = multiome
    mdata.mod["atac"].obs["phase"] = ["G2M"] * 12
    mdata.obs["phase"] = ["S"] * 12
    p = _write(mdata, tmp_path / "m.h5mu")
    assert set(read_h5mu(p, modality="peak").phase_names()) == {"G2M"}
    assert list(read_h5mu(p, modality="gex").phase_names()) == PHASES_OF
    # a labels CSV replaces them all
    lab = write_labels(tmp_path / "labels.csv", BARCODES, ["G1"] * 12)
    assert set(read_h5mu(p, modality="peak", label_path=lab).phase_names()) == {"G1"}


def test_bad_phase_in_a_modality_names_the_field(tmp_path, multiome):
    mdata, _, _ = multiome
    mdata.mod["rna"].obs["phase"] = ["G1"] * 11 + ["mitosis"]
    p = _write(mdata, tmp_path / "m.h5mu")
    with pytest.raises(InputError, match="unknown phase name") as e:
        read_h5mu(p, modality="gex")
    assert e.value.path == p and e.value.field == "mod['rna'].obs['phase']"


def test_modalities_with_different_cell_subsets(tmp_path):
    rna_cells, atac_cells = BARCODES[:9], BARCODES[4:][::-1]  # 5 shared cells, atac in another order
    X_rna, X_atac = _counts(9, len(GENES), 2), _counts(8, len(PEAKS), 3)
    rna = _adata(X_rna, rna_cells, GENES, {"phase": PHASES_OF[:9]})
    atac = _adata(X_atac, atac_cells, PEAKS)
    mdata = _mu({"rna": rna, "atac": atac})
    assert mdata.n_obs == 12
    p = _write(mdata, tmp_path / "subsets.h5mu")
    gex, peak = read_h5mu(p, modality="gex"), read_h5mu(p, modality="peak")
    assert list(gex.barcodes) == rna_cells and list(peak.barcodes) == atac_cells
    np.testing.assert_array_equal(gex.X.toarray(), X_rna)
    np.testing.assert_array_equal(peak.X.toarray(), X_atac)
    # atac cells the rna modality does not hold have no label
    want = {b: ph for b, ph in zip(rna_cells, PHASES_OF[:9])}
    assert list(peak.phase_names()) == [want.get(b, "") for b in atac_cells]
    g, q = pair_cells(gex, peak)
    assert list(g.barcodes) == BARCODES[4:9] and list(q.barcodes) == BARCODES[4:9]
    assert list(q.phase_names()) == PHASES_OF[4:9]


def test_missing_and_broken_files_name_the_file(tmp_path, multiome):
    mdata, _, _ = multiome
    with pytest.raises(InputError, match="file not found") as e:
        read_h5mu(tmp_path / "none.h5mu", modality="gex")
    assert e.value.path == str(tmp_path / "none.h5mu")
    junk = tmp_path / "junk.h5mu"
    junk.write_bytes(b"not hdf5 at all " * 64)
    with pytest.raises(InputError, match="not a readable .h5mu file") as e:
        read_matrix(junk, modality="gex")
    assert e.value.path == str(junk) and "\n" not in str(e.value)
    # an AnnData under a .h5mu name
    h5ad_named_h5mu = tmp_path / "rna.h5mu"
    mdata.mod["rna"].write_h5ad(h5ad_named_h5mu)
    with pytest.raises(InputError, match="not a MuData .h5mu file") as e:
        read_matrix(h5ad_named_h5mu, modality="gex")
    assert e.value.path == str(h5ad_named_h5mu) and e.value.field == "mod"
    # a truncated file (an interrupted copy)
    good = _write(mdata, tmp_path / "good.h5mu")
    cut = tmp_path / "cut.h5mu"
    data = open(good, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable .h5mu file") as e:
        read_matrix(cut, modality="peak")
    assert e.value.path == str(cut)


def test_negative_counts_in_a_modality_name_the_field(tmp_path, multiome):
    mdata, _, X_atac = multiome
    X = X_atac.copy()
    X[3, 2] = -1
    mdata.mod["atac"] = _adata(X, BARCODES, PEAKS)
    p = _write(_mu({"rna": mdata.mod["rna"], "atac": mdata.mod["atac"]}), tmp_path / "neg.h5mu")
    with pytest.raises(InputError, match="counts must be finite and >= 0") as e:
        read_h5mu(p, modality="peak")
    assert e.value.field == f"mod['atac'].X row '{BARCODES[3]}', column '{PEAKS[2]}'"


def test_in_memory_objects_read_as_their_files(tmp_path, multiome):
    mdata, _, _ = multiome
    p = _write(mdata, tmp_path / "REH.h5mu")
    for modality in ("gex", "peak"):
        a = matrix_from_mudata(mdata, modality=modality, source=p)
        b = read_h5mu(p, modality=modality)
        assert a.content_hash() == b.content_hash() and (a.name, a.source) == (b.name, b.source)
    mem = matrix_from_mudata(mdata, modality="peak", source="<MuData>", name="peaks")
    assert mem.source == "<MuData>" and mem.name == "peaks"
    adata = mdata.mod["rna"]
    q = tmp_path / "REH_GEX.h5ad"
    adata.write_h5ad(q)
    a = matrix_from_anndata(adata, modality="gex", source=str(q))
    b = read_h5ad(q, modality="gex")
    assert a.content_hash() == b.content_hash() and (a.name, a.source) == (b.name, b.source) == ("REH_GEX", str(q))
    with pytest.raises(InputError, match="no such column") as e:
        matrix_from_anndata(adata, modality="gex", source="<AnnData>", label_column="cc")
    assert e.value.path == "<AnnData>"
    with pytest.raises(InputError, match="has no 'atac' modality") as e:
        matrix_from_mudata(_mu({"rna": adata}), modality="peak", source="<MuData>")
    assert e.value.path == "<MuData>"


def _predictions(barcodes, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(PHASES)), size=len(barcodes))
    return list(barcodes), probs


def test_annotate_in_place(multiome):
    mdata, _, _ = multiome
    adata = mdata.mod["atac"].copy()
    barcodes, probs = _predictions(BARCODES[2:][::-1])  # two cells without a prediction, another order
    assert annotate(adata, barcodes, probs) is None
    obs = adata.obs
    assert list(obs["xfer_phase"].cat.categories) == list(PHASES)
    row = {b: i for i, b in enumerate(barcodes)}
    for b in BARCODES[2:]:
        assert obs.loc[b, "xfer_phase"] == PHASES[probs[row[b]].argmax()]
        np.testing.assert_allclose([obs.loc[b, f"xfer_prob_{p}"] for p in PHASES], probs[row[b]])
    assert obs.loc[BARCODES[:2], "xfer_phase"].isna().all()
    assert obs.loc[BARCODES[:2], [f"xfer_prob_{p}" for p in PHASES]].isna().all().all()
    annotate(adata, barcodes, probs, prefix="cc")
    assert "cc_phase" in obs.columns and "cc_prob_G2M" in obs.columns
    with pytest.raises(ValueError, match="probs must be 10 x 3"):
        annotate(adata, barcodes, probs[:, :2])


def test_labelled_copy_of_an_h5ad(tmp_path, multiome):
    mdata, X_rna, _ = multiome
    src = tmp_path / "in.h5ad"
    mdata.mod["rna"].write_h5ad(src)
    barcodes, probs = _predictions(BARCODES[1:])
    out = write_labelled_copy(src, barcodes, probs, tmp_path / "out" / "labelled.h5ad")
    assert sorted(p.name for p in out.parent.iterdir()) == ["labelled.h5ad"]  # no temporary file left
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.X.toarray(), X_rna)
    assert list(back.obs["phase"]) == PHASES_OF  # the input's own obs is kept
    assert list(back.obs["xfer_phase"].astype(object).iloc[1:]) == [PHASES[k] for k in probs.argmax(1)]
    assert pd.isna(back.obs["xfer_phase"].iloc[0]) and np.isnan(back.obs["xfer_prob_S"].iloc[0])
    np.testing.assert_allclose(back.obs[[f"xfer_prob_{p}" for p in PHASES]].to_numpy()[1:], probs)
    # the copy is still a valid input, with the input's labels
    assert list(read_h5ad(out, modality="gex").phase_names()) == PHASES_OF


def test_labelled_copy_of_an_h5mu(tmp_path):
    rna = _adata(_counts(9, len(GENES), 4), BARCODES[:9], GENES, {"phase": PHASES_OF[:9]})
    atac = _adata(_counts(8, len(PEAKS), 5), BARCODES[4:], PEAKS)
    src = _write(_mu({"rna": rna, "atac": atac}), tmp_path / "in.h5mu")
    peak = read_h5mu(src, modality="peak")
    barcodes, probs = _predictions(peak.barcodes)
    out = write_labelled_copy(src, barcodes, probs, tmp_path / "labelled.h5mu", mod_name="atac")
    with md.set_options(pull_on_update=False):
        back = md.read_h5mu(out)
    want = [PHASES[k] for k in probs.argmax(1)]
    assert list(back.mod["atac"].obs["xfer_phase"].astype(object)) == want
    np.testing.assert_allclose(back.mod["atac"].obs[[f"xfer_prob_{p}" for p in PHASES]].to_numpy(), probs)
    assert not any(c.startswith("xfer_") for c in back.mod["rna"].obs.columns)  # the other modality untouched
    g = back.obs.loc[list(barcodes)]
    assert list(g["xfer_phase"].astype(object)) == want
    rna_only = [b for b in BARCODES[:4]]
    assert back.obs.loc[rna_only, "xfer_phase"].isna().all() and back.obs.loc[rna_only, "xfer_prob_G1"].isna().all()
    # the copy reads as the input did
    for modality in ("gex", "peak"):
        assert read_h5mu(out, modality=modality).content_hash() == read_h5mu(src, modality=modality).content_hash()
    # another modality name, and one the file lacks
    write_labelled_copy(src, barcodes, probs, tmp_path / "on_rna.h5mu", mod_name="rna")
    with md.set_options(pull_on_update=False):
        assert md.read_h5mu(tmp_path / "on_rna.h5mu").mod["rna"].obs["xfer_phase"].notna().sum() == 5
    with pytest.raises(InputError, match="has no 'peaks' modality") as e:
        write_labelled_copy(src, barcodes, probs, tmp_path / "x.h5mu", mod_name="peaks")
    assert e.value.path == src and not (tmp_path / "x.h5mu").exists()


def test_labelled_copy_refuses_other_formats(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("barcode,A\nx,1\n")
    with pytest.raises(InputError, match="for .h5ad and .h5mu inputs only") as e:
        write_labelled_copy(p, ["x"], np.array([[1.0, 0, 0]]), tmp_path / "o.csv")
    assert e.value.path == str(p)
