"""Fault injection: `tile`, `embed`, `train-wsi`, `train-mri` and `predict` killed with SIGKILL,
rerun, and finished; the store must end up as an uninterrupted run left it.

For each command, in pipeline order, on a tiny synthetic cohort, the reference store runs the
command once, uninterrupted (its duration D and its atomic store writes are recorded), and the
store as it was before the command is copied for the faulted runs:
- random kills: the command is started on the faulted copy and its process group SIGKILLed at a
  time drawn from a seeded RNG in (0, D), then started again on what the kill left, and so on. An
  attempt that finishes before its kill time is compared with the reference and the copy starts
  over, so that kills land in unfinished work. At least `KILLS` attempts must really be killed;
- kills at write boundaries: the process SIGKILLs itself right after its k-th `Store.write_bytes`
  (tables, JSON, checkpoints), for the first and last few k: the narrow windows between two
  writes of one step (a checkpoint and its history, a table and its figure, a state file and
  the deletion of the one it replaces) that random times rarely hit.
Then a last, unkilled run finishes, and the faulted store must equal the reference: the same files
(no temporaries, no lock), Zarr chunks byte-equal, Zarr metadata and JSON equal, Parquet tables
equal with no duplicate rows, safetensors tensors byte-equal, all up to the wall-clock fields of
`WALL_CLOCK`. Training must resume from its last completed epoch: an epoch recorded in the
resumable state keeps its history row, wall-clock timings included, through every later kill and
rerun (an epoch trained again would have new timings), and the final run logs where it resumed.

Each command runs in its own process group, as `radpath_fs.cli:main` (the `radpath` entry point)
with its argv. The processes are forked from a zygote that imported torch, timm and MONAI once:
about 100 launches at 2-10 s of imports each would otherwise dominate the file's run time, and
kills would mostly land in `import`. The zygote checks that it is single-threaded before it forks.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from chain_data import assert_same_store as compare_stores
from chain_data import run_chain, synth_data, without_columns

from radpath_fs.layout import (
    CASES_TABLE,
    HISTORY,
    LOCK_NAME,
    PREDICTIONS,
    TABLE_SUFFIX,
    TABLES,
    TILES_TABLE,
    TMP_PREFIX,
    history_path,
)
from radpath_fs.store import Store
from radpath_fs.training import state_meta

KILLS = 10  # SIGKILLs at random times that must land per command
MAX_ATTEMPTS = 40
# Write boundaries killed at: the first and the last few writes of a command (for training, the
# first epoch's and the last epoch's: its snapshot, history and state).
FIRST_WRITES, LAST_WRITES = 2, 3  # kill after write 0 (before any), 1 and the last 3
SEED = 20240917

# Values that record when or how fast something ran: they differ between two identical runs.
WALL_CLOCK = {"created", "seconds", "tiles_per_s", "train_seconds", "train_volumes_per_s", "epoch_seconds"}

# zarr's LocalStore writes `<name>.<uuid hex>.partial` and renames it; the store writes `.tmp-*`.
PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")

PRELOAD = [
    "radpath_fs.cli", "radpath_fs.wsi", "radpath_fs.embed", "radpath_fs.mil", "radpath_fs.predict",
    "radpath_fs.mri.train", "radpath_fs.mri.predict", "timm", "monai.networks.nets", "monai.transforms",
]

ZYGOTE = r"""
import importlib, json, os, sys, traceback
for name in sys.argv[1:]:
    importlib.import_module(name)
with open("/proc/self/status") as f:
    threads = int(f.read().split("Threads:")[1].split()[0])
if threads != 1:  # fork keeps only the calling thread: a library's worker thread would be lost
    print(json.dumps({"error": f"zygote has {threads} threads after its imports; it may not fork"}), flush=True)
    sys.exit(1)
print(json.dumps({"ready": True}), flush=True)
import signal
from radpath_fs.cli import main
from radpath_fs.layout import TMP_PREFIX
from radpath_fs.store import Store

