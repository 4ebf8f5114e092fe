"""The embedding arrays of embeddings.zarr: ``<embedder_id>/<case>/<mag>``, (n, L), one per slide
and magnification, marked complete last. `radpath embed` writes them (`write_embedding`); MIL
training, prediction, bundles and the report read them here.
"""

from __future__ import annotations

import json

import numpy as np

from radpath_fs.errors import StoreError
from radpath_fs.layout import COMPLETE, EMBEDDINGS
from radpath_fs.store import Store, check_name, mag_key

# Rows per chunk of an embedding array: a whole bag of up to ~6.5k float16 1280-d vectors is one
# chunk (16 MiB); bigger bags read as a few large chunks.
_CHUNK_BYTES = 16 * 2**20


def embedding_path(embedder: str, case_id: str, magnification: float) -> str:
    """An array's path inside embeddings.zarr."""
    return f"{check_name(embedder, 'embedder id')}/{check_name(case_id, 'case id')}/{mag_key(magnification)}"


def open_embedding(store: Store, embedder: str, case_id: str, magnification: float):
    """The zarr array, complete or not; None where there is none."""
    import zarr

    path = embedding_path(embedder, case_id, magnification)
    try:
        return zarr.open_array(store=store.zarr_store(EMBEDDINGS), path=path, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def embedding_is_complete(store: Store, embedder: str, case_id: str, magnification: float) -> bool:
    arr = open_embedding(store, embedder, case_id, magnification)
    return arr is not None and bool(arr.attrs.get(COMPLETE, False))


def embedding_count(store: Store, embedder: str, case_id: str, magnification: float) -> int:
    """Tiles in a complete embedding array (0 for a slide without tissue there, or when incomplete)."""
    arr = open_embedding(store, embedder, case_id, magnification)
    return int(arr.shape[0]) if arr is not None and arr.attrs.get(COMPLETE, False) else 0


def read_embeddings(store: Store | str, embedder: str, case_id: str, magnification: float, dtype=None) -> np.ndarray:
    """The (n, L) embeddings of a slide at a magnification (stored dtype unless `dtype`)."""
    store = store if isinstance(store, Store) else Store(store)
    arr = open_embedding(store, embedder, case_id, magnification)
    where = store.path(EMBEDDINGS, embedding_path(embedder, case_id, magnification))
    if arr is None:
        raise StoreError(f"{where}: no embeddings (run `radpath embed` with this embedder first)")
    if not arr.attrs.get(COMPLETE, False):
        raise StoreError(f"{where}: embeddings incomplete (an interrupted run); rerun `radpath embed`")
    out = arr[...]
    return out if dtype is None else out.astype(dtype, copy=False)


def embedding_inputs(store: Store, embedder: str, case_ids: list[str], magnification: float) -> dict[str, dict]:
    """{case: {"transform": the transform record its embeddings were made with, "calibration": the
    hash of the embedder's batch-norm statistics then (None: not calibrated)}}; a StoreError if
    they differ between cases (a store embedded only in part since either changed)."""
    records = {}
    for c in case_ids:
        attrs = embedding_attrs(store, embedder, c, magnification)
        records[c] = {"transform": attrs.get("transform"), "calibration": attrs.get("calibration")}
    kinds = {json.dumps(r, sort_keys=True) for r in records.values()}
    if len(kinds) > 1:
        raise StoreError(f"{store.path(EMBEDDINGS, embedder)}: embeddings at {mag_key(magnification)} made with "
                         f"{len(kinds)} different transforms or calibrations; rerun `radpath embed` to finish "
                         "recomputing them")
    return records


def embedding_attrs(store: Store, embedder: str, case_id: str, magnification: float) -> dict:
    arr = open_embedding(store, embedder, case_id, magnification)
    if arr is None:
        raise StoreError(f"{store.path(EMBEDDINGS, embedding_path(embedder, case_id, magnification))}: no embeddings")
    return dict(arr.attrs)


def _chunk_rows(n_features: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // (n_features * itemsize))


def write_embedding(store: Store, path: str, data: np.ndarray, attrs: dict) -> None:
    """Write one (n, L) array, then mark it complete (overwriting an earlier incomplete one)."""
    import zarr

    rows = min(max(1, data.shape[0]), _chunk_rows(data.shape[1], data.dtype.itemsize))
    arr = zarr.create_array(
        store.zarr_store(EMBEDDINGS), name=path, shape=data.shape, dtype=data.dtype,
        chunks=(rows, data.shape[1]), overwrite=True, attributes={COMPLETE: False},
    )
    if data.shape[0]:
        arr[...] = data
    arr.attrs.update({**attrs, COMPLETE: True})


__all__ = [
    "embedding_attrs",
    "embedding_count",
    "embedding_inputs",
    "embedding_is_complete",
    "embedding_path",
    "open_embedding",
    "read_embeddings",
    "write_embedding",
]
