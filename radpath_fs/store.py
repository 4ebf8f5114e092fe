"""The feature store: one folder (or fsspec URL) holding tables (Parquet) and arrays (Zarr v3).

Its layout (every path, table and version) is store/README.md, spelled in code by `radpath_fs.layout`.
Two rules keep reruns safe:
- a Zarr group is written by one task and marked complete last (`mark_complete`); a rerun skips
  complete groups and rewrites incomplete ones from scratch (`fresh_group`);
- a Parquet table is written to a temporary name and renamed, so readers never see half a table.
A writer lock (`Store.lock`) keeps two writers off the same store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import io
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from radpath_fs.errors import StoreError, StoreLockedError
from radpath_fs.layout import (
    CASES_TABLE,
    COMPLETE,
    LAYOUT_VERSION,
    LOCK_NAME,
    STORE_JSON,
    TABLE_SUFFIX,
    TABLES,
    TMP_PREFIX,
    check_inside,
    check_name,
    table_path,
)


def _inside(parts: tuple[str, ...]) -> tuple[str, ...]:
    """Store locations are relative and never climb: an absolute part or a '..' would leave the store."""
    for p in parts:
        check_inside(p)
    return parts


def mag_key(magnification: float) -> str:
    """Zarr group name of a magnification: 20 -> '20', 2.5 -> '2.5'."""
    return f"{float(magnification):g}"


class Store:
    """A feature store rooted at a local path or an fsspec URL (``s3://bucket/x``, ``memory://x``)."""

    def __init__(self, url: str | os.PathLike, *, create: bool = False):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)
        meta = self.path(STORE_JSON)
        if self.fs.exists(meta):
            found = json.loads(self.fs.cat_file(meta)).get("layout_version")
            if found != LAYOUT_VERSION:
                raise StoreError(
                    f"store {self.url} has layout {found!r}; this radpath_fs writes layout {LAYOUT_VERSION}: "
                    "rebuild it (delete the store and run the pipeline again)"
                )
        elif self.fs.isfile(self.root):
            raise StoreError(f"{self.url}: is a file, not a folder; a store is a folder (a new or an existing store)")
        elif create:
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_json(STORE_JSON, {"layout_version": LAYOUT_VERSION, "created": _now()})
        else:
            raise StoreError(f"{self.url}: not a radpath store (no {STORE_JSON}); run `radpath ingest` first")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *_inside(parts)])

    def local_path(self, *parts: str) -> str:
        """The OS path of a store location; only for stores on the local filesystem."""
        if not self.is_local:
            raise StoreError(f"{self.url}: this operation needs a store on the local filesystem")
        return os.path.join(self.root, *_inside(parts))

    def check_no_links(self, rel: str) -> None:
        """Refuse a symbolic link on the way to `rel` (see `linksafe.refuse_links`); object stores have none."""
        if self.is_local:
            from radpath_fs.linksafe import refuse_links

            refuse_links(self.root, rel)

    def url_of(self, *parts: str) -> str:
        """An fsspec URL for a location inside the store (what Dask workers are handed)."""
        proto = _protocols(self.fs)[0]
        joined = self.path(*parts)
        return joined if self.is_local else f"{proto}://{joined}"

    # ---- small files ---------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically: a temporary name beside it, then a rename."""
        self.check_no_links(rel)
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            if self.is_local:
                os.replace(tmp, target)  # atomic on POSIX, and replaces an existing file
            else:
                self.fs.mv(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm(tmp)
            raise

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.fs.cat_file(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    # ---- tables --------------------------------------------------------------------------------
    @staticmethod
    def table_rel(name: str) -> str:
        return table_path(name)

    def write_table(self, name: str, table: pa.Table | pd.DataFrame) -> str:
        """Write the table `name` (`tables/<name>.parquet`) atomically and return its path."""
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        rel = self.table_rel(name)
        self.write_bytes(rel, buf.getvalue())
        return self.path(rel)

    def has_table(self, name: str) -> bool:
        return self.exists(self.table_rel(name))

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """Table `name` (only `columns`, when given: Parquet reads just those)."""
        rel = self.table_rel(name)
        if not self.exists(rel):
            raise StoreError(f"{self.path(rel)}: table {name!r} does not exist yet")
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f, columns=columns).to_pandas()

    def list_tables(self, prefix: str) -> list[str]:
        """Names of the tables under `tables/<prefix>/`, sorted, temporaries left out."""
        folder = self.path(TABLES, prefix)
        if not self.fs.exists(folder):
            return []
        names = [p.rsplit("/", 1)[1] for p in self.fs.ls(folder, detail=False)]
        return sorted(
            f"{prefix}/{n.removesuffix(TABLE_SUFFIX)}"
            for n in names
            if n.endswith(TABLE_SUFFIX) and not n.startswith(TMP_PREFIX)
        )

    def cases(self, include_excluded: bool = False) -> pd.DataFrame:
        """The cases table; excluded cases (bad input recorded by --skip-errors) left out by default."""
        df = self.read_table(CASES_TABLE)
        if not include_excluded:
            df = df[~df["excluded"]].reset_index(drop=True)
        return df

    # ---- zarr ----------------------------------------------------------------------------------
    def zarr_store(self, name: str):
        """A zarr v3 store for `name` (``tiles.zarr``, ``embeddings.zarr``, ``mri.zarr``)."""
        import zarr

        if self.is_local:
            from radpath_fs.linksafe import LinkSafeLocalStore

            return LinkSafeLocalStore(self.local_path(name))
        # Zarr drives the filesystem from its own event loop: it needs an asynchronous instance
        # (s3fs, gcsfs) or an async wrapper (memory), not `self.fs`, whose calls run on fsspec's loop.
        return zarr.storage.FsspecStore.from_url(self.url_of(name), storage_options=self.fs.storage_options)

    def open_zarr(self, name: str, mode: str = "a"):
        import zarr

        return zarr.open_group(store=self.zarr_store(name), mode=mode)

    def group_is_complete(self, name: str, path: str) -> bool:
        """Whether `name/path` exists and was marked complete by its writer."""
        import zarr

        try:
            g = zarr.open_group(store=self.zarr_store(name), path=path, mode="r")
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            return False
        return bool(g.attrs.get(COMPLETE, False))

    def fresh_group(self, name: str, path: str):
        """An empty group at `name/path`, whatever was there before (an incomplete earlier write)."""
        import zarr

        for part in path.split("/"):
            check_name(part, "group name")
        try:  # the root exists before children; parallel writers of other slides may race to it
            zarr.open_group(store=self.zarr_store(name), mode="a")
        except zarr.errors.ContainsGroupError:
            pass
        return zarr.open_group(store=self.zarr_store(name), path=path, mode="w")

    def open_group(self, name: str, path: str, mode: str = "r"):
        import zarr

        return zarr.open_group(store=self.zarr_store(name), path=path, mode=mode)

    # ---- writer lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the store's writer lock for the duration of a writing command.

        A second writer fails at once, naming the holder. A lock left by a process that died on
        this host is cleared, with the temporary files that process left (it was the only writer,
        so every temporary in the store is its debris). On object stores the lock is an exclusive
        create where the store has one (S3 conditional writes); elsewhere it is best effort.
        """
        lock = self.path(LOCK_NAME)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _now(),
            "command": command,
            "token": uuid.uuid4().hex,
        }
        stale = False
        for _ in range(2):
            if self._try_create_lock(lock, holder):
                break
            current = self._read_lock(lock)
            if current is not None and not _is_stale(current):
                raise self._locked_error(current)
            stale = stale or current is not None
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(lock)
        else:  # pragma: no cover - two processes clearing the same stale lock at once
            raise StoreLockedError(f"{self.url}: could not take the writer lock ({lock})")
        if stale:
            self.remove_temporaries()
        elif self.is_local:  # a writer killed while making its lock leaves its lock temporary behind
            for p in glob.glob(os.path.join(glob.escape(self.root), f"{TMP_PREFIX}lock-*")):
                if not p.endswith(holder["token"]):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
        try:
            yield
        finally:
            current = self._read_lock(lock)
            if current is not None and current.get("token") == holder["token"]:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(lock)

    def remove_temporaries(self) -> list[str]:
        """Delete the temporary files of interrupted writes: this store's `.tmp-*` names and zarr's
        `<name>.<uuid>.partial` ones. Only for the lock holder: another writer's are in flight."""
        found = [p for p in self.fs.find(self.root) if _is_temporary(p.rsplit("/", 1)[-1])]
        for p in found:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(p)
        return found

    def check_unlocked(self) -> None:
        """Fail now, as `lock` would, while a live writer holds the store: for a writing command
        that does long work (validation, fusion) before it takes the lock."""
        current = self._read_lock(self.path(LOCK_NAME))
        if current is not None and not _is_stale(current):
            raise self._locked_error(current)

    def _locked_error(self, holder: dict) -> StoreLockedError:
        if "pid" not in holder:
            return StoreLockedError(
                f"{self.url} is locked: {self.path(LOCK_NAME)} is unreadable, a writer's lock being made "
                f"right now (or cut short by a crash: it counts as stale after {UNREADABLE_LOCK_GRACE_S:.0f} s)"
            )
        return StoreLockedError(
            f"{self.url} is locked by another writer: pid {holder.get('pid')} on host "
            f"{holder.get('host')} since {holder.get('since')} ({holder.get('command')}). "
            f"If that process is gone from another host, remove {self.path(LOCK_NAME)}."
        )

    def _try_create_lock(self, lock: str, holder: dict) -> bool:
        data = json.dumps(holder).encode()
        if self.is_local:
            # Written whole, then linked in: the lock never exists without its holder, so a second
            # writer starting at the same moment cannot read it empty and take it for stale.
            tmp = f"{os.path.dirname(lock)}/{TMP_PREFIX}lock-{holder['token']}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, lock)
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: an exclusive create, then the content
                pass
            finally:
                with contextlib.suppress(FileNotFoundError):  # the holder may have swept it as debris
                    os.unlink(tmp)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            # An exclusive create where the filesystem has one (S3's conditional PUT, memory://);
            # elsewhere fsspec checks, then writes.
            self.fs.pipe_file(lock, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _read_lock(self, lock: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(lock))
        except FileNotFoundError:
            return None
        except ValueError:
            # Cut short when its writer died, or (where a lock is created, then filled) being
            # written right now: stale only once it has stayed unreadable for a while.
            try:
                age = dt.datetime.now(dt.timezone.utc).timestamp() - self.fs.modified(lock).timestamp()
            except (OSError, NotImplementedError, ValueError):
                age = float("inf")
            return {"unreadable_for_s": age}


# zarr's LocalStore writes a chunk or zarr.json to `<name>.<uuid4 hex>.partial`, then renames it.
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX) or bool(_ZARR_PARTIAL.search(name))


# How long an unreadable lock file may be a writer's lock still being written.
UNREADABLE_LOCK_GRACE_S = 10.0


def _is_stale(holder: dict) -> bool:
    """A lock is stale when its process is gone on this host, or its file stayed unreadable."""
    if "pid" not in holder:
        return holder.get("unreadable_for_s", float("inf")) > UNREADABLE_LOCK_GRACE_S
    if holder.get("host") != socket.gethostname():
        return False
    import psutil

    return not psutil.pid_exists(int(holder["pid"]))


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
