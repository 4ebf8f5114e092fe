"""The MRI branch: cached MONAI preprocessing, the 3D DenseNet, MRI rows in the prediction table."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy import ndimage

from radpath_fs import CLASSES, MODALITIES, training
from radpath_fs.config import MRITrainConfig, PipelineConfig
from radpath_fs.errors import BatchErrors, ConfigError, InputError, RadpathError, StoreError
from radpath_fs.layout import LOCK_NAME, MODELS, MRI_ZARR, RUNS, history_path
from radpath_fs.mri import (
    is_cached,
    predict_mri,
    preprocess_case,
    preprocess_cases,
    read_cached,
    train_mri,
)
from radpath_fs.mri.data import CachedVolumes, EpochBatches, augment_transforms, augment_volume
from radpath_fs.predictions import SCHEMA
from radpath_fs.store import Store
from radpath_fs.training import load_checkpoint, state_meta

# Tumour appearance per class, as (t1, t1ce, t2, flair) factors of the surrounding tissue:
# glioblastoma enhances in t1ce around a necrotic core; astrocytoma and oligodendroglioma do not,
# and differ in flair. Learnable from the four channels together, not from any single one.
TUMOUR = {"G": (0.6, 2.5, 1.6, 1.7), "A": (0.8, 1.0, 1.8, 1.8), "O": (0.8, 1.0, 1.8, 0.6)}
TISSUE = (500.0, 450.0, 300.0, 250.0)
AFFINE = np.array([[1.5, 0, 0, -30], [0, 1.5, 0, -33], [0, 0, 1.5, -27], [0, 0, 0, 1]], dtype=np.float64)
SHAPE = (40, 44, 36)
SMALL = {
    "spatial_size": [32, 32, 32],
    "init_features": 8,
    "growth_rate": 8,
    "block_config": [2, 2, 2],
    "batch_size": 4,
    "eval_batch_size": 8,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny 3D convolutions on a shared 2-core machine: one intra-op thread avoids the OpenMP
    # spin-waiting that makes them 10x slower when the cores are busy.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synth_case(label: str, rng: np.random.Generator, shape=SHAPE) -> dict[str, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = ((grid / rng.uniform(0.75, 0.9, 3)[:, None, None, None]) ** 2).sum(0) <= 1
    centre = rng.uniform(-0.35, 0.35, 3)
    r = rng.uniform(0.3, 0.42)
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    tumour = (dist <= r) & brain
    out = {}
    for m, base, f in zip(MODALITIES, TISSUE, TUMOUR[label], strict=True):
        texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
        v = base * (1 + 0.08 * texture / texture.std())
        v = np.where(tumour, v * f, v)
        if label == "G" and m == "t1ce":
            v = np.where(dist <= 0.55 * r, v / f * 0.6, v)
        out[m] = np.where(brain, v, 0).astype(np.float32)
    return out


def save_case(folder: Path, case_id: str, volumes: dict[str, np.ndarray], affine=AFFINE) -> dict[str, str]:
    folder = folder / case_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m, v in volumes.items():
        p = folder / f"{case_id}_{m}.nii.gz"
        nib.save(nib.Nifti1Image(v, affine), p)
        paths[m] = str(p)
    return paths


def case_row(case_id, label, fold, paths, split=None) -> dict:
    """One row of the cases table as `radpath ingest` writes it."""
    return {
        "case_id": case_id,
        "label": label,
        "split": split or ("train" if label else "val"),
        "fold": fold if label else -1,
        "cohort": None,
        "slide_path": None,
        "slide_width": None,
        "slide_height": None,
        "slide_mpp": None,
        **{f"mri_{m}": paths.get(m) for m in MODALITIES},
        "has_slide": False,
        "has_mri": True,
        "age_in_days": 15000.0,
        "excluded": False,
        "exclusion_reason": None,
    }


def new_store(path: Path, rows: list[dict]) -> Store:
    store = Store(path, create=True)
    store.write_table("cases", pd.DataFrame(rows))
    return store


def store_snapshot(store: Store) -> dict[str, str]:
    root = Path(store.root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def config(**mri) -> PipelineConfig:
    return PipelineConfig.model_validate({"seed": 0, "mri": {**SMALL, **mri}})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    """36 labelled cases (12 per class, folds 0-2 stratified) and 3 unlabelled `val` cases."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(7)
    rows, per_class = [], dict.fromkeys(CLASSES, 0)
    for i in range(36):
        label = ("G", "A", "O")[i % 3]
        cid = f"CASE{i:03d}"
        rows.append(case_row(cid, label, per_class[label] % 3, save_case(root, cid, synth_case(label, rng))))
        per_class[label] += 1
    for i in range(3):
        cid = f"HIDDEN{i:02d}"
        rows.append(case_row(cid, None, -1, save_case(root, cid, synth_case(CLASSES[i], rng))))
    return rows


