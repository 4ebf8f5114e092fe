"""Tile transforms shared by the embedder (eval) and the MIL trainer (train).

Both take a batch of stored tiles as they come out of tiles.zarr, uint8 (B, T, T, 3) on any
device, and return float32 (B, 3, S, S) normalised: channels_last memory order on CUDA (what bf16
convolutions want there), plain NCHW on the CPU. Cropping happens on the uint8
pixels before the float conversion, so a 512 -> 224 crop converts a fifth of the bytes.

The train transform draws its randomness per tile (crop offset and jitter factors), from an
explicit `torch.Generator` on the CPU, so a seeded run gives the same tiles on any device.

Every transform describes itself with `record()` (a JSON-able dict); `transform_from_record`
rebuilds it, which is how an embedding stored with its record can be recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radpath_fs.presets import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601 luma, as torchvision's rgb_to_grayscale (contrast and saturation blend towards it).
_LUMA = (0.2989, 0.587, 0.114)


def _stats(values: Sequence[float], what: str) -> tuple[float, float, float]:
    v = tuple(float(x) for x in values)
    if len(v) != 3:
        raise ValueError(f"{what} needs 3 values (R, G, B), got {len(v)}")
    return v


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"expected square RGB tiles (B, T, T, 3), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 tiles, got {x.dtype}")


class TileTransform(torch.nn.Module):
    """Common part: (B,T,T,3) uint8 -> channels-first view -> float in [0,1] -> normalise."""

    kind = "base"

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.mean = _stats(mean, "mean")
        self.std = _stats(std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        # Normalisation folded into one multiply-add: (x/255 - mean)/std = x*scale + shift.
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)]).view(1, 3, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float-in-[0,255] (B,3,S,S) -> normalised float32 (channels_last on CUDA)."""
        fmt = torch.channels_last if x.is_cuda else torch.contiguous_format
        x = x.to(torch.float32).contiguous(memory_format=fmt)
        scale, shift = self.scale.to(x.device), self.shift.to(x.device)
        return torch.addcmul(shift, x, scale)

    def record(self) -> dict:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}


