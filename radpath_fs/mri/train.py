"""`radpath train-mri`: the 3D DenseNet (MONAI) on the cached four-modality volumes, for one fold.

Weighted cross-entropy, Adam, `mri.epochs` epochs of `mri.batch_size` volumes; snapshots at
`mri.snapshot_epochs()` become models `mri-fold{K}-e{E}` (safetensors + config.json). After every
epoch a resumable training state (model + optimizer tensors, epoch and history as JSON in the
safetensors header) is written to `runs/<run_id>/resume/state.safetensors`; nothing is pickled.
On CUDA: bf16 autocast and channels_last_3d. On the CPU: fp32, deterministic with a seed.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from radpath_fs import CLASSES
from radpath_fs.config import MRITrainConfig, PipelineConfig
from radpath_fs.errors import ConfigError, RadpathError
from radpath_fs.layout import mri_state_path
from radpath_fs.mri.data import (
    KEEP_BYTES,
    CachedVolumes,
    EpochBatches,
    augment_transforms,
    default_workers,
    device_batches,
    make_loader,
    volume_bytes,
)
from radpath_fs.mri.preprocess import PREPROCESS_VERSION, is_cached, preprocess_cases
from radpath_fs.progress import info, progress_bar, warn
from radpath_fs.store import Store
from radpath_fs.training import (
    config_json,
    fingerprint_hash,
    inverse_frequency_weights,
    load_safetensors_bytes,
    mri_model_id,
    nothing_to_train,
    resolve_device,
    save_checkpoint,
    seed_everything,
    stale_snapshots,
    write_history,
)

# Network names of the config -> MONAI classes (monai.networks.nets).
NETWORKS = {
    "densenet121": "DenseNet121",
    "densenet169": "DenseNet169",
    "densenet201": "DenseNet201",
    "densenet264": "DenseNet264",
}


def build_network(mcfg: MRITrainConfig) -> torch.nn.Module:
    """MONAI DenseNet (3D) with one input channel per modality and one output per class."""
    import monai.networks.nets as nets

    kwargs = {k: getattr(mcfg, k) for k in ("init_features", "growth_rate", "block_config") if getattr(mcfg, k)}
    norm = ("group", {"num_groups": mcfg.norm_groups}) if mcfg.norm == "group" else "batch"
    cls = getattr(nets, NETWORKS[mcfg.network])
    try:
        return cls(spatial_dims=3, in_channels=len(mcfg.modalities), out_channels=len(CLASSES), norm=norm,
                   dropout_prob=mcfg.dropout, **kwargs)
    except ValueError as e:  # GroupNorm: a layer's channels not divisible by the groups
        raise ConfigError(f"mri.norm_groups {mcfg.norm_groups}: {e}") from None


def last_block_size(mcfg: MRITrainConfig) -> tuple[int, ...]:
    """The feature map of the last dense block: the stem halves the input twice (strided convolution,
    max pooling) and each transition between blocks once more."""
    blocks = len(mcfg.block_config or _default_blocks(mcfg.network))
    return tuple(max(1, s >> (blocks + 1)) for s in mcfg.spatial_size)


def _default_blocks(network: str) -> tuple[int, ...]:
    import inspect

    import monai.networks.nets as nets

    return tuple(inspect.signature(getattr(nets, NETWORKS[network])).parameters["block_config"].default)


def check_network(mcfg: MRITrainConfig) -> None:
    """Build the network without memory (torch's meta device): a bad setting fails before any work.
    A last block on single voxels is allowed but said: it has no spatial extent left to pool, and
    batch norm there estimates each channel from `batch_size` numbers."""
    with torch.device("meta"):
        build_network(mcfg)
    last = last_block_size(mcfg)
    if min(last) < 2:
        warn(f"mri: the last dense block works on a {'x'.join(map(str, last))} map at spatial_size "
             f"{list(mcfg.spatial_size)}; use fewer blocks (mri.block_config) or a larger spatial_size")


def run_id(fold: int) -> str:
    """runs/<run_id>/ holds a fold's history and training state (`mri-fold0`, `mri-all`)."""
    return mri_model_id(fold, 0).removesuffix("-e0")


def label_indices(labels: Sequence[str]) -> np.ndarray:
    return np.array([CLASSES.index(str(lab)) for lab in labels], dtype=np.int64)


def classification_metrics(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    from radpath_fs.fusion.metrics import balanced_accuracy, cohen_kappa, f1_micro

    pred = logits.argmax(1)
    return {"balanced_accuracy": balanced_accuracy(y, pred), "kappa": cohen_kappa(y, pred),
            "f1_micro": f1_micro(y, pred)}


# ---- device placement ----------------------------------------------------------------------------
class Runtime:
    """Device, precision and memory layout, decided once: bf16 autocast + channels_last_3d on CUDA."""

    def __init__(self, device: torch.device, channels_last: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.memory_format = torch.channels_last_3d if (self.cuda and channels_last) else torch.contiguous_format

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        return x.contiguous(memory_format=self.memory_format)

    @property
    def precision(self) -> str:
        return "bf16-autocast" if self.cuda else "fp32"


def train_step(model, optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor, rt: Runtime):
    """One optimisation step; returns (loss, logits) detached and still on the device (no sync)."""
    optimizer.zero_grad(set_to_none=True)
    with rt.autocast():
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def predict_logits(model, loader, rt: Runtime) -> np.ndarray:
    """Logits (N, 3) float32 of every volume of an unaugmented loader, in order."""
    model.eval()
    out = []
    for x, _, _ in loader:
        with rt.autocast():
            out.append(model(rt.inputs(x)).float())
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(CLASSES)), np.float32)


def make_optimizer(model: torch.nn.Module, mcfg: MRITrainConfig, rt: Runtime) -> torch.optim.Optimizer:
    # Fused Adam on CUDA: one kernel for the whole update instead of one per parameter tensor.
    return torch.optim.Adam(model.parameters(), lr=mcfg.lr, fused=rt.cuda or None)


# ---- resumable training state --------------------------------------------------------------------
def save_state(store: Store, rid: str, model, optimizer, meta: dict) -> None:
    """runs/<rid>/resume/state.safetensors: model and optimizer tensors, `meta` as JSON in the header."""
    from safetensors.torch import save

    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, value in st.items():
            tensors[f"optim/{idx}/{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {**meta, "param_groups": opt["param_groups"]}
    store.write_bytes(mri_state_path(rid), save(tensors, metadata={"radpath": json.dumps(meta)}))


def restore_optimizer(optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """optimizer.load_state_dict, then each state tensor shaped like its parameter takes the
    parameter's memory layout: the state file holds them contiguous, and against channels_last_3d
    parameters fused Adam raises on CUDA and silently computes a different step on the CPU."""
    optimizer.load_state_dict(optim_sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_state(store: Store, rid: str) -> tuple[dict, dict, dict] | None:
    """(model state_dict, optimizer state_dict, meta) or None when there is no state."""
    rel = mri_state_path(rid)
    if not store.exists(rel):
        return None
    data = store.fs.cat_file(store.path(rel))
    tensors = load_safetensors_bytes(data, store.path(rel))
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8 : 8 + n]).get("__metadata__", {}).get("radpath", "{}"))
    model_sd = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("model/")}
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    optim_sd = {"state": state, "param_groups": meta.pop("param_groups")}
    return model_sd, optim_sd, meta


