"""Feeding cached volumes to the network: dataset, per-epoch batches, the random MONAI transforms.

Randomness comes from one place, `EpochBatches`, in the main process: for (seed, fold, epoch) it
draws the case order and one augmentation seed per item. A worker (or the device, with
`augment_on: device`) reseeds the augmentation from the item's seed, so a run is the same whatever
the number of workers, and an epoch does not depend on earlier ones (which is what makes resume
give the same weights as an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from radpath_fs.config import MRITrainConfig
from radpath_fs.mri.preprocess import read_cached
from radpath_fs.store import Store


def _elastic_class():
    from monai.networks.layers import GaussianFilter
    from monai.transforms import Rand3DElasticd
    from monai.transforms.utils import create_grid

    class Rand3DElasticOnDeviced(Rand3DElasticd):
        """MONAI's Rand3DElasticd, with the work done only when the deformation is drawn.

        Upstream, every call draws a full-resolution displacement noise field with numpy and
        resamples the volume, whether or not the deformation is applied: at 128^3 that is
        ~60 ms of host time per volume (measured on the H200 host) even at probability 0.
        Here an undrawn call returns its input, and the noise is drawn on the volume's device
        from a generator seeded by this transform's random state (so a seeded run repeats).
        Same parameters as upstream: sigma and magnitude ranges, Gaussian smoothing truncated
        at 3 sigma, the identity-centred grid of `create_grid`, MONAI's Resample (in float32).
        """

        def __call__(self, data):
            d = dict(data)
            self.randomize(None)
            if not self._do_transform:
                return d
            el = self.rand_3d_elastic
            img = d[self.first_key(d)]
            device, size = img.device, tuple(img.shape[1:])
            magnitude = self.R.uniform(*el.magnitude_range)
            sigma = self.R.uniform(*el.sigma_range)
            gen = torch.Generator(device=device).manual_seed(int(self.R.randint(2**31 - 1)))
            offset = torch.rand((1, 3, *size), generator=gen, device=device) * 2 - 1
            grid = create_grid(spatial_size=size, device=device, backend="torch", dtype=torch.float32)
            grid[:3] += GaussianFilter(spatial_dims=3, sigma=sigma, truncated=3.0).to(device)(offset)[0] * magnitude
            for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
                # float32, not Resample's float64 default: a training augmentation, and 2x fewer bytes.
                d[key] = el.resampler(d[key], grid, mode=mode, padding_mode=padding_mode, dtype=torch.float32)
            return d

    return Rand3DElasticOnDeviced


# The grid that `elastic_sigma` and `elastic_magnitude` are given on (the paper's 128^3).
ELASTIC_GRID = 128


def elastic_on_grid(mcfg: MRITrainConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """(sigma range, magnitude range) in voxels of `mcfg.spatial_size`, the same deformation in
    millimetres as the configured ranges make on a 128^3 grid.

    MONAI's elastic parameters are in voxels: at 32^3 the paper's values would move each voxel
    4x as far across the brain and, with a finer noise, shred it. A grid coarser by s smooths the
    per-voxel noise with sigma*s; the smoothed noise's amplitude grows as (sigma*s)^-1.5 in 3D
    and a voxel spans 1/s as much, so the magnitude scales by s^2.5.
    """
    s = float(np.mean(mcfg.spatial_size)) / ELASTIC_GRID
    sigma = tuple(v * s for v in mcfg.elastic_sigma)
    magnitude = tuple(v * s**2.5 for v in mcfg.elastic_magnitude)
    return sigma, magnitude


def augment_transforms(mcfg: MRITrainConfig, device: torch.device | None = None):
    """Random left-right flip, zoom, rotation (all axes) and 3D elastic deformation, each with
    its own probability.

    Zeros come in at the borders, which is the background value of a z-scored volume. Volumes
    are RAS (preprocess), so the first spatial axis is left-right: a flip mirrors the hemispheres.
    """
    from monai.transforms import Compose, RandFlipd, RandRotated, RandZoomd

    r = math.radians(mcfg.rotate_degrees)
    sigma, magnitude = elastic_on_grid(mcfg)
    return Compose(
        [
            RandFlipd("image", prob=mcfg.flip_prob, spatial_axis=0),
            RandZoomd(
                "image",
                prob=mcfg.zoom_prob,
                min_zoom=mcfg.zoom[0],
                max_zoom=mcfg.zoom[1],
                mode="trilinear",
                padding_mode="constant",
                keep_size=True,
            ),
            RandRotated(
                "image", range_x=r, range_y=r, range_z=r, prob=mcfg.rotate_prob, mode="bilinear", padding_mode="zeros"
            ),
            _elastic_class()(
                "image",
                sigma_range=sigma,
                magnitude_range=magnitude,
                prob=mcfg.elastic_prob,
                mode="bilinear",
                padding_mode="zeros",
                device=device,
            ),
        ],
        log_stats=False,
    )


def augment_volume(aug, volume: torch.Tensor, seed: int) -> torch.Tensor:
    """One (C,S,S,S) volume through the random transforms, reseeded from its item seed."""
    aug.set_random_state(seed=int(seed))
    out = aug({"image": volume.float()})["image"]
    return out.as_tensor() if hasattr(out, "as_tensor") else out


class EpochBatches:
    """A batch sampler of (case index, augmentation seed) pairs; `set_epoch` before each epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, fold: int, shuffle: bool = True):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.key = (int(seed) % 2**32, int(fold) + 1)  # SeedSequence wants non-negative entropy
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng([*self.key, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**31 - 1, size=self.n)
        items = [(int(i), int(s)) for i, s in zip(order, seeds, strict=True)]
        out = [items[k : k + self.batch_size] for k in range(0, self.n, self.batch_size)]
        # Batch norm cannot train on one sample whose last feature map is 1 voxel: a lone
        # leftover joins the batch before it.
        if len(out) > 1 and len(out[-1]) == 1:
            out[-2].extend(out.pop())
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class CachedVolumes(torch.utils.data.Dataset):
    """Items are case indices, or (index, seed) pairs when augmenting in the loader.

    Returns (volume float16 (C,S,S,S), class index (-1 unknown), item seed (-1 none)).
    With `keep`, each volume stays in memory after its first read: an epoch of small volumes
    otherwise spends as long opening Zarr arrays as training on them.
    """

    def __init__(
        self,
        store_url: str,
        case_ids: Sequence[str],
        labels: Sequence[int] | None = None,
        augment: MRITrainConfig | None = None,
        keep: bool = False,
    ):
        self.store_url = store_url
        self.kept: dict[int, np.ndarray] | None = {} if keep else None
        self.case_ids = list(case_ids)
        self.labels = np.full(len(self.case_ids), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.augment_cfg = augment
        self._store: Store | None = None
        self._aug = None

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, -1)
        if self._store is None:  # opened in the worker that reads, not pickled from the parent
            self._store = Store(self.store_url)
        if self.kept is None:
            array = read_cached(self._store, self.case_ids[i])
        elif (array := self.kept.get(i)) is None:
            array = self.kept[i] = read_cached(self._store, self.case_ids[i])
        volume = torch.from_numpy(array)
        if self.augment_cfg is not None:
            if self._aug is None:
                self._aug = augment_transforms(self.augment_cfg)
            # Back to float16: half the bytes through pinned memory; the stored volume was float16.
            volume = augment_volume(self._aug, volume, seed).to(torch.float16)
        return volume, int(self.labels[i]), int(seed)


def worker_init(_: int) -> None:
    """Loader workers: one torch thread each (there are many workers), no MONAI metadata."""
    from monai.data import set_track_meta

    torch.set_num_threads(1)
    set_track_meta(False)


# Volumes an in-process loader keeps in memory when the whole set fits: 32^3 demo volumes are 0.25 MiB each,
# the paper's 128^3 ones 16 MiB (221 cases: 3.5 GiB, read from the store at every epoch instead).
KEEP_BYTES = 2**30


def volume_bytes(mcfg: MRITrainConfig) -> int:
    """Bytes of one cached volume as the loader yields it (float16, all modalities)."""
    return 2 * len(mcfg.modalities) * math.prod(mcfg.spatial_size)


def make_loader(dataset, *, batch_sampler=None, batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                item_bytes: int = 0):
    """A DataLoader of `dataset`; with workers, as many as batches of `item_bytes` items fit in /dev/shm."""
    from radpath_fs.training import fit_loader

    prefetch = 4
    if num_workers > 0:
        per_batch = getattr(batch_sampler, "batch_size", batch_size) * item_bytes
        num_workers, prefetch = fit_loader(num_workers, prefetch, per_batch, "the MRI loader")
    kwargs = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=worker_init)
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)