class EvalTransform(TileTransform):
    """Deterministic: center crop to `size` (or resize the whole tile to `size`), then normalise."""

    kind = "eval"

    def __init__(self, size: int = 224, crop: str = "center", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(mean, std)
        if crop not in ("center", "resize"):
            raise ValueError(f"crop must be 'center' or 'resize', got {crop!r}")
        self.size = int(size)
        self.crop = crop

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        _check_batch(tiles)
        t, s = tiles.shape[1], self.size
        x = tiles.permute(0, 3, 1, 2)  # a view; its memory is already channels_last
        if self.crop == "center" or t == s:
            if t < s:
                raise ValueError(f"center crop {s} px does not fit in {t} px tiles; use crop: resize")
            top = int(round((t - s) / 2.0))  # torchvision's center_crop offset
            return self._normalise(x[:, :, top : top + s, top : top + s])
        x = torch.nn.functional.interpolate(
            x.to(torch.float32), size=(s, s), mode="bilinear", align_corners=False, antialias=t > s
        )
        return self._normalise(x.clamp_(0, 255))

    def record(self) -> dict:
        return {**super().record(), "crop": self.crop, "size": self.size}


class TrainTransform(TileTransform):
    """Random: per-tile random crop to `crop_size` and per-tile colour jitter, then normalise.

    The jitter follows torchvision's ColorJitter (factors drawn uniformly in [1-b, 1+b] etc.,
    hue shift in [-h, h], images clamped to [0, 1] after each step), vectorised over the batch
    so every tile has its own factors. The order of the four adjustments is drawn once per
    batch (torchvision draws it once per call, which is once per tile when applied tile by tile).
    """

    kind = "train"

    def __init__(
        self,
        crop_size: int = 224,
        brightness: float = 0.1,
        contrast: float = 0.1,
        saturation: float = 0.1,
        hue: float = 0.01,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        super().__init__(mean, std)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.crop_size = int(crop_size)
        self.brightness, self.contrast, self.saturation, self.hue = (
            float(brightness), float(contrast), float(saturation), float(hue)
        )

    def forward(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(tiles)
        b, t, s = tiles.shape[0], tiles.shape[1], self.crop_size
        if t < s:
            raise ValueError(f"random crop {s} px does not fit in {t} px tiles")
        dev = tiles.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            u = torch.rand(b, generator=generator, dtype=torch.float64)
            return (lo + (hi - lo) * u).to(device=dev, dtype=torch.float32).view(b, 1, 1, 1)

        # Per-tile crop as a gather on the uint8 pixels.
        oy = torch.randint(0, t - s + 1, (b,), generator=generator).to(dev)
        ox = torch.randint(0, t - s + 1, (b,), generator=generator).to(dev)
        ar = torch.arange(s, device=dev)
        rows = (oy[:, None] + ar)[:, :, None]  # (B, S, 1)
        cols = (ox[:, None] + ar)[:, None, :]  # (B, 1, S)
        x = tiles[torch.arange(b, device=dev)[:, None, None], rows, cols]  # (B, S, S, 3)
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)

        ops = []
        if self.brightness > 0:
            f = uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
            ops.append(lambda im, f=f: (im * f).clamp_(0, 1))
        if self.contrast > 0:
            f = uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
            ops.append(lambda im, f=f: _blend(im, _gray(im).mean(dim=(-3, -2, -1), keepdim=True), f))
        if self.saturation > 0:
            f = uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
            ops.append(lambda im, f=f: _blend(im, _gray(im), f))
        if self.hue > 0:
            f = uniform(-self.hue, self.hue)
            ops.append(lambda im, f=f: _shift_hue(im, f))
        for i in torch.randperm(len(ops), generator=generator).tolist():
            x = ops[i](x)
        return self._normalise(x.mul_(255.0))

    def record(self) -> dict:
        return {
            **super().record(),
            "crop_size": self.crop_size,
            "brightness": self.brightness,
            "contrast": self.contrast,
            "saturation": self.saturation,
            "hue": self.hue,
        }


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * x + (1.0 - ratio) * other).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue += shift (per tile, wrapping), -> RGB; same formulas as torchvision."""
    r, g, b = x.unbind(dim=-3)
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    sat = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.squeeze(-3), 1.0)
    v = maxc
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - sat)).clamp(0, 1)
    q = (v * (1.0 - sat * f)).clamp(0, 1)
    t = (v * (1.0 - sat * (1.0 - f))).clamp(0, 1)
    mask = i.unsqueeze(-3) == torch.arange(6, device=x.device).view(-1, 1, 1)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)  # (B, 3, 6, H, W)
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(x.dtype), a4)


def eval_transform(cfg=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, size: int | None = None,
                   crop: str | None = None) -> EvalTransform:
    """The embedder's transform. `cfg` is an EmbedConfig (its input_size and crop) or None."""
    size = size if size is not None else (cfg.input_size if cfg is not None else 224)
    crop = crop if crop is not None else (cfg.crop if cfg is not None else "center")
    return EvalTransform(size=size, crop=crop, mean=mean, std=std)


def train_transform(crop_size: int = 224, color_jitter=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> TrainTransform:
    """The MIL trainer's transform. `color_jitter` is a ColorJitterConfig, a dict, or None (paper's)."""
    if color_jitter is None:
        jitter = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.01}
    elif isinstance(color_jitter, dict):
        jitter = color_jitter
    else:
        jitter = color_jitter.model_dump()
    return TrainTransform(crop_size=crop_size, mean=mean, std=std, **jitter)


def transform_from_record(record: dict) -> TileTransform:
    """Rebuild a transform from its `record()` (as stored in an embedding array's attributes)."""
    kind = record.get("kind")
    if kind == "eval":
        return EvalTransform(size=record["size"], crop=record["crop"], mean=record["mean"], std=record["std"])
    if kind == "train":
        keys = ("crop_size", "brightness", "contrast", "saturation", "hue", "mean", "std")
        return TrainTransform(**{k: record[k] for k in keys})
    raise ValueError(f"unknown transform kind {kind!r} in record {record}")
