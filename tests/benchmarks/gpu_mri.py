"""MRI training benchmark: DenseNet169-3D volumes/s from mri.zarr, against the bare train step.

Self-contained: writes synthetic preprocessed volumes (z-scored brain-shaped noise, float16, so
zstd finds about as little to squeeze as in real z-scored MRI) into a temporary store's mri.zarr
through the same writer as `radpath train-mri`, then measures in one process:

  bare            `train_step` alone on device-resident tensors (bf16 autocast; with and without
                  channels_last_3d on CUDA): the ceiling (34.8 volumes/s measured on an H200)
  loader_<mode>   the training input pipeline alone, no model: mri.zarr read + decode + the random
                  zoom/rotation/elastic transforms (in loader workers, or on the device)
  train_<mode>    `train_mri` itself (fold -1, `epochs` epochs): training volumes/s of the epochs
                  after the first (cuDNN autotuning and worker start-up are in epoch 0), data
                  loading and augmentation included; also its whole wall time (state and
                  snapshot writes included)

`run(out_dir, device="cuda", **sizes) -> dict` is what `gpu_bench.py` calls. CPU smoke test:
`python tests/benchmarks/gpu_mri.py --device cpu --cases 4 --spatial 32 --epochs 2 --bare-steps 2
--init-features 8 --growth-rate 8 --block-config 2,2,2,2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

DEFAULTS = dict(
    cases=60,
    spatial=128,
    batch=3,
    epochs=3,
    bare_steps=20,
    warmup=5,
    network="densenet169",
    init_features=None,
    growth_rate=None,
    block_config=None,
    augment_modes=None,  # None: device and loader on CUDA, loader on the CPU
    num_workers=None,
    seed=0,
)
TARGET = 0.7


def synthetic_volume(rng: np.random.Generator, size: int, channels: int = 4) -> np.ndarray:
    """A (C,S,S,S) float16 z-scored 'brain': noise inside an ellipsoid, exact zeros outside."""
    axes = np.linspace(-1, 1, size, dtype=np.float32)
    radii = rng.uniform(0.75, 0.95, 3).astype(np.float32)
    brain = (
        (axes[:, None, None] / radii[0]) ** 2 + (axes[None, :, None] / radii[1]) ** 2 + (axes[None, None, :] / radii[2]) ** 2
    ) <= 1
    v = rng.standard_normal((channels, size, size, size), dtype=np.float32)
    return np.where(brain, v, 0).astype(np.float16)


def build_store(root: Path, cfg, n: int, seed: int):
    import pandas as pd

    from radpath_fs import CLASSES, MODALITIES
    from radpath_fs.layout import MRI_ZARR
    from radpath_fs.mri.preprocess import PREPROCESS_VERSION, write_cached
    from radpath_fs.store import Store

    store = Store(root, create=True)
    rng = np.random.default_rng(seed)
    rows = []
    store.open_zarr(MRI_ZARR, mode="a")
    for i in range(n):
        cid = f"BENCH{i:04d}"
        rows.append({
            "case_id": cid, "label": CLASSES[i % len(CLASSES)], "split": "train", "fold": i % 5, "cohort": None,
            "slide_path": None, "slide_width": None, "slide_height": None, "slide_mpp": None,
            **{f"mri_{m}": f"/synthetic/{cid}_{m}.nii.gz" for m in MODALITIES},
            "has_slide": False, "has_mri": True, "age_in_days": None, "excluded": False, "exclusion_reason": None,
        })
        record = {"preprocess_version": PREPROCESS_VERSION, "modalities": list(cfg.mri.modalities),
                  "spatial_size": list(cfg.mri.spatial_size), "synthetic": True}
        write_cached(store, cid, synthetic_volume(rng, cfg.mri.spatial_size[0], len(cfg.mri.modalities)), record)
    store.write_table("cases", pd.DataFrame(rows))
    return store


def bare_train(cfg, device, batch: int, steps: int, warmup: int, channels_last: bool) -> dict:
    import torch

    from radpath_fs.mri.train import build_network, make_optimizer
    from radpath_fs.training import Runtime, train_step

    rt = Runtime(device, spatial_dims=3, channels_last=channels_last)
    torch.backends.cudnn.benchmark = rt.cuda
    model = rt.prepare(build_network(cfg.mri)).train()
    opt = make_optimizer(model, cfg.mri, rt)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.5, 2.0, 0.6], device=device))
    s = cfg.mri.spatial_size
    x = rt.inputs(torch.randn(batch, len(cfg.mri.modalities), *s))
    y = torch.randint(0, 3, (batch,), device=device)
    for _ in range(warmup):
        train_step(model, opt, loss_fn, x, y, rt)
    _sync(device)
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, loss_fn, x, y, rt)
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"volumes_per_s": batch * steps / dt, "step_ms": 1000 * dt / steps, "channels_last": channels_last,
           "precision": rt.precision}
    if rt.cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    return out


def loader_only(store, cfg, device, mode: str, workers: int) -> dict:
    """The trainer's input pipeline for an epoch without the model (`device_batches`, as in training)."""
    from monai.data import get_track_meta, set_track_meta

    from radpath_fs.mri.data import (
        CachedVolumes,
        EpochBatches,
        augment_transforms,
        device_batches,
        make_loader,
        volume_bytes,
    )
    from radpath_fs.mri.train import mri_runtime

    rt = mri_runtime(device, cfg.mri)
    ids = list(store.cases()["case_id"])
    sampler = EpochBatches(len(ids), cfg.mri.batch_size, cfg.seed, -1)
    ds = CachedVolumes(store.url, ids, augment=cfg.mri if mode == "loader" else None)
    loader = make_loader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=rt.cuda,
                         item_bytes=volume_bytes(cfg.mri))
    aug = augment_transforms(cfg.mri, device) if mode == "device" else None
    track = get_track_meta()
    set_track_meta(False)
    try:
        rates = []
        for epoch in range(2):  # the first epoch starts the workers
            sampler.set_epoch(epoch)
            t0, n = time.perf_counter(), 0
            for x, _ in device_batches(loader, aug, rt):
                n += len(x)
            _sync(device)
            rates.append(n / (time.perf_counter() - t0))
    finally:
        set_track_meta(track)
    return {"volumes_per_s": rates[-1], "first_epoch_volumes_per_s": rates[0], "workers": workers}


