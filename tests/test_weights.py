"""Embedder weights: `radpath weights fetch` through timm and a hub cache built here (offline),
`radpath weights check`, the pin every run verifies, and configs that must say which weights."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import yaml
from cli_checks import invoke
from safetensors.torch import load_file, save_file

from radpath_fs.config import EmbedConfig, load_config
from radpath_fs.embedders import create_embedder, embedder_id
from radpath_fs.errors import InputError
from radpath_fs.weights import check_weights

ROOT = Path(__file__).resolve().parents[1]
TAG = "test_efficientnet.r160_in1k"  # timm's tiny EfficientNet; its hub repo is timm/<TAG>
NAME = TAG.split(".")[0]


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face hub cache holding timm/<TAG>'s model.safetensors (seeded random
    weights): timm's own hub download finds it there and never reaches the network."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf"
    repo = cache / f"models--timm--{TAG}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(7)
    # The whole ImageNet model, classifier included, as the hub holds it.
    state = {k: v.clone().contiguous() for k, v in timm.create_model(NAME).state_dict().items()}
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    return state


def _width() -> int:
    from radpath_fs.embedders import embedding_width

    return embedding_width(create_embedder(NAME))


@pytest.fixture
def fetched(hub, tmp_path):
    result = invoke(["weights", "fetch", TAG, "--out", tmp_path / "weights"])
    assert result.exit_code == 0, result.output
    return tmp_path / "weights" / f"{NAME}.safetensors"


def test_fetch_writes_the_hubs_weights_and_their_pin(hub, fetched):
    got = load_file(str(fetched))
    assert sorted(got) == sorted(hub) and all(torch.equal(got[k], hub[k]) for k in hub)
    pin = json.loads(fetched.with_suffix(".json").read_text())
    assert pin["sha256"] == hashlib.sha256(fetched.read_bytes()).hexdigest()
    assert pin["tag"] == TAG and pin["hf_hub_id"] == f"timm/{TAG}" and pin["file"] == fetched.name
    assert pin["license"] == "apache-2.0"
    cfg = pin["pretrained_cfg"]
    assert cfg["input_size"] == [3, 160, 160] and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_fetch_of_an_unknown_tag_is_one_error(tmp_path):
    result = invoke(["weights", "fetch", f"{NAME}.no_such_tag", "--out", tmp_path / "w"])
    assert result.exit_code == 2 and len(errors(result)) == 1 and "list_pretrained" in errors(result)[0]
    assert not (tmp_path / "w").exists()


def test_check_reports_the_file_and_names_the_keys_that_do_not_fit(fetched):
    result = invoke(["weights", "check", fetched, "--embedder", NAME])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sha256"] == hashlib.sha256(fetched.read_bytes()).hexdigest() and report["pin"] == TAG
    assert report["output_width"] == _width() and report["keys"] == len(report["shapes"])
    assert report["shapes"]["classifier.bias"] == [1000]
    bad = invoke(["weights", "check", fetched, "--embedder", "resnet18"])
    assert bad.exit_code == 2 and len(errors(bad)) == 1
    assert "weights do not fit the ResNet embedder" in errors(bad)[0]
    assert "missing keys (first: conv1.weight" in errors(bad)[0] and "unexpected keys (first: " in errors(bad)[0]
    fetched.write_bytes(fetched.read_bytes()[:-1] + b"\0")  # one byte off: not the pinned file any more
    tampered = invoke(["weights", "check", fetched, "--embedder", NAME])
    assert tampered.exit_code == 2 and "does not match its pin" in errors(tampered)[0]


def _pipeline(tmp_path: Path, embed: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "device": "cpu",
        "data": {"root": str(tmp_path / "data"), "synth": {"cases": 4, "wsi_size": [512, 512], "mri_size": [8, 8, 8]}},
        "ingest": {"folds": 2}, "embed": {"name": NAME, **embed}, "wsi": {"mode": "head"},
    }))
    return path


@pytest.mark.parametrize("case", ["missing file", "missing pin", "wrong hash"])
def test_a_pipeline_without_its_pinned_weights_fails_before_any_step(tmp_path, case):
    weights = tmp_path / "weights" / f"{NAME}.safetensors"
    weights.parent.mkdir()
    if case != "missing file":
        save_file({"x": torch.zeros(1)}, str(weights))
    if case == "wrong hash":
        weights.with_suffix(".json").write_text(json.dumps({"tag": TAG, "sha256": "0" * 64}))
    result = invoke(["run", _pipeline(tmp_path, {"weights": str(weights), "weights_tag": TAG})])
    assert result.exit_code == 2, result.output
    (line,) = errors(result)
    assert f"radpath weights fetch {TAG} --out {weights.parent}" in line
    assert {"missing file": "weights file not found", "missing pin": "pin of the weights file is missing",
            "wrong hash": "does not match its pin"}[case] in line
    assert not (tmp_path / "store").exists() and not (tmp_path / "data").exists()  # not even the synth step ran


def test_the_pinned_file_passes_and_names_the_embedder(fetched, tmp_path):
    cfg = EmbedConfig(name=NAME, weights=fetched, weights_tag=TAG)
    check_weights(cfg)
    assert embedder_id(cfg).startswith(f"{NAME}-w{hashlib.sha256(fetched.read_bytes()).hexdigest()[:12]}-")
    other = fetched.with_suffix(".json")
    other.write_text(other.read_text().replace(TAG, f"{NAME}.other_in1k"))
    with pytest.raises(InputError, match="pins weights of 'test_efficientnet.other_in1k'"):
        check_weights(cfg)


def test_weights_must_be_said(tmp_path):
    result = invoke(["run", _pipeline(tmp_path, {})])
    assert result.exit_code == 2 and "embed.weights is not set" in errors(result)[0] and "random" in errors(result)[0]
    assert not (tmp_path / "data").exists()
    random = EmbedConfig(name=NAME, weights="random")
    check_weights(random)
    assert "-random-s0-" in embedder_id(random)


def test_the_recipes_name_their_weights():
    cpm = load_config(ROOT / "pipelines/cpm2020.yaml").embed
    assert cpm.weights == Path("weights/efficientnet_b0.safetensors") and cpm.weights_tag == "efficientnet_b0.ra_in1k"
    assert not cpm.pretrained
    assert load_config(ROOT / "pipelines/demo.yaml").embed.weights == "random"
    ignored = subprocess.run(["git", "check-ignore", "-q", "weights/efficientnet_b0.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0  # fetched weights stay out of the repository


# ---- presets whose weights are on the Hugging Face hub -----------------------------------------
def test_a_gated_preset_says_where_to_ask_and_how_to_use_a_file(tmp_path, monkeypatch):
    """The hub's refusal of a gated repository (its own error type, raised here without a network)
    becomes one error: where to request access, and how to point embed.weights at a file."""
    import importlib

    from huggingface_hub import errors as hub_errors

    url = "https://huggingface.co/MahmoodLab/UNI/resolve/main/config.json"
    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])  # the hub's HTTP client

    def refuse(*args, **kwargs):
        response = http.Response(403, request=http.Request("GET", url))
        raise hub_errors.GatedRepoError(f"403 Client Error. Cannot access gated repo for url {url}.", response=response)

    monkeypatch.setattr(timm, "create_model", refuse)
    result = invoke(["weights", "fetch", "uni", "--out", tmp_path / "w"])
    assert result.exit_code == 2 and len(errors(result)) == 1, result.output
    line = errors(result)[0]
    assert "https://huggingface.co/MahmoodLab/UNI" in line and "Request access" in line and "HF_TOKEN" in line
    assert "embed.weights" in line and "radpath weights check FILE --embedder uni" in line
    assert not (tmp_path / "w" / "uni.safetensors").exists()


def _fetch_offline(monkeypatch, out, preset: str, stand_in) -> tuple[list[str], object, dict]:
    """`radpath weights fetch PRESET` with timm's random initialisation of `stand_in(name)` in place
    of the hub: (the names timm was asked to build, the weights file, its pin)."""
    built, create = [], timm.create_model

    def offline(name, pretrained=False, **kwargs):
        built.append(name)
        torch.manual_seed(3)
        return create(stand_in(name), **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    result = invoke(["weights", "fetch", preset, "--out", out])
    monkeypatch.setattr(timm, "create_model", create)
    assert result.exit_code == 0, result.output
    path = out / f"{preset}.safetensors"
    return built, path, json.loads(path.with_suffix(".json").read_text())


def test_a_hub_presets_weights_are_fetched_with_its_architecture_and_pinned(tmp_path, monkeypatch):
    """`radpath weights fetch lunit_dino_vits8` builds the preset's own architecture from its hub id
    (here timm's random initialisation stands in for the hub) and writes the timm model's keys; a
    config naming that file and tag passes its pin check and loads it."""
    from radpath_fs.presets import PRESETS

    built, path, pin = _fetch_offline(monkeypatch, tmp_path / "w", "lunit_dino_vits8",
                                      lambda name: PRESETS["lunit_dino_vits8"].model)
    assert built == ["hf-hub:1aurent/vit_small_patch8_224.lunit_dino"]
    assert pin["tag"] == "lunit_dino_vits8" and pin["hf_hub_id"] == "1aurent/vit_small_patch8_224.lunit_dino"
    assert "cls_token" in load_file(str(path)) and not any(k.startswith("trunk.") for k in load_file(str(path)))
    cfg = EmbedConfig(name="lunit_dino_vits8", weights=path, weights_tag="lunit_dino_vits8")
    check_weights(cfg)
    assert torch.equal(create_embedder(cfg.name, cfg.weights_file).state_dict()["pos_embed"], load_file(str(path))["pos_embed"])


def test_the_truncated_resnet_preset_fetches_only_the_layers_it_keeps(tmp_path, monkeypatch):
    """resnet50_trunc is fetched from timm's resnet50.tv_in1k (timm's random initialisation stands in
    for the hub here): the file holds conv1 to layer3 under timm's names, no layer4 and no classifier,
    and is pinned under the preset's name, so a config can name it."""
    built, path, pin = _fetch_offline(monkeypatch, tmp_path / "w", "resnet50_trunc", lambda name: name.split(".")[0])
    assert built == ["resnet50.tv_in1k"]
    keys = load_file(str(path))
    assert "layer3.5.conv3.weight" in keys and not any(k.startswith(("layer4.", "fc.")) for k in keys)
    assert pin["tag"] == "resnet50_trunc" and pin["hf_hub_id"] == "timm/resnet50.tv_in1k"
    cfg = EmbedConfig(name="resnet50_trunc", weights=path, weights_tag="resnet50_trunc")
    check_weights(cfg)
    assert torch.equal(create_embedder(cfg.name, path).trunk.state_dict()["conv1.weight"], keys["conv1.weight"])
