"""Three-class metrics in pure numpy, vectorised over many predictions at once: the per-epoch
figures of training and the scores of fusion.

Ensemble search scores thousands of candidate ensembles per fit. Building every confusion matrix
with one `np.bincount` and deriving the metrics from the matrices turns that into a few array
operations instead of thousands of scikit-learn calls (and keeps scikit-learn's import, about a
second, off the command line). Each metric equals scikit-learn's on the same inputs, including
its conventions for classes absent from a sample (tests/test_fusion.py checks this).

Labels are integer codes 0..C-1 in `radpath_fs.CLASSES` order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from radpath_fs import CLASSES

N_CLASSES = len(CLASSES)
METRICS = ("balanced_accuracy", "kappa", "f1_micro", "f1_macro")
METRIC_LABELS = {
    "balanced_accuracy": "bal. acc.",
    "kappa": "kappa",
    "f1_micro": "F1 micro",
    "f1_macro": "F1 macro",
}


def encode_labels(labels) -> np.ndarray:
    """Class names (A/O/G) to codes; None/NaN become -1 (unknown)."""
    index = {c: i for i, c in enumerate(CLASSES)}
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, lab in enumerate(labels):
        if isinstance(lab, str):
            if lab not in index:
                raise ValueError(f"unknown class {lab!r}; classes are {list(CLASSES)}")
            out[i] = index[lab]
    return out


def _check_codes(y: np.ndarray, name: str, n_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must hold integer class codes in 0..{n_classes - 1}")
    return y.astype(np.int64, copy=False)


def confusion_matrices(y_true, y_pred, n_classes: int = N_CLASSES, check: bool = True) -> np.ndarray:
    """Confusion matrices, rows true and columns predicted, batched over leading axes.

    `y_pred` is (..., n); `y_true` is (n,) (shared by every prediction) or the same shape as
    `y_pred`. Returns int64 (..., C, C). `check=False` skips the label checks (hot loops).
    """
    if check:
        y_pred = _check_codes(y_pred, "y_pred", n_classes)
        y_true = _check_codes(y_true, "y_true", n_classes)
    lead = y_pred.shape[:-1]
    batch = math.prod(lead)
    cc = n_classes * n_classes
    codes = (y_true * n_classes + y_pred).reshape(batch, -1)
    if batch > 1:
        codes = codes + (np.arange(batch, dtype=np.int64) * cc)[:, None]
    counts = np.bincount(codes.ravel(), minlength=batch * cc)
    return counts.reshape(*lead, n_classes, n_classes)


def confusion_matrix(y_true, y_pred, n_classes: int = N_CLASSES) -> np.ndarray:
    """One (C, C) confusion matrix; equals sklearn's with labels=range(C)."""
    return confusion_matrices(np.asarray(y_true), np.asarray(y_pred), n_classes)


# Each metric from confusion matrices (..., C, C), NaN where undefined. scikit-learn only counts
# the classes present in y_true or y_pred; a class absent from both has an all-zero row and
# column here, which each formula leaves out the same way.


def _balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in y_true."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (tp / np.where(present, support, 1)).sum(axis=-1) / present.sum(axis=-1)


def _accuracy(cm: np.ndarray) -> np.ndarray:
    # Single-label multiclass: micro precision = micro recall = micro F1 = accuracy.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.trace(cm, axis1=-2, axis2=-1) / cm.sum(axis=(-2, -1))


def _kappa(cm: np.ndarray) -> np.ndarray:
    """sklearn: 1 - sum(w * cm) / sum(w * expected), undefined (NaN) when chance agreement is 1."""
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = np.trace(cm, axis1=-2, axis2=-1) / n
        expected = (cm.sum(axis=-1) * cm.sum(axis=-2)).sum(axis=-1) / (n * n)
        return np.where(expected < 1, (observed - expected) / (1 - expected), np.nan)