def augment_costs(cfg, device, reps: int = 5) -> dict:
    """Milliseconds per volume of each random transform alone (probability 1), on `device`."""
    import torch
    from monai.data import get_track_meta, set_track_meta

    from radpath_fs.mri.data import augment_transforms, augment_volume

    s = cfg.mri.spatial_size
    x = torch.randn(len(cfg.mri.modalities), *s, device=device)
    out = {}
    track = get_track_meta()
    set_track_meta(False)
    try:
        for name in ("zoom", "rotate", "elastic"):
            probs = dict(zoom_prob=0.0, rotate_prob=0.0, elastic_prob=0.0)
            probs[f"{name}_prob"] = 1.0
            aug = augment_transforms(cfg.mri.model_copy(update=probs), device)
            augment_volume(aug, x, 0)
            _sync(device)
            t0 = time.perf_counter()
            for r in range(reps):
                augment_volume(aug, x, r + 1)
            _sync(device)
            out[name] = 1000 * (time.perf_counter() - t0) / reps
    finally:
        set_track_meta(track)
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(out_dir: Path, device: str = "cuda", **sizes) -> dict:
    import pyarrow.parquet as pq
    import torch

    from radpath_fs.config import PipelineConfig
    from radpath_fs.layout import MRI_ZARR, history_path
    from radpath_fs.mri import train_mri
    from radpath_fs.mri.data import default_workers
    from radpath_fs.training import resolve_device

    os.environ.setdefault("RADPATH_PROGRESS", "0")
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown benchmark sizes {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **sizes}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    modes = p["augment_modes"] or (["device", "loader"] if dev.type == "cuda" else ["loader"])
    mri = {
        "spatial_size": [p["spatial"]] * 3,
        "batch_size": p["batch"],
        "epochs": p["epochs"],
        "snapshots": [-1],
        "network": p["network"],
        "num_workers": p["num_workers"],
    }
    for k in ("init_features", "growth_rate", "block_config"):
        if p[k] is not None:
            mri[k] = p[k]
    base = PipelineConfig.model_validate({"seed": p["seed"], "mri": mri})
    result: dict = {
        "params": {k: v for k, v in p.items()},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "augment": {k: getattr(base.mri, k) for k in ("zoom_prob", "rotate_prob", "elastic_prob")},
    }

    # The ceiling: the bare train step on device tensors, in each memory layout.
    layouts = [True, False] if dev.type == "cuda" else [False]
    bare = {("channels_last" if cl else "contiguous"): bare_train(base, dev, p["batch"], p["bare_steps"], p["warmup"], cl)
            for cl in layouts}
    best_layout = max(bare, key=lambda k: bare[k]["volumes_per_s"])
    result["bare"] = bare
    result["ceiling_volumes_per_s"] = bare[best_layout]["volumes_per_s"]
    result["ceiling_layout"] = best_layout
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result["augment_ms_per_volume"] = augment_costs(base, dev)

    with tempfile.TemporaryDirectory(prefix="radpath-bench-mri-") as tmp:
        t0 = time.perf_counter()
        cfg0 = base.model_copy(update={"mri": base.mri.model_copy(update={"channels_last": best_layout == "channels_last"})})
        store = build_store(Path(tmp) / "store", cfg0, p["cases"], p["seed"])
        result["write_cache_s"] = time.perf_counter() - t0
        result["cache_bytes_per_volume"] = sum(
            f.stat().st_size for f in (Path(tmp) / "store" / MRI_ZARR).rglob("*") if f.is_file() and f.name != "zarr.json"
        ) / p["cases"]
        for mode in modes:
            cfg = cfg0.model_copy(update={"mri": cfg0.mri.model_copy(update={"augment_on": mode})})
            workers = default_workers(cfg.mri, dev)
            result[f"loader_{mode}"] = loader_only(store, cfg, dev, mode, workers)
            t0 = time.perf_counter()
            train_mri(store.url, cfg, fold=-1, device=str(dev), resume=False)
            wall = time.perf_counter() - t0
            h = pq.read_table(store.path(history_path("mri-all"))).to_pandas()
            rates = list(h["train_volumes_per_s"])
            steady = rates[1:] or rates
            result[f"train_{mode}"] = {
                "volumes_per_s": statistics.median(steady),
                "per_epoch_volumes_per_s": rates,
                "wall_s": wall,
                "wall_volumes_per_s": p["cases"] * p["epochs"] / wall,
                "workers": workers,
            }
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    best_mode = max(modes, key=lambda m: result[f"train_{m}"]["volumes_per_s"])
    result["best_mode"] = best_mode
    result["train_volumes_per_s"] = result[f"train_{best_mode}"]["volumes_per_s"]
    result["ratio"] = result["train_volumes_per_s"] / result["ceiling_volumes_per_s"]
    result["target_ratio"] = TARGET
    result["meets_target"] = result["ratio"] >= TARGET
    (out_dir / "gpu_mri.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results/mri")
    ap.add_argument("--device", default="cuda")
    for k, v in DEFAULTS.items():
        if k in ("augment_modes", "block_config"):
            ap.add_argument("--" + k.replace("_", "-"), default=None, help="comma-separated")
        else:
            ap.add_argument("--" + k.replace("_", "-"), type=type(v) if v is not None else int, default=v)
    args = vars(ap.parse_args(argv))
    out, device = Path(args.pop("out")), args.pop("device")
    if args["augment_modes"]:
        args["augment_modes"] = args["augment_modes"].split(",")
    if args["block_config"]:
        args["block_config"] = [int(x) for x in args["block_config"].split(",")]
    print(json.dumps(run(out, device=device, **args), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
