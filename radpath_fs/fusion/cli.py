"""`radpath fuse`: read the prediction tables, run the fusion experiments, write and print them.

Writes `tables/ensembles.parquet` (one row per experiment; rows of the same experiment id are
replaced, others kept, and only the latest run's primary row stays primary) and
`tables/ensemble_predictions.parquet` (fused per-case probabilities).
No torch, and scikit-learn / XGBoost / matplotlib only when a method or --plots needs them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radpath_fs import CLASSES
from radpath_fs.errors import StoreError
from radpath_fs.fusion.ablations import plan, predictions_frame, results_frame, run_ablations
from radpath_fs.fusion.io import load_fusion_data
from radpath_fs.layout import ENSEMBLE_PREDICTIONS_TABLE, ENSEMBLES_TABLE
from radpath_fs.metrics import METRICS
from radpath_fs.progress import info, progress_bar, warn


def _metric_fields(prefix: str) -> list[pa.Field]:
    return [pa.field(f"{prefix}{m}{s}", pa.float64()) for m in METRICS for s in ("", "_low", "_high")]


ENSEMBLES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("experiment", pa.string()),
        ("description", pa.string()),
        ("method", pa.string()),
        ("primary", pa.bool_()),
        ("params", pa.string()),
        ("candidates", pa.list_(pa.string())),
        ("members", pa.list_(pa.string())),
        ("weights", pa.list_(pa.float64())),
        ("n_candidates", pa.int32()),
        ("n_members", pa.int32()),
        ("fits_on_oof", pa.bool_()),
        ("selection_metric", pa.string()),
        ("n_cases", pa.int32()),
        ("outer_folds", pa.int32()),
        ("bootstrap", pa.int32()),
        ("confidence", pa.float64()),
        ("seed", pa.int64()),
        *_metric_fields(""),
        *_metric_fields("nested_"),
        ("confusion", pa.list_(pa.int64())),
        ("nested_confusion", pa.list_(pa.int64())),
        ("nested_selections", pa.string()),
        ("created", pa.timestamp("us", tz="UTC")),
    ]
)

ENSEMBLE_PREDICTIONS_SCHEMA = pa.schema(
    [
        ("ensemble_id", pa.string()),
        ("experiment", pa.string()),
        ("split", pa.string()),
        ("case_id", pa.string()),
        ("label", pa.string()),
        *[(f"prob_{c}", pa.float32()) for c in CLASSES],
        ("pred", pa.string()),
    ]
)


def _merge_write(store, name: str, new: pa.Table, key: str, latest_only: str | None = None) -> None:
    """Replace the rows of `new`'s keys in `tables/<name>.parquet`, keeping every other row.

    `latest_only` names a bool column that is cleared on the kept rows when `new` sets it on any:
    a run's `primary` supersedes older runs' (whose experiment ids differ when settings do).
    """
    if store.has_table(name):
        with store.fs.open(store.path(store.table_rel(name)), "rb") as f:
            old = pq.read_table(f)
        if old.schema.equals(new.schema):
            keep = pc.invert(pc.is_in(old.column(key), value_set=new.column(key).unique()))
            old = old.filter(keep)
            if latest_only is not None and pc.any(new.column(latest_only)).as_py():
                column = old.schema.get_field_index(latest_only)
                old = old.set_column(column, old.schema.field(column),
                                     pa.array([False] * len(old), type=pa.bool_()))
            new = pa.concat_tables([old, new])
        else:
            raise StoreError(f"{store.path(store.table_rel(name))}: another schema than this radpath_fs writes; "
                             "rebuild the store (delete it and run the pipeline again)")
    store.write_table(name, new)


def primary_id(ensembles: pd.DataFrame) -> str | None:
    """The primary ensemble's id: the latest primary row. The one rule: the report, the run summary and
    `bundle.choose_ensemble` all take it from here."""
    rows = ensembles[ensembles["primary"]].sort_values("created", ascending=False, kind="stable")
    return None if rows.empty else str(rows["id"].iloc[0])


def _ci(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isnan(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def print_results(table: pd.DataFrame, n_cases: int, outer_folds: int, confidence: float) -> None:
    """The experiments as a rich table on stdout (naive and nested, CIs on the nested numbers)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"Fusion on {n_cases} OOF cases: naive = selected and scored on the same cases; nested = "
        f"selection redone in each of {outer_folds} outer folds ({confidence:.0%} bootstrap CI over cases)",
        title_justify="left",
    )
    t.add_column("experiment")
    t.add_column("method")
    t.add_column("members", justify="right")
    t.add_column("bal. acc. naive", justify="right")
    t.add_column("bal. acc. nested", justify="right")
    t.add_column("kappa nested", justify="right")
    t.add_column("F1 micro nested", justify="right")
    t.add_column("F1 macro nested", justify="right")
    for r in table.itertuples():
        nested = "nested_" if r.fits_on_oof else ""
        cells = [
            _ci(getattr(r, f"{nested}{m}"), getattr(r, f"{nested}{m}_low"), getattr(r, f"{nested}{m}_high"))
            for m in METRICS
        ]
        t.add_row(
            ("* " if r.primary else "") + r.experiment,
            r.method,
            f"{r.n_members}/{r.n_candidates}",
            f"{r.balanced_accuracy:.3f}",
            *cells,
        )
    Console(width=max(160, Console().width)).print(t)


