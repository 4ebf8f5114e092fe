"""The `radpath` command line. Each command parses options and calls one function of its step's
module; the work and the checks live there. Errors that are the user's input print one message
per problem and exit with code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer

from radpath_fs.errors import ConfigError, RadpathError

app = typer.Typer(
    name="radpath",
    help="Brain tumour classification (A/O/G) from whole slide images and MRI, as a feature store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StoreOpt = typer.Option("store", "--store", "-s", help="Store folder or fsspec URL.")
SchedulerOpt = typer.Option("sync", "--scheduler", help="sync, threads, processes, local:N, cuda, tcp://host:port")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto")
ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline YAML; defaults to the paper's recipe.")


def _command(typed: str, group: typer.Typer = app):
    """Register the command typed `radpath <typed>` on `group`; see `user_errors`."""

    def register(fn):
        return group.command(typed.split()[-1])(user_errors(typed, fn))

    return register


class _BadOptions(Exception):
    """The config built from a command's own options failed validation (args[0]: pydantic's error)."""


def with_options(cfg, **options):
    """`cfg` (a config section) with the options that were given (not None), validated like YAML.
    Only what `cfg` was given is carried over: a default that follows another field (an embedder
    preset's input size, crop and normalisation) follows that field's new value."""
    from pydantic import ValidationError

    update = {k: v for k, v in options.items() if v is not None}
    try:
        return cfg.model_validate({**cfg.model_dump(exclude_unset=True), **update})
    except ValidationError as e:
        raise _BadOptions(e) from None


def user_errors(command: str, fn):
    """User errors print one `error:` line per problem and exit with code 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except _BadOptions as e:
                raise _config_error(f"radpath {command} options", e.args[0]) from None
            except ValueError as e:
                from pydantic import ValidationError

                if not isinstance(e, ValidationError):
                    raise
                # A config read back from a store or a bundle (a snapshot's config.json, bundle.json)
                # whose reader did not name the file: not the command's options, whatever it is.
                raise _config_error("invalid configuration", e) from None
        except RadpathError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _config_error(source: str, err) -> ConfigError:
    from radpath_fs.config import format_errors

    return ConfigError(format_errors(source, err))


def _unused_scheduler(why: str):
    """`--scheduler` of a command that runs in this process: taken (and checked) like every
    computing command's, so one command line works for all of them."""
    return typer.Option("sync", "--scheduler", help=f"accepted and checked, but no effect: {why}")


def _config(path: Path | None):
    from radpath_fs.config import PipelineConfig, load_config

    return load_config(path) if path else PipelineConfig()


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RadpathError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str | None, n: int, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise RadpathError(f"{option} {text!r}: expected {n} positive integers joined by 'x'")
    return tuple(int(p) for p in parts)


@_command("synth")
def synth(
    out: Path = typer.Argument(..., help="Folder to write the CPM-RadPath layout into."),
    cases: int = typer.Option(24, "--cases", min=1),
    seed: int = typer.Option(0, "--seed"),
    wsi_size: str | None = typer.Option(None, "--wsi-size", help="WxH in pixels at --wsi-mpp"),
    wsi_mpp: float = typer.Option(0.5, "--wsi-mpp"),
    mri_size: str | None = typer.Option(None, "--mri-size", help="XxYxZ voxels"),
    label_noise: float = typer.Option(0.0, "--label-noise", min=0.0, max=1.0),
    unlabelled: int = typer.Option(0, "--unlabelled", help="extra cases without a label"),
):
    """Write a synthetic cohort in the CPM-RadPath layout (slides, MRI, labels CSV)."""
    from radpath_fs.config import SynthConfig
    from radpath_fs.synth import synth_cohort

    cfg = with_options(SynthConfig(), cases=cases, seed=seed, wsi_mpp=wsi_mpp, label_noise=label_noise,
                        unlabelled=unlabelled, wsi_size=_size(wsi_size, 2, "--wsi-size"),
                        mri_size=_size(mri_size, 3, "--mri-size"))
    synth_cohort(out, cfg)


@_command("ingest")
def ingest(
    data: Path = typer.Argument(..., help="CPM-RadPath folder (Pathology/, Radiology/)."),
    labels: Path | None = typer.Option(None, "--labels", help="CSV: CPM_RadPath_2019_ID,class,age_in_days"),
    store: str = StoreOpt,
    folds: int = typer.Option(5, "--folds", min=2),
    seed: int = typer.Option(0, "--seed"),
    default_mpp: float | None = typer.Option(None, "--default-mpp", help="µm/px for slides without it"),
    skip_errors: bool = typer.Option(False, "--skip-errors", help="record bad cases as excluded"),
    unlabelled_split: str = typer.Option("val", "--unlabelled-split", help="split of cases without label"),
):
    """Scan a cohort folder, validate it, and write tables/cases.parquet."""
    from radpath_fs.cohort import ingest as run_ingest
    from radpath_fs.config import IngestConfig

    cfg = with_options(IngestConfig(), folds=folds, seed=seed, default_mpp=default_mpp, skip_errors=skip_errors)
    run_ingest(store, data, labels, cfg, unlabelled_split=unlabelled_split)


@_command("tile")
def tile(
    store: str = StoreOpt,
    config: Path | None = ConfigOpt,
    mags: str | None = typer.Option(None, "--mags", help="e.g. 40,20,10,5,2.5"),
    codec: str | None = typer.Option(None, "--codec", help="zstd (lossless) or jpeg"),
    scheduler: str = SchedulerOpt,
    device: str = typer.Option("auto", "--device", help="accepted, but tiling runs on the CPU (libvips) "
                               "whatever it says: only cpu and auto are meaningful"),
    skip_errors: bool = typer.Option(False, "--skip-errors"),
):
    """Tile every slide at each magnification, drop background, write tiles.zarr + tiles.parquet."""
    from radpath_fs.progress import warn
    from radpath_fs.wsi import tile_store

    if device not in ("auto", "cpu"):
        warn(f"--device {device}: tiling runs on the CPU; the option has no effect")
    cfg = with_options(_config(config).tile, magnifications=_floats(mags), codec=codec)
    tile_store(store, cfg, scheduler=scheduler, skip_errors=skip_errors)


@_command("embed")
def embed(
    store: str = StoreOpt,
    config: Path | None = ConfigOpt,
    embedder: str | None = typer.Option(None, "--embedder", help="a preset (`radpath embedders`) or any timm model name"),
    weights: str | None = typer.Option(None, "--weights", help=".safetensors or .pth state dict (tensors only: "
                                       "weights_only loading), or `random`"),
    normalization: str | None = typer.Option(None, "--normalization", help="preset (the encoder's own mean/std), dataset "
                                             "(the training tiles'; every case's when none is labelled) or "
                                             "imagenet; unset: the preset's choice"),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1),
    device: str = DeviceOpt,
    scheduler: str = SchedulerOpt,
):
    """Embed every stored tile with a timm model; write embeddings.zarr/<embedder>/<case>/<mag>."""
    from radpath_fs.embed import embed_store

    base = _config(config).embed
    if weights is not None:  # another file than the config's: its tag and pin are not this one's
        base = base.model_copy(update={"weights_tag": None})
    cfg = with_options(base, name=embedder, weights=weights, normalization=normalization, batch_size=batch_size)
    embed_store(store, cfg, device=device, scheduler=scheduler)


