"""Off-the-shelf prediction: `radpath bundle export` then `radpath predict-case` on an unlabelled
synthetic case gives the class and probabilities that `radpath predict` + `radpath fuse` gave for
it, writes nothing to the store, and bad bundles or case folders fail with one clear message."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from radpath_fs import CLASSES, MODALITIES
from radpath_fs.bundle import BUNDLE_JSON, export_bundle, predict_case, read_bundle
from radpath_fs.cli import app
from radpath_fs.config import load_config
from radpath_fs.embed import normalization_stats
from radpath_fs.errors import InputError, RadpathError
from radpath_fs.pipeline import run_pipeline
from radpath_fs.store import Store, mag_key

# The chain is the same code on both sides; the slack covers float32 tables and summation order.
ATOL = 1e-5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    pipeline = {
        "name": "bundle", "seed": 0, "store": str(tmp / "store"), "device": "cpu",
        "data": {"root": str(tmp / "data"),
                 "synth": {"cases": 12, "seed": 1, "wsi_size": [2048, 1536], "mri_size": [32, 32, 24],
                           "unlabelled": 2}},
        "ingest": {"folds": 3, "skip_errors": True},
        "tile": {"magnifications": [20, 10]},
        "embed": {"name": "mobilenetv3_small_050", "batch_size": 32},
        "wsi": {"mode": "head", "magnifications": [20, 10], "epochs": 4, "snapshots": [-1, -2], "lr": 1e-3},
        "predict": {"repeats": 3, "tiles_per_slide": 8},
        "mri": {"spatial_size": [32, 32, 32], "network": "densenet121", "init_features": 8, "growth_rate": 4,
                "block_config": [1, 1, 1, 1], "epochs": 2, "snapshots": [-1, -2], "batch_size": 3},
        "fusion": {"method": "prune", "prune": 2, "bootstrap": 20, "ablations": True},
        "report": {"cases_shown": 0},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    cfg = load_config(path)
    run_pipeline(cfg)
    store = Store(cfg.store)
    before = _snapshot(Path(cfg.store))
    bundle = export_bundle(cfg.store, None, tmp / "bundle", config=cfg)
    assert _snapshot(Path(cfg.store)) == before  # export only reads the store
    return tmp, path, cfg, store, bundle


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
    t = store.read_table(f"predictions/{model_id}--val")
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
        assert m["folds"] == [0, 1, 2] and len(m["model_ids"]) == 3  # no fold -1 model: the folds' mean
        for mid in m["model_ids"]:
            assert (bundle / "models" / mid / "model.safetensors").is_file()
    assert spec["predict"]["repeats"] == cfg.predict.repeats and spec["seed"] == cfg.seed
    # Which slide models pruning keeps depends on the training run; the bundle follows the members.
    mags = {store.read_json(f"models/{mid}/config.json")["magnification"]
            for m in spec["members"] for mid in m["model_ids"] if mid.startswith("wsi-")}
    assert mags, "the primary ensemble has no slide model to check"
    # Every tiled magnification down to the coarsest member's: a level is reduced from the finer ones.
    assert spec["tile"]["magnifications"] == [m for m in (20.0, 10.0) if m >= min(mags)]
    assert spec["tile"]["tile_size"] == cfg.tile.tile_size
    (embedder,) = spec["embedders"].values()
    assert embedder["file"] is None and embedder["name"] == "mobilenetv3_small_050" and embedder["seed"] == 0
    assert set(embedder["transform"]) == {mag_key(m) for m in mags}
    for m in mags:  # per magnification: the training tiles' statistics at that magnification
        np.testing.assert_allclose(embedder["transform"][mag_key(m)]["mean"],
                                   normalization_stats(store, cfg.embed, [m])[0], rtol=1e-6)


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

    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no slide and no MRI found") as err:
        predict_case(bundle, empty, device="cpu")
    assert err.value.path == str(empty)
    r = runner.invoke(app, ["predict-case", "--bundle", str(bundle), str(empty)])
    assert r.exit_code == 2 and "no slide and no MRI found" in r.output
