"""Off-the-shelf prediction: `radpath bundle export` then `radpath predict-case` on an unlabelled
case of the session's finished demo run gives the class and probabilities that `radpath predict` + `radpath fuse` gave for
it, writes nothing to the store, and bad bundles or case folders fail with one clear message."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from radpath_fs import CLASSES, MODALITIES
from radpath_fs.bundle.export import export_bundle
from radpath_fs.bundle.format import BUNDLE_JSON, read_bundle
from radpath_fs.bundle.predict_case import predict_case
from radpath_fs.cli import app
from radpath_fs.config import PredictConfig
from radpath_fs.errors import ConfigError, InputError, RadpathError, StoreError
from radpath_fs.layout import model_config_path, prediction_table_name
from radpath_fs.normstats import normalization_stats
from radpath_fs.predict import PREDICT_METADATA, predict_settings
from radpath_fs.predictions import SCHEMA
from radpath_fs.store import Store, mag_key

# The chain is the same code on both sides; the slack covers float32 tables and summation order.
ATOL = 1e-5


@pytest.fixture(scope="module")
def built(finished, tmp_path_factory):
    """The session's finished demo run and the bundle of its primary ensemble."""
    tmp = tmp_path_factory.mktemp("bundle")
    cfg, store = finished.cfg, finished.store
    before = _snapshot(Path(cfg.store))
    bundle = export_bundle(cfg.store, None, tmp / "bundle", config=cfg)
    assert _snapshot(Path(cfg.store)) == before  # export only reads the store
    return tmp, finished.config, cfg, store, bundle


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _unlabelled(store: Store) -> list[dict]:
    cases = store.cases()
    return cases[cases["label"].isna()].to_dict("records")


def _case_folder(root: Path, case: dict, layout: str, slide: bool = True, mri: bool = True) -> Path:
    """One case, as links to the cohort's files, in the flat or the CPM layout."""
    cid = case["case_id"]
    root.mkdir(parents=True)
    if slide:
        where = root if layout == "flat" else root / "Pathology"
        where.mkdir(exist_ok=True)
        os.symlink(case["slide_path"], where / Path(case["slide_path"]).name)
    if mri:
        where = root if layout == "flat" else root / "Radiology" / cid
        where.mkdir(parents=True, exist_ok=True)
        for m in MODALITIES:
            os.symlink(case[f"mri_{m}"], where / f"{cid}_{m}.nii.gz")
    return root


def _fused(store: Store, ensemble_id: str, case_id: str) -> dict:
    p = store.read_table("ensemble_predictions")
    row = p[(p["ensemble_id"] == ensemble_id) & (p["case_id"] == case_id) & (p["split"] == "val")]
    assert len(row) == 1
    return row.iloc[0].to_dict()


def _model_probs(store: Store, model_id: str, case_id: str) -> np.ndarray:
    t = store.read_table(prediction_table_name(model_id, "val"))
    return t.loc[t["case_id"] == case_id, [f"prob_{c}" for c in CLASSES]].to_numpy(np.float64)[0]


