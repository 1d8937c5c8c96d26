"""Writers produce the real formats, read back exactly, and never leave half-written files."""

from __future__ import annotations

import gzip

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from xfer.data import fs, writers
from xfer.data.dataset import CellMatrix, make_matrix
from xfer.data.simulate import simulate_pair, write_simulation
from xfer.data.writers import write_10x_h5, write_h5ad, write_labels_csv, write_research_csv
from xfer.phases import PHASES


@pytest.fixture(scope="module")
def pair():
    return simulate_pair("tiny", seed=0)


@pytest.fixture()
def small() -> CellMatrix:
    """5 cells x 4 genes with multi-digit counts, an unlabelled cell and a name needing quotes."""
    X = np.array([[0, 1, 12, 0], [305, 0, 0, 2], [0, 0, 0, 0], [7, 8, 9, 10], [1, 0, 0, 1000]], dtype=float)
    return make_matrix(
        sp.csr_matrix(X),
        barcodes=[f"{s}-1" for s in ("AAAA", "CCCC", "GGGG", "TTTT", "ACGT")],
        features=["MCM5", "PCNA", "odd,name", "TOP2A"],
        labels=[0, 1, 2, -1, 0],
        modality="gex",
        feature_ids=["ENSG90000000001", "ENSG90000000002", "ENSG90000000003", "ENSG90000000004"],
    )


def no_temp_files(directory) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


# ------------------------------------------------- the research code's CSV layout


def test_research_csv_layout_and_roundtrip(small, tmp_path):
    path = write_research_csv(small, tmp_path / "m.csv")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == 'barcode,MCM5,PCNA,"odd,name",TOP2A'
    assert lines[1] == "AAAA-1,0,1,12,0"
    assert lines[5] == "ACGT-1,1,0,0,1000"
    assert ".0" not in text  # integral matrices print integers
    df = pd.read_csv(path, index_col=0)
    assert list(df.columns) == list(small.features)
    assert list(df.index) == list(small.barcodes)
    np.testing.assert_array_equal(df.to_numpy(), small.X.toarray())


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_research_csv_chunking_does_not_change_bytes(pair, tmp_path, chunk):
    ds = pair[0].peak
    ref = write_research_csv(ds, tmp_path / "ref.csv").read_bytes()
    assert write_research_csv(ds, tmp_path / "c.csv", chunk_cells=chunk).read_bytes() == ref


def test_research_csv_simulated_peaks_roundtrip(pair, tmp_path):
    ds = pair[1].peak
    df = pd.read_csv(write_research_csv(ds, tmp_path / "p.csv"), index_col=0)
    assert list(df.columns) == list(ds.features)
    np.testing.assert_array_equal(df.to_numpy(), ds.X.toarray())


def test_research_csv_features_rows(small, tmp_path):
    path = write_research_csv(small, tmp_path / "t.csv", orient="features_rows")
    assert path.read_text().splitlines()[0] == "feature,AAAA-1,CCCC-1,GGGG-1,TTTT-1,ACGT-1"
    df = pd.read_csv(path, index_col=0)
    assert list(df.index) == list(small.features)
    np.testing.assert_array_equal(df.to_numpy(), small.X.toarray().T)


def test_research_csv_labels_file_and_phase_column(small, tmp_path):
    write_research_csv(small, tmp_path / "m.csv", label_path=tmp_path / "labels.csv")
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert list(labels.columns) == ["barcode", "phase"]
    assert list(labels["barcode"]) == ["AAAA-1", "CCCC-1", "GGGG-1", "ACGT-1"]  # unlabelled cell left out
    assert list(labels["phase"]) == ["G1", "S", "G2M", "G1"]

    path = write_research_csv(small, tmp_path / "p.csv", phase_column=True)
    df = pd.read_csv(path, index_col=0, keep_default_na=False)
    assert df.columns[-1] == "phase"
    assert list(df["phase"]) == ["G1", "S", "G2M", "", "G1"]
    np.testing.assert_array_equal(df.drop(columns="phase").to_numpy(), small.X.toarray())


def test_research_csv_float_values_roundtrip_exactly(pair, tmp_path):
    X = pair[0].gex.X.copy()
    X.data = np.log1p(X.data / 3.0).astype(np.float32)
    ds = make_matrix(X, pair[0].gex.barcodes, pair[0].gex.features, modality="gex")
    df = pd.read_csv(write_research_csv(ds, tmp_path / "f.csv"), index_col=0)
    np.testing.assert_array_equal(df.to_numpy(np.float32), X.toarray())


