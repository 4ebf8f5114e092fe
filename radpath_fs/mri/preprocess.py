"""The deterministic half of the MRI recipe, run once per case and cached in `mri.zarr/<case>`.

t1, t1ce, t2 and flair are read with nibabel through MONAI's LoadImaged, checked (one voxel grid,
finite, not empty), reoriented to RAS, stacked as channels, cropped to the union of their
foregrounds (`crop_start`/`crop_end` are RAS voxel indices), resized to `mri.spatial_size` and
z-scored per modality over the non-zero voxels (background stays 0). The result is a float16 array
(C, S, S, S) whose attrs record how it was made; `complete` is set last.

A batch is checked in full before anything is written: any bad case raises (naming the file)
and the store is left as it was.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from radpath_fs.config import MRITrainConfig
from radpath_fs.errors import BatchErrors, InputError, RadpathError, StoreError
from radpath_fs.layout import COMPLETE, MRI_ERRORS_TABLE, MRI_ZARR
from radpath_fs.progress import info, warn
from radpath_fs.scheduler import map_tasks
from radpath_fs.store import Store, check_name

# Voxel grids agree when their affines agree to this many millimetres (header float noise only).
AFFINE_TOLERANCE_MM = 1e-3
# Bump when the deterministic transforms change: cached volumes of another version are redone.
PREPROCESS_VERSION = 2


def check_preprocess_version(where: str, config: dict, then: str = "") -> None:
    """Refuse an MRI model (`config`: its config.json) trained on volumes of another preprocessing
    than this radpath_fs gives a case; `then`: what to do after retraining."""
    made = config.get("preprocess_version")
    if made != PREPROCESS_VERSION:
        raise StoreError(f"{where}: its MRI model was trained on preprocessing version {made}, and this radpath_fs "
                         f"preprocesses with version {PREPROCESS_VERSION}; retrain it with `radpath train-mri`{then}")


def nonzero(x):
    """Foreground = any non-zero voxel (skull-stripped MRI: background is exactly 0)."""
    return x != 0


# ---- transforms ----------------------------------------------------------------------------------
def _load_transform_classes():
    from monai.transforms import LoadImaged, MapTransform

    class LoadNiftid(LoadImaged):
        """LoadImaged with the nibabel reader whose failures name the file and the modality."""

        def __init__(self, keys):
            super().__init__(keys, reader="NibabelReader", image_only=True, dtype=np.float32, allow_missing_keys=True)

        def __call__(self, data, reader=None):
            d = dict(data)
            for key in self.keys:
                path = d.get(key)
                if path is None or (isinstance(path, float) and math.isnan(path)):
                    raise InputError(d.get("case_id", "?"), f"no {key} file is recorded for this case")
                if not Path(path).is_file():
                    raise InputError(path, f"the {key} file is missing")
                try:
                    d.update(super().__call__({key: path}, reader))
                except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                    raise InputError(path, f"the {key} volume is truncated or corrupt ({type(e).__name__}: {e})") from None
                except Exception as e:  # nibabel and MONAI raise many types for unreadable files
                    raise InputError(path, f"cannot read the {key} volume as NIfTI ({type(e).__name__}: {e})") from None
            return d

    class CheckVolumesd(MapTransform):
        """One 3D volume per modality, all on the first modality's voxel grid, finite and not empty."""

        def __call__(self, data):
            d = dict(data)
            ref = None
            for key in self.key_iterator(d):
                img = d[key]
                path = str(img.meta.get("filename_or_obj", key))
                shape = tuple(int(s) for s in img.shape)
                if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
                    raise InputError(path, f"the {key} image has shape {shape}; one 3D volume is expected")
                arr = img.as_tensor() if hasattr(img, "as_tensor") else img
                n_bad = int((~arr.isfinite()).sum())
                if n_bad:
                    raise InputError(path, f"the {key} volume has {n_bad} NaN or infinite voxels")
                if not bool(arr.any()):
                    raise InputError(path, f"the {key} volume is all zero (no foreground)")
                affine = np.asarray(img.affine, dtype=np.float64)
                if ref is None:
                    ref = (key, path, shape[:3], affine)
                    continue
                ref_key, ref_path, ref_shape, ref_affine = ref
                if shape[:3] != ref_shape:
                    raise InputError(
                        path, f"the {key} shape {shape[:3]} differs from {ref_key}'s {ref_shape} ({ref_path})"
                    )
                diff = float(np.abs(affine - ref_affine).max())
                if diff > AFFINE_TOLERANCE_MM:
                    raise InputError(
                        path,
                        f"the {key} affine differs from {ref_key}'s ({ref_path}) by up to {diff:.3g} mm; "
                        "the modalities must be co-registered on one voxel grid",
                    )
            return d

    return LoadNiftid, CheckVolumesd


