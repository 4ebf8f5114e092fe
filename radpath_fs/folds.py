"""Which cases of the cases table a model predicts for each split, given the fold it held out.

Splits: ``oof`` = the labelled cases of the model's held-out fold; ``val``/``test`` = the
unlabelled cases of that split; ``train`` = the model's training cases. Slide
(`radpath_fs.predict`) and MRI (`radpath_fs.mri.predict`) models share the rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from radpath_fs.errors import RadpathError
from radpath_fs.predictions import SPLITS
from radpath_fs.progress import warn

# The cases-table column that says whether a case has a modality's input.
INPUT_COLUMN = {"wsi": "has_slide", "mri": "has_mri"}


def default_splits(cases: pd.DataFrame, fold: int, modality: str = "wsi") -> list[str]:
    """oof when the model held a fold out, then each unlabelled split that has cases of the modality."""
    unlabelled = cases[cases["label"].isna() & cases[INPUT_COLUMN[modality]].astype(bool)]
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
        cases = cases[cases[INPUT_COLUMN[modality]].astype(bool)]
    labelled = cases["label"].notna()
    if split == "oof":
        if fold < 0:
            raise RadpathError("split oof: this model was trained on every fold (fold -1); it has no held-out cases")
        held = cases[labelled & (cases["fold"] == fold)]
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
        return cases[labelled & ((cases["fold"] != fold) if fold >= 0 else True)]
    raise RadpathError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
