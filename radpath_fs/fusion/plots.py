"""Figures of fused predictions (PNG through matplotlib's Agg canvas, no display needed).

Figures are built with the object API (`matplotlib.figure.Figure` + `FigureCanvasAgg`), not
pyplot: nothing global is touched, so this works in a CLI, in a report writer's worker and in a
notebook alike (display the PNG bytes there).
"""

from __future__ import annotations

import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from radpath_fs import CLASSES

CLASS_COLOURS = {"A": "#1f77b4", "O": "#2ca02c", "G": "#d62728"}


def _labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray([lab if isinstance(lab, str) else None for lab in labels], dtype=object)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} cases")
    return labels if any(lab is not None for lab in labels) else None


def _check(proba) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] != len(CLASSES):
        raise ValueError(f"probabilities must be (n_cases, {len(CLASSES)}), got {proba.shape}")
    return proba


def probability_histograms(proba, labels=None, *, bins: int = 20, title: str | None = None) -> Figure:
    """One histogram per class of the probability given to that class (the paper's Fig. 5a).

    With labels, bars are stacked by true class: a well-separated class shows its own cases near 1
    and the others near 0.
    """
    proba = _check(proba)
    labels = _labels(labels, len(proba))
    fig = Figure(figsize=(4.0 * len(CLASSES), 3.4), layout="constrained")
    axes = fig.subplots(1, len(CLASSES), sharey=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for j, (ax, c) in enumerate(zip(axes, CLASSES, strict=True)):
        if labels is None:
            ax.hist(proba[:, j], bins=edges, color=CLASS_COLOURS[c], alpha=0.85)
        else:
            groups = [proba[labels == t, j] for t in CLASSES]
            ax.hist(
                groups,
                bins=edges,
                stacked=True,
                color=[CLASS_COLOURS[t] for t in CLASSES],
                label=[f"true {t}" for t in CLASSES],
            )
        ax.set_xlabel(f"P({c})")
        ax.set_xlim(0, 1)
    axes[0].set_ylabel("cases")
    if labels is not None:
        axes[-1].legend(loc="upper center", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def ao_scatter(proba, labels=None, *, title: str | None = None) -> Figure:
    """P(A) against P(O), coloured and sized by P(G) (the paper's Fig. 5b).

    Glioblastomas sit near the origin as large dark points; A and O spread along the two axes and
    the diagonal P(A) + P(O) = 1 is where the A/O confusion lives. With labels, marker shape gives
    the true class.
    """
    proba = _check(proba)
    labels = _labels(labels, len(proba))
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.subplots()
    sizes = 15 + 120 * proba[:, 2]
    kw = dict(cmap="viridis", vmin=0.0, vmax=1.0, edgecolors="k", linewidths=0.3)
    if labels is None:
        points = ax.scatter(proba[:, 0], proba[:, 1], s=sizes, c=proba[:, 2], **kw)
    else:
        for t, marker in zip(CLASSES, ("o", "s", "^"), strict=True):
            sel = labels == t
            if sel.any():
                points = ax.scatter(
                    proba[sel, 0],
                    proba[sel, 1],
                    s=sizes[sel],
                    c=proba[sel, 2],
                    marker=marker,
                    label=f"true {t}",
                    **kw,
                )
        ax.legend(loc="upper right", fontsize="small")
    ax.plot([0, 1], [1, 0], color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("P(A)")
    ax.set_ylabel("P(O)")
    fig.colorbar(points, ax=ax, label="P(G)")
    if title:
        ax.set_title(title)
    return fig


def confusion_figure(matrices, titles=None) -> Figure:
    """Confusion matrices side by side (rows true, columns predicted), counts and row fractions."""
    mats = [
        np.asarray(m).reshape(len(CLASSES), len(CLASSES))
        for m in (matrices if isinstance(matrices, (list, tuple)) else [matrices])
    ]
    titles = list(titles) if titles is not None else [None] * len(mats)
    fig = Figure(figsize=(3.6 * len(mats), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(mats)))
    for ax, cm, t in zip(axes, mats, titles, strict=True):
        rows = cm.sum(axis=1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(CLASSES)):
            for j in range(len(CLASSES)):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}\n{frac[i, j]:.0%}",
                    ha="center",
                    va="center",
                    color="white" if frac[i, j] > 0.6 else "black",
                    fontsize="small",
                )
        ax.set_xticks(range(len(CLASSES)), CLASSES)
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if t:
            ax.set_title(t, fontsize="medium")
    return fig


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> str:
    data = to_png(fig, dpi)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)
