"""Stage one, second half: tile embeddings with any timm model, cached in embeddings.zarr.

- `create_embedder(name, weights=None, pretrained=False)`: a timm model without its classifier
  (``num_classes=0``), ``.num_features`` = L. Weights come from a local .safetensors/.pth state
  dict (tensors only: safetensors, or ``torch.load(weights_only=True)`` whose restricted unpickler
  builds tensors and containers and refuses everything else), from timm's own source when asked
  (``pretrained=True``, online machines), or are random from a seed.
- `embedder_id(cfg)`: the store name of an embedder, encoding model, weights and transform,
  e.g. ``efficientnet_b0-random-s0-c224-dataset`` or ``efficientnet_b0-w3fa2c1d9e0b7-c224-imagenet``.
- `tile_normalization(store, mags)`: per-channel mean/std of the training tiles (every case's in a
  cohort without labels), by a streaming
  Dask reduction over tiles.zarr; exact integer moments per magnification are cached in the store.
- `store_embedder(store, cfg)`: the model exactly as it makes the store's embeddings. Random
  weights with batch-norm layers get running statistics estimated from the store's tiles first
  (`calibrate_store_embedder`, once per embedder, kept in ``stats/embedders/<embedder_id>.safetensors``):
  a fresh network's placeholders (mean 0, var 1) normalise nothing, and its features fade to ~1e-5.
- `embed_store(store, cfg)`: one task per slide over any scheduler (`radpath_fs.scheduler`); each
  writes ``embeddings.zarr/<embedder_id>/<case>/<mag>``, (n, L), marked complete last. Reading
  the next batches from Zarr runs in background threads while the model runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from radpath_fs.config import EmbedConfig
from radpath_fs.errors import ConfigError, InputError, RadpathError, StoreError
from radpath_fs.layout import COMPLETE, EMBEDDINGS, MOMENTS_JSON, NORMALIZATION_JSON, TILES, calibration_path
from radpath_fs.progress import info, warn
from radpath_fs.store import Store, check_name, mag_key
from radpath_fs.tilestore import TileReader, tile_group_attrs, tile_group_path
from radpath_fs.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

# A random embedder's calibrated state dict (`layout.calibration_path`) holds batch-norm statistics
# estimated from the store's tiles; its safetensors metadata key says what from.
CALIBRATION_META = "calibration"
# Rows per chunk of an embedding array: a whole bag of up to ~6.5k float16 1280-d vectors is one
# chunk (16 MiB); bigger bags read as a few large chunks.
_CHUNK_BYTES = 16 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


# ---- embedders ---------------------------------------------------------------------------------
def create_embedder(
    name: str = "efficientnet_b0",
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    *,
    seed: int = 0,
    **kwargs: Any,
):
    """A timm model `name` with the classifier removed; `.num_features` is the embedding size L.

    `weights`: a local state dict (.safetensors, or .pth/.pt/.bin read with ``weights_only``);
    classifier keys in it are ignored, any other mismatch is an InputError naming the file and
    the first offending keys. `pretrained=True` downloads through timm (only when asked).
    Otherwise (None or ``"random"``) the weights are timm's random initialisation drawn from `seed`
    (reproducible).
    Extra keyword arguments go to ``timm.create_model`` (e.g. ``drop_rate``).
    """
    import timm
    import torch

    if not timm.is_model(name):
        raise ConfigError(
            f"embed.name {name!r}: not a timm model (`python -c \"import timm; print(timm.list_models('*b0*'))\"` lists them)"
        )
    if isinstance(weights, str) and weights == "random":
        weights = None
    if weights is not None and pretrained:
        raise ConfigError("embed: give either weights (a local file) or pretrained=True, not both")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def embedding_width(embedder) -> int:
    """L, the width of what a timm model made with num_classes=0 returns. Where a model has a head
    stage after its features (MobileNetV3, LCNet, GhostNet), timm's `num_features` is the width
    before that stage and `head_hidden_size` the width of the output."""
    return int(getattr(embedder, "head_hidden_size", None) or embedder.num_features)


def read_state_dict(path: Path) -> dict:
    import torch

    from radpath_fs.training import load_safetensors_bytes

    if not path.is_file():
        raise InputError(path, "weights file not found")
    if path.suffix == ".safetensors":
        return load_safetensors_bytes(path.read_bytes(), str(path))
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise InputError(path, f"unknown weights format; expected one of {', '.join(_WEIGHT_SUFFIXES)}")
    # Published weights are mostly .pth: the restricted unpickler builds tensors and plain
    # containers only and refuses any other global, so nothing of the file's choosing runs.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for non-tensor pickles, RuntimeError for non-zip files
        raise InputError(
            path, f"not a state dict of tensors loadable with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    # Training checkpoints often wrap the state dict.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def load_weights(model, weights: str | os.PathLike) -> None:
    """Load a local state dict into a timm model made with ``num_classes=0``; strict apart from the classifier."""
    path = Path(weights)
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier or ()))
    if prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        arch = type(model).__name__
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {shapes[0]})")
        raise InputError(path, f"weights do not fit the {arch} embedder: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def weights_hash(path: str | os.PathLike | None) -> str:
    """First 12 hex digits of the SHA-256 of a weights file; ``"random"`` for no file."""
    from radpath_fs.weights import sha256_file

    if path is None:
        return "random"
    try:
        return sha256_file(path)[:12]
    except InputError:
        raise InputError(path, "weights file not found") from None


def embedder_id(cfg: EmbedConfig) -> str:
    """The store name of an embedder: model, weights, transform (crop and size), normalisation.

    Weights part: ``w<sha256[:12]>`` for a file, ``pretrained`` for timm's source, ``random-s<seed>``.
    Transform part: ``c224`` (center crop) or ``r224`` (resize).
    """
    if cfg.weights_file is not None:
        wpart = "w" + weights_hash(cfg.weights_file)
    elif cfg.pretrained:
        wpart = "pretrained"
    else:
        wpart = f"random-s{cfg.seed}"
    tpart = f"{'c' if cfg.crop == 'center' else 'r'}{cfg.input_size}"
    return check_name(f"{cfg.name}-{wpart}-{tpart}-{cfg.normalization}", "embedder id")


def embedder_record(cfg: EmbedConfig) -> dict:
    """What identifies the model half of an embedding (the transform records the rest)."""
    import timm
    import torch

    return {
        "embedder_id": embedder_id(cfg),
        "model": cfg.name,
        "weights": None if cfg.weights is None else str(cfg.weights),
        "weights_hash": weights_hash(cfg.weights_file),
        "pretrained": cfg.pretrained,
        "seed": cfg.seed,
        "normalization": cfg.normalization,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }


# ---- normalisation -----------------------------------------------------------------------------
def _tile_pixels(store: Store, case_id: str, magnification: float):
    """The lazy `pixels` array of a tile group, (n, T, T, 3) uint8.

    `tilestore.read_tiles` returns whole tiles in memory; the embedder streams batches and reads
    only the center crop out of each, so it opens the array itself (importing tilestore above
    registers the JPEG tile codec).
    """
    return store.open_group(TILES, tile_group_path(case_id, magnification), mode="r")["pixels"]


def _tile_groups(store: Store, case_id: str, magnifications: list[float] | None) -> list[str]:
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


def normalization_cases(store: Store) -> tuple[list[str], str]:
    """(cases, which) whose tiles give the dataset normalisation: the training cases ("train"), or,
    in a cohort without a labelled case (a batch to embed), every case ("all"): no label is involved."""
    cases = store.cases()
    train = sorted(cases.loc[cases["split"] == "train", "case_id"].astype(str))
    return (train, "train") if train else (sorted(cases["case_id"].astype(str)), "all")


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


def source_fingerprint(store: Store, case_id: str, magnification: float) -> str | None:
    """The content fingerprint of a complete tile group (None for groups written before there was one)."""
    return tile_group_attrs(store, case_id, magnification).get("fingerprint")


def _normalization_groups(store: Store, magnifications: list[float] | None, instead: str
                          ) -> tuple[dict[str, list[tuple[str, int, str | None]]], dict[str, int], str]:
    """The complete tile groups of the normalisation cases (`normalization_cases`) at each
    magnification: ({mag_key: [(case, tiles, source fingerprint)]}, {mag_key: tile side}, case set).
    A StoreError, suggesting `instead`, when a magnification asked for has none."""
    cases, case_set = normalization_cases(store)
    groups: dict[str, list[tuple[str, int, str | None]]] = {}
    side: dict[str, int] = {}
    for case in cases:
        for mk in _tile_groups(store, case, magnifications):
            if not store.group_is_complete(TILES, f"{case}/{mk}"):
                continue
            px = _tile_pixels(store, case, float(mk))
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
    """The (mean, std) a transform uses: ImageNet's, or the training tiles' at those magnifications."""
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
            tile = torch.from_numpy(reader.read([row], _center_region(cfg, reader.tile_shape[0])))
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


# ---- reading embeddings ------------------------------------------------------------------------
def _embedding_path(embedder: str, case_id: str, magnification: float) -> str:
    return f"{check_name(embedder, 'embedder id')}/{check_name(case_id, 'case id')}/{mag_key(magnification)}"


def _open_embedding(store: Store, embedder: str, case_id: str, magnification: float):
    import zarr

    path = _embedding_path(embedder, case_id, magnification)
    try:
        return zarr.open_array(store=store.zarr_store(EMBEDDINGS), path=path, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def embedding_is_complete(store: Store, embedder: str, case_id: str, magnification: float) -> bool:
    arr = _open_embedding(store, embedder, case_id, magnification)
    return arr is not None and bool(arr.attrs.get(COMPLETE, False))


def embedding_count(store: Store, embedder: str, case_id: str, magnification: float) -> int:
    """Tiles in a complete embedding array (0 for a slide without tissue there, or when incomplete)."""
    arr = _open_embedding(store, embedder, case_id, magnification)
    return int(arr.shape[0]) if arr is not None and arr.attrs.get(COMPLETE, False) else 0


def read_embeddings(store: Store | str, embedder: str, case_id: str, magnification: float, dtype=None) -> np.ndarray:
    """The (n, L) embeddings of a slide at a magnification (stored dtype unless `dtype`)."""
    store = store if isinstance(store, Store) else Store(store)
    arr = _open_embedding(store, embedder, case_id, magnification)
    where = store.path(EMBEDDINGS, _embedding_path(embedder, case_id, magnification))
    if arr is None:
        raise StoreError(f"{where}: no embeddings (run `radpath embed` with this embedder first)")
    if not arr.attrs.get(COMPLETE, False):
        raise StoreError(f"{where}: embeddings incomplete (an interrupted run); rerun `radpath embed`")
    out = arr[...]
    return out if dtype is None else out.astype(dtype, copy=False)


def embedding_inputs(store: Store, embedder: str, case_ids: list[str], magnification: float) -> dict[str, dict]:
    """{case: {"transform": the transform record its embeddings were made with, "calibration": the
    hash of the embedder's batch-norm statistics then (None: not calibrated)}}; a StoreError if
    they differ between cases (a store embedded only in part since either changed)."""
    records = {}
    for c in case_ids:
        attrs = embedding_attrs(store, embedder, c, magnification)
        records[c] = {"transform": attrs.get("transform"), "calibration": attrs.get("calibration")}
    kinds = {json.dumps(r, sort_keys=True) for r in records.values()}
    if len(kinds) > 1:
        raise StoreError(f"{store.path(EMBEDDINGS, embedder)}: embeddings at {mag_key(magnification)} made with "
                         f"{len(kinds)} different transforms or calibrations; rerun `radpath embed` to finish "
                         "recomputing them")
    return records


def embedding_attrs(store: Store, embedder: str, case_id: str, magnification: float) -> dict:
    arr = _open_embedding(store, embedder, case_id, magnification)
    if arr is None:
        raise StoreError(f"{store.path(EMBEDDINGS, _embedding_path(embedder, case_id, magnification))}: no embeddings")
    return dict(arr.attrs)


# ---- batched inference -------------------------------------------------------------------------
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


def _center_region(cfg: EmbedConfig, t: int) -> tuple[int, int] | None:
    """Rows and columns of a `t` px tile that a center crop keeps (None: the whole tile is read).
    Only they are read out and sent to the device: the same pixels the transform would crop, a
    fifth of the bytes for 512 -> 224."""
    if cfg.crop != "center" or t < cfg.input_size:
        return None
    top = int(round((t - cfg.input_size) / 2.0))
    return top, top + cfg.input_size


def _chunk_rows(n_features: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // (n_features * itemsize))


def _write_embedding(store: Store, path: str, data: np.ndarray, attrs: dict) -> None:
    """Write one (n, L) array, then mark it complete (overwriting an earlier incomplete one)."""
    import zarr

    rows = min(max(1, data.shape[0]), _chunk_rows(data.shape[1], data.dtype.itemsize))
    arr = zarr.create_array(
        store.zarr_store(EMBEDDINGS), name=path, shape=data.shape, dtype=data.dtype,
        chunks=(rows, data.shape[1]), overwrite=True, attributes={COMPLETE: False},
    )
    if data.shape[0]:
        arr[...] = data
    arr.attrs.update({**attrs, COMPLETE: True})


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
        for mk in _tile_groups(store, case_id, [float(m) for m in mag_keys]):
            if not store.group_is_complete(TILES, f"{case_id}/{mk}"):
                summary["incomplete_tiles"].append([case_id, mk])
                continue
            transform = eval_transform(ecfg, *stats[mk])
            pixels = _tile_pixels(store, case_id, float(mk))
            fingerprint = source_fingerprint(store, case_id, float(mk))
            old = _open_embedding(store, eid, case_id, float(mk))
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
    regions = [_center_region(ecfg, int(g.pixels.shape[1])) for g in todo]
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
        _write_embedding(store, _embedding_path(eid, case_id, float(mk)), data, attrs)
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
        groups = {c: _tile_groups(store, c, cfg.magnifications) for c in cases}
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


__all__ = [
    "BatchReader",
    "Embedder",
    "calibrate_batch_norm",
    "calibrate_store_embedder",
    "calibration_hash",
    "calibration_rel",
    "create_embedder",
    "embed_cases",
    "embed_store",
    "embedder_id",
    "embedder_record",
    "embedding_attrs",
    "embedding_inputs",
    "embedding_is_complete",
    "is_calibrated",
    "load_weights",
    "normalization_stats",
    "read_embeddings",
    "read_state_dict",
    "store_embedder",
    "tile_moments",
    "tile_normalization",
    "weights_hash",
]
