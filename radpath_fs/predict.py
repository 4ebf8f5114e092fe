"""`radpath predict`: a model's prediction table for each split, in the schema of store/README.md.

Slide models follow the paper's inference protocol: per slide, `predict.tiles_per_slide` random
tiles (all of them when there are fewer), augmented tile by tile with the training augmentation
(finetune models; a head-only model sees cached embeddings, so its only randomness is the tile
subset), repeated `predict.repeats` times. The class is the hard vote over the repeats; the mean
logits and the mean probabilities go in the required columns, the vote counts in extra columns
(votes_A, votes_O, votes_G, repeats, pred_vote, tiles). MRI models are handed to
`radpath_fs.mri.predict_mri`.

Splits: ``oof`` = the labelled cases of the model's held-out fold; ``val``/``test`` = the
unlabelled cases of that split; ``train`` = the model's training cases. Default: oof (for a
model with a held-out fold) and every unlabelled split in the cases table.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd

from radpath_fs import CLASSES
from radpath_fs.errors import RadpathError, StoreError
from radpath_fs.folds import HAS, default_splits, split_cases
from radpath_fs.layout import EMBEDDINGS, MODELS, TILES, model_config_path, prediction_table_name
from radpath_fs.predictions import SPLITS, prediction_table, softmax, write_predictions
from radpath_fs.progress import info, progress_bar, warn
from radpath_fs.store import Store, mag_key


def _as_store(store: Store | str) -> Store:
    return store if isinstance(store, Store) else Store(store)


def model_config(store: Store, model_id: str) -> dict:
    rel = model_config_path(model_id)
    if not store.exists(rel):
        raise RadpathError(f"{store.path(rel)}: no such model (is the id right? see `radpath query`)")
    return store.read_json(rel)


def pending_predictions(store: Store | str) -> list[str]:
    """Model snapshots (models/<id>/config.json with a snapshot) missing a default split's table."""
    store = _as_store(store)
    folder = store.path(MODELS)
    if not store.fs.exists(folder):
        return []
    cases = store.cases()
    todo = []
    for path in sorted(store.fs.ls(folder, detail=False)):
        model_id = path.rstrip("/").rsplit("/", 1)[1]
        if not store.exists(model_config_path(model_id)):
            continue  # a snapshot being written: its config.json comes last
        config = store.read_json(model_config_path(model_id))
        if "snapshot" not in config or config.get("modality") not in HAS:
            continue
        splits = default_splits(cases, int(config.get("fold", -1)), config["modality"])
        if any(not store.has_table(prediction_table_name(model_id, s)) for s in splits):
            todo.append(model_id)
    return todo


def predict_models(store_url: Store | str, cfg, model_ids: list[str], splits: list[str] | None = None,
                   device: str = "auto") -> None:
    """`radpath predict`: write the prediction tables of each model for `splits` (default: see module doc)."""
    store = _as_store(store_url)
    if splits:
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise RadpathError(f"--split {', '.join(bad)}: expected some of {', '.join(SPLITS)}")
    configs = {m: model_config(store, m) for m in model_ids}  # every id checked before any work
    for model_id, config in configs.items():
        if config.get("modality") not in HAS:
            raise RadpathError(f"{store.path(model_config_path(model_id))}: unknown modality "
                               f"{config.get('modality')!r}")
    with store.lock("predict"):
        for model_id, config in configs.items():
            if config["modality"] == "wsi":
                predict_wsi(store, cfg, model_id, splits, device)
            else:
                from radpath_fs.mri import predict_mri

                predict_mri(store, cfg, model_id, splits, device)


def _case_seed(seed: int, model_id: str, case_id: str) -> np.random.SeedSequence:
    # Keyed by model and case, so a case's tile subsets do not depend on which split or order it is in.
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(model_id.encode()), zlib.crc32(case_id.encode())])


