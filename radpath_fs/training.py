"""The training skeleton both stage-two trainers (slides: `mil`, MRI: `mri.train`) run on, and
what else they share: devices and precision, seeds, class weights, snapshots, history.

A training run and the models it makes are apart in the store (`radpath_fs.layout`):
    runs/<run_id>/history.parquet       per-epoch records
    runs/<run_id>/state.safetensors     the resumable state after the last finished epoch: `model/`
                                        and `optim/` tensors; epoch, history, fingerprint and the
                                        optimiser's param groups as JSON in the header
    models/<model_id>/                  a snapshot: model.safetensors + config.json, so that
                                        `ls models` lists what `radpath predict --model` takes
Nothing is ever unpickled. A run is identified by the hash of what makes its result (settings,
seed, case lists, inputs: `fingerprint_hash`); a saved state or a snapshot of another run is
trained again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

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
    state_path,
)
from radpath_fs.progress import info, progress_bar, warn


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


def class_weighted_loss(labels, weighting: str, device):
    """(class weights in CLASSES order, weighted cross-entropy on `device`); `weighting` is a
    trainer's `class_weighting` setting (`inverse_frequency` or `none`)."""
    import torch

    weights = inverse_frequency_weights(labels) if weighting == "inverse_frequency" else np.ones(len(CLASSES))
    return weights, torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


# ---- run and model ids ------------------------------------------------------------------------


def _fold_part(fold: int) -> str:
    return "all" if fold < 0 else f"fold{fold}"


def wsi_run_id(magnification: float, fold: int) -> str:
    return f"wsi-mag{float(magnification):g}-{_fold_part(fold)}"


def mri_run_id(fold: int) -> str:
    return f"mri-{_fold_part(fold)}"


def snapshot_id(run_id: str, epoch: int) -> str:
    """The model id of a run's snapshot after `epoch` (0-based)."""
    return f"{run_id}-e{epoch}"


def fingerprint_hash(what: object) -> str:
    """A stable string for what makes a training run the same run (settings, seed, case lists)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def config_json(obj) -> dict:
    """A pydantic section as plain JSON data (paths and tuples made JSON-safe)."""
    return json.loads(obj.model_dump_json())


# ---- device, precision, the optimiser step ------------------------------------------------------


class Runtime:
    """Device, precision and memory layout, decided once: bf16 autocast and channels-last on CUDA,
    fp32 and the default layout on the CPU (CPU autocast would change the numbers, not the speed
    much). `spatial_dims` picks the channels-last layout: 2 for tiles, 3 for volumes."""

    def __init__(self, device, *, spatial_dims: int, channels_last: bool = True):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        layout = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        self.memory_format = layout if (self.cuda and channels_last) else torch.contiguous_format

    def autocast(self):
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)

    def prepare(self, model):
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, x):
        """A float batch on the device, in the model's layout."""
        x = x.to(self.device, non_blocking=True).float()
        return x.contiguous(memory_format=self.memory_format)

    @property
    def precision(self) -> str:
        return "bf16-autocast" if self.cuda else "fp32"


def train_step(model: Callable, optimizer, loss_fn, x, y, rt: Runtime):
    """One optimisation step of `model` (a network, or any callable x -> logits) on a batch;
    returns (loss, logits) detached and still on the device (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    with rt.autocast():
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


# ---- snapshots ----------------------------------------------------------------------------------

# The key of a snapshot's config.json that names the training run that made it (`fingerprint_hash`).
FINGERPRINT = "training_fingerprint"


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


# ---- the run's records: history and resumable state ---------------------------------------------


def write_history(store, run_id: str, records: list[dict]) -> None:
    """Per-epoch training history (loss, metrics) as `runs/<run_id>/history.parquet`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame.from_records(records), preserve_index=False), buf)
    store.write_bytes(history_path(run_id), buf.getvalue())