# ---- preprocessing on the real MNI152 template --------------------------------------------------
@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template()
    t1 = template.get_fdata().astype(np.float32)
    brain = load_mni152_brain_mask().get_fdata() > 0
    inside = t1 > 0
    # Four modalities of different scales and contrasts on the template's grid.
    volumes = {
        "t1": 1000 * t1,
        "t1ce": 400 * t1 + 50 * inside,
        "t2": np.where(inside, 300 * (1.2 - t1), 0).astype(np.float32),
        "flair": 800 * t1**2,
    }
    paths = save_case(tmp_path_factory.mktemp("mni"), "MNI152", volumes, affine=template.affine)
    return paths, brain, inside


def test_mni_template_preprocessing(mni):
    paths, brain, inside = mni
    mcfg = MRITrainConfig()
    volume, record = preprocess_case(paths, mcfg)
    assert volume.shape == (4, 128, 128, 128) and volume.dtype == np.float16

    # The crop's box encloses the brain and little else.
    start, end = np.array(record["crop_start"]), np.array(record["crop_end"])
    vox = np.argwhere(brain)
    lo, hi = vox.min(0), vox.max(0) + 1
    assert (start <= lo).all() and (end >= hi).all(), (start, end, lo, hi)
    assert np.prod(end - start) <= 1.02 * np.prod(hi - lo)
    assert np.prod(end - start) < 0.5 * np.prod(brain.shape)  # the template's field of view is much larger

    # Map each output voxel to its nearest source voxel (trilinear resize, align_corners=False):
    # its 8 interpolation neighbours lie within one voxel (chessboard) of it.
    scale = (end - start) / 128.0
    idx = [np.clip(np.rint(start[a] + (np.arange(128) + 0.5) * scale[a] - 0.5).astype(int), 0, brain.shape[a] - 1)
           for a in range(3)]
    cube = np.ones((3, 3, 3), bool)
    near_brain = ndimage.binary_dilation(inside, structure=cube)[np.ix_(*idx)]
    deep_brain = ndimage.binary_erosion(inside, structure=cube)[np.ix_(*idx)]
    assert (~near_brain).mean() > 0.2  # a real share of the box is background
    for c, m in enumerate(mcfg.modalities):
        v = volume[c].astype(np.float32)
        assert (v[~near_brain] == 0).all(), f"{m}: background is not zero"
        assert (v[deep_brain] != 0).all(), f"{m}: brain voxels were zeroed"
        fg = v[v != 0]
        assert abs(fg.mean()) < 0.01 and abs(fg.std() - 1) < 0.01, (m, fg.mean(), fg.std())
    # Each modality was scaled on its own: t2 has inverted contrast, so it anti-correlates with t1.
    t1, t2 = volume[0].astype(np.float32)[deep_brain], volume[2].astype(np.float32)[deep_brain]
    assert np.corrcoef(t1, t2)[0, 1] < -0.9
    assert record["source_shape"] == list(brain.shape)
    assert record["modalities"] == list(MODALITIES) and record["spatial_size"] == [128, 128, 128]