def vote(logits: np.ndarray) -> dict[str, np.ndarray]:
    """(cases, repeats, classes) logits -> mean logits, mean probs, vote counts, voted class.

    The class is the majority of the repeats' argmax; a tie goes to the highest mean probability
    among the tied classes.
    """
    n, r, k = logits.shape
    probs = softmax(logits.reshape(n * r, k)).reshape(n, r, k)
    votes = np.stack([(logits.argmax(2) == j).sum(1) for j in range(k)], axis=1)
    mean_probs = probs.mean(1)
    tied = votes == votes.max(1, keepdims=True)
    pred = np.where(tied, mean_probs, -np.inf).argmax(1)
    return {"logits": logits.mean(1), "probs": mean_probs, "votes": votes, "pred": pred}


def predict_wsi(store_url: Store | str, cfg, model_id: str, splits: list[str] | None = None,
                device: str = "auto") -> list[str]:
    """The paper's slide inference protocol for one model; returns the tables written.

    The caller holds the store's writer lock (`predict_models` does).
    """
    from radpath_fs.mil import load_wsi_model
    from radpath_fs.training import resolve_device

    store = _as_store(store_url)
    dev = resolve_device(device)
    model, config = load_wsi_model(store, model_id, dev)
    cases = store.cases()
    written = []
    for split in splits or default_splits(cases, int(config["fold"]), "wsi"):
        part = split_cases(cases, split, int(config["fold"]), config.get("train_cases"), modality="wsi", model_id=model_id)
        written.append(_predict_split(store, cfg, model_id, model, config, split, part, dev))
    return written


def _bag_source(store: Store, config: dict, case_ids: list[str]):
    """The model's inputs for these cases (embeddings or tiles) and the cases that have none."""
    from radpath_fs.mil import EmbeddingBags, TileBags

    mag = float(config["magnification"])
    if config["mode"] == "head":
        from radpath_fs.embeddings import embedding_is_complete

        eid = config["embedder"]["id"]
        ok = [c for c in case_ids if embedding_is_complete(store, eid, c, mag)]
        source = EmbeddingBags(store, eid, ok, mag)
        if ok and source.transform != config["embedding_transform"]:
            raise StoreError(
                f"{store.path(EMBEDDINGS, eid)}: embedded with other normalisation statistics than model "
                f"{config['run_id']} (snapshot {config['snapshot']}) was trained on (`radpath embed` recomputes "
                "them when the training cases change); retrain it with `radpath train-wsi`"
            )
        if ok and source.calibration != config.get("embedding_calibration"):
            raise StoreError(
                f"{store.path(EMBEDDINGS, eid)}: embedded with other batch-norm statistics of the random embedder "
                f"than model {config['run_id']} (snapshot {config['snapshot']}) was trained on (`radpath embed` "
                "estimates them again when the training tiles change); retrain it with `radpath train-wsi`"
            )
    else:
        ok = [c for c in case_ids if store.group_is_complete(TILES, f"{c}/{mag_key(mag)}")]
        source = TileBags(store, ok, mag)
    return source, [c for c in case_ids if c not in set(ok)]