def save_state(store, run_id: str, model, optimizer, meta: dict) -> None:
    """runs/<run_id>/state.safetensors: model and optimiser tensors, `meta` as JSON in the header
    (one file, written atomically: a kill leaves the previous epoch's state or this one)."""
    import torch
    from safetensors.torch import save

    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, value in st.items():
            tensors[f"optim/{idx}/{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {**meta, "param_groups": opt["param_groups"]}
    store.write_bytes(state_path(run_id), save(tensors, metadata={"radpath": json.dumps(meta)}))


def load_state(store, run_id: str) -> tuple[dict, dict, dict] | None:
    """(model state_dict, optimiser state_dict, meta), or None when the run has no state."""
    rel = state_path(run_id)
    if not store.exists(rel):
        return None
    data = store.fs.cat_file(store.path(rel))
    tensors = load_safetensors_bytes(data, store.path(rel))
    meta = _state_header(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    model_sd = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("model/")}
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    return model_sd, {"state": state, "param_groups": meta.pop("param_groups")}, meta


def state_meta(store, run_id: str) -> dict | None:
    """The JSON metadata of the run's state (epoch, history, fingerprint), read without its tensors."""
    rel = state_path(run_id)
    if not store.exists(rel):
        return None
    with store.fs.open(store.path(rel), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return _state_header(f.read(n))


def _state_header(header: bytes) -> dict:
    return json.loads(json.loads(header).get("__metadata__", {}).get("radpath", "{}"))


def restore_optimizer(optimizer, optim_sd: dict) -> None:
    """optimizer.load_state_dict, then each state tensor shaped like its parameter takes the
    parameter's memory layout: the state file holds them contiguous, and against channels-last
    parameters fused Adam raises on CUDA and silently computes a different step on the CPU."""
    import torch

    optimizer.load_state_dict(optim_sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def epoch_lr(lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of `epoch` (0-based): a function of the epoch alone, so a resumed run
    trains each epoch at the rate an uninterrupted one would."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr


# ---- the skeleton -------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """A training run as the store knows it: its id, its length, the snapshots it writes, and the
    fingerprint of what makes it this run. `expect`: config.json entries every snapshot must have
    (one without them is trained again). Cheap: nothing is loaded to build one."""

    store: object
    run_id: str
    epochs: int
    snapshot_epochs: Sequence[int]
    fingerprint: str
    lr: float  # the schedule's starting rate; `fit` sets the optimiser's rate every epoch
    lr_schedule: str
    expect: dict = field(default_factory=dict)

    @property
    def model_ids(self) -> list[str]:
        return [snapshot_id(self.run_id, e) for e in self.snapshot_epochs]

    def status(self) -> tuple[dict[str, str], bool]:
        """(snapshot id -> why it must be trained, whether the saved state, if any, is of this run and finished).

        The snapshots are written before the epoch's history and state: a run killed in between
        has all of them but must still finish that epoch's records. No state: the snapshots decide.
        """
        meta = state_meta(self.store, self.run_id)
        finished = meta is None or (meta.get("fingerprint") == self.fingerprint and int(meta["epoch"]) + 1 >= self.epochs)
        return stale_snapshots(self.store, self.model_ids, self.fingerprint, self.expect), finished

    def is_current(self) -> bool:
        stale, finished = self.status()
        return finished and not stale

    def nothing_to_train(self) -> bool:
        """Whether the snapshots and saved state are current, said either way: "up to date", or
        which existing snapshots are about to be replaced and why (missing ones are just trained)."""
        stale, finished = self.status()
        if finished and not stale:
            info(f"{self.run_id}: snapshots {', '.join(self.model_ids)} are up to date; nothing to train "
                 "(--no-resume retrains)")
            return True
        by_reason: dict[str, list[str]] = {}
        for model_id, why in sorted(stale.items()):
            if why != "missing":
                by_reason.setdefault(why, []).append(model_id)
        for why, ids in by_reason.items():
            warn(f"{', '.join(ids)}: {why}; retraining (their prediction tables are redone)")
        return False

    def resume(self, model, optimizer) -> tuple[int, list[dict]]:
        """(first epoch to train, history so far): after the saved state of an unfinished run of
        this fingerprint, its weights and optimiser restored; (0, []) for any other state."""
        state = load_state(self.store, self.run_id)
        if state is None:
            return 0, []
        model_sd, optim_sd, meta = state
        where = self.store.path(state_path(self.run_id))
        if meta.get("fingerprint") != self.fingerprint:
            warn(f"{where}: an earlier run with other settings or cases; starting over")
            return 0, []
        start = int(meta["epoch"]) + 1
        if start >= self.epochs:
            warn(f"{where}: a finished run whose snapshots are missing or replaced; starting over")
            return 0, []
        model.load_state_dict(model_sd)
        restore_optimizer(optimizer, optim_sd)
        info(f"{self.run_id}: resuming after epoch {start}/{self.epochs}")
        return start, list(meta["history"])

    def fit(self, model, optimizer, train_epoch: Callable[[int], dict], snapshot_config: Callable[[int], dict],
            resume: bool = True) -> list[dict]:
        """Train to the end (after the saved state, with `resume`); returns the history.

        `train_epoch(epoch)` trains one epoch and returns its history record; `snapshot_config(epoch)`
        is the config.json of the snapshot after `epoch`. After every epoch: its snapshot, the
        history, then the resumable state, which is what a rerun resumes after.
        """
        start, history = self.resume(model, optimizer) if resume else (0, [])
        snapshots = set(self.snapshot_epochs)
        with progress_bar(f"train {self.run_id}", total=self.epochs) as advance:
            advance(start)
            for epoch in range(start, self.epochs):
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr(self.lr, epoch, self.epochs, self.lr_schedule)
                history.append(train_epoch(epoch))
                if epoch in snapshots:
                    save_checkpoint(self.store, snapshot_id(self.run_id, epoch), model.state_dict(),
                                    snapshot_config(epoch), self.fingerprint)
                write_history(self.store, self.run_id, history)
                save_state(self.store, self.run_id, model, optimizer,
                           {"epoch": epoch, "history": history, "fingerprint": self.fingerprint})
                advance()
        # Snapshots written before a crash are not rewritten by the resumed run: they must be current.
        stale = stale_snapshots(self.store, self.model_ids, self.fingerprint, self.expect)
        if stale:
            mid, why = min(stale.items())
            raise RadpathError(f"{self.store.path(model_dir(mid))}: snapshot {why} after training")
        return history
