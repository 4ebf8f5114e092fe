"""Offline fusion of prediction tables: voting, pruning, selection, stacking, honest estimates.

Reads only the Parquet prediction tables (radpath_fs.predictions.SCHEMA); never imports torch.
scikit-learn, XGBoost and matplotlib are imported only by what needs them (stacking, plots).
"""

from radpath_fs.fusion.ablations import plan, predictions_frame, results_frame, run_ablations, run_experiment
from radpath_fs.fusion.io import FusionData, Member, SplitData, load_fusion_data
from radpath_fs.fusion.methods import (
    METHODS,
    ExhaustiveSearch,
    GreedySelection,
    HardVote,
    Prune,
    SoftVote,
    StackingLR,
    StackingXGB,
    all_subsets,
    clone,
    create_method,
    evaluate_subsets,
)
from radpath_fs.fusion.nested import evaluate, nested_predictions
from radpath_fs.metrics import METRICS, score

__all__ = [
    "METHODS",
    "METRICS",
    "ExhaustiveSearch",
    "FusionData",
    "GreedySelection",
    "HardVote",
    "Member",
    "Prune",
    "SoftVote",
    "SplitData",
    "StackingLR",
    "StackingXGB",
    "all_subsets",
    "clone",
    "create_method",
    "evaluate",
    "evaluate_subsets",
    "load_fusion_data",
    "nested_predictions",
    "plan",
    "predictions_frame",
    "results_frame",
    "run_ablations",
    "run_experiment",
    "score",
]
