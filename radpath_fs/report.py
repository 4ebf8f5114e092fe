"""`radpath report`: one self-contained HTML page (images embedded) that shows the work.

Sections: the cohort, tile counts per slide (Fig. 4), each model's and each ensemble's metrics with
CIs (the ablation table), the primary ensemble's Fig. 5a/5b and confusion matrices, and for a few
cases the slide thumbnail with its kept tiles outlined and coloured by their contribution to the
predicted class through the pooled head.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

import numpy as np
import pandas as pd

from radpath_fs import CLASSES
from radpath_fs.layout import (
    ENSEMBLE_PREDICTIONS_TABLE,
    ENSEMBLES_TABLE,
    PREDICTIONS,
    REPORT_DIR,
    REPORT_INDEX,
    TILES_TABLE,
    prediction_table_name,
)
from radpath_fs.progress import info, warn
from radpath_fs.store import Store

METRIC_COLUMNS = (("balanced_accuracy", "balanced acc."), ("kappa", "kappa"), ("f1_micro", "F1 micro"),
                  ("f1_macro", "F1 macro"))


# ---- tile scores -------------------------------------------------------------------------------
def tile_contributions(head, embeddings) -> np.ndarray:
    """Each tile's contribution to each class logit through the pooled head, (n_tiles, n_classes).

    The pooled vector is z = [max over tiles || mean over tiles]; the head standardises it as
    (z - mu) / s. Each term g_f * (z_f - mu_f) of the head's first-order expansion about z = mu
    (g = d logit / d z, which carries the 1 / s; exact for the paper's linear head, where the
    contributions sum to logit - bias) is handed to the tiles that produced z_f: for the max half,
    the tile that won feature f's max; for the mean half, every tile in proportion to its value
    minus mu_f. Expanding about mu rather than 0 keeps the g * mu offset, which no tile produced,
    out of the tiles' shares.
    """
    import torch

    emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    n, width = emb.shape
    head = head.eval().float()
    z = head.pool(emb[None])[0].detach()
    g = torch.autograd.functional.jacobian(lambda v: head.classify(v[None])[0], z)  # (C, 2L)
    mu = head.feature_mean.detach()  # (L,), the same for both halves (PooledHead.classify)
    contrib = torch.zeros(n, g.shape[0])
    contrib.index_add_(0, emb.argmax(0), (g[:, :width] * (z[:width] - mu)).T)
    contrib += (emb - mu) @ g[:, width:].T / n
    return contrib.detach().numpy()


# ---- figures -----------------------------------------------------------------------------------
def _png(fig) -> bytes:
    from radpath_fs.fusion.plots import to_png

    return to_png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def slide_heatmap(store: Store, case_id: str, slide_path: str, slide_mpp: float, magnification: float,
                  scores: np.ndarray, coords: np.ndarray, tile_size: int, title: str) -> bytes:
    """Slide thumbnail, kept tiles outlined and filled by score (red for, blue against)."""
    import pyvips
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (registers the canvas)
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from radpath_fs.config import mag_to_mpp

    thumb = pyvips.Image.thumbnail(slide_path, 900)
    if thumb.bands > 3:
        thumb = thumb.extract_band(0, n=3)
    img = thumb.numpy()
    # coords are in the magnification's pixels; the thumbnail scales level 0 by thumb.width / W.
    full_width = pyvips.Image.new_from_file(slide_path).width
    scale = (mag_to_mpp(magnification) / slide_mpp) * (thumb.width / full_width)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    ax_img, ax_map = fig.subplots(1, 2)
    ax_img.imshow(img)
    ax_img.set_title(f"{case_id}: kept tiles at {magnification:g}x")
    ax_map.imshow(img, alpha=0.55)
    lim = float(np.abs(scores).max()) or 1.0
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    cmap = __import__("matplotlib").colormaps["coolwarm"]
    side = tile_size * scale
    for (x, y), s in zip(coords, scores, strict=True):
        ax_img.add_patch(Rectangle((x * scale, y * scale), side, side, fill=False, lw=0.6, ec="#1a1a1a"))
        ax_map.add_patch(Rectangle((x * scale, y * scale), side, side, color=cmap(norm(s)), alpha=0.8, lw=0))
    ax_map.set_title(title)
    for ax in (ax_img, ax_map):
        ax.set_axis_off()
    sm = __import__("matplotlib").cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax_map, shrink=0.7, label="contribution to the predicted logit")
    return _png(fig)


# ---- sections ----------------------------------------------------------------------------------
def _table(df: pd.DataFrame) -> str:
    df = df.copy()
    df.columns.name = None  # a pivot's column-axis name would show as a stray header cell
    return df.to_html(index=False, border=0, classes="t", na_rep="–", escape=True)


def _ci(v: float, lo: float, hi: float) -> str:
    if v is None or np.isnan(v):
        return "–"
    return f"{v:.3f}" if lo is None or np.isnan(lo) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def cohort_section(store: Store) -> str:
    cases = store.cases(include_excluded=True)
    kept = cases[~cases["excluded"]]
    by = kept.assign(label=kept["label"].fillna("unlabelled")).pivot_table(
        index="split", columns="label", values="case_id", aggfunc="count", fill_value=0)
    parts = [
        "<h2>Cohort</h2>",
        f"<p>{len(kept)} cases ({int(kept['has_slide'].sum())} with a slide, {int(kept['has_mri'].sum())} "
        f"with MRI); {int(cases['excluded'].sum())} excluded.</p>",
        _table(by.reset_index()),
    ]
    if kept["fold"].ge(0).any():
        folds = kept[kept["fold"] >= 0].pivot_table(index="fold", columns="label", values="case_id",
                                                    aggfunc="count", fill_value=0)
        parts += ["<h3>Folds</h3>", _table(folds.reset_index())]
    if cases["excluded"].any():
        parts += ["<h3>Excluded</h3>", _table(cases.loc[cases["excluded"], ["case_id", "exclusion_reason"]])]
    return "\n".join(parts)


def tiles_section(store: Store) -> str:
    from radpath_fs.wsi import plot_tile_counts

    tiles = store.read_table(TILES_TABLE)
    summary = tiles.groupby("magnification").agg(tiles=("tile_index", "size"), slides=("case_id", "nunique"))
    summary["tiles per slide"] = (summary["tiles"] / summary["slides"]).round(1)
    return "\n".join([
        "<h2>Tiles (Fig. 4)</h2>",
        _img(plot_tile_counts(store, table=tiles), "tile counts per slide"),
        _table(summary.reset_index().sort_values("magnification", ascending=False)),
    ])


def models_section(data) -> str:
    """Each candidate (a modality, magnification and snapshot over its fold models) on OOF cases."""
    from radpath_fs.metrics import score

    oof = data.oof
    rows = []
    for m, member in enumerate(data.members):
        ok = ~np.isnan(oof.P[:, m, 0])
        s = score(oof.y[ok], oof.P[ok, m].argmax(1), n_boot=1000, seed=0)
        rows.append({"member": member.name, "models": ", ".join(member.model_ids), "OOF cases": int(ok.sum()),
                     **{name: _ci(s.values[k], s.low[k], s.high[k]) for k, name in METRIC_COLUMNS}})
    return "<h2>Models (out-of-fold, 95% bootstrap CI)</h2>\n" + _table(pd.DataFrame(rows))


def ensembles_section(ens: pd.DataFrame) -> str:
    from radpath_fs.fusion.cli import primary_id

    primary = primary_id(ens)
    rows = []
    for r in ens.to_dict("records"):
        rows.append({
            "experiment": ("★ " if r["id"] == primary else "") + r["experiment"],
            "method": r["method"],
            "members": f"{r['n_members']}/{r['n_candidates']}",
            **{name: _ci(r[k], r[f"{k}_low"], r[f"{k}_high"]) for k, name in METRIC_COLUMNS},
            **{f"nested {name}": _ci(r[f"nested_{k}"], r[f"nested_{k}_low"], r[f"nested_{k}_high"])
               if r["fits_on_oof"] else "(no fit)" for k, name in METRIC_COLUMNS[:3]},
        })
    return ("<h2>Ensembles and ablations (OOF, 95% bootstrap CI)</h2>\n"
            "<p>Methods that select or fit on OOF predictions are also scored by nested cross-validation.</p>\n"
            + _table(pd.DataFrame(rows)) + "\n" + published_section())


def published_section() -> str:
    from radpath_fs.fusion.reference import published_rows

    return ("<h3>Published reference (not computed from this store)</h3>\n"
            "<p>The paper's figures on the real CPM-RadPath 2020 data, for comparison only.</p>\n"
            + _table(pd.DataFrame(published_rows())))


def figures_section(fused: pd.DataFrame, primary: dict) -> str:
    from radpath_fs.fusion import plots
    from radpath_fs.metrics import confusion_matrix, encode_labels

    oof = fused[(fused["ensemble_id"] == primary["id"]) & fused["label"].notna()]
    if oof.empty:
        return ""
    proba = oof[[f"prob_{c}" for c in CLASSES]].to_numpy()
    labels = oof["label"].to_numpy()
    cm = confusion_matrix(encode_labels(labels), proba.argmax(1))
    title = f"{primary['experiment']} (OOF)"
    return "\n".join([
        f"<h2>Primary ensemble: {html.escape(primary['experiment'])}</h2>",
        "<h3>Predicted probabilities per class (Fig. 5a)</h3>",
        _img(_png(plots.probability_histograms(proba, labels, title=title)), "probability histograms"),
        "<h3>P(A) against P(O), coloured and sized by P(G) (Fig. 5b)</h3>",
        _img(_png(plots.ao_scatter(proba, labels, title=title)), "A vs O scatter"),
        "<h3>Confusion matrix</h3>",
        _img(_png(plots.confusion_figure([cm], [title])), "confusion matrix"),
    ])


def _best_wsi_member(data):
    from radpath_fs.metrics import balanced_accuracy

    best, best_score = None, -1.0
    for m, member in enumerate(data.members):
        if member.modality != "wsi":
            continue
        ok = ~np.isnan(data.oof.P[:, m, 0])
        s = balanced_accuracy(data.oof.y[ok], data.oof.P[ok, m].argmax(1))
        if s > best_score:
            best, best_score = member, s
    return best


def cases_section(store: Store, data, n_cases: int) -> str:
    """Heatmaps of the best slide candidate on a few OOF cases: one per class where possible."""
    import torch

    from radpath_fs.mil import load_wsi_model
    from radpath_fs.tilestore import read_coords, read_tiles, tile_count, tile_group_attrs

    member = _best_wsi_member(data)
    if member is None or n_cases == 0:
        return ""
    names = [prediction_table_name(mid, "oof") for mid in member.model_ids]
    preds = pd.concat([store.read_table(n) for n in names if store.has_table(n)])
    cases = store.cases().set_index("case_id")
    chosen = []
    for c in CLASSES:  # one case of each true class, the most confident first
        part = preds[preds["label"] == c].sort_values(f"prob_{c}", ascending=False)
        chosen += part.head(1).to_dict("records")
    parts = [f"<h2>Cases: tile contributions ({html.escape(member.name)})</h2>",
             "<p>Each kept tile's contribution to the predicted class through the pooled head: for the max "
             "half, the tiles that won each feature's max; for the mean half, each tile's share.</p>"]
    for row in chosen[:n_cases]:
        case_id, model_id = row["case_id"], row["model_id"]
        model, config = load_wsi_model(store, model_id, torch.device("cpu"))
        mag = float(config["magnification"])
        if tile_count(store, case_id, mag) == 0:
            continue
        emb = _case_embeddings(store, model, config, case_id, mag, read_tiles)
        contrib = tile_contributions(model.head, emb)
        pred = int(np.argmax([row[f"prob_{c}"] for c in CLASSES]))
        attrs = tile_group_attrs(store, case_id, mag)
        case = cases.loc[case_id]
        title = (f"contribution to {CLASSES[pred]} (true {row['label']}, "
                 f"P={row[f'prob_{CLASSES[pred]}']:.2f}, {model_id})")
        png = slide_heatmap(store, case_id, case["slide_path"], float(case["slide_mpp"]), mag, contrib[:, pred],
                            read_coords(store, case_id, mag), int(attrs["tile_size"]), title)
        parts.append(f"<h3>{html.escape(case_id)}</h3>" + _img(png, f"tile heatmap {case_id}"))
    return "\n".join(parts)


def _case_embeddings(store, model, config, case_id, mag, read_tiles) -> np.ndarray:
    """Every tile's embedding under the model: cached ones (head mode) or through its embedder."""
    import torch

    if config["mode"] == "head":
        from radpath_fs.embeddings import read_embeddings

        return read_embeddings(store, config["embedder"]["id"], case_id, mag, dtype=np.float32)
    from radpath_fs.mil import build_transforms
    from radpath_fs.predict import wsi_section

    norm = config["normalization"]
    _, evaluate = build_transforms(wsi_section(config), norm["mean"], norm["std"])
    tiles = read_tiles(store, case_id, mag)
    with torch.no_grad():
        return torch.cat([model.embed(evaluate(torch.as_tensor(tiles[i:i + 64])))
                          for i in range(0, len(tiles), 64)]).numpy()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>radpath_fs report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
