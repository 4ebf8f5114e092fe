"""One writer, many readers.

A writer process holds the store's lock and rewrites tables as fast as it can, through a
filesystem slowed down so that every write is in flight for a while. Meanwhile:
- a second writer (`radpath fuse`, `radpath ingest`) fails at once with the lock message;
- `radpath query`, `radpath report` and the analyst notebook run, take no lock, and every table
  they read is whole: a self-checking table changes size and content with every version, and each
  read must be one complete version of it.
The control: the same writer writing in place instead of temporary-then-rename is caught by the
same reads, so the check can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from fusion_data import make_prediction_store
from nbclient import NotebookClient
from typer.testing import CliRunner

from radpath_fs.cli import app
from radpath_fs.config import FusionConfig
from radpath_fs.fusion.cli import fuse_store
from radpath_fs.layout import LOCK_NAME, TMP_PREFIX
from radpath_fs.query import query
from radpath_fs.store import Store

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "ensemble_ablations.ipynb"
N_CASES = 40

# The writer: `store.fs.open(..., "wb")` hands out files that write 16 KiB at a time with a pause,
# so a table is in flight for ~0.1 s. Mode `atomic` writes through Store.write_table (temporary
# name, then rename); mode `in-place` writes the same bytes straight to the table's name.
WRITER = r"""
import io, os, sys, time
import numpy as np, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
from radpath_fs.store import Store

url, mode, stop = sys.argv[1:4]
store = Store(url)
plain_open = store.fs.open

class SlowFile:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def write(self, data):
        for i in range(0, len(data), 1 << 14):
            self.f.write(data[i : i + (1 << 14)]); self.f.flush(); time.sleep(0.002)

store.fs.open = lambda path, mode="rb", **kw: SlowFile(plain_open(path, mode, **kw)) if "w" in mode else plain_open(path, mode, **kw)

def churn(v):
    n = 20000 + 5000 * (v % 5)
    k = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(v)
    return pd.DataFrame({"version": np.full(n, v, np.int64), "k": k, "check": (k * 7 + v) % 1000003,
                         "payload": rng.random(n)})

def write_churn(v):
    if mode == "atomic":
        store.write_table("churn", churn(v))
    else:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(churn(v)), buf)
        with store.fs.open(store.path(store.table_rel("churn")), "wb") as f:
            f.write(buf.getvalue())

with store.lock("fuse"):
    same = {n: store.read_table(n) for n in ["cases", "ensembles", *store.list_tables("predictions")]}
    write_churn(0)
    print("held", flush=True)
    v, deadline = 0, time.monotonic() + 240
    while not os.path.exists(stop) and time.monotonic() < deadline:
        v += 1
        write_churn(v)
        if mode == "atomic":
            for name, df in same.items():  # the same content, a fresh file each time
                store.write_table(name, df)
    print(v, flush=True)