def count_writes(kill_after):
    # Log each atomic store write as `@@write N REL`. SIGKILL this process right after write
    # `kill_after` (before the first one for 0): whatever the command does next never happens.
    original, n = Store.write_bytes, [0]
    def write_bytes(self, rel, data):
        n[0] += 1
        if kill_after == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        print(f"@@write {n[0]} {rel}", file=sys.stderr, flush=True)
        original(self, rel, data)
        if n[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    Store.write_bytes = write_bytes

renames = [0]

def count_renames(kill_at):
    # Count the renames that finish an atomic write (the store's `.tmp-*`, zarr's `*.partial`);
    # SIGKILL this process in place of rename `kill_at`: the temporary file stays behind.
    original = os.replace
    def replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(src))
        if name.startswith(TMP_PREFIX) or name.endswith(".partial"):
            renames[0] += 1
            if renames[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(src, dst, *args, **kwargs)
    os.replace = replace

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0); os.dup2(log, 1); os.dup2(log, 2)
        count_writes(req.get("kill_after_write"))
        count_renames(req.get("kill_at_rename"))
        sys.argv = ["radpath", *req["argv"]]
        code = 1
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            print(f"@@renames {renames[0]}", file=sys.stderr)
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here: the test may signal the group before the child runs
    except OSError:
        pass
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """A Python process that imported the heavy modules once and forks one child per command."""

    def __init__(self):
        env = dict(os.environ, RADPATH_PROGRESS="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1",
                   # pyarrow's bundled jemalloc starts a background thread unless told not to.
                   JE_ARROW_MALLOC_CONF="background_thread:false")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, *PRELOAD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self._buf = b""
        hello = self._message(time.monotonic() + 300)
        assert hello == {"ready": True}, hello

    def _message(self, deadline: float | None) -> dict | None:
        """The zygote's next JSON line, or None when `deadline` passes first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the zygote exited (code {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], log: Path, kill_after: float | None = None,
            kill_after_write: int | None = None, kill_at_rename: int | None = None) -> tuple[int, float]:
        """Run `radpath *argv`; SIGKILL its process group after `kill_after` s, or the process just
        after its `kill_after_write`-th store write (0: before the first), or in place of its
        `kill_at_rename`-th rename of a temporary file. Returns (exit code, seconds)."""
        req = {"argv": argv, "log": str(log), "kill_after_write": kill_after_write, "kill_at_rename": kill_at_rename}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._message(None)["pid"]
        start = time.monotonic()
        done = self._message(None if kill_after is None else start + kill_after)
        if done is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished just now
                pass
            done = self._message(None)
        assert done["pid"] == pid
        return done["rc"], time.monotonic() - start

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- comparing stores --------------------------------------------------------------------------


# The rows that must be unique in each kind of table (whole rows, for the others).
TABLE_KEYS = {
    TILES_TABLE + TABLE_SUFFIX: ["case_id", "magnification", "tile_index"],
    CASES_TABLE + TABLE_SUFFIX: ["case_id"],
    HISTORY: ["epoch"],
}


def _check_no_duplicates(rel: str, table) -> None:
    df = table.to_pandas()
    name = rel.rsplit("/", 1)[-1]
    key = TABLE_KEYS.get(name, ["model_id", "split", "case_id"] if rel.startswith(f"{TABLES}/{PREDICTIONS}/") else None)
    dup = df.duplicated(subset=key).sum() if len(df) else 0
    assert dup == 0, f"{rel}: {dup} duplicate row(s) by {key or 'all columns'}"


def leftovers(root: Path) -> list[str]:
    """Temporary files and locks anywhere in a store."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.name.startswith(TMP_PREFIX) or PARTIAL.search(p.name) or p.name == LOCK_NAME
    )


