"""`radpath run PIPELINE.yaml`: every step in order, each skipped when its output is complete.

The steps only talk through the store. Completion is decided by each step's own outputs (complete
Zarr groups, checkpoints of the current training settings and case lists, prediction files), so an
interrupted run picks up where it stopped and a changed training setting retrains and predicts again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from radpath_fs.config import PipelineConfig
from radpath_fs.layout import (
    CASES_TABLE,
    ENSEMBLES_TABLE,
    FUSE_MARKER,
    PREDICTIONS,
    REPORT_DIR,
    REPORT_INDEX,
    REPORT_MARKER,
    SYNTH_MARKER,
    TABLE_SUFFIX,
    TABLES,
)
from radpath_fs.progress import console, each_warning_once, info

# Training steps ask the trainers, which compare the snapshots' recorded training fingerprint
# (config and case lists) with the current one: a changed setting retrains, and its predictions follow.
UP_TO_DATE = "snapshots are up to date"


def _step(name: str, skip_reason: str | None, fn: Callable[[], object], timings: dict) -> None:
    """Run a step unless `skip_reason`; a step whose function returns False found nothing to do."""
    if skip_reason:
        info(f"[dim]- {name}: skipped ({skip_reason})[/dim]")
        return
    console.rule(f"[bold]{name}")
    t0 = time.perf_counter()
    if fn() is not False:
        timings[name] = time.perf_counter() - t0


def synth_is_current(root: Path, cfg) -> bool:
    marker = root / SYNTH_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(cfg.model_dump_json())


def run_synth(root: Path, cfg) -> None:
    import shutil

    from radpath_fs.synth import synth_cohort

    if (root / SYNTH_MARKER).is_file():  # a cohort we generated from another config: replace it
        shutil.rmtree(root)
    synth_cohort(root, cfg)
    # The marker goes last: a cohort cut short by a crash is regenerated on the next run.
    (root / SYNTH_MARKER).write_text(cfg.model_dump_json())


def run_pipeline(
    cfg: PipelineConfig,
    *,
    store: str | None = None,
    scheduler: str | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Run the whole chain; returns the seconds each step took (skipped steps absent)."""
    with each_warning_once():
        return _run_steps(cfg, store, scheduler, device)


def _run_steps(cfg: PipelineConfig, store: str | None, scheduler: str | None, device: str | None) -> dict[str, float]:
    from radpath_fs.errors import RadpathError
    from radpath_fs.store import Store
    from radpath_fs.weights import check_weights

    check_weights(cfg.embed)  # unsaid, missing or unpinned weights fail here, before any step
    store_url = store or cfg.store
    scheduler = scheduler or cfg.scheduler
    device = device or cfg.device
    timings: dict[str, float] = {}
    data = cfg.data

    if data.synth is not None:
        _step(
            "synth",
            "cohort already generated" if synth_is_current(data.root, data.synth) else None,
            lambda: run_synth(data.root, data.synth),
            timings,
        )

    def has_cases() -> bool:
        try:
            return Store(store_url).has_table(CASES_TABLE)
        except Exception:
            return False

    def ingest() -> None:
        from radpath_fs.cohort import ingest as run_ingest

        run_ingest(store_url, data.root, data.labels, cfg.ingest, unlabelled_split=data.unlabelled_split)

    _step("ingest", "cases table exists" if has_cases() else None, ingest, timings)
    st = Store(store_url)
    cases = st.cases()
    if not cases["label"].notna().any():
        raise RadpathError(f"{st.path(st.table_rel(CASES_TABLE))}: no labelled case; the pipeline trains and scores on "
                           "labels (data.labels names the CSV; `radpath embed` embeds an unlabelled batch)")
    folds = cfg.wsi.folds if cfg.wsi.folds is not None else sorted(int(f) for f in cases["fold"].unique() if f >= 0)

    if cases["has_slide"].any():
        from radpath_fs.wsi import tile_store

        def tile() -> bool:
            results = tile_store(store_url, cfg.tile, scheduler=scheduler, skip_errors=cfg.ingest.skip_errors)
            return any(r["status"] != "complete" for r in results)

        _step("tile", None, tile, timings)
        if cfg.wsi.mode == "head":
            from radpath_fs.embed import embed_store

            _step("embed", None,
                  lambda: embed_store(store_url, cfg.embed, device=device, scheduler=scheduler)["written"] > 0, timings)
        from radpath_fs.mil import train_wsi, wsi_is_current

        for mag, fold in ((m, f) for m in cfg.wsi.magnifications for f in folds):
            _step(
                f"train-wsi mag {mag:g} fold {fold}",
                UP_TO_DATE if wsi_is_current(st, cfg, mag, fold) else None,
                lambda mag=mag, fold=fold: train_wsi(store_url, cfg, magnification=mag, fold=fold, device=device),
                timings,
            )

    if cases["has_mri"].any():
        from radpath_fs.mri.train import mri_is_current, train_mri

        mri_folds = cfg.mri.folds if cfg.mri.folds is not None else folds
        for fold in mri_folds:
            current = mri_is_current(st, cfg, fold=fold, skip_errors=cfg.ingest.skip_errors)
            _step(
                f"train-mri fold {fold}",
                UP_TO_DATE if current else None,
                lambda fold=fold: train_mri(store_url, cfg, fold=fold, device=device, scheduler=scheduler,
                                            skip_errors=cfg.ingest.skip_errors),
                timings,
            )

    from radpath_fs.predict import pending_predictions, predict_models

    todo = pending_predictions(st)
    _step(
        "predict",
        None if todo else "every model has its prediction tables",
        lambda: predict_models(store_url, cfg, model_ids=todo, splits=None, device=device),
        timings,
    )

    from radpath_fs.fusion.cli import fuse_store

    fuse_inputs = {"predictions": _fingerprint(st, f"{TABLES}/{PREDICTIONS}"), "fusion": cfg.fusion.model_dump(mode="json")}

    def fuse() -> None:
        fuse_store(store_url, cfg.fusion, ablations=cfg.fusion.ablations)
        st.write_json(FUSE_MARKER, fuse_inputs)

    fused = st.exists(FUSE_MARKER) and st.read_json(FUSE_MARKER) == fuse_inputs and st.has_table(ENSEMBLES_TABLE)
    _step("fuse", "ensembles are up to date" if fused else None, fuse, timings)

    from radpath_fs.report import write_report

    report = Path(cfg.report.out) if cfg.report.out else Path(st.local_path(REPORT_DIR))
    report_inputs = {"tables": _fingerprint(st, TABLES), "config": cfg.model_dump(mode="json")}

    def write() -> None:
        write_report(store_url, out=report, config=cfg)
        st.write_json(REPORT_MARKER, report_inputs)

    current = (report / REPORT_INDEX).exists() and st.exists(REPORT_MARKER) and st.read_json(REPORT_MARKER) == report_inputs
    _step("report", "report is up to date" if current else None, write, timings)
    summary(st, report / REPORT_INDEX, timings)
    return timings