def state_meta(store: Store, rid: str) -> dict | None:
    """The JSON metadata of the training state (epoch, history, ...), read without its tensors."""
    rel = mri_state_path(rid)
    if not store.exists(rel):
        return None
    with store.fs.open(store.path(rel), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return json.loads(header.get("__metadata__", {}).get("radpath", "{}"))


def _fingerprint(cfg: PipelineConfig, fold: int, train: pd.DataFrame, val: pd.DataFrame) -> str:
    """What must match for a saved state to be resumed and for snapshots to be kept (loader
    settings change no result). Config and case lists only: cheap to compute."""
    mri = {k: v for k, v in config_json(cfg.mri).items() if k not in ("num_workers", "eval_batch_size", "folds")}
    return fingerprint_hash(
        {"mri": mri, "seed": cfg.seed, "fold": fold, "train": _ids(train), "val": _ids(val),
         "preprocess_version": PREPROCESS_VERSION}
    )


def _ids(part: pd.DataFrame) -> list[str]:
    return [str(c) for c in part["case_id"]]


def _training_status(store: Store, cfg: PipelineConfig, fold: int, fingerprint: str) -> tuple[dict[str, str], bool]:
    """(snapshot id -> why it must be trained, whether the saved state, if any, is of this run and finished).

    The snapshots are written before the epoch's history and state: a run killed in between has
    all of them but must still finish that epoch's records. No state (none kept): the snapshots decide.
    """
    meta = state_meta(store, run_id(fold))
    finished = meta is None or (
        meta.get("fingerprint") == fingerprint and int(meta.get("epoch", -1)) + 1 >= cfg.mri.epochs
    )
    ids = [mri_model_id(fold, e) for e in cfg.mri.snapshot_epochs()]
    # A model of older preprocessing (before RAS reorientation) cannot read today's cache.
    return stale_snapshots(store, ids, fingerprint, {"preprocess_version": PREPROCESS_VERSION}), finished


def _usable(store: Store, mcfg: MRITrainConfig, parts, skip_errors: bool):
    """With `skip_errors` the cases left uncached (warned about, listed in mri_errors) are left out."""
    if not skip_errors:
        return parts
    return tuple(part[[is_cached(store, str(c), mcfg) for c in part["case_id"]]].reset_index(drop=True)
                 for part in parts)


def mri_is_current(store_url: str | Store, cfg: PipelineConfig, *, fold: int, skip_errors: bool = False) -> bool:
    """Whether `train_mri` would find nothing to train: snapshots and state of this config and
    case list. Reads the cases table and small metadata only (no volume, no preprocessing).

    A case with MRI not yet cached is not decided here: `train_mri` preprocesses first (with
    `skip_errors`, a case that failed before and was mended since joins the training cases).
    """
    store = store_url if isinstance(store_url, Store) else Store(store_url)
    train, val = fold_cases(store.cases(), fold)
    if not all(is_cached(store, str(c), cfg.mri) for part in (train, val) for c in part["case_id"]):
        return False
    stale, finished = _training_status(store, cfg, fold, _fingerprint(cfg, fold, train, val))
    return finished and not stale


# ---- the command ---------------------------------------------------------------------------------
def fold_cases(cases: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) labelled cases with MRI for `fold`; fold -1 trains on all, holds none out."""
    labelled = cases[cases["has_mri"].astype(bool) & cases["label"].notna()]
    if fold < 0:
        return labelled.reset_index(drop=True), labelled.iloc[:0]
    folds = sorted(int(f) for f in labelled["fold"].unique())
    if fold not in folds:
        raise RadpathError(f"--fold {fold}: no labelled case with MRI is in fold {fold} (folds: {folds}, or -1 for all)")
    held = labelled["fold"].astype(int) == fold
    return labelled[~held].reset_index(drop=True), labelled[held].reset_index(drop=True)


def train_mri(
    store_url: str | Store,
    cfg: PipelineConfig,
    *,
    fold: int,
    device: str = "auto",
    scheduler: str = "sync",
    resume: bool = True,
    skip_errors: bool = False,
) -> list[str]:
    """Preprocess the MRI (cached), train one fold, write its snapshots; returns their model ids.

    `skip_errors`: cases whose MRI cannot be preprocessed are listed in tables/mri_errors.parquet
    and left out of training and held-out evaluation, instead of stopping the command."""
    store = store_url if isinstance(store_url, Store) else Store(store_url)
    mcfg = cfg.mri
    rid = run_id(fold)
    snapshot_ids = {e: mri_model_id(fold, e) for e in mcfg.snapshot_epochs()}
    check_network(mcfg)
    with store.lock("train-mri"):
        cases = store.cases()
        train, val = fold_cases(cases, fold)
        # Every case with MRI, labelled or not: `predict` reads the same cache.
        preprocess_cases(store, mcfg, cases[cases["has_mri"].astype(bool)], scheduler=scheduler, skip_errors=skip_errors)
        train, val = _usable(store, mcfg, (train, val), skip_errors)
        if len(train) < 2:
            raise RadpathError(f"fold {fold}: {len(train)} labelled case(s) with MRI to train on; at least 2 are needed")
        fingerprint = _fingerprint(cfg, fold, train, val)
        if resume and nothing_to_train(rid, list(snapshot_ids.values()), *_training_status(store, cfg, fold, fingerprint)):
            return list(snapshot_ids.values())
        return _train(store, cfg, fold, train, val, resolve_device(device), resume, snapshot_ids, fingerprint)


def _train(store, cfg, fold, train, val, device, resume, snapshot_ids, fingerprint) -> list[str]:
    from monai.data import get_track_meta, set_track_meta

    mcfg = cfg.mri
    rid = run_id(fold)
    rt = Runtime(device, mcfg.channels_last)
    train_ids, val_ids = _ids(train), _ids(val)
    y_train, y_val = label_indices(train["label"]), label_indices(val["label"])
    seed = cfg.seed * 1000 + fold + 1
    seed_everything(seed)  # weight init
    model = rt.prepare(build_network(mcfg))
    optimizer = make_optimizer(model, mcfg, rt)
    weights = (
        inverse_frequency_weights(train["label"].to_numpy())
        if mcfg.class_weighting == "inverse_frequency"
        else np.ones(len(CLASSES))
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))

    start, history = 0, []
    state = load_state(store, rid) if resume else None
    if state is not None:
        model_sd, optim_sd, meta = state
        if meta.get("fingerprint") != fingerprint:
            warn(f"{store.path(mri_state_path(rid))} was made with another config or case list; starting over")
        elif int(meta["epoch"]) + 1 >= mcfg.epochs:
            warn(f"{store.path(mri_state_path(rid))} is of a finished run whose snapshots are missing or replaced; "
                 "starting over")
        else:
            model.load_state_dict(model_sd)
            restore_optimizer(optimizer, optim_sd)
            start, history = int(meta["epoch"]) + 1, list(meta["history"])
            info(f"{rid}: resuming after epoch {start - 1}")

    aug_on = mcfg.augment_on if mcfg.augment_on != "auto" else ("device" if rt.cuda else "loader")
    workers = default_workers(mcfg, device)
    sampler = EpochBatches(len(train_ids), mcfg.batch_size, cfg.seed, fold)
    item = volume_bytes(mcfg)
    # In-process reading only: loader workers would each keep their own copy.
    keep = workers == 0 and item * (len(train_ids) + len(val_ids)) <= KEEP_BYTES
    train_ds = CachedVolumes(store.url, train_ids, y_train, augment=mcfg if aug_on == "loader" else None, keep=keep)
    train_loader = make_loader(train_ds, batch_sampler=sampler, num_workers=workers, pin_memory=rt.cuda, item_bytes=item)
    val_loader = (
        make_loader(CachedVolumes(store.url, val_ids, y_val, keep=keep), batch_size=mcfg.eval_batch_size,
                    num_workers=min(workers, 4), pin_memory=rt.cuda, item_bytes=item)
        if val_ids else None
    )
    device_aug = augment_transforms(mcfg, device) if aug_on == "device" else None
    config = {
        "modality": "mri",
        "magnification": None,
        "fold": fold,
        "epochs": mcfg.epochs,
        "mri": config_json(mcfg),
        "seed": cfg.seed,
        "classes": list(CLASSES),
        "class_weights": [float(w) for w in weights],
        "train_cases": train_ids,
        "heldout_cases": val_ids,
        "run_id": rid,
        "preprocess_version": PREPROCESS_VERSION,
        "precision": rt.precision,
        "augment_on": aug_on,
    }
    track_meta = get_track_meta()
    set_track_meta(False)  # plain tensors through the random transforms: no metadata bookkeeping
    bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = rt.cuda  # fixed input size: let cuDNN pick its 3D kernels once
    try:
        with progress_bar(f"train {rid}", total=mcfg.epochs) as advance:
            advance(start)
            for epoch in range(start, mcfg.epochs):
                record = _epoch(model, optimizer, loss_fn, train_loader, sampler, device_aug, val_loader, y_val,
                                rt, epoch)
                history.append(record)
                if epoch in snapshot_ids:
                    save_checkpoint(store, snapshot_ids[epoch], model.state_dict(), {**config, "snapshot": epoch},
                                    fingerprint)
                write_history(store, rid, history)
                save_state(store, rid, model, optimizer,
                           {"epoch": epoch, "history": history, "fingerprint": fingerprint})
                advance()
    finally:
        set_track_meta(track_meta)
        torch.backends.cudnn.benchmark = bench
    last = history[-1] if history else {}
    info(
        f"{rid}: {mcfg.network} on {len(train_ids)} cases ({len(val_ids)} held out), batch {mcfg.batch_size}, "
        f"{rt.precision} on {device}, augmentation on the {aug_on}, {workers} loader workers; "
        f"last epoch loss {last.get('train_loss', float('nan')):.4f}"
        + (f", held-out bal. acc {last['val_balanced_accuracy']:.3f}" if "val_balanced_accuracy" in last else "")
    )
    return list(snapshot_ids.values())


def _epoch(model, optimizer, loss_fn, loader, sampler, device_aug, val_loader, y_val, rt: Runtime, epoch: int) -> dict:
    sampler.set_epoch(epoch)
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=rt.device)
    logits_all, y_all, n = [], [], 0
    for x, y in device_batches(loader, device_aug, rt):
        loss, logits = train_step(model, optimizer, loss_fn, x, y, rt)
        loss_sum += loss * len(y)
        logits_all.append(logits.float())
        y_all.append(y)
        n += len(y)
    # The only host sync of the epoch: losses and logits stay on the device until here.
    train_loss = float(loss_sum) / max(n, 1)
    train_seconds = time.perf_counter() - t0
    record = {
        "epoch": epoch,
        "train_loss": train_loss,
        **{f"train_{k}": v for k, v in classification_metrics(
            torch.cat(y_all).cpu().numpy(), torch.cat(logits_all).cpu().numpy()).items()},
        "train_volumes": n,
        "train_seconds": train_seconds,
        "train_volumes_per_s": n / train_seconds if train_seconds > 0 else float("nan"),
    }
    if val_loader is not None:
        logits = predict_logits(model, val_loader, rt)
        with torch.no_grad():
            val_loss = loss_fn(torch.from_numpy(logits).to(rt.device), torch.from_numpy(y_val).to(rt.device))
        record["val_loss"] = float(val_loss)
        record.update({f"val_{k}": v for k, v in classification_metrics(y_val, logits).items()})
    record["epoch_seconds"] = time.perf_counter() - t0
    return record
