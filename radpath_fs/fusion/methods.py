"""Ensemble methods over member probabilities, as scikit-learn-style estimators.

Every estimator takes `P`, an array (n_cases, n_members, n_classes) of member probabilities, and
integer labels `y` (n_cases,):

    est.fit(P, y, groups=None) -> est      groups: case ids, for estimators with an inner CV
    est.predict_proba(P) -> (n_cases, n_classes)
    est.predict(P) -> (n_cases,)

After `fit`, `weights_` holds each member's weight in the fused vote (summing to 1; None for
stacking, which uses every member) and `members_` the indices of the members used. The class
attribute `learns` says whether `fit` looks at the labels: those estimators are scored by nested
cross-validation (radpath_fs.fusion.nested), the others need no refit.

The selection methods are vectorised in numpy (every candidate ensemble of a step is scored in one
go); scikit-learn and XGBoost are imported only by the stacking estimators that use them.
"""

from __future__ import annotations

import inspect

import numpy as np

from radpath_fs import CLASSES
from radpath_fs.folds import stratified_case_folds
from radpath_fs.metrics import (
    METRICS,
    confusion_matrices,
    log_loss_of_truth,
    metric_values,
    metrics_from_confusion,
)

N_CLASSES = len(CLASSES)


def check_probabilities(P, n_members: int | None = None) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 3 or P.shape[2] != N_CLASSES:
        raise ValueError(f"P must be (n_cases, n_members, {N_CLASSES}), got shape {P.shape}")
    if n_members is not None and P.shape[1] != n_members:
        raise ValueError(f"fitted on {n_members} members, got {P.shape[1]}")
    if not np.isfinite(P).all():
        raise ValueError("P holds NaN or infinite values (a member without a prediction for a case?)")
    return P


