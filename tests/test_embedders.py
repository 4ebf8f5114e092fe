"""Embedder presets: every preset builds (on torch's meta device: no memory, no download) with its
published width, takes a state dict with its own key names, and reads its output as its authors do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from radpath_fs import embedders
from radpath_fs.config import EmbedConfig
from radpath_fs.embedders import ClassPatchMean, create_embedder, embedder_id, embedding_width, timm_model
from radpath_fs.errors import InputError
from radpath_fs.presets import PRESETS, EmbedderPreset

# The embedding widths the model cards and the authors' code state, written out here rather than
# read from PRESETS, so that a wrong record fails.
PUBLISHED_WIDTH = {
    "efficientnet_b0": 1280, "mobilenetv3_small_050": 1024, "resnet18": 512, "resnet50_trunc": 1024,
    "uni": 1024, "uni2_h": 1536, "virchow": 2560, "virchow2": 2560, "h_optimus_0": 1536, "h_optimus_1": 1536,
    "h0_mini": 768, "prov_gigapath": 1536, "lunit_dino_vits8": 384, "kaiko_vits16": 384,
}

# Parameter counts (millions) as LazySlide's model zoo records them from the model cards: they pin
# the architectures' hyperparameters (depth, width, MLP ratio, registers) that the width alone does not.
PUBLISHED_PARAMS_M = {"uni": 303.4, "uni2_h": 681.4, "virchow": 631.2, "virchow2": 631.2, "h_optimus_0": 1130,
                      "h_optimus_1": 1130, "h0_mini": 85.7, "prov_gigapath": 1130}


def test_every_preset_has_a_published_width():
    assert sorted(PRESETS) == sorted(PUBLISHED_WIDTH)


@pytest.mark.parametrize("name", sorted(PUBLISHED_WIDTH))
def test_preset_builds_on_meta_with_its_published_width(name):
    preset = PRESETS[name]
    with torch.device("meta"):
        model = create_embedder(name)
        out = model(torch.empty(2, 3, preset.input_size, preset.input_size))
    assert tuple(out.shape) == (2, PUBLISHED_WIDTH[name])
    assert embedding_width(model) == PUBLISHED_WIDTH[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_preset_architecture_has_the_published_parameter_count(name):
    with torch.device("meta"):
        params = sum(p.numel() for p in create_embedder(name).parameters())
    assert params / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.005)


def test_radpath_embedders_lists_every_preset():
    from cli_checks import invoke

    result = invoke(["embedders"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:5] == ["name", "L", "input", "µm/px", "normalization"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert sorted(listed) == sorted(PRESETS)
    assert listed["virchow2"].split()[1:8] == ["2560", "224", "center", "0.5", "preset", "cls_patch_mean",
                                               "hf-hub:paige-ai/Virchow2"]
    assert listed["uni"].split()[8:] == ["gated", "CC-BY-NC-ND-4.0"]
    assert listed["lunit_dino_vits8"].split()[8] == "open"


def _own_state_dict(name: str) -> dict:
    """A state dict with the preset's own key names and shapes (zeros: the values do not matter)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_embedder(name).state_dict().items()}
    return {k.removeprefix("trunk."): torch.zeros(s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["lunit_dino_vits8", "resnet50_trunc"])
def test_a_state_dict_with_the_presets_own_keys_loads(tmp_path, name):
    state = _own_state_dict(name)
    first = next(iter(state))
    state[first] = torch.full_like(state[first], 0.5)
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    model = create_embedder(name, path)
    assert torch.equal(timm_model(model).state_dict()[first], state[first])
    if name == "resnet50_trunc":  # the read-out wraps the trunk; the file has the trunk's names
        assert all(not k.startswith("trunk.") for k in state) and "layer3.5.bn3.running_var" in state


def test_a_wrong_state_dict_is_refused_naming_the_keys(tmp_path):
    state = _own_state_dict("lunit_dino_vits8")
    del state["blocks.3.attn.qkv.weight"]
    state["blocks.3.attn.qkv_typo.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 5, 384)
    path = tmp_path / "lunit.safetensors"
    save_file(state, str(path))
    with pytest.raises(InputError) as e:
        create_embedder("lunit_dino_vits8", path)
    msg = str(e.value)
    assert "blocks.3.attn.qkv.weight" in msg and "blocks.3.attn.qkv_typo.weight" in msg and "pos_embed" in msg


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, class_token=True, reg_tokens=4,
                             global_pool="", img_size=32).eval()


def test_class_patch_mean_excludes_registers_and_puts_the_class_token_first():
    trunk = _tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = trunk.forward_features(x)  # class token, 4 registers, 4 patch tokens
        out = ClassPatchMean(trunk)(x)
    assert tokens.shape[1] == 1 + 4 + 4
    d = tokens.shape[2]
    assert out.shape == (3, 2 * d)
    torch.testing.assert_close(out[:, :d], tokens[:, 0])
    torch.testing.assert_close(out[:, d:], tokens[:, 5:].mean(dim=1))
    # Including the registers would give another vector: the test can tell them apart.
    assert not torch.allclose(out[:, d:], tokens[:, 1:].mean(dim=1))


def test_the_read_out_is_part_of_the_model_create_embedder_returns(monkeypatch):
    """A preset with the cls_patch_mean read-out: the model itself returns class ‖ patch mean, so
    every caller (embedding, finetuning, bundles) gets that vector."""
    tiny = EmbedderPreset("vit_tiny_patch16_224", num_features=384, readout="cls_patch_mean",
                          timm_kwargs={"reg_tokens": 4, "global_pool": "", "img_size": 32})
    monkeypatch.setitem(embedders.PRESETS, "tiny_virchow", tiny)
    model = create_embedder("tiny_virchow").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.trunk.forward_features(x)
        out = model(x)
    assert embedding_width(model) == 384 and out.shape == (2, 384)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1))


