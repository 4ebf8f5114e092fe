"""Finetune training speed of the slide model, data loading from tiles.zarr included (`make bench-gpu`).

`run(out_dir, device)` writes synthetic H&E-like tiles into a temporary store's tiles.zarr (the
real writer, the configured codec), then measures in the same process:

- ``bare``: the training step alone (EfficientNet-b0 + pooled head, 4 slides x 50 tiles, bf16
  autocast, channels_last, weighted cross-entropy, Adam) on tensors already on the device;
- ``pipeline``: `WSITrainer.run_batches`, the trainer's own loop: random tiles read from
  tiles.zarr by the loader threads, copied to the device, random crop 512 -> 224 and per-tile
  colour jitter there, then the same step;
- ``loader``: the loader alone (tiles/s it can deliver), to tell a data bound from a step bound.

The ratio pipeline / bare is the target (>= 0.7; the bare step is ~4,480 tiles/s on an H200).
Runs on the CPU with tiny sizes as a smoke test (tests/test_mil.py does). CLI:
``python tests/benchmarks/gpu_mil.py --out DIR [--device cuda] [--codec jpeg] [--steps 40]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEFAULTS = dict(
    slides=16,  # slides in the store; each batch draws 4 of them
    tiles=160,  # tiles per slide
    tile_size=512,
    crop=224,
    slides_per_batch=4,
    tiles_per_slide=50,
    embedder="efficientnet_b0",
    codec="zstd",
    steps=40,
    warmup=8,
    loader_threads=None,
    prefetch_batches=4,
)


def _synthetic_tiles(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    """H&E-like tiles: pink stroma with purple nuclei-like blobs and fine noise (compresses like tissue)."""
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    out = np.empty((n, t, t, 3), np.uint8)
    pink, purple = np.array([235, 170, 215], np.float32), np.array([90, 60, 150], np.float32)
    for i in range(n):
        k = int(rng.integers(20, 60))
        cx, cy = rng.uniform(0, t, k), rng.uniform(0, t, k)
        r = rng.uniform(4, 12, k)
        nuc = np.zeros((t, t), np.float32)
        for x, y, s in zip(cx, cy, r, strict=True):
            x0, x1, y0, y1 = int(max(0, x - 3 * s)), int(min(t, x + 3 * s)), int(max(0, y - 3 * s)), int(min(t, y + 3 * s))
            d2 = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2
            nuc[y0:y1, x0:x1] = np.maximum(nuc[y0:y1, x0:x1], np.exp(-d2 / (2 * s * s)))
        img = pink + (purple - pink) * nuc[..., None] + rng.normal(0, 6, (t, t, 1)).astype(np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _make_store(root: pathlib.Path, sizes: dict):
    import pandas as pd

    from radpath_fs import CLASSES
    from radpath_fs.config import TileConfig
    from radpath_fs.store import Store
    from radpath_fs.tilestore import write_tile_group

    store = Store(root / "store", create=True)
    n = sizes["slides"]
    store.write_table("cases", pd.DataFrame({
        "case_id": [f"S{i:03d}" for i in range(n)],
        "label": [CLASSES[i % 3] for i in range(n)],
        "split": ["train"] * n,
        "fold": [i % 2 for i in range(n)],
        "has_slide": [True] * n,
        "has_mri": [False] * n,
        "excluded": [False] * n,
    }))
    tcfg = TileConfig(tile_size=sizes["tile_size"], codec=sizes["codec"], tiles_per_shard=64)
    t = sizes["tile_size"]
    base = _synthetic_tiles(np.random.default_rng(0), min(64, sizes["tiles"]), t)

    def write(i: int) -> None:
        rng = np.random.default_rng(i + 1)
        # Distinct tiles cheaply: shuffled, flipped and shifted copies of a pool of base tiles.
        px = base[rng.integers(0, len(base), sizes["tiles"])]
        px = np.roll(px[:, ::-1] if i % 2 else px, int(rng.integers(0, t)), axis=2)
        k = sizes["tiles"]
        write_tile_group(store, f"S{i:03d}", 20, px, np.zeros((k, 2)), np.ones(k, np.float32),
                         {"mpp": 0.5, "level_width": t, "level_height": t}, tcfg)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(n)))
    return store


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare(sizes: dict, device) -> dict:
    """The training step alone on device tensors (what the ceiling measures)."""
    import torch

    from radpath_fs.embedders import create_embedder, embedding_width
    from radpath_fs.mil import MILClassifier, PooledHead
    from radpath_fs.training import Runtime

    embedder = create_embedder(sizes["embedder"])
    model = MILClassifier(embedder, PooledHead(embedding_width(embedder))).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1.5, 0.6], device=device))
    b, k = sizes["slides_per_batch"], sizes["tiles_per_slide"]
    x = torch.randn(b * k, 3, sizes["crop"], sizes["crop"], device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(b, device=device) % 3

    def step():
        with Runtime(device, spatial_dims=2).autocast():
            logits = model.forward_flat(x, [k] * b)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(sizes["warmup"]):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(sizes["steps"]):
        step()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"tiles_per_s": sizes["steps"] * b * k / dt, "step_ms": 1000 * dt / sizes["steps"]}


def _pipeline(store, sizes: dict, device) -> dict:
    import torch

    from radpath_fs.config import PipelineConfig
    from radpath_fs.mil import WSIRun, WSITrainer, epoch_seeds

    cfg = PipelineConfig.model_validate({
        "embed": {"name": sizes["embedder"], "weights": "random", "normalization": "dataset"},
        "wsi": {"mode": "finetune", "crop_size": sizes["crop"], "slides_per_batch": sizes["slides_per_batch"],
                "tiles_per_slide": sizes["tiles_per_slide"], "loader_threads": sizes["loader_threads"],
                "prefetch_batches": sizes["prefetch_batches"]},
    })
    trainer = WSITrainer(WSIRun(store, cfg, 20, -1, "finetune", None), device)
    plans: list = []
    epoch = 0
    while len(plans) < sizes["warmup"] + sizes["steps"]:
        plans += trainer.epoch_plans(epoch_seeds(0, epoch)[0])
        epoch += 1
    warm, timed = plans[: sizes["warmup"]], plans[sizes["warmup"] : sizes["warmup"] + sizes["steps"]]
    gen = torch.Generator().manual_seed(0)
    try:
        trainer.run_batches(warm, gen)
        _sync(device)
        r = trainer.run_batches(timed, gen)  # ends by copying losses back: the device is done
        # The loader alone, on the same plans (page cache warm, as in the timed run).
        t0 = time.perf_counter()
        n = sum(len(buf) for _, buf in trainer.loader.iterate(timed))
        loader_tps = n / (time.perf_counter() - t0)
    finally:
        trainer.loader.close()
    return {"tiles_per_s": r["tiles_per_s"], "loader_tiles_per_s": loader_tps,
            "loader_threads": trainer.loader.pool._max_workers if trainer.loader.pool else 0}


def run(out_dir: pathlib.Path, device: str = "cuda", **sizes) -> dict:
    """Measure bare-step and end-to-end finetune tiles/s; write `<out_dir>/gpu_mil.json` and return it."""
    import torch

    from radpath_fs.training import resolve_device

    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sizes {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    sizes = {**DEFAULTS, **sizes}
    dev = resolve_device(device)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RADPATH_PROGRESS", "0")
    with tempfile.TemporaryDirectory(prefix="gpu-mil-") as tmp:
        t0 = time.perf_counter()
        store = _make_store(pathlib.Path(tmp), sizes)
        write_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        bare = _bare(sizes, dev)
        pipe = _pipeline(store, sizes, dev)
    result = {
        "benchmark": "mil_finetune_train",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": "bf16-autocast+channels_last" if dev.type == "cuda" else "fp32",
        "sizes": sizes,
        "cpu_count": os.cpu_count(),
        "store_write_s": write_s,
        "bare_tiles_per_s": bare["tiles_per_s"],
        "bare_step_ms": bare["step_ms"],
        "pipeline_tiles_per_s": pipe["tiles_per_s"],
        "loader_tiles_per_s": pipe["loader_tiles_per_s"],
        "loader_threads": pipe["loader_threads"],
        "ratio": pipe["tiles_per_s"] / bare["tiles_per_s"],
        "target_ratio": 0.7,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    (out_dir / "gpu_mil.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"))
    p.add_argument("--device", default="cuda")
    for k, v in DEFAULTS.items():
        if k != "loader_threads":
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--loader-threads", type=int, default=None)
    a = vars(p.parse_args(argv))
    out, device = a.pop("out"), a.pop("device")
    print(json.dumps(run(out, device, **a), indent=2, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    main()