def test_bundle_holds_the_primary_ensemble(built):
    _, _, cfg, store, bundle = built
    spec = read_bundle(bundle)
    ens = store.read_table("ensembles")
    primary = ens[ens["primary"]].iloc[0]
    assert spec["ensemble"]["id"] == primary["id"] and spec["ensemble"]["method"] == "prune"
    assert [m["name"] for m in spec["members"]] == list(primary["members"])
    np.testing.assert_allclose([m["weight"] for m in spec["members"]], primary["weights"])
    for m in spec["members"]:
        folds = list(range(cfg.ingest.folds))  # no fold -1 model: the folds' mean
        assert m["folds"] == folds and len(m["model_ids"]) == len(folds)
        for mid in m["model_ids"]:
            assert (bundle / "models" / mid / "model.safetensors").is_file()
    assert spec["predict"]["repeats"] == cfg.predict.repeats and spec["seed"] == cfg.seed
    # Which slide models pruning keeps depends on the training run; the bundle follows the members.
    mags = {store.read_json(model_config_path(mid))["magnification"]
            for m in spec["members"] for mid in m["model_ids"] if mid.startswith("wsi-")}
    assert mags, "the primary ensemble has no slide model to check"
    # Every tiled magnification down to the coarsest member's: a level is reduced from the finer ones.
    assert spec["tile"]["magnifications"] == [m for m in (20.0, 10.0) if m >= min(mags)]
    assert spec["tile"]["tile_size"] == cfg.tile.tile_size
    (eid, embedder), = spec["embedders"].items()
    assert embedder["name"] == cfg.embed.name and embedder["seed"] == cfg.embed.seed
    # Random weights are shipped too: rebuilt from name + seed elsewhere, they may differ.
    assert embedder["file"] == f"embedders/{eid}/model.safetensors"
    assert spec["files"][embedder["file"]]["sha256"] == embedder["sha256"]
    # ... with the batch-norm statistics the store estimated from its tiles, which made its embeddings.
    from safetensors.torch import load_file

    from radpath_fs.normstats import calibration_hash, calibration_rel
    from radpath_fs.training import load_safetensors_bytes

    shipped = load_file(bundle / embedder["file"])
    calibrated = load_safetensors_bytes(store.fs.cat_file(store.path(calibration_rel(cfg.embed))), "calibration")
    assert shipped.keys() == calibrated.keys() and all(torch.equal(shipped[k], calibrated[k]) for k in shipped)
    assert embedder["calibration"] == calibration_hash(store, cfg.embed) is not None
    assert set(embedder["transform"]) == {mag_key(m) for m in mags}
    for m in mags:  # per magnification: the training tiles' statistics at that magnification
        np.testing.assert_allclose(embedder["transform"][mag_key(m)]["mean"],
                                   normalization_stats(store, cfg.embed, [m])[0], rtol=1e-6)
    for m in spec["members"]:  # the transform is the one the head models were trained on
        for mid in m["model_ids"]:
            config = store.read_json(model_config_path(mid))
            if config.get("mode") == "head":
                assert embedder["transform"][mag_key(config["magnification"])] == config["embedding_transform"]


def test_predict_case_equals_predict_and_fuse(built, tmp_path):
    _, _, _, store, bundle = built
    before, bundle_before = _snapshot(Path(store.url)), _snapshot(bundle)
    spec = read_bundle(bundle)
    for i, case in enumerate(_unlabelled(store)):
        out = predict_case(bundle, _case_folder(tmp_path / f"case{i}", case, "flat"), device="cpu")
        fused = _fused(store, spec["ensemble"]["id"], case["case_id"])
        assert out["case_id"] == case["case_id"] and out["missing_members"] == []
        np.testing.assert_allclose([out["probabilities"][c] for c in CLASSES],
                                   [fused[f"prob_{c}"] for c in CLASSES], atol=ATOL)
        assert out["class"] == fused["pred"]
        for member in spec["members"]:
            got = out["members"][member["name"]]
            assert set(got["models"]) == set(member["model_ids"])
            for mid, model in got["models"].items():
                np.testing.assert_allclose(model["probabilities"], _model_probs(store, mid, case["case_id"]), atol=ATOL)
    assert _snapshot(Path(store.url)) == before and _snapshot(bundle) == bundle_before


