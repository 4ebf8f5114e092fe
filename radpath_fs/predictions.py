"""The prediction table, the analysts' contract (store/README.md). No torch here: fusion reads these.

One Parquet file per (model, split) write, the table `layout.prediction_table_name(model_id, split)`:
`tables/predictions/<model_id>--<split>.parquet`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from radpath_fs import CLASSES
from radpath_fs.layout import prediction_table_name

SPLITS = ("oof", "val", "test", "train")

SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("modality", pa.string()),
        ("magnification", pa.float64()),
        ("snapshot", pa.int32()),
        ("fold", pa.int32()),
        ("split", pa.string()),
        ("case_id", pa.string()),
        ("label", pa.string()),
        *[(f"logit_{c}", pa.float32()) for c in CLASSES],
        *[(f"prob_{c}", pa.float32()) for c in CLASSES],
    ]
)
REQUIRED = tuple(SCHEMA.names)
LOGITS = [f"logit_{c}" for c in CLASSES]
PROBS = [f"prob_{c}" for c in CLASSES]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def prediction_table(
    *,
    model_id: str,
    modality: str,
    magnification: float | None,
    snapshot: int,
    fold: int,
    split: str,
    case_ids: list[str],
    labels: list[str | None],
    logits: np.ndarray,
    probs: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Build a table in the contract's schema; `probs` defaults to softmax(logits).

    Extra columns (vote counts, repeats) go after the required ones.
    """
    if modality not in ("wsi", "mri"):
        raise ValueError(f"modality must be 'wsi' or 'mri', got {modality!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    logits = np.asarray(logits, dtype=np.float64).reshape(len(case_ids), len(CLASSES))
    probs = softmax(logits) if probs is None else np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    n = len(case_ids)
    cols: dict[str, object] = {
        "model_id": [model_id] * n,
        "modality": [modality] * n,
        "magnification": [None if magnification is None else float(magnification)] * n,
        "snapshot": np.full(n, snapshot, np.int32),
        "fold": np.full(n, fold, np.int32),
        "split": [split] * n,
        "case_id": list(case_ids),
        "label": [None if (lab is None or pd.isna(lab)) else str(lab) for lab in labels],
    }
    for j, c in enumerate(CLASSES):
        cols[f"logit_{c}"] = logits[:, j].astype(np.float32)
    for j, c in enumerate(CLASSES):
        cols[f"prob_{c}"] = probs[:, j].astype(np.float32)
    table = pa.table({k: pa.array(v, type=SCHEMA.field(k).type) for k, v in cols.items()})
    for name, values in (extra or {}).items():
        table = table.append_column(name, pa.array(np.asarray(values)))
    return table


def write_predictions(store, table: pa.Table) -> str:
    """Write one (model, split) table to the store, replacing an earlier write of the same pair."""
    model_ids = set(table.column("model_id").to_pylist())
    splits = set(table.column("split").to_pylist())
    if len(model_ids) != 1 or len(splits) != 1:
        raise ValueError("a prediction file holds exactly one (model, split)")
    return store.write_table(prediction_table_name(model_ids.pop(), splits.pop()), table)