@_command("train-wsi")
def train_wsi(
    store: str = StoreOpt,
    config: Path | None = ConfigOpt,
    mag: float = typer.Option(..., "--mag"),
    fold: int = typer.Option(..., "--fold", help="held-out fold; -1 trains on every labelled case"),
    mode: str | None = typer.Option(None, "--mode", help="finetune or head"),
    weights: Path | None = typer.Option(None, "--weights", help="embedder start weights (finetune)"),
    device: str = DeviceOpt,
    scheduler: str = _unused_scheduler("training runs in this process, on --device"),
    resume: bool = typer.Option(True, "--resume/--no-resume"),
):
    """Train the pooled-head MIL classifier for one magnification and fold."""
    from radpath_fs.mil import train_wsi as run_train
    from radpath_fs.scheduler import check_scheduler

    check_scheduler(scheduler)
    cfg = _config(config)
    run_train(store, cfg, magnification=mag, fold=fold, mode=mode, weights=weights, device=device, resume=resume)


@_command("train-mri")
def train_mri(
    store: str = StoreOpt,
    config: Path | None = ConfigOpt,
    fold: int = typer.Option(..., "--fold", help="held-out fold; -1 trains on every labelled case"),
    device: str = DeviceOpt,
    scheduler: str = SchedulerOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume"),
    skip_errors: bool = typer.Option(False, "--skip-errors",
                                     help="list unreadable MRI cases in tables/mri_errors.parquet; train without them"),
):
    """Preprocess the MRI (cached in mri.zarr) and train the 3D DenseNet for one fold."""
    from radpath_fs.mri import train_mri as run_train

    run_train(store, _config(config), fold=fold, device=device, scheduler=scheduler, resume=resume,
              skip_errors=skip_errors)


@_command("predict")
def predict(
    store: str = StoreOpt,
    config: Path | None = ConfigOpt,
    model: list[str] = typer.Option(..., "--model", help="model id(s), e.g. wsi-mag20-fold0-e49"),
    split: list[str] | None = typer.Option(None, "--split", help="oof, val, test, train (default: oof + unlabelled)"),
    device: str = DeviceOpt,
    scheduler: str = _unused_scheduler("prediction, and the preprocessing of MRI not cached yet, run in "
                                       "this process (`radpath train-mri --scheduler` preprocesses in parallel)"),
):
    """Write the prediction table of each model (paper's inference protocol for slides)."""
    from radpath_fs.predict import predict_models
    from radpath_fs.scheduler import check_scheduler

    check_scheduler(scheduler)
    predict_models(store, _config(config), model_ids=model, splits=split, device=device)