def load_transforms(mcfg: MRITrainConfig) -> list:
    """Read and check the modalities (the part that can fail on bad input)."""
    LoadNiftid, CheckVolumesd = _load_transform_classes()
    keys = list(mcfg.modalities)
    return [LoadNiftid(keys), CheckVolumesd(keys)]


def preprocess_transforms(mcfg: MRITrainConfig):
    """The deterministic MONAI dictionary transforms: {modality: path} -> {"image": (C,S,S,S) float16}."""
    from monai.transforms import (
        CastToTyped,
        Compose,
        ConcatItemsd,
        CropForegroundd,
        DeleteItemsd,
        EnsureChannelFirstd,
        NormalizeIntensityd,
        Orientationd,
        Resized,
    )

    keys = list(mcfg.modalities)
    return Compose(
        [
            *load_transforms(mcfg),
            EnsureChannelFirstd(keys),
            # The cohort mixes scanners' voxel orders (RAS, LPS, sagittal, ...): one for the network.
            # Labels pinned: MONAI's default is changing to the image's `space` metadata.
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            ConcatItemsd(keys, name="image", dim=0),
            DeleteItemsd(keys),
            # Union over modalities: the box covers every voxel that is non-zero in any channel.
            CropForegroundd("image", source_key="image", select_fn=nonzero, margin=0, allow_smaller=True),
            Resized("image", spatial_size=tuple(mcfg.spatial_size), mode="trilinear"),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
            CastToTyped("image", dtype=np.float16),
        ],
        log_stats=False,
    )


def _unwrap(err: BaseException) -> BaseException:
    """MONAI's Compose wraps a transform's error in RuntimeError; surface ours."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, RadpathError):
            return cause
        cause = cause.__cause__
    return err


def _apply(transform, data: dict) -> dict:
    try:
        return transform(data)
    except RuntimeError as e:
        unwrapped = _unwrap(e)
        if unwrapped is e:
            raise
        raise unwrapped from None


def preprocess_case(paths: dict[str, str], mcfg: MRITrainConfig, case_id: str = "?") -> tuple[np.ndarray, dict]:
    """One case's modality files -> ((C,S,S,S) float16 array, preprocessing record)."""
    import monai

    out = _apply(preprocess_transforms(mcfg), {"case_id": case_id, **paths})
    image = out["image"]
    affine = np.asarray(image.meta.get("original_affine", image.affine), dtype=np.float64)
    record = {
        "preprocess_version": PREPROCESS_VERSION,
        "modalities": list(mcfg.modalities),
        "spatial_size": [int(s) for s in mcfg.spatial_size],
        "files": {m: str(paths[m]) for m in mcfg.modalities},
        "source_shape": [int(s) for s in image.meta.get("spatial_shape", [])],
        "source_affine": affine.tolist(),
        "crop_start": [int(v) for v in out["foreground_start_coord"]],
        "crop_end": [int(v) for v in out["foreground_end_coord"]],
        "transforms": [
            "LoadImaged(NibabelReader)",
            "check shapes/affines/finite/non-empty",
            "EnsureChannelFirstd",
            "Orientationd(RAS)",
            "ConcatItemsd",
            "CropForegroundd(union of non-zero voxels, margin 0)",
            f"Resized({list(mcfg.spatial_size)}, trilinear)",
            "NormalizeIntensityd(nonzero, channel_wise)",
            "CastToTyped(float16)",
        ],
        "monai_version": monai.__version__,
        "dtype": "float16",
    }
    data = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float16)
    return data, record


def check_case(paths: dict[str, str], mcfg: MRITrainConfig, case_id: str = "?") -> None:
    """Read and check one case's modalities; raises InputError naming the file."""
    from monai.transforms import Compose

    _apply(Compose(load_transforms(mcfg), log_stats=False), {"case_id": case_id, **paths})