def write_plots(result, out: Path) -> list[Path]:
    """The primary experiment's figures (nested OOF predictions) as PNG files in `out`."""
    from radpath_fs.fusion import plots

    out.mkdir(parents=True, exist_ok=True)
    ev = result.evaluation
    name = result.experiment.name
    label = f"{name} (nested OOF)" if ev.is_nested else f"{name} (OOF)"
    figures = {
        f"{name}-probability-histograms.png": plots.probability_histograms(
            ev.nested_proba, result.oof_labels, title=label
        ),
        f"{name}-ao-scatter.png": plots.ao_scatter(ev.nested_proba, result.oof_labels, title=label),
        f"{name}-confusion.png": plots.confusion_figure(
            [ev.naive.confusion, ev.nested.confusion], [f"{name} naive", f"{name} nested"]
        ),
    }
    return [Path(plots.save_png(fig, out / fname)) for fname, fig in figures.items()]


def fusion_config(base, **overrides):
    """`base` (a FusionConfig) with the command-line overrides that were given, validated."""
    from pydantic import ValidationError

    from radpath_fs.errors import ConfigError

    update = {k: v for k, v in overrides.items() if v is not None}
    try:
        return type(base).model_validate({**base.model_dump(), **update})
    except ValidationError as err:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"fusion options: {problems}") from None


def fuse_store(store_url, cfg, ablations: bool = False, plots: Path | None = None) -> pd.DataFrame:
    """Run the configured fusion (and the ablations), write both tables, print the summary."""
    from radpath_fs.store import Store

    store = Store(store_url)
    # Held from the start: a second writer fails at once, and no predict rewrites the tables
    # this fusion reads while it runs.
    with store.lock("fuse"):
        data = load_fusion_data(store)
        info(
            f"fusion: {len(data.members)} candidate members ({', '.join(data.names)}), "
            f"{len(data.oof.case_ids)} OOF cases, unlabelled splits: {', '.join(data.splits) or 'none'}"
        )
        experiments = plan(data, cfg, ablations)
        with progress_bar("fusion experiments", len(experiments)) as advance:
            results = run_ablations(data, cfg, experiments=experiments, progress=advance)
        table = results_frame(results, cfg)
        ensembles = pa.Table.from_pandas(table, schema=ENSEMBLES_SCHEMA, preserve_index=False)
        fused = pa.Table.from_pandas(
            predictions_frame(results), schema=ENSEMBLE_PREDICTIONS_SCHEMA, preserve_index=False
        )
        _merge_write(store, ENSEMBLES_TABLE, ensembles, "id", latest_only="primary")
        _merge_write(store, ENSEMBLE_PREDICTIONS_TABLE, fused, "ensemble_id")
    primary = next(r for r in results if r.experiment.primary)
    for split, missing in primary.missing.items():
        if missing:
            warn(f"{missing} {split} case(s) lack a prediction from some member: not fused")
    print_results(table, len(data.oof.case_ids), cfg.outer_folds, cfg.confidence)
    info(
        f"wrote {len(table)} experiment(s) to {store.path(store.table_rel(ENSEMBLES_TABLE))} and fused predictions to "
        f"{store.path(store.table_rel(ENSEMBLE_PREDICTIONS_TABLE))}; primary: {primary.id}"
    )
    if plots is not None:
        for path in write_plots(primary, Path(plots)):
            info(f"wrote {path}")
    return table


__all__ = [
    "ENSEMBLES_SCHEMA",
    "ENSEMBLE_PREDICTIONS_SCHEMA",
    "fuse_store",
    "fusion_config",
    "primary_id",
    "print_results",
    "write_plots",
]
