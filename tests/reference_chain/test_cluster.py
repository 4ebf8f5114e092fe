"""A 2-worker distributed LocalCluster and a single process build the same store.

tests/test_tile.py proves it for tiling under every scheduler; here the chain goes on: tiles and
embeddings are computed on the cluster's worker processes (one task per slide), then the slide
model is trained and predicts from them. Every array, table and model equals the `sync` run's.
"""

from __future__ import annotations

import numpy as np
from chain_data import CHAIN, assert_same_store, run_chain

from radpath_fs.embedders import embedder_id
from radpath_fs.embeddings import read_embeddings


def test_local_cluster_builds_the_same_store_as_one_process(chain_reference, tmp_path):
    data, reference = chain_reference
    clustered = run_chain(str(tmp_path / "local2"), data, scheduler="local:2")
    kinds = assert_same_store(reference, clustered)
    assert kinds["bytes"] >= 10 and kinds["parquet"] >= 4
    # Not vacuous: the embeddings are real features, different from slide to slide.
    eid = embedder_id(CHAIN.embed)
    cases = clustered.cases()["case_id"].tolist()
    first, second = (read_embeddings(clustered, eid, c, 20) for c in cases[:2])
    assert first.shape[1] == second.shape[1] > 0 and len(first) > 0 and np.isfinite(first).all()
    assert not np.array_equal(first.mean(0), second.mean(0))