def test_crop_covers_the_union_of_modalities(tmp_path):
    rng = np.random.default_rng(0)
    vols = {m: np.zeros(SHAPE, np.float32) for m in MODALITIES}
    vols["t1"][5:15, 6:12, 4:10] = rng.uniform(1, 2, (10, 6, 6))  # one corner
    vols["t1ce"][20:30, 30:40, 20:30] = 1.0  # the opposite corner
    vols["t2"][10:25, 10:30, 8:28] = 3.0
    vols["flair"][12:14, 12:14, 12:14] = 5.0
    _, record = preprocess_case(save_case(tmp_path, "U", vols), MRITrainConfig(spatial_size=(16, 16, 16)))
    assert record["crop_start"] == [5, 6, 4] and record["crop_end"] == [30, 40, 30]


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("A", "S", "L")])  # LPS; a sagittal acquisition
def test_every_orientation_is_cached_as_ras(tmp_path, axcodes):
    """The same head stored with its voxel axes flipped or permuted (the affine saying so) is
    cached as the same array: the network sees one orientation whatever the scanner wrote."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    vols = synth_case("G", np.random.default_rng(4))
    ornt = ornt_transform(axcodes2ornt(nib.aff2axcodes(AFFINE)), axcodes2ornt(axcodes))
    other_affine = AFFINE @ inv_ornt_aff(ornt, SHAPE)
    assert nib.aff2axcodes(other_affine) == axcodes
    other = {m: np.ascontiguousarray(apply_orientation(v, ornt)) for m, v in vols.items()}
    rows = [case_row("RAS", "G", 0, save_case(tmp_path, "RAS", vols)),
            case_row("OTHER", "G", 0, save_case(tmp_path, "OTHER", other, affine=other_affine))]
    store = new_store(tmp_path / "store", rows)
    preprocess_cases(store, MRITrainConfig(spatial_size=(16, 16, 16)), store.cases())
    np.testing.assert_array_equal(read_cached(store, "OTHER"), read_cached(store, "RAS"))


# ---- bad inputs ----------------------------------------------------------------------------------
def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _nan(path: str) -> None:
    img = nib.load(path)
    v = img.get_fdata().astype(np.float32)
    v[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(v, img.affine), path)


def _zero(path: str) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), path)


def _shape(path: str) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32)[:, :, :-2], img.affine), path)


def _affine(path: str) -> None:
    img = nib.load(path)
    affine = img.affine.copy()
    affine[0, 3] += 4.0  # shifted by 4 mm: not on t1's grid
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32), affine), path)


def _missing(path: str) -> None:
    Path(path).unlink()


BREAKERS = {
    "missing modality": (_missing, "missing"),
    "shape mismatch": (_shape, "shape"),
    "affine mismatch": (_affine, "affine"),
    "all-zero volume": (_zero, "all zero"),
    "NaN voxels": (_nan, "NaN"),
    "truncated .nii.gz": (_truncate, "truncated"),
}


@pytest.mark.parametrize("kind", list(BREAKERS))
def test_bad_input_is_named_and_store_unchanged(tmp_path, kind):
    rng = np.random.default_rng(1)
    rows = [case_row(f"OK{i}", "G", i, save_case(tmp_path / "data", f"OK{i}", synth_case("G", rng))) for i in range(2)]
    bad_paths = save_case(tmp_path / "data", "BAD", synth_case("A", rng))
    rows.append(case_row("BAD", "A", 0, bad_paths))
    breaker, words = BREAKERS[kind]
    breaker(bad_paths["t1ce"])
    store = new_store(tmp_path / "store", rows)
    before = store_snapshot(store)
    with pytest.raises(InputError) as err:
        train_mri(store.url, config(epochs=1, snapshots=[-1]), fold=0, device="cpu")
    message = str(err.value)
    assert bad_paths["t1ce"] in message and words.lower() in message.lower(), message
    assert "t1ce" in err.value.problem
    # Nothing of the good cases was written either: the batch is checked before any write.
    assert store_snapshot(store) == before
    assert not (Path(store.root) / MRI_ZARR).exists()


def test_several_bad_cases_are_all_reported(tmp_path):
    rng = np.random.default_rng(2)
    a = save_case(tmp_path, "A1", synth_case("A", rng))
    b = save_case(tmp_path, "B1", synth_case("O", rng))
    _nan(a["flair"])
    _truncate(b["t2"])
    store = new_store(tmp_path / "store", [case_row("A1", "A", 0, a), case_row("B1", "O", 1, b)])
    with pytest.raises(BatchErrors) as err:
        preprocess_cases(store, MRITrainConfig(spatial_size=(16, 16, 16)), store.cases())
    assert {e.path for e in err.value.errors} == {a["flair"], b["t2"]}


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    from typer.testing import CliRunner

    from radpath_fs.cli import app

    paths = save_case(tmp_path, "C1", synth_case("O", np.random.default_rng(3)))
    _zero(paths["flair"])
    store = new_store(tmp_path / "store", [case_row("C1", "O", 0, paths)])
    result = CliRunner().invoke(app, ["train-mri", "--store", store.url, "--fold", "0", "--device", "cpu"])
    assert result.exit_code == 2
    assert paths["flair"] in result.output and "all zero" in result.output


# ---- the cache -----------------------------------------------------------------------------------
def test_cache_is_written_once_and_redone_for_another_size(tmp_path, cohort):
    store = new_store(tmp_path / "store", cohort[:3])
    mcfg = MRITrainConfig(spatial_size=(16, 16, 16))
    done = preprocess_cases(store, mcfg, store.cases(), scheduler="threads")
    assert done == ["CASE000", "CASE001", "CASE002"]
    assert all(is_cached(store, c, mcfg) for c in done)
    v = read_cached(store, "CASE001")
    assert v.shape == (4, 16, 16, 16) and v.dtype == np.float16
    stamp = store_snapshot(store)
    assert preprocess_cases(store, mcfg, store.cases()) == []  # complete: skipped
    assert store_snapshot(store) == stamp
    bigger = MRITrainConfig(spatial_size=(24, 24, 24))
    assert not is_cached(store, "CASE001", bigger)
    assert preprocess_cases(store, bigger, store.cases()) == done
    assert read_cached(store, "CASE001").shape == (4, 24, 24, 24)


def test_loader_and_device_augmentation_agree_on_cpu(tmp_path, cohort):
    """The same item seed gives the same augmented volume in a loader worker and on the device."""
    store = new_store(tmp_path / "store", cohort[:4])
    mcfg = MRITrainConfig(**{**SMALL, "zoom_prob": 1.0, "rotate_prob": 1.0, "elastic_prob": 1.0})
    ids = [r["case_id"] for r in cohort[:4]]
    preprocess_cases(store, mcfg, store.cases())
    sampler = EpochBatches(4, 2, seed=5, fold=0)
    sampler.set_epoch(3)
    batches = sampler.batches()
    assert sorted(i for b in batches for i, _ in b) == [0, 1, 2, 3]
    loader_side = CachedVolumes(store.url, ids, augment=mcfg)
    device_aug = augment_transforms(mcfg, torch.device("cpu"))
    for i, seed in batches[0]:
        a, _, s = loader_side[(i, seed)]
        raw = torch.from_numpy(read_cached(store, ids[i]))
        b = augment_volume(device_aug, raw, seed).to(torch.float16)
        assert s == seed and torch.equal(a, b)
        assert not torch.equal(a, raw)  # the transforms did something
    sampler.set_epoch(4)
    assert sampler.batches() != batches  # another epoch, another order and other seeds


def test_loader_workers_fit_in_shared_memory(monkeypatch):
    """Three 4x128^3 float16 volumes are 48 MiB a batch: Docker's default 64 MiB /dev/shm holds no
    worker's queue, so the loader reads in the main process instead of dying of a bus error."""
    from radpath_fs import training
    from radpath_fs.mri.data import make_loader, volume_bytes

    mcfg = MRITrainConfig(spatial_size=[128, 128, 128])
    assert volume_bytes(mcfg) == 2 * 4 * 128**3
    ds = CachedVolumes("unused", ["a", "b"])
    sampler = EpochBatches(2, 3, seed=0, fold=0)
    for free, workers, prefetch in ((2**40, 2, 4), (300 * 2**20, 2, 1), (64 * 2**20, 0, None)):
        monkeypatch.setattr(training, "shm_free_bytes", lambda free=free: free)
        loader = make_loader(ds, batch_sampler=sampler, num_workers=2, item_bytes=volume_bytes(mcfg))
        assert (loader.num_workers, loader.prefetch_factor) == (workers, prefetch)


