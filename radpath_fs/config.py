"""Pipeline configuration: pydantic models loaded from YAML.

Every number of the paper's recipe lives here with its default, and `pipelines/cpm2020.yaml`
spells them out. Unknown keys are errors (typos must not silently fall back to a default), and
every error names the file and the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from radpath_fs import CLASSES, MODALITIES
from radpath_fs.errors import ConfigError, RadpathError
from radpath_fs.presets import PRESETS
from radpath_fs.scheduler import SCHEDULERS, check_scheduler


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def mag_to_mpp(magnification: float) -> float:
    """Objective magnification to µm/px, by the usual convention (40x = 0.25 µm/px)."""
    return 10.0 / float(magnification)


class SynthConfig(Section):
    """A synthetic CPM-RadPath cohort (`radpath synth`)."""

    cases: int = Field(24, ge=1)
    seed: int = 0
    wsi_size: tuple[int, int] = (4096, 3072)
    wsi_mpp: float = Field(0.5, gt=0)
    mri_size: tuple[int, int, int] = (64, 64, 48)
    label_noise: float = Field(0.0, ge=0, le=1)
    class_proportions: dict[str, float] = {"G": 0.60, "A": 0.24, "O": 0.16}
    unlabelled: int = Field(0, ge=0, description="extra cases written without a label (a hidden set)")

    @field_validator("class_proportions")
    @classmethod
    def _known_classes(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - set(CLASSES)
        if bad:
            raise ValueError(f"unknown classes {sorted(bad)}; classes are {list(CLASSES)}")
        if any(p < 0 for p in v.values()) or sum(v.values()) <= 0:
            raise ValueError("proportions must be non-negative with a positive sum")
        return v


class DataConfig(Section):
    """Where the cohort is. With `synth`, `radpath run` generates it into `root` first."""

    root: Path = Path("data")
    labels: Path | None = None
    synth: SynthConfig | None = None
    unlabelled_split: Literal["val", "test"] = "val"


class IngestConfig(Section):
    folds: int = Field(5, ge=2)
    seed: int = 0
    default_mpp: float | None = Field(None, gt=0)
    skip_errors: bool = False


class TileConfig(Section):
    tile_size: int = Field(512, ge=16)
    magnifications: list[float] = [40, 20, 10, 5, 2.5]
    # The background rule, exact: background when >= `background_fraction` of the pixels have
    # R, G and B all > `background_threshold`.
    background_threshold: int = Field(180, ge=0, le=255)
    background_fraction: float = Field(0.75, gt=0, le=1)
    codec: Literal["zstd", "jpeg"] = "zstd"
    # Negative levels are zstd's fast modes, still lossless. Real H&E (CMU-1's tissue tiles)
    # barely compresses past its noise: -5 stores it at 1.29:1 against level 1's 1.33:1 while
    # compressing 3.2x and decompressing 2.4x faster (2.3 / 4.2 GB/s per core), and tiles are
    # written once and read at every epoch. Smooth synthetic tissue is where higher levels pay
    # (level 1: 5:1, -5: 4.2:1). The lowest zstd takes is -131072.
    zstd_level: int = Field(-5, ge=-131072, le=22)
    jpeg_quality: int = Field(95, ge=1, le=100)
    tiles_per_shard: int = Field(64, ge=1)
    # Relative slack when matching µm/px: a slide at 0.499 µm/px is native 20x, and 10x is then an
    # exact 2x box shrink of it. Finer than native by more than this: skipped (never upsampled).
    mpp_tolerance: float = Field(0.05, ge=0, lt=0.5)
    # libvips reduce kernel for each 2x step of the pyramid (and any other downsampling).
    downsample_kernel: Literal["linear", "cubic", "mitchell", "lanczos2", "lanczos3"] = "lanczos3"

    @field_validator("magnifications")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(m <= 0 for m in v):
            raise ValueError("magnifications must be a non-empty list of positive numbers")
        return v


class EmbedConfig(Section):
    name: str = "efficientnet_b0"
    # A local .safetensors/.pth, or `random` (timm's initialisation drawn from `seed`). Unset, with
    # `pretrained: false`, an embedding or finetuning step refuses to start: random weights are
    # never a silent default.
    weights: Literal["random"] | Path | None = None
    # The timm tag a file of `radpath weights fetch` comes from (e.g. efficientnet_b0.ra_in1k): the
    # JSON that command wrote beside the file pins its SHA-256, and every run checks the file against it.
    weights_tag: str | None = None
    pretrained: bool = False
    seed: int = 0  # draws the weights when they are random
    # How a stored tile becomes the model's input, and its side. Unset: the preset's (`radpath
    # embedders` lists them); for another timm model, a 224 px center crop.
    crop: Literal["center", "resize"] | None = None
    input_size: int | None = Field(None, ge=8)
    # preset: the encoder's own mean/std (a preset's, or what timm states for a model's pretrained
    # weights); dataset: the training tiles' (every case's when none is labelled); imagenet.
    # Unset: the preset's choice (`preset` for published encoders, `dataset` for the paper's
    # fine-tuned CNNs); `dataset` for another timm model.
    normalization: Literal["preset", "dataset", "imagenet"] | None = None
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(256, ge=1)
    compile: bool = False
    magnifications: list[float] | None = None  # None: every magnification in the tile store
    # Torch threads per embedding task on the CPU; None shares the cores among local workers.
    # A CPU convolution's float sums depend on how many threads split it: give one number to get
    # byte-identical embeddings under every scheduler and machine.
    cpu_threads: int | None = Field(None, ge=1)
    # Random weights only: tiles of the normalisation cases whose batch-norm statistics replace a
    # fresh network's placeholders (mean 0, var 1), which normalise nothing: activations shrink
    # layer by layer and the pooled features keep little beyond a tile's mean colour. A few hundred
    # tiles pin each channel's mean and variance to well under a percent; more cost time only.
    calibration_tiles: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _preset_defaults(self):
        preset = PRESETS.get(self.name)
        defaults = {
            "crop": preset.crop if preset else "center",
            "input_size": preset.input_size if preset else 224,
            "normalization": preset.normalization if preset else "dataset",
        }
        for key, value in defaults.items():
            if getattr(self, key) is None:
                # Written past pydantic, so the field stays unset: the same config under another
                # embed.name (`--embedder`) takes that embedder's defaults, not these.
                self.__dict__[key] = value
        return self

    @model_validator(mode="after")
    def _weights_source(self):
        if self.pretrained and self.weights is not None:
            raise ValueError("give either weights (a local file, or random) or pretrained: true, not both")
        if self.weights_tag is not None:
            if self.weights_file is None:
                raise ValueError(f"weights_tag {self.weights_tag!r} says where a weights file comes from; "
                                 "set weights: to that file")
            if self.weights_tag.split(".")[0] != self.name:
                raise ValueError(f"weights_tag {self.weights_tag!r} is not a tag of the embedder {self.name!r}")
            # `radpath weights fetch` names its file after the architecture, so the printed command refetches it.
            if self.weights_file.name != f"{self.name}.safetensors":
                raise ValueError(f"weights {str(self.weights_file)!r}: a file fetched for {self.weights_tag} is "
                                 f"named {self.name}.safetensors")
        return self

    @property
    def weights_file(self) -> Path | None:
        return self.weights if isinstance(self.weights, Path) else None


class ColorJitterConfig(Section):
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0)
    saturation: float = Field(0.1, ge=0)
    hue: float = Field(0.01, ge=0, le=0.5)


class HeadConfig(Section):
    """The pooled head: [max || mean] (2L) -> dropout -> (linear, ReLU, batch norm)* -> linear -> 3."""

    hidden: list[int] = []
    dropout: float = Field(0.5, ge=0, lt=1)
    # Head mode only: standardise each cached-embedding feature by its mean/std over the training
    # tiles, so the head's step size does not depend on the embedder's output scale (a random
    # EfficientNet's features are ~1e-3). Finetune ignores it: there the features move as it trains.
    standardize: bool = True


class SnapshotMixin(Section):
    epochs: int = Field(50, ge=1)
    # Epochs counted back from the end: -1 is the last epoch, -11 is 10 epochs before it.
    snapshots: list[int] = [-1, -11]
    # "cosine": the learning rate falls from `lr` towards 0 over the epochs (one value per epoch).
    lr_schedule: Literal["constant", "cosine"] = "constant"

    @model_validator(mode="after")
    def _snapshots_in_range(self):
        for s in self.snapshots:
            if s == 0 or abs(s) > self.epochs:
                raise ValueError(f"snapshot {s} is outside 1..{self.epochs} epochs counted back from the end")
        return self

    def snapshot_epochs(self) -> list[int]:
        """0-based epoch indices whose weights are kept, ascending."""
        return sorted({self.epochs + s for s in self.snapshots})


class WSITrainConfig(SnapshotMixin):
    mode: Literal["finetune", "head"] = "finetune"
    magnifications: list[float] = [20, 10, 5, 2.5]
    slides_per_batch: int = Field(4, ge=1)
    tiles_per_slide: int = Field(50, ge=1)
    crop_size: int = Field(224, ge=8)
    color_jitter: ColorJitterConfig = ColorJitterConfig()
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    class_weighting: Literal["inverse_frequency", "none"] = "inverse_frequency"
    head: HeadConfig = HeadConfig()
    folds: list[int] | None = None  # None: every fold of the cases table
    # Finetune data loading: threads reading tiles.zarr (None: one per CPU core, at most 16) and
    # how many batches they read ahead of the GPU. Neither changes the result.
    loader_threads: int | None = Field(None, ge=0)
    prefetch_batches: int = Field(4, ge=1)


class PredictConfig(Section):
    tiles_per_slide: int = Field(200, ge=1)
    repeats: int = Field(10, ge=1)
    augment: bool = True
    batch_tiles: int = Field(1024, ge=1)


class MRITrainConfig(SnapshotMixin):
    epochs: int = Field(200, ge=1)
    modalities: list[str] = list(MODALITIES)
    spatial_size: tuple[int, int, int] = (128, 128, 128)
    network: Literal["densenet121", "densenet169", "densenet201", "densenet264"] = "densenet169"
    # Growth rate and block layout can be shrunk for CPU tests; None keeps MONAI's defaults.
    init_features: int | None = None
    growth_rate: int | None = None
    block_config: tuple[int, ...] | None = None
    # Feature normalisation of the DenseNet. Batch norm estimates each channel's statistics over
    # the batch and the voxels of its feature map; the last dense block of a DenseNet works at
    # 1/32 of the input size, so at 32^3 with batches of 3 that is 3 values a channel and the
    # network barely trains (128^3: 4^3 x 3 = 192). Group norm takes its statistics within each
    # volume (groups of `norm_groups` channels), whatever the batch or input size.
    norm: Literal["batch", "group"] = "batch"
    norm_groups: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Left-right mirror (not in the paper): a tumour's side carries no class.
    flip_prob: float = Field(0.0, ge=0, le=1)
    zoom: tuple[float, float] = (0.8, 1.2)
    zoom_prob: float = Field(0.5, ge=0, le=1)
    rotate_degrees: float = Field(10.0, ge=0)
    rotate_prob: float = Field(0.5, ge=0, le=1)
    # In voxels of a 128^3 grid, rescaled to `spatial_size` (mri.data.elastic_on_grid).
    elastic_sigma: tuple[float, float] = (1.0, 10.0)
    elastic_magnitude: tuple[float, float] = (10.0, 200.0)
    elastic_prob: float = Field(0.3, ge=0, le=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(3, ge=1)
    class_weighting: Literal["inverse_frequency", "none"] = "inverse_frequency"
    folds: list[int] | None = None
    eval_batch_size: int = Field(8, ge=1)
    # Where the random zoom/rotation/elastic run: "loader" in DataLoader worker processes on the
    # CPU, "device" on the training device in the main process; "auto" = device on CUDA (the CPU
    # elastic deformation of a 128^3 volume takes ~2 s a core), loader on the CPU.
    augment_on: Literal["auto", "loader", "device"] = "auto"
    num_workers: int | None = Field(None, ge=0, description="DataLoader workers; None: 0 on CPU, up to 12 on CUDA")
    # channels_last_3d on CUDA (ignored on the CPU). Off: DenseNet169-3D bf16 training at 128^3,
    # batch 3, ran 31.2 volumes/s channels_last vs 40.9 contiguous on an H200 (gpu_mri.py).
    channels_last: bool = False

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODALITIES]
        if bad or not v:
            raise ValueError(f"unknown modalities {bad}; modalities are {list(MODALITIES)}")
        return v


class FusionConfig(Section):
    method: Literal["soft_vote", "hard_vote", "prune", "greedy", "exhaustive", "stack_lr", "stack_xgb"] = "prune"
    prune: int = Field(2, ge=0)
    metric: Literal["balanced_accuracy", "kappa", "f1_micro", "f1_macro"] = "balanced_accuracy"
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    ablations: bool = True
    seed: int = 0
    # Nested CV: selection/stacking is redone on the training cases of each outer fold.
    outer_folds: int = Field(5, ge=2)
    # Caruana et al. 2004 ensemble selection (method greedy / the "selected" ablation).
    greedy_iterations: int = Field(25, ge=0)
    greedy_bags: int = Field(20, ge=1)
    greedy_bag_fraction: float = Field(0.5, gt=0, le=1)
    # The stacker of the "stacked" ablation row.
    stacker: Literal["stack_lr", "stack_xgb"] = "stack_lr"


class ReportConfig(Section):
    out: Path | None = None  # None: <store>/report
    cases_shown: int = Field(3, ge=0)


class PipelineConfig(Section):
    name: str = "pipeline"
    seed: int = 0
    store: str = "store"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scheduler: str = "sync"
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    tile: TileConfig = TileConfig()
    embed: EmbedConfig = EmbedConfig()
    wsi: WSITrainConfig = WSITrainConfig()
    predict: PredictConfig = PredictConfig()
    mri: MRITrainConfig = MRITrainConfig()
    fusion: FusionConfig = FusionConfig()
    report: ReportConfig = ReportConfig()

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        # Checked on loading, so `radpath run` fails before its first step, naming this key.
        try:
            return check_scheduler(v)
        except RadpathError:  # worded for the --scheduler option
            raise ValueError(f"{v!r}: expected one of {SCHEDULERS}") from None


def format_errors(source: str, err: ValidationError) -> str:
    """A pydantic ValidationError as the message of a ConfigError: one line per error, naming `source` and the key."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def validate_stored(model: type[BaseModel], data: object, source: str):
    """`model.model_validate(data)` for a config read from a file the store or a bundle holds:
    an error names that file and the key (a file of another radpath_fs version, say)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(source, err)) from None


def parse_config(data: object, source: str = "<config>") -> PipelineConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(source, err)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Load a pipeline YAML. Relative data paths are taken relative to the current directory."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)  # safe: YAML tags cannot construct Python objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_config(data, str(path))
