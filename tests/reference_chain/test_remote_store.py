"""A store on a non-local fsspec filesystem: S3, served by moto's server on loopback.

tile -> embed -> train-wsi -> predict run against `s3://`, with a multi-process scheduler for
tiling (the workers reach the same bucket), and build the same store as the run on a local folder.
`query` (DuckDB over fsspec), `report` and the writer lock work there too. The endpoint comes from
the standard AWS variables, exactly as a user points radpath at MinIO or another S3 service.
"""

from __future__ import annotations

import logging

import fsspec
import numpy as np
import pytest
from chain_data import assert_same_store, run_chain
from moto.server import ThreadedMotoServer

from radpath_fs.errors import StoreLockedError
from radpath_fs.layout import LOCK_NAME, TILES, TMP_PREFIX, prediction_table_name
from radpath_fs.query import query
from radpath_fs.report import write_report
from radpath_fs.store import Store

BUCKET = "radpath-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 with one bucket; the environment points s3fs at it."""
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as mp:
            # Inherited by the subprocesses and Dask workers, like a user's shell settings.
            mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture(scope="module")
def remote(s3, chain_reference):
    data, _ = chain_reference
    return run_chain(f"{s3}/store", data, scheduler="processes", embed_scheduler="sync")


def test_chain_on_s3_builds_the_same_store_as_on_a_local_folder(remote, chain_reference):
    _, local = chain_reference
    assert not remote.is_local and remote.fs.protocol[0] == "s3"
    kinds = assert_same_store(local, remote)
    # Every kind of output was there to compare: tile shards, embeddings, tables, models.
    files = remote.fs.find(remote.root)
    for part in ("/tiles.zarr/", "/embeddings.zarr/", "/tables/predictions/", "/models/"):
        assert any(part in p for p in files), part
    assert kinds["parquet"] >= 4 and kinds["bytes"] >= 10 and kinds["json"] >= 10
    assert not [p for p in files if p.rsplit("/", 1)[1].startswith(TMP_PREFIX) or p.endswith(LOCK_NAME)]
    pred = remote.read_table(prediction_table_name("wsi-mag20-fold0-e2", "oof"))
    assert len(pred) > 0 and np.allclose(pred[["prob_A", "prob_O", "prob_G"]].sum(axis=1), 1, atol=1e-5)


def test_query_and_report_read_an_s3_store(remote, chain_reference, tmp_path):
    _, local = chain_reference
    sql = ("SELECT p.case_id, p.split, p.prob_G, count(t.tile_index) AS tiles FROM predictions p "
           "JOIN tiles t ON t.case_id = p.case_id AND t.magnification = 20 GROUP BY ALL ORDER BY 1")
    got = query(remote.url, sql).to_pandas()
    assert len(got) > 0 and (got["tiles"] > 0).all()
    assert got.equals(query(local.url, sql).to_pandas())
    out = write_report(remote.url, tmp_path / "report")
    html = out.read_text()
    assert "wsi-mag20-fold0-e2" in html and "<img" in html
    assert not remote.exists(LOCK_NAME)  # readers take no lock


def test_second_writer_on_s3_fails_at_once(remote):
    with remote.lock("tile"):
        holder = remote.read_json(LOCK_NAME)
        with pytest.raises(StoreLockedError, match=f"locked by another writer: pid {holder['pid']}"):
            with Store(remote.url).lock("embed"):
                pass
        assert remote.read_json(LOCK_NAME)["token"] == holder["token"]  # the holder keeps it
    assert not remote.exists(LOCK_NAME)


def test_zarr_groups_on_a_memory_store():
    """fsspec's memory filesystem is synchronous: zarr gets an async wrapper of it."""
    store = Store("memory://radpath-remote-test/store", create=True)
    g = store.fresh_group(TILES, "c1/20")
    g.create_array("coords", shape=(3, 2), dtype="int64")[...] = np.arange(6).reshape(3, 2)
    assert not store.group_is_complete(TILES, "c1/20")
    g.attrs["complete"] = True
    assert store.group_is_complete(TILES, "c1/20")
    np.testing.assert_array_equal(store.open_group(TILES, "c1/20")["coords"][...], np.arange(6).reshape(3, 2))
