import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from radpath_fs.errors import StoreError, StoreLockedError
from radpath_fs.layout import LAYOUT_VERSION, LOCK_NAME, STORE_JSON, TILES, TMP_PREFIX, prediction_table_name
from radpath_fs.store import Store, check_name, mag_key


def test_create_and_open(tmp_path):
    s = Store(tmp_path / "st", create=True)
    meta = tmp_path / "st" / STORE_JSON
    assert json.loads(meta.read_text())["layout_version"] == LAYOUT_VERSION
    Store(tmp_path / "st")  # opens
    with pytest.raises(StoreError, match="not a radpath store"):
        Store(tmp_path / "nothing")
    # A store of another layout (older or newer) is refused whole, saying to rebuild it.
    for other in (LAYOUT_VERSION - 1, LAYOUT_VERSION + 1, None):
        meta.write_text(json.dumps({} if other is None else {"layout_version": other}))
        with pytest.raises(StoreError, match=rf"has layout {other}; this radpath_fs writes layout {LAYOUT_VERSION}: "
                                             r"rebuild it \(delete the store and run the pipeline again\)"):
            Store(tmp_path / "st")
    assert s.url.endswith("st")


def test_tables_are_written_atomically_and_read_back(tmp_path):
    s = Store(tmp_path, create=True)
    df = pd.DataFrame({"a": [1, 2], "b": ["x", None]})
    s.write_table("cases", df)
    s.write_table(prediction_table_name("m1", "oof"), df)
    pd.testing.assert_frame_equal(s.read_table("cases"), df)
    pd.testing.assert_frame_equal(s.read_table("cases", columns=["b"]), df[["b"]])
    assert s.list_tables("predictions") == [prediction_table_name("m1", "oof")]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert leftovers == []
    with pytest.raises(StoreError, match="does not exist yet"):
        s.read_table("tiles")


def test_fsspec_memory_store_round_trip():
    s = Store("memory://radpath-test-store", create=True)
    s.write_table("cases", pd.DataFrame({"x": [1.5]}))
    assert s.read_table("cases")["x"].tolist() == [1.5]
    with s.lock("test"):
        assert s.fs.exists(s.path(LOCK_NAME))
    assert not s.fs.exists(s.path(LOCK_NAME))


@pytest.mark.parametrize("bad", ["../up", "/abs", ".hidden", "a/b", "", "x" * 300, "a..b", "sp ace"])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(StoreError, match="not safe as a path component"):
        check_name(bad)


def test_mag_key():
    assert (mag_key(20), mag_key(2.5), mag_key(40.0)) == ("20", "2.5", "40")


def test_groups_are_complete_only_when_marked(tmp_path):
    s = Store(tmp_path, create=True)
    assert not s.group_is_complete(TILES, "c1/20")
    g = s.fresh_group(TILES, "c1/20")
    g.create_array("coords", shape=(2, 2), dtype="int64")
    assert not s.group_is_complete(TILES, "c1/20")
    g.attrs["complete"] = True
    assert s.group_is_complete(TILES, "c1/20")
    s.fresh_group(TILES, "c1/20")  # a redo starts empty
    assert not s.group_is_complete(TILES, "c1/20")
    assert "coords" not in s.open_group(TILES, "c1/20")


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    s = Store(tmp_path, create=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from radpath_fs.store import Store; s=Store(sys.argv[1]);\n"
         "with s.lock('tile'):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as e:
            with s.lock("embed"):
                pass
        assert time.monotonic() - t0 < 2
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "(tile)" in msg
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and is cleared by the next writer.
    assert (tmp_path / LOCK_NAME).exists()
    with s.lock("embed"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_unreadable_lock_file_is_stale_only_once_it_stays_unreadable(tmp_path):
    s = Store(tmp_path, create=True)
    lock = tmp_path / LOCK_NAME
    lock.write_text('{"pid": 12')  # being written by a writer starting now, or cut short by a crash
    with pytest.raises(StoreLockedError, match="unreadable"):
        with s.lock("x"):
            pass
    old = time.time() - 60
    os.utime(lock, (old, old))  # still unreadable a minute later: a crash
    (tmp_path / ".tmp-lock-0123abcd").write_text("{}")  # debris of a writer killed while locking
    with s.lock("x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []
    assert not lock.exists()
    # No lock left, only a lock temporary of a writer killed while making its lock: swept too.
    (tmp_path / ".tmp-lock-4567cdef").write_text("{}")
    with s.lock("x"):
        assert not (tmp_path / ".tmp-lock-4567cdef").exists()


def test_a_lock_is_never_seen_without_its_holder(tmp_path):
    """Made whole and linked in: a reader racing a writer that is taking the lock reads its holder."""
    import threading

    s = Store(tmp_path, create=True)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append((tmp_path / LOCK_NAME).read_bytes())

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(200):
            with s.lock("x"):
                pass
    finally:
        stop.set()
        t.join()
    assert seen and all(json.loads(b)["pid"] == os.getpid() for b in seen)


def test_lock_from_another_host_is_respected(tmp_path):
    s = Store(tmp_path, create=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "t", "command": "tile"}))
    with pytest.raises(StoreLockedError, match="on host elsewhere"):
        with s.lock("x"):
            pass
