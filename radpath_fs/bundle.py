"""Off-the-shelf prediction: one ensemble packed into a folder, and one case run through it.

`radpath bundle export --store S [--ensemble ID] --out B` packs an ensemble of
`tables/ensembles.parquet` (default: the primary one) into the folder B:

    B/bundle.json                       format version, classes, the ensemble (id, method, members,
                                        weights), each member's models, the tile recipe, the
                                        embedders (name, weights hash, seed, and per magnification
                                        the transform their models were trained on), the predict
                                        settings and seed, each MRI member's preprocessing (its
                                        models' version), and a manifest of every file with its
                                        size and SHA-256
    B/store.json                        so that B opens as a (read-only, models-only) store
    B/models/<model_id>/                model.safetensors + config.json of every member's models
    B/embedders/<embedder_id>/model.safetensors   the embedder of head-mode slide models as the
                                        store's `embed.store_embedder` builds it (always shipped:
                                        random or timm weights rebuilt on another machine could
                                        differ, and a random one's batch-norm statistics come from
                                        the store's tiles)

`radpath predict-case --bundle B CASE_DIR` runs one case end to end with the store's own code:
the slide is tiled (`wsi.tile_case`), embedded (`embed.embed_cases`, with the shipped weights,
uncompiled, in batches sized for one case on the device) and classified by each slide
model with the paper's inference protocol (`predict.slide_votes`: the same per-(model, case)
seeds as `radpath predict`), all in a temporary store that is deleted afterwards; the MRI is
preprocessed (`mri.preprocess_case`) and classified by each DenseNet. Each member's probability is
the mean over its fold models (or its fold -1 model, where there is one), as fusion does for
val/test rows, and the members are fused with the ensemble's own estimator and weights. Nothing
is written to any store or to the bundle.

Case folders (one case; <ID> is the case id, used for the per-case seeds):

    CASE_DIR/<ID>.tiff|.tif|.svs               or  CASE_DIR/Pathology/<ID>.tiff|.tif|.svs
    CASE_DIR/<ID>_{t1,t1ce,t2,flair}.nii.gz    or  CASE_DIR/Radiology/<ID>/<ID>_{t1,...}.nii.gz
    (.nii is read too; either the slide or the MRI may be absent)

Members whose input is absent (no MRI, a slide without tissue or coarser than a member's
magnification) are left out and the others' weights renormalised; the output lists them.
`radpath fuse` fuses only cases that every member predicted, so only complete cases are
comparable with `tables/ensemble_predictions.parquet`.

Methods that are a vote of members (soft_vote, prune, greedy, exhaustive: weighted soft votes;
hard_vote) are packed; stacking (stack_lr, stack_xgb) is refused for now.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radpath_fs import CLASSES, MODALITIES, __version__
from radpath_fs.errors import ConfigError, InputError, RadpathError, StoreError
from radpath_fs.layout import (
    BUNDLE_EMBEDDERS,
    BUNDLE_JSON,
    EMBEDDINGS,
    ENSEMBLES_TABLE,
    LAYOUT_VERSION,
    MODEL_FILES,
    MODEL_WEIGHTS,
    MODELS,
    STORE_JSON,
    TILES_TABLE,
    model_config_path,
    prediction_table_name,
)
from radpath_fs.progress import info, warn
from radpath_fs.store import Store, check_name, mag_key
from radpath_fs.weights import sha256_file

FORMAT = "radpath-bundle"
FORMAT_VERSION = 2  # 2: every embedder's weights shipped; MRI members carry their models' preprocess version
# Methods whose fused probability is a vote of the members with the weights in ensembles.parquet.
VOTE_METHODS = ("soft_vote", "hard_vote", "prune", "greedy", "exhaustive")


# ---- export ------------------------------------------------------------------------------------
def choose_ensemble(store: Store, ensemble_id: str | None) -> dict:
    """A row of tables/ensembles.parquet: by id, else by experiment name (latest), else the primary
    (`fusion.cli.primary_id`, as the report and the run summary take it)."""
    from radpath_fs.fusion.cli import primary_id

    if not store.has_table(ENSEMBLES_TABLE):
        raise StoreError(f"{store.path(store.table_rel('ensembles'))}: no ensembles; run `radpath fuse` first")
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
        raise RadpathError(f"{store.path(store.table_rel('ensembles'))}: no {what}; ensembles are "
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


def _preprocess_version(config: dict) -> int:
    # MRI models made before the version was recorded were made with version 1.
    return int(config.get("preprocess_version", 1))


def _check_preprocess_version(where: str, config: dict, then: str = "") -> None:
    """Refuse an MRI model of another preprocessing than this radpath_fs gives a case's volumes."""
    from radpath_fs.mri.preprocess import PREPROCESS_VERSION

    made = _preprocess_version(config)
    if made != PREPROCESS_VERSION:
        raise StoreError(f"{where}: its MRI model was trained on version-{made} preprocessing, and this radpath_fs "
                         f"preprocesses with version {PREPROCESS_VERSION}; retrain with `radpath train-mri`{then}")