def assert_same_store(got: Path, want: Path) -> None:
    assert leftovers(got) == [], f"{got}: leftovers {leftovers(got)}"
    compare_stores(Store(got), Store(want), volatile=WALL_CLOCK)
    for path in sorted(got.rglob("*.parquet")):
        rel = str(path.relative_to(got))
        _check_no_duplicates(rel, without_columns(pq.read_table(path), WALL_CLOCK))


# ---- the cohort and the commands ---------------------------------------------------------------


CONFIG = {
    "seed": 0,
    "device": "cpu",
    "tile": {"tile_size": 128, "magnifications": [20, 10], "tiles_per_shard": 8},
    "embed": {"name": "mobilenetv3_small_050", "weights": "random", "input_size": 64, "batch_size": 16},
    "wsi": {"mode": "head", "magnifications": [20], "epochs": 20, "snapshots": [-1, -5], "lr": 1e-3},
    "predict": {"repeats": 3},
    "mri": {"spatial_size": [32, 32, 32], "network": "densenet121", "init_features": 4, "growth_rate": 4,
            "block_config": [1, 1, 1, 1], "epochs": 10, "snapshots": [-1, -3], "batch_size": 2, "num_workers": 0},
}
WSI_EPOCHS, MRI_EPOCHS = CONFIG["wsi"]["epochs"], CONFIG["mri"]["epochs"]
WSI_RUN, MRI_RUN = "wsi-mag20-fold0", "mri-fold0"
MODELS = [f"{WSI_RUN}-e{WSI_EPOCHS - 1}", f"{WSI_RUN}-e{WSI_EPOCHS - 5}", f"{MRI_RUN}-e{MRI_EPOCHS - 1}",
          f"{MRI_RUN}-e{MRI_EPOCHS - 3}"]
COMMANDS = {
    "tile": ["tile"],
    "embed": ["embed", "--device", "cpu"],
    "train-wsi": ["train-wsi", "--mag", "20", "--fold", "0", "--device", "cpu"],
    "train-mri": ["train-mri", "--fold", "0", "--device", "cpu"],
    "predict": ["predict", *[a for m in MODELS for a in ("--model", m)], "--device", "cpu"],
}


class Reference:
    """A command's uninterrupted run: the store before and after it, its duration, its writes."""

    def __init__(self, before: Path, after: Path, seconds: float, writes: list[str], renames: int):
        self.before, self.after, self.seconds, self.writes, self.renames = before, after, seconds, writes, renames

    def boundaries(self) -> list[int]:
        """The k to kill after the k-th write at: the first few (0: before any) and the last few."""
        n = len(self.writes)
        return sorted(set(range(min(FIRST_WRITES, n + 1))) | set(range(max(0, n - LAST_WRITES + 1), n + 1)))


class Chain:
    """The reference store, taken through the commands in order, and the faulted copies."""

    def __init__(self, root: Path):
        self.root = root
        data = synth_data(root / "data", cases=6, unlabelled=1, seed=3, wsi_size=(2048, 1536), mri_size=(24, 24, 20))
        self.ref = root / "reference"
        run_chain(str(self.ref), data, through="ingest", folds=2)
        self.config = root / "faults.yaml"
        self.config.write_text(yaml.safe_dump(CONFIG))
        self.refs: dict[str, Reference] = {}
        self.zygote = Zygote()

    def argv(self, command: str, store: Path) -> list[str]:
        name, *rest = COMMANDS[command]
        return [name, "--store", str(store), "--config", str(self.config), *rest]

    def run(self, command: str, store: Path, log: Path, **kill) -> tuple[int, float]:
        return self.zygote.run(self.argv(command, store), log, **kill)

    def reference(self, command: str) -> Reference:
        """The uninterrupted run of `command` (run first, after the commands before it)."""
        if command in self.refs:
            return self.refs[command]
        order = list(COMMANDS)
        for earlier in order[: order.index(command)]:
            self.reference(earlier)
        before, after = self.root / f"before-{command}", self.root / f"after-{command}"
        shutil.copytree(self.ref, before)
        log = self.root / f"reference-{command}.log"
        rc, seconds = self.run(command, self.ref, log)
        assert rc == 0, log.read_text()[-3000:]
        assert leftovers(self.ref) == []
        shutil.copytree(self.ref, after)
        text = log.read_text()
        writes = re.findall(r"^@@write \d+ (.*)$", text, flags=re.M)
        renames = int(re.search(r"^@@renames (\d+)$", text, flags=re.M).group(1))
        self.refs[command] = Reference(before, after, seconds, writes, renames)
        return self.refs[command]

    def fresh(self, ref: Reference, name: str) -> Path:
        """A faulted store: a copy of the store before the command."""
        path = self.root / name
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(ref.before, path)
        return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    c = Chain(tmp_path_factory.mktemp("faults"))
    yield c
    c.zygote.close()
    for store in [c.ref, *(p for r in c.refs.values() for p in (r.before, r.after))]:
        shutil.rmtree(store, ignore_errors=True)  # ~200 MB of copies; the logs stay for a look


