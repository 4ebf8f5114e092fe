"""Folds and splits: which fold each case is in, and which cases a model of a fold trains on,
is held out from, or predicts.

- `assign_folds`: the cases table's folds (`radpath ingest`), label-stratified and seeded;
- `stratified_case_folds`: the same dealing for fusion's nested and inner cross-validations,
  with every row of a case in one fold;
- `fold_cases`: the one split rule of stage two, (training, held-out) cases of a fold; fold -1
  trains on every labelled case and holds none out;
- `split_cases` / `default_splits`: the cases of a prediction split (`radpath predict`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from radpath_fs.errors import ConfigError, RadpathError
from radpath_fs.metrics import encode_labels
from radpath_fs.predictions import SPLITS
from radpath_fs.progress import warn

# The cases table's column that says a case has the modality's input.
HAS = {"wsi": "has_slide", "mri": "has_mri"}
_INPUT = {"wsi": "a slide", "mri": "MRI"}


def deal_folds(codes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold 0..k-1 per item of class `codes` (0..C-1): each class shuffled and dealt round-robin,
    continuing where the previous class stopped, so fold sizes differ by at most one and every
    class is spread as evenly as it can be, even one with fewer items than folds."""
    codes = np.asarray(codes)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(codes), dtype=np.int64)
    start = 0
    for c in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == c))
        folds[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return folds


def assign_folds(labels: pd.Series, k: int, seed: int) -> np.ndarray:
    """The cases table's folds: stratified and seeded for labelled cases, -1 for the rest."""
    codes = encode_labels(labels.tolist())
    labelled = codes >= 0
    folds = np.full(len(codes), -1, dtype=np.int32)
    if not labelled.any():
        return folds
    if labelled.sum() < k:
        raise RadpathError(f"{int(labelled.sum())} labelled case(s) cannot be split into {k} folds (--folds)")
    counts = pd.Series(labels[labelled].to_numpy()).value_counts()
    if counts.min() < k:
        warn(f"class {counts.idxmin()} has {counts.min()} case(s), fewer than {k} folds: some folds will lack it")
    folds[labelled] = deal_folds(codes[labelled], k, seed)
    return folds


def stratified_case_folds(groups, y, n_splits: int, seed: int = 0) -> np.ndarray:
    """A fold index per row: all rows of a case (`groups`) share a fold, dealt by `deal_folds`."""
    groups = np.asarray(groups)
    y = np.asarray(y)
    cases, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if n_splits < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {n_splits}")
    if len(cases) < n_splits:
        raise ConfigError(f"{len(cases)} case(s) cannot be split into {n_splits} folds")
    return deal_folds(y[first], n_splits, seed)[inverse]


def _held_out(cases: pd.DataFrame, fold: int) -> pd.Series:
    """The rows a model of `fold` did not train on: those of the fold (none for fold -1)."""
    return cases["fold"] == fold if fold >= 0 else pd.Series(False, index=cases.index)


def fold_cases(cases: pd.DataFrame, fold: int, modality: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, held-out) rows for a model of `fold`: the labelled cases with the modality's input."""
    labelled = cases[cases["label"].notna() & cases[HAS[modality]].astype(bool)]
    if labelled.empty:
        raise RadpathError(f"no labelled case with {_INPUT[modality]} to train on")
    folds = sorted(int(f) for f in labelled["fold"].unique() if f >= 0)
    if fold >= 0 and fold not in folds:
        raise RadpathError(f"--fold {fold}: no labelled case with {_INPUT[modality]} is in fold {fold} "
                           f"(the cases table has folds {folds}, or -1 to train on every case)")
    held = _held_out(labelled, fold)
    return labelled[~held].reset_index(drop=True), labelled[held].reset_index(drop=True)


def default_splits(cases: pd.DataFrame, fold: int, modality: str = "wsi") -> list[str]:
    """oof when the model held a fold out, then each unlabelled split that has cases of the modality."""
    unlabelled = cases[cases["label"].isna() & cases[HAS[modality]].astype(bool)]
    present = set(unlabelled["split"].dropna())
    return (["oof"] if fold >= 0 else []) + [s for s in SPLITS if s in ("val", "test") and s in present]


def split_cases(cases: pd.DataFrame, split: str, fold: int, train_cases: Sequence[str] | None = None,
                modality: str | None = None, model_id: str = "this model") -> pd.DataFrame:
    """The rows of the cases table that make up `split` for a model trained without `fold`
    (only the cases that have the `modality`'s input, when given).

    Out-of-fold rows never include a case the model was trained on (`train_cases`, as its
    config records them), even where the cases table's folds changed since it was trained.
    """
    if modality is not None:
        cases = cases[cases[HAS[modality]].astype(bool)]
    labelled = cases["label"].notna()
    if split == "oof":
        if fold < 0:
            raise RadpathError(f"{model_id}: split oof: the model was trained on every fold (fold -1), so it has "
                               "no out-of-fold cases; ask for val, test or train")
        held = cases[labelled & _held_out(cases, fold)]
        seen = held["case_id"].isin(set(train_cases or ()))
        if seen.any():
            ids = held.loc[seen, "case_id"].astype(str).tolist()
            warn(f"{model_id}: {len(ids)} case(s) of fold {fold} were among its training cases (the folds "
                 f"changed since it was trained); they get no out-of-fold row: {', '.join(ids[:5])}"
                 f"{' ...' if len(ids) > 5 else ''}. Retrain to use the new folds")
        return held[~seen]
    if split in ("val", "test"):
        return cases[~labelled & (cases["split"] == split)]
    if split == "train":
        if train_cases is not None:
            return cases[cases["case_id"].isin(set(train_cases))]
        return cases[labelled & ~_held_out(cases, fold)]
    raise RadpathError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