# ---- training and prediction ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, cohort):
    store = new_store(tmp_path_factory.mktemp("train") / "store", cohort)
    cfg = config(epochs=12, snapshots=[-1, -3], lr=3e-3, elastic_prob=0.0)
    ids = train_mri(store.url, cfg, fold=0, device="cpu", scheduler="threads")
    return store, cfg, ids


def test_training_learns_above_chance(trained):
    store, cfg, ids = trained
    assert ids == ["mri-fold0-e9", "mri-fold0-e11"]
    history = pq.read_table(store.path(history_path("mri-fold0"))).to_pandas()
    assert list(history["epoch"]) == list(range(12))
    last = history.iloc[-1]
    # Chance is 1/3 balanced accuracy and ln 3 = 1.10 weighted cross-entropy on the 12 held-out cases.
    assert last["val_balanced_accuracy"] >= 0.6, history[["epoch", "train_loss", "val_loss", "val_balanced_accuracy"]]
    assert last["val_loss"] < 0.8 * math.log(3)
    assert history["train_loss"].iloc[-3:].mean() < history["train_loss"].iloc[:3].mean()
    state, conf = load_checkpoint(store, "mri-fold0-e11")
    assert conf["modality"] == "mri" and conf["fold"] == 0 and conf["snapshot"] == 11
    assert conf["magnification"] is None and conf["mri"]["spatial_size"] == [32, 32, 32]
    assert conf["precision"] == "fp32" and len(conf["train_cases"]) == 24 and len(conf["heldout_cases"]) == 12
    assert set(conf["heldout_cases"]).isdisjoint(conf["train_cases"])
    assert all(t.dtype == torch.float32 for k, t in state.items() if "num_batches" not in k)