def slide_votes(store: Store, cfg, model_id: str, model, config: dict, case_ids: list[str], dev,
                what: str = "") -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """The paper's inference protocol on these cases: (ids of the cases with tiles, `vote` of their
    repeats, tiles per case). Cases without embeddings/tiles at the model's magnification are left out.

    Each case is inferred on its own, its tile subsets and augmentation drawn from seeds keyed by
    (seed, model, case): a case gets the same numbers in any split, in any order, or alone
    (`radpath predict-case`).
    """
    import torch

    from radpath_fs.mil import Loader, Segment, build_transforms, infer_bags, loader_threads

    mag, mode, p = float(config["magnification"]), config["mode"], cfg.predict
    source, missing = _bag_source(store, config, case_ids)
    keep = [i for i in range(len(source.case_ids)) if source.n_tiles(i) > 0]
    missing += [c for i, c in enumerate(source.case_ids) if source.n_tiles(i) == 0]
    if missing:
        warn(f"{model_id} {what}: {len(missing)} case(s) without {'embeddings' if mode == 'head' else 'tiles'} "
             f"at magnification {mag_key(mag)} get no row: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    transform = None
    if mode == "finetune":
        # The training augmentation, tile by tile (a head-only model's inputs are cached embeddings).
        norm = config["normalization"]
        train_tf, eval_tf = build_transforms(wsi_section(config), norm["mean"], norm["std"])
        transform = (train_tf if p.augment else eval_tf).to(dev)
    logits = np.zeros((len(keep), p.repeats, len(CLASSES)), np.float32)
    total = sum(min(p.tiles_per_slide, source.n_tiles(i)) for i in keep) * p.repeats
    with Loader(source, threads=loader_threads(config["wsi"].get("loader_threads")), depth=2,
                pin=dev.type == "cuda") as loader, progress_bar(f"predict {model_id} {what}", total) as advance:
        for j, i in enumerate(keep):
            seeds = _case_seed(cfg.seed, model_id, source.case_ids[i])
            rng = np.random.default_rng(seeds)
            n = source.n_tiles(i)
            bags = [Segment(i, np.sort(rng.choice(n, size=min(p.tiles_per_slide, n), replace=False)), r)
                    for r in range(p.repeats)]
            gen = torch.Generator().manual_seed(int(seeds.spawn(1)[0].generate_state(1)[0]))
            logits[j] = infer_bags(model, loader, bags, transform=transform, generator=gen, device=dev,
                                   chunk_tiles=p.batch_tiles, advance=advance)
    tiles = np.array([source.n_tiles(i) for i in keep], np.int32)
    return [source.case_ids[i] for i in keep], vote(logits), tiles


# Schema metadata key of a slide model's prediction table: the settings its numbers were made with.
PREDICT_METADATA = b"radpath.predict"


def predict_settings(cfg, config: dict) -> dict:
    """The settings of `radpath predict` that decide a slide model's numbers, beyond float rounding.

    A head-only model's only randomness is the tile subsets; a fine-tuned one augments each chunk
    of `batch_tiles` tiles with one draw of the generator, so there the chunk size counts too.
    """
    p = cfg.predict
    settings = {"seed": int(cfg.seed), "repeats": p.repeats, "tiles_per_slide": p.tiles_per_slide}
    if config["mode"] == "finetune":
        settings["augment"] = p.augment
        if p.augment:
            settings["batch_tiles"] = p.batch_tiles
    return settings


def _predict_split(store: Store, cfg, model_id: str, model, config: dict, split: str, part: pd.DataFrame, dev) -> str:
    mag, p = float(config["magnification"]), cfg.predict
    ids, v, tiles = slide_votes(store, cfg, model_id, model, config, [str(c) for c in part["case_id"]], dev, split)
    labels = part.set_index("case_id").loc[ids, "label"].tolist() if ids else []
    extra = {f"votes_{c}": v["votes"][:, j].astype(np.int32) for j, c in enumerate(CLASSES)}
    extra["repeats"] = np.full(len(ids), p.repeats, np.int32)
    extra["pred_vote"] = np.array([CLASSES[k] for k in v["pred"]], dtype=str)
    extra["tiles"] = tiles
    table = prediction_table(
        model_id=model_id, modality="wsi", magnification=mag, snapshot=int(config["snapshot"]),
        fold=int(config["fold"]), split=split, case_ids=ids, labels=labels, logits=v["logits"], probs=v["probs"],
        extra=extra,
    )
    # Metadata, not columns: the contract fixes the columns, and `radpath bundle export` checks these.
    meta = {**(table.schema.metadata or {}), PREDICT_METADATA: json.dumps(predict_settings(cfg, config)).encode()}
    path = write_predictions(store, table.replace_schema_metadata(meta))
    info(f"{model_id} {split}: {len(ids)} slides x {p.repeats} repeats -> {path}")
    return path


def wsi_section(config: dict):
    """The training settings (WSITrainConfig) a slide model's config.json records."""
    from radpath_fs.config import WSITrainConfig, validate_stored

    return validate_stored(WSITrainConfig, config["wsi"], f"{model_config_path(config['model_id'])}: wsi")
