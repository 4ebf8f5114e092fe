"""Honest estimates: nested cross-validation of methods that select or fit on OOF predictions.

Scoring a selected ensemble on the very OOF predictions it was selected on is optimistic (the
*naive* number). The *nested* number redoes the whole selection (or the stacker's fit, inner CV
included) on the training cases of each outer fold, predicts the outer fold's cases, and scores
the pooled outer predictions. Methods that learn nothing (fixed-weight votes) have one number:
their nested estimate is the naive one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from radpath_fs.folds import stratified_case_folds
from radpath_fs.fusion.methods import FusionEstimator, check_probabilities, clone
from radpath_fs.metrics import Scores, score


@dataclass
class Evaluation:
    estimator: FusionEstimator  # fitted on every OOF case: what predicts unlabelled splits
    naive_proba: np.ndarray
    naive_pred: np.ndarray
    nested_proba: np.ndarray
    nested_pred: np.ndarray
    naive: Scores
    nested: Scores
    is_nested: bool  # False: the method learns nothing, nested == naive
    outer_folds: np.ndarray | None = None  # outer fold of each case
    fold_weights: list = field(default_factory=list)  # member weights chosen in each outer fold


def nested_predictions(
    estimator: FusionEstimator, P, y, groups=None, *, n_splits: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Outer-fold predictions of a clone fitted on the other folds: (proba, pred, folds, weights)."""
    P = check_probabilities(P)
    y = np.asarray(y, dtype=np.int64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    folds = stratified_case_folds(groups, y, n_splits, seed)
    proba = np.zeros((len(y), P.shape[2]))
    pred = np.zeros(len(y), dtype=np.int64)
    weights = []
    for f in range(n_splits):
        test = folds == f
        est = clone(estimator).fit(P[~test], y[~test], groups=groups[~test])
        proba[test] = est.predict_proba(P[test])
        pred[test] = est.predict(P[test])
        weights.append(None if est.weights_ is None else est.weights_.copy())
    return proba, pred, folds, weights


def evaluate(
    estimator: FusionEstimator,
    P,
    y,
    groups=None,
    *,
    n_splits: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
) -> Evaluation:
    """Fit on every case (naive score, and the model for unlabelled splits) and, for methods that
    learn, the nested cross-validated score. Both with bootstrap CIs over the same resamples."""
    P = check_probabilities(P)
    y = np.asarray(y, dtype=np.int64)
    final = clone(estimator).fit(P, y, groups=groups)
    naive_proba, naive_pred = final.predict_proba(P), final.predict(P)
    kw = dict(n_boot=n_boot, confidence=confidence, seed=seed)
    naive = score(y, naive_pred, **kw)
    if not estimator.learns:
        return Evaluation(final, naive_proba, naive_pred, naive_proba, naive_pred, naive, naive, False)
    proba, pred, folds, weights = nested_predictions(estimator, P, y, groups, n_splits=n_splits, seed=seed)
    return Evaluation(
        final, naive_proba, naive_pred, proba, pred, naive, score(y, pred, **kw), True, folds, weights
    )
