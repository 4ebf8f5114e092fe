"""Stage one, embeddings: embedder factory, weights, transforms, normalisation, the embedding store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import zarr

from radpath_fs import normstats
from radpath_fs.config import ColorJitterConfig, EmbedConfig, TileConfig
from radpath_fs.embed import BatchReader, embed_store
from radpath_fs.embedders import (
    PRESETS,
    EmbedderPreset,
    create_embedder,
    embedder_id,
    weights_hash,
)
from radpath_fs.embeddings import embedding_attrs, embedding_is_complete, read_embeddings
from radpath_fs.errors import ConfigError, InputError, StoreError
from radpath_fs.layout import EMBEDDINGS, NORMALIZATION_JSON, TILES
from radpath_fs.normstats import calibration_hash, calibration_rel, store_embedder, tile_normalization
from radpath_fs.store import Store
from radpath_fs.tilestore import write_tile_group
from radpath_fs.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _shift_hue,
    eval_transform,
    train_transform,
    transform_from_record,
)

T = 64  # tile size: small tiles keep the CPU tests fast; the code path is the 512 px one
SMALL = dict(name="resnet18", weights="random", input_size=48, batch_size=4)
# (case, split, tiles at 20x, tiles at 5x); c_empty has no tissue at 5x, c_val is unlabelled.
CASES = [("c0", "train", 6, 3), ("c1", "train", 5, 0), ("c_val", "val", 4, 2)]


def _tiles(rng: np.random.Generator, n: int, base: tuple[int, int, int]) -> np.ndarray:
    """Textured tiles around a base colour (different per case, so mixing cases changes the stats)."""
    noise = rng.integers(-60, 60, size=(n, T, T, 3))
    return np.clip(np.array(base) + noise, 0, 255).astype(np.uint8)


def make_store(path, codec: str = "zstd") -> Store:
    store = Store(path, create=True)
    store.write_table(
        "cases",
        pd.DataFrame(
            {
                "case_id": [c for c, *_ in CASES],
                "label": ["A", "G", None],
                "split": [s for _, s, *_ in CASES],
                "fold": [0, 1, -1],
                "excluded": [False] * len(CASES),
            }
        ),
    )
    cfg = TileConfig(tile_size=T, tiles_per_shard=4, codec=codec)
    rng = np.random.default_rng(0)
    bases = {"c0": (200, 120, 180), "c1": (150, 90, 160), "c_val": (60, 200, 60)}
    for case, _, n20, n5 in CASES:
        for mag, n in ((20, n20), (5, n5)):
            px = _tiles(rng, n, bases[case])
            write_tile_group(store, case, mag, px, np.zeros((n, 2)), np.ones(n), {"mpp": 10 / mag}, cfg)
    return store


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A tile store embedded once with a small random resnet18 (sync), plus a pristine copy."""
    root = tmp_path_factory.mktemp("embed")
    store = make_store(root / "store")
    shutil.copytree(root / "store", root / "pristine")
    cfg = EmbedConfig(**SMALL)
    summary = embed_store(store.url, cfg, device="cpu", scheduler="sync")
    return store, cfg, summary, root


# ---- embedders ---------------------------------------------------------------------------------
def test_efficientnet_b0_default_embedder():
    model = create_embedder()
    assert model.num_features == 1280
    with torch.inference_mode():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1280)
    assert not any("classifier" in k for k in model.state_dict())
    assert embedder_id(EmbedConfig()) == "efficientnet_b0-random-s0-c224-dataset"


def test_random_weights_are_seeded_and_ids_encode_them():
    a, b, c = (create_embedder("resnet18", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    ids = {
        embedder_id(EmbedConfig(name="resnet18", seed=1)),
        embedder_id(EmbedConfig(name="resnet18", crop="resize")),
        embedder_id(EmbedConfig(name="resnet18", normalization="imagenet")),
        embedder_id(EmbedConfig(name="resnet18", input_size=256)),
        embedder_id(EmbedConfig(name="resnet18")),
    }
    assert len(ids) == 5
    assert "resnet18-random-s1-c224-dataset" in ids and "resnet18-random-s0-r224-dataset" in ids


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="not a timm model"):
        create_embedder("efficientnet_b99")


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if not (p.hub_id or "hf-hub:").startswith("hf-hub:")))
def test_a_preset_of_timms_weights_states_timms_transform(name):
    """Presets whose weights are a timm tag state the mean, std and input size timm states for
    them (the others' come from their model cards: tests/test_embedders.py)."""
    import timm

    preset = PRESETS[name]
    stated = timm.models.get_pretrained_cfg(preset.hub_id)
    assert (tuple(stated.mean), tuple(stated.std), stated.input_size[-1]) == (preset.mean, preset.std, preset.input_size)