def default_workers(mcfg: MRITrainConfig, device: torch.device) -> int:
    if mcfg.num_workers is not None:
        return mcfg.num_workers
    if device.type != "cuda":
        return 0
    return max(1, min((os.cpu_count() or 2) - 1, 12))


def device_batches(loader, aug, runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) on the training device, x augmented there when `aug` is given.

    On CUDA the copy and the augmentation run on a side stream: MONAI's transforms wait on the
    stream they run on (small host<->device copies), so on the training stream they would stall
    until the previous step finished. On the side stream the host work for batch k+1 overlaps
    the GPU running step k; the training stream then waits for the side stream on the GPU.
    """
    stream = torch.cuda.Stream(runtime.device) if runtime.cuda else None
    for x, y, seeds in loader:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            x = runtime.inputs(x)
            if aug is not None:
                x = torch.stack([augment_volume(aug, v, s) for v, s in zip(x, seeds.tolist(), strict=True)])
                x = x.contiguous(memory_format=runtime.memory_format)
            y = y.to(runtime.device, non_blocking=True)
        if stream is not None:
            main = torch.cuda.current_stream(runtime.device)
            main.wait_stream(stream)
            x.record_stream(main)  # the allocator must not reuse x's memory for the side stream early
            y.record_stream(main)
        yield x, y
