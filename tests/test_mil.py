"""Stage two, slides: the pooled-head MIL model, its trainer (head and finetune) and `radpath predict`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from radpath_fs import CLASSES
from radpath_fs.config import PipelineConfig, TileConfig
from radpath_fs.embedders import create_embedder, embedder_id
from radpath_fs.errors import RadpathError, StoreError
from radpath_fs.layout import (
    EMBEDDINGS,
    MODELS,
    PREDICTIONS,
    RUNS,
    TILES,
    history_path,
    model_config_path,
    model_weights_path,
    prediction_table_name,
)
from radpath_fs.mil import BagPool, MILClassifier, PooledHead, WSITrainer, train_wsi
from radpath_fs.predict import model_config, pending_predictions, predict_models
from radpath_fs.predictions import REQUIRED, SCHEMA
from radpath_fs.store import Store, mag_key
from radpath_fs.tilestore import write_tile_group
from radpath_fs.training import state_meta, wsi_run_id
from radpath_fs.transforms import eval_transform

EMBEDDER = "test_efficientnet"  # timm's tiny EfficientNet (L = 256): the code path of efficientnet_b0


def cases_frame(labels, folds, unlabelled: int = 0) -> pd.DataFrame:
    """A cases table with the columns `radpath ingest` writes; unlabelled cases go to split 'val'."""
    n = len(labels) + unlabelled
    return pd.DataFrame({
        "case_id": [f"C{i:03d}" for i in range(n)],
        "label": list(labels) + [None] * unlabelled,
        "split": ["train"] * len(labels) + ["val"] * unlabelled,
        "fold": list(folds) + [-1] * unlabelled,
        "cohort": [None] * n,
        "slide_path": [f"Pathology/C{i:03d}.tiff" for i in range(n)],
        "slide_width": [4096] * n, "slide_height": [3072] * n, "slide_mpp": [0.5] * n,
        "mri_t1": [None] * n, "mri_t1ce": [None] * n, "mri_t2": [None] * n, "mri_flair": [None] * n,
        "has_slide": [True] * n, "has_mri": [False] * n, "age_in_days": [20000.0] * n,
        "excluded": [False] * n, "exclusion_reason": [None] * n,
    })


def write_embeddings(store: Store, eid: str, case: str, mag: float, x: np.ndarray) -> None:
    arr = zarr.create_array(store.zarr_store(EMBEDDINGS), name=f"{eid}/{case}/{mag_key(mag)}",
                            shape=x.shape, dtype="float16", chunks=(max(1, len(x)), x.shape[1]), overwrite=True)
    if len(x):
        arr[...] = x.astype(np.float16)
    arr.attrs.update({"transform": PLANTED_TRANSFORM, "complete": True})


PLANTED_TRANSFORM = {"kind": "planted", "mean": [0.5, 0.5, 0.5]}  # stands for `embed`'s transform record


def planted_store(path, n: int = 60, unlabelled: int = 4, seed: int = 0):
    """Embedding bags: at 20x a tenth of each slide's tiles carry its class in 8 of 64 features;
    at 5x the bags are noise. Bag sizes vary from 20 to 300 tiles."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(list(CLASSES), size=n, p=[0.24, 0.16, 0.60])
    store = Store(path, create=True)
    df = cases_frame(labels, np.arange(n) % 3, unlabelled)
    store.write_table("cases", df)
    cfg = PipelineConfig.model_validate({
        "embed": {"name": EMBEDDER, "weights": "random"}, "wsi": {"mode": "head", "epochs": 30, "lr": 3e-3},
        "predict": {"repeats": 4},
    })
    eid = embedder_id(cfg.embed)
    for case, label in zip(df["case_id"], df["label"], strict=True):
        for mag in (20, 5):
            k = int(rng.integers(20, 300))
            x = rng.normal(size=(k, 64)).astype(np.float32)
            if mag == 20 and not pd.isna(label):
                j = CLASSES.index(label)
                x[rng.random(k) < 0.1, j * 8 : (j + 1) * 8] += 2.0
            write_embeddings(store, eid, case, mag, x)
    return store, cfg