def _f1_macro(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes seen in y_true or y_pred (sklearn's default labels)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    both = cm.sum(axis=-1) + cm.sum(axis=-2)
    seen = both > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (2 * tp / np.where(seen, both, 1)).sum(axis=-1) / seen.sum(axis=-1)


FROM_CONFUSION = {
    "balanced_accuracy": _balanced_accuracy,
    "kappa": _kappa,
    "f1_micro": _accuracy,
    "f1_macro": _f1_macro,
}


def metrics_from_confusion(cm: np.ndarray, metrics=METRICS) -> dict[str, np.ndarray]:
    """The metrics of confusion matrices (..., C, C)."""
    cm = np.asarray(cm)
    return {m: FROM_CONFUSION[m](cm) for m in metrics}


def _one(metric: str, y_true, y_pred) -> float:
    return float(metrics_from_confusion(confusion_matrix(y_true, y_pred))[metric])


def balanced_accuracy(y_true, y_pred) -> float:
    return _one("balanced_accuracy", y_true, y_pred)


def cohen_kappa(y_true, y_pred) -> float:
    """Unweighted Cohen's kappa."""
    return _one("kappa", y_true, y_pred)


def f1_micro(y_true, y_pred) -> float:
    return _one("f1_micro", y_true, y_pred)


def f1_macro(y_true, y_pred) -> float:
    return _one("f1_macro", y_true, y_pred)


def metric_values(y_true, y_pred_batch, metric: str, check: bool = True) -> np.ndarray:
    """One metric for a batch of predictions (k, n) against the same truth (n,)."""
    if metric not in FROM_CONFUSION:
        raise ValueError(f"unknown metric {metric!r}; metrics are {list(METRICS)}")
    return FROM_CONFUSION[metric](confusion_matrices(y_true, y_pred_batch, check=check))


def log_loss_of_truth(y_true: np.ndarray, proba: np.ndarray, scale=1.0) -> np.ndarray:
    """Mean -log p(true class) over cases, batched over leading axes of proba (..., n, C);
    `scale` (broadcast against (..., n)) divides the probabilities first (summed votes -> mean).

    Used only to break ties between ensembles with the same (discrete) metric value.
    """
    p = proba[..., np.arange(len(y_true)), y_true] / scale
    return -np.log(np.clip(p, 1e-12, None)).mean(axis=-1)


@dataclass
class Scores:
    """Metrics of one set of predictions, with bootstrap confidence intervals over cases."""

    values: dict[str, float]
    low: dict[str, float] = field(default_factory=dict)
    high: dict[str, float] = field(default_factory=dict)
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((N_CLASSES, N_CLASSES), np.int64))
    n_cases: int = 0


def bootstrap_intervals(
    y_true,
    y_pred,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, float]]:
    """Percentile bootstrap CIs over cases: (low, high) dicts per metric.

    Resampling n cases with replacement puts each draw in confusion cell (t, p) with probability
    cm[t, p] / n, so a resample's confusion matrix is exactly Multinomial(n, cm / n): drawn
    directly, B resamples cost B x C^2 numbers instead of B x n. Resamples whose metric is
    undefined (e.g. kappa when a resample holds one class) are left out.
    """
    cm = confusion_matrix(y_true, y_pred)
    n = int(cm.sum())
    if n_boot <= 0 or n == 0:
        nan = {m: float("nan") for m in METRICS}
        return dict(nan), dict(nan)
    rng = np.random.default_rng(seed)
    cells = rng.multinomial(n, cm.ravel() / n, size=n_boot).reshape(n_boot, *cm.shape)
    values = metrics_from_confusion(cells)
    alpha = (1.0 - confidence) / 2.0
    low, high = {}, {}
    for m in METRICS:
        v = values[m][np.isfinite(values[m])]
        lo, hi = np.quantile(v, [alpha, 1.0 - alpha]) if v.size else (np.nan, np.nan)
        low[m], high[m] = float(lo), float(hi)
    return low, high


def score(y_true, y_pred, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> Scores:
    """Every metric of METRICS, the confusion matrix and bootstrap CIs."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred)
    values = {m: float(v) for m, v in metrics_from_confusion(cm).items()}
    low, high = bootstrap_intervals(y_true, y_pred, n_boot, confidence, seed)
    return Scores(values=values, low=low, high=high, confusion=cm, n_cases=len(y_true))
