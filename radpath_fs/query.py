"""`radpath query`: read-only SQL (DuckDB) over the store's Parquet tables.

Every `tables/<name>.parquet` is a view named `<name>` (cases, tiles, ensembles,
ensemble_predictions, ...), and `predictions` is the union of every file under
`tables/predictions/` (by column name, so extra columns are kept; `filename` gives each row's
file). The views live in a DuckDB database opened read-only; DuckDB still lets a read-only
connection `COPY ... TO` a file, so statements other than queries are refused before they run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import weakref
from pathlib import Path

from radpath_fs.errors import RadpathError
from radpath_fs.layout import PREDICTIONS, TABLE_SUFFIX, TABLES
from radpath_fs.predictions import SCHEMA
from radpath_fs.store import Store

FORMATS = ("table", "csv", "json", "parquet")
# Statement types that only read. DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first are SELECTs;
# EXPLAIN is allowed over a SELECT only, since EXPLAIN ANALYZE runs what it explains.
READ_ONLY_STATEMENTS = ("SELECT",)
_EXPLAIN = re.compile(r"\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE)
_DUCKDB_TYPES = {"string": "VARCHAR", "double": "DOUBLE", "float": "FLOAT", "int32": "INTEGER"}


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


class _Pinned:
    """Local table files opened once, and read by DuckDB through ``/proc/self/fd``: a scan opens a
    file more than once (its footer, then its row groups), and a writer replacing the file in
    between (an atomic rename) would hand it parts of two versions. An open file keeps its version."""

    def __init__(self, store: Store):
        self.store, self.fds, self.names = store, [], {}
        self.usable = store.is_local and os.path.isdir("/proc/self/fd")

    def path(self, path: str) -> str:
        name = _duck_path(self.store, path)
        if not self.usable:
            return name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone since listed, or too many open files: read by name
            return name
        self.fds.append(fd)
        self.names[f"/proc/self/fd/{fd}"] = name
        return f"/proc/self/fd/{fd}"

    def filename_sql(self) -> str:
        """The `filename` column as the store's path, not the pinned one."""
        if not self.names:
            return "filename"
        cases = " ".join(f"WHEN {_sql_string(k)} THEN {_sql_string(v)}" for k, v in self.names.items())
        return f"CASE filename {cases} ELSE filename END"

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _view_sql(store: Store, pinned: _Pinned) -> dict[str, str]:
    """View name -> its SELECT, for every table in the store."""
    views: dict[str, str] = {}
    tables = store.path(TABLES)
    if store.fs.exists(tables):
        for p in sorted(store.fs.ls(tables, detail=False)):
            name = p.rsplit("/", 1)[1]
            if name.endswith(TABLE_SUFFIX) and not name.startswith("."):
                views[name.removesuffix(TABLE_SUFFIX)] = f"SELECT * FROM read_parquet({_sql_string(pinned.path(p))})"
    files = [store.path(store.table_rel(n)) for n in store.list_tables(PREDICTIONS)]
    if files:
        listed = ", ".join(_sql_string(pinned.path(f)) for f in files)
        views[PREDICTIONS] = (
            f"SELECT * REPLACE ({pinned.filename_sql()} AS filename) "
            f"FROM read_parquet([{listed}], union_by_name = true, filename = true)"
        )
    else:  # an empty view with the contract's columns, so queries on a fresh store still parse
        cols = ", ".join(f"CAST(NULL AS {_DUCKDB_TYPES[str(f.type)]}) AS {_ident(f.name)}" for f in SCHEMA)
        views[PREDICTIONS] = f"SELECT {cols}, CAST(NULL AS VARCHAR) AS filename WHERE false"
    return views


def _duck_path(store: Store, path: str) -> str:
    return path if store.is_local else store.url_of(path[len(store.root) + 1 :])


def connect(store_url):
    """A read-only DuckDB connection with every store table as a view."""

    store = store_url if isinstance(store_url, Store) else Store(store_url)
    pinned = _Pinned(store)
    try:
        con = _connect(store, _view_sql(store, pinned))
    except BaseException:
        pinned.close()
        raise
    weakref.finalize(con, pinned.close)  # the files stay open as long as the connection lives
    return con