def _recorded_settings(store: Store, name: str) -> dict | None:
    """The predict settings a prediction table records in its schema metadata; None for a table
    written before they were recorded."""
    import pyarrow.parquet as pq

    from radpath_fs.predict import PREDICT_METADATA

    with store.fs.open(store.path(store.table_rel(name)), "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return json.loads(meta[PREDICT_METADATA]) if PREDICT_METADATA in meta else None


def _recorded_config(store: Store, configs: dict[str, dict], owners: dict[str, str], required: bool):
    """A PipelineConfig with the seed and predict settings the slide models' prediction tables record
    (defaults for what none records); None where a table records none and they are not `required`.
    Members whose tables disagree are a ConfigError naming both."""
    from radpath_fs.config import PipelineConfig, PredictConfig

    seen: dict[str, tuple[object, str, str]] = {}  # setting -> (value, member, table)
    for mid in sorted(configs):
        for split in ("val", "test", "oof"):
            name = prediction_table_name(mid, split)
            if not store.has_table(name):
                continue
            where = store.path(store.table_rel(name))
            recorded = _recorded_settings(store, name)
            if recorded is None:
                if required:
                    raise ConfigError(f"{where}: records no predict settings (an earlier radpath_fs wrote it); rerun "
                                      "`radpath predict`, or pass the pipeline config it used (--config)")
                return None
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


def _check_predict_settings(store: Store, configs: dict[str, dict], cfg) -> None:
    """A config other than the one `radpath predict` used would give other numbers than the fused
    rows: refused here, naming the setting and the table, rather than found out later."""
    from radpath_fs.predict import predict_settings

    unchecked = []
    for mid in sorted(configs):
        wanted = predict_settings(cfg, configs[mid])
        for split in ("val", "test", "oof"):
            name = prediction_table_name(mid, split)
            if not store.has_table(name):
                continue
            where = store.path(store.table_rel(name))
            recorded, expected = _recorded_settings(store, name), wanted
            if recorded is None:
                # An older radpath_fs recorded only the repeats, as a column.
                unchecked.append(where)
                df = store.read_table(name)
                if "repeats" not in df or not len(df):
                    continue
                recorded, expected = {"repeats": int(df["repeats"].iloc[0])}, {"repeats": cfg.predict.repeats}
            for key in sorted(expected.keys() | recorded.keys()):
                if recorded.get(key) != expected.get(key):
                    section = "" if key == "seed" else "predict."
                    raise ConfigError(f"{where}: predicted with {section}{key}={recorded.get(key)!r}, the config says "
                                      f"{expected.get(key)!r}; pass the pipeline config `radpath predict` used (--config)")
    if unchecked:
        warn(f"{len(unchecked)} prediction table(s) made by an earlier radpath_fs record no predict settings: "
             f"the config's seed and predict settings other than the repeats cannot be checked against them (first: {unchecked[0]}); "
             "rerun `radpath predict` to record them")


def _tile_recipe(store: Store, wsi_configs: dict[str, dict], cfg) -> dict:
    """The tile config the store's slides were tiled with, for the magnifications a case needs.

    The recipe (tile size, codec, background rule, kernel) is read from the tile groups' attrs. The
    magnifications are every one the store tiled down to the coarsest member's: a level is reduced
    from a finer one, and the chain of reductions decides its pixels.
    """
    from radpath_fs.config import TileConfig
    from radpath_fs.tilestore import TILES, tile_group_attrs

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
    tiled = (sorted(set(store.read_table(TILES_TABLE)["magnification"].astype(float))) if store.has_table(TILES_TABLE)
             else list(cfg.tile.magnifications))
    chain = sorted({m for m in [*tiled, *mags] if m >= min(mags)}, reverse=True)
    level = {"jpeg": "jpeg_quality", "zstd": "zstd_level"}[attrs["codec"]]
    recipe = {k: attrs[k] for k in ("tile_size", "codec", "background_threshold", "background_fraction",
                                    "downsample_kernel")}
    return TileConfig.model_validate({**cfg.tile.model_dump(mode="json"), **recipe,
                                      level: attrs["compression_level"], "magnifications": chain}).model_dump(mode="json")


def _training_embedding_attrs(store: Store, eid: str, config: dict) -> dict | None:
    """The attributes of the store's embeddings of one of a model's training cases, if any are complete."""
    from radpath_fs.embed import embedding_attrs, embedding_is_complete

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
    from radpath_fs.embed import calibration_hash, embedder_record, store_embedder, weights_hash

    first = configs[0]
    embed = dict(first["embed"])
    record = {"id": eid, "name": embed["name"], "weights_hash": first["embedder"]["weights_hash"],
              "seed": embed["seed"], "embed": embed, "file": f"{BUNDLE_EMBEDDERS}/{eid}/{MODEL_WEIGHTS}", "transform": {}}
    unrecorded = []
    for c in configs:
        mk = mag_key(float(c["magnification"]))
        trained_on = c.get("embedding_transform")
        if trained_on is None:  # a model made before it was recorded: the store's embeddings tell
            unrecorded.append(c["model_id"])
            made = _training_embedding_attrs(store, eid, c)
            if made is None:
                raise StoreError(f"{store.path(EMBEDDINGS, eid)}: no complete embeddings of {c['model_id']}'s "
                                 f"training cases at magnification {mk}, and its config.json records no embedding "
                                 "transform; the normalisation cannot be read")
            trained_on = made["transform"]
        if record["transform"].setdefault(mk, trained_on) != trained_on:
            raise StoreError(f"{store.path(model_config_path(c['model_id']))}: trained on embeddings made "
                             f"with transform {trained_on} at {mk}x, another member model on "
                             f"{record['transform'][mk]} (the store was embedded again between them); retrain "
                             "them with `radpath train-wsi`")
    if unrecorded:
        warn(f"{', '.join(unrecorded)}: made by an earlier radpath_fs, which did not record the embedding "
             f"transform; the bundle takes embedder {eid}'s from the store's embeddings")
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
    model = store_embedder(store, ecfg)
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
    from radpath_fs.config import PipelineConfig
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
        raise StoreError(f"{store.path(store.table_rel('ensembles'))}: ensemble {row['id']} names member(s) "
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
                for i in chosen:
                    _check_preprocess_version(store.path(model_config_path(i)), cfgs[i])
                mri = cfgs[chosen[0]]["mri"]
                entry["mri"] = {"preprocess_version": _preprocess_version(cfgs[chosen[0]]), "modalities": mri["modalities"],
                                "spatial_size": mri["spatial_size"], "network": mri["network"]}
            members.append(entry)
        wsi = {i: c for i, c in configs.items() if c["modality"] == "wsi"}
        recorded = _recorded_config(store, wsi, owners, required=config is None)
        cfg = config or recorded or PipelineConfig()
        _check_predict_settings(store, wsi, cfg)
        for mid in sorted(configs):
            (tmp / MODELS / mid).mkdir(parents=True)
            for fname in MODEL_FILES:
                (tmp / MODELS / mid / fname).write_bytes(store.fs.cat_file(store.path(MODELS, mid, fname)))
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


# ---- reading a bundle --------------------------------------------------------------------------
def read_bundle(bundle: str | Path) -> dict:
    """bundle.json, after checking that every file it lists is there, whole and unchanged."""
    bundle = Path(bundle)
    meta = bundle / BUNDLE_JSON
    if not bundle.is_dir():
        raise InputError(bundle, "no such bundle folder (make one with `radpath bundle export`)")
    if not meta.is_file():
        raise InputError(meta, "missing: not a radpath bundle (made by `radpath bundle export`)")
    try:
        spec = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise InputError(meta, f"not readable JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise InputError(meta, f"not a radpath bundle (format {spec.get('format') if isinstance(spec, dict) else None!r})")
    if spec.get("format_version") != FORMAT_VERSION:
        raise InputError(meta, f"bundle format version {spec.get('format_version')!r}; this radpath_fs reads "
                               f"version {FORMAT_VERSION}")
    if list(spec.get("classes", [])) != list(CLASSES):
        raise InputError(meta, f"classes {spec.get('classes')} differ from {list(CLASSES)}")
    for rel, f in spec["files"].items():
        path = bundle / rel
        if not path.is_file():
            raise InputError(path, "missing from the bundle (bundle.json lists it); re-export the bundle")
        if path.stat().st_size != f["bytes"] or sha256_file(path) != f["sha256"]:
            raise InputError(path, "differs from the file bundle.json lists (size or SHA-256); the bundle is "
                                   "damaged, re-export it")
    return spec


# ---- a case folder -----------------------------------------------------------------------------
_MRI_NAME = re.compile(r"^(?P<id>.+)_(?P<mod>t1ce|t1|t2|flair)\.nii(\.gz)?$")
LAYOUTS = ("<ID>.tiff|.tif|.svs or Pathology/<ID>.tiff|.tif|.svs (the slide); "
           "<ID>_{t1,t1ce,t2,flair}.nii.gz or Radiology/<ID>/<ID>_{t1,...}.nii.gz (the MRI)")


@dataclass
class CaseFiles:
    case_id: str
    slide: Path | None
    mri: dict[str, str] | None  # modality -> file, every modality the bundle's MRI members need


def find_case(case_dir: str | Path, modalities: list[str] | None = None) -> CaseFiles:
    """The one case of `case_dir` (see the module doc for the layouts)."""
    from radpath_fs.cohort import SLIDE_SUFFIXES

    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(case_dir, "case folder does not exist")
    slides = [p for d in (case_dir, case_dir / "Pathology") if d.is_dir()
              for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES]
    if len(slides) > 1:
        raise InputError(slides[1], f"a second slide (also {slides[0]}); a case folder holds one case")
    mri_dirs = [case_dir] + (sorted(p for p in (case_dir / "Radiology").iterdir() if p.is_dir())
                             if (case_dir / "Radiology").is_dir() else [])
    found: dict[str, dict[str, Path]] = {}
    for d in mri_dirs:
        for p in sorted(d.iterdir()):
            m = _MRI_NAME.match(p.name)
            if m and p.is_file():
                found.setdefault(m["id"], {}).setdefault(m["mod"], p)
    if len(found) > 1:
        raise InputError(case_dir, f"MRI of several cases ({', '.join(sorted(found))}); a case folder holds one case")
    slide = slides[0] if slides else None
    mri_id, volumes = next(iter(found.items())) if found else (None, {})
    if slide is None and not volumes:
        raise InputError(case_dir, f"no slide and no MRI found; expected {LAYOUTS}")
    case_id = slide.stem if slide is not None else mri_id
    if slide is not None and mri_id is not None and mri_id != case_id:
        raise InputError(next(iter(volumes.values())), f"MRI of case {mri_id}, but the slide is of case {case_id}")
    try:
        check_name(case_id, "case id")
    except StoreError as e:
        raise InputError(slide or next(iter(volumes.values())), str(e)) from None
    mri = None
    if volumes and modalities:
        missing = [m for m in modalities if m not in volumes]
        if missing:
            where = next(iter(volumes.values())).parent
            raise InputError(where / f"{case_id}_{missing[0]}.nii.gz",
                             f"missing MRI modality {missing[0]} (the ensemble's MRI models read {', '.join(modalities)})")
        mri = {m: str(volumes[m]) for m in modalities}
    return CaseFiles(case_id, slide, mri)


# ---- predict-case ------------------------------------------------------------------------------
# Tiles per embedding batch for one case: the training batch may be sized for a bigger device.
CASE_BATCH = {"cpu": 32, "cuda": 256}


def _case_embed_config(bstore: Store, e: dict, dev) -> dict:
    """A bundle embedder's embed config for one case: its shipped weights; never compiled (a compile
    costs more than one case's tiles take, and needs a C compiler that the container lacks); a
    batch sized for the device (in eval mode, embeddings do not depend on it beyond float rounding)."""
    batch = min(int(e["embed"]["batch_size"]), CASE_BATCH["cuda" if dev.type == "cuda" else "cpu"])
    # The shipped copy is not the fetched file its tag and pin name (same tensors, another name).
    return {**e["embed"], "weights": bstore.local_path(e["file"]), "weights_tag": None, "pretrained": False,
            "compile": False, "batch_size": batch}


def _slide_probabilities(bstore: Store, spec: dict, members: list[dict], case: CaseFiles, dev, mpp: float | None,
                         cfg) -> dict[str, dict]:
    """Per slide model: {probabilities, votes, tiles}; models whose magnification has no tissue get none."""
    from radpath_fs.cohort import read_slide_info
    from radpath_fs.config import EmbedConfig, TileConfig, validate_stored
    from radpath_fs.embed import embed_cases, embedder_id, embedding_attrs, embedding_is_complete
    from radpath_fs.mil import load_wsi_model
    from radpath_fs.predict import slide_votes
    from radpath_fs.wsi import tile_case

    slide = read_slide_info(case.slide)
    native = slide.mpp if slide.mpp is not None else mpp
    if native is None:
        raise InputError(case.slide, "µm/px unknown: no Aperio MPP and no TIFF resolution; pass --mpp")
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="radpath-case-") as tmp:
        work = Store(tmp, create=True)
        summary = tile_case({"case_id": case.case_id, "slide_path": str(case.slide), "slide_mpp": float(native)},
                            store_url=work.url, cfg=validate_stored(TileConfig, spec["tile"], f"{bstore.path(BUNDLE_JSON)}: tile"))
        if summary["status"] == "error":
            raise RadpathError(summary["error"])
        for mag, why in summary["skipped"]:
            warn(f"magnification {mag_key(mag)} skipped: {why}")
        work_ids = {}
        for eid, e in spec["embedders"].items():
            ecfg = _case_embed_config(bstore, e, dev)
            work_ids[eid] = embedder_id(EmbedConfig.model_validate(ecfg))
            stats = {mk: (t["mean"], t["std"]) for mk, t in e["transform"].items()}
            # The shipped weights hold the store's batch-norm statistics: its embeddings are made with them.
            embed_cases([case.case_id], store_url=work.url, cfg=ecfg, mag_keys=sorted(stats, key=float),
                        stats=stats, device=str(dev), calibration=e.get("calibration"))
        for member in members:
            for mid in member["model_ids"]:
                model, config = load_wsi_model(bstore, mid, dev)
                if config["mode"] == "head":
                    eid, mag = config["embedder"]["id"], float(config["magnification"])
                    trained_on = config.get("embedding_transform") or spec["embedders"][eid]["transform"][mag_key(mag)]
                    if embedding_is_complete(work, work_ids[eid], case.case_id, mag):
                        made = embedding_attrs(work, work_ids[eid], case.case_id, mag)["transform"]
                        if made != trained_on:
                            raise StoreError(f"{bstore.path(BUNDLE_JSON)}: embedder {eid} made this case's embeddings "
                                             f"at {mag_key(mag)}x with transform {made}, model {mid} was trained on "
                                             f"{trained_on}; re-export the bundle")
                    config = {**config, "embedder": {**config["embedder"], "id": work_ids[eid]}}
                ids, v, tiles = slide_votes(work, cfg, mid, model, config, [case.case_id], dev, "case")
                if ids:
                    out[mid] = {"probabilities": _cast(v["probs"][0]), "votes": v["votes"][0].astype(int).tolist(),
                                "class_vote": CLASSES[int(v["pred"][0])], "tiles": int(tiles[0])}
    return out


def _mri_probabilities(bstore: Store, members: list[dict], case: CaseFiles, device: str) -> dict[str, dict]:
    import torch

    from radpath_fs.config import MRITrainConfig, validate_stored
    from radpath_fs.mri.predict import mri_network
    from radpath_fs.mri.preprocess import preprocess_case
    from radpath_fs.mri.train import predict_logits
    from radpath_fs.predictions import softmax
    from radpath_fs.training import load_checkpoint

    volumes: dict[str, np.ndarray] = {}
    out = {}
    for member in members:
        for mid in member["model_ids"]:
            state, config = load_checkpoint(bstore, mid)
            mcfg = validate_stored(MRITrainConfig, config["mri"], f"{bstore.path(model_config_path(mid))}: mri")
            key = json.dumps([mcfg.modalities, list(mcfg.spatial_size)])
            if key not in volumes:
                volumes[key] = preprocess_case({m: case.mri[m] for m in mcfg.modalities}, mcfg, case.case_id)[0]
            model, rt = mri_network(state, mcfg, device)
            logits = predict_logits(model, [(torch.from_numpy(volumes[key])[None], None, None)], rt)
            out[mid] = {"probabilities": _cast(softmax(logits.astype(np.float64))[0]),
                        "logits": logits[0].astype(float).tolist()}
    return out


def _cast(p: np.ndarray) -> list[float]:
    # As the prediction tables hold them: normalised, then float32.
    p = np.asarray(p, dtype=np.float64)
    return (p / p.sum()).astype(np.float32).astype(np.float64).tolist()


def predict_case(bundle: str | Path, case_dir: str | Path, device: str = "auto", *, mpp: float | None = None) -> dict:
    """`radpath predict-case`: one case folder through a bundle; returns the JSON-able result.

    `mpp`: µm/px of a slide that records none. Writes nothing but a temporary folder it deletes.
    """
    from radpath_fs.config import PipelineConfig, PredictConfig, validate_stored
    from radpath_fs.fusion.methods import HardVote, SoftVote
    from radpath_fs.training import resolve_device

    bundle = Path(bundle)
    spec = read_bundle(bundle)
    dev = resolve_device(device)
    members = spec["members"]
    wsi = [m for m in members if m["modality"] == "wsi"]
    mri = [m for m in members if m["modality"] == "mri"]
    bstore = Store(bundle)
    if spec.get("radpath_fs_version") != __version__:
        warn(f"{bundle / BUNDLE_JSON}: exported by radpath_fs {spec.get('radpath_fs_version')}, this is {__version__}; "
             "its tiling, embedding or preprocessing may have changed since, and the numbers with it")
    for mid in (i for m in mri for i in m["model_ids"]):
        _check_preprocess_version(bstore.path(model_config_path(mid)), bstore.read_json(model_config_path(mid)),
                                  then=", then export the bundle again")
    modalities = sorted({x for m in mri for x in m["mri"]["modalities"]}, key=list(MODALITIES).index)
    case = find_case(case_dir, modalities)
    if (case.slide is None or not wsi) and (case.mri is None or not mri):
        needs = " and ".join(w for w, ms in (("a slide", wsi), ("the MRI", mri)) if ms)
        raise InputError(case_dir, f"the ensemble's members read {needs}, and the folder holds none of it; "
                                   f"expected {LAYOUTS}")
    cfg = PipelineConfig(seed=spec["seed"], predict=validate_stored(PredictConfig, spec["predict"], f"{bstore.path(BUNDLE_JSON)}: predict"))
    info(f"case {case.case_id}: slide {case.slide or '-'}, MRI {'yes' if case.mri else '-'}; "
         f"ensemble {spec['ensemble']['id']} on {dev}")
    models: dict[str, dict] = {}
    if case.slide is not None and wsi:
        models.update(_slide_probabilities(bstore, spec, wsi, case, dev, mpp, cfg))
    if case.mri is not None and mri:
        models.update(_mri_probabilities(bstore, mri, case, str(dev)))

    per_member, present, missing = {}, [], []
    for m in members:
        got = [models[i] for i in m["model_ids"] if i in models]
        if not got:
            missing.append(m["name"])
            continue
        # The mean over the fold models, as fusion arranges val/test rows.
        probs = np.mean([g["probabilities"] for g in got], axis=0)
        present.append((m, probs))
        per_member[m["name"]] = {"weight": m["weight"], "probabilities": dict(zip(CLASSES, probs.tolist(), strict=True)),
                                 "models": {i: models[i] for i in m["model_ids"] if i in models}}
    if not present:
        raise InputError(case_dir, f"no member of ensemble {spec['ensemble']['id']} could run on this case "
                                   f"(members {', '.join(missing)}: no tissue tiles at their magnification?)")
    if missing:
        warn(f"case {case.case_id}: member(s) {', '.join(missing)} have no input here; the others' weights are "
             "renormalised (`radpath fuse` would not fuse an incomplete case)")
    P = np.stack([p for _, p in present])[None]
    method = spec["ensemble"]["method"]
    est = HardVote() if method == "hard_vote" else SoftVote(weights=[m["weight"] for m, _ in present])
    est.fit(P)
    proba = est.predict_proba(P)[0]
    return {
        "case_id": case.case_id,
        "class": CLASSES[int(est.predict(P)[0])],
        "probabilities": dict(zip(CLASSES, proba.astype(float).tolist(), strict=True)),
        "ensemble": {k: spec["ensemble"][k] for k in ("id", "experiment", "method")},
        "members": per_member,
        "missing_members": missing,
        "inputs": {"slide": None if case.slide is None else str(case.slide), "mri": case.mri},
        "device": str(dev),
    }


__all__ = ["CaseFiles", "choose_ensemble", "export_bundle", "find_case", "predict_case", "read_bundle"]
