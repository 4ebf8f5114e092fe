"""Fusion experiments: the configured method and the paper's ablations, as tables.

An experiment is a method applied to a set of candidate members. The ablations are: MRI only, WSI
only, each magnification, each snapshot (counted back from each modality's latest), all members,
pruned, greedy-selected, exhaustive search (up to 16 candidates) and stacked. Groups come from the
members' table columns (modality, magnification, snapshot).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from radpath_fs import CLASSES
from radpath_fs.errors import ConfigError
from radpath_fs.fusion.io import FusionData
from radpath_fs.fusion.methods import FusionEstimator, create_method
from radpath_fs.fusion.nested import Evaluation, evaluate
from radpath_fs.metrics import METRICS, Scores

# The experiment a method gives when it runs over every candidate.
EXPERIMENT_OF_METHOD = {
    "soft_vote": "all",
    "hard_vote": "all-hard-vote",
    "prune": "pruned",
    "greedy": "selected",
    "exhaustive": "exhaustive",
    "stack_lr": "stacked-lr",
    "stack_xgb": "stacked-xgb",
}


@dataclass
class Experiment:
    name: str
    description: str
    method: str
    candidates: list[int]
    primary: bool = False


@dataclass
class SplitPrediction:
    case_ids: np.ndarray
    labels: np.ndarray
    proba: np.ndarray
    pred: np.ndarray


@dataclass
class Result:
    id: str
    experiment: Experiment
    params: dict
    candidates: list[str]
    members: list[str]
    weights: list[float] | None
    evaluation: Evaluation
    oof_case_ids: np.ndarray
    oof_labels: np.ndarray
    predictions: dict[str, SplitPrediction] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)  # split -> cases lacking a candidate


def method_for(name: str, cfg) -> FusionEstimator:
    """The estimator of a method with the settings of a FusionConfig."""
    return create_method(
        name,
        k=cfg.prune,
        metric=cfg.metric,
        n_iter=cfg.greedy_iterations,
        bags=cfg.greedy_bags,
        bag_fraction=cfg.greedy_bag_fraction,
        random_state=cfg.seed,
    )


def _epochs(members, idx) -> str:
    return ", ".join(f"{members[i].modality} e{members[i].snapshot}" for i in idx)


def plan(data: FusionData, cfg, ablations: bool = True) -> list[Experiment]:
    """The experiments to run: the configured method over every candidate, plus the ablations."""
    members = data.members
    every = list(range(len(members)))
    if cfg.method == "prune" and cfg.prune >= len(members):
        raise ConfigError(f"fusion.prune={cfg.prune} would drop all {len(members)} candidate members")
    if cfg.method == "exhaustive" and len(members) > 16:
        raise ConfigError(f"exhaustive search is limited to 16 candidates; the store has {len(members)}")
    primary = Experiment(
        EXPERIMENT_OF_METHOD[cfg.method],
        f"{cfg.method} over all {len(members)} candidates",
        cfg.method,
        every,
        True,
    )
    if not ablations:
        return [primary]

    out: list[Experiment] = []
    by_modality: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_modality.setdefault(m.modality, []).append(i)
    for modality in ("mri", "wsi"):
        if modality in by_modality:
            out.append(
                Experiment(
                    modality, f"{modality.upper()} only: soft vote", "soft_vote", by_modality[modality]
                )
            )
    mags = sorted({m.magnification for m in members if m.magnification is not None}, reverse=True)
    for mag in mags:
        idx = [i for i, m in enumerate(members) if m.magnification == mag]
        out.append(
            Experiment(
                f"wsi-mag{mag:g}",
                f"magnification {mag:g}x only: soft vote of its snapshots",
                "soft_vote",
                idx,
            )
        )
    for offset in sorted({m.snapshot_offset for m in members}):
        idx = [i for i, m in enumerate(members) if m.snapshot_offset == offset]
        name = "snapshot-last" if offset == 0 else f"snapshot-last-{offset}"
        out.append(
            Experiment(name, f"one snapshot per model ({_epochs(members, idx)}): soft vote", "soft_vote", idx)
        )
    out.append(Experiment("all", f"soft vote of all {len(members)} candidates", "soft_vote", every))
    if cfg.prune < len(members):
        out.append(
            Experiment(
                "pruned", f"drop the {cfg.prune} worst by {cfg.metric}, soft vote the rest", "prune", every
            )
        )
    out.append(
        Experiment(
            "selected", "greedy forward selection with replacement, bagged (Caruana 2004)", "greedy", every
        )
    )
    if len(members) <= 16:
        out.append(
            Experiment(
                "exhaustive", f"best of all {2 ** len(members) - 1} soft-vote subsets", "exhaustive", every
            )
        )
    out.append(
        Experiment(
            EXPERIMENT_OF_METHOD[cfg.stacker],
            f"{cfg.stacker} on every member's probabilities",
            cfg.stacker,
            every,
        )
    )

    for e in out:
        if e.name == primary.name:
            e.primary = True
            break
    else:
        out.append(primary)
    return out


def _experiment_id(exp: Experiment, params: dict, candidates: list[str], cfg) -> str:
    key = json.dumps(
        {
            "method": exp.method,
            "params": params,
            "candidates": candidates,
            "outer_folds": cfg.outer_folds,
            "seed": cfg.seed,
        },
        sort_keys=True,
        default=str,
    )
    return f"{exp.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def run_experiment(data: FusionData, exp: Experiment, cfg) -> Result:
    """Fit (naive), nest (honest) and predict the unlabelled splits for one experiment."""
    oof = data.oof
    est = method_for(exp.method, cfg)
    ev = evaluate(
        est,
        oof.P[:, exp.candidates],
        oof.y,
        oof.case_ids,
        n_splits=cfg.outer_folds,
        seed=cfg.seed,
        n_boot=cfg.bootstrap,
        confidence=cfg.confidence,
    )
    names = [data.members[i].name for i in exp.candidates]
    weights = ev.estimator.weights_
    members = names if weights is None else [n for n, w in zip(names, weights, strict=True) if w > 0]
    params = {k: v for k, v in est.get_params().items() if not isinstance(v, np.ndarray)}
    result = Result(
        id=_experiment_id(exp, params, names, cfg),
        experiment=exp,
        params=params,
        candidates=names,
        members=members,
        weights=None if weights is None else [float(w) for w in weights if w > 0],
        evaluation=ev,
        oof_case_ids=oof.case_ids,
        oof_labels=oof.labels,
    )
    for split, sd in data.splits.items():
        rows = sd.complete(exp.candidates)
        result.missing[split] = int((~rows).sum())
        if rows.any():
            P = sd.P[rows][:, exp.candidates]
            result.predictions[split] = SplitPrediction(
                sd.case_ids[rows], sd.labels[rows], ev.estimator.predict_proba(P), ev.estimator.predict(P)
            )
    return result


def run_ablations(
    data: FusionData,
    cfg,
    ablations: bool = True,
    *,
    experiments: list[Experiment] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Result]:
    """Run the planned experiments (or `experiments`); `progress(1)` is called after each."""
    if len(data.oof.case_ids) < cfg.outer_folds:
        raise ConfigError(
            f"{len(data.oof.case_ids)} OOF case(s) in common cannot be split into fusion.outer_folds={cfg.outer_folds}"
        )
    results = []
    for exp in experiments if experiments is not None else plan(data, cfg, ablations):
        results.append(run_experiment(data, exp, cfg))
        if progress is not None:
            progress(1)
    return results


def _metric_columns(prefix: str, s: Scores) -> dict:
    out = {}
    for m in METRICS:
        out[f"{prefix}{m}"] = s.values[m]
        out[f"{prefix}{m}_low"] = s.low.get(m, np.nan)
        out[f"{prefix}{m}_high"] = s.high.get(m, np.nan)
    return out


def results_frame(results: list[Result], cfg, created: dt.datetime | None = None) -> pd.DataFrame:
    """One row per experiment: the `tables/ensembles.parquet` schema.

    Metric columns without prefix are the naive numbers (fit and scored on the same OOF cases);
    `nested_*` are the nested-CV numbers (equal to the naive ones when `fits_on_oof` is false).
    """
    created = created or dt.datetime.now(dt.timezone.utc)
    rows = []
    for r in results:
        ev = r.evaluation
        nested_sel = [
            None if w is None else [n for n, x in zip(r.candidates, w, strict=True) if x > 0]
            for w in ev.fold_weights
        ]
        rows.append(
            {
                "id": r.id,
                "experiment": r.experiment.name,
                "description": r.experiment.description,
                "method": r.experiment.method,
                "primary": r.experiment.primary,
                "params": json.dumps(r.params, sort_keys=True, default=str),
                "candidates": r.candidates,
                "members": r.members,
                "weights": r.weights,
                "n_candidates": len(r.candidates),
                "n_members": len(r.members),
                "fits_on_oof": ev.is_nested,
                "selection_metric": cfg.metric,
                "n_cases": ev.naive.n_cases,
                "outer_folds": cfg.outer_folds if ev.is_nested else 0,
                "bootstrap": cfg.bootstrap,
                "confidence": cfg.confidence,
                "seed": cfg.seed,
                **_metric_columns("", ev.naive),
                **_metric_columns("nested_", ev.nested),
                "confusion": ev.naive.confusion.ravel().tolist(),
                "nested_confusion": ev.nested.confusion.ravel().tolist(),
                "nested_selections": json.dumps(nested_sel),
                "created": created,
            }
        )
    return pd.DataFrame(rows)


def predictions_frame(results: list[Result]) -> pd.DataFrame:
    """Fused per-case probabilities: `tables/ensemble_predictions.parquet`.

    OOF rows hold the nested (honest) out-of-fold predictions; val/test rows come from the model
    fitted on every OOF case.
    """
    frames = []
    for r in results:
        ev = r.evaluation
        splits = {
            "oof": SplitPrediction(r.oof_case_ids, r.oof_labels, ev.nested_proba, ev.nested_pred),
            **r.predictions,
        }
        for split, sp in splits.items():
            frame = pd.DataFrame(
                {
                    "ensemble_id": r.id,
                    "experiment": r.experiment.name,
                    "split": split,
                    "case_id": sp.case_ids.astype(str),
                    "label": pd.array(list(sp.labels), dtype="string"),
                }
            )
            for j, c in enumerate(CLASSES):
                frame[f"prob_{c}"] = sp.proba[:, j].astype(np.float32)
            frame["pred"] = np.asarray(CLASSES, dtype=object)[sp.pred]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)
