"""`radpath predict-case --bundle B CASE_DIR`: one case end to end with the store's own code.

The slide is tiled (`wsi.tile_case`), embedded (`embed.embed_cases`, with the shipped weights,
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
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radpath_fs import CLASSES, MODALITIES, __version__
from radpath_fs.bundle.format import read_bundle
from radpath_fs.errors import InputError, RadpathError, StoreError
from radpath_fs.layout import BUNDLE_JSON, model_config_path
from radpath_fs.progress import info, warn
from radpath_fs.store import Store, check_name, mag_key

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
    from radpath_fs.embed import embed_cases
    from radpath_fs.embedders import embedder_id
    from radpath_fs.embeddings import embedding_attrs, embedding_is_complete
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
                    trained_on = config["embedding_transform"]
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
    from radpath_fs.mri.preprocess import check_preprocess_version
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
        check_preprocess_version(bstore.path(model_config_path(mid)), bstore.read_json(model_config_path(mid)),
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


__all__ = ["CaseFiles", "find_case", "predict_case"]