h1 {{ margin-bottom: 0.2rem; }} h2 {{ border-bottom: 1px solid #ccc; margin-top: 2.2rem; }}
table.t {{ border-collapse: collapse; font-size: 0.9rem; margin: 0.6rem 0; }}
table.t th, table.t td {{ padding: 0.25rem 0.6rem; border-bottom: 1px solid #eee; text-align: left; }}
img {{ max-width: 100%; display: block; margin: 0.6rem 0; }} .meta {{ color: #666; }}
</style></head><body>
<h1>radpath_fs report</h1>
<p class="meta">store {store} · generated {when}</p>
{body}
</body></html>
"""


def write_report(store_url: str, out: Path | None = None, config=None) -> Path:
    """Write `<out>/index.html` (default `<store>/report`) and return its path."""
    from radpath_fs.config import PipelineConfig

    cfg = config or PipelineConfig()
    store = Store(store_url)
    out = Path(out) if out is not None else Path(store.local_path(REPORT_DIR))
    if store.is_local and out == Path(store.local_path(REPORT_DIR)):
        store.check_no_links(f"{REPORT_DIR}/{REPORT_INDEX}")
    sections = [cohort_section(store)]
    if store.has_table(TILES_TABLE):
        sections.append(tiles_section(store))
    if store.list_tables(PREDICTIONS):
        from radpath_fs.fusion.io import load_fusion_data

        data = load_fusion_data(store)
        sections.append(models_section(data))
        if store.has_table(ENSEMBLES_TABLE):
            ens = store.read_table(ENSEMBLES_TABLE)
            sections.append(ensembles_section(ens))
            from radpath_fs.fusion.cli import primary_id

            primary = ens[ens["id"] == primary_id(ens)].to_dict("records")
            if primary and store.has_table(ENSEMBLE_PREDICTIONS_TABLE):
                sections.append(figures_section(store.read_table(ENSEMBLE_PREDICTIONS_TABLE), primary[0]))
        try:
            sections.append(cases_section(store, data, cfg.report.cases_shown))
        except Exception as e:  # the heatmaps are illustrations: a failure must not cost the report
            warn(f"case heatmaps left out: {type(e).__name__}: {e}")
    page = PAGE.format(title=html.escape(cfg.name), store=html.escape(store.url),
                       when=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), body="\n".join(s for s in sections if s))
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_INDEX
    tmp = out / f".{REPORT_INDEX}.tmp"
    tmp.write_text(page)
    tmp.replace(path)
    info(f"report: {path}")
    return path
