"""What the slide and the MRI trainers share: devices, seeds, class weights, checkpoints, history.

Snapshots are `models/<model_id>/model.safetensors` + `config.json`, a run's history is
`runs/<run_id>/history.parquet` (`radpath_fs.layout`): nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator

import numpy as np
import pandas as pd

from radpath_fs import CLASSES
from radpath_fs.errors import InputError, RadpathError
from radpath_fs.layout import (
    PREDICTIONS,
    history_path,
    model_config_path,
    model_dir,
    model_weights_path,
    parse_prediction_table_name,
)
from radpath_fs.progress import info, warn


def resolve_device(spec: str = "auto"):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RadpathError(f"--device {spec}: CUDA is not available on this machine")
    if spec not in ("cpu",) and not spec.startswith("cuda"):
        raise RadpathError(f"--device {spec!r}: expected cpu, cuda or auto")
    return torch.device(spec)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch CPU threads (None: leave the setting alone), restored afterwards."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SHM = "/dev/shm"


def shm_free_bytes() -> int | None:
    """Free bytes where DataLoader workers put their batches (None where there is no /dev/shm)."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fit_loader(workers: int, prefetch: int, batch_bytes: int, what: str) -> tuple[int, int]:
    """(workers, prefetch) for a DataLoader whose batches in flight fit in shared memory.

    Each worker keeps up to `prefetch` finished batches in /dev/shm and builds one more. A
    container's /dev/shm is often small (Docker's default is 64 MiB) and running out kills the
    workers with a bus error, so fewer batches in flight, then fewer workers, then none (reading
    in the calling process) are tried in that order, with a warning that says what was chosen.
    """
    free = shm_free_bytes()
    if workers == 0 or free is None:
        return workers, prefetch

    def need(w: int, p: int) -> int:
        return int(1.25 * w * (p + 1) * batch_bytes)  # a quarter spare for other users of /dev/shm

    if need(workers, prefetch) <= free:
        return workers, prefetch
    p = prefetch
    while p > 1 and need(workers, p) > free:
        p -= 1
    w = workers
    while w > 0 and need(w, p) > free:
        w -= 1
    chosen = f"{w} workers with prefetch {p}" if w else "reading in this process"
    warn(
        f"{SHM} has {free / 2**20:,.0f} MiB free; {what} wanted {need(workers, prefetch) / 2**20:,.0f} MiB "
        f"({workers} workers x {prefetch + 1} batches of {batch_bytes / 2**20:,.1f} MiB): {chosen}. "
        "Give the machine more shared memory (e.g. docker run --shm-size=16g)"
    )
    return w, (p if w else prefetch)


def seed_everything(seed: int) -> None:
    import torch

    seed = int(seed)  # numpy integers (a fold read from Parquet) are not accepted by `random`
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def inverse_frequency_weights(labels: list[str] | np.ndarray) -> np.ndarray:
    """Cross-entropy class weights n / (k * n_c), in CLASSES order; absent classes get weight 0."""
    labels = np.asarray(labels)
    counts = np.array([(labels == c).sum() for c in CLASSES], dtype=np.float64)
    present = counts > 0
    w = np.zeros(len(CLASSES))
    w[present] = len(labels) / (present.sum() * counts[present])
    return w


def wsi_model_id(magnification: float, fold: int, epoch: int) -> str:
    fold_part = "all" if fold < 0 else f"fold{fold}"
    return f"wsi-mag{float(magnification):g}-{fold_part}-e{epoch}"


def mri_model_id(fold: int, epoch: int) -> str:
    fold_part = "all" if fold < 0 else f"fold{fold}"
    return f"mri-{fold_part}-e{epoch}"


# The key of a snapshot's config.json that names the training run that made it (`fingerprint_hash`).
FINGERPRINT = "training_fingerprint"


def fingerprint_hash(what: object) -> str:
    """A stable string for what makes a training run the same run (settings, seed, case lists)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(store, model_id: str, state_dict: dict, config: dict, fingerprint: str) -> None:
    """Write `models/<model_id>/` (weights then config; config.json last marks it complete).

    A snapshot being rewritten stops being complete first (its config.json goes), then loses its
    prediction tables: they came from the weights it replaces, and `pending_predictions`, which
    goes by their existence, must see them as missing. A run killed anywhere in between leaves an
    incomplete snapshot, which the rerun trains and writes again.
    """
    from safetensors.torch import save

    _remove(store, model_config_path(model_id))
    for name in store.list_tables(PREDICTIONS):
        if parse_prediction_table_name(name)[0] == model_id:
            _remove(store, store.table_rel(name))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    store.write_bytes(model_weights_path(model_id), save(tensors))
    store.write_json(model_config_path(model_id), {"model_id": model_id, **config, FINGERPRINT: fingerprint})


def _remove(store, rel: str) -> None:
    store.check_no_links(rel)  # as for writes: no deletion through a link planted in the store
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(store.path(rel))


def stale_snapshots(store, model_ids: list[str], fingerprint: str, expect: dict | None = None) -> dict[str, str]:
    """Model id -> why it must be trained (again), for the snapshots that are not of the run
    `fingerprint` identifies, or whose config.json differs from `expect`; reads only config.json.
    """
    stale = {}
    for model_id in model_ids:
        rel = model_config_path(model_id)
        if not store.exists(rel):
            stale[model_id] = "missing"
            continue
        config = store.read_json(rel)
        wrong = [f"made with {k} {config.get(k)!r}, now {v!r}" for k, v in (expect or {}).items() if config.get(k) != v]
        if wrong:
            stale[model_id] = wrong[0]
        elif config.get(FINGERPRINT) != fingerprint:
            stale[model_id] = "trained with another config or case list"
    return stale


def nothing_to_train(run_id: str, model_ids: list[str], stale: dict[str, str], finished: bool) -> bool:
    """Whether a run's snapshots and saved state are current, said either way: "up to date", or
    which existing snapshots it is about to replace and why (missing ones are just trained)."""
    if finished and not stale:
        info(f"{run_id}: snapshots {', '.join(model_ids)} are up to date; nothing to train (--no-resume retrains)")
        return True
    by_reason: dict[str, list[str]] = {}
    for model_id, why in sorted(stale.items()):
        if why != "missing":
            by_reason.setdefault(why, []).append(model_id)
    for why, ids in by_reason.items():
        warn(f"{', '.join(ids)}: {why}; retraining (their prediction tables are redone)")
    return False


def load_checkpoint(store, model_id: str) -> tuple[dict, dict]:
    """Return (state_dict, config). Only safetensors is read; a pickle is refused."""
    if not store.exists(model_config_path(model_id)):
        raise RadpathError(f"{store.path(model_dir(model_id))}: no such model (is the id right? see `radpath query`)")
    config = store.read_json(model_config_path(model_id))
    weights = store.path(model_weights_path(model_id))
    return load_safetensors_bytes(store.fs.cat_file(weights), weights), config


def load_safetensors_bytes(data: bytes, source: str) -> dict:
    from safetensors.torch import load

    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        raise InputError(source, "is a pickle/torch.save file; radpath loads safetensors only")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types
        raise InputError(source, f"not a valid safetensors file ({e})") from None


def write_history(store, run_id: str, records: list[dict]) -> None:
    """Per-epoch training history (loss, metrics) as `runs/<run_id>/history.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame.from_records(records), preserve_index=False), buf)
    store.write_bytes(history_path(run_id), buf.getvalue())


def config_json(obj) -> dict:
    """A pydantic section as plain JSON data (paths and tuples made JSON-safe)."""
    return json.loads(obj.model_dump_json())
