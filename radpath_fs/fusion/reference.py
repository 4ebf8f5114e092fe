"""The published CPM-RadPath 2020 results of the method this project rebuilds: shown beside ours as
labelled reference rows, never computed here and never mixed into tables of computed metrics.

Source: Lerousseau et al., "Multimodal brain tumor classification", CPM-RadPath 2020 challenge
(BrainLes 2020, LNCS 12659): cross-validation on the 221 training cases and the challenge's
validation leaderboard.
"""

from __future__ import annotations

from typing import NamedTuple


class PublishedResult(NamedTuple):
    label: str
    balanced_accuracy: float
    kappa: float
    f1_micro: float


PUBLISHED = (
    PublishedResult("CPM-RadPath 2020 (Lerousseau et al.), cross-validation", 0.913, 0.897, 0.951),
    PublishedResult("CPM-RadPath 2020 (Lerousseau et al.), validation set", 0.911, 0.904, 0.943),
)


def published_rows() -> list[dict[str, str]]:
    """The published results as display rows (column -> text), for every table that shows them."""
    return [{"reference": r.label, "balanced acc.": f"{r.balanced_accuracy:.3f}", "kappa": f"{r.kappa:.3f}",
             "F1 micro": f"{r.f1_micro:.3f}"} for r in PUBLISHED]