def check_labels(y, n_cases: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n_cases,):
        raise ValueError(f"y must hold one label per case ({n_cases}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (n_cases and (y.min() < 0 or y.max() >= N_CLASSES)):
        raise ValueError(f"y must hold class codes 0..{N_CLASSES - 1}")
    return y.astype(np.int64, copy=False)


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics are {list(METRICS)}")
    return metric


def _finite(scores: np.ndarray) -> np.ndarray:
    """Undefined metric values (NaN) rank below every defined one."""
    return np.where(np.isnan(scores), -np.inf, scores)


def _best(scores: np.ndarray, losses: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """Indices ordered best first: higher metric, then lower log loss, then fewer members, then
    lower index. Discrete metrics tie often; the log loss keeps choices stable and sensible."""
    scores = _finite(scores)
    keys = [np.arange(len(scores))]
    if sizes is not None:
        keys.append(sizes)
    keys += [losses, -scores]
    return np.lexsort(keys)


def _score_votes(
    sums: np.ndarray, y: np.ndarray, total, metric: str, ties_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Metric and log loss of soft votes given as summed probabilities (k, n, C) over `total` votes.

    `ties_only`: the log loss (a tie-breaker) only for the candidates sharing the best metric,
    +inf elsewhere; enough to pick the best one, and most of the cost of a greedy step saved.
    """
    scores = metric_values(y, sums.argmax(axis=-1), metric, check=False)
    total = np.asarray(total, dtype=np.float64).reshape(-1, 1)
    if not ties_only:
        return scores, log_loss_of_truth(y, sums, total)
    clean = _finite(scores)
    top = np.flatnonzero(clean == clean.max())
    losses = np.full(len(sums), np.inf)
    losses[top] = log_loss_of_truth(y, sums[top], total[top] if len(total) > 1 else total)
    return scores, losses


class FusionEstimator:
    """scikit-learn's estimator protocol (get_params/set_params/clone) without importing it."""

    learns = True

    def get_params(self, deep: bool = True) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params):
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {k!r}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def predict(self, P) -> np.ndarray:
        return self.predict_proba(P).argmax(axis=1)

    def _soft_vote(self, P) -> np.ndarray:
        P = check_probabilities(P, len(self.weights_))
        return np.einsum("nmc,m->nc", P, self.weights_)

    def _set_weights(self, w: np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float64)
        self.weights_ = w / w.sum()
        self.members_ = np.flatnonzero(self.weights_ > 0)


def clone(estimator: FusionEstimator) -> FusionEstimator:
    """An unfitted copy with the same parameters."""
    return type(estimator)(**estimator.get_params())


class SoftVote(FusionEstimator):
    """Mean of member probabilities, optionally weighted; the class with the highest mean wins."""

    learns = False

    def __init__(self, weights=None):
        self.weights = weights

    def fit(self, P, y=None, groups=None):
        P = check_probabilities(P)
        m = P.shape[1]
        w = np.ones(m) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (m,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {m} non-negative numbers with a positive sum, got {self.weights!r}"
            )
        self._set_weights(w)
        return self

    def predict_proba(self, P) -> np.ndarray:
        return self._soft_vote(P)


class HardVote(FusionEstimator):
    """Majority vote of the members' argmax; ties go to the tied class with the highest mean
    probability. predict_proba gives the vote fractions."""

    learns = False

    def fit(self, P, y=None, groups=None):
        self._set_weights(np.ones(check_probabilities(P).shape[1]))
        return self

    def predict_proba(self, P) -> np.ndarray:
        P = check_probabilities(P, len(self.weights_))
        votes = np.eye(N_CLASSES)[P.argmax(axis=2)]  # (n, M, C) one-hot
        return votes.mean(axis=1)

    def predict(self, P) -> np.ndarray:
        votes = self.predict_proba(P)
        tied = votes >= votes.max(axis=1, keepdims=True) - 1e-12
        return np.where(tied, self._soft_vote(P), -np.inf).argmax(axis=1)


def member_scores(P: np.ndarray, y: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each member's metric and log loss on its own."""
    P = check_probabilities(P)
    Pm = np.ascontiguousarray(P.transpose(1, 0, 2))
    return _score_votes(Pm, check_labels(y, len(P)), 1.0, metric)


class Prune(FusionEstimator):
    """The paper's pruning: drop the k members with the worst metric, soft vote the rest."""

    def __init__(self, k: int = 2, metric: str = "balanced_accuracy"):
        self.k = k
        self.metric = metric

    def fit(self, P, y, groups=None):
        P = check_probabilities(P)
        m = P.shape[1]
        if not 0 <= self.k < m:
            raise ValueError(f"pruning {self.k} of {m} members would leave none")
        self.member_scores_, losses = member_scores(P, y, _check_metric(self.metric))
        self.ranking_ = _best(self.member_scores_, losses)
        keep = np.zeros(m)
        keep[self.ranking_[: m - self.k]] = 1.0
        self._set_weights(keep)
        return self

    def predict_proba(self, P) -> np.ndarray:
        return self._soft_vote(P)


class GreedySelection(FusionEstimator):
    """Forward ensemble selection with replacement (Caruana et al., ICML 2004).

    Sorted initialisation: start from the best `init` members (`"auto"`: the number whose soft
    vote scores best). Then add, `n_iter` times, the member (possibly one already in) that most
    improves the ensemble; the best ensemble met along the way is kept, with members weighted by
    how often they were added. Bagging: the selection is repeated on `bags` random subsets of
    `bag_fraction` of the members and the normalised weights are summed, which curbs overfitting
    the selection set.
    """

    def __init__(
        self,
        metric: str = "balanced_accuracy",
        n_iter: int = 25,
        init="auto",
        bags: int = 20,
        bag_fraction: float = 0.5,
        random_state: int = 0,
    ):
        self.metric = metric
        self.n_iter = n_iter
        self.init = init
        self.bags = bags
        self.bag_fraction = bag_fraction
        self.random_state = random_state

    def fit(self, P, y, groups=None):
        P = check_probabilities(P)
        Pm = np.ascontiguousarray(P.transpose(1, 0, 2))  # (M, n, C)
        y = check_labels(y, len(P))
        _check_metric(self.metric)
        m = Pm.shape[0]
        rng = np.random.default_rng(self.random_state)
        if self.bags <= 1:
            subsets = np.arange(m)[None]
        else:
            size = min(m, max(1, int(round(self.bag_fraction * m))))
            subsets = np.stack([rng.choice(m, size, replace=False) for _ in range(self.bags)])
        # A member's own score does not depend on the bag: rank every member once, best first.
        rank = np.empty(m, dtype=np.int64)
        rank[_best(*_score_votes(Pm, y, 1.0, self.metric))] = np.arange(m)
        order = np.take_along_axis(subsets, np.argsort(rank[subsets], axis=1), axis=1)
        counts = self._select(Pm, y, order)
        weights = np.zeros(m)
        np.add.at(weights, order, counts / counts.sum(axis=1, keepdims=True))
        self._set_weights(weights)
        return self

    @staticmethod
    def _pick(scores: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """Per bag (row), the column with the best metric, then the lowest log loss, then the
        lowest index (the better-ranked member, or the smaller initial ensemble)."""
        scores = _finite(scores)
        top = scores == scores.max(axis=1, keepdims=True)
        return np.where(top, losses, np.inf).argmin(axis=1)

    def _select(self, Pm: np.ndarray, y: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Selection run on every bag at once. `order` (B, K): each bag's members, best first.
        Returns the counts (B, K) of the best ensemble met in each bag."""
        n_bags, k = order.shape
        n, c = Pm.shape[1:]
        members = Pm[order]  # (B, K, n, C)
        rows = np.arange(n_bags)

        def scores(sums, totals):
            s, ll = _score_votes(sums.reshape(-1, n, c), y, totals.ravel(), self.metric)
            return s.reshape(totals.shape), ll.reshape(totals.shape)

        if self.init == "auto":
            sizes = np.broadcast_to(np.arange(1, k + 1, dtype=np.float64), (n_bags, k))
            n_init = self._pick(*scores(np.cumsum(members, axis=1), sizes)) + 1
        else:
            n_init = np.full(n_bags, min(max(int(self.init), 1), k))
        counts = (np.arange(k)[None, :] < n_init[:, None]).astype(np.float64)
        current = np.einsum("bk,bknc->bnc", counts, members)
        s, ll = scores(current[:, None], n_init[:, None].astype(np.float64))
        best_s, best_ll, best_counts = _finite(s[:, 0]), ll[:, 0], counts.copy()
        for _ in range(self.n_iter):
            candidates = current[:, None] + members  # (B, K, n, C)
            totals = np.broadcast_to(counts.sum(axis=1, keepdims=True) + 1, (n_bags, k))
            s, ll = scores(candidates, totals)
            j = self._pick(s, ll)
            counts[rows, j] += 1
            current = candidates[rows, j]
            sj, llj = _finite(s[rows, j]), ll[rows, j]
            # Strictly better only: on a tie the smaller ensemble met first is kept.
            better = (sj > best_s) | ((sj == best_s) & (llj < best_ll))
            best_s, best_ll = np.where(better, sj, best_s), np.where(better, llj, best_ll)
            best_counts[better] = counts[better]
        return best_counts

    def predict_proba(self, P) -> np.ndarray:
        return self._soft_vote(P)


def all_subsets(n_members: int) -> np.ndarray:
    """Every non-empty subset of n members as a boolean mask (2**n - 1, n)."""
    codes = np.arange(1, 2**n_members, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n_members)) & 1).astype(bool)


def evaluate_subsets(
    P, y, masks: np.ndarray, metrics=METRICS, log_loss: bool = True, chunk_size: int = 2048
) -> dict[str, np.ndarray]:
    """Soft vote of every subset in `masks` (S, M) scored at once: each metric, and `log_loss`.

    One matrix product sums the members of a chunk of subsets for every case; the argmax and a
    single bincount give all their confusion matrices.
    """
    P = check_probabilities(P)
    y = check_labels(y, len(P))
    n, m, c = P.shape
    masks = np.asarray(masks, dtype=bool)
    flat = P.transpose(1, 0, 2).reshape(m, n * c)
    sizes = masks.sum(axis=1)
    keys = (*metrics, "log_loss") if log_loss else tuple(metrics)
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(masks), chunk_size):
        block = masks[start : start + chunk_size]
        sums = (block.astype(np.float64) @ flat).reshape(len(block), n, c)
        if metrics:
            values = metrics_from_confusion(confusion_matrices(y, sums.argmax(axis=-1), check=False), metrics)
            for k in metrics:
                out[k].append(values[k])
        if log_loss:
            out["log_loss"].append(log_loss_of_truth(y, sums, sizes[start : start + chunk_size, None]))
    return {k: np.concatenate(v) for k, v in out.items()}


class ExhaustiveSearch(FusionEstimator):
    """The best soft-vote subset among all 2**M - 1 (M <= max_candidates), scored in one pass."""

    def __init__(self, metric: str = "balanced_accuracy", max_candidates: int = 16):
        self.metric = metric
        self.max_candidates = max_candidates

    def fit(self, P, y, groups=None):
        P = check_probabilities(P)
        m = P.shape[1]
        if m > self.max_candidates:
            raise ValueError(
                f"exhaustive search over {m} members ({2**m - 1} subsets) exceeds max_candidates={self.max_candidates}"
            )
        masks = all_subsets(m)
        metric = _check_metric(self.metric)
        self.subset_scores_ = evaluate_subsets(P, y, masks, metrics=(metric,), log_loss=False)[metric]
        # The log loss only breaks ties: computed for the subsets sharing the best metric.
        scores = _finite(self.subset_scores_)
        top = np.flatnonzero(scores == scores.max())
        losses = evaluate_subsets(P, y, masks[top], metrics=(), log_loss=True)["log_loss"]
        best = int(top[_best(scores[top], losses, masks[top].sum(axis=1))[0]])
        self.best_subset_ = np.flatnonzero(masks[best])
        self._set_weights(masks[best].astype(np.float64))
        return self

    def predict_proba(self, P) -> np.ndarray:
        return self._soft_vote(P)


def stack_features(P) -> np.ndarray:
    """Log-probabilities of every member, flattened: (n_cases, n_members * C)."""
    P = check_probabilities(P)
    return np.log(np.clip(P, 1e-6, 1.0)).reshape(len(P), -1)


def _balanced_sample_weight(y: np.ndarray) -> np.ndarray:
    from radpath_fs.training import inverse_frequency_weights

    return inverse_frequency_weights(np.asarray(CLASSES)[y])[y]


class _Stacker(FusionEstimator):
    """Common part of the stackers: a learner over every member's probabilities.

    Classes missing from a training fold are handled here: the learner sees only the classes
    present, and predict_proba maps its columns back (absent classes get probability 0).
    """

    def _prepare(self, P, y, groups):
        P = check_probabilities(P)
        y = check_labels(y, len(P))
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        self.n_members_ = P.shape[1]
        self.classes_ = np.unique(y)
        self.weights_ = None
        self.members_ = np.arange(P.shape[1])
        code = np.searchsorted(self.classes_, y)
        return stack_features(P), code, groups

    def _expand(self, proba_present: np.ndarray) -> np.ndarray:
        out = np.zeros((len(proba_present), N_CLASSES))
        out[:, self.classes_] = proba_present
        return out

    def _inner_folds(self, y, groups, n_folds: int):
        """Case-grouped inner folds, fewer when a class is too rare to fill them."""
        k = min(n_folds, int(np.bincount(y).min()), len(np.unique(groups)))
        return stratified_case_folds(groups, y, k, self.random_state) if k >= 2 else None

    def _pick(self, candidates, proba_by_candidate, code, metric) -> int:
        """The candidate setting whose pooled inner-CV predictions score best."""
        stacked = np.stack(proba_by_candidate)
        return int(_best(*_score_votes(stacked, code, 1.0, metric), np.arange(len(candidates)))[0])


class StackingLR(_Stacker):
    """Multinomial logistic regression on every member's log-probabilities (scikit-learn).

    With several `Cs`, the regularisation is chosen by a case-grouped inner cross-validation.
    """

    def __init__(
        self,
        Cs=(1.0,),
        class_weight: str | None = "balanced",
        inner_folds: int = 3,
        metric: str = "balanced_accuracy",
        max_iter: int = 200,
        random_state: int = 0,
    ):
        self.Cs = Cs
        self.class_weight = class_weight
        self.inner_folds = inner_folds
        self.metric = metric
        self.max_iter = max_iter
        self.random_state = random_state

    def _model(self, C: float):
        from sklearn.linear_model import LogisticRegression

        # Newton-Cholesky: a few exact Newton steps on this small dense problem (tens of features),
        # an order of magnitude faster here than the default L-BFGS.
        return LogisticRegression(
            C=C, class_weight=self.class_weight, max_iter=self.max_iter, solver="newton-cholesky"
        )

    def fit(self, P, y, groups=None):
        X, code, groups = self._prepare(P, y, groups)
        Cs = [float(c) for c in np.atleast_1d(self.Cs)]
        self.C_ = Cs[0]
        if len(self.classes_) == 1:
            self.model_ = None
            return self
        folds = self._inner_folds(code, groups, self.inner_folds) if len(Cs) > 1 else None
        if folds is not None:
            pooled = []
            for C in Cs:
                proba = np.zeros((len(code), len(self.classes_)))
                for f in np.unique(folds):
                    test = folds == f
                    model = self._model(C).fit(X[~test], code[~test])
                    proba[np.ix_(test, model.classes_)] = model.predict_proba(X[test])
                pooled.append(proba)
            self.C_ = Cs[self._pick(Cs, pooled, code, _check_metric(self.metric))]
        self.model_ = self._model(self.C_).fit(X, code)
        return self

    def predict_proba(self, P) -> np.ndarray:
        X = stack_features(check_probabilities(P, self.n_members_))
        if self.model_ is None:
            return self._expand(np.ones((len(X), 1)))
        proba = np.zeros((len(X), len(self.classes_)))
        proba[:, self.model_.classes_] = self.model_.predict_proba(X)
        return self._expand(proba)


class StackingXGB(_Stacker):
    """Gradient-boosted trees (XGBoost) on every member's log-probabilities, class-balanced.

    The number of boosting rounds is chosen among `n_estimators` by a case-grouped inner
    cross-validation; each inner fit grows the largest number once and is read at every smaller
    one (`iteration_range`).
    """

    def __init__(
        self,
        n_estimators=(25, 50, 100, 200),
        max_depth: int = 2,
        learning_rate: float = 0.1,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        inner_folds: int = 3,
        metric: str = "balanced_accuracy",
        random_state: int = 0,
        n_jobs: int = 1,
    ):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.inner_folds = inner_folds
        self.metric = metric
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _model(self, rounds: int, n_classes: int):
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=rounds,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            objective="multi:softprob" if n_classes > 2 else "binary:logistic",
            tree_method="hist",
            random_state=self.random_state,
            n_jobs=self.n_jobs,
        )

    @staticmethod
    def _proba(model, X, rounds: int | None = None) -> np.ndarray:
        kw = {} if rounds is None else {"iteration_range": (0, rounds)}
        return model.predict_proba(X, **kw)

    def fit(self, P, y, groups=None):
        X, code, groups = self._prepare(P, y, groups)
        grid = sorted(int(r) for r in np.atleast_1d(self.n_estimators))
        self.n_estimators_ = grid[-1]
        k = len(self.classes_)
        if k == 1:
            self.model_ = None
            return self
        weight = _balanced_sample_weight(code)
        folds = self._inner_folds(code, groups, self.inner_folds) if len(grid) > 1 else None
        if folds is not None:
            pooled = [np.zeros((len(code), k)) for _ in grid]
            for f in np.unique(folds):
                test = folds == f
                train_classes = np.unique(code[~test])
                model = self._model(grid[-1], len(train_classes))
                model.fit(X[~test], np.searchsorted(train_classes, code[~test]), sample_weight=weight[~test])
                for proba, rounds in zip(pooled, grid, strict=True):
                    proba[np.ix_(test, train_classes)] = self._proba(model, X[test], rounds)
            self.n_estimators_ = grid[self._pick(grid, pooled, code, _check_metric(self.metric))]
        self.model_ = self._model(self.n_estimators_, k).fit(X, code, sample_weight=weight)
        return self

    def predict_proba(self, P) -> np.ndarray:
        X = stack_features(check_probabilities(P, self.n_members_))
        if self.model_ is None:
            return self._expand(np.ones((len(X), 1)))
        return self._expand(self._proba(self.model_, X))


# The factory, timm-style: a name and keyword arguments give an estimator.
METHODS: dict[str, type[FusionEstimator]] = {
    "soft_vote": SoftVote,
    "hard_vote": HardVote,
    "prune": Prune,
    "greedy": GreedySelection,
    "exhaustive": ExhaustiveSearch,
    "stack_lr": StackingLR,
    "stack_xgb": StackingXGB,
}


def create_method(name: str, **kwargs) -> FusionEstimator:
    """An estimator by name (METHODS) with the keyword arguments its constructor accepts."""
    if name not in METHODS:
        raise ValueError(f"unknown fusion method {name!r}; methods are {', '.join(METHODS)}")
    cls = METHODS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


__all__ = [
    "METHODS",
    "ExhaustiveSearch",
    "FusionEstimator",
    "GreedySelection",
    "HardVote",
    "Prune",
    "SoftVote",
    "StackingLR",
    "StackingXGB",
    "all_subsets",
    "clone",
    "create_method",
    "evaluate_subsets",
    "member_scores",
]