def test_research_csv_gzip(small, tmp_path):
    path = write_research_csv(small, tmp_path / "m.csv.gz")
    with gzip.open(path, "rt") as fh:
        df = pd.read_csv(fh, index_col=0)
    np.testing.assert_array_equal(df.to_numpy(), small.X.toarray())


def test_research_csv_rejects_bad_options(small, tmp_path):
    with pytest.raises(ValueError, match="orient"):
        write_research_csv(small, tmp_path / "m.csv", orient="sideways")
    with pytest.raises(ValueError, match="phase_column"):
        write_research_csv(small, tmp_path / "m.csv", orient="features_rows", phase_column=True)
    with pytest.raises(ValueError, match="no labels"):
        write_research_csv(small.without_labels(), tmp_path / "m.csv", label_path=tmp_path / "l.csv")
    assert not list(tmp_path.iterdir())


def test_research_csv_failure_leaves_no_file(pair, tmp_path, monkeypatch):
    real = writers._write_block
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "_write_block", failing)
    target, labels = tmp_path / "m.csv", tmp_path / "labels.csv"
    with pytest.raises(OSError, match="disk full"):
        write_research_csv(pair[0].peak, target, label_path=labels, chunk_cells=10)
    assert calls["n"] == 3
    assert not target.exists() and not labels.exists()
    assert no_temp_files(tmp_path)

    # An existing target is left untouched by a failed rewrite.
    target.write_text("old contents")
    calls["n"] = 0
    with pytest.raises(OSError):
        write_research_csv(pair[0].peak, target, chunk_cells=10)
    assert target.read_text() == "old contents"
    assert no_temp_files(tmp_path)


def test_labels_csv(small, tmp_path):
    path = write_labels_csv(small, tmp_path / "l.csv")
    assert path.read_text().splitlines()[:2] == ["barcode,phase", "AAAA-1,G1"]


# ---------------------------------------------------------------------- h5ad


def test_h5ad_roundtrip(small, tmp_path):
    adata = ad.read_h5ad(write_h5ad(small, tmp_path / "m.h5ad"))
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), small.X.toarray())
    assert list(adata.obs_names) == list(small.barcodes)
    assert list(adata.var_names) == list(small.features)
    assert list(adata.var["gene_ids"]) == list(small.feature_ids)
    phase = adata.obs["phase"]
    assert isinstance(phase.dtype, pd.CategoricalDtype)
    assert list(phase.cat.categories) == list(PHASES)
    assert list(phase.astype(object).fillna("")) == ["G1", "S", "G2M", "", "G1"]
    assert adata.uns["modality"] == "gex"


def test_h5ad_without_labels_has_no_phase(pair, tmp_path):
    adata = ad.read_h5ad(write_h5ad(pair[0].peak.without_labels(), tmp_path / "p.h5ad"))
    assert "phase" not in adata.obs
    assert "gene_ids" not in adata.var
    assert adata.shape == pair[0].peak.X.shape


def test_h5ad_failure_leaves_no_file(small, tmp_path, monkeypatch):
    def failing(self, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("interrupted")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", failing)
    with pytest.raises(OSError, match="interrupted"):
        write_h5ad(small, tmp_path / "m.h5ad")
    assert not (tmp_path / "m.h5ad").exists()
    assert no_temp_files(tmp_path)


# ----------------------------------------------------------------- 10x h5


def test_10x_h5_layout(pair, tmp_path):
    line = pair[0]
    path = write_10x_h5(line.gex, line.peak, tmp_path / "filtered_feature_bc_matrix.h5",
                        gene_intervals=line.genes["interval"].to_numpy())
    n_genes, n_peaks, n_cells = line.gex.n_features, line.peak.n_features, line.gex.n_cells
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        assert set(m) == {"barcodes", "data", "indices", "indptr", "shape", "features"}
        assert set(m["features"]) == {"id", "name", "feature_type", "genome", "interval", "_all_tag_keys"}
        assert m["barcodes"].dtype.kind == "S" and m["features/id"].dtype.kind == "S"
        assert m["data"].dtype == np.int32 and m["indices"].dtype == np.int64
        assert m["indptr"].dtype == np.int64
        shape = m["shape"][()]
        assert list(shape) == [n_genes + n_peaks, n_cells]
        assert len(m["indptr"]) == n_cells + 1  # compressed by cell (columns)
        X = sp.csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=tuple(shape))
        barcodes = [b.decode() for b in m["barcodes"][()]]
        ftype = [b.decode() for b in m["features/feature_type"][()]]
        ids = [b.decode() for b in m["features/id"][()]]
        names = [b.decode() for b in m["features/name"][()]]
        intervals = [b.decode() for b in m["features/interval"][()]]
        genome = set(m["features/genome"][()])
        tags = list(m["features/_all_tag_keys"][()])
    assert barcodes == list(line.gex.barcodes)
    expected = sp.hstack([line.gex.X, line.peak.X]).T.toarray()
    np.testing.assert_array_equal(X.toarray(), expected)
    assert ftype == ["Gene Expression"] * n_genes + ["Peaks"] * n_peaks
    assert ids[:n_genes] == list(line.gex.feature_ids) and names[:n_genes] == list(line.gex.features)
    assert ids[n_genes:] == names[n_genes:] == intervals[n_genes:] == list(line.peak.features)
    assert intervals[:n_genes] == list(line.genes["interval"])
    assert genome == {b"GRCh38"}
    assert tags == [b"genome", b"interval"]


