"""Embedders: tile encoders built by name, with their weights.

- `PRESETS` (`radpath_fs.presets`): the embedders this package knows, each an `EmbedderPreset`
  record of facts (the timm model and its arguments, the read-out, embedding width L, input size,
  crop, normalisation). A new encoder is one entry; any other timm model name works too, with the
  facts timm states.
- `create_embedder(name, weights=None, pretrained=False)`: the model without its classifier
  (``num_classes=0``), its output the preset's read-out (`presets.Readout`), so that embedding,
  finetuning and bundles all get the same vector. Weights come from a local .safetensors/.pth
  state dict (tensors only: safetensors, or ``torch.load(weights_only=True)`` whose restricted
  unpickler builds tensors and containers and refuses everything else), from timm's own source
  when asked (``pretrained=True``, online machines), or are random from a seed.
- `check_file(path, embedder)` (`radpath weights check`): offline; the file's keys, shapes, output
  width and SHA-256, or an InputError naming the keys that do not fit.
- `embedder_id(cfg)`: the store name of an embedder, encoding model, weights and transform,
  e.g. ``efficientnet_b0-random-s0-c224-dataset`` or ``efficientnet_b0-w3fa2c1d9e0b7-c224-imagenet``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radpath_fs.config import EmbedConfig
from radpath_fs.errors import ConfigError, InputError
from radpath_fs.presets import PRESETS, EmbedderPreset
from radpath_fs.store import check_name
from radpath_fs.weights import pin_path, sha256_file, verify_pin

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class _Readout(nn.Module):
    """A timm trunk whose output `forward` turns into the embedding. The trunk keeps its own
    parameter names, so a published state dict loads into `trunk` as it is."""

    def __init__(self, trunk: nn.Module, num_features: int):
        super().__init__()
        self.trunk = trunk
        self.num_features = num_features


class ClassPatchMean(_Readout):
    """Class token ‖ mean of the patch tokens, register tokens excluded (Virchow, Virchow2).

    timm puts the prefix tokens first, the class token then the registers (`num_prefix_tokens`
    in all), so the patch tokens are the ones after them."""

    def __init__(self, trunk: nn.Module):
        if getattr(trunk, "cls_token", None) is None:
            raise ConfigError(f"read-out cls_patch_mean: {type(trunk).__name__} has no class token")
        super().__init__(trunk, 2 * trunk.num_features)

    def forward(self, x):
        tokens = self.trunk.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.trunk.num_prefix_tokens:].mean(dim=1)], dim=-1)


class FeatureMapMean(_Readout):
    """Spatial mean of the last feature map of a ``features_only`` trunk (CLAM's truncated ResNet-50)."""

    def __init__(self, trunk: nn.Module):
        super().__init__(trunk, trunk.feature_info.channels()[-1])

    def forward(self, x):
        return self.trunk(x)[-1].mean(dim=(2, 3))


_READOUTS = {"cls_patch_mean": ClassPatchMean, "feature_map_mean": FeatureMapMean}


def create_embedder(
    name: str = "efficientnet_b0",
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    *,
    seed: int = 0,
    **kwargs: Any,
):
    """Embedder `name` (a `PRESETS` entry, or any timm model) with the classifier removed and the
    preset's read-out applied; `embedding_width(model)` is the embedding size L.

    `weights`: a local state dict (.safetensors, or .pth/.pt/.bin read with ``weights_only``) with
    the timm model's own key names; classifier keys in it are ignored, any other mismatch is an
    InputError naming the file and the first offending keys. `pretrained=True` downloads through
    timm (only when asked), from the preset's `hub_id` where it has one.
    Otherwise (None or ``"random"``) the weights are timm's random initialisation drawn from `seed`
    (reproducible).
    Extra keyword arguments go to ``timm.create_model`` (e.g. ``drop_rate``).
    """
    import timm

    preset = PRESETS.get(name)
    if preset is None and not timm.is_model(name):
        raise ConfigError(
            f"embed.name {name!r}: not a timm model (`python -c \"import timm; print(timm.list_models('*b0*'))\"` "
            f"lists them) nor a preset ({', '.join(PRESETS)})"
        )
    if isinstance(weights, str) and weights == "random":
        weights = None
    if weights is not None and pretrained:
        raise ConfigError("embed: give either weights (a local file) or pretrained=True, not both")
    arch, preset_kwargs = (name, {}) if preset is None else preset.timm_args(pretrained)
    readout = "pooled" if preset is None else preset.readout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **{**preset_kwargs, **kwargs})
    if readout in _READOUTS:
        model = _READOUTS[readout](model)
    if preset is not None and embedding_width(model) != preset.num_features:
        raise ConfigError(f"embedder preset {name!r} says L={preset.num_features}, "
                          f"and {preset.model} gives {embedding_width(model)}; correct PRESETS")
    if weights is not None:
        load_weights(model, weights)
    return model