def test_a_preset_with_a_wrong_width_is_a_config_error(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", EmbedderPreset("resnet18", num_features=99))
    with pytest.raises(ConfigError, match="preset 'tiny' says L=99, and resnet18 gives 512"):
        create_embedder("tiny")


def test_a_compiled_model_is_not_shared_between_threads(tmp_path):
    with pytest.raises(ConfigError, match="embed.compile"):
        embed_store(str(tmp_path), EmbedConfig(**SMALL, compile=True), scheduler="threads")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_and_classifier_keys_are_ignored(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", num_classes=3)  # a trained classifier: fc.* in the file
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model = create_embedder("resnet18", weights=path)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    cfg = EmbedConfig(name="resnet18", weights=path)
    assert embedder_id(cfg) == f"resnet18-w{weights_hash(path)}-c224-dataset"
    assert len(weights_hash(path)) == 12


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in create_embedder("efficientnet_b0").state_dict().items()}, str(path))
    with pytest.raises(InputError) as err:
        create_embedder("resnet18", weights=path)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "conv1.weight" in msg and "unexpected keys" in msg
    # embed_store checks the file before taking the lock or touching the store
    store = make_store(tmp_path / "s")
    with pytest.raises(InputError, match="do not fit"):
        embed_store(store.url, EmbedConfig(name="resnet18", weights=path, input_size=48), device="cpu")
    assert not store.exists(EMBEDDINGS)


def test_weights_shape_mismatch_and_pickles_are_refused(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in create_embedder("resnet18").state_dict().items()}
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(InputError, match=r"shape mismatches \(first: conv1.weight"):
        create_embedder("resnet18", weights=path)
    # A .pth holding anything but tensors is refused by the restricted unpickler; a pickle disguised
    # as .safetensors is refused by content (test_security.py has more).
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": pd.Timestamp(0)}, evil)
    with pytest.raises(InputError, match="weights_only"):
        create_embedder("resnet18", weights=evil)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(evil.read_bytes())
    with pytest.raises(InputError, match="is a pickle"):
        create_embedder("resnet18", weights=disguised)
    with pytest.raises(InputError, match="not found"):
        create_embedder("resnet18", weights=tmp_path / "nope.safetensors")


# ---- transforms --------------------------------------------------------------------------------
def test_eval_transform_matches_torchvision():
    x = torch.randint(0, 256, (3, T, T, 3), dtype=torch.uint8)
    mean, std = (0.6, 0.5, 0.4), (0.2, 0.25, 0.3)
    for crop, size in (("center", 48), ("center", 31), ("resize", 40)):
        y = eval_transform(size=size, crop=crop, mean=mean, std=std)(x)
        img = x.permute(0, 3, 1, 2)
        if crop == "center":
            ref = TF.center_crop(img, [size]).float() / 255
        else:
            ref = TF.resize(img.float(), [size, size], antialias=True).clamp(0, 255) / 255
        ref = TF.normalize(ref, list(mean), list(std))
        assert y.shape == (3, 3, size, size)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        eval_transform(size=T + 1)(x)