def test_10x_h5_normalises_peak_names_and_defaults_intervals(small, tmp_path):
    peaks = make_matrix(sp.csr_matrix(np.ones((5, 2))), small.barcodes, ["chr1-100-200", "chr2_5_50"],
                        modality="peak")
    path = write_10x_h5(small, peaks, tmp_path / "x.h5")
    with h5py.File(path, "r") as f:
        intervals = [b.decode() for b in f["matrix/features/interval"][()]]
    assert intervals == ["NA"] * 4 + ["chr1:100-200", "chr2:5-50"]


def test_10x_h5_needs_shared_barcodes(pair, tmp_path):
    a, b = pair
    target = tmp_path / "x.h5"
    with pytest.raises(ValueError, match="share barcodes"):
        write_10x_h5(a.gex, b.peak, target)
    reordered = a.peak.subset_cells(np.arange(a.peak.n_cells)[::-1])
    with pytest.raises(ValueError, match="share barcodes"):
        write_10x_h5(a.gex, reordered, target)
    assert not target.exists() and no_temp_files(tmp_path)


def test_10x_h5_refuses_non_counts(pair, tmp_path):
    a = pair[0]
    X = a.gex.X.copy()
    X.data = X.data / 2.0 + 0.25
    gex = make_matrix(X, a.gex.barcodes, a.gex.features, modality="gex")
    with pytest.raises(ValueError, match="integer counts"):
        write_10x_h5(gex, a.peak, tmp_path / "x.h5")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------- write_simulation


def test_write_simulation_all_formats(pair, tmp_path):
    out = write_simulation(pair, tmp_path)
    assert set(out) == {"csv", "h5ad", "10x", "labels", "truth"}
    assert [p.name for p in out["csv"]] == ["simA_GEX.csv", "simA_PEAK.csv", "simB_GEX.csv", "simB_PEAK.csv"]
    assert [p.name for p in out["10x"]] == ["simA_filtered_feature_bc_matrix.h5",
                                            "simB_filtered_feature_bc_matrix.h5"]
    for paths in out.values():
        assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    labels = pd.read_csv(tmp_path / "simB_labels.csv")
    assert list(labels["phase"]) == list(pair[1].gex.phase_names())
    truth = pd.read_csv(tmp_path / "simA_truth.csv")
    assert list(truth["barcode"]) == list(pair[0].gex.barcodes)
    assert ad.read_h5ad(out["h5ad"][1]).shape == pair[0].peak.X.shape
    assert no_temp_files(tmp_path)


def test_write_simulation_subset_of_formats(pair, tmp_path):
    out = write_simulation(pair[:1], tmp_path, formats=("h5ad",))
    assert [p.name for p in out["h5ad"]] == ["simA_GEX.h5ad", "simA_PEAK.h5ad"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "simA_GEX.h5ad", "simA_PEAK.h5ad", "simA_labels.csv", "simA_truth.csv"]
    with pytest.raises(ValueError, match="unknown format"):
        write_simulation(pair, tmp_path, formats=("loom",))


def test_atomic_path_keeps_target_on_error(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("keep")
    with pytest.raises(RuntimeError):
        with fs.atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert target.read_text() == "keep" and no_temp_files(tmp_path)
    with fs.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
