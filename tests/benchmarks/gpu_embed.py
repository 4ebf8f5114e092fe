"""Embedding benchmark: tiles.zarr -> embeddings.zarr end to end, against the bare model.

Self-contained: writes its own synthetic 512 px tiles (textured, H&E-like colours, so zstd
compresses them about as much as real tiles) into a temporary store's tiles.zarr, then measures
in the same process and at the same batch size:

  bare_fp32        the model alone on device-resident, already-normalised tensors (fp32/tf32)
  bare_bf16        the same with bf16 autocast + channels_last (the pipeline's CUDA setting)
  bare_compiled    the same, torch.compile'd (only with compile=True)
  reader           tiles.zarr -> host memory (decode + center crop), no model: the data wall
                   (reader_one_process: the same in one process; zstd_decode_all_cores: the bare
                   codec on every core, the wall under any Zarr reader)
  end_to_end       `embed_store` (sync scheduler): read, transfer, transform, model, write, warm
                   (model built, normalisation cached), median of `reps` runs
  end_to_end_cold  the first run: model build, cuDNN autotuning and the normalisation pass included

`run(out_dir, device="cuda", **sizes) -> dict` is what `gpu_bench.py` calls; on a CPU use tiny
sizes as a smoke test (`python tests/benchmarks/gpu_embed.py --device cpu --cases 2 --tiles 16
--batch-size 8 --model resnet18`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

DEFAULTS = dict(
    model="efficientnet_b0",
    cases=4,
    tiles=2048,  # per case (one magnification): 8192 tiles, 6.4 GB raw
    tile_size=512,
    input_size=224,
    batch_size=1024,
    codec="zstd",
    reps=3,
    bare_iters=20,
    compile=False,
    read_processes=None,  # DataLoader reader processes; None: the pipeline's default
)


def synthetic_tiles(n: int, tile_size: int, seed: int = 0, pool: int = 16) -> np.ndarray:
    """n tissue-like uint8 tiles: smooth stain fields, grain and about a third of flat background.

    Tuned so zstd level 1 compresses them ~1.5x, as it does real H&E tiles (1.48x).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(pool, 3, 12, 12, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(tile_size, tile_size), mode="bicubic", align_corners=False)
    eosin = torch.tensor([235.0, 150.0, 200.0]).view(1, 3, 1, 1)
    hema = torch.tensor([90.0, 60.0, 150.0]).view(1, 3, 1, 1)
    w = field[:, :1].clamp(0, 1)
    img = w * hema + (1 - w) * eosin + 25 * (field - 0.5)
    img = img + 6 * torch.randn(pool, 3, tile_size, tile_size, generator=g)
    background = 242.0 + torch.randint(-1, 2, (pool, 1, tile_size, tile_size), generator=g)
    img = torch.where(field[:, 1:2] > 0.6, background, img)
    base = img.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return base[np.arange(n) % pool]


def make_tile_store(root: Path, cases: int, tiles: int, tile_size: int, codec: str):
    import pandas as pd

    from radpath_fs.config import TileConfig
    from radpath_fs.store import Store
    from radpath_fs.tilestore import write_tile_group

    store = Store(root, create=True)
    ids = [f"bench{i:03d}" for i in range(cases)]
    store.write_table(
        "cases",
        pd.DataFrame({"case_id": ids, "label": ["G"] * cases, "split": ["train"] * cases,
                      "fold": [0] * cases, "excluded": [False] * cases}),
    )
    cfg = TileConfig(tile_size=tile_size, codec=codec, magnifications=[20])

    def write(i: int) -> int:
        px = synthetic_tiles(tiles, tile_size, seed=i)
        return write_tile_group(store, ids[i], 20, px, np.zeros((tiles, 2)), np.ones(tiles), {"mpp": 0.5}, cfg)

    with ThreadPoolExecutor(min(cases, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(cases)))
    return store, ids


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(model, device, batch_size: int, input_size: int, iters: int, *, bf16: bool) -> float:
    """Tiles/s of the model alone on a device-resident normalised batch."""
    import torch

    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        for _ in range(3):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
        dt = time.perf_counter() - t0
    return batch_size * iters / dt


def reader_rate(store, ids, batch_size: int, input_size: int, pin: bool, processes: int) -> float:
    """Tiles/s of tiles.zarr -> (pinned) host batches alone, center crop included."""
    from radpath_fs.embed import BatchReader
    from radpath_fs.normstats import tile_pixels

    sizes, regions = [], []
    for c in ids:
        px = tile_pixels(store, c, 20)
        top = int(round((px.shape[1] - input_size) / 2.0))
        sizes.append(int(px.shape[0]))
        regions.append((top, top + input_size))
    reader = BatchReader(store.url, [(c, "20") for c in ids], regions, sizes, batch_size,
                         processes=processes, threads=2, depth=4 if processes else 2, pin=pin,
                         batch_bytes=batch_size * input_size**2 * 3)
    n = 0
    t0 = time.perf_counter()
    for _, _, batch in reader:
        n += batch.shape[0]
    return n / (time.perf_counter() - t0)