def timm_model(embedder) -> nn.Module:
    """The timm model of an embedder of `create_embedder` (the trunk under its read-out): the
    module whose state dict a published weights file holds."""
    return embedder.trunk if isinstance(embedder, _Readout) else embedder


def embedding_width(embedder) -> int:
    """L, the width of what `create_embedder` returns. Where a timm model has a head stage after
    its features (MobileNetV3, LCNet, GhostNet), timm's `num_features` is the width before that
    stage and `head_hidden_size` the width of the output."""
    return int(getattr(embedder, "head_hidden_size", None) or embedder.num_features)


def preset_normalization(name: str) -> tuple[list[float], list[float]]:
    """(mean, std) of ``embed.normalization: preset``: the preset's, or, for another timm model,
    the ones timm states for its default pretrained weights."""
    import timm

    preset = PRESETS.get(name)
    if preset is not None:
        return list(preset.mean), list(preset.std)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm's word for a model without pretrained weights
        cfg = None
    # A model without published weights has a placeholder config: its mean/std belong to no training.
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file) or cfg.mean is None or cfg.std is None:
        raise ConfigError(f"embed.normalization: preset: {name} is not a preset and timm has no pretrained "
                          "weights of it to take a mean/std from; use dataset or imagenet")
    return list(cfg.mean), list(cfg.std)


def read_state_dict(path: Path) -> dict:
    from radpath_fs.training import load_safetensors_bytes

    if not path.is_file():
        raise InputError(path, "weights file not found")
    if path.suffix == ".safetensors":
        return load_safetensors_bytes(path.read_bytes(), str(path))
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise InputError(path, f"unknown weights format; expected one of {', '.join(_WEIGHT_SUFFIXES)}")
    # Published weights are mostly .pth: the restricted unpickler builds tensors and plain
    # containers only and refuses any other global, so nothing of the file's choosing runs.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for non-tensor pickles, RuntimeError for non-zip files
        raise InputError(
            path, f"not a state dict of tensors loadable with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    # Training checkpoints often wrap the state dict.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def load_weights(model, weights: str | os.PathLike) -> None:
    """Load a local state dict into an embedder of `create_embedder` (its timm model, under any
    read-out); strict apart from the classifier."""
    model = timm_model(model)
    path = Path(weights)
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier or ()))
    if prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        arch = type(model).__name__
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {shapes[0]})")
        raise InputError(path, f"weights do not fit the {arch} embedder: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def weights_hash(path: str | os.PathLike | None) -> str:
    """First 12 hex digits of the SHA-256 of a weights file; ``"random"`` for no file."""
    if path is None:
        return "random"
    try:
        return sha256_file(path)[:12]
    except InputError:
        raise InputError(path, "weights file not found") from None


def embedder_id(cfg: EmbedConfig) -> str:
    """The store name of an embedder: model, weights, transform (crop and size), normalisation.

    Weights part: ``w<sha256[:12]>`` for a file, ``pretrained`` for timm's source, ``random-s<seed>``.
    Transform part: ``c224`` (center crop) or ``r224`` (resize).
    """
    if cfg.weights_file is not None:
        wpart = "w" + weights_hash(cfg.weights_file)
    elif cfg.pretrained:
        wpart = "pretrained"
    else:
        wpart = f"random-s{cfg.seed}"
    tpart = f"{'c' if cfg.crop == 'center' else 'r'}{cfg.input_size}"
    return check_name(f"{cfg.name}-{wpart}-{tpart}-{cfg.normalization}", "embedder id")


def embedder_record(cfg: EmbedConfig) -> dict:
    """What identifies the model half of an embedding (the transform records the rest)."""
    import timm

    return {
        "embedder_id": embedder_id(cfg),
        "model": cfg.name,
        "weights": None if cfg.weights is None else str(cfg.weights),
        "weights_hash": weights_hash(cfg.weights_file),
        "pretrained": cfg.pretrained,
        "seed": cfg.seed,
        "normalization": cfg.normalization,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }


def check_file(path: str | os.PathLike, embedder: str) -> dict:
    """What a weights file holds and whether it fits `embedder`: an InputError naming the offending keys if not."""
    path = Path(path)
    state = read_state_dict(path)
    model = create_embedder(embedder, path)
    report = {
        "file": str(path),
        "embedder": embedder,
        "sha256": sha256_file(path),
        "output_width": embedding_width(model),
        "keys": len(state),
        "shapes": {k: list(v.shape) for k, v in state.items()},
    }
    if pin_path(path).is_file():
        report["pin"] = verify_pin(path, None)["tag"]
    return report


__all__ = [
    "PRESETS",
    "EmbedderPreset",
    "check_file",
    "create_embedder",
    "embedder_id",
    "embedder_record",
    "embedding_width",
    "load_weights",
    "preset_normalization",
    "timm_model",
    "read_state_dict",
    "weights_hash",
]