def tile_store(path, n: int = 24, tiles: int = 12, size: int = 48, unlabelled: int = 2, seed: int = 0):
    """Noisy tiles whose class shows as a colour cast (learnable end to end)."""
    rng = np.random.default_rng(seed)
    labels = [CLASSES[i % 3] for i in range(n)]
    store = Store(path, create=True)
    df = cases_frame(labels, np.arange(n) % 4, unlabelled)
    store.write_table("cases", df)
    tcfg = TileConfig(tile_size=size, tiles_per_shard=8)
    casts = {"A": (60, -30, -30), "O": (-30, 60, -30), "G": (-30, -30, 60)}
    for i, (case, label) in enumerate(zip(df["case_id"], df["label"], strict=True)):
        k = tiles + i % 3  # bags of different sizes
        px = rng.integers(60, 200, size=(k, size, size, 3)).astype(np.int16)
        px += np.array(casts.get(label, (0, 0, 0)), dtype=np.int16)
        px = np.clip(px, 0, 255).astype(np.uint8)
        write_tile_group(store, case, 20, px, np.zeros((k, 2)), np.ones(k), {"mpp": 0.5}, tcfg)
    cfg = PipelineConfig.model_validate({
        "embed": {"name": EMBEDDER, "weights": "random", "normalization": "dataset"},
        "wsi": {"mode": "finetune", "epochs": 8, "snapshots": [-1, -3], "lr": 1e-3, "crop_size": 32,
                "slides_per_batch": 3, "tiles_per_slide": 8, "loader_threads": 2},
        "predict": {"tiles_per_slide": 8, "repeats": 3, "batch_tiles": 16},
    })
    return store, cfg


def history(store: Store, mag: float, fold: int) -> pd.DataFrame:
    return pq.read_table(store.local_path(history_path(wsi_run_id(mag, fold)))).to_pandas()


def model_bytes(store: Store, model_id: str) -> bytes:
    return store.fs.cat_file(store.path("models", model_id, "model.safetensors"))


# ---- the model ---------------------------------------------------------------------------------


def test_pooled_head_is_max_and_mean_over_any_bag_size():
    torch.manual_seed(0)
    head = PooledHead(8, hidden=[16], dropout=0.5).eval()
    bags = [torch.randn(n, 8) for n in (1, 5, 17)]
    pooled = head.pool_segments(torch.cat(bags), [1, 5, 17])
    for b, p in zip(bags, pooled, strict=True):
        torch.testing.assert_close(p, torch.cat([b.amax(0), b.mean(0)]))
    # A list of bags, a padded batch with a mask, and one bag at a time agree.
    padded = torch.nn.utils.rnn.pad_sequence(bags, batch_first=True, padding_value=99.0)
    mask = torch.arange(17)[None] < torch.tensor([1, 5, 17])[:, None]
    from_list, from_mask = head(bags), head(padded, mask)
    torch.testing.assert_close(from_list, from_mask)
    torch.testing.assert_close(from_list[1], head(bags[1])[0])
    assert from_list.shape == (3, len(CLASSES))
    # (linear, ReLU, batch norm) per hidden width, between dropout and the last linear.
    kinds = [type(m).__name__ for m in head.classifier]
    assert kinds == ["Dropout", "Linear", "ReLU", "BatchNorm1d", "Linear"]
    with pytest.raises(ValueError, match="empty bag"):
        head(torch.zeros(0, 8))


def test_bag_pool_streams_to_the_full_computation():
    x = torch.randn(50, 4)
    ids = torch.tensor([0] * 20 + [1] * 25 + [0] * 5)  # bag 0 comes back in a later run
    pool = BagPool(2, 4)
    pool.update(x[:30], ids[:30])
    pool.update(x[30:], ids[30:])
    full = PooledHead.pool_segments(torch.cat([x[:20], x[45:], x[20:45]]), [25, 25])
    torch.testing.assert_close(pool.pooled(), full)