def zstd_decode_rate(tile_size: int, threads: int) -> float:
    """Tiles/s of bare zstd decoding of these tiles on `threads` threads (the codec's own wall)."""
    import numcodecs

    codec = numcodecs.Zstd(level=1)
    encoded = [codec.encode(np.ascontiguousarray(t)) for t in synthetic_tiles(16, tile_size)]
    work = encoded * max(4, 8 * threads // 16)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(codec.decode, encoded))
        t0 = time.perf_counter()
        list(pool.map(codec.decode, work))
    return len(work) / (time.perf_counter() - t0)


def run(out_dir: Path | str, device: str = "cuda", **sizes) -> dict:
    import timm
    import torch

    from radpath_fs.config import EmbedConfig
    from radpath_fs.embed import embed_store
    from radpath_fs.embedders import create_embedder, embedder_id
    from radpath_fs.embeddings import embedding_attrs, read_embeddings
    from radpath_fs.normstats import store_embedder, tile_pixels

    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sizes {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **sizes}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    os.environ.setdefault("RADPATH_PROGRESS", "0")
    res: dict = {"params": p, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "timm": timm.__version__, "cpu_count": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="radpath-bench-embed-"))
    try:
        t0 = time.perf_counter()
        store, ids = make_tile_store(tmp / "store", p["cases"], p["tiles"], p["tile_size"], p["codec"])
        n_tiles = p["cases"] * p["tiles"]
        res["tiles"] = n_tiles
        res["write_tiles_s"] = round(time.perf_counter() - t0, 2)
        raw = n_tiles * p["tile_size"] ** 2 * 3
        on_disk = sum(f.stat().st_size for f in (tmp / "store" / "tiles.zarr").rglob("*") if f.is_file())
        res["tile_compression_ratio"] = round(raw / on_disk, 2)

        # Bare-model ceilings, same batch size.
        model = create_embedder(p["model"]).eval().to(dev)
        bs, size = p["batch_size"], p["input_size"]
        res["bare_fp32"] = round(bare_rate(model, dev, bs, size, p["bare_iters"], bf16=False), 1)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
            res["bare_bf16"] = round(bare_rate(model, dev, bs, size, p["bare_iters"], bf16=True), 1)
            if p["compile"]:
                t1 = time.perf_counter()
                compiled = torch.compile(model, dynamic=False)
                res["bare_compiled"] = round(bare_rate(compiled, dev, bs, size, p["bare_iters"], bf16=True), 1)
                res["compile_s"] = round(time.perf_counter() - t1, 1)
                del compiled
        del model

        cuda = dev.type == "cuda"
        procs = p["read_processes"]
        if procs is None:
            procs = max(1, min(16, (os.cpu_count() or 1) - 2)) if cuda else 0
        res["read_processes"] = procs
        res["reader"] = round(reader_rate(store, ids, bs, size, cuda, procs), 1)
        if procs:
            res["reader_one_process"] = round(reader_rate(store, ids, bs, size, cuda, 0), 1)
        res["zstd_decode_all_cores"] = round(zstd_decode_rate(p["tile_size"], os.cpu_count() or 1), 1)

        cfg = EmbedConfig(name=p["model"], weights="random", input_size=size, batch_size=bs, compile=p["compile"])
        eid = embedder_id(cfg)
        t0 = time.perf_counter()
        embed_store(store.url, cfg, device=device, scheduler="sync", read_processes=procs)
        res["end_to_end_cold"] = round(n_tiles / (time.perf_counter() - t0), 1)
        rates = []
        for _ in range(p["reps"]):
            shutil.rmtree(tmp / "store" / "embeddings.zarr" / eid)
            t0 = time.perf_counter()
            summary = embed_store(store.url, cfg, device=device, scheduler="sync", read_processes=procs)
            rates.append(n_tiles / (time.perf_counter() - t0))
            assert summary["tiles"] == n_tiles, summary
        res["end_to_end_runs"] = [round(r, 1) for r in rates]
        res["end_to_end"] = round(statistics.median(rates), 1)
        if not cuda:
            # Shared CPUs drift: measure the bare model again and compare against the faster one.
            again = create_embedder(p["model"]).eval()
            res["bare_fp32_after"] = round(bare_rate(again, dev, bs, size, p["bare_iters"], bf16=False), 1)
            res["bare_fp32"] = max(res["bare_fp32"], res["bare_fp32_after"])
        ceiling = res.get("bare_compiled" if p["compile"] else "bare_bf16", res["bare_fp32"])
        res["ratio_vs_ceiling"] = round(res["end_to_end"] / ceiling, 3)
        res["ratio_vs_bare_fp32"] = round(res["end_to_end"] / res["bare_fp32"], 3)

        # The stored vectors are the model's: recompute a few tiles in fp32 and compare.
        attrs = embedding_attrs(store, eid, ids[0], 20)
        from radpath_fs.transforms import transform_from_record

        tiles = torch.from_numpy(tile_pixels(store, ids[0], 20)[:8])
        ref_model = store_embedder(store, cfg)
        with torch.inference_mode():
            ref = ref_model(transform_from_record(attrs["transform"])(tiles)).numpy()
        got = read_embeddings(store, eid, ids[0], 20, dtype=np.float32)[:8]
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
        res["min_cosine_vs_cpu_fp32"] = round(float(cos.min()), 5)
        res["precision"] = attrs["precision"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out_dir / "gpu_embed.json").write_text(json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results/embed")
    ap.add_argument("--device", default="cuda")
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
        else:
            ap.add_argument(flag, type=type(v) if v is not None else int, default=v)
    args = vars(ap.parse_args(argv))
    out, device = args.pop("out"), args.pop("device")
    print(json.dumps(run(Path(out), device=device, **args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