def test_predict_writes_contract_rows(trained, cohort):
    store, cfg, _ = trained
    paths = predict_mri(store, cfg, "mri-fold0-e11", None, "cpu")
    assert [Path(p).name for p in paths] == ["mri-fold0-e11--oof.parquet", "mri-fold0-e11--val.parquet"]
    oof, val = (pq.read_table(p) for p in paths)
    for t in (oof, val):
        for f in SCHEMA:
            assert t.schema.field(f.name).type == f.type, f.name
        df = t.to_pandas()
        assert (df["modality"] == "mri").all() and df["magnification"].isna().all()
        assert (df["snapshot"] == 11).all() and (df["fold"] == 0).all()
        probs = df[[f"prob_{c}" for c in CLASSES]].to_numpy()
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
    oof_df, val_df = oof.to_pandas(), val.to_pandas()
    fold0 = {r["case_id"]: r["label"] for r in cohort if r["label"] and r["fold"] == 0}
    assert dict(zip(oof_df["case_id"], oof_df["label"], strict=True)) == fold0
    assert set(val_df["case_id"]) == {"HIDDEN00", "HIDDEN01", "HIDDEN02"} and val_df["label"].isna().all()
    # The table holds the model's real outputs: its held-out accuracy matches training's last epoch.
    history = pq.read_table(store.path(history_path("mri-fold0"))).to_pandas()
    pred = oof_df[[f"logit_{c}" for c in CLASSES]].to_numpy().argmax(1)
    truth = np.array([CLASSES.index(x) for x in oof_df["label"]])
    per_class = [np.mean(pred[truth == k] == k) for k in range(3)]
    assert np.mean(per_class) == pytest.approx(history.iloc[-1]["val_balanced_accuracy"])
    # `train` = the cases the model was trained on.
    (train_path,) = predict_mri(store.url, cfg, "mri-fold0-e11", ["train"], "cpu")
    train_df = pq.read_table(train_path).to_pandas()
    assert set(train_df["case_id"]) == set(load_checkpoint(store, "mri-fold0-e11")[1]["train_cases"])


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, cohort, monkeypatch):
    rows = [r for r in cohort if r["label"]][:9] + [cohort[-1]]
    cfg = config(epochs=3, snapshots=[-1], elastic_prob=0.5, batch_size=3)
    whole = new_store(tmp_path / "whole", rows)
    train_mri(whole.url, cfg, fold=-1, device="cpu")

    crashed = new_store(tmp_path / "crashed", rows)
    real_save_state = training.save_state

    def crash_after_epoch_1(store, rid, model, optimizer, meta):
        real_save_state(store, rid, model, optimizer, meta)
        if meta["epoch"] == 1:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(training, "save_state", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train_mri(crashed.url, cfg, fold=-1, device="cpu")
    monkeypatch.undo()
    assert not (Path(crashed.root) / "models" / "mri-all-e2").exists()
    assert state_meta(crashed, "mri-all")["epoch"] == 1
    assert not (Path(crashed.root) / LOCK_NAME).exists()  # the lock went with the crash
    train_mri(crashed.url, cfg, fold=-1, device="cpu", resume=True)

    a, _ = load_checkpoint(whole, "mri-all-e2")
    b, conf = load_checkpoint(crashed, "mri-all-e2")
    assert conf["fold"] == -1 and conf["heldout_cases"] == []
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = pq.read_table(whole.path(history_path("mri-all"))).to_pandas()
    hb = pq.read_table(crashed.path(history_path("mri-all"))).to_pandas()
    assert list(ha["train_loss"]) == list(hb["train_loss"])

    # Complete: a rerun trains nothing; --no-resume starts over from the same seed (same weights),
    stamp = store_snapshot(crashed)
    train_mri(crashed.url, cfg, fold=-1, device="cpu")
    assert store_snapshot(crashed) == stamp
    train_mri(crashed.url, cfg, fold=-1, device="cpu", resume=False)
    c, _ = load_checkpoint(crashed, "mri-all-e2")
    assert all(torch.equal(a[k], c[k]) for k in a)
    other = new_store(tmp_path / "other", rows)  # ... and another seed, other weights
    train_mri(other.url, cfg.model_copy(update={"seed": 1}), fold=-1, device="cpu")
    d, _ = load_checkpoint(other, "mri-all-e2")
    assert not all(torch.equal(a[k], d[k]) for k in a)

    # models/ holds the snapshots alone (what predict takes); the run's records are under runs/.
    assert sorted(p.name for p in Path(crashed.path(MODELS)).iterdir()) == ["mri-all-e2"]
    assert sorted(p.name for p in Path(crashed.path(RUNS, "mri-all")).iterdir()) == ["history.parquet",
                                                                                     "state.safetensors"]

    # A model trained on every fold has no out-of-fold rows; default splits = the unlabelled ones,
    # and asking for oof is an error naming the model, as for slide models (test_mil).
    (path,) = predict_mri(crashed, cfg, "mri-all-e2", None, "cpu")
    assert Path(path).name == "mri-all-e2--val.parquet"
    with pytest.raises(RadpathError, match="mri-all-e2: split oof: the model was trained on every fold"):
        predict_mri(crashed, cfg, "mri-all-e2", ["oof"], "cpu")


def test_a_changed_setting_retrains_and_its_predictions_are_redone(tmp_path, cohort, capsys):
    """Snapshots record the fingerprint of the run that made them: the same config trains
    nothing and keeps the prediction tables; another `mri.lr` retrains and drops them."""
    from radpath_fs.mri.train import mri_is_current
    from radpath_fs.predict import pending_predictions

    rows = [r for r in cohort if r["label"]][:9] + [cohort[-1]]
    cfg = config(epochs=2, snapshots=[-1], batch_size=3, elastic_prob=0.0)
    store = new_store(tmp_path / "store", rows)
    (model_id,) = train_mri(store.url, cfg, fold=0, device="cpu")
    tables = predict_mri(store, cfg, model_id, None, "cpu")
    assert len(tables) == 2 and pending_predictions(store) == []

    stamp = store_snapshot(store)
    capsys.readouterr()
    assert mri_is_current(store, cfg, fold=0)
    train_mri(store.url, cfg, fold=0, device="cpu")
    assert "nothing to train" in " ".join(capsys.readouterr().err.split())
    assert store_snapshot(store) == stamp

    changed = config(epochs=2, snapshots=[-1], batch_size=3, elastic_prob=0.0, lr=cfg.mri.lr * 10)
    assert not mri_is_current(store, changed, fold=0)
    before, conf_before = load_checkpoint(store, model_id)
    assert train_mri(store.url, changed, fold=0, device="cpu") == [model_id]
    err = " ".join(capsys.readouterr().err.split())
    assert f"{model_id}: trained with another config or case list; retraining" in err
    after, conf_after = load_checkpoint(store, model_id)
    assert conf_after["mri"]["lr"] == changed.mri.lr
    assert conf_after["training_fingerprint"] != conf_before["training_fingerprint"]
    assert not all(torch.equal(before[k], after[k]) for k in before)
    assert not any(Path(p).exists() for p in tables) and pending_predictions(store) == [model_id]
    assert mri_is_current(store, changed, fold=0) and not mri_is_current(store, cfg, fold=0)

    # A stored config another version wrote is an error naming that file and the key.
    conf = Path(store.path("models", model_id, "config.json"))
    good = json.loads(conf.read_text())
    conf.write_text(json.dumps({**good, "mri": {**good["mri"], "bogus": 1}}))
    with pytest.raises(ConfigError, match=r"models/mri-fold0-e1/config\.json: mri: bogus: unknown key"):
        predict_mri(store, changed, model_id, None, "cpu")
    conf.write_text(json.dumps(good))
    # A model of the preprocessing before RAS reorientation is retrained, and never predicts.
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "preprocess_version": 1}))
    assert not mri_is_current(store, changed, fold=0)
    with pytest.raises(StoreError, match="preprocessing version 1.*retrain it with `radpath train-mri`"):
        predict_mri(store, changed, model_id, None, "cpu")
    capsys.readouterr()
    train_mri(store.url, changed, fold=0, device="cpu")
    assert "made with preprocess_version 1, now 2; retraining" in " ".join(capsys.readouterr().err.split())
    # A case that failed preprocessing in a `skip_errors` run and was mended since is not cached:
    # train_mri must look at it (it joins the training cases), so the run is not current.
    t1 = Path(rows[0]["mri_t1"])
    good = t1.read_bytes()
    shutil.rmtree(store.path(MRI_ZARR, str(rows[0]["case_id"])))
    t1.write_bytes(good[:100])
    train_mri(store.url, changed, fold=0, device="cpu", skip_errors=True)
    t1.write_bytes(good)
    assert not mri_is_current(store, changed, fold=0, skip_errors=True)
    capsys.readouterr()
    train_mri(store.url, changed, fold=0, device="cpu", skip_errors=True)
    assert "trained with another config or case list; retraining" in " ".join(capsys.readouterr().err.split())
    assert str(rows[0]["case_id"]) in load_checkpoint(store, model_id)[1]["train_cases"] + \
        load_checkpoint(store, model_id)[1]["heldout_cases"]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_resumed_optimizer_state_keeps_the_channels_last_layout(tmp_path, impl):
    """Runtime uses channels_last_3d on CUDA only, so the layout is set by hand: after a state
    round trip Adam's tensors have their parameter's strides and the next step is the same."""

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Conv3d(2, 3, 3).to(memory_format=torch.channels_last_3d)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, **{impl: True})

    x = torch.randn(2, 2, 5, 5, 5, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last_3d)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    store = Store(tmp_path / "store", create=True)
    whole, whole_opt = model_and_optimizer()
    step(whole, whole_opt)
    training.save_state(store, "run", whole, whole_opt, {})
    step(whole, whole_opt)

    resumed, resumed_opt = model_and_optimizer()
    model_sd, optim_sd, _ = training.load_state(store, "run")
    resumed.load_state_dict(model_sd)
    training.restore_optimizer(resumed_opt, optim_sd)
    for p in resumed.parameters():
        for name, v in resumed_opt.state[p].items():
            assert v.shape != p.shape or v.stride() == p.stride(), (name, v.stride(), p.stride())
    step(resumed, resumed_opt)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


