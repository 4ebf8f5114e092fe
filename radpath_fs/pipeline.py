"""`radpath run PIPELINE.yaml`: every step in order, each skipped when its output is complete.

The steps only talk through the store. Completion is decided by each step's own outputs (complete
Zarr groups, checkpoints, prediction files), so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from radpath_fs.config import PipelineConfig
from radpath_fs.progress import console, info

SYNTH_MARKER = ".radpath-synth.json"


def _step(name: str, skip_reason: str | None, fn: Callable[[], object], timings: dict) -> None:
    if skip_reason:
        info(f"[dim]- {name}: skipped ({skip_reason})[/dim]")
        return
    console.rule(f"[bold]{name}")
    t0 = time.perf_counter()
    fn()
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


def wsi_model_ids(cfg: PipelineConfig, folds: list[int]) -> list[tuple[float, int, list[str]]]:
    from radpath_fs.training import wsi_model_id

    return [
        (mag, fold, [wsi_model_id(mag, fold, e) for e in cfg.wsi.snapshot_epochs()])
        for mag in cfg.wsi.magnifications
        for fold in folds
    ]


def mri_model_ids(cfg: PipelineConfig, folds: list[int]) -> list[tuple[int, list[str]]]:
    from radpath_fs.training import mri_model_id

    return [(fold, [mri_model_id(fold, e) for e in cfg.mri.snapshot_epochs()]) for fold in folds]


def run_pipeline(
    cfg: PipelineConfig,
    *,
    store: str | None = None,
    scheduler: str | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Run the whole chain; returns the seconds each step took (skipped steps absent)."""
    from radpath_fs.store import Store

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
    labels = data.labels or (data.root / "labels.csv" if (data.root / "labels.csv").exists() else None)

    def has_cases() -> bool:
        try:
            return Store(store_url).has_table("cases")
        except Exception:
            return False

    def ingest() -> None:
        from radpath_fs.cohort import ingest as run_ingest

        run_ingest(store_url, data.root, labels, cfg.ingest, unlabelled_split=data.unlabelled_split)

    _step("ingest", "cases table exists" if has_cases() else None, ingest, timings)
    st = Store(store_url)
    cases = st.cases()
    folds = cfg.wsi.folds if cfg.wsi.folds is not None else sorted(f for f in cases["fold"].unique() if f >= 0)

    if cases["has_slide"].any():
        from radpath_fs.wsi import tile_store

        _step("tile", None, lambda: tile_store(store_url, cfg.tile, scheduler=scheduler,
                                               skip_errors=cfg.ingest.skip_errors), timings)
        if cfg.wsi.mode == "head":
            from radpath_fs.embed import embed_store

            _step("embed", None, lambda: embed_store(store_url, cfg.embed, device=device, scheduler=scheduler),
                  timings)
        from radpath_fs.mil import train_wsi
        from radpath_fs.training import has_checkpoint

        for mag, fold, ids in wsi_model_ids(cfg, folds):
            done = all(has_checkpoint(st, i) for i in ids)
            _step(
                f"train-wsi mag {mag:g} fold {fold}",
                "snapshots exist" if done else None,
                lambda mag=mag, fold=fold: train_wsi(store_url, cfg, magnification=mag, fold=fold, device=device),
                timings,
            )

    if cases["has_mri"].any():
        from radpath_fs.mri import train_mri
        from radpath_fs.training import has_checkpoint

        mri_folds = cfg.mri.folds if cfg.mri.folds is not None else folds
        for fold, ids in mri_model_ids(cfg, mri_folds):
            done = all(has_checkpoint(st, i) for i in ids)
            _step(
                f"train-mri fold {fold}",
                "snapshots exist" if done else None,
                lambda fold=fold: train_mri(store_url, cfg, fold=fold, device=device, scheduler=scheduler),
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

    _step("fuse", None, lambda: fuse_store(store_url, cfg.fusion, ablations=cfg.fusion.ablations), timings)

    from radpath_fs.report import write_report

    _step("report", None, lambda: write_report(store_url, out=cfg.report.out, config=cfg), timings)
    return timings