def tiny_model(seed: int = 0) -> MILClassifier:
    torch.manual_seed(seed)
    embedder = create_embedder(EMBEDDER, seed=seed)
    return MILClassifier(embedder, PooledHead(embedder.num_features)).eval()


def test_inference_in_chunks_equals_one_pass_and_takes_one_tile():
    model = tiny_model()
    tf = eval_transform(None, size=32)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (150, 40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        full = model([tf(tiles)])[0]
        chunked = model.predict_bag(tiles, chunk_size=16, transform=tf)
        one = model.predict_bag(tiles[:1], chunk_size=16, transform=tf)
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one, model([tf(tiles[:1])])[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="empty bag"):
        model.predict_bag(tiles[:0])


HUGE_BAG = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch, zarr
    from radpath_fs.embedders import create_embedder
    from radpath_fs.mil import MILClassifier, PooledHead
    from radpath_fs.transforms import eval_transform

    torch.set_num_threads(2)
    n, t, chunk = 10_000, 32, 256
    tiles = zarr.open_array(sys.argv[1], mode="r")
    embedder = create_embedder("test_efficientnet")
    seen = []
    embedder.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    model = MILClassifier(embedder, PooledHead(embedder.num_features)).eval()
    tf = eval_transform(None, size=t)
    # Warm up (allocator pools, lazy init) so the measurement is the bag, not the first call.
    model.predict_bag(tiles[:chunk], chunk_size=chunk, transform=tf)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits = model.predict_bag(tiles, chunk_size=chunk, transform=tf)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (after - before) / 1024, "max_chunk": max(seen), "calls": len(seen),
                      "finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape)}))
""")


def test_bag_of_10000_tiles_runs_in_bounded_memory(tmp_path):
    """In one pass the bag's input alone is 10,000 x 3 x 32 x 32 float32 = 117 MiB and the peak
    grows by ~850 MiB with the activations (measured); chunked, by about one chunk's worth."""
    n, t = 10_000, 32
    arr = zarr.create_array(str(tmp_path / "bag.zarr"), shape=(n, t, t, 3), chunks=(500, t, t, 3), dtype="uint8")
    rng = np.random.default_rng(0)
    for s in range(0, n, 500):
        arr[s : s + 500] = rng.integers(0, 255, (500, t, t, 3), dtype=np.uint8)
    out = subprocess.run([sys.executable, "-c", HUGE_BAG, str(tmp_path / "bag.zarr")], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["finite"] and r["shape"] == [len(CLASSES)]
    assert r["max_chunk"] == 256 and r["calls"] == 1 + n // 256 + 1
    assert r["growth_mib"] < 120, r


# ---- head mode ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    store, cfg = planted_store(tmp_path_factory.mktemp("planted") / "store")
    for mag in (20, 5):
        train_wsi(store, cfg, mag, 0, device="cpu")
    return store, cfg


def test_head_mode_learns_planted_signal_and_not_noise(planted):
    store, cfg = planted
    h20 = history(store, 20, 0)
    assert list(h20["epoch"]) == list(range(cfg.wsi.epochs))
    assert {"loss", "train_balanced_accuracy", "val_balanced_accuracy"} <= set(h20.columns)
    predict_models(store, cfg, ["wsi-mag20-fold0-e29", "wsi-mag5-fold0-e29"], ["oof"], device="cpu")
    from sklearn.metrics import balanced_accuracy_score

    oof20 = store.read_table(prediction_table_name("wsi-mag20-fold0-e29", "oof"))
    oof5 = store.read_table(prediction_table_name("wsi-mag5-fold0-e29", "oof"))
    assert balanced_accuracy_score(oof20["label"], oof20["pred_vote"]) >= 0.85
    assert balanced_accuracy_score(oof5["label"], oof5["pred_vote"]) <= 0.6


def test_head_mode_snapshots_and_model_config(planted):
    store, cfg = planted
    for epoch in cfg.wsi.snapshot_epochs():
        config = store.read_json(model_config_path(f"wsi-mag20-fold0-e{epoch}"))
        assert config["modality"] == "wsi" and config["magnification"] == 20.0 and config["fold"] == 0
        assert config["snapshot"] == epoch and config["mode"] == "head"
        assert config["embedder"]["id"] == embedder_id(cfg.embed)
        assert config["head"] == {"in_features": 64, "n_classes": 3, "hidden": [], "dropout": 0.5, "standardized": True}
        cases = store.cases()
        assert sorted(config["train_cases"]) == sorted(cases[cases["fold"].isin([1, 2])]["case_id"])
    assert cfg.wsi.snapshot_epochs() == [19, 29]
    assert not store.exists(model_config_path("wsi-mag20-fold0-e28"))
    # models/ holds the snapshots alone, each one a model `radpath predict` takes; the runs'
    # records (history, resumable state) are under runs/.
    snapshots = [f"wsi-mag{m}-fold0-e{e}" for m in (20, 5) for e in cfg.wsi.snapshot_epochs()]
    assert sorted(os.listdir(store.path(MODELS))) == sorted(snapshots)
    assert all(model_config(store, m)["model_id"] == m for m in os.listdir(store.path(MODELS)))
    assert sorted(os.listdir(store.path(RUNS))) == ["wsi-mag20-fold0", "wsi-mag5-fold0"]
    assert sorted(os.listdir(store.path(RUNS, "wsi-mag20-fold0"))) == ["history.parquet", "state.safetensors"]
    assert state_meta(store, "wsi-mag20-fold0")["epoch"] == cfg.wsi.epochs - 1


def test_predict_writes_contract_rows_with_votes(planted):
    store, cfg = planted
    assert "wsi-mag20-fold0-e19" in pending_predictions(store)
    predict_models(store, cfg, ["wsi-mag20-fold0-e19"], None, device="cpu")
    assert "wsi-mag20-fold0-e19" not in pending_predictions(store)
    cases = store.cases()
    for split, expected in (("oof", cases[cases["fold"] == 0]), ("val", cases[cases["label"].isna()])):
        t = pq.read_table(store.path("tables", "predictions", f"wsi-mag20-fold0-e19--{split}.parquet"))
        for name in REQUIRED:
            assert t.schema.field(name).type == SCHEMA.field(name).type, name
        df = t.to_pandas()
        assert sorted(df["case_id"]) == sorted(expected["case_id"])
        assert (df["split"] == split).all() and (df["snapshot"] == 19).all() and (df["fold"] == 0).all()
        probs = df[["prob_A", "prob_O", "prob_G"]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        votes = df[["votes_A", "votes_O", "votes_G"]].to_numpy()
        assert (votes.sum(1) == cfg.predict.repeats).all() and (df["repeats"] == cfg.predict.repeats).all()
        # The class is the vote's winner.
        assert (votes[np.arange(len(df)), [CLASSES.index(c) for c in df["pred_vote"]]] == votes.max(1)).all()
    val = store.read_table(prediction_table_name("wsi-mag20-fold0-e19", "val"))
    assert val["label"].isna().all()
    # Seeded: predicting again gives the same table.
    before = store.read_table(prediction_table_name("wsi-mag20-fold0-e19", "oof"))
    predict_models(store, cfg, ["wsi-mag20-fold0-e19"], ["oof"], device="cpu")
    pd.testing.assert_frame_equal(before, store.read_table(prediction_table_name("wsi-mag20-fold0-e19", "oof")))
    with pytest.raises(RadpathError, match="no such model"):
        predict_models(store, cfg, ["wsi-mag20-fold0-e7"], None, device="cpu")
    with pytest.raises(RadpathError, match="--split"):
        predict_models(store, cfg, ["wsi-mag20-fold0-e19"], ["holdout"], device="cpu")


def test_a_head_predicts_only_on_embeddings_made_as_for_its_training(planted, tmp_path):
    """`radpath embed` recomputes a store's embeddings when the training cases (so the dataset
    statistics) change; a head trained on the old ones must not silently predict on the new."""

    store, cfg = planted
    assert store.read_json(model_config_path("wsi-mag20-fold0-e29"))["embedding_transform"] == PLANTED_TRANSFORM
    copy = Store(shutil.copytree(store.root, tmp_path / "copy"))
    group = zarr.open_group(copy.zarr_store(EMBEDDINGS), path=embedder_id(cfg.embed), mode="r+")
    cases = list(copy.cases()["case_id"])
    group[f"{cases[0]}/20"].attrs["transform"] = {**PLANTED_TRANSFORM, "mean": [0.4, 0.5, 0.5]}
    with pytest.raises(StoreError, match="2 different transforms or calibrations; rerun `radpath embed`"):
        predict_models(copy, cfg, ["wsi-mag20-fold0-e29"], ["oof"], device="cpu")
    for case in cases:
        group[f"{case}/20"].attrs["transform"] = {**PLANTED_TRANSFORM, "mean": [0.4, 0.5, 0.5]}
    with pytest.raises(StoreError, match="other normalisation statistics than model wsi-mag20-fold0"):
        predict_models(copy, cfg, ["wsi-mag20-fold0-e29"], ["oof"], device="cpu")
    # So with the random embedder's batch-norm statistics (re-estimated from re-tiled training slides).
    for case in cases:
        group[f"{case}/20"].attrs.update({"transform": PLANTED_TRANSFORM, "calibration": "0123456789abcdef"})
    with pytest.raises(StoreError, match="other batch-norm statistics of the random embedder than model wsi-mag20"):
        predict_models(copy, cfg, ["wsi-mag20-fold0-e29"], ["oof"], device="cpu")


def test_train_wsi_checks_its_inputs(planted, tmp_path):
    store, cfg = planted
    with pytest.raises(RadpathError, match="folds"):
        train_wsi(store, cfg, 20, 7, device="cpu")
    with pytest.raises(RadpathError, match="--mode"):
        train_wsi(store, cfg, 20, 0, mode="attention", device="cpu")
    # A tiled case without embeddings is an error that says what to run.
    write_tile_group(store, "C000", 10, np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 2)), np.ones(1),
                     {"mpp": 1.0}, TileConfig(tile_size=16))
    with pytest.raises(StoreError, match="radpath embed"):
        train_wsi(store, cfg, 10, 0, device="cpu")



def test_a_changed_head_setting_retrains_and_its_predictions_are_redone(tmp_path, capsys):
    """Snapshots record the fingerprint of the run that made them: the same config trains
    nothing and keeps the prediction tables; another head setting retrains and drops them."""
    from pathlib import Path

    from radpath_fs.mil import wsi_is_current

    store, planted_cfg = planted_store(tmp_path / "store", n=12, unlabelled=2)

    def config(**head) -> PipelineConfig:
        return PipelineConfig.model_validate({
            "embed": planted_cfg.embed.model_dump(), "predict": {"repeats": 2},
            "wsi": {"mode": "head", "epochs": 3, "snapshots": [-1], "lr": 3e-3, "head": head}})

    def files() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in Path(store.root).rglob("*") if p.is_file()}

    cfg = config()
    (model_id,) = train_wsi(store, cfg, 20, 0, device="cpu")
    predict_models(store, cfg, [model_id], None, device="cpu")
    tables = [store.path("tables", "predictions", f"{model_id}--{s}.parquet") for s in ("oof", "val")]
    assert all(Path(p).exists() for p in tables) and pending_predictions(store) == []

    before = files()
    capsys.readouterr()
    assert wsi_is_current(store, cfg, 20, 0)
    train_wsi(store, cfg, 20, 0, device="cpu")
    assert "nothing to train" in " ".join(capsys.readouterr().err.split())
    assert files() == before

    changed = config(dropout=0.1)
    assert not wsi_is_current(store, changed, 20, 0)
    old = model_bytes(store, model_id)
    train_wsi(store, changed, 20, 0, device="cpu")
    err = " ".join(capsys.readouterr().err.split())
    assert f"{model_id}: trained with another config or case list; retraining" in err
    assert model_bytes(store, model_id) != old
    assert store.read_json(model_config_path(model_id))["head"]["dropout"] == 0.1
    assert not any(Path(p).exists() for p in tables) and pending_predictions(store) == [model_id]
    assert wsi_is_current(store, changed, 20, 0) and not wsi_is_current(store, cfg, 20, 0)
    # Embeddings made again (other normalisation statistics) are other inputs: another run.
    group = zarr.open_group(store.zarr_store(EMBEDDINGS), path=embedder_id(cfg.embed), mode="r+")
    for case in store.cases()["case_id"]:
        group[f"{case}/20"].attrs["transform"] = {**PLANTED_TRANSFORM, "mean": [0.4, 0.5, 0.5]}
    assert not wsi_is_current(store, changed, 20, 0)
    for case in store.cases()["case_id"]:
        group[f"{case}/20"].attrs["transform"] = PLANTED_TRANSFORM
    assert wsi_is_current(store, changed, 20, 0)
    # A snapshot that records no fingerprint is not of this run: retrained.
    config_json = Path(store.path(model_config_path(model_id)))
    config_json.write_text(json.dumps({k: v for k, v in json.loads(config_json.read_text()).items()
                                       if k != "training_fingerprint"}))
    assert not wsi_is_current(store, changed, 20, 0)
    train_wsi(store, changed, 20, 0, device="cpu")
    assert f"{model_id}: trained with another config or case list; retraining" in " ".join(capsys.readouterr().err.split())
    assert wsi_is_current(store, changed, 20, 0)
    # Another case list (the folds reassigned) is another run too.
    cases = store.read_table("cases")
    store.write_table("cases", cases.assign(fold=np.where(cases["fold"] >= 0, (cases["fold"] + 1) % 3, -1)))
    assert not wsi_is_current(store, changed, 20, 0)