def test_gpu_benchmark_runs_on_cpu_with_tiny_sizes(tmp_path):
    """`make bench-gpu`'s MRI part, as a smoke test: every measurement runs and is reported."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_mri", Path(__file__).parent / "benchmarks" / "gpu_mri.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(tmp_path, device="cpu", cases=4, spatial=32, batch=2, epochs=2, bare_steps=1, warmup=1,
                       init_features=8, growth_rate=8, block_config=[2, 2, 2, 2], augment_modes=["device", "loader"])
    assert (tmp_path / "gpu_mri.json").exists()
    assert result["ceiling_volumes_per_s"] > 0 and result["ratio"] > 0
    for mode in ("device", "loader"):
        assert result[f"train_{mode}"]["volumes_per_s"] > 0 and result[f"loader_{mode}"]["volumes_per_s"] > 0
        assert len(result[f"train_{mode}"]["per_epoch_volumes_per_s"]) == 2


def test_group_norm_and_a_last_block_on_single_voxels(capsys):
    from radpath_fs.errors import ConfigError
    from radpath_fs.mri.train import build_network, check_network, last_block_size

    net = build_network(MRITrainConfig(**{**SMALL, "norm": "group", "norm_groups": 2}))
    kinds = {type(m).__name__ for m in net.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    with pytest.raises(ConfigError, match="mri.norm_groups 3"):
        check_network(MRITrainConfig(norm="group", norm_groups=3))
    # DenseNet169's four blocks at 128^3: a 4^3 last map; at 32^3 one voxel, which is said.
    assert last_block_size(MRITrainConfig()) == (4, 4, 4)
    four = MRITrainConfig(spatial_size=(32, 32, 32), init_features=8, growth_rate=4, block_config=(1, 1, 1, 1))
    check_network(four)
    assert "1x1x1 map" in capsys.readouterr().err
    check_network(four.model_copy(update={"block_config": (1, 1, 1)}))
    assert capsys.readouterr().err == ""


def test_an_in_process_loader_reads_each_volume_once_when_kept(tmp_path, cohort, monkeypatch):
    from radpath_fs.mri import data as mri_data

    store = new_store(tmp_path / "store", cohort[:4])
    preprocess_cases(store, MRITrainConfig(spatial_size=(16, 16, 16)), store.cases())
    ids = [r["case_id"] for r in cohort[:4]]
    reads = []
    monkeypatch.setattr(mri_data, "read_cached", lambda st, c: reads.append(c) or read_cached(st, c))
    kept = CachedVolumes(store.url, ids, keep=True)
    first = [kept[i][0] for i in range(4)]
    again = [kept[i][0] for i in range(4)]
    assert reads == ids  # the second pass came from memory
    for i, (a, b) in enumerate(zip(first, again, strict=True)):
        assert torch.equal(a, b) and torch.equal(a, torch.from_numpy(read_cached(store, ids[i])))
    CachedVolumes(store.url, ids)[0]
    CachedVolumes(store.url, ids)[0]
    assert reads[4:] == [ids[0], ids[0]]  # not kept: read at every access


def test_elastic_ranges_are_the_same_deformation_on_any_grid():
    """The configured ranges are in voxels of 128^3; a coarser grid gets them in its own voxels:
    sigma scales with the grid, magnitude with its 2.5th power (smoothed noise and voxel size)."""
    from radpath_fs.mri.data import elastic_on_grid

    paper = MRITrainConfig(spatial_size=(128, 128, 128))
    assert elastic_on_grid(paper) == (tuple(paper.elastic_sigma), tuple(paper.elastic_magnitude))
    sigma, magnitude = elastic_on_grid(MRITrainConfig(spatial_size=(32, 32, 32)))
    assert sigma == pytest.approx((0.25, 2.5))
    assert magnitude == pytest.approx((10 / 32, 200 / 32))
    # Measured: the mean displacement a 32^3 grid draws, in mm, matches what 128^3 draws.
    from monai.networks.layers import GaussianFilter

    def mean_shift_mm(size: int, sig: float, mag: float) -> float:
        gen = torch.Generator().manual_seed(0)
        noise = torch.rand((1, 3, size, size, size), generator=gen) * 2 - 1
        field = GaussianFilter(spatial_dims=3, sigma=sig, truncated=3.0)(noise)[0] * mag
        return float(field.abs().mean()) * (240.0 / size)

    fine = mean_shift_mm(128, 4.0, 100.0)
    coarse = mean_shift_mm(32, 4.0 * 32 / 128, 100.0 * (32 / 128) ** 2.5)
    assert coarse == pytest.approx(fine, rel=0.35)
    assert mean_shift_mm(32, 4.0, 100.0) > 3 * fine  # unscaled, the paper's ranges move a 32^3 grid much further


def test_flip_mirrors_left_right_only():
    vol = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    aug = augment_transforms(MRITrainConfig(spatial_size=(4, 5, 6), flip_prob=1.0, zoom_prob=0, rotate_prob=0,
                                            elastic_prob=0))
    assert torch.equal(augment_volume(aug, vol, seed=1), vol.flip(1))
    never = augment_transforms(MRITrainConfig(spatial_size=(4, 5, 6), flip_prob=0.0, zoom_prob=0, rotate_prob=0,
                                              elastic_prob=0))
    assert torch.equal(augment_volume(never, vol, seed=1), vol)


def test_cosine_rate_is_a_function_of_the_epoch():
    rates = [training.epoch_lr(1e-3, e, 10, "cosine") for e in range(10)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] < 0.03 * 1e-3
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert [training.epoch_lr(1e-3, e, 10, "constant") for e in range(10)] == [1e-3] * 10
