"""Prediction stores for the fusion, query and notebook tests and the fusion benchmark.

The prediction tables are what `radpath predict` writes for a cross-validated cohort: per member
(modality, magnification, snapshot) one model per fold, each writing OOF rows for its held-out
fold and rows for the unlabelled val cases. Logits mix the true class (member skill), a per-case
part shared by every member (hard cases are hard for all) and member/model noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from radpath_fs import CLASSES
from radpath_fs.predictions import prediction_table, write_predictions
from radpath_fs.store import Store
from radpath_fs.training import mri_run_id, snapshot_id, wsi_run_id

# (modality, magnification, snapshot epoch, skill). Magnification 2.5 is the weakest, as pruning
# should find; the earlier snapshot is a little worse than the last one.
PAPER_MEMBERS = [
    *[
        ("wsi", mag, epoch, skill - (0.15 if epoch == 39 else 0.0))
        for mag, skill in ((20, 1.3), (10, 1.2), (5, 1.0), (2.5, 0.35))
        for epoch in (49, 39)
    ],
    *[("mri", None, epoch, 0.9 - (0.15 if epoch == 189 else 0.0)) for epoch in (199, 189)],
]


def simulate_tables(
    n_cases: int = 120,
    n_val: int = 16,
    folds: int = 5,
    members=PAPER_MEMBERS,
    seed: int = 0,
    proportions=(0.24, 0.16, 0.60),
):
    """(tables, cases DataFrame). Tables: one per (model, split)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(CLASSES), size=n_cases, p=proportions)
    case_ids = [f"CASE-{i:04d}" for i in range(n_cases)]
    val_ids = [f"VAL-{i:04d}" for i in range(n_val)]
    fold = np.empty(n_cases, dtype=int)
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % folds
    shared = rng.normal(size=(n_cases + n_val, len(CLASSES)))
    y_val = rng.choice(len(CLASSES), size=n_val, p=proportions)
    truth = np.eye(len(CLASSES))[np.concatenate([y, y_val])]
    labels = np.asarray(CLASSES, dtype=object)[y]
    tables = []
    for modality, mag, epoch, skill in members:
        member_bias = rng.normal(scale=0.6, size=(n_cases + n_val, len(CLASSES)))
        for f in range(folds):
            model_id = snapshot_id(wsi_run_id(mag, f) if modality == "wsi" else mri_run_id(f), epoch)
            noise = rng.normal(scale=0.5, size=(n_cases + n_val, len(CLASSES)))
            logits = 2.5 * skill * truth + 0.9 * shared + member_bias + noise
            common = dict(model_id=model_id, modality=modality, magnification=mag, snapshot=epoch, fold=f)
            held = np.flatnonzero(fold == f)
            tables.append(
                prediction_table(
                    **common,
                    split="oof",
                    case_ids=[case_ids[i] for i in held],
                    labels=list(labels[held]),
                    logits=logits[held],
                )
            )
            if n_val:
                tables.append(
                    prediction_table(
                        **common,
                        split="val",
                        case_ids=val_ids,
                        labels=[None] * n_val,
                        logits=logits[n_cases:],
                    )
                )
    cases = pd.DataFrame(
        {
            "case_id": case_ids + val_ids,
            "label": list(labels) + [None] * n_val,
            "split": ["train"] * n_cases + ["val"] * n_val,
            "fold": list(fold) + [-1] * n_val,
            "cohort": "simulated",
            "has_slide": True,
            "has_mri": True,
            "excluded": False,
        }
    )
    return tables, cases


def make_prediction_store(root, **kwargs) -> Store:
    store = Store(root, create=True)
    tables, cases = simulate_tables(**kwargs)
    store.write_table("cases", cases)
    for t in tables:
        write_predictions(store, t)
    return store
