"""The real chain on a tiny synthetic cohort, on any store URL, and a file-by-file store comparison.

`run_chain` takes a cohort written by `radpath synth` (`synth_data`) through ingest -> tile -> embed
-> train-wsi (head mode) -> predict, or through its first steps only: the one way the tests build a
small ingested, tiled or embedded store. `assert_same_store` proves two stores hold the same arrays
(chunk and shard bytes), tables and models (weight bytes). Used by the remote-store and cluster
tests (the same run on another filesystem or under another scheduler must build the same store)
and by the fault-injection tests (a killed and rerun command must build the uninterrupted store).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pyarrow.parquet as pq

from radpath_fs.config import PipelineConfig, SynthConfig
from radpath_fs.store import Store

EMBEDDER = "test_efficientnet"  # timm's tiny EfficientNet: the code path of efficientnet_b0
CHAIN = PipelineConfig.model_validate({
    "tile": {"magnifications": [20, 5], "tile_size": 64, "tiles_per_shard": 8},
    # One torch thread per embedding task whatever the scheduler: CPU convolutions sum in an order
    # that depends on the thread count, and the stores are compared byte for byte.
    "embed": {"name": EMBEDDER, "weights": "random", "input_size": 64, "batch_size": 32, "cpu_threads": 1},
    "wsi": {"mode": "head", "epochs": 3, "snapshots": [-1], "lr": 1e-3},
    "predict": {"repeats": 2},
})
# Wall-clock figures that legitimately differ between two identical runs.
VOLATILE = frozenset({"created", "seconds", "tiles_per_s"})


def synth_data(root: Path, cases: int = 4, unlabelled: int = 1, seed: int = 3, wsi_size=(768, 512),
               mri_size=(8, 8, 8)) -> Path:
    """A CPM-RadPath-layout cohort of small balanced slides (and tiny MRI)."""
    from radpath_fs.synth import synth_cohort

    synth_cohort(root, SynthConfig(cases=cases, unlabelled=unlabelled, seed=seed, wsi_size=wsi_size,
                                   mri_size=mri_size, class_proportions={"A": 1, "O": 1, "G": 1}))
    return root


STEPS = ("ingest", "tile", "embed", "train", "predict")


def run_chain(url: str, data: Path, cfg: PipelineConfig = CHAIN, *, through: str = "predict",
              scheduler: str = "sync", embed_scheduler: str | None = None, folds: int = 2) -> Store:
    """The cohort in `data` through ingest -> tile -> embed (under `scheduler`) -> train-wsi at 20x,
    fold 0 -> predict, stopping after step `through`."""
    from radpath_fs.cohort import ingest
    from radpath_fs.config import IngestConfig
    from radpath_fs.embed import embed_store
    from radpath_fs.mil import train_wsi
    from radpath_fs.predict import pending_predictions, predict_models
    from radpath_fs.wsi import tile_store

    def predict():
        store = Store(url)
        predict_models(store, cfg, pending_predictions(store), None, device="cpu")

    steps = {
        "ingest": lambda: ingest(url, data, data / "labels.csv", IngestConfig(folds=folds)),
        "tile": lambda: tile_store(url, cfg.tile, scheduler=scheduler),
        "embed": lambda: embed_store(url, cfg.embed, device="cpu", scheduler=embed_scheduler or scheduler),
        "train": lambda: train_wsi(url, cfg, 20, 0, device="cpu"),
        "predict": predict,
    }
    for step in STEPS[: STEPS.index(through) + 1]:
        steps[step]()
    return Store(url)


def store_files(store: Store) -> dict[str, str]:
    """Relative path -> full path of every file in a store (the same on any filesystem)."""
    return {p[len(store.root) + 1 :]: p for p in store.fs.find(store.root)}


def _drop_volatile(obj, volatile=VOLATILE):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_drop_volatile(v, volatile) for v in obj]
    return obj


def safetensors_parts(data: bytes, volatile=VOLATILE) -> tuple[dict, bytes]:
    """({tensors, metadata} header without wall-clock fields, tensor bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    meta = {k: _drop_volatile(json.loads(v), volatile) if v[:1] in "[{" else v for k, v in meta.items()}
    return {"tensors": header, "metadata": meta}, data[8 + n :]


def assert_same_store(a: Store, b: Store, volatile=VOLATILE) -> dict[str, int]:
    """Assert two stores hold the same files: Parquet as equal tables (schema and rows in order),
    JSON (zarr metadata and attributes, model configs) and safetensors headers equal but for the
    `volatile` wall-clock fields, everything else (zarr chunks and shards, tensor bytes, PNG) byte
    for byte. Returns how many files of each kind were compared."""
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb), (sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa)))
    kinds = {"parquet": 0, "json": 0, "bytes": 0}
    for rel in sorted(fa):
        x, y = a.fs.cat_file(fa[rel]), b.fs.cat_file(fb[rel])
        if rel.endswith(".parquet"):
            tx, ty = (without_columns(pq.read_table(io.BytesIO(d)), volatile) for d in (x, y))
            assert tx.schema == ty.schema, rel
            assert tx.equals(ty), f"{rel}: tables differ"
            kinds["parquet"] += 1
        elif rel.endswith(".json"):
            assert _drop_volatile(json.loads(x), volatile) == _drop_volatile(json.loads(y), volatile), rel
            kinds["json"] += 1
        elif rel.endswith(".safetensors"):
            assert safetensors_parts(x, volatile) == safetensors_parts(y, volatile), rel
            kinds["bytes"] += 1
        else:
            assert x == y, rel
            kinds["bytes"] += 1
    return kinds


def without_columns(table, names):
    return table.select([c for c in table.column_names if c not in names])
