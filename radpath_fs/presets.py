"""Embedder presets: each encoder this package knows, as one declarative record.

Plain data (no torch), so that the config can take a preset's input size, crop and normalisation
as its defaults; `radpath_fs.embedders` builds the models. A record states what its source states:
the source is named in a comment above it, and a fact the source does not give says so there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What a model's output is turned into, one tile's embedding:
#   pooled: timm's pooled output (``num_classes=0``), as the model's ``global_pool`` defines it;
#   cls_patch_mean: the class token, then the mean of the patch tokens (register tokens excluded);
#   feature_map_mean: the spatial mean of the last feature map of a ``features_only`` trunk.
Readout = Literal["pooled", "cls_patch_mean", "feature_map_mean"]
READOUTS: tuple[str, ...] = ("pooled", "cls_patch_mean", "feature_map_mean")


@dataclass(frozen=True)
class EmbedderPreset:
    """An embedder as data: what to build, how to read its output, and how its input is made."""

    model: str  # the timm architecture ``timm.create_model`` builds
    num_features: int  # L, the width of one tile's embedding (after the read-out)
    input_size: int = 224  # the side of the model's input
    crop: Literal["center", "resize"] = "center"  # how a stored tile becomes the input
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the normalisation it was trained with
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float | None = None  # the µm/px its tiles were at (None: not one, or not stated)
    readout: Readout = "pooled"
    # Further ``timm.create_model`` arguments. ``mlp_layer`` names a class of ``timm.layers``
    # (e.g. "SwiGLUPacked"), ``act_layer`` a timm activation name (e.g. "silu"): the record stays data.
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Where the published weights are: a timm tag (``radpath weights fetch`` takes it) or a
    # Hugging Face hub id (``hf-hub:org/name``).
    hub_id: str | None = None
    licence: str = ""  # licence and access terms, as the source states them
    # embed.normalization when the config does not say: "preset" (the mean/std above) for
    # published encoders; "dataset" for the paper's fine-tuned CNNs, normalised by the training tiles.
    normalization: Literal["preset", "dataset"] = "preset"
    gated: bool = False  # the hub serves the weights only to accounts granted access

    def __post_init__(self):
        if self.readout not in READOUTS:
            raise ValueError(f"readout {self.readout!r}: expected one of {', '.join(READOUTS)}")

    def timm_args(self, pretrained: bool = False) -> tuple[str, dict[str, Any]]:
        """(name, keyword arguments) for ``timm.create_model``: the hub id where the published
        weights are wanted, else the architecture; a named ``mlp_layer`` resolved to its timm class."""
        kwargs = dict(self.timm_kwargs)
        if isinstance(kwargs.get("mlp_layer"), str):
            import timm.layers

            kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
        return (self.hub_id if pretrained and self.hub_id else self.model), kwargs


# Sources. TRIDENT is the Mahmood lab's patch-encoder factory
# (https://github.com/mahmoodlab/TRIDENT, trident/patch_encoder_models/load.py); its README's
# encoder table gives each encoder's width, tile size, magnification (20x, which is 0.5 µm/px),
# licence, and whether the hub gates it (a lock). LazySlide's model zoo
# (https://github.com/rendeirolab/LazySlide, src/lazyslide/models/vision/) records licences, gating
# and parameter counts; the meta-device test checks the architectures below against those counts.
_VIT_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}

# H-optimus-0, ViT-g/14 with 4 registers. https://huggingface.co/bioptimus/H-optimus-0
# (TRIDENT "hoptimus0"; the eva framework's bioptimus backbones): vit_giant_patch14_reg4_dinov2,
# init_values 1e-5, global_pool "token"; mean (0.707223, 0.578729, 0.703617), std (0.211883,
# 0.230117, 0.177517); 224 px tiles at 20x. Licence: Apache-2.0; TRIDENT marks it gated,
# LazySlide does not.
_H_OPTIMUS_0 = EmbedderPreset(
    "vit_giant_patch14_reg4_dinov2", num_features=1536, mpp=0.5,
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True},
    hub_id="hf-hub:bioptimus/H-optimus-0", licence="Apache-2.0",
    gated=True)

PRESETS: dict[str, EmbedderPreset] = {
    # The paper's encoder (CPM-RadPath 2020): ImageNet EfficientNet-b0, fine-tuned end to end on
    # tiles normalised by the training set's statistics.
    "efficientnet_b0": EmbedderPreset("efficientnet_b0", num_features=1280, normalization="dataset",
                                      hub_id="efficientnet_b0.ra_in1k", licence="apache-2.0 (timm)"),
    # Small CNNs for tests and CPU runs.
    "mobilenetv3_small_050": EmbedderPreset("mobilenetv3_small_050", num_features=1024, normalization="dataset",
                                            hub_id="mobilenetv3_small_050.lamb_in1k",
                                            licence="apache-2.0 (timm)"),
    "resnet18": EmbedderPreset("resnet18", num_features=512, normalization="dataset",
                               hub_id="resnet18.a1_in1k", licence="apache-2.0 (timm)"),
    # CLAM's encoder: ImageNet ResNet-50 cut after layer3, spatially averaged (1024-d).
    # https://github.com/mahmoodlab/CLAM (models/resnet_custom.py); TRIDENT "resnet50":
    # timm resnet50.tv_in1k, features_only, out_indices [3], AdaptiveAvgPool2d(1), ImageNet
    # mean/std, centre crop to 224 of 256 px tiles at 20x.
    "resnet50_trunc": EmbedderPreset(
        "resnet50", num_features=1024, mpp=0.5, readout="feature_map_mean",
        timm_kwargs={"features_only": True, "out_indices": (3,)},
        hub_id="resnet50.tv_in1k", licence="bsd-3-clause (timm)"),
    # UNI, ViT-L/16. https://huggingface.co/MahmoodLab/UNI: timm vit_large_patch16_224,
    # init_values=1e-5, dynamic_img_size=True; Resize(224), ImageNet mean/std; 256 px tiles at 20x
    # (TRIDENT). Licence: CC-BY-NC-ND-4.0, gated.
    "uni": EmbedderPreset(
        "vit_large_patch16_224", num_features=1024, crop="resize", mpp=0.5,
        timm_kwargs={"patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        hub_id="hf-hub:MahmoodLab/UNI", licence="CC-BY-NC-ND-4.0",
        gated=True),
    # UNI2-h, ViT-H/14 with 8 register tokens. https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs
    # as in TRIDENT "uni_v2"): vit_giant_patch14_224, depth 24, 24 heads, embed 1536, mlp_ratio
    # 2.66667*2, SwiGLUPacked, SiLU, no_embed_class, reg_tokens 8; Resize(224), ImageNet mean/std;
    # 256 px tiles at 20x. Licence: CC-BY-NC-ND-4.0, gated.
    "uni2_h": EmbedderPreset(
        "vit_giant_patch14_224", num_features=1536, crop="resize", mpp=0.5,
        timm_kwargs={"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                     "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
                     **_VIT_SWIGLU},
        hub_id="hf-hub:MahmoodLab/UNI2-h", licence="CC-BY-NC-ND-4.0",
        gated=True),
    # Virchow, ViT-H/14. https://huggingface.co/paige-ai/Virchow (TRIDENT "virchow"):
    # vit_huge_patch14_224, init_values 1e-5, mlp_ratio 5.3375, global_pool "", SwiGLUPacked,
    # SiLU; embedding = class token ‖ mean of the patch tokens (2560); ImageNet mean/std;
    # 224 px tiles at 20x. Licence: Apache-2.0 with additional terms, gated (the card's front matter).
    "virchow": EmbedderPreset(
        "vit_huge_patch14_224", num_features=2560, mpp=0.5, readout="cls_patch_mean",
        timm_kwargs={"init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
                     **_VIT_SWIGLU},
        hub_id="hf-hub:paige-ai/Virchow", licence="Apache-2.0 with additional terms",
        gated=True),
    # Virchow2: Virchow with 4 register tokens, which the read-out skips (TRIDENT takes
    # output[:, 5:]). https://huggingface.co/paige-ai/Virchow2. Trained on mixed magnifications
    # (5x to 40x, arXiv 2408.00738); TRIDENT tiles it at 20x. Licence: CC-BY-NC-ND-4.0, gated.
    "virchow2": EmbedderPreset(
        "vit_huge_patch14_224", num_features=2560, mpp=0.5, readout="cls_patch_mean",
        timm_kwargs={"init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4,
                     "dynamic_img_size": True, **_VIT_SWIGLU},
        hub_id="hf-hub:paige-ai/Virchow2", licence="CC-BY-NC-ND-4.0",
        gated=True),
    "h_optimus_0": _H_OPTIMUS_0,
    # H-optimus-1: the H-optimus-0 architecture and transform (TRIDENT "hoptimus1").
    # https://huggingface.co/bioptimus/H-optimus-1. Licence: CC-BY-NC-ND-4.0, gated.
    "h_optimus_1": replace(_H_OPTIMUS_0, hub_id="hf-hub:bioptimus/H-optimus-1", licence="CC-BY-NC-ND-4.0"),
    # H0-mini, ViT-B/14 distilled from H-optimus-0. https://huggingface.co/bioptimus/H0-mini (TRIDENT
    # "h0-mini", eva's bioptimus_h0_mini, LazySlide's H0Mini): hf-hub config plus mlp_layer
    # SwiGLUPacked, act_layer SiLU; H-optimus-0's mean/std (LazySlide); 224 px tiles at 20x.
    # Embedding: the class token (768), TRIDENT's default; the card's example also shows class ‖
    # patch mean (1536). Licence: CC-BY-NC-ND-4.0, gated. NOT SOURCED: the timm architecture
    # name (taken as vit_base_patch14_reg4_dinov2; TRIDENT skips `num_prefix_tokens`, so it has
    # registers, their number is assumed 4) and mlp_ratio (5.33334: with SwiGLUPacked it gives
    # LazySlide's 85.7M parameters, where timm's default 4 gives 71.6M).
    "h0_mini": EmbedderPreset(
        "vit_base_patch14_reg4_dinov2", num_features=768, mpp=0.5,
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        timm_kwargs={"img_size": 224, "mlp_ratio": 2.66667 * 2, "global_pool": "token", "dynamic_img_size": True,
                     **_VIT_SWIGLU},
        hub_id="hf-hub:bioptimus/H0-mini", licence="CC-BY-NC-ND-4.0",
        gated=True),
    # Prov-GigaPath tile encoder, ViT-g with 16 px patches. https://huggingface.co/prov-gigapath/prov-gigapath
    # (TRIDENT "gigapath"): vit_giant_patch14_dinov2 with patch_size 16, embed 1536, depth 40,
    # 24 heads, mlp_ratio 5.33334; Resize(256, bicubic) + CenterCrop(224), ImageNet mean/std;
    # 256 px tiles at 20x, so a centre crop of a 0.5 µm/px tile. Licence: Apache-2.0 with
    # conditions (non-commercial), gated.
    "prov_gigapath": EmbedderPreset(
        "vit_giant_patch14_dinov2", num_features=1536, mpp=0.5,
        timm_kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                     "mlp_ratio": 5.33334, "dynamic_img_size": True},
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        licence="Apache-2.0 with conditions (non-commercial)", gated=True),
    # Lunit's DINO ViT-S/8 ("Benchmarking Self-Supervised Learning on Diverse Pathology Datasets",
    # https://github.com/lunit-io/benchmark-ssl-pathology): mean (0.70322989, 0.53606487,
    # 0.66096631), std (0.21716536, 0.26081574, 0.20723464) as the authors' release notes state
    # (quoted in eva's lunit backbones); timm weights at https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino
    # (TRIDENT "lunit-vits8", 224 px tiles at 20x). Licence: Lunit non-commercial, not gated (TRIDENT).
    "lunit_dino_vits8": EmbedderPreset(
        "vit_small_patch8_224", num_features=384, mpp=0.5,
        mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464),
        timm_kwargs={"dynamic_img_size": True},
        hub_id="hf-hub:1aurent/vit_small_patch8_224.lunit_dino", licence="Lunit non-commercial"),
    # Kaiko ViT-S/16 ("Towards Large-Scale Training of Pathology Foundation Models",
    # https://github.com/kaiko-ai/towards_large_pathology_fms); timm weights at
    # https://huggingface.co/1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms
    # (TRIDENT "kaiko-vits16"): mean = std = (0.5, 0.5, 0.5), resize and centre crop to 224; TRIDENT
    # tiles it at 256 px, 20x (trained on several magnifications). Licence: Kaiko non-commercial
    # (https://github.com/kaiko-ai/towards_large_pathology_fms/blob/main/LICENSE), not gated (TRIDENT).
    "kaiko_vits16": EmbedderPreset(
        "vit_small_patch16_224", num_features=384, mpp=0.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        timm_kwargs={"dynamic_img_size": True},
        hub_id="hf-hub:1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms",
        licence="Kaiko non-commercial"),
}


def preset_table() -> str:
    """`radpath embedders`: one line per preset, with its width, input, µm/px, normalisation, read-out,
    weights, whether the hub gates them, and licence."""
    header = ("name", "L", "input", "µm/px", "normalization", "read-out", "weights", "access", "licence")
    rows = [header] + [
        (name, str(p.num_features), f"{p.input_size} {p.crop}", "-" if p.mpp is None else f"{p.mpp:g}",
         p.normalization, p.readout, p.hub_id or "-", "gated" if p.gated else "open", p.licence or "-")
        for name, p in PRESETS.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "READOUTS", "EmbedderPreset", "Readout", "preset_table"]