"""

CHURN_SQL = ("SELECT min(version) AS v0, max(version) AS v1, count(*) AS n, max(k) AS kmax, "
             "count(*) FILTER (WHERE \"check\" <> (k * 7 + version) % 1000003) AS bad FROM churn")


def expected_rows(v: int) -> int:
    return 20000 + 5000 * (v % 5)


def check_churn_frame(df) -> int:
    """The version of a whole churn table; AssertionError for anything else."""
    v = int(df["version"].iloc[0])
    assert (df["version"] == v).all() and len(df) == expected_rows(v)
    assert (df["k"].to_numpy() == range(len(df))).all()
    assert ((df["k"] * 7 + v) % 1000003 == df["check"]).all()
    return v


def check_churn_sql(url: str) -> int:
    r = query(url, CHURN_SQL).to_pylist()[0]
    assert r["v0"] == r["v1"] and r["n"] == expected_rows(r["v0"]) and r["kmax"] == r["n"] - 1 and r["bad"] == 0, r
    return r["v0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = make_prediction_store(tmp_path_factory.mktemp("concurrency") / "store", n_cases=N_CASES, n_val=4, seed=1)
    fuse_store(s.url, FusionConfig(method="soft_vote", bootstrap=20))
    return s


class Writer:
    """The writer process; stopped (and waited for) on exit."""

    def __init__(self, store: Store, mode: str, tmp: Path):
        self.stop = tmp / f"stop-{mode}"
        self.stop.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, store.url, mode, str(self.stop)],
                                     stdout=subprocess.PIPE, text=True)
        self.versions = 0

    def __enter__(self):
        assert self.proc.stdout.readline().strip() == "held"
        return self

    def __exit__(self, *exc):
        self.stop.touch()
        try:
            out, _ = self.proc.communicate(timeout=60)
            self.versions = int(out.split()[-1])
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def read_until(store: Store, seconds: float, min_versions: int) -> tuple[set[int], list[str]]:
    """Read the churn table (pyarrow and DuckDB) for `seconds` and until `min_versions` versions
    were seen: the versions seen and every failed read."""
    seen, failures = set(), []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(seen) < min_versions:
        if time.monotonic() > end + 30:
            break
        for read in (lambda: check_churn_frame(store.read_table("churn")), lambda: check_churn_sql(store.url)):
            try:
                seen.add(read())
            except Exception as e:  # a torn Parquet file: pyarrow or DuckDB errors, or a wrong table
                failures.append(f"{type(e).__name__}: {str(e)[:200]}")
    return seen, failures


def test_readers_see_whole_tables_while_a_writer_runs(store, tmp_path, monkeypatch):
    n_predictions = query(store.url, "SELECT count(*) AS n FROM predictions").to_pylist()[0]["n"]
    assert n_predictions > 0
    runner = CliRunner()
    with Writer(store, "atomic", tmp_path) as writer:
        holder = store.read_json(LOCK_NAME)
        assert holder["pid"] == writer.proc.pid

        # A second writer fails at once, naming the holder, and writes nothing.
        for args in (["fuse", "--store", store.url], ["ingest", str(tmp_path), "--store", store.url]):
            t0 = time.monotonic()
            r = runner.invoke(app, args)
            assert r.exit_code == 2, r.output
            assert f"is locked by another writer: pid {writer.proc.pid}" in " ".join(r.output.split())
            assert "(fuse)" in r.output and time.monotonic() - t0 < 5, args

        seen, failures = read_until(store, seconds=3, min_versions=3)
        assert failures == [] and len(seen) >= 3

        # The CLI readers: the predictions view always holds every row.
        r = runner.invoke(app, ["query", "--store", store.url, "--format", "json",
                                "SELECT count(*) AS n, count(DISTINCT model_id) AS models FROM predictions"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)[0]["n"] == n_predictions
        r = runner.invoke(app, ["report", "--store", store.url, "--out", str(tmp_path / "report")])
        assert r.exit_code == 0, r.output
        assert "ensemble" in (tmp_path / "report" / "index.html").read_text().lower()

        # The analyst notebook, top to bottom, on tables rewritten under it.
        monkeypatch.setenv("RADPATH_STORE", store.url)
        monkeypatch.setenv("RADPATH_BOOTSTRAP", "20")
        nb = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        assert f"10 candidates, {N_CASES} OOF cases" in text

        # Readers took no lock: the writer's is the one there.
        assert store.read_json(LOCK_NAME) == holder
    assert writer.versions >= 3
    assert not store.exists(LOCK_NAME)
    assert not [p for p in store.fs.find(store.root) if p.rsplit("/", 1)[1].startswith(TMP_PREFIX)]


def test_the_check_catches_a_writer_that_writes_in_place(store, tmp_path):
    with Writer(store, "in-place", tmp_path):
        _, failures = read_until(store, seconds=3, min_versions=2)
    assert failures, "reads of a table written in place were never torn: the check above proves nothing"
