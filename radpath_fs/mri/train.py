"""`radpath train-mri`: the 3D DenseNet (MONAI) on the cached four-modality volumes, for one fold.

Weighted cross-entropy, Adam, `mri.epochs` epochs of `mri.batch_size` volumes; snapshots at
`mri.snapshot_epochs()` become models `mri-fold{K}-e{E}`. The run (snapshots, history, resumable
state after every epoch) goes through `radpath_fs.training.TrainingRun`. On CUDA: bf16 autocast
(and channels_last_3d with `mri.channels_last`). On the CPU: fp32, deterministic with a seed.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from radpath_fs import CLASSES
from radpath_fs.config import MRITrainConfig, PipelineConfig
from radpath_fs.errors import ConfigError, RadpathError
from radpath_fs.folds import fold_cases
from radpath_fs.metrics import confusion_matrix, encode_labels, metrics_from_confusion
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
from radpath_fs.progress import info, warn
from radpath_fs.store import Store
from radpath_fs.training import (
    Runtime,
    TrainingRun,
    class_weighted_loss,
    config_json,
    fingerprint_hash,
    mri_run_id,
    resolve_device,
    seed_everything,
    train_step,
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


def classification_metrics(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, kappa and micro F1 of the logits' classes."""
    values = metrics_from_confusion(confusion_matrix(y, logits.argmax(1)), ("balanced_accuracy", "kappa", "f1_micro"))
    return {k: float(v) for k, v in values.items()}


def mri_runtime(device: torch.device | str, mcfg: MRITrainConfig) -> Runtime:
    return Runtime(device, spatial_dims=3, channels_last=mcfg.channels_last)


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


# ---- the run ---------------------------------------------------------------------------------------
def _ids(part: pd.DataFrame) -> list[str]:
    return [str(c) for c in part["case_id"]]


def training_run(store: Store, cfg: PipelineConfig, fold: int, train: pd.DataFrame, val: pd.DataFrame) -> TrainingRun:
    """The run of `fold` on these cases. Its fingerprint is what must match for a saved state to be
    resumed and for snapshots to be kept (loader settings change no result): config, case lists
    and labels only, cheap to compute. A model of other preprocessing cannot read today's cache."""
    mri = {k: v for k, v in config_json(cfg.mri).items() if k not in ("num_workers", "eval_batch_size", "folds")}
    fingerprint = fingerprint_hash({"mri": mri, "seed": cfg.seed, "fold": fold, "train": _ids(train), "val": _ids(val),
                                    "labels": [*train["label"], *val["label"]], "preprocess_version": PREPROCESS_VERSION})
    return TrainingRun(store, mri_run_id(fold), cfg.mri.epochs, cfg.mri.snapshot_epochs(), fingerprint,
                       expect={"preprocess_version": PREPROCESS_VERSION}, lr=cfg.mri.lr,
                       lr_schedule=cfg.mri.lr_schedule)


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
    train, val = fold_cases(store.cases(), fold, "mri")
    if not all(is_cached(store, str(c), cfg.mri) for part in (train, val) for c in part["case_id"]):
        return False
    return training_run(store, cfg, fold, train, val).is_current()


# ---- the command ---------------------------------------------------------------------------------
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
    check_network(mcfg)
    with store.lock("train-mri"):
        cases = store.cases()
        train, val = fold_cases(cases, fold, "mri")
        # Every case with MRI, labelled or not: `predict` reads the same cache.
        preprocess_cases(store, mcfg, cases[cases["has_mri"].astype(bool)], scheduler=scheduler, skip_errors=skip_errors)
        train, val = _usable(store, mcfg, (train, val), skip_errors)
        if len(train) < 2:
            raise RadpathError(f"fold {fold}: {len(train)} labelled case(s) with MRI to train on; at least 2 are needed")
        run = training_run(store, cfg, fold, train, val)
        if not (resume and run.nothing_to_train()):
            _train(run, cfg, fold, train, val, resolve_device(device), resume)
        return run.model_ids


def _train(run: TrainingRun, cfg: PipelineConfig, fold: int, train: pd.DataFrame, val: pd.DataFrame,
           device: torch.device, resume: bool) -> None:
    from monai.data import get_track_meta, set_track_meta

    mcfg = cfg.mri
    rt = mri_runtime(device, mcfg)
    train_ids, val_ids = _ids(train), _ids(val)
    y_train, y_val = encode_labels(train["label"]), encode_labels(val["label"])
    seed_everything(cfg.seed * 1000 + fold + 1)  # weight init
    model = rt.prepare(build_network(mcfg))
    optimizer = make_optimizer(model, mcfg, rt)
    weights, loss_fn = class_weighted_loss(train["label"].to_numpy(), mcfg.class_weighting, device)

    aug_on = mcfg.augment_on if mcfg.augment_on != "auto" else ("device" if rt.cuda else "loader")
    workers = default_workers(mcfg, device)
    sampler = EpochBatches(len(train_ids), mcfg.batch_size, cfg.seed, fold)
    item = volume_bytes(mcfg)
    # In-process reading only: loader workers would each keep their own copy.
    keep = workers == 0 and item * (len(train_ids) + len(val_ids)) <= KEEP_BYTES
    url = run.store.url
    train_ds = CachedVolumes(url, train_ids, y_train, augment=mcfg if aug_on == "loader" else None, keep=keep)
    train_loader = make_loader(train_ds, batch_sampler=sampler, num_workers=workers, pin_memory=rt.cuda, item_bytes=item)
    val_loader = (
        make_loader(CachedVolumes(url, val_ids, y_val, keep=keep), batch_size=mcfg.eval_batch_size,
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
        "run_id": run.run_id,
        "preprocess_version": PREPROCESS_VERSION,
        "precision": rt.precision,
        "augment_on": aug_on,
    }

    def epoch_record(epoch: int) -> dict:
        return _epoch(model, optimizer, loss_fn, train_loader, sampler, device_aug, val_loader, y_val, rt, epoch)

    track_meta = get_track_meta()
    set_track_meta(False)  # plain tensors through the random transforms: no metadata bookkeeping
    bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = rt.cuda  # fixed input size: let cuDNN pick its 3D kernels once
    try:
        last = run.fit(model, optimizer, epoch_record, lambda epoch: {**config, "snapshot": epoch}, resume)[-1]
    finally:
        set_track_meta(track_meta)
        torch.backends.cudnn.benchmark = bench
    info(
        f"{run.run_id}: {mcfg.network} on {len(train_ids)} cases ({len(val_ids)} held out), batch {mcfg.batch_size}, "
        f"{rt.precision} on {device}, augmentation on the {aug_on}, {workers} loader workers; "
        f"last epoch loss {last['train_loss']:.4f}"
        + (f", held-out bal. acc {last['val_balanced_accuracy']:.3f}" if "val_balanced_accuracy" in last else "")
    )


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