def test_train_transform_is_per_tile_random_and_seeded():
    one = torch.randint(0, 256, (1, T, T, 3), dtype=torch.uint8)
    batch = one.repeat(8, 1, 1, 1)
    tt = train_transform(32, ColorJitterConfig(), IMAGENET_MEAN, IMAGENET_STD)
    a = tt(batch, generator=torch.Generator().manual_seed(3))
    b = tt(batch, generator=torch.Generator().manual_seed(3))
    c = tt(batch, generator=torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 32, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # identical input tiles get different crops / jitter within one batch
    assert len({tuple(t.flatten()[:50].tolist()) for t in a}) == 8
    # without jitter, every output is an exact crop of the input
    plain = train_transform(32, {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}, (0, 0, 0), (1, 1, 1))
    out = plain(one, generator=torch.Generator().manual_seed(0))[0] * 255
    windows = one[0].permute(2, 0, 1).float().unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 33, 33, 32, 32)
    assert (windows - out[:, None, None]).abs().amax(dim=(0, 3, 4)).min() < 1e-3
    rebuilt = transform_from_record(tt.record())
    torch.testing.assert_close(rebuilt(batch, generator=torch.Generator().manual_seed(3)), a)


def test_hue_shift_matches_torchvision_per_tile():
    img = torch.rand(4, 3, 16, 16)
    shifts = torch.tensor([0.01, -0.01, 0.3, -0.45]).view(4, 1, 1, 1)
    out = _shift_hue(img, shifts)
    for i in range(4):
        torch.testing.assert_close(out[i], TF.adjust_hue(img[i], float(shifts[i])), atol=1e-5, rtol=1e-5)


# ---- normalisation -----------------------------------------------------------------------------
def _numpy_stats(store, cases, mags):
    px = np.concatenate(
        [store.open_group(TILES, f"{c}/{m}")["pixels"][:].reshape(-1, 3) for c in cases for m in mags]
    ).astype(np.float64) / 255
    return px.mean(axis=0), px.std(axis=0)


def test_tile_normalization_equals_numpy_on_training_tiles(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    # Blocks and reads that do not divide the groups (6 and 5 tiles at 20x): partial ones are counted once.
    monkeypatch.setattr(normstats, "MOMENT_BLOCK", 4)
    monkeypatch.setattr(normstats, "MOMENT_READ", 3)
    mean, std = tile_normalization(store, [20, 5])
    ref_mean, ref_std = _numpy_stats(store, ["c0", "c1"], ["20", "5"])  # c_val is not a training case
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-9)
    mean20, std20 = tile_normalization(store, [20])
    np.testing.assert_allclose(mean20, _numpy_stats(store, ["c0", "c1"], ["20"])[0], rtol=1e-12)
    cached = store.read_json(normstats.NORMALIZATION_JSON)
    assert cached["20"]["mean"] == mean20 and cached["5,20"]["std"] == std
    # an edited training group invalidates the cached moments of its magnification
    write_tile_group(store, "c1", 20, np.full((2, T, T, 3), 7, np.uint8), np.zeros((2, 2)), np.ones(2),
                     {}, TileConfig(tile_size=T, tiles_per_shard=4))
    np.testing.assert_allclose(tile_normalization(store, [20])[0], _numpy_stats(store, ["c0", "c1"], ["20"])[0])
    # so does one re-tiled with other pixels but as many tiles
    write_tile_group(store, "c1", 20, np.full((2, T, T, 3), 99, np.uint8), np.zeros((2, 2)), np.ones(2),
                     {}, TileConfig(tile_size=T, tiles_per_shard=4))
    np.testing.assert_allclose(tile_normalization(store, [20])[0], _numpy_stats(store, ["c0", "c1"], ["20"])[0])
    with pytest.raises(StoreError, match="no complete tile groups of training cases"):
        tile_normalization(store, [40])


# ---- the embedding store -----------------------------------------------------------------------
def _recompute(store, eid, case, mag, rows) -> np.ndarray:
    """Embeddings of stored tiles `rows`, recomputed from the stored pixels with the recorded model
    and transform, in eval mode (float32)."""
    attrs = embedding_attrs(store, eid, case, mag)
    cfg = EmbedConfig(name=attrs["model"], weights=attrs["weights"], pretrained=attrs["pretrained"], seed=attrs["seed"],
                      normalization=attrs["normalization"], crop=attrs["transform"]["crop"], input_size=attrs["transform"]["size"])
    assert embedder_id(cfg) == eid
    model = store_embedder(store, cfg)
    tiles = torch.from_numpy(store.open_group(TILES, f"{case}/{mag}")["pixels"].oindex[list(rows)])
    with torch.inference_mode():
        return model(transform_from_record(attrs["transform"])(tiles)).numpy()