def test_a_read_out_of_tokens_needs_a_class_token():
    import timm

    from radpath_fs.errors import ConfigError

    trunk = timm.create_model("vit_tiny_patch16_224", num_classes=0, class_token=False, global_pool="avg",
                              img_size=32)
    with pytest.raises(ConfigError, match="no class token"):
        ClassPatchMean(trunk)


# ---- a preset's transform: its input size, crop and normalisation are the config's defaults ----
def test_a_presets_transform_is_the_default_and_a_given_one_wins():
    uni = EmbedConfig(name="uni", weights="random")
    assert (uni.normalization, uni.input_size, uni.crop) == ("preset", 224, "resize")
    assert embedder_id(uni) == "uni-random-s0-r224-preset"
    given = EmbedConfig(name="uni", weights="random", normalization="imagenet", input_size=256, crop="center")
    assert (given.normalization, given.input_size, given.crop) == ("imagenet", 256, "center")
    # The paper's encoder and any other timm model keep the dataset normalisation of the paper.
    assert EmbedConfig().normalization == "dataset" and EmbedConfig(name="resnet34").normalization == "dataset"


def test_another_embedder_from_the_command_line_takes_its_own_defaults():
    from radpath_fs.cli import with_options

    assert with_options(EmbedConfig(weights="random"), name="virchow").normalization == "preset"
    said = EmbedConfig(weights="random", normalization="dataset", input_size=256)
    assert (with_options(said, name="uni").normalization, with_options(said, name="uni").input_size) == ("dataset", 256)


def test_preset_normalization_is_the_encoders_own():
    from radpath_fs.errors import ConfigError
    from radpath_fs.normstats import normalization_stats

    hopt = EmbedConfig(name="h_optimus_0", weights="random")
    assert normalization_stats(None, hopt, None) == ([0.707223, 0.578729, 0.703617], [0.211883, 0.230117, 0.177517])
    # A plain timm model: the mean/std timm states for its pretrained weights.
    vit = EmbedConfig(name="vit_small_patch16_224", weights="random", normalization="preset")
    assert normalization_stats(None, vit, None) == ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="embed.normalization: preset"):
        normalization_stats(None, EmbedConfig(name="botnet50ts_256", weights="random", normalization="preset"), None)


def test_a_vit_preset_embeds_a_store_with_its_own_normalisation(tmp_path):
    """Lunit's ViT-S/8 (random weights) embeds the small test store: the embedder id says `preset`,
    the recorded transform holds Lunit's mean/std, and the stored vectors recompute from the
    stored pixels with that transform."""
    from test_embed import _recompute, make_store

    from radpath_fs.embed import embed_store
    from radpath_fs.embeddings import embedding_attrs, read_embeddings

    store = make_store(tmp_path / "s")
    cfg = EmbedConfig(name="lunit_dino_vits8", weights="random", input_size=48, batch_size=8, magnifications=[20],
                      dtype="float32")
    summary = embed_store(store.url, cfg, device="cpu")
    eid = summary["embedder_id"]
    assert eid == "lunit_dino_vits8-random-s0-c48-preset" and summary["tiles"] == 15
    attrs = embedding_attrs(store, eid, "c0", 20)
    assert attrs["transform"]["mean"] == list(PRESETS["lunit_dino_vits8"].mean)
    assert attrs["transform"]["std"] == list(PRESETS["lunit_dino_vits8"].std)
    stored = read_embeddings(store, eid, "c0", 20)
    assert stored.shape == (6, 384)
    np.testing.assert_allclose(stored, _recompute(store, eid, "c0", 20, range(6)), rtol=1e-5, atol=1e-5)


