"""`radpath bundle export --store S [--ensemble ID] --out B`: pack an ensemble of
`tables/ensembles.parquet` (default: the primary one) into the folder B (its layout:
`radpath_fs.bundle.format`).

Methods that are a vote of members (soft_vote, prune, greedy, exhaustive: weighted soft votes;
hard_vote) are packed; stacking (stack_lr, stack_xgb) is refused for now.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from pathlib import Path

import numpy as np

from radpath_fs import CLASSES, __version__
from radpath_fs.bundle.format import FORMAT, FORMAT_VERSION
from radpath_fs.errors import ConfigError, InputError, RadpathError, StoreError
from radpath_fs.layout import (
    BUNDLE_EMBEDDERS,
    BUNDLE_JSON,
    ENSEMBLES_TABLE,
    LAYOUT_VERSION,
    MODEL_FILES,
    MODEL_WEIGHTS,
    MODELS,
    STORE_JSON,
    TILES,
    TILES_TABLE,
    model_config_path,
    model_dir,
    prediction_table_name,
)
from radpath_fs.progress import info, warn
from radpath_fs.store import Store, mag_key
from radpath_fs.weights import sha256_file

# Methods whose fused probability is a vote of the members with the weights in ensembles.parquet.
VOTE_METHODS = ("soft_vote", "hard_vote", "prune", "greedy", "exhaustive")


def choose_ensemble(store: Store, ensemble_id: str | None) -> dict:
    """A row of tables/ensembles.parquet: by id, else by experiment name (latest), else the primary
    (`fusion.cli.primary_id`, as the report and the run summary take it)."""
    from radpath_fs.fusion.cli import primary_id

    if not store.has_table(ENSEMBLES_TABLE):
        raise StoreError(f"{store.path(store.table_rel(ENSEMBLES_TABLE))}: no ensembles; run `radpath fuse` first")
    table = store.read_table(ENSEMBLES_TABLE).sort_values("created", ascending=False, kind="stable")
    if ensemble_id is None:
        rows = table[table["primary"]]
        chosen = primary_id(table)
        what = "primary ensemble"
    else:
        rows = table[table["id"] == ensemble_id]
        if rows.empty:
            rows = table[table["experiment"] == ensemble_id]
        chosen = None if rows.empty else rows["id"].iloc[0]
        what = f"ensemble {ensemble_id!r}"
    if rows.empty:
        raise RadpathError(f"{store.path(store.table_rel(ENSEMBLES_TABLE))}: no {what}; ensembles are "
                           f"{', '.join(table['id'])}")
    if len(rows) > 1:
        warn(f"{len(rows)} rows match the {what} (several `radpath fuse` runs); taking the latest, {chosen}")
    row = table[table["id"] == chosen].iloc[0].to_dict()
    for key in ("members", "candidates", "weights"):
        row[key] = None if row[key] is None else [x.item() if hasattr(x, "item") else x for x in row[key]]
    return row


def _member_models(store: Store, member) -> tuple[list[str], dict[str, dict]]:
    """The models that give a member's val/test probability, and every model's config.json.

    As fusion does for unlabelled rows: the model(s) trained on every case (fold -1) where there is
    one, else the mean over the fold models.
    """
    from radpath_fs.predict import model_config

    configs = {m: model_config(store, m) for m in member.model_ids}
    full = [m for m, c in configs.items() if int(c.get("fold", 0)) < 0]
    chosen = full or sorted(configs)
    return chosen, {m: configs[m] for m in chosen}


def _recorded_settings(store: Store, name: str) -> dict:
    """The predict settings a prediction table records in its schema metadata."""
    import pyarrow.parquet as pq

    from radpath_fs.predict import PREDICT_METADATA

    where = store.path(store.table_rel(name))
    with store.fs.open(where, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if PREDICT_METADATA not in meta:
        raise ConfigError(f"{where}: records no predict settings; rerun `radpath predict`")
    return json.loads(meta[PREDICT_METADATA])


def _recorded_tables(store: Store, configs: dict[str, dict]) -> list[tuple[str, str, dict]]:
    """(model id, table path, the settings the table records) of each prediction table of these models."""
    tables = []
    for mid in sorted(configs):
        for split in ("val", "test", "oof"):
            name = prediction_table_name(mid, split)
            if store.has_table(name):
                tables.append((mid, store.path(store.table_rel(name)), _recorded_settings(store, name)))
    return tables


def _recorded_config(tables: list[tuple[str, str, dict]], owners: dict[str, str]):
    """A PipelineConfig with the seed and predict settings the slide models' prediction tables record
    (defaults for what none records). Members whose tables disagree are a ConfigError naming both."""
    from radpath_fs.config import PipelineConfig, PredictConfig

    seen: dict[str, tuple[object, str, str]] = {}  # setting -> (value, member, table)
    for mid, where, recorded in tables:
        for key, value in sorted(recorded.items()):
            first = seen.setdefault(key, (value, owners[mid], where))
            if first[0] != value:
                who = (f"members {first[1]} and {owners[mid]}" if first[1] != owners[mid]
                       else f"the models of member {first[1]}")
                raise ConfigError(f"{who} were predicted with other settings: "
                                  f"{key}={first[0]!r} ({first[2]}) and {value!r} ({where}); rerun `radpath "
                                  "predict` for one of them")
    settings = {k: v for k, (v, _, _) in seen.items()}
    seed = settings.pop("seed", 0)
    return PipelineConfig(seed=seed, predict=PredictConfig(**settings))


def _check_predict_settings(tables: list[tuple[str, str, dict]], configs: dict[str, dict], cfg) -> None:
    """A config other than the one `radpath predict` used would give other numbers than the fused
    rows: refused here, naming the setting and the table, rather than found out later."""
    from radpath_fs.predict import predict_settings

    for mid, where, recorded in tables:
        expected = predict_settings(cfg, configs[mid])
        for key in sorted(expected.keys() | recorded.keys()):
            if recorded.get(key) != expected.get(key):
                section = "" if key == "seed" else "predict."
                raise ConfigError(f"{where}: predicted with {section}{key}={recorded.get(key)!r}, the config says "
                                  f"{expected.get(key)!r}; pass the pipeline config `radpath predict` used (--config)")


def _tile_recipe(store: Store, wsi_configs: dict[str, dict], cfg) -> dict:
    """The tile config the store's slides were tiled with, for the magnifications a case needs.

    The recipe (tile size, codec, background rule, kernel) is read from the tile groups' attrs. The
    magnifications are every one the store tiled down to the coarsest member's: a level is reduced
    from a finer one, and the chain of reductions decides its pixels.
    """
    from radpath_fs.config import TileConfig
    from radpath_fs.tilestore import tile_group_attrs

    mags = sorted({float(c["magnification"]) for c in wsi_configs.values()}, reverse=True)
    attrs = None
    for c in wsi_configs.values():
        for case in c.get("train_cases") or []:
            if store.group_is_complete(TILES, f"{case}/{mag_key(c['magnification'])}"):
                attrs = tile_group_attrs(store, case, float(c["magnification"]))
                break
        if attrs is not None:
            break
    if attrs is None:
        raise StoreError(f"{store.path(TILES)}: no complete tile group of the members' training cases; "
                         "the tile recipe cannot be read")
    tiled = (sorted(set(store.read_table(TILES_TABLE, columns=["magnification"])["magnification"].astype(float)))
             if store.has_table(TILES_TABLE) else list(cfg.tile.magnifications))
    chain = sorted({m for m in [*tiled, *mags] if m >= min(mags)}, reverse=True)
    level = {"jpeg": "jpeg_quality", "zstd": "zstd_level"}[attrs["codec"]]
    recipe = {k: attrs[k] for k in ("tile_size", "codec", "background_threshold", "background_fraction",
                                    "downsample_kernel")}
    return TileConfig.model_validate({**cfg.tile.model_dump(mode="json"), **recipe,
                                      level: attrs["compression_level"], "magnifications": chain}).model_dump(mode="json")


def _training_embedding_attrs(store: Store, eid: str, config: dict) -> dict | None:
    """The attributes of the store's embeddings of one of a model's training cases, if any are complete."""
    from radpath_fs.embeddings import embedding_attrs, embedding_is_complete

    mag = float(config["magnification"])
    case = next((k for k in config.get("train_cases") or [] if embedding_is_complete(store, eid, k, mag)), None)
    return None if case is None else embedding_attrs(store, eid, case, mag)


def _embedder_record(store: Store, eid: str, configs: list[dict], out: Path) -> dict:
    """A head-mode model's embedder: its config, its weights and, per magnification, the transform
    its models were trained on.

    The weights are always shipped (embedders/<id>/model.safetensors): rebuilt elsewhere, random
    ones depend on that machine's timm and torch versions and pretrained ones on timm's source.
    """
    from safetensors.torch import save_file

    from radpath_fs.config import EmbedConfig
    from radpath_fs.embedders import embedder_record, timm_model, weights_hash
    from radpath_fs.normstats import calibration_hash, store_embedder

    first = configs[0]
    embed = dict(first["embed"])
    record = {"id": eid, "name": embed["name"], "weights_hash": first["embedder"]["weights_hash"],
              "seed": embed["seed"], "embed": embed, "file": f"{BUNDLE_EMBEDDERS}/{eid}/{MODEL_WEIGHTS}", "transform": {}}
    for c in configs:
        mk = mag_key(float(c["magnification"]))
        trained_on = c["embedding_transform"]
        if record["transform"].setdefault(mk, trained_on) != trained_on:
            raise StoreError(f"{store.path(model_config_path(c['model_id']))}: trained on embeddings made "
                             f"with transform {trained_on} at {mk}x, another member model on "
                             f"{record['transform'][mk]} (the store was embedded again between them); retrain "
                             "them with `radpath train-wsi`")
    ecfg = EmbedConfig.model_validate(embed)
    weights = ecfg.weights_file
    # A random embedder's batch-norm statistics are the store's (estimated from its tiles): the
    # models must have been trained on embeddings made with the ones shipped.
    record["calibration"] = calibration_hash(store, ecfg)
    stale = [c["model_id"] for c in configs if c.get("embedding_calibration") != record["calibration"]]
    if stale:
        raise StoreError(f"{store.path(MODELS)}: {', '.join(stale)} trained on embeddings made with other batch-norm "
                         f"statistics of embedder {eid} than the store holds now ({record['calibration']}); retrain "
                         "them with `radpath train-wsi`")
    if weights:
        if not Path(weights).is_file():
            raise InputError(weights, f"weights file of embedder {eid} not found; the bundle needs it")
        if weights_hash(weights) != record["weights_hash"]:
            raise InputError(weights, f"weights changed since the embeddings were made (hash {weights_hash(weights)}, "
                                      f"embedder {eid} was {record['weights_hash']})")
    elif (made := _training_embedding_attrs(store, eid, first)) is not None:
        # Rebuilt here from the name (and seed): the same weights only with the versions that embedded.
        now = embedder_record(ecfg)
        changed = [f"{k} {made.get(k)} then, {now[k]} now" for k in ("timm_version", "torch_version")
                   if made.get(k) not in (None, now[k])]
        if changed:
            warn(f"embedder {eid}: {'; '.join(changed)}; its rebuilt weights may not be those that made the "
                 "embeddings (export on the machine that embedded the store)")
    # The timm model under any read-out: predict-case loads the file as embed.weights, which hold its keys.
    model = timm_model(store_embedder(store, ecfg))
    path = out / record["file"]
    path.parent.mkdir(parents=True)
    # Clones: safetensors refuses tensors that share memory.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    record["sha256"] = sha256_file(path)
    return record


def export_bundle(store_url: str | Store, ensemble_id: str | None, out: str | Path, *, config=None) -> Path:
    """`radpath bundle export`: pack an ensemble (default: the primary one) into the folder `out`.

    The predict settings and seed (what makes predict-case give the same numbers) are those the
    members' prediction tables record; `config`, the PipelineConfig `radpath predict` ran with, must
    agree with them. Returns `out`.
    """
    from radpath_fs.fusion.io import load_fusion_data
    from radpath_fs.training import config_json

    store = store_url if isinstance(store_url, Store) else Store(store_url)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_JSON).is_file())):
        raise InputError(out, "exists and is not a bundle; refusing to overwrite it")
    row = choose_ensemble(store, ensemble_id)
    if row["method"] not in VOTE_METHODS:
        raise RadpathError(
            f"ensemble {row['id']} uses method {row['method']!r}, a learned stacker over every member's "
            f"probabilities; bundles pack votes of members only ({', '.join(VOTE_METHODS)}). Pick another "
            "ensemble with --ensemble (`radpath query \"SELECT id, method FROM ensembles\"`)")
    by_name = {m.name: m for m in load_fusion_data(store).members}
    lost = [n for n in row["members"] if n not in by_name]
    if lost:
        raise StoreError(f"{store.path(store.table_rel(ENSEMBLES_TABLE))}: ensemble {row['id']} names member(s) "
                         f"{', '.join(lost)} that the prediction tables no longer hold; rerun `radpath fuse`")
    weights = row["weights"] or [1.0 / len(row["members"])] * len(row["members"])

    tmp = out.parent / f".tmp-{uuid.uuid4().hex}-{out.name}"
    tmp.mkdir(parents=True)
    try:
        members, configs, owners = [], {}, {}
        for name, weight in zip(row["members"], weights, strict=True):
            m = by_name[name]
            chosen, cfgs = _member_models(store, m)
            configs.update(cfgs)
            owners.update(dict.fromkeys(cfgs, name))
            entry = {"name": name, "modality": m.modality, "magnification": m.magnification,
                     "snapshot": m.snapshot, "weight": float(weight), "model_ids": chosen,
                     "folds": [int(cfgs[i]["fold"]) for i in chosen]}
            if m.modality == "wsi":
                entry["mode"] = cfgs[chosen[0]]["mode"]
            else:
                from radpath_fs.mri.preprocess import check_preprocess_version

                for i in chosen:
                    check_preprocess_version(store.path(model_config_path(i)), cfgs[i])
                mri = cfgs[chosen[0]]["mri"]
                entry["mri"] = {"preprocess_version": cfgs[chosen[0]]["preprocess_version"], "modalities": mri["modalities"],
                                "spatial_size": mri["spatial_size"], "network": mri["network"]}
            members.append(entry)
        wsi = {i: c for i, c in configs.items() if c["modality"] == "wsi"}
        tables = _recorded_tables(store, wsi)
        cfg = config or _recorded_config(tables, owners)
        _check_predict_settings(tables, wsi, cfg)
        for mid in sorted(configs):
            (tmp / model_dir(mid)).mkdir(parents=True)
            for fname in MODEL_FILES:
                (tmp / model_dir(mid) / fname).write_bytes(store.fs.cat_file(store.path(model_dir(mid), fname)))
        embedders = {}
        for eid in sorted({c["embedder"]["id"] for c in wsi.values() if c["mode"] == "head"}):
            group = [{**c, "model_id": i} for i, c in sorted(wsi.items())
                     if c["mode"] == "head" and c["embedder"]["id"] == eid]
            embedders[eid] = _embedder_record(store, eid, group, tmp)
        (tmp / STORE_JSON).write_text(json.dumps({"layout_version": LAYOUT_VERSION, "kind": "bundle"}))
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        spec = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "radpath_fs_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source_store": store.url,
            "classes": list(CLASSES),
            "ensemble": {k: row[k] for k in ("id", "experiment", "description", "method", "members")}
            | {"weights": [float(w) for w in weights],
               "metrics": {k: _float(row.get(k)) for k in ("balanced_accuracy", "kappa", "f1_micro",
                                                           "nested_balanced_accuracy", "nested_kappa",
                                                           "nested_f1_micro")},
               "n_cases": int(row["n_cases"])},
            "members": members,
            "seed": int(cfg.seed),
            "predict": config_json(cfg.predict),
            "tile": _tile_recipe(store, wsi, cfg) if wsi else None,
            "embedders": embedders,
            "files": files,
        }
        (tmp / BUNDLE_JSON).write_text(json.dumps(spec, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f["bytes"] for f in files.values())
    info(f"bundle: ensemble {row['id']} ({row['method']}, {len(members)} members, {len(configs)} models, "
         f"{len(embedders)} embedder(s), {size / 2**20:.1f} MiB) -> {out}")
    return out


def _float(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


__all__ = ["VOTE_METHODS", "choose_ensemble", "export_bundle"]