def test_stored_embeddings_recompute_from_the_recorded_transform(embedded):
    store, cfg, summary, _ = embedded
    eid = embedder_id(cfg)
    assert summary == {"embedder_id": eid, "written": 6, "skipped": 0, "tiles": 20}
    for case, mag in (("c0", 20), ("c_val", 5)):
        stored = read_embeddings(store, eid, case, mag)
        attrs = embedding_attrs(store, eid, case, mag)
        assert stored.dtype == np.float16 and stored.shape == (attrs["tiles"], 512)
        assert attrs["complete"] is True and attrs["precision"] == "fp32"
        assert attrs["transform"]["mean"] == list(tile_normalization(store, [mag])[0])
        pick = [0, attrs["tiles"] - 1]
        np.testing.assert_allclose(stored[pick].astype(np.float32), _recompute(store, eid, case, mag, pick),
                                   rtol=2**-10, atol=1e-4)
        # a whole bag is one chunk
        arr = zarr.open_array(store=store.zarr_store(EMBEDDINGS), path=f"{eid}/{case}/{mag}", mode="r")
        assert arr.chunks[0] >= arr.shape[0]


def test_empty_bag_gives_an_empty_array(embedded):
    store, cfg, _, _ = embedded
    eid = embedder_id(cfg)
    empty = read_embeddings(store, eid, "c1", 5)
    assert empty.shape == (0, 512) and embedding_is_complete(store, eid, "c1", 5)


def test_resume_skips_complete_and_redoes_incomplete(embedded):
    store, cfg, _, _ = embedded
    eid = embedder_id(cfg)
    before = read_embeddings(store, eid, "c0", 20)
    again = embed_store(store.url, cfg, device="cpu")
    assert again["written"] == 0 and again["skipped"] == 6
    arr = zarr.open_array(store=store.zarr_store(EMBEDDINGS), path=f"{eid}/c0/20", mode="r+")
    arr[...] = 0
    arr.attrs["complete"] = False  # what a killed writer leaves
    with pytest.raises(StoreError, match="incomplete"):
        read_embeddings(store, eid, "c0", 20)
    redo = embed_store(store.url, cfg, device="cpu")
    assert redo["written"] == 1 and redo["skipped"] == 5 and redo["tiles"] == 6
    np.testing.assert_array_equal(read_embeddings(store, eid, "c0", 20), before)


def test_same_store_under_sync_and_a_local_cluster(embedded):
    store, cfg, _, root = embedded
    other = Store(root / "pristine")
    summary = embed_store(other.url, cfg, device="cpu", scheduler="local:2")
    assert summary["written"] == 6
    eid = embedder_id(cfg)
    for case, *_ in CASES:
        for mag in (20, 5):
            a = read_embeddings(store, eid, case, mag)
            b = read_embeddings(other, eid, case, mag)
            # one torch thread per worker vs two in sync: at most float16 rounding apart
            # (embed.cpu_threads makes them byte-equal: tests/reference_chain/test_cluster.py)
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2**-10, atol=1e-4)
            attrs_a, attrs_b = (embedding_attrs(s, eid, case, mag) for s in (store, other))
            attrs_a.pop("created"), attrs_b.pop("created")
            assert attrs_a == attrs_b


def test_incomplete_tile_groups_are_not_embedded_and_imagenet_stats(tmp_path):
    store = make_store(tmp_path / "s", codec="jpeg")
    g = store.open_group(TILES, "c0/5", mode="r+")
    g.attrs["complete"] = False
    # The training cases hold no complete tile at 5x: nothing to estimate random batch-norm statistics from.
    random = EmbedConfig(**SMALL, normalization="imagenet", dtype="float32", magnifications=[5])
    with pytest.raises(StoreError, match="0 tile"):
        embed_store(store.url, random, device="cpu")
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in create_embedder("resnet18").state_dict().items()}, str(weights))
    cfg = random.model_copy(update={"weights": weights})
    summary = embed_store(store.url, cfg, device="cpu")
    eid = embedder_id(cfg)
    assert eid.endswith("-imagenet") and summary["written"] == 2
    assert not embedding_is_complete(store, eid, "c0", 5)
    assert not store.exists(NORMALIZATION_JSON)
    out = read_embeddings(store, eid, "c_val", 5)
    assert out.dtype == np.float32 and out.shape == (2, 512)
    assert embedding_attrs(store, eid, "c_val", 5)["transform"]["mean"] == list(IMAGENET_MEAN)