def published_table():
    """The paper's own figures, in a table of their own: they are not computed from this store."""
    from rich.table import Table

    from radpath_fs.fusion.reference import published_rows

    rows = published_rows()
    table = Table(title="published reference (real CPM-RadPath data; not computed here)")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*row.values())
    return table


def _fingerprint(store, rel: str) -> dict[str, list]:
    """Name -> (size, mtime) of every table under `rel`: what a downstream step was computed from."""
    folder = store.path(rel)
    if not store.fs.exists(folder):
        return {}
    out = {}
    for path, meta in sorted(store.fs.find(folder, detail=True).items()):
        name = path[len(folder) + 1:]
        if name.endswith(TABLE_SUFFIX) and not name.rsplit("/", 1)[-1].startswith("."):
            out[name] = [int(meta.get("size", 0)), str(meta.get("mtime", meta.get("LastModified", "")))]
    return out


def summary(store, report_path: Path, timings: dict[str, float] | None = None) -> None:
    """The closing table: each candidate's and each ensemble's balanced accuracy, and where things are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="radpath run: results (out-of-fold)", show_lines=False,
                  caption="Ensembles that select or fit on the OOF predictions score optimistically on them; "
                          "their nested cross-validation column is the estimate to quote.")
    nested = ("balanced_accuracy", "kappa", "f1_micro")
    for col in ("model / ensemble", "members", "balanced acc.", "kappa", "F1 micro", "nested bal. acc. [95% CI]",
                "nested kappa", "nested F1 micro"):
        table.add_column(col)
    if store.list_tables(PREDICTIONS):
        from radpath_fs.fusion.io import load_fusion_data
        from radpath_fs.metrics import score

        data = load_fusion_data(store)
        for m, member in enumerate(data.members):
            ok = ~np.isnan(data.oof.P[:, m, 0])
            s = score(data.oof.y[ok], data.oof.P[ok, m].argmax(1), n_boot=0)
            table.add_row(member.name, str(len(member.model_ids)), *(f"{s.values[k]:.3f}" for k in nested))
    if store.has_table(ENSEMBLES_TABLE):
        from radpath_fs.fusion.cli import primary_id

        ens = store.read_table(ENSEMBLES_TABLE)
        primary = primary_id(ens)
        for r in ens.to_dict("records"):
            fits = bool(r["fits_on_oof"])
            ba = r["nested_balanced_accuracy"]
            table.add_row(
                ("[bold]* " if r["id"] == primary else "") + r["experiment"], f"{r['n_members']}/{r['n_candidates']}",
                *(f"{r[k]:.3f}" for k in nested),
                f"{ba:.3f} [{r['nested_balanced_accuracy_low']:.3f}, {r['nested_balanced_accuracy_high']:.3f}]"
                if fits else "(no fit)",
                *(f"{r['nested_' + k]:.3f}" if fits else "(no fit)" for k in nested[1:]),
            )
    # Piped to a log, rich assumes 80 columns and folds every cell of these wide tables.
    out = console if console.is_terminal else Console(stderr=True, width=max(140, console.width))
    out.print(table)
    out.print(published_table())
    if timings:
        info("time:   " + ", ".join(f"{name} {sec:.0f} s" for name, sec in _by_step(timings).items())
             + f"; {sum(timings.values()):.0f} s in all")
    info(f"store:  {store.url}")
    info(f"report: {report_path}")


def _by_step(timings: dict[str, float]) -> dict[str, float]:
    """Seconds per command: the per-fold and per-magnification training steps summed."""
    out: dict[str, float] = {}
    for name, sec in timings.items():
        key = name.split(" ")[0]
        out[key] = out.get(key, 0.0) + sec
    return out