def test_a_fold_minus_one_model_has_no_out_of_fold_split(tmp_path):
    """A model trained on every fold holds no case out: its default splits are the unlabelled
    ones, and asking for oof is an error naming the model (the same for MRI models, test_mri)."""
    store, planted_cfg = planted_store(tmp_path / "store", n=12, unlabelled=2)
    cfg = planted_cfg.model_copy(update={"wsi": planted_cfg.wsi.model_copy(update={"epochs": 2, "snapshots": [-1]})})
    (model_id,) = train_wsi(store, cfg, 20, -1, device="cpu")
    assert model_id == "wsi-mag20-all-e1" and os.listdir(store.path(MODELS)) == [model_id]
    with pytest.raises(RadpathError, match=f"{model_id}: split oof: the model was trained on every fold"):
        predict_models(store, cfg, [model_id], ["oof"], device="cpu")
    predict_models(store, cfg, [model_id], None, device="cpu")
    assert store.list_tables(PREDICTIONS) == [prediction_table_name(model_id, "val")]


# ---- finetune mode -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    store, cfg = tile_store(root / "store")
    torch.set_num_threads(2)
    train_wsi(store, cfg, 20, 0, device="cpu")
    return store, cfg, root


def test_finetune_lowers_the_loss_and_moves_the_embedder(finetuned):
    store, cfg, _ = finetuned
    h = history(store, 20, 0)
    assert len(h) == cfg.wsi.epochs
    assert h["loss"].iloc[-2:].mean() < h["loss"].iloc[:2].mean()
    from radpath_fs.training import load_checkpoint

    state, config = load_checkpoint(store, "wsi-mag20-fold0-e7")
    start = create_embedder(EMBEDDER, seed=cfg.embed.seed).state_dict()
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, state[f"embedder.{k}"])]
    assert len(moved) > len(start) // 2
    assert config["mode"] == "finetune" and config["normalization"]["kind"] == "dataset"
    assert len(config["normalization"]["mean"]) == 3