# ---- what training records --------------------------------------------------------------------


def _history(store: Path, run: str):
    path = store / history_path(run)
    return pq.read_table(path).to_pandas() if path.exists() else None


def _state_epoch(store: Path, run: str) -> int | None:
    """The last epoch of the resumable training state (the epoch a rerun resumes after)."""
    meta = state_meta(Store(store), run)
    return None if meta is None else int(meta["epoch"])


class Settled:
    """History rows of the epochs a saved state covers: a rerun must keep them, timings included."""

    def __init__(self, run: str):
        self.run, self.rows, self.checked = run, {}, 0

    def check(self, store: Path) -> None:
        history, last = _history(store, self.run), _state_epoch(store, self.run)
        # As JSON text: NaN metrics compare equal to themselves.
        got = {} if history is None else {
            int(r["epoch"]): json.dumps(r, sort_keys=True, default=str) for r in history.to_dict("records")}
        for epoch, row in self.rows.items():
            assert epoch in got, f"epoch {epoch} vanished from the history after a rerun"
            assert got[epoch] == row, f"epoch {epoch} was trained again after a kill: {got[epoch]} != {row}"
            self.checked += 1
        for epoch in range(0 if last is None else last + 1):
            self.rows.setdefault(epoch, got[epoch])


RESUMED = re.compile(r"(\S+): resuming after epoch (\d+)/")  # the count of finished epochs
RUNS = {"train-wsi": WSI_RUN, "train-mri": MRI_RUN}


# ---- the tests --------------------------------------------------------------------------------