def _connect(store: Store, views: dict[str, str]):
    import duckdb

    with tempfile.TemporaryDirectory(prefix="radpath-query-") as tmp:
        db = os.path.join(tmp, "views.duckdb")
        con = duckdb.connect(db)
        if not store.is_local:
            con.register_filesystem(store.fs)
        for name, sql in views.items():
            con.execute(f"CREATE VIEW {_ident(name)} AS {sql}")
        con.close()
        con = duckdb.connect(db, read_only=True)
        # The open connection keeps the file alive; the folder can go now.
    if not store.is_local:
        con.register_filesystem(store.fs)
    return con


def _check_read_only(con, sql: str):
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise RadpathError(f"SQL error: {e}") from None
    if len(statements) != 1:
        raise RadpathError(f"expected one SQL statement, got {len(statements)}")
    kind = _statement_kind(con, statements[0])
    if kind not in READ_ONLY_STATEMENTS:
        raise RadpathError(f"radpath query is read-only: {kind} statements are not allowed (only queries, "
                           "and EXPLAIN [ANALYZE] of a query)")
    return statements[0]


def _statement_kind(con, statement) -> str:
    """A statement's type; for EXPLAIN [ANALYZE], the type of the statement it explains."""
    kind = statement.type.name
    if kind != "EXPLAIN":
        return kind
    m = _EXPLAIN.match(statement.query)
    inner = con.extract_statements(statement.query[m.end():]) if m else []
    return inner[0].type.name if len(inner) == 1 else "EXPLAIN"


def query(store_url, sql: str):
    """Run one read-only statement; returns a pyarrow Table."""
    import duckdb

    con = connect(store_url)
    try:
        statement = _check_read_only(con, sql)
        try:
            return con.sql(statement.query).to_arrow_table()
        except duckdb.CatalogException as e:
            views = [
                r[0]
                for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
            ]
            raise RadpathError(
                f"{e}\nviews in this store: {', '.join(sorted(views))} (cases are written by `radpath ingest`, "
                "tiles by `radpath tile`, predictions by `radpath predict`, ensembles by `radpath fuse`)"
            ) from None
        except duckdb.Error as e:
            raise RadpathError(f"SQL error: {e}") from None
    finally:
        con.close()


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def run_query(store_url, sql: str, fmt: str = "table", out: Path | None = None) -> None:
    """`radpath query`: print the result as a rich table, CSV or JSON, or write Parquet."""
    if fmt not in FORMATS:
        raise RadpathError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise RadpathError("--format parquet writes a file: give it with --out FILE")
    store = store_url if isinstance(store_url, Store) else Store(store_url)
    if out is not None and store.is_local:
        root, target = Path(store.root).resolve(), Path(out).resolve()
        if target == root or root in target.parents:
            raise RadpathError(f"--out {out}: inside the store {store.root}; `radpath query` is read-only, "
                               "so its result goes elsewhere")
    table = query(store, sql)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, str(out))
        return
    if fmt == "table":
        from rich.console import Console
        from rich.table import Table

        t = Table(show_lines=False)
        for name in table.column_names:
            t.add_column(name)
        for row in table.to_pylist():
            t.add_row(*(_cell(v) for v in row.values()))
        t.caption = f"{table.num_rows} row(s)"
        if out:
            with open(out, "w") as f:
                Console(file=f, width=200).print(t)
        else:
            Console().print(t)
        return
    text = (
        _csv(table)
        if fmt == "csv"
        else json.dumps(_json_safe(table.to_pylist()), default=str, indent=1) + "\n"
    )
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)


def _json_safe(v):
    """NaN/inf are not JSON: they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _csv(table) -> str:
    import io

    import pyarrow as pa
    import pyarrow.csv as pcsv

    # CSV holds no lists: nested columns go out as JSON text.
    cols = []
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_nested(col.type):
            col = pa.array(
                [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string()
            )
        cols.append(col)
    buf = io.BytesIO()
    pcsv.write_csv(pa.Table.from_arrays(cols, names=table.column_names), buf)
    return buf.getvalue().decode()