@_command("fuse")
def fuse(
    store: str = StoreOpt,
    config: Path | None = ConfigOpt,
    method: str | None = typer.Option(None, "--method", help="soft_vote, hard_vote, prune, greedy, exhaustive, stack_lr, stack_xgb"),
    prune: int | None = typer.Option(None, "--prune", help="drop the K worst members"),
    ablations: bool = typer.Option(False, "--ablations", help="also run the ablation table"),
    metric: str | None = typer.Option(None, "--metric", help="selection metric: balanced_accuracy, kappa, f1_micro, f1_macro"),
    plots: Path | None = typer.Option(None, "--plots", help="folder for the primary ensemble's PNG figures"),
):
    """Fuse the prediction tables offline (no GPU, no torch); write tables/ensembles.parquet."""
    from radpath_fs.fusion.cli import fuse_store, fusion_config

    cfg = fusion_config(_config(config).fusion, method=method, prune=prune, metric=metric)
    fuse_store(store, cfg, ablations=ablations, plots=plots)


@_command("query")
def query(
    sql: str = typer.Argument(..., help="SQL over the views cases, tiles, predictions, ensembles"),
    store: str = StoreOpt,
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet"),
    out: Path | None = typer.Option(None, "--out", help="file for --format parquet"),
):
    """Run read-only SQL (DuckDB) over the store's tables."""
    from radpath_fs.query import run_query

    run_query(store, sql, fmt=fmt, out=out)


@_command("report")
def report(
    store: str = StoreOpt,
    out: Path | None = typer.Option(None, "--out", help="output folder (default <store>/report)"),
    config: Path | None = ConfigOpt,
):
    """Write a self-contained HTML report of the store."""
    from radpath_fs.report import write_report

    write_report(store, out=out, config=_config(config))


@_command("run")
def run(
    pipeline: Path = typer.Argument(..., help="pipelines/demo.yaml, pipelines/cpm2020.yaml, ..."),
    store: str | None = typer.Option(None, "--store", "-s", help="overrides the pipeline's store"),
    scheduler: str | None = typer.Option(None, "--scheduler"),
    device: str | None = typer.Option(None, "--device"),
):
    """Run every step of a pipeline in order; complete steps are skipped."""
    from radpath_fs.config import load_config
    from radpath_fs.pipeline import run_pipeline

    run_pipeline(load_config(pipeline), store=store, scheduler=scheduler, device=device)


@_command("embedders")
def embedders():
    """The embedder presets: width, input, µm/px, normalisation, read-out, weights and licence."""
    from radpath_fs.presets import preset_table

    print(preset_table())


weights_app = typer.Typer(help="Embedder weights: fetched once through timm's hub, pinned by SHA-256, checked offline.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@_command("weights fetch", weights_app)
def weights_fetch(
    tag: str = typer.Argument(..., help="NAME[.TAG], a timm model with pretrained weights, e.g. "
                              "efficientnet_b0.ra_in1k, or a preset whose weights are on the hub, e.g. uni"),
    out: Path = typer.Option(..., "--out", help="folder for <name>.safetensors and its pin <name>.json"),
):
    """Download weights through timm (online machine); write them and their pin (SHA-256, source, licence).
    Gated models need access granted on their hub page and HF_TOKEN set."""
    from radpath_fs.progress import info
    from radpath_fs.weights import fetch, pin_path

    path = fetch(tag, out)
    info(f"{path} (pinned by {pin_path(path)})")


@_command("weights check", weights_app)
def weights_check(
    file: Path = typer.Argument(..., help=".safetensors or .pth state dict"),
    embedder: str = typer.Option(..., "--embedder", help="timm model name the file is for"),
):
    """Offline: the file's keys, shapes, output width and SHA-256 as JSON; exit 2 naming keys that do not fit."""
    import json

    from radpath_fs.embedders import check_file

    print(json.dumps(check_file(file, embedder), indent=2))


bundle_app = typer.Typer(help="Off-the-shelf bundles: one ensemble packed for `radpath predict-case`.",
                         no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@_command("bundle export", bundle_app)
def bundle_export(
    store: str = StoreOpt,
    ensemble: str | None = typer.Option(None, "--ensemble", help="ensemble id or experiment (default: the primary)"),
    out: Path = typer.Option(..., "--out", help="bundle folder to write"),
    config: Path | None = typer.Option(None, "--config", "-c", help="the pipeline YAML `radpath predict` ran with; "
                                       "default: the settings the prediction tables record (it must agree with them)"),
):
    """Pack an ensemble (weights, transforms, normalisation, fusion weights) into one folder."""
    from radpath_fs.bundle.export import export_bundle

    export_bundle(store, ensemble, out, config=_config(config) if config else None)


@_command("predict-case")
def predict_case(
    case_dir: Path = typer.Argument(..., help="one case: <ID>.tiff|.tif|.svs and/or <ID>_{t1,t1ce,t2,flair}.nii.gz"),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="folder made by `radpath bundle export`"),
    device: str = DeviceOpt,
    mpp: float | None = typer.Option(None, "--mpp", help="µm/px of a slide that records none"),
):
    """Classify one case folder end to end with a bundle; print the class and probabilities as JSON."""
    import json

    from radpath_fs.bundle.predict_case import predict_case as run_case

    print(json.dumps(run_case(bundle, case_dir, device=device, mpp=mpp), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
