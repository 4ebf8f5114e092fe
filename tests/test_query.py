"""`radpath query`: DuckDB views over the store's tables, read-only, four output formats."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import exits_2_with
from fusion_data import make_prediction_store
from typer.testing import CliRunner

from radpath_fs.cli import app
from radpath_fs.config import FusionConfig
from radpath_fs.errors import RadpathError
from radpath_fs.fusion.cli import fuse_store
from radpath_fs.predictions import prediction_table, write_predictions
from radpath_fs.query import connect, query, run_query
from radpath_fs.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = make_prediction_store(tmp_path_factory.mktemp("query") / "store", n_cases=40, n_val=5, seed=0)
    # One file with an extra column: the predictions view keeps it (union by name).
    extra = prediction_table(
        model_id="wsi-mag20-all-e49",
        modality="wsi",
        magnification=20,
        snapshot=49,
        fold=-1,
        split="test",
        case_ids=["T1", "T2"],
        labels=[None, None],
        logits=np.zeros((2, 3)),
        extra={"votes": np.array([7, 3])},
    )
    write_predictions(s, extra)
    fuse_store(s.url, FusionConfig(method="soft_vote", bootstrap=50))
    return s


def test_a_connection_reads_each_table_as_it_was_when_it_opened(tmp_path):
    """A scan opens its file more than once; a writer's atomic replace in between must not mix
    two versions: an open connection keeps reading the version it opened."""
    store = Store(tmp_path / "s", create=True)
    store.write_table("cases", pd.DataFrame({"case_id": [f"c{i}" for i in range(1000)], "label": "A"}))
    con = connect(store.url)
    store.write_table("cases", pd.DataFrame({"case_id": ["x"], "label": "G"}))
    assert con.sql("SELECT count(*), min(label) FROM cases").fetchall() == [(1000, "A")]
    con.close()
    assert query(store.url, "SELECT count(*) AS n FROM cases").to_pylist() == [{"n": 1}]


def _fingerprint(store: Store) -> dict[str, str]:
    root = Path(store.local_path())
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_views_cover_every_table(store):
    views = {
        r[0]
        for r in connect(store.url)
        .execute("SELECT view_name FROM duckdb_views() WHERE NOT internal")
        .fetchall()
    }
    assert {"cases", "predictions", "ensembles", "ensemble_predictions"} <= views
    n_files = len(store.list_tables("predictions"))
    t = query(store.url, "SELECT count(*) AS n, count(DISTINCT filename) AS files FROM predictions")
    # 10 members x 5 folds x (oof + val) files, plus the test file.
    assert t.to_pylist() == [{"n": 10 * 40 + 10 * 5 * 5 + 2, "files": n_files}]
    names = query(store.url, "SELECT DISTINCT filename FROM predictions ORDER BY filename")["filename"].to_pylist()
    assert names == sorted(store.path(store.table_rel(n)) for n in store.list_tables("predictions"))
    votes = query(
        store.url, "SELECT case_id, votes FROM predictions WHERE votes IS NOT NULL ORDER BY case_id"
    )
    assert votes.to_pylist() == [{"case_id": "T1", "votes": 7}, {"case_id": "T2", "votes": 3}]
    joined = query(
        store.url,
        """
        SELECT c.label, count(*) AS n FROM predictions p JOIN cases c USING (case_id)
        WHERE p.split = 'oof' AND p.label <> c.label GROUP BY ALL""",
    )
    assert joined.num_rows == 0  # the labels of both tables agree
    ens = query(store.url, "SELECT experiment, n_members, list_count(members) AS k FROM ensembles")
    assert ens.to_pylist() == [{"experiment": "all", "n_members": 10, "k": 10}]


def test_connection_is_read_only(store):
    before = _fingerprint(store)
    con = connect(store.url)
    for sql in ("CREATE TABLE x AS SELECT 1", "CREATE VIEW y AS SELECT 1", "DROP VIEW cases"):
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute(sql)
    con.close()
    target = store.path("tables", "cases.parquet")
    for sql, kind in [
        ("DROP VIEW cases", "DROP"),
        ("CREATE TABLE x AS SELECT 1", "CREATE"),
        (f"COPY (SELECT 1 AS a) TO '{target}' (FORMAT parquet)", "COPY"),
        ("INSERT INTO cases SELECT * FROM cases", "INSERT"),
        (f"ATTACH '{store.path('x.duckdb')}' AS x", "ATTACH"),
        ("SET threads = 1", "SET"),
        ("EXPORT DATABASE '/tmp/radpath-export'", "EXPORT"),
        # EXPLAIN ANALYZE runs the statement it explains: only a query may follow EXPLAIN.
        (f"EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{target}' (FORMAT parquet)", "COPY"),
        (f"explain copy (SELECT 1 AS a) TO '{target}'", "COPY"),
    ]:
        with pytest.raises(RadpathError, match=f"read-only: {kind} statements are not allowed"):
            query(store.url, sql)
    for sql in ("SELECT 1; SELECT 2", "SELECT 1; DROP VIEW cases"):
        with pytest.raises(RadpathError, match="expected one SQL statement, got 2"):
            query(store.url, sql)
    for sql in ("EXPLAIN SELECT * FROM cases", "EXPLAIN ANALYZE SELECT count(*) FROM cases"):
        assert query(store.url, sql).num_rows >= 1
    assert _fingerprint(store) == before


def test_formats(store, tmp_path, capsys):
    sql = "SELECT case_id, label, fold FROM cases WHERE label IS NOT NULL ORDER BY case_id LIMIT 3"
    run_query(store.url, sql, fmt="csv")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["case_id"] for r in rows] == ["CASE-0000", "CASE-0001", "CASE-0002"]
    run_query(store.url, "SELECT experiment, members, kappa FROM ensembles", fmt="json")
    data = json.loads(capsys.readouterr().out)
    assert data[0]["experiment"] == "all" and len(data[0]["members"]) == 10
    run_query(store.url, "SELECT experiment, members FROM ensembles", fmt="csv")
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert json.loads(row["members"])[0] == "wsi-mag20-e49"  # lists go out as JSON text
    out = tmp_path / "r.parquet"
    run_query(store.url, "SELECT * FROM ensemble_predictions", fmt="parquet", out=out)
    t = pq.read_table(out)
    assert t.num_rows == 40 + 5 and t.schema.field("prob_A").type == pa.float32()
    run_query(store.url, sql, fmt="table")
    text = capsys.readouterr().out
    assert "case_id" in text and "CASE-0002" in text and "3 row(s)" in text
    with pytest.raises(RadpathError, match="--out"):
        run_query(store.url, sql, fmt="parquet")
    with pytest.raises(RadpathError, match="--format 'xml'"):
        run_query(store.url, sql, fmt="xml")


def test_cli_query_errors_exit_2(store):
    runner = CliRunner()
    before = _fingerprint(store)
    exits_2_with(runner.invoke(app, ["query", "INSERT INTO cases SELECT * FROM cases", "--store", store.url]),
               "read-only: INSERT statements are not allowed")
    # --out may not overwrite the store's own files either.
    inside = store.path("tables", "cases.parquet")
    exits_2_with(runner.invoke(app, ["query", "SELECT 1 AS x", "--store", store.url, "--format", "parquet", "--out", inside]),
               "inside the store", "read-only")
    assert _fingerprint(store) == before
    res = runner.invoke(
        app, ["query", "SELECT count(*) AS n FROM cases", "--store", store.url, "--format", "json"]
    )
    assert res.exit_code == 0 and json.loads(res.output) == [{"n": 45}]
    res = runner.invoke(app, ["query", "SELECT * FROM tiles", "--store", store.url])
    assert res.exit_code == 2
    assert "tiles" in res.output and "views in this store" in res.output and "radpath tile" in res.output
    res = runner.invoke(app, ["query", "SELEC 1", "--store", store.url])
    assert res.exit_code == 2 and "SQL error" in res.output


def test_fresh_store_has_an_empty_predictions_view(tmp_path):
    s = Store(tmp_path / "empty", create=True)
    t = query(s.url, "SELECT count(*) AS n FROM predictions")
    assert t.to_pylist() == [{"n": 0}]
    cols = query(s.url, "DESCRIBE predictions").column("column_name").to_pylist()
    assert cols[:3] == ["model_id", "modality", "magnification"]


def test_fsspec_store(tmp_path):
    s = Store("memory://radpath-query-test/store", create=True)
    write_predictions(
        s,
        prediction_table(
            model_id="mri-fold0-e9",
            modality="mri",
            magnification=None,
            snapshot=9,
            fold=0,
            split="oof",
            case_ids=["a", "b"],
            labels=["A", "G"],
            logits=np.eye(3)[[0, 2]],
        ),
    )
    s.write_table("cases", pd.DataFrame({"case_id": ["a", "b"], "cohort": ["x", "x"]}))
    t = query(s.url, "SELECT p.case_id, p.label FROM predictions p JOIN cases USING (case_id) ORDER BY 1")
    assert t.to_pylist() == [{"case_id": "a", "label": "A"}, {"case_id": "b", "label": "G"}]
