"""Case-grouped, label-stratified folds for the nested and inner cross-validations of fusion."""

from __future__ import annotations

import numpy as np

from radpath_fs.errors import ConfigError


def stratified_case_folds(groups, y, n_splits: int, seed: int = 0) -> np.ndarray:
    """A fold index per row: all rows of a case share a fold, and each class is spread evenly.

    Deterministic for a seed. Classes are dealt round-robin, continuing where the previous class
    stopped, so fold sizes differ by at most one case.
    """
    groups = np.asarray(groups)
    y = np.asarray(y)
    cases, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if n_splits < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {n_splits}")
    if len(cases) < n_splits:
        raise ConfigError(f"{len(cases)} case(s) cannot be split into {n_splits} folds")
    case_y = y[first]
    rng = np.random.default_rng(seed)
    fold = np.empty(len(cases), dtype=np.int64)
    offset = 0
    for c in np.unique(case_y):
        idx = rng.permutation(np.flatnonzero(case_y == c))
        fold[idx] = (np.arange(len(idx)) + offset) % n_splits
        offset = (offset + len(idx)) % n_splits
    return fold[inverse]
