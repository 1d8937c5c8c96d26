"""The stores on an object store: s3:// URIs through pyarrow's S3 file system, against a local
moto S3 server bound to 127.0.0.1 (no network, no credentials beyond dummy ones)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xfer.data.embed_store import EmbeddingKey, EmbeddingStore
from xfer.data.store import CellStore
from xfer.errors import StoreError

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="xfer")
    yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    mp.undo()
    server.stop()


def test_cell_store_round_trip_on_s3(s3, peak_ds):
    uri = f"s3://xfer/stores/a?{s3}"
    man = CellStore(uri).write(peak_ds)
    back = CellStore(uri).read("peak")  # a fresh handle: everything comes back from the bucket
    assert sp.isspmatrix_csr(back.X) and (back.X != peak_ds.X).nnz == 0
    assert list(back.barcodes) == list(peak_ds.barcodes) and list(back.features) == list(peak_ds.features)
    np.testing.assert_array_equal(back.labels, peak_ds.labels)
    assert back.content_hash() == man.content_hash
    assert CellStore(uri).names() == ["peak"]
    with pytest.raises(StoreError, match="gex"):
        CellStore(uri).read("gex")


def test_embedding_store_on_s3(s3):
    es = EmbeddingStore(f"s3://xfer/emb?{s3}")
    key = EmbeddingKey("cd" * 16, "pca", {"n_components": 4})
    vec = np.arange(12, dtype=np.float32).reshape(3, 4)
    es.put(key, ["a", "b", "c"], vec)
    again = EmbeddingStore(f"s3://xfer/emb?{s3}")
    assert again.has(key)
    np.testing.assert_array_equal(again.get(key).vectors, vec)


def test_xfer_ingest_into_s3_then_read_by_name(s3, research_files, capsys):
    from xfer.cli import main

    uri = f"s3://xfer/cli?{s3}"
    assert main(["ingest", "--store", uri, "--src_csv", str(research_files["gex"]),
                 "--src_label_csv", str(research_files["labels"]), "--tgt_csv", str(research_files["peak"])]) == 0
    assert "store:L_PEAK" in capsys.readouterr().out
    assert main(["store", "--store", uri]) == 0
    assert "store:L_GEX" in capsys.readouterr().out
    np.testing.assert_array_equal(CellStore(uri).read("L_PEAK").X.toarray(), research_files["X_peak"])