def finish(chain: Chain, command: str, faulted: Path, ref: Reference, settled: Settled | None, tag: str) -> None:
    """Run `command` to its end on the faulted store and compare it with the reference."""
    run = RUNS.get(command)
    resume_from = _state_epoch(faulted, run) if run else None
    log = chain.root / f"{command}-{tag}-final.log"
    rc, _ = chain.run(command, faulted, log)
    assert rc == 0, log.read_text()[-3000:]
    assert_same_store(faulted, ref.after)
    if run:
        # The snapshots of the resumed run are the uninterrupted run's, byte for byte.
        for snapshot in (ref.after / "models").glob(f"{run}-e*/model.safetensors"):
            assert (faulted / snapshot.relative_to(ref.after)).read_bytes() == snapshot.read_bytes(), snapshot
        settled.check(faulted)
        epochs = WSI_EPOCHS if command == "train-wsi" else MRI_EPOCHS
        found = RESUMED.search(log.read_text())
        if resume_from is not None and resume_from + 1 < epochs:
            assert found, f"the final run did not resume after epoch {resume_from}:\n{log.read_text()[-2000:]}"
            assert found.groups() == (run, str(resume_from + 1))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_at_random_times_then_rerun_gives_the_uninterrupted_store(chain, command):
    ref = chain.reference(command)
    rng = np.random.default_rng([SEED, list(COMMANDS).index(command)])
    faulted = chain.fresh(ref, f"random-{command}")
    run = RUNS.get(command)
    settled = Settled(run) if run else None
    kills, attempts, completed, under_lock, resumed_rows = 0, [], 0, 0, 0
    while kills < KILLS:
        assert len(attempts) < MAX_ATTEMPTS, f"only {kills} of {len(attempts)} attempts were killed: {attempts}"
        t = float(rng.uniform(0.0, ref.seconds))
        log = chain.root / f"{command}-random{len(attempts)}.log"
        rc, _ = chain.run(command, faulted, log, kill_after=t)
        attempts.append((round(t, 2), rc))
        assert rc in (0, -signal.SIGKILL), f"a rerun after a kill failed (exit {rc}):\n{log.read_text()[-3000:]}"
        if settled:
            settled.check(faulted)
        if rc == 0:  # finished before its kill: check it, then start over so that kills hit work
            completed += 1
            assert_same_store(faulted, ref.after)
            faulted = chain.fresh(ref, f"random-{command}")
            resumed_rows += settled.checked if settled else 0
            settled = Settled(run) if run else None
        else:
            kills += 1
            under_lock += (faulted / LOCK_NAME).exists()
    # Most kills must hit the command's work (it holds the writer lock), not its start-up.
    assert under_lock >= KILLS // 2, f"{under_lock} of {kills} kills landed while the lock was held: {attempts}"
    finish(chain, command, faulted, ref, settled, "random")
    if run:
        resumed_rows += settled.checked
        assert resumed_rows > 0, "no kill left a resumable state behind; resuming was not exercised"
    print(f"{command}: D={ref.seconds:.2f}s, {kills} kills ({under_lock} holding the lock), "
          f"{completed} finished early, {resumed_rows} history rows kept through reruns; "
          f"(kill time, exit): {attempts}")
    shutil.rmtree(faulted)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_after_a_store_write_then_rerun_gives_the_uninterrupted_store(chain, command):
    ref = chain.reference(command)
    assert ref.writes, f"{command} made no store write"
    run = RUNS.get(command)
    for k in ref.boundaries():
        faulted = chain.fresh(ref, f"write-{command}")
        settled = Settled(run) if run else None
        log = chain.root / f"{command}-write{k}.log"
        rc, _ = chain.run(command, faulted, log, kill_after_write=k)
        assert rc == -signal.SIGKILL, f"not killed after write {k} of {ref.writes}, exit {rc}"
        assert (faulted / LOCK_NAME).exists()  # killed inside the command: its lock is left behind
        if settled:
            settled.check(faulted)
        finish(chain, command, faulted, ref, settled, f"write{k}")
        shutil.rmtree(faulted)
    print(f"{command}: {len(ref.writes)} writes, killed after write {ref.boundaries()}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_between_writing_a_temporary_and_renaming_it_leaves_no_debris(chain, command):
    """Killed with a finished temporary file not yet renamed into place (a table, a checkpoint, a
    Zarr chunk or zarr.json): the next run clears the dead writer's lock and its temporaries."""
    ref = chain.reference(command)
    assert ref.renames > 0
    rng = np.random.default_rng([SEED, 1, list(COMMANDS).index(command)])
    picks = sorted({int(rng.integers(1, ref.renames + 1)), ref.renames})
    for k in picks:
        faulted = chain.fresh(ref, f"rename-{command}")
        log = chain.root / f"{command}-rename{k}.log"
        rc, _ = chain.run(command, faulted, log, kill_at_rename=k)
        assert rc == -signal.SIGKILL, f"not killed at rename {k} of {ref.renames}, exit {rc}"
        debris = leftovers(faulted)
        assert LOCK_NAME in debris and len(debris) >= 2, debris  # the lock and the temporary
        finish(chain, command, faulted, ref, Settled(RUNS[command]) if command in RUNS else None, f"rename{k}")
        shutil.rmtree(faulted)
    print(f"{command}: {ref.renames} renames of temporaries, killed at {picks}")