# ---- the cache -----------------------------------------------------------------------------------
def _open_array(store: Store, case_id: str):
    import zarr

    try:
        return zarr.open_array(store=store.zarr_store(MRI_ZARR), path=case_id, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def is_cached(store: Store, case_id: str, mcfg: MRITrainConfig) -> bool:
    """Whether `mri.zarr/<case>` is complete and was made with this config's modalities and size."""
    arr = _open_array(store, case_id)
    if arr is None:
        return False
    a = arr.attrs
    return (
        bool(a.get(COMPLETE, False))
        and a.get("preprocess_version") == PREPROCESS_VERSION
        and list(a.get("modalities", [])) == list(mcfg.modalities)
        and list(a.get("spatial_size", [])) == [int(s) for s in mcfg.spatial_size]
    )


def write_cached(store: Store, case_id: str, volume: np.ndarray, record: dict) -> None:
    """Write `mri.zarr/<case>` (one task per case is its only writer), marked complete last."""
    check_name(case_id, "case id")
    root = store.open_zarr(MRI_ZARR, mode="a")
    # One chunk per modality: a training read is C chunk reads; one modality can be read alone.
    arr = root.create_array(
        case_id, shape=volume.shape, dtype="float16", chunks=(1, *volume.shape[1:]), overwrite=True
    )
    arr[...] = volume
    arr.attrs.update({**record, COMPLETE: False})
    arr.attrs[COMPLETE] = True


def read_cached(store: Store, case_id: str) -> np.ndarray:
    arr = _open_array(store, case_id)
    if arr is None or not arr.attrs.get(COMPLETE, False):
        raise RadpathError(f"{store.path(MRI_ZARR, case_id)}: no complete preprocessed volume for case {case_id}")
    return arr[...]


def cached_record(store: Store, case_id: str) -> dict:
    arr = _open_array(store, case_id)
    return {} if arr is None else dict(arr.attrs)


# ---- one Dask task per case ----------------------------------------------------------------------
def _check_task(item: tuple[str, dict], *, mcfg: MRITrainConfig) -> tuple[str, str] | None:
    case_id, paths = item
    try:
        check_case(paths, mcfg, case_id)
    except InputError as e:
        # (path, problem), not the exception: InputError does not survive pickling between processes.
        return (e.path, e.problem)
    return None


def _preprocess_task(item: tuple[str, dict], *, store_url: str, mcfg: MRITrainConfig) -> str:
    case_id, paths = item
    volume, record = preprocess_case(paths, mcfg, case_id)
    write_cached(Store(store_url), case_id, volume, record)
    return case_id


def recorded_errors(store: Store) -> set[str]:
    """Ids of the cases a --skip-errors run listed in tables/mri_errors.parquet."""
    return set(store.read_table(MRI_ERRORS_TABLE)["case_id"]) if store.has_table(MRI_ERRORS_TABLE) else set()


def modality_paths(row: dict, mcfg: MRITrainConfig) -> dict[str, str | None]:
    """{modality: file} of one cases-table row (None where no file is recorded)."""
    paths = {}
    for m in mcfg.modalities:
        v = row.get(f"mri_{m}")
        paths[m] = None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    return paths


def preprocess_cases(
    store: Store, mcfg: MRITrainConfig, cases: pd.DataFrame, *, scheduler: str = "sync", skip_errors: bool = False
) -> list[str]:
    """Cache every case of `cases` (rows of the cases table) not cached yet with this config.

    All the cases to do are read and checked first; if any is bad, every problem is raised (one
    InputError, or BatchErrors for several) and nothing is written. With `skip_errors` the bad
    cases are listed in tables/mri_errors.parquet instead (rewritten by each such run; they are
    never cached, so a rerun checks them again) and the others are processed. Returns the ids processed.
    """
    todo = [
        (str(r["case_id"]), modality_paths(r, mcfg))
        for r in cases.to_dict("records")
        if not is_cached(store, str(r["case_id"]), mcfg)
    ]
    if not todo:
        return []
    for case_id, _ in todo:
        check_name(case_id, "case id")
    problems = map_tasks(_check_task, todo, scheduler=scheduler, description="check MRI", mcfg=mcfg)
    bad = {case_id: InputError(*p) for (case_id, _), p in zip(todo, problems, strict=True) if p is not None}
    errors = list(bad.values())
    if errors and not skip_errors:
        raise errors[0] if len(errors) == 1 else BatchErrors(errors)
    if skip_errors:
        store.write_table(MRI_ERRORS_TABLE, pd.DataFrame(
            {"case_id": list(bad), "path": [e.path for e in errors], "error": [str(e) for e in errors]},
            dtype="string"))
        for e in errors:
            warn(f"skipped: {e}")
        todo = [item for item in todo if item[0] not in bad]
        if not todo:
            return []
    store.open_zarr(MRI_ZARR, mode="a")  # the root exists before the tasks write its children
    done = map_tasks(
        _preprocess_task, todo, scheduler=scheduler, description="preprocess MRI", store_url=store.url, mcfg=mcfg
    )
    info(f"preprocessed {len(done)} MRI case(s) -> {store.path(MRI_ZARR)}")
    return done
