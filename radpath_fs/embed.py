"""`radpath embed`: tile embeddings by batched inference, written to embeddings.zarr.

`embed_store(store, cfg)`: one task per slide over any scheduler (`radpath_fs.scheduler`); each
writes ``embeddings.zarr/<embedder_id>/<case>/<mag>``, (n, L), marked complete last
(`radpath_fs.embeddings`). Before any task, the dataset normalisation and a random embedder's
batch-norm statistics are settled (`radpath_fs.normstats`). Reading the next batches from Zarr
runs in background threads (or DataLoader processes) while the model (`radpath_fs.embedders`) runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import os
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from radpath_fs.config import EmbedConfig
from radpath_fs.embedders import create_embedder, embedder_id, embedder_record, embedding_width
from radpath_fs.embeddings import embedding_path, open_embedding, write_embedding
from radpath_fs.errors import ConfigError, RadpathError, StoreError
from radpath_fs.layout import COMPLETE, EMBEDDINGS, TILES
from radpath_fs.normstats import (
    calibrate_store_embedder,
    calibration_rel,
    center_region,
    normalization_cases,
    normalization_stats,
    source_fingerprint,
    store_embedder,
    tile_groups,
    tile_moments,
    tile_pixels,
)
from radpath_fs.progress import info, warn
from radpath_fs.store import Store
from radpath_fs.tilestore import TileReader
from radpath_fs.transforms import eval_transform


class _TileBatches:
    """Map-style dataset of tile batches: item i = (group index, start row, uint8 tensor).

    Picklable (a store URL and group names), so DataLoader worker processes open the tile readers
    themselves; only the `region` (the center crop) of each tile is copied out.
    """

    def __init__(self, store_url: str, groups: list[tuple[str, str]], regions: list, batch_size: int, sizes: list[int]):
        self.store_url, self.groups, self.regions = store_url, groups, regions
        self.work = [
            (gi, start, min(start + batch_size, n)) for gi, n in enumerate(sizes) for start in range(0, n, batch_size)
        ]
        self._readers: dict[int, TileReader] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _readers={}, _lock=threading.Lock())

    def __len__(self) -> int:
        return len(self.work)

    def _reader(self, gi: int) -> TileReader:
        with self._lock:
            if gi not in self._readers:
                case_id, mk = self.groups[gi]
                self._readers[gi] = TileReader(Store(self.store_url), case_id, float(mk))
            return self._readers[gi]

    def __getitem__(self, i: int):
        import torch

        gi, start, stop = self.work[i]
        try:
            return gi, start, torch.from_numpy(self._reader(gi).read(slice(start, stop), self.regions[gi]))
        except RadpathError as e:
            # Handed back, not raised: a DataLoader worker's exception reaches the caller wrapped
            # in a traceback, where the error that names the damaged group should be one line.
            return gi, start, e


class BatchReader:
    """Reads the tiles of a run of groups in batches, in order, ahead of the model.

    The stream runs across group (bag) boundaries, so the next slide is read while the model
    finishes the last one. Each batch is read by `TileReader` (mapped shard files, tiles decoded in a
    thread pool); `processes` > 0 spreads reading over
    DataLoader worker processes (shared-memory batches, pinned by DataLoader for an asynchronous
    host-to-device copy), as many as `batch_bytes` (the largest batch's bytes) lets fit in
    /dev/shm (`training.fit_loader`). With `processes=0` (or inside a daemonic Dask worker, which
    may not fork) `threads` threads read in this process. Yields (group index, start row, batch).
    """

    def __init__(self, store_url: str, groups: list[tuple[str, str]], regions: list, sizes: list[int],
                 batch_size: int, *, processes: int = 0, threads: int = 2, depth: int = 3, pin: bool = False,
                 batch_bytes: int = 0):
        import multiprocessing

        self.data = _TileBatches(store_url, groups, regions, batch_size, sizes)
        self.processes = processes if not multiprocessing.current_process().daemon else 0
        self.threads, self.depth, self.pin, self.batch_bytes = max(1, threads), max(1, depth), pin, batch_bytes

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        from radpath_fs.training import fit_loader

        # One batch is not worth starting a process for.
        workers, depth = (min(self.processes, len(self.data)) if len(self.data) > 1 else 0), self.depth
        if workers:
            workers, depth = fit_loader(workers, depth, self.batch_bytes, "the embedding reader")
        if workers:
            from torch.utils.data import DataLoader

            loader = DataLoader(
                self.data, batch_size=None, shuffle=False, num_workers=workers, pin_memory=self.pin, prefetch_factor=depth,
            )
            for item in loader:
                yield _checked(item)
            return
        with cf.ThreadPoolExecutor(self.threads, thread_name_prefix="radpath-read") as pool:
            pending = [pool.submit(self._read, i) for i in range(min(self.depth, len(self.data)))]
            nxt = len(pending)
            try:
                while pending:
                    item = _checked(pending.pop(0).result())
                    if nxt < len(self.data):
                        pending.append(pool.submit(self._read, nxt))
                        nxt += 1
                    yield item
            finally:
                for f in pending:
                    f.cancel()

    def _read(self, i: int):
        gi, start, batch = self.data[i]
        return gi, start, (batch.pin_memory() if self.pin and not isinstance(batch, Exception) else batch)


def _checked(item):
    if isinstance(item[2], Exception):
        raise item[2]
    return item


class Embedder:
    """A model on a device, run the way the device wants.

    CUDA: channels_last, bf16 autocast, optional torch.compile (static shapes: a short last batch
    is padded), results copied back one batch late so the GPU always has the next batch queued.
    CPU: fp32, inference mode.
    """

    def __init__(self, model, device, *, compile: bool = False, batch_size: int | None = None):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        model = model.eval().to(self.device)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.num_features = embedding_width(model)
        self.model = torch.compile(model, dynamic=False) if compile else model
        self.compiled = compile
        self.pad_to = batch_size if compile else None
        self.precision = "bf16-autocast" if self.cuda else "fp32"

    def forward(self, tiles, transform):
        """uint8 (B, T, T, 3) tiles already on the device -> (B, L) features."""
        import torch

        b = tiles.shape[0]
        if self.pad_to and b < self.pad_to:
            tiles = torch.cat([tiles, tiles.new_zeros((self.pad_to - b, *tiles.shape[1:]))])
        x = transform(tiles)
        if self.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x)[:b]
        return self.model(x)[:b]

    def run(self, reader: BatchReader, sizes: list[int], transforms: list, out_dtype, on_group, advance=None) -> None:
        """Embed every batch of `reader`; `on_group(gi, (n, L) array)` as soon as a group is done."""
        import torch

        tdtype = torch.float16 if np.dtype(out_dtype) == np.float16 else torch.float32
        outs = [np.empty((n, self.num_features), dtype=out_dtype) for n in sizes]
        left = list(sizes)
        transforms = [t.to(self.device) for t in transforms]
        for gi, n in enumerate(sizes):
            if n == 0:
                on_group(gi, outs[gi])

        def collect(gi, start, feats, event):
            if event is not None:
                event.synchronize()
            rows = feats.shape[0]
            outs[gi][start : start + rows] = feats.numpy()
            left[gi] -= rows
            if advance is not None:
                advance(rows)
            if left[gi] == 0:
                on_group(gi, outs[gi])
                outs[gi] = None

        pending = None
        # Events record on the current device's stream: make it this model's (`--device cuda:1`).
        on_device = torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()
        with torch.inference_mode(), on_device:
            for gi, start, batch in reader:
                feats = self.forward(batch.to(self.device, non_blocking=True), transforms[gi]).to(tdtype)
                if not self.cuda:
                    collect(gi, start, feats, None)
                    continue
                host = torch.empty(feats.shape, dtype=tdtype, pin_memory=True)
                host.copy_(feats, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                if pending is not None:
                    collect(*pending)
                pending = (gi, start, host, event)
            if pending is not None:
                collect(*pending)


_EMBEDDERS: dict[tuple, Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def _cached_embedder(store: Store, cfg: EmbedConfig, device, calibration: str | None) -> Embedder:
    """One model per process (per embedder id, calibration and device): a worker builds it once."""
    key = (embedder_id(cfg), calibration, str(device), cfg.compile, cfg.batch_size)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = Embedder(store_embedder(store, cfg), device, compile=cfg.compile, batch_size=cfg.batch_size)
        return _EMBEDDERS[key]


def embed_cases(
    case_ids: list[str],
    *,
    store_url: str,
    cfg: dict,
    mag_keys: list[str],
    stats: dict[str, tuple[list[float], list[float]]],
    device: str = "cpu",
    torch_threads: int | None = None,
    read_processes: int | None = None,
    progress: bool = False,
    stats_from: str | None = None,
    calibration: str | None = None,
) -> dict:
    """Embed every complete tile group of some slides in one stream (a pure task: explicit inputs,
    and it writes only these slides' arrays). `stats_from` ("train" or "all", see
    `normalization_cases`) is recorded in each array's attributes as ``normalization_cases``;
    `calibration`, the hash of the batch-norm statistics the model holds (`calibrate_store_embedder`,
    or those shipped in a bundle's weights), as ``calibration``: arrays made with other ones are redone.

    Returns a small summary {written: [[case, mag]], skipped: [...], incomplete_tiles: [...], tiles: n}.
    """
    from radpath_fs.training import cpu_threads

    with cpu_threads(torch_threads):
        return _embed_cases(case_ids, store_url, cfg, mag_keys, stats, device, read_processes, progress, stats_from,
                            calibration)


class _Group(NamedTuple):
    """A tile group to embed: its lazy pixels, its transform and the fingerprint of its tiles."""

    case_id: str
    mk: str
    pixels: Any
    transform: Any
    fingerprint: str | None


def _embed_cases(case_ids, store_url, cfg, mag_keys, stats, device, read_processes, progress, stats_from,
                 calibration) -> dict:
    from radpath_fs.progress import progress_bar
    from radpath_fs.training import resolve_device

    store = Store(store_url)
    ecfg = EmbedConfig.model_validate(cfg)
    eid = embedder_id(ecfg)
    dev = resolve_device(device)
    summary: dict[str, Any] = {"written": [], "skipped": [], "incomplete_tiles": [], "tiles": 0}
    todo: list[_Group] = []
    for case_id in case_ids:
        for mk in tile_groups(store, case_id, [float(m) for m in mag_keys]):
            if not store.group_is_complete(TILES, f"{case_id}/{mk}"):
                summary["incomplete_tiles"].append([case_id, mk])
                continue
            transform = eval_transform(ecfg, *stats[mk])
            pixels = tile_pixels(store, case_id, float(mk))
            fingerprint = source_fingerprint(store, case_id, float(mk))
            old = open_embedding(store, eid, case_id, float(mk))
            if old is not None and old.attrs.get(COMPLETE, False):
                # Redone when the tiles were re-tiled since (another recipe: other pixels, other rows).
                same_tiles = old.shape[0] == pixels.shape[0] and old.attrs.get("source_fingerprint") == fingerprint
                same_transform = old.attrs.get("transform") == transform.record()
                same_calibration = old.attrs.get("calibration") == calibration
                if same_tiles and same_transform and same_calibration:
                    summary["skipped"].append([case_id, mk])
                    continue
                why = ("made from tiles that were re-tiled since" if not same_tiles
                       else "made from other normalisation statistics" if not same_transform
                       else "made with other batch-norm statistics of the embedder")
                warn(f"{store.path(EMBEDDINGS, eid, case_id, mk)}: {why}; recomputing")
            todo.append(_Group(case_id, mk, pixels, transform, fingerprint))
    if not todo:
        return summary
    emb = _cached_embedder(store, ecfg, dev, calibration)
    regions = [center_region(ecfg, int(g.pixels.shape[1])) for g in todo]
    sizes = [int(g.pixels.shape[0]) for g in todo]
    if read_processes is None:
        # The GPU outruns one process's Zarr reading; on the CPU the model is the slow part.
        read_processes = max(1, min(16, (os.cpu_count() or 1) - 2)) if emb.cuda else 0
    side = [(r[1] - r[0]) if r else int(g.pixels.shape[1]) for r, g in zip(regions, todo, strict=True)]
    reader = BatchReader(
        store.url, [(g.case_id, g.mk) for g in todo], regions, sizes, ecfg.batch_size,
        processes=read_processes, threads=2, depth=4 if read_processes else 2, pin=emb.cuda,
        batch_bytes=ecfg.batch_size * max(side) ** 2 * 3,
    )
    base = embedder_record(ecfg)

    def write(gi: int, data: np.ndarray) -> None:
        case_id, mk, pixels, transform, fingerprint = todo[gi]
        attrs = {
            **base,
            "transform": transform.record(),
            "calibration": calibration,
            "tile_size": int(pixels.shape[1]),
            "tiles": int(data.shape[0]),
            "source": f"{TILES}/{case_id}/{mk}",
            "source_fingerprint": fingerprint,
            "magnification": float(mk),
            "precision": emb.precision,
            "compiled": emb.compiled,
            "dtype": ecfg.dtype,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if stats_from is not None:
            attrs["normalization_cases"] = stats_from
        write_embedding(store, embedding_path(eid, case_id, float(mk)), data, attrs)
        summary["written"].append([case_id, mk])
        summary["tiles"] += int(data.shape[0])

    # One write in flight on its own thread: a big slide's array takes longer to compress and
    # write than a batch takes on a GPU, which would otherwise wait for it.
    writing: list[cf.Future] = []

    def on_group(gi: int, data: np.ndarray) -> None:
        if writing:
            writing.pop().result()
        writing.append(writer.submit(write, gi, data))

    bar = progress_bar(f"embed {eid}", total=sum(sizes)) if progress else contextlib.nullcontext(None)
    with bar as advance, cf.ThreadPoolExecutor(1, thread_name_prefix="radpath-write") as writer:
        emb.run(reader, sizes, [g.transform for g in todo], np.dtype(ecfg.dtype), on_group, advance)
        if writing:
            writing.pop().result()
    return summary


def _local_workers(scheduler: str) -> int:
    if scheduler.startswith("local:"):
        return int(scheduler.split(":", 1)[1])
    if scheduler == "processes":
        return os.cpu_count() or 1
    return 1


def embed_store(
    store_url: str | Store,
    cfg: EmbedConfig | None = None,
    *,
    device: str = "auto",
    scheduler: str = "sync",
    read_processes: int | None = None,
) -> dict:
    """`radpath embed`: embed every complete tile group of every case; returns a summary.

    Complete embedding arrays are skipped, incomplete ones redone. One task per slide, so
    `--scheduler cuda` / `tcp://` spread slides over GPU workers, each building its model once.
    """
    from radpath_fs.scheduler import check_scheduler, map_tasks
    from radpath_fs.training import resolve_device
    from radpath_fs.weights import check_weights

    cfg = cfg or EmbedConfig()
    check_scheduler(scheduler)
    if cfg.compile and scheduler == "threads":
        raise ConfigError("embed.compile: a compiled model cannot be called from several threads at once; "
                          "use --scheduler sync (one GPU) or cuda (one process per GPU)")
    store = store_url if isinstance(store_url, Store) else Store(store_url)
    check_weights(cfg)
    if cfg.weights_file is not None:
        create_embedder(cfg.name, cfg.weights_file, seed=cfg.seed)  # a bad file fails here, before any work
    eid = embedder_id(cfg)
    if scheduler in ("sync", "threads", "processes") or scheduler.startswith("local:"):
        dev = str(resolve_device(device))  # checked here; a remote cluster resolves on its workers
    else:
        dev = device if device != "auto" else ("cuda" if scheduler == "cuda" else "auto")
    with store.lock("embed"):
        cases = store.cases()["case_id"].astype(str).tolist()
        groups = {c: tile_groups(store, c, cfg.magnifications) for c in cases}
        mags = sorted({mk for ks in groups.values() for mk in ks}, key=float)
        if not mags:
            raise StoreError(f"{store.path(TILES)}: no tile groups to embed; run `radpath tile` first")
        # One normalisation per magnification, matching the per-magnification MIL models.
        stats_from = None
        if cfg.normalization == "dataset":
            tile_moments(store, [float(mk) for mk in mags])  # one Dask pass for every magnification
            stats_from = normalization_cases(store)[1]
            if stats_from == "all":
                info("no case is labelled: the dataset normalisation is every case's tiles'")
        stats = {mk: normalization_stats(store, cfg, [float(mk)]) for mk in mags}
        # Here, before any task: every task then loads the same statistics from the store.
        local = scheduler in ("sync", "threads", "processes") or scheduler.startswith("local:")
        calibration = calibrate_store_embedder(store, cfg, stats, dev if local else "cpu")
        root = store.open_zarr(EMBEDDINGS)
        g = root.require_group(eid)
        g.attrs.update({**embedder_record(cfg), "crop": cfg.crop, "input_size": cfg.input_size,
                        "normalization_cases": stats_from, "calibration": calibration,
                        "calibration_file": calibration_rel(cfg) if calibration else None})
        todo = [c for c in cases if groups[c]]
        for c in todo:
            g.require_group(c)
        workers = _local_workers(scheduler)
        torch_threads = cfg.cpu_threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
        if read_processes is None and (scheduler == "threads" or workers > 1):
            # Slides are embedded side by side on this machine already: reader processes per
            # task would multiply (and each task would size its /dev/shm share as if alone).
            read_processes = 0
        info(f"embedding {len(todo)} slides with {eid} on {dev} ({scheduler})")
        kwargs = dict(
            store_url=store.url,
            cfg=cfg.model_dump(mode="json"),
            mag_keys=mags,
            stats=stats,
            stats_from=stats_from,
            calibration=calibration,
            device=dev,
            torch_threads=torch_threads,
            read_processes=read_processes,
        )
        if scheduler == "sync":
            # One stream over every slide: the next slide is read while the model finishes this one.
            results = [embed_cases(todo, progress=True, **kwargs)]
        else:
            # One task per slide, spread over the workers (each builds its model once).
            results = map_tasks(embed_cases, [[c] for c in todo], scheduler=scheduler, description=f"embed {eid}", **kwargs)
    for r in results:
        for case_id, mk in r["incomplete_tiles"]:
            warn(f"{store.path(TILES, case_id, mk)}: tile group incomplete; not embedded (rerun `radpath tile`)")
    summary = {
        "embedder_id": eid,
        "written": sum(len(r["written"]) for r in results),
        "skipped": sum(len(r["skipped"]) for r in results),
        "tiles": sum(r["tiles"] for r in results),
    }
    info(f"{summary['written']} embedding arrays written ({summary['tiles']} tiles), {summary['skipped']} already complete")
    return summary



__all__ = ["BatchReader", "Embedder", "embed_cases", "embed_store"]