def test_cli_greedy_weights_from_a_cpm_layout_folder(built, tmp_path):
    tmp, pipeline, _, store, _ = built
    runner = CliRunner()
    out_dir = tmp_path / "selected"
    r = runner.invoke(app, ["bundle", "export", "--store", store.url, "--ensemble", "selected", "--out", str(out_dir),
                            "--config", str(pipeline)])
    assert r.exit_code == 0, r.output
    spec = read_bundle(out_dir)
    assert spec["ensemble"]["method"] == "greedy"
    case = _unlabelled(store)[1]
    folder = _case_folder(tmp_path / "case", case, "cpm")
    r = runner.invoke(app, ["predict-case", "--bundle", str(out_dir), "--device", "cpu", str(folder)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # messages go to stderr: stdout is the JSON alone
    fused = _fused(store, spec["ensemble"]["id"], case["case_id"])
    np.testing.assert_allclose([out["probabilities"][c] for c in CLASSES], [fused[f"prob_{c}"] for c in CLASSES],
                               atol=ATOL)
    assert out["class"] == fused["pred"] and len(out["members"]) == len(spec["members"])


def test_mri_members_alone_and_a_case_without_a_slide(built, tmp_path):
    _, _, cfg, store, _ = built
    case = _unlabelled(store)[0]
    mri_only = _case_folder(tmp_path / "mri", case, "flat", slide=False)
    # The MRI ablation's ensemble: complete without a slide, so equal to its fused row.
    bundle = export_bundle(store.url, "mri", tmp_path / "b-mri", config=cfg)
    spec = read_bundle(bundle)
    out = predict_case(bundle, mri_only, device="cpu")
    fused = _fused(store, spec["ensemble"]["id"], case["case_id"])
    assert out["missing_members"] == [] and out["class"] == fused["pred"]
    np.testing.assert_allclose([out["probabilities"][c] for c in CLASSES], [fused[f"prob_{c}"] for c in CLASSES],
                               atol=ATOL)
    slide_only = _case_folder(tmp_path / "slide", case, "flat", mri=False)
    with pytest.raises(InputError, match="members read the MRI"):
        predict_case(bundle, slide_only, device="cpu")
    # Every member: the slide members have no input, the MRI members' weights are renormalised.
    bundle = export_bundle(store.url, "all", tmp_path / "b-all", config=cfg)
    spec = read_bundle(bundle)
    out = predict_case(bundle, mri_only, device="cpu")
    mri = [m for m in spec["members"] if m["modality"] == "mri"]
    assert sorted(out["missing_members"]) == sorted(m["name"] for m in spec["members"] if m["modality"] == "wsi")
    P = np.array([np.mean([_model_probs(store, i, case["case_id"]) for i in m["model_ids"]], axis=0) for m in mri])
    w = np.array([m["weight"] for m in mri])
    np.testing.assert_allclose([out["probabilities"][c] for c in CLASSES], (w[:, None] * P).sum(0) / w.sum(),
                               atol=ATOL)


def test_stacking_is_refused_naming_the_method(built, tmp_path):
    _, pipeline, cfg, store, _ = built
    with pytest.raises(RadpathError, match="stack_lr"):
        export_bundle(store.url, "stacked-lr", tmp_path / "stack", config=cfg)
    assert not (tmp_path / "stack").exists()
    r = CliRunner().invoke(app, ["bundle", "export", "--store", store.url, "--ensemble", "no-such-ensemble",
                                 "--out", str(tmp_path / "x"), "--config", str(pipeline)])
    assert r.exit_code == 2 and "no ensemble 'no-such-ensemble'" in r.output


def test_a_damaged_bundle_and_an_empty_case_folder_are_clear_errors(built, tmp_path):
    _, _, _, store, bundle = built
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    spec = json.loads((broken / BUNDLE_JSON).read_text())
    gone = broken / "models" / spec["members"][0]["model_ids"][1] / "model.safetensors"
    gone.unlink()
    case = _case_folder(tmp_path / "case", _unlabelled(store)[0], "flat")
    with pytest.raises(InputError, match="missing from the bundle") as err:
        predict_case(broken, case, device="cpu")
    assert err.value.path == str(gone)
    runner = CliRunner()
    r = runner.invoke(app, ["predict-case", "--bundle", str(broken), str(case)])
    assert r.exit_code == 2 and str(gone) in r.output and r.stdout == ""

    (broken / BUNDLE_JSON).unlink()
    r = runner.invoke(app, ["predict-case", "--bundle", str(broken), str(case)])
    assert r.exit_code == 2 and "not a radpath bundle" in r.output

    older = _edited_copy(bundle, tmp_path / "older", lambda spec: spec.update(format_version=1))
    with pytest.raises(InputError, match="bundle format version 1; .*re-export the bundle"):
        read_bundle(older)

    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no slide and no MRI found") as err:
        predict_case(bundle, empty, device="cpu")
    assert err.value.path == str(empty)
    r = runner.invoke(app, ["predict-case", "--bundle", str(bundle), str(empty)])
    assert r.exit_code == 2 and "no slide and no MRI found" in r.output


def _edited_copy(bundle: Path, dest: Path, edit=None, files: dict[str, bytes] | None = None) -> Path:
    """A copy of a bundle with some files and bundle.json changed, the manifest kept in step."""
    shutil.copytree(bundle, dest)
    spec = json.loads((dest / BUNDLE_JSON).read_text())
    for rel, data in (files or {}).items():
        (dest / rel).write_bytes(data)
        spec["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if edit is not None:
        edit(spec)
    (dest / BUNDLE_JSON).write_text(json.dumps(spec))
    return dest


def _slide_models(spec: dict) -> list[str]:
    return [mid for m in spec["members"] if m["modality"] == "wsi" for mid in m["model_ids"]]


def test_predict_case_embeds_uncompiled_in_case_batches_with_the_shipped_weights(built, tmp_path, monkeypatch):
    from radpath_fs import embed, embedders

    _, _, _, store, bundle = built

    def gpu_training_settings(spec):
        (e,) = spec["embedders"].values()
        e["embed"].update(compile=True, batch_size=4096)

    copy = _edited_copy(bundle, tmp_path / "b", gpu_training_settings)
    made, loaded = [], []
    real_init, real_load = embed.Embedder.__init__, embedders.load_weights

    def init(self, model, device, *, compile=False, batch_size=None):
        assert not compile, "predict-case compiled the embedder (the container has no C compiler)"
        made.append(batch_size)
        real_init(self, model, device, compile=compile, batch_size=batch_size)

    monkeypatch.setattr(embed.Embedder, "__init__", init)
    monkeypatch.setattr(embedders, "load_weights", lambda model, w: (loaded.append(str(w)), real_load(model, w))[1])
    monkeypatch.setattr(embed, "_EMBEDDERS", {})
    case = _unlabelled(store)[0]
    out = predict_case(copy, _case_folder(tmp_path / "case", case, "flat"), device="cpu")
    spec = read_bundle(copy)
    (e,) = spec["embedders"].values()
    assert made == [32] and loaded == [str(copy / e["file"])]  # the shipped weights, not rebuilt from a seed
    for member in spec["members"]:  # the same numbers as `radpath predict`
        for mid, model in out["members"][member["name"]]["models"].items():
            np.testing.assert_allclose(model["probabilities"], _model_probs(store, mid, case["case_id"]), atol=ATOL)


def test_a_transform_other_than_the_models_were_trained_on_is_refused(built, tmp_path):
    _, _, _, store, bundle = built

    def other_statistics(spec):
        (e,) = spec["embedders"].values()
        for t in e["transform"].values():
            t["mean"][0] += 0.01

    copy = _edited_copy(bundle, tmp_path / "b", other_statistics)
    case = _case_folder(tmp_path / "case", _unlabelled(store)[0], "flat")
    with pytest.raises(StoreError, match=r"was trained on .*; re-export the bundle"):
        predict_case(copy, case, device="cpu")


def test_export_refuses_predict_settings_other_than_the_tables_record(built, tmp_path, monkeypatch):
    import radpath_fs.predict as predict_mod

    _, _, cfg, store, bundle = built
    mid = _slide_models(read_bundle(bundle))[0]
    table = store.path(store.table_rel(prediction_table_name(mid, "val")))
    recorded = json.loads(pq.read_schema(table).metadata[PREDICT_METADATA])
    assert recorded == predict_settings(cfg, store.read_json(model_config_path(mid)))
    tiles, repeats = cfg.predict.tiles_per_slide, cfg.predict.repeats
    assert recorded == {"seed": cfg.seed, "repeats": repeats, "tiles_per_slide": tiles}  # head mode: no augmentation, no chunks
    assert pq.read_table(table).schema.names[:len(SCHEMA)] == SCHEMA.names  # the contract's columns as they were

    def other(**settings):
        predict = {k: v for k, v in settings.items() if k != "seed"}
        return cfg.model_copy(update={"seed": settings.get("seed", cfg.seed),
                                      "predict": cfg.predict.model_copy(update=predict)})

    for settings, said in (({"tiles_per_slide": tiles + 1}, f"predict.tiles_per_slide={tiles}"),
                           ({"seed": cfg.seed + 1}, f"seed={cfg.seed}")):
        with pytest.raises(ConfigError, match=said) as err:
            export_bundle(store.url, None, tmp_path / "x", config=other(**settings))
        assert "predictions/wsi-" in str(err.value) and not (tmp_path / "x").exists()
    # A table that records no settings is one error, with or without a config.
    monkeypatch.setattr(predict_mod, "PREDICT_METADATA", b"radpath.unrecorded")
    for config in (cfg, None):
        with pytest.raises(ConfigError, match=r"predictions/wsi-.*records no predict settings.*rerun `radpath predict`"):
            export_bundle(store.url, None, tmp_path / "x", config=config)
        assert not (tmp_path / "x").exists()


def test_mri_models_of_older_preprocessing_are_refused(built, tmp_path, monkeypatch, capsys):
    import radpath_fs.predict as predict_mod
    from radpath_fs.mri.preprocess import PREPROCESS_VERSION

    _, _, cfg, store, _ = built
    bundle = export_bundle(store.url, "mri", tmp_path / "b-mri", config=cfg)
    spec = read_bundle(bundle)
    assert {m["mri"]["preprocess_version"] for m in spec["members"]} == {PREPROCESS_VERSION}
    case = _case_folder(tmp_path / "case", _unlabelled(store)[0], "flat", slide=False)
    mid = spec["members"][0]["model_ids"][0]
    rel = model_config_path(mid)
    old = {**json.loads((bundle / rel).read_text()), "preprocess_version": 1}
    copy = _edited_copy(bundle, tmp_path / "old", files={rel: json.dumps(old).encode()})
    with pytest.raises(StoreError, match=r"preprocessing version 1,.*`radpath train-mri`, then export the bundle again"):
        predict_case(copy, case, device="cpu")

    real = predict_mod.model_config
    for change in ({"preprocess_version": 1}, {"preprocess_version": None}):  # None: a config that records none
        def model_config(store, model_id, change=change):
            config = {**real(store, model_id), **change}
            return {k: v for k, v in config.items() if v is not None}

        monkeypatch.setattr(predict_mod, "model_config", model_config)
        with pytest.raises(StoreError, match=r"its MRI model was trained on preprocessing version (1|None),.*train-mri"):
            export_bundle(store.url, "mri", tmp_path / "x", config=cfg)
        assert not (tmp_path / "x").exists()

    capsys.readouterr()
    other = _edited_copy(bundle, tmp_path / "other", lambda spec: spec.update(radpath_fs_version="0.0.0"))
    predict_case(other, case, device="cpu")
    assert "exported by radpath_fs 0.0.0" in " ".join(capsys.readouterr().err.split())


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    return line


def test_cli_export_without_config_takes_what_the_tables_record(built, tmp_path):
    _, pipeline, cfg, store, bundle = built
    before = _snapshot(Path(store.url))
    r = CliRunner().invoke(app, ["bundle", "export", "--store", store.url, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    spec, ref = read_bundle(tmp_path / "b"), read_bundle(bundle)
    assert spec["seed"] == ref["seed"] == cfg.seed and spec["predict"] == ref["predict"]
    predict = cfg.predict
    assert predict.repeats != PredictConfig().repeats  # so that the pipeline's are told from the defaults
    assert (spec["predict"]["repeats"], spec["predict"]["tiles_per_slide"]) == (predict.repeats, predict.tiles_per_slide)
    # --config stays an override, and one that disagrees with the tables is refused.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(pipeline.read_text()),
                                     "predict": {"repeats": predict.repeats, "tiles_per_slide": predict.tiles_per_slide + 1}}))
    r = CliRunner().invoke(app, ["bundle", "export", "--store", store.url, "--out", str(tmp_path / "c"), "--config", str(other)])
    assert f"predict.tiles_per_slide={predict.tiles_per_slide}" in _one_error(r) and not (tmp_path / "c").exists()
    assert _snapshot(Path(store.url)) == before


def test_members_whose_tables_disagree_are_an_error_naming_them(built, tmp_path):
    _, _, _, store, _ = built
    shutil.copytree(store.url, tmp_path / "store")
    copy = Store(str(tmp_path / "store"))
    spec = read_bundle(export_bundle(copy.url, "all", tmp_path / "all", config=None))
    owner = {mid: m["name"] for m in spec["members"] if m["modality"] == "wsi" for mid in m["model_ids"]}
    first = min(owner)
    changed = min(mid for mid in owner if owner[mid] != owner[first])
    path = copy.path(copy.table_rel(prediction_table_name(changed, "val")))
    table = pq.read_table(path)
    recorded = json.loads(table.schema.metadata[PREDICT_METADATA])
    settings = recorded | {"tiles_per_slide": recorded["tiles_per_slide"] + 1}
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, PREDICT_METADATA: json.dumps(settings)}), path)
    before = _snapshot(tmp_path / "store")
    r = CliRunner().invoke(app, ["bundle", "export", "--store", copy.url, "--ensemble", "all", "--out", str(tmp_path / "x")])
    line = _one_error(r)
    assert f"members {owner[first]} and {owner[changed]}" in line
    assert f"tiles_per_slide={recorded['tiles_per_slide']}" in line and str(settings["tiles_per_slide"]) in line
    assert f"{changed}--val" in line
    assert not (tmp_path / "x").exists() and _snapshot(tmp_path / "store") == before
