"""Readers: the original research code's CSV layout (both orientations, labels inside or beside), h5ad, 10x h5."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import BARCODES, GENES, PEAKS, PHASES_OF, real_data, write_csv, write_labels
from xfer.data.readers import read_csv_matrix, read_h5ad, read_labels, read_matrix, read_10x_h5
from xfer.errors import InputError
from xfer.phases import PHASES, canonical_phase, encode_phases


def test_csv_cells_as_rows_with_label_file(research_files):
    ds = read_csv_matrix(research_files["gex"], modality="gex", label_path=research_files["labels"])
    assert ds.X.shape == (len(BARCODES), len(GENES))
    assert sp.isspmatrix_csr(ds.X) and ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds.X.toarray(), research_files["X_gex"])
    assert list(ds.barcodes) == BARCODES and list(ds.features) == GENES
    assert list(ds.phase_names()) == PHASES_OF
    assert ds.name == "L_GEX" and ds.meta["orientation"] == "cells_rows"


def test_csv_phase_column_inside_matrix(tmp_path, research_files):
    p = write_csv(tmp_path / "in.csv", BARCODES, GENES, research_files["X_gex"],
                  phase=["g1", "S", "G2/M", "G0/G1"] * 3)
    ds = read_csv_matrix(p, modality="gex")
    assert ds.n_features == len(GENES)  # the phase column is not a feature
    assert list(ds.phase_names()) == PHASES_OF


def test_csv_features_as_rows_detected_by_label_barcodes(tmp_path, research_files):
    X = research_files["X_peak"]
    p = tmp_path / "T.csv"
    pd.DataFrame(X.T, index=pd.Index(PEAKS, name="peak"), columns=BARCODES).to_csv(p)
    ds = read_csv_matrix(p, modality="peak", label_path=research_files["labels"])
    assert ds.meta["orientation"] == "features_rows"
    np.testing.assert_array_equal(ds.X.toarray(), X)
    assert list(ds.features) == PEAKS and list(ds.barcodes) == BARCODES
    # without labels the barcode-looking header decides
    ds2 = read_csv_matrix(p, modality="peak")
    assert ds2.meta["orientation"] == "features_rows"
    np.testing.assert_array_equal(ds2.X.toarray(), X)
    assert list(ds2.barcodes) == BARCODES and ds2.labels is None
    # and --orient forces it
    ds3 = read_csv_matrix(p, modality="peak", orient="features_rows")
    np.testing.assert_array_equal(ds3.X.toarray(), X)


def test_csv_gz_and_tsv(tmp_path, research_files):
    X = research_files["X_gex"]
    df = pd.DataFrame(X, index=pd.Index(BARCODES, name="cell"), columns=GENES)
    df.to_csv(tmp_path / "a.csv.gz")
    df.to_csv(tmp_path / "a.tsv", sep="\t")
    for name in ("a.csv.gz", "a.tsv"):
        ds = read_matrix(tmp_path / name, modality="gex")
        np.testing.assert_array_equal(ds.X.toarray(), X)


def _gzip_cut(src, dst, keep: float):
    """`src` gzip-compressed, cut after the fraction `keep` of its bytes (a truncated download)."""
    import gzip
    data = gzip.compress(src.read_bytes())
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("kind", ["matrix", "labels"])
def test_error_gz_name_on_plain_text(tmp_path, research_files, kind):
    src = research_files["gex" if kind == "matrix" else "labels"]
    p = tmp_path / f"{kind}.csv.gz"
    p.write_bytes(src.read_bytes())  # plain text under a .gz name
    read = (lambda: read_matrix(p, modality="gex")) if kind == "matrix" else (lambda: read_labels(p))
    with pytest.raises(InputError, match=r"not a gzip file \(the name ends in \.gz") as e:
        read()
    assert e.value.path == str(p) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["matrix", "labels"])
def test_error_truncated_gzip(tmp_path, research_files, kind):
    src = research_files["gex" if kind == "matrix" else "labels"]
    p = _gzip_cut(src, tmp_path / f"{kind}.csv.gz", 0.5)
    read = (lambda: read_matrix(p, modality="gex")) if kind == "matrix" else (lambda: read_labels(p))
    with pytest.raises(InputError, match=r"truncated gzip stream \(the file ends early") as e:
        read()
    assert e.value.path == str(p)


def test_error_truncated_gzip_found_while_streaming(tmp_path):
    """Cut far into a large file: the first lines decompress, the break shows up in the
    block-by-block read (not while sniffing the header)."""
    rng = np.random.default_rng(0)
    n, m = 4000, 300
    barcodes = [f"cell{i}" for i in range(n)]
    X = rng.poisson(0.3, size=(n, m))
    src = write_csv(tmp_path / "big.csv", barcodes, [f"G{j}" for j in range(m)], X)
    assert src.stat().st_size > 2 << 20  # the cut lies past the 1 MiB the header sniffing reads
    p = _gzip_cut(src, tmp_path / "big.csv.gz", 0.8)
    from xfer.data.readers import _read_head
    assert _read_head(p)[0].startswith("barcode,G0,G1")  # the head still reads
    with pytest.raises(InputError, match="truncated gzip stream"):
        read_csv_matrix(p, modality="gex", block_bytes=1 << 16)


def test_error_corrupted_gzip(tmp_path, research_files):
    import gzip
    data = bytearray(gzip.compress(research_files["gex"].read_bytes()))
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    p = tmp_path / "c.csv.gz"
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"c\.csv\.gz: (corrupted|truncated) gzip stream"):
        read_matrix(p, modality="gex")


def test_csv_streams_in_blocks(tmp_path, research_files):
    """A tiny block size forces many blocks; the result must be identical."""
    ds = read_csv_matrix(research_files["peak"], modality="peak", block_bytes=64)
    np.testing.assert_array_equal(ds.X.toarray(), research_files["X_peak"])


def test_labels_csv_column_names(tmp_path):
    p = write_labels(tmp_path / "l.csv", ["a", "b", "c"], ["G1", "S", "G2M"], cols=("cell_id", "cell_cycle_phase"))
    bc, codes = read_labels(p)
    assert list(bc) == ["a", "b", "c"] and list(codes) == [0, 1, 2]
    p2 = tmp_path / "l2.csv"
    pd.DataFrame({"x": [1, 2], "barcode": ["a", "b"], "my_label": ["S", "G1"]}).to_csv(p2, index=False)
    bc, codes = read_labels(p2, label_column="my_label")
    assert list(bc) == ["a", "b"] and list(codes) == [1, 0]


def test_phase_normalisation():
    assert [canonical_phase(x) for x in ("G1", "g1", "G0/G1", "S", "s", "G2M", "G2/M", "g2m", "G2-M", " G2_M ")] == \
        ["G1", "G1", "G1", "S", "S", "G2M", "G2M", "G2M", "G2M", "G2M"]
    assert canonical_phase("M") is None and canonical_phase("G2") is None
    assert PHASES == ("G1", "S", "G2M")


def test_h5ad_reader(tmp_path, research_files):
    X = research_files["X_gex"]
    cycle = ["S", "G2M", "G1", "S"] * 3  # differs from "phase" in every cell: label_column must pick it
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"phase": PHASES_OF, "cycle": cycle}, index=BARCODES),
                   var=pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(len(GENES))]}, index=GENES))
    a.write_h5ad(tmp_path / "a.h5ad")
    ds = read_h5ad(tmp_path / "a.h5ad", modality="gex")
    np.testing.assert_array_equal(ds.X.toarray(), X)
    assert list(ds.phase_names()) == PHASES_OF
    assert ds.feature_ids[0] == "ENSG00000000000"
    ds2 = read_h5ad(tmp_path / "a.h5ad", modality="gex", label_column="cycle")
    assert list(ds2.phase_names()) == cycle
    np.testing.assert_array_equal(ds2.X.toarray(), X)


def test_real_h5ad_with_lab_measured_phases():
    """A real FUCCI-sorted data set from ../shared/data/real reads with its phases."""
    ds = read_matrix(real_data("mcdavid2014_h9.h5ad"), modality="gex")
    assert ds.n_cells == 227 and ds.n_features == 253
    assert ds.label_counts() == {"G1": 66, "S": 68, "G2M": 93}


def _write_10x(path, gex_X, peak_X, barcodes, genes, peaks):
    M = sp.vstack([sp.csr_matrix(gex_X.T), sp.csr_matrix(peak_X.T)]).tocsc()
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = M.data.astype(np.int32)
        g["indices"] = M.indices.astype(np.int64)
        g["indptr"] = M.indptr.astype(np.int64)
        g["shape"] = np.array(M.shape, dtype=np.int32)
        fg = g.create_group("features")
        fg["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))] + list(peaks), dtype="S")
        fg["name"] = np.array(list(genes) + list(peaks), dtype="S")
        fg["feature_type"] = np.array(["Gene Expression"] * len(genes) + ["Peaks"] * len(peaks), dtype="S")
        fg["genome"] = np.array(["GRCh38"] * (len(genes) + len(peaks)), dtype="S")


def test_10x_multiome_h5(tmp_path, research_files):
    p = tmp_path / "filtered_feature_bc_matrix.h5"
    genes = GENES[:-1] + [GENES[0]]  # 10x symbols can repeat
    _write_10x(p, research_files["X_gex"], research_files["X_peak"], BARCODES, genes, PEAKS)
    g = read_10x_h5(p, modality="gex", label_path=research_files["labels"])
    k = read_matrix(p, modality="peak")
    np.testing.assert_array_equal(g.X.toarray(), research_files["X_gex"])
    np.testing.assert_array_equal(k.X.toarray(), research_files["X_peak"])
    assert list(k.features) == PEAKS
    assert len(set(g.features)) == len(GENES) and g.features[-1] == "MCM5-1"
    assert g.feature_ids[0] == "ENSG00000000000"
    assert list(g.phase_names()) == PHASES_OF


# ----------------------------------------------------------------------------- bad input: one test per case

def test_error_empty_file(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(InputError, match=r"empty\.csv.*empty"):
        read_matrix(p, modality="gex")


def test_error_header_only(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("barcode,A,B\n")
    with pytest.raises(InputError, match="no data rows"):
        read_matrix(p, modality="gex")


def test_error_duplicate_barcodes(tmp_path, research_files):
    bc = BARCODES[:-1] + [BARCODES[0]]
    p = write_csv(tmp_path / "dup.csv", bc, GENES, research_files["X_gex"])
    with pytest.raises(InputError, match=rf"dup\.csv \[barcode\].*1 duplicate barcodes: '{BARCODES[0]}'"):
        read_matrix(p, modality="gex")


def test_error_duplicate_label_barcodes(tmp_path):
    p = write_labels(tmp_path / "l.csv", ["a", "a", "b"], ["G1", "S", "S"])
    with pytest.raises(InputError, match=r"l\.csv \[barcode\].*duplicate barcodes"):
        read_labels(p)


def test_error_label_barcodes_missing_from_matrix(tmp_path, research_files):
    p = write_labels(tmp_path / "l.csv", BARCODES + ["EXTRA-1", "EXTRA-2"], PHASES_OF + ["G1", "S"])
    with pytest.raises(InputError, match=r"l\.csv \[barcode\]: 2 of 14 label barcodes are not in the matrix"):
        read_matrix(research_files["gex"], modality="gex", label_path=p)


def test_error_matrix_cells_missing_labels(tmp_path, research_files):
    p = write_labels(tmp_path / "l.csv", BARCODES[:9], PHASES_OF[:9])
    with pytest.raises(InputError, match=r"l\.csv \[barcode\]: 3 of 12 cells of the matrix .* have no label"):
        read_matrix(research_files["gex"], modality="gex", label_path=p)


def test_error_nan_count(tmp_path, research_files):
    X = research_files["X_gex"].copy()
    X[3, 2] = np.nan
    p = write_csv(tmp_path / "nan.csv", BARCODES, GENES, X)
    with pytest.raises(InputError, match=rf"nan\.csv \[row '{BARCODES[3]}', column 'TOP2A'\].*missing or non-finite"):
        read_matrix(p, modality="gex")


def test_error_negative_count(tmp_path, research_files):
    X = research_files["X_gex"].copy()
    X[5, 1] = -3
    p = write_csv(tmp_path / "neg.csv", BARCODES, GENES, X)
    with pytest.raises(InputError, match=rf"neg\.csv \[row '{BARCODES[5]}', column 'PCNA'\].*negative"):
        read_matrix(p, modality="gex")


def test_error_non_numeric_count(tmp_path, research_files):
    df = pd.DataFrame(research_files["X_gex"], index=pd.Index(BARCODES, name="barcode"), columns=GENES).astype(object)
    df.iloc[7, 4] = "lots"
    df.to_csv(tmp_path / "txt.csv")
    with pytest.raises(InputError, match=rf"txt\.csv \[row '{BARCODES[7]}', column 'GAPDH'\].*non-numeric value 'lots'"):
        read_matrix(tmp_path / "txt.csv", modality="gex")


def test_error_ragged_row(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("barcode,A,B\nc1,1,2\nc2,1\n")
    with pytest.raises(InputError, match=r"r\.csv \[row 'c2'\]: has 2 fields but the header has 3"):
        read_matrix(p, modality="gex")


def test_error_unknown_phase_names(tmp_path, research_files):
    p = write_labels(tmp_path / "l.csv", BARCODES, ["G1", "S", "Mitosis", "G1"] * 3)
    with pytest.raises(InputError, match=r"l\.csv \[phase\]: unknown phase name\(s\) 'Mitosis' \(3 cells\)"):
        read_matrix(research_files["gex"], modality="gex", label_path=p)


def test_error_no_label_column(tmp_path):
    p = tmp_path / "l.csv"
    pd.DataFrame({"barcode": ["a"], "colour": ["red"]}).to_csv(p, index=False)
    with pytest.raises(InputError, match=r"l\.csv \[phase\]: no phase/label column"):
        read_labels(p)


def test_error_malformed_peak_names(tmp_path, research_files):
    bad = PEAKS[:3] + ["chr2:1300-900", "chrX_10_x"]
    p = write_csv(tmp_path / "badpeaks.csv", BARCODES, bad, research_files["X_peak"])
    with pytest.raises(InputError, match=r"badpeaks\.csv \[features\]: 2 of 5 peak names are malformed.*chr2:1300-900"):
        read_matrix(p, modality="peak")


def test_error_peak_file_given_as_expression(research_files):
    with pytest.raises(InputError, match=r"L_PEAK\.csv \[features\].*looks like chromatin accessibility"):
        read_matrix(research_files["peak"], modality="gex")


def test_error_unknown_file_type(tmp_path):
    p = tmp_path / "x.xlsx"
    p.write_text("x")
    with pytest.raises(InputError, match="unknown file type"):
        read_matrix(p, modality="gex")


def test_error_corrupted_h5ad(tmp_path):
    p = tmp_path / "bad.h5ad"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 50)
    with pytest.raises(InputError, match=r"bad\.h5ad: not a readable \.h5ad"):
        read_matrix(p, modality="gex")


def test_error_10x_without_peaks(tmp_path, research_files):
    p = tmp_path / "g.h5"
    _write_10x(p, research_files["X_gex"], np.zeros((len(BARCODES), 0)), BARCODES, GENES, [])
    with pytest.raises(InputError, match=r"g\.h5 \[matrix/features/feature_type\]: no 'Peaks' features"):
        read_matrix(p, modality="peak")


def test_encode_phases_reports_counts():
    with pytest.raises(InputError, match=r"'G5' \(2 cells\), 'x' \(1 cells\)"):
        encode_phases(["G1", "G5", "G5", "x"], "f.csv", "phase")