def test_finetune_same_seed_same_bytes_and_resume_equals_uninterrupted(finetuned, monkeypatch):
    store, cfg, root = finetuned
    twin, _ = tile_store(root / "twin")
    interrupted = WSITrainer.train_epoch

    def crash_at_epoch_3(self, epoch, max_batches=None):
        if epoch == 3:
            raise KeyboardInterrupt("killed")
        return interrupted(self, epoch, max_batches)

    monkeypatch.setattr(WSITrainer, "train_epoch", crash_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_wsi(twin, cfg, 20, 0, device="cpu")
    assert state_meta(twin, wsi_run_id(20, 0))["epoch"] == 2
    monkeypatch.setattr(WSITrainer, "train_epoch", interrupted)
    train_wsi(twin, cfg, 20, 0, device="cpu")  # resumes at epoch 3
    for epoch in cfg.wsi.snapshot_epochs():
        mid = f"wsi-mag20-fold0-e{epoch}"
        assert model_bytes(twin, mid) == model_bytes(store, mid)
        assert twin.fs.cat_file(twin.path("models", mid, "config.json")) == \
            store.fs.cat_file(store.path("models", mid, "config.json"))
    pd.testing.assert_frame_equal(history(twin, 20, 0).drop(columns=["seconds", "tiles_per_s"]),
                                  history(store, 20, 0).drop(columns=["seconds", "tiles_per_s"]))
    # A finished run is not trained again.
    before = model_bytes(twin, "wsi-mag20-fold0-e7")
    train_wsi(twin, cfg, 20, 0, device="cpu")
    assert model_bytes(twin, "wsi-mag20-fold0-e7") == before
    # Another seed trains another first epoch (stopped after it: the first loss tells them apart).
    first = []

    def stop_after_epoch_0(self, epoch, max_batches=None):
        if epoch == 1:
            raise KeyboardInterrupt("stopped")
        first.append(interrupted(self, epoch, max_batches))
        return first[-1]

    other, _ = tile_store(root / "other")
    monkeypatch.setattr(WSITrainer, "train_epoch", stop_after_epoch_0)
    with pytest.raises(KeyboardInterrupt):
        train_wsi(other, cfg.model_copy(update={"seed": cfg.seed + 1}), 20, 0, device="cpu")
    assert first[0]["loss"] != history(store, 20, 0)["loss"].iloc[0]


def test_predict_finetune_model_augments_tile_by_tile(finetuned):
    store, cfg, _ = finetuned
    predict_models(store, cfg, ["wsi-mag20-fold0-e7"], ["oof", "val", "train"], device="cpu")
    cases = store.cases()
    oof = store.read_table(prediction_table_name("wsi-mag20-fold0-e7", "oof"))
    train = store.read_table(prediction_table_name("wsi-mag20-fold0-e7", "train"))
    val = store.read_table(prediction_table_name("wsi-mag20-fold0-e7", "val"))
    assert sorted(oof["case_id"]) == sorted(cases[cases["fold"] == 0]["case_id"])
    assert sorted(train["case_id"]) == sorted(cases[cases["fold"] > 0]["case_id"])
    assert len(val) == 2 and val["label"].isna().all()
    assert ((oof[["votes_A", "votes_O", "votes_G"]].sum(axis=1)) == cfg.predict.repeats).all()
    # Bags larger than tiles_per_slide are subsampled; smaller ones are used whole.
    assert (oof["tiles"] >= 12).all()
    # With augmentation, the repeats of one slide differ: mean probs are not one-hot vote shares.
    assert not np.allclose(oof["prob_A"], oof["votes_A"] / cfg.predict.repeats)
    # Without it (predict.augment: false) the tiles are center-cropped; only the subsets vary.
    plain = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"augment": False})})
    predict_models(store, plain, ["wsi-mag20-fold0-e7"], ["oof"], device="cpu")
    again = store.read_table(prediction_table_name("wsi-mag20-fold0-e7", "oof"))
    assert list(again["case_id"]) == list(oof["case_id"]) and not np.allclose(again["prob_A"], oof["prob_A"])