def test_a_head_mode_model_trains_and_predicts_on_a_foundation_presets_embeddings(tmp_path):
    """Kaiko's ViT-S/16 (random weights) through the real chain: stage two takes the embedding width
    from the store (384, not any CNN's), and the model and its predictions name the preset's
    embedder."""
    from chain_data import CHAIN, run_chain, synth_data

    from radpath_fs.config import PipelineConfig
    from radpath_fs.layout import model_config_path, prediction_table_name

    settings = CHAIN.model_dump(mode="json", exclude_unset=True)
    settings["embed"] = {**settings["embed"], "name": "kaiko_vits16"}  # the preset's own transform defaults
    cfg = PipelineConfig.model_validate(settings)
    assert cfg.embed.normalization == "preset" and cfg.embed.input_size == CHAIN.embed.input_size
    store = run_chain(str(tmp_path / "store"), synth_data(tmp_path / "data"), cfg)
    model_id = f"wsi-mag20-fold0-e{cfg.wsi.epochs - 1}"
    config = store.read_json(model_config_path(model_id))
    assert config["embedder"]["id"] == embedder_id(cfg.embed) == "kaiko_vits16-random-s0-c64-preset"
    assert config["head"]["in_features"] == PUBLISHED_WIDTH["kaiko_vits16"]
    oof = store.read_table(prediction_table_name(model_id, "oof"))
    assert len(oof) > 0 and np.allclose(oof[["prob_A", "prob_O", "prob_G"]].sum(axis=1), 1, atol=1e-5)


def test_the_foundation_recipe_is_the_papers_chain_with_the_presets_transform():
    """pipelines/uni2_head.yaml: the preset's input, resize and normalisation; head mode at the
    encoder's 20x; the MRI, inference and fusion are the paper's recipe."""
    from pathlib import Path

    from radpath_fs.config import load_config

    root = Path(__file__).resolve().parents[1] / "pipelines"
    cfg, paper = load_config(root / "uni2_head.yaml"), load_config(root / "cpm2020.yaml")
    preset = PRESETS[cfg.embed.name]
    assert (cfg.embed.input_size, cfg.embed.crop, cfg.embed.normalization) == (preset.input_size, preset.crop, "preset")
    assert preset.mpp == 0.5 and cfg.wsi.mode == "head" and cfg.wsi.magnifications == cfg.embed.magnifications == [20]
    for section in ("mri", "predict", "fusion"):
        assert getattr(cfg, section) == getattr(paper, section), section
    assert (cfg.wsi.epochs, cfg.wsi.snapshots, cfg.wsi.tiles_per_slide) == (paper.wsi.epochs, paper.wsi.snapshots,
                                                                           paper.wsi.tiles_per_slide)


def test_a_vit_preset_embeds_the_real_cmu1_tiles_end_to_end(tmp_path):
    """Kaiko's ViT-S/16 (random weights) with its own transform (centre crop to 224, mean = std =
    0.5) on the 20x tiles of the real CMU-1 H&E slide: one vector per kept tile, and the stored
    vectors equal a recomputation from the stored pixels with the recorded transform."""
    from test_embed import _recompute
    from test_tile import CMU, case_row
    from test_tile import make_store as slide_store

    from radpath_fs import wsi
    from radpath_fs.config import TileConfig
    from radpath_fs.embed import embed_store
    from radpath_fs.embeddings import embedding_attrs, read_embeddings

    store = slide_store(tmp_path / "s", [case_row("CMU1", CMU, 0.499)])
    wsi.tile_store(store.url, TileConfig(tile_size=256, magnifications=[20]))
    cfg = EmbedConfig(name="kaiko_vits16", weights="random", magnifications=[20], dtype="float32", batch_size=32)
    summary = embed_store(store.url, cfg, device="cpu")
    eid, n = summary["embedder_id"], wsi.tile_count(store, "CMU1", 20)
    assert eid == "kaiko_vits16-random-s0-c224-preset" and summary["tiles"] == n >= 20
    transform = embedding_attrs(store, eid, "CMU1", 20)["transform"]
    assert (transform["crop"], transform["size"], transform["mean"]) == ("center", 224, [0.5, 0.5, 0.5])
    stored = read_embeddings(store, eid, "CMU1", 20)
    assert stored.shape == (n, PUBLISHED_WIDTH["kaiko_vits16"]) and np.isfinite(stored).all()
    rows = list(range(0, n, 3))
    np.testing.assert_allclose(stored[rows], _recompute(store, eid, "CMU1", 20, rows), rtol=1e-4, atol=1e-4)
