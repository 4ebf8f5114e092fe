"""The store's contract as names: every path, table name and version a store holds.

store/README.md documents each name here (its columns, types and write rules); a test keeps the two
in step. Every module spells a store location through these names, never as a literal, so that a
change of layout is one edit here, one in the README, and a `LAYOUT_VERSION` bump.

Table names are relative to `tables/` and have no suffix (`Store.read_table("cases")`); every
other name is a path relative to the store root. Kept free of heavy imports: fusion reads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from radpath_fs.errors import StoreError

# A store of another layout is refused whole (rebuild it): there is no reading of older layouts.
LAYOUT_VERSION = 2

# ---- the store root ------------------------------------------------------------------------------
STORE_JSON = "store.json"  # {"layout_version", "created"}; a bundle's has "kind": "bundle" instead of "created"
LOCK_NAME = ".radpath.lock"  # the writer lock: pid, host, since, command, token
TMP_PREFIX = ".tmp-"  # a file being written; renamed onto its name when whole
COMPLETE = "complete"  # Zarr attribute a writer sets last: readers and reruns trust only complete data

# ---- tables: tables/<name>.parquet ----------------------------------------------------------------
TABLES = "tables"
CASES_TABLE = "cases"
TILES_TABLE = "tiles"
TILE_ERRORS_TABLE = "tile_errors"
MRI_ERRORS_TABLE = "mri_errors"
PREDICTIONS = "predictions"  # a folder of tables: predictions/<model_id>--<split>
ENSEMBLES_TABLE = "ensembles"
ENSEMBLE_PREDICTIONS_TABLE = "ensemble_predictions"
TABLE_SUFFIX = ".parquet"

# ---- arrays: Zarr v3 groups ----------------------------------------------------------------------
TILES = "tiles.zarr"  # <case>/<mag>/{pixels, coords, tissue_fraction}
EMBEDDINGS = "embeddings.zarr"  # <embedder>/<case>/<mag>
MRI_ZARR = "mri.zarr"  # <case>

# ---- statistics and step markers -----------------------------------------------------------------
STATS = "stats"
MOMENTS_JSON = f"{STATS}/tile_moments.json"
NORMALIZATION_JSON = f"{STATS}/tile_normalization.json"
CALIBRATION_DIR = f"{STATS}/embedders"  # <embedder_id>.safetensors
FUSE_MARKER = f"{STATS}/fuse_inputs.json"
REPORT_MARKER = f"{STATS}/report_inputs.json"

# ---- models (snapshots) and runs (how they were trained) -----------------------------------------
MODELS = "models"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"  # written last: a snapshot without it is incomplete
MODEL_FILES = (MODEL_WEIGHTS, MODEL_CONFIG)
RUNS = "runs"
HISTORY = "history.parquet"
STATE = "state.safetensors"

# ---- the HTML report -----------------------------------------------------------------------------
REPORT_DIR = "report"
REPORT_INDEX = "index.html"
TILE_COUNTS_PNG = f"{REPORT_DIR}/tile_counts.png"

# ---- a bundle folder (`radpath bundle export`): a store of models only, plus these ---------------
BUNDLE_JSON = "bundle.json"
BUNDLE_EMBEDDERS = "embedders"  # <embedder_id>/model.safetensors

# ---- beside the store: the data root of a synthetic cohort ---------------------------------------
SYNTH_MARKER = ".radpath-synth.json"

# Case ids, model ids, run ids and embedder ids become path components: keep them boring.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as one path component (no separators, no '..', no leading dot)."""
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise StoreError(
            f"{what} {name!r} is not safe as a path component "
            "(letters, digits, '.', '_' and '-' only, not starting with '.', no '..')"
        )
    return name


def check_inside(rel: str) -> str:
    """Return `rel` if it stays inside the store: relative, and never climbing with '..'."""
    if rel.startswith("/") or ".." in rel.split("/"):
        raise StoreError(f"{rel!r} is not a location inside the store (absolute, or climbing out with '..')")
    return rel


def table_path(name: str) -> str:
    """`tables/<name>.parquet` of a table name (`cases`, `predictions/m1--oof`)."""
    parts = name.split("/")
    for p in parts:
        check_name(p, "table name")
    return f"{TABLES}/{'/'.join(parts)}{TABLE_SUFFIX}"


def prediction_table_name(model_id: str, split: str) -> str:
    """The table of one (model, split) write: `predictions/<model_id>--<split>`."""
    return f"{PREDICTIONS}/{check_name(model_id, 'model id')}--{check_name(split, 'split')}"


def parse_prediction_table_name(name: str) -> tuple[str, str]:
    """(model_id, split) of a `prediction_table_name`."""
    model_id, sep, split = name.removeprefix(f"{PREDICTIONS}/").rpartition("--")
    if not name.startswith(f"{PREDICTIONS}/") or not sep or not model_id or not split:
        raise StoreError(f"{name!r} is not a prediction table name ({PREDICTIONS}/<model_id>--<split>)")
    return model_id, split


def calibration_path(embedder_id: str) -> str:
    """`stats/embedders/<embedder_id>.safetensors`: a random embedder's calibrated state dict."""
    return f"{CALIBRATION_DIR}/{check_name(embedder_id, 'embedder id')}.safetensors"


def model_dir(model_id: str) -> str:
    """`models/<model_id>`: one snapshot's weights and config."""
    return f"{MODELS}/{check_name(model_id, 'model id')}"


def run_dir(run_id: str) -> str:
    """`runs/<run_id>`: one training run's history and resumable state."""
    return f"{RUNS}/{check_name(run_id, 'run id')}"


def _inside(folder: Callable[[str], str], name: str) -> Callable[[str], str]:
    """A path builder: the file `name` in the folder that `folder(id)` names."""
    return lambda id_: f"{folder(id_)}/{name}"


model_weights_path = _inside(model_dir, MODEL_WEIGHTS)  # models/<model_id>/model.safetensors
model_config_path = _inside(model_dir, MODEL_CONFIG)  # models/<model_id>/config.json, written last
history_path = _inside(run_dir, HISTORY)  # runs/<run_id>/history.parquet
state_path = _inside(run_dir, STATE)  # runs/<run_id>/state.safetensors, the resumable state