def test_cli_train_and_predict(planted, tmp_path):
    from typer.testing import CliRunner

    from radpath_fs.cli import app

    store, cfg = planted
    yaml_path = tmp_path / "p.yaml"
    import yaml

    yaml_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    r = CliRunner().invoke(app, ["train-wsi", "--store", store.url, "--config", str(yaml_path), "--mag", "20",
                                 "--fold", "1", "--mode", "head", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert store.exists(model_weights_path("wsi-mag20-fold1-e29"))
    r = CliRunner().invoke(app, ["predict", "--store", store.url, "--config", str(yaml_path),
                                 "--model", "wsi-mag20-fold1-e29", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert store.has_table(prediction_table_name("wsi-mag20-fold1-e29", "oof"))
    r = CliRunner().invoke(app, ["train-wsi", "--store", store.url, "--config", str(yaml_path), "--mag", "20",
                                 "--fold", "9", "--device", "cpu"])
    assert r.exit_code == 2 and "folds" in r.output


def test_gpu_benchmark_runs_on_the_cpu_with_tiny_sizes(tmp_path):
    """tests/benchmarks/gpu_mil.py is run on a GPU by `make bench-gpu`; here only its plumbing."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_mil", Path(__file__).parent / "benchmarks" / "gpu_mil.py")
    gpu_mil = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_mil)
    r = gpu_mil.run(tmp_path, device="cpu", slides=4, tiles=6, tile_size=48, crop=32, embedder=EMBEDDER,
                    steps=2, warmup=1, slides_per_batch=2, tiles_per_slide=3, loader_threads=2)
    assert r["bare_tiles_per_s"] > 0 and r["pipeline_tiles_per_s"] > 0 and r["loader_tiles_per_s"] > 0
    assert json.loads((tmp_path / "gpu_mil.json").read_text())["ratio"] == pytest.approx(r["ratio"])


def test_a_damaged_tile_chunk_is_an_error_naming_the_slide(tmp_path):
    store, cfg = tile_store(tmp_path / "store", n=6)
    shard = sorted(p for p in (tmp_path / "store" / TILES / "C001" / "20" / "pixels").rglob("*")
                   if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(shard.read_bytes())
    data[16:4096] = bytes(4080)  # zeroes over the first compressed tiles
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"tiles\.zarr/C001/20: cannot read tiles"):
        train_wsi(store, cfg.model_copy(update={"wsi": cfg.wsi.model_copy(update={"epochs": 2}),
                                                "embed": cfg.embed.model_copy(update={"normalization": "imagenet"})}),
                  20, 0, device="cpu")


def test_out_of_fold_rows_never_hold_training_cases(capsys):
    """After a re-ingest moved cases between folds, a model's OOF split leaves out what it trained on."""
    from radpath_fs.folds import split_cases

    cases = pd.DataFrame({"case_id": ["a", "b", "c", "d", "e"], "label": ["A", "O", "G", "A", None],
                          "fold": [0, 0, 1, 1, -1], "split": ["train"] * 4 + ["val"], "has_slide": [True] * 5})
    assert split_cases(cases, "oof", 0, ["c", "d"], modality="wsi")["case_id"].tolist() == ["a", "b"]
    assert capsys.readouterr().err == ""
    moved = cases.assign(fold=[0, 1, 0, 1, -1])  # b and c swapped folds since training without fold 0
    assert split_cases(moved, "oof", 0, ["c", "d"], modality="wsi", model_id="wsi-20x-f0-e9")["case_id"].tolist() == ["a"]
    assert "wsi-20x-f0-e9: 1 case(s) of fold 0 were among its training cases" in " ".join(capsys.readouterr().err.split())


def test_hard_vote_breaks_ties_by_mean_probability():
    from radpath_fs.predict import vote

    # Two repeats vote A narrowly, two vote G firmly: 2-2, and G has the higher mean probability.
    logits = np.array([[[1.0, 0.0, 0.9], [1.0, 0.0, 0.9], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0]]])
    v = vote(logits)
    assert v["votes"].tolist() == [[2, 0, 2]] and v["pred"].tolist() == [2]
    np.testing.assert_allclose(v["logits"], logits.mean(1))
    np.testing.assert_allclose(v["probs"].sum(1), 1)
