"""Normalisation statistics of the store's tiles, and the batch-norm statistics of random embedders.

- `tile_normalization(store, mags)`: per-channel mean/std of the training tiles (every case's in a
  cohort without labels), by a streaming Dask reduction over tiles.zarr; exact integer moments per
  magnification are cached in the store (`tile_moments`).
- `store_embedder(store, cfg)`: the model exactly as it makes the store's embeddings. Random
  weights with batch-norm layers get running statistics estimated from the store's tiles first
  (`calibrate_store_embedder`, once per embedder, kept in ``stats/embedders/<embedder_id>.safetensors``):
  a fresh network's placeholders (mean 0, var 1) normalise nothing, and its features fade to ~1e-5.
- The tile groups an embedder reads (`tile_groups`, `tile_pixels`, `center_region`), shared with
  `radpath_fs.embed`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np

from radpath_fs.config import EmbedConfig
from radpath_fs.embedders import create_embedder, embedder_id, preset_normalization
from radpath_fs.errors import StoreError
from radpath_fs.layout import MOMENTS_JSON, NORMALIZATION_JSON, TILES, calibration_path
from radpath_fs.progress import info
from radpath_fs.store import Store, mag_key
from radpath_fs.tilestore import TileReader, tile_group_attrs, tile_group_path
from radpath_fs.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

# A random embedder's calibrated state dict (`layout.calibration_path`) holds batch-norm statistics
# estimated from the store's tiles; its safetensors metadata key says what from.
CALIBRATION_META = "calibration"


# ---- the tiles an embedder reads ---------------------------------------------------------------
def tile_pixels(store: Store, case_id: str, magnification: float):
    """The lazy `pixels` array of a tile group, (n, T, T, 3) uint8.

    `tilestore.read_tiles` returns whole tiles in memory; the embedder streams batches and reads
    only the center crop out of each, so it opens the array itself (importing tilestore above
    registers the JPEG tile codec).
    """
    return store.open_group(TILES, tile_group_path(case_id, magnification), mode="r")["pixels"]


def tile_groups(store: Store, case_id: str, magnifications: list[float] | None) -> list[str]:
    """Mag keys of the tile groups of a case (those asked for, or all), complete or not."""
    import zarr

    try:
        g = zarr.open_group(store=store.zarr_store(TILES), path=case_id, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return []
    present = sorted(g.group_keys(), key=float)
    if magnifications is None:
        return present
    wanted = {mag_key(m) for m in magnifications}
    return [k for k in present if k in wanted]


def center_region(cfg: EmbedConfig, t: int) -> tuple[int, int] | None:
    """Rows and columns of a `t` px tile that a center crop keeps (None: the whole tile is read).
    Only they are read out and sent to the device: the same pixels the transform would crop, a
    fifth of the bytes for 512 -> 224."""
    if cfg.crop != "center" or t < cfg.input_size:
        return None
    top = int(round((t - cfg.input_size) / 2.0))
    return top, top + cfg.input_size


def normalization_cases(store: Store) -> tuple[list[str], str]:
    """(cases, which) whose tiles give the dataset normalisation: the training cases ("train"), or,
    in a cohort without a labelled case (a batch to embed), every case ("all"): no label is involved."""
    cases = store.cases()
    train = sorted(cases.loc[cases["split"] == "train", "case_id"].astype(str))
    return (train, "train") if train else (sorted(cases["case_id"].astype(str)), "all")


# ---- dataset normalisation ---------------------------------------------------------------------
# Tiles per Dask task of the normalisation pass; a task reduces them MOMENT_READ at a time.
MOMENT_BLOCK = 256
MOMENT_READ = 8


def _block_moments(store_url: str, case_id: str, mk: str, start: int, stop: int) -> np.ndarray:
    """(2, 3) uint64: per-channel sum and sum of squares of tiles [start, stop) of a group, exact."""
    reader = TileReader(Store(store_url), case_id, float(mk))
    counts = np.zeros((3, 256), dtype=np.uint64)
    for a in range(start, stop, MOMENT_READ):
        flat = reader.read(slice(a, min(a + MOMENT_READ, stop))).reshape(-1)
        # A histogram per channel, then the moments from it: 4x faster than summing widened pixels.
        for c in range(3):
            counts[c] += np.bincount(flat[c::3], minlength=256).astype(np.uint64)
    v = np.arange(256, dtype=np.uint64)
    return np.stack([counts @ v, counts @ (v * v)])


def source_fingerprint(store: Store, case_id: str, magnification: float) -> str:
    """The content fingerprint of a complete tile group."""
    return tile_group_attrs(store, case_id, magnification)["fingerprint"]


def _normalization_groups(store: Store, magnifications: list[float] | None, instead: str
                          ) -> tuple[dict[str, list[tuple[str, int, str]]], dict[str, int], str]:
    """The complete tile groups of the normalisation cases (`normalization_cases`) at each
    magnification: ({mag_key: [(case, tiles, source fingerprint)]}, {mag_key: tile side}, case set).
    A StoreError, suggesting `instead`, when a magnification asked for has none."""
    cases, case_set = normalization_cases(store)
    groups: dict[str, list[tuple[str, int, str]]] = {}
    side: dict[str, int] = {}
    for case in cases:
        for mk in tile_groups(store, case, magnifications):
            if not store.group_is_complete(TILES, f"{case}/{mk}"):
                continue
            px = tile_pixels(store, case, float(mk))
            groups.setdefault(mk, []).append((case, int(px.shape[0]), source_fingerprint(store, case, float(mk))))
            side[mk] = int(px.shape[1])
    wanted = [mag_key(m) for m in magnifications] if magnifications is not None else sorted(groups, key=float)
    missing = [mk for mk in wanted if mk not in groups]
    if missing or not wanted:
        which = "training cases (split 'train')" if case_set == "train" else "any case"
        raise StoreError(
            f"{store.path(TILES)}: no complete tile groups of {which} at "
            f"magnification(s) {', '.join(missing) or 'any'}; run `radpath tile` first, or use {instead}"
        )
    return {mk: groups[mk] for mk in wanted}, side, case_set


def tile_moments(store: Store, magnifications: list[float] | None = None, *, scheduler: str = "threads") -> dict:
    """Per magnification, exact pixel moments of the training tiles (every case's in a cohort
    without a labelled case): {mag_key: {n, sum, sumsq, cases, case_set}}.

    One Dask task per block of MOMENT_BLOCK tiles of a group, each reading with `TileReader` and
    returning six integers. Cached in ``stats/tile_moments.json``; an entry is reused while the
    training tile groups (case ids, tile counts and content fingerprints) are unchanged.
    """
    import dask

    groups, side, case_set = _normalization_groups(store, magnifications, "embed.normalization: imagenet")
    wanted = list(groups)
    cache = store.read_json(MOMENTS_JSON) if store.exists(MOMENTS_JSON) else {}
    result, todo = {}, []
    for mk in wanted:
        key = hashlib.sha256(repr(groups[mk]).encode()).hexdigest()[:16]
        hit = cache.get(mk)
        if hit is not None and hit.get("groups_hash") == key:
            result[mk] = hit
        else:
            todo.append((mk, key))
    if todo:
        block = dask.delayed(_block_moments, pure=True)
        graphs = {
            mk: [block(store.url, case, mk, a, min(a + MOMENT_BLOCK, n)) for case, n, _ in groups[mk]
                 for a in range(0, n, MOMENT_BLOCK)]
            for mk, _ in todo
        }
        computed = dask.compute(graphs, scheduler=scheduler)[0]
        for mk, key in todo:
            total = sum(computed[mk], np.zeros((2, 3), dtype=np.uint64))
            result[mk] = {
                "n": sum(n for _, n, _ in groups[mk]) * side[mk] ** 2,
                "sum": [int(v) for v in total[0]],
                "sumsq": [int(v) for v in total[1]],
                "cases": len(groups[mk]),
                "case_set": case_set,
                "groups_hash": key,
            }
        cache = store.read_json(MOMENTS_JSON) if store.exists(MOMENTS_JSON) else {}
        cache.update({mk: result[mk] for mk, _ in todo})
        store.write_json(MOMENTS_JSON, cache)
    return result


def tile_normalization(
    store: Store | str, magnifications: list[float] | None = None, *, scheduler: str = "threads"
) -> tuple[list[float], list[float]]:
    """Per-channel (mean[3], std[3]) of the training tiles at `magnifications` (all if None), in [0, 1].

    Pixels of every training tile (cases with split 'train'; every case's where none is labelled)
    at those magnifications are pooled.
    The result is also written to ``stats/tile_normalization.json`` keyed by the magnifications.
    """
    store = store if isinstance(store, Store) else Store(store)
    moments = tile_moments(store, magnifications, scheduler=scheduler)
    n = sum(m["n"] for m in moments.values())
    if n == 0:
        raise StoreError(f"{store.path(TILES)}: the training tiles hold no pixels; cannot compute normalisation")
    s = np.array([sum(m["sum"][c] for m in moments.values()) for c in range(3)], dtype=np.float64)
    ss = np.array([sum(m["sumsq"][c] for m in moments.values()) for c in range(3)], dtype=np.float64)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    mean, std = (mean / 255.0).tolist(), (std / 255.0).tolist()
    if min(std) <= 0:
        raise StoreError(f"{store.path(TILES)}: the training tiles have a constant channel; use embed.normalization: imagenet")
    key = ",".join(sorted(moments, key=float))
    table = store.read_json(NORMALIZATION_JSON) if store.exists(NORMALIZATION_JSON) else {}
    entry = {"mean": mean, "std": std, "pixels": int(n), "magnifications": key,
             "case_set": normalization_cases(store)[1]}
    if table.get(key) != entry:
        table[key] = entry
        store.write_json(NORMALIZATION_JSON, table)
    return mean, std


def normalization_stats(store: Store, cfg: EmbedConfig, magnifications: list[float] | None) -> tuple[list[float], list[float]]:
    """The (mean, std) a transform uses: the encoder's own, ImageNet's, or the training tiles' at those magnifications."""
    if cfg.normalization == "preset":
        return preset_normalization(cfg.name)
    if cfg.normalization == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return tile_normalization(store, magnifications)


# ---- batch-norm calibration of random embedders ------------------------------------------------
def _batch_norms(model) -> list:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def is_calibrated(cfg: EmbedConfig, model) -> bool:
    """Whether the store's embedder `cfg` carries batch-norm statistics estimated from its tiles:
    random weights (pretrained and file weights hold real statistics) with batch-norm layers."""
    return cfg.weights_file is None and not cfg.pretrained and bool(_batch_norms(model))


def calibrate_batch_norm(model, batches) -> int:
    """Re-estimate every batch-norm layer's running statistics from `batches` (float tensors, the
    model's inputs on its device); returns how many batches. Only the batch-norm layers run in
    train mode (dropout and drop-path stay off), each an equal-weight average over the batches
    (``momentum=None``), without gradients; the model is left in eval mode."""
    import torch

    norms = _batch_norms(model)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                n += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return n


def calibration_rel(cfg: EmbedConfig) -> str:
    """Where the store keeps embedder `cfg`'s calibrated state dict."""
    return calibration_path(embedder_id(cfg))


def _calibration_sample(store: Store, cfg: EmbedConfig, mag_keys: list[str]):
    """(groups, picks, case set): the complete tile groups of the normalisation cases at `mag_keys`,
    and up to `cfg.calibration_tiles` (case, mag_key, row) drawn from them by `cfg.seed`, an equal
    share per magnification (a magnification with fewer tiles leaves its share to the others),
    in a seeded order, so that every batch mixes magnifications."""
    groups, _, case_set = _normalization_groups(store, [float(mk) for mk in mag_keys], "embed.weights: a file")
    totals = {mk: sum(n for _, n, _ in groups[mk]) for mk in groups}
    rng = np.random.default_rng(cfg.seed)
    left, picks = cfg.calibration_tiles, []
    for i, mk in enumerate(sorted(groups, key=lambda k: (totals[k], float(k)))):
        k = min(totals[mk], left // (len(groups) - i))
        left -= k
        flat = np.sort(rng.choice(totals[mk], size=k, replace=False))
        starts = np.cumsum([0] + [n for _, n, _ in groups[mk]])
        for j in flat:
            g = int(np.searchsorted(starts, j, side="right")) - 1
            picks.append((groups[mk][g][0], mk, int(j - starts[g])))
    picks = [picks[i] for i in rng.permutation(len(picks))]
    return groups, picks, case_set


def _calibration_batches(store: Store, cfg: EmbedConfig, picks: list, transforms: dict, device) -> Iterator:
    """The sampled tiles, each through its magnification's eval transform, in near-equal batches of
    at most `embed.batch_size` (at least two tiles: one tile has no spread over a 1x1 feature map)."""
    import torch

    readers: dict[tuple[str, str], TileReader] = {}
    for part in np.array_split(np.arange(len(picks)), -(-len(picks) // max(2, cfg.batch_size))):
        x = []
        for i in part:
            case_id, mk, row = picks[i]
            reader = readers.setdefault((case_id, mk), TileReader(store, case_id, float(mk)))
            tile = torch.from_numpy(reader.read([row], center_region(cfg, reader.tile_shape[0])))
            x.append(transforms[mk](tile))
        yield torch.cat(x).to(device)


def calibrate_store_embedder(store: Store, cfg: EmbedConfig, stats: dict[str, tuple[list[float], list[float]]],
                             device="cpu") -> str | None:
    """Make sure the store holds embedder `cfg`'s batch-norm calibration for the tiles and
    normalisation it has now (`stats`: (mean, std) per magnification key being embedded); returns
    its hash (None for an embedder that is not calibrated, see `is_calibrated`).

    Estimated once, here on the client, and written to `calibration_rel(cfg)`: every embedding
    task, later reader and bundle loads that file (`store_embedder`). Redone when what it was made
    from changes: the sampled groups' tiles (source fingerprints), the normalisation statistics,
    the sample size or the batch size (each batch weighs equally in the average).
    """
    import timm
    import torch
    from safetensors.torch import save

    from radpath_fs.training import cpu_threads

    model = create_embedder(cfg.name, cfg.weights_file, cfg.pretrained, seed=cfg.seed)
    if not is_calibrated(cfg, model):
        return None
    groups, picks, case_set = _calibration_sample(store, cfg, sorted(stats, key=float))
    if len(picks) < 2:
        raise StoreError(f"{store.path(TILES)}: {len(picks)} tile(s) of the normalisation cases; the batch-norm "
                         f"statistics of the random embedder {embedder_id(cfg)} need at least two")
    transforms = {mk: eval_transform(cfg, *stats[mk]) for mk in groups}
    made_from = {
        "embedder_id": embedder_id(cfg), "seed": cfg.seed, "calibration_tiles": cfg.calibration_tiles,
        "batch_size": max(2, cfg.batch_size), "case_set": case_set,
        "transforms": {mk: t.record() for mk, t in transforms.items()},
        "sources": {mk: [list(g) for g in groups[mk]] for mk in groups},
        "timm_version": timm.__version__, "torch_version": torch.__version__.split("+")[0],
    }
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]
    rel = calibration_rel(cfg)
    if store.exists(rel):
        held = _read_calibration(store, rel)
        if held[2].get("made_from") == key:
            return held[1]
        info(f"{store.path(rel)}: made from other tiles or normalisation; estimating the batch-norm statistics again")
    with cpu_threads(cfg.cpu_threads):
        model = model.to(device)
        n = calibrate_batch_norm(model, _calibration_batches(store, cfg, picks, transforms, device))
    per_mag = {mk: sum(1 for _, m, _ in picks if m == mk) for mk in groups}
    meta = {
        "made_from": key, "tiles": len(picks), "batches": n, "per_magnification": per_mag,
        "cases": sorted({c for c, _, _ in picks}), "case_set": case_set,
        "sources_hash": hashlib.sha256(json.dumps(made_from["sources"], sort_keys=True).encode()).hexdigest()[:16],
        "transforms": made_from["transforms"], "seed": cfg.seed, "batch_size": made_from["batch_size"],
    }
    info(f"batch-norm statistics of {embedder_id(cfg)} estimated from {len(picks)} tiles of {len(meta['cases'])} cases")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    store.write_bytes(rel, save(state, {CALIBRATION_META: json.dumps(meta, sort_keys=True)}))
    return _read_calibration(store, rel)[1]


def _read_calibration(store: Store, rel: str) -> tuple[dict, str, dict]:
    """(state dict, hash of the file, its metadata) of a stored calibration."""
    from radpath_fs.training import load_safetensors_bytes

    data = store.fs.cat_file(store.path(rel))
    state = load_safetensors_bytes(data, store.path(rel))
    # The header: an 8-byte little-endian length, then JSON with the metadata under "__metadata__".
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header.get("__metadata__", {}).get(CALIBRATION_META, "{}"))
    return state, hashlib.sha256(data).hexdigest()[:16], meta


def store_embedder(store: Store, cfg: EmbedConfig):
    """The model that makes (and made) the store's embeddings with `cfg`, in eval mode: the timm
    model of `create_embedder` and, for a calibrated random embedder, its batch-norm statistics as
    the store holds them. Every embedding task, reader and bundle builds it here."""
    model = create_embedder(cfg.name, cfg.weights_file, cfg.pretrained, seed=cfg.seed)
    if is_calibrated(cfg, model):
        rel = calibration_rel(cfg)
        if not store.exists(rel):
            raise StoreError(f"{store.path(rel)}: no batch-norm statistics of the random embedder "
                             f"{embedder_id(cfg)}; run `radpath embed` first")
        model.load_state_dict(_read_calibration(store, rel)[0], strict=True)
    return model.eval()


def calibration_hash(store: Store, cfg: EmbedConfig) -> str | None:
    """The hash of embedder `cfg`'s stored calibration (None where the embedder has none)."""
    rel = calibration_rel(cfg)
    return _read_calibration(store, rel)[1] if cfg.weights_file is None and not cfg.pretrained and store.exists(rel) else None


__all__ = [
    "calibrate_batch_norm",
    "calibrate_store_embedder",
    "calibration_hash",
    "calibration_rel",
    "center_region",
    "is_calibrated",
    "normalization_cases",
    "normalization_stats",
    "source_fingerprint",
    "store_embedder",
    "tile_groups",
    "tile_moments",
    "tile_normalization",
    "tile_pixels",
]