def test_cli_embed(tmp_path):
    from typer.testing import CliRunner

    from radpath_fs.cli import app

    store = make_store(tmp_path / "s")
    conf = tmp_path / "p.yaml"
    conf.write_text("embed:\n  name: resnet18\n  weights: random\n  input_size: 48\n  magnifications: [20]\n")
    res = CliRunner().invoke(app, ["embed", "--store", store.url, "--config", str(conf), "--batch-size", "2",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert read_embeddings(store, "resnet18-random-s0-c48-dataset", "c1", 20).shape == (5, 512)
    bad = CliRunner().invoke(app, ["embed", "--store", store.url, "--embedder", "not_a_model", "--weights", "random",
                                   "--device", "cpu"])
    assert bad.exit_code == 2 and "not a timm model" in bad.output


def test_cli_embeds_an_unlabelled_batch_with_either_normalization(tmp_path):
    from typer.testing import CliRunner

    from radpath_fs.cli import app

    store = make_store(tmp_path / "s")
    cases = store.cases().assign(label=None, split="val", fold=-1)  # a batch: nobody is labelled
    store.write_table("cases", cases)
    conf = tmp_path / "p.yaml"
    conf.write_text("embed:\n  name: resnet18\n  input_size: 48\n  magnifications: [20]\n")
    base = ["embed", "--store", store.url, "--config", str(conf), "--weights", "random", "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--normalization", "dataset"])
    assert res.exit_code == 0, res.output
    eid = "resnet18-random-s0-c48-dataset"
    attrs = embedding_attrs(store, eid, "c_val", 20)
    assert attrs["normalization_cases"] == "all" and attrs["weights"] == "random"
    mean, std = _numpy_stats(store, ["c0", "c1", "c_val"], ["20"])  # every case's tiles, no label involved
    np.testing.assert_allclose(attrs["transform"]["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(attrs["transform"]["std"], std, rtol=1e-9)
    assert store.read_json(normstats.NORMALIZATION_JSON)["20"]["case_set"] == "all"
    res = CliRunner().invoke(app, [*base, "--normalization", "imagenet", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    attrs = embedding_attrs(store, "resnet18-random-s0-c48-imagenet", "c0", 20)
    assert attrs["transform"]["mean"] == list(IMAGENET_MEAN) and "normalization_cases" not in attrs
    bad = CliRunner().invoke(app, [*base, "--normalization", "slide"])
    assert bad.exit_code == 2 and "normalization" in bad.output


def test_batch_reader_processes_and_threads_give_the_same_batches(tmp_path):
    store = make_store(tmp_path / "s")
    groups = [("c0", "20"), ("c1", "5"), ("c_val", "20")]  # the middle one is empty
    sizes = [6, 0, 4]
    regions = [(8, 56), None, (8, 56)]
    out = {}
    for procs in (0, 2):
        reader = BatchReader(store.url, groups, regions, sizes, 4, processes=procs, threads=2, depth=2)
        out[procs] = [(gi, start, b.clone()) for gi, start, b in reader]
    assert [(gi, s) for gi, s, _ in out[0]] == [(0, 0), (0, 4), (2, 0)]
    for (ga, sa, a), (gb, sb, b) in zip(out[0], out[2], strict=True):
        assert (ga, sa) == (gb, sb) and torch.equal(a, b)
    whole = store.open_group(TILES, "c0/20")["pixels"][:]
    np.testing.assert_array_equal(out[2][1][2].numpy(), whole[4:6, 8:56, 8:56])
    assert out[0][2][2].shape == (4, 48, 48, 3)


def test_embeddings_are_redone_for_re_tiled_groups(tmp_path, capsys):
    """Embeddings are rows of their tile group: a re-tiled group (other pixels, as many or fewer
    tiles) gets new embeddings, the others are kept."""
    store = make_store(tmp_path / "s")
    cfg = EmbedConfig(**{**SMALL, "normalization": "imagenet"})
    eid = embedder_id(cfg)
    embed_store(store.url, cfg, device="cpu")
    tcfg = TileConfig(tile_size=T, tiles_per_shard=4)
    for n, value in ((4, 30), (4, 220), (2, 220)):  # another count; same count, other pixels; again
        write_tile_group(store, "c_val", 20, np.full((n, T, T, 3), value, np.uint8), np.zeros((n, 2)), np.ones(n), {}, tcfg)
        summary = embed_store(store.url, cfg, device="cpu")
        assert summary["written"] == 1 and summary["skipped"] == 5, summary
        assert "re-tiled since" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
        emb = read_embeddings(store, eid, "c_val", 20, dtype=np.float32)
        assert emb.shape[0] == n
        np.testing.assert_allclose(emb, _recompute(store, eid, "c_val", 20, range(n)), rtol=2**-10, atol=1e-4)
    # Re-tiling with the same pixels gives the same fingerprint: nothing to redo.
    write_tile_group(store, "c_val", 20, np.full((2, T, T, 3), 220, np.uint8), np.zeros((2, 2)), np.ones(2), {}, tcfg)
    assert embed_store(store.url, cfg, device="cpu")["written"] == 0


@pytest.mark.parametrize("processes", [0, 1])
def test_a_damaged_tile_is_an_error_naming_its_group(tmp_path, processes):
    """In this process or in a DataLoader worker: one StoreError naming the group, no traceback."""
    from pathlib import Path

    store = make_store(tmp_path / "s")
    shard = sorted(p for p in Path(store.local_path(TILES, "c0", "20", "pixels", "c")).rglob("*") if p.is_file())[0]
    data = bytearray(shard.read_bytes())
    data[16:600] = bytes(584)  # zeroes over the first tile's compressed bytes
    shard.write_bytes(bytes(data))
    cfg = EmbedConfig(**{**SMALL, "normalization": "imagenet"})
    with pytest.raises(StoreError, match=r"tiles\.zarr/c0/20: cannot read tiles") as err:
        embed_store(store.url, cfg, device="cpu", read_processes=processes)
    assert "Traceback" not in str(err.value) and "rerun `radpath tile`" in str(err.value)


def test_loaders_fit_their_batches_in_shared_memory(tmp_path, monkeypatch, capsys):
    """Worker batches live in /dev/shm, often 64 MiB in a container: a loader that would overflow
    it holds fewer batches, then starts fewer workers, then reads in its own process, and says so."""
    from radpath_fs import training

    mib = 2**20
    monkeypatch.setattr(training, "shm_free_bytes", lambda: 10 * mib)
    assert training.fit_loader(4, 4, mib // 8, "r") == (4, 4)  # fits: nothing said
    assert capsys.readouterr().err == ""
    assert training.fit_loader(4, 4, mib, "r") == (4, 1)  # 4 x 2 batches x 1 MiB (+25%) = 10 MiB
    assert training.fit_loader(4, 4, 2 * mib, "r") == (2, 1)
    assert training.fit_loader(4, 4, 8 * mib, "r") == (0, 4)
    err = capsys.readouterr().err
    assert "2 workers with prefetch 1" in err and "reading in this process" in err and "--shm-size" in err

    store = make_store(tmp_path / "s")
    groups, regions, sizes = [("c0", "20"), ("c_val", "20")], [(8, 56)] * 2, [6, 4]
    batches = {}
    for free in (None, 1):  # no /dev/shm to check, and one with no room at all
        monkeypatch.setattr(training, "shm_free_bytes", lambda free=free: free)
        reader = BatchReader(store.url, groups, regions, sizes, 4, processes=2, depth=2, batch_bytes=4 * 48 * 48 * 3)
        batches[free] = [(gi, start, b.clone()) for gi, start, b in reader]
    assert "the embedding reader" in capsys.readouterr().err
    assert [(g, s) for g, s, _ in batches[1]] == [(g, s) for g, s, _ in batches[None]] == [(0, 0), (0, 4), (1, 0)]
    assert all(torch.equal(a, b) for (*_, a), (*_, b) in zip(batches[1], batches[None], strict=True))


def test_gpu_benchmark_runs_on_the_cpu_with_tiny_sizes(tmp_path):
    """tests/benchmarks/gpu_embed.py runs on a GPU in `make bench-gpu`; here its plumbing, with
    a reader process (the DataLoader path the GPU takes)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_embed", Path(__file__).parent / "benchmarks" / "gpu_embed.py")
    gpu_embed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_embed)
    r = gpu_embed.run(tmp_path, device="cpu", model="test_efficientnet", cases=2, tiles=10, tile_size=64,
                      input_size=32, batch_size=4, reps=1, bare_iters=1, read_processes=1)
    assert r["tiles"] == 20 and r["read_processes"] == 1
    assert min(r["bare_fp32"], r["reader"], r["reader_one_process"], r["end_to_end"]) > 0
    assert r["min_cosine_vs_cpu_fp32"] > 0.9999  # the stored vectors are the model's
    assert json.loads((tmp_path / "gpu_embed.json").read_text())["end_to_end"] == r["end_to_end"]


# ---- batch-norm calibration of random embedders ------------------------------------------------
CALIBRATED = dict(name="test_efficientnet", weights="random", input_size=48, batch_size=4, normalization="imagenet")


def _calibration(store, cfg) -> dict:
    from radpath_fs.training import load_safetensors_bytes

    return load_safetensors_bytes(store.fs.cat_file(store.path(calibration_rel(cfg))), "calibration")


def test_random_batch_norm_embedder_is_calibrated_on_the_training_tiles(tmp_path):
    """A fresh network's placeholder statistics (mean 0, var 1) fade its features to ~1e-5; the
    store's model holds statistics of the training tiles, and its embeddings are that model's."""
    store = make_store(tmp_path / "s")
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    cfg = EmbedConfig(**CALIBRATED)
    eid = embedder_id(cfg)
    embed_store(store.url, cfg, device="cpu")
    state = _calibration(store, cfg)
    fresh = create_embedder(cfg.name, seed=cfg.seed).state_dict()
    means = [k for k in state if k.endswith("running_mean")]
    assert means and all(not torch.equal(state[k], fresh[k]) for k in means)
    assert {k for k in state} == set(fresh)
    for case, mag in (("c0", 20), ("c_val", 20), ("c0", 5)):
        attrs = embedding_attrs(store, eid, case, mag)
        assert attrs["calibration"] == calibration_hash(store, cfg) is not None
        stored = read_embeddings(store, eid, case, mag, dtype=np.float32)
        assert np.abs(stored).mean() > 1e-3
        np.testing.assert_allclose(stored, _recompute(store, eid, case, mag, range(attrs["tiles"])), rtol=2**-10, atol=1e-4)
    meta = normstats._read_calibration(store, calibration_rel(cfg))[2]
    # The training cases' tiles only (c_val is not one), both magnifications, all 14 of them.
    assert meta["cases"] == ["c0", "c1"] and meta["tiles"] == 14 and meta["per_magnification"] == {"20": 11, "5": 3}
    # Deterministic: the same inputs give the same file; another seed draws other tiles.
    embed_store(Store(tmp_path / "copy").url, cfg, device="cpu")
    assert Store(tmp_path / "copy").fs.cat_file(Store(tmp_path / "copy").path(calibration_rel(cfg))) == \
        store.fs.cat_file(store.path(calibration_rel(cfg)))
    small = cfg.model_copy(update={"calibration_tiles": 4})
    picks = {s: normstats._calibration_sample(store, small.model_copy(update={"seed": s}), ["20", "5"])[1] for s in (0, 1)}
    assert len(picks[0]) == 4 and {m for _, m, _ in picks[0]} == {"20", "5"} and picks[0] != picks[1]
    other = cfg.model_copy(update={"seed": 1})
    embed_store(store.url, other, device="cpu")
    assert not torch.equal(_calibration(store, other)[means[0]], state[means[0]])


def test_re_tiling_a_training_slide_redoes_the_calibration_and_its_embeddings(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    cfg = EmbedConfig(**CALIBRATED)
    eid = embedder_id(cfg)
    embed_store(store.url, cfg, device="cpu")
    before = calibration_hash(store, cfg)
    tcfg = TileConfig(tile_size=T, tiles_per_shard=4)
    # A slide outside the training cases is not in the sample: only its own arrays are redone.
    write_tile_group(store, "c_val", 20, np.full((4, T, T, 3), 30, np.uint8), np.zeros((4, 2)), np.ones(4), {}, tcfg)
    assert embed_store(store.url, cfg, device="cpu")["written"] == 1
    assert calibration_hash(store, cfg) == before
    old = read_embeddings(store, eid, "c0", 20)
    rng = np.random.default_rng(5)
    write_tile_group(store, "c1", 20, _tiles(rng, 5, (90, 60, 200)), np.zeros((5, 2)), np.ones(5), {}, tcfg)
    summary = embed_store(store.url, cfg, device="cpu")
    assert calibration_hash(store, cfg) != before
    assert summary["written"] == 6 and summary["skipped"] == 0  # every array: the model changed
    assert "other batch-norm statistics" in " ".join(capsys.readouterr().err.split())
    assert not np.array_equal(read_embeddings(store, eid, "c0", 20), old)
    np.testing.assert_allclose(read_embeddings(store, eid, "c0", 20, dtype=np.float32),
                               _recompute(store, eid, "c0", 20, range(6)), rtol=2**-10, atol=1e-4)


def test_file_weights_are_not_calibrated(tmp_path):
    from safetensors.torch import save_file

    store = make_store(tmp_path / "s")
    weights = tmp_path / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in create_embedder("test_efficientnet").state_dict().items()}, str(weights))
    cfg = EmbedConfig(**{**CALIBRATED, "weights": weights})
    embed_store(store.url, cfg, device="cpu", scheduler="sync")
    assert not store.exists(calibration_rel(cfg)) and calibration_hash(store, cfg) is None
    assert embedding_attrs(store, embedder_id(cfg), "c0", 20)["calibration"] is None


def test_calibrated_random_embeddings_separate_the_classes(tmp_path):
    """Signal: 30 slides drawn with the project's generator, 4 tissue tiles each at 0.5 µm/px
    (224 px), embedded by the store with a random batch-norm network; a linear probe on each
    slide's max || mean over 3 folds (chance 0.33). mobilenetv3_large_100 (timm's EfficientNet
    builder, batch norm throughout) stands in for efficientnet_b0, which scores 0.73-0.80 here too
    (0.43 uncalibrated) but takes ~80 s on two shared cores against ~20 s."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from radpath_fs.config import SynthConfig
    from radpath_fs.synth import plan_cohort, render_slide, slide_style

    size = 224
    cases = plan_cohort(SynthConfig(cases=30, seed=1, class_proportions={"A": 1, "O": 1, "G": 1}))
    store = Store(tmp_path / "s", create=True)
    store.write_table("cases", pd.DataFrame({"case_id": [c.case_id for c in cases], "label": [c.cls for c in cases],
                                             "split": "train", "fold": 0, "excluded": False}))
    tcfg = TileConfig(tile_size=size, tiles_per_shard=4)
    for c in cases:
        image = render_slide(1024, 1024, 0.5, slide_style(c.cls, np.random.default_rng(c.seed).spawn(2)[0])).numpy()
        tiles = [image[y:y + size, x:x + size] for y in range(0, 1024 - size + 1, size) for x in range(0, 1024 - size + 1, size)]
        tissue = np.stack([t for t in tiles if (t > 180).all(-1).mean() < 0.75][:4])
        write_tile_group(store, c.case_id, 20, tissue, np.zeros((len(tissue), 2)), np.ones(len(tissue)), {"mpp": 0.5}, tcfg)
    cfg = EmbedConfig(name="mobilenetv3_large_100", weights="random", batch_size=32, cpu_threads=2, calibration_tiles=64)
    embed_store(store.url, cfg, device="cpu")
    eid = embedder_id(cfg)
    bags = [read_embeddings(store, eid, c.case_id, 20, dtype=np.float32) for c in cases]
    x = np.stack([np.concatenate([b.max(0), b.mean(0)]) for b in bags])
    assert np.abs(x).mean() > 1e-2  # efficientnet_b0 uncalibrated: ~1e-5
    y = np.array([c.cls for c in cases])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pred = cross_val_predict(probe, x, y, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    assert balanced_accuracy_score(y, pred) >= 0.6
