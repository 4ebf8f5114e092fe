"""The store contract: radpath_fs.layout (the names code uses) and store/README.md (the document) agree."""

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from radpath_fs import layout
from radpath_fs.errors import StoreError
from radpath_fs.fusion.cli import ENSEMBLE_PREDICTIONS_SCHEMA, ENSEMBLES_SCHEMA
from radpath_fs.predictions import SCHEMA
from radpath_fs.wsi import tiles_table

README = Path(__file__).resolve().parents[1] / "store" / "README.md"


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _documented_tokens(text: str) -> set[str]:
    """What a name may appear as in the README's `code` spans: a whole span, a leading run of its
    path components, one component, a component's suffix (`.parquet`) or a glob's stem (`.tmp-`)."""
    tokens = set()
    for span in _spans(text):
        parts = span.split("/")
        tokens.add(span)
        tokens.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for part in parts:
            tokens.update({part, part.rstrip("*")})
            if "." in part[1:]:
                tokens.add(part[part.index(".", 1):])
    return tokens


def _constants() -> dict[str, str]:
    out = {}
    for name, value in vars(layout).items():
        if not name.isupper() or name.startswith("_"):
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str):
                out[f"{name}={v!r}"] = v
    return out


def test_every_name_of_the_layout_is_in_the_store_readme():
    text = README.read_text()
    tokens = _documented_tokens(text)
    missing = [name for name, value in _constants().items() if value not in tokens]
    assert not missing, f"store/README.md does not document: {', '.join(missing)}"
    assert f"Layout version: **{layout.LAYOUT_VERSION}**" in text
    assert f'"layout_version": {layout.LAYOUT_VERSION}' in text


@pytest.mark.parametrize(
    "build, template",
    [
        (lambda: layout.table_path("x1"), "tables/<name>.parquet"),
        (lambda: layout.table_path(layout.prediction_table_name("x1", "x2")),
         "tables/predictions/<model_id>--<split>.parquet"),
        (lambda: layout.model_weights_path("x1"), "models/<model_id>/model.safetensors"),
        (lambda: layout.model_config_path("x1"), "models/<model_id>/config.json"),
        (lambda: layout.history_path("x1"), "runs/<run_id>/history.parquet"),
        (lambda: layout.state_path("x1"), "runs/<run_id>/state.safetensors"),
        (lambda: layout.calibration_path("x1"), "stats/embedders/<embedder_id>.safetensors"),
    ],
)
def test_every_path_the_layout_builds_is_in_the_store_readme(build, template):
    placeholders = re.findall(r"<\w+>", template)
    built = build()
    for i, p in enumerate(placeholders, start=1):
        built = built.replace(f"x{i}", p)
    assert built == template
    assert template in _spans(README.read_text())


def _readme_columns(path: str) -> list[tuple[str, str]]:
    """(column, type) rows of the first table after the heading that names `path`."""
    lines = README.read_text().splitlines()
    start = lines.index(f"### `{path}`")
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| column |"):
            in_table = True
        elif in_table and line.startswith("|---"):
            continue
        elif in_table and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((cells[0].strip("`"), cells[1]))
        elif in_table:
            break
    assert rows, f"store/README.md: no column table under {path}"
    return rows


def _columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


@pytest.mark.parametrize(
    "path, schema",
    [
        ("tables/predictions/<model_id>--<split>.parquet", lambda: SCHEMA),
        (layout.table_path(layout.ENSEMBLES_TABLE), lambda: ENSEMBLES_SCHEMA),
        (layout.table_path(layout.ENSEMBLE_PREDICTIONS_TABLE), lambda: ENSEMBLE_PREDICTIONS_SCHEMA),
        (layout.table_path(layout.TILES_TABLE),
         lambda: pa.Table.from_pandas(tiles_table(None, []), preserve_index=False).schema),
    ],
)
def test_the_readme_lists_each_table_with_the_columns_and_types_code_writes(path, schema):
    assert _readme_columns(path) == _columns(schema())


def test_prediction_table_names_are_built_and_parsed_by_the_layout():
    name = layout.prediction_table_name("wsi-mag20-fold0-e29", "oof")
    assert name == "predictions/wsi-mag20-fold0-e29--oof"
    assert layout.parse_prediction_table_name(name) == ("wsi-mag20-fold0-e29", "oof")
    assert layout.parse_prediction_table_name("predictions/a--b--val") == ("a--b", "val")
    for bad in ("wsi-mag20-fold0-e29--oof", "predictions/m1", "predictions/--oof", "predictions/m1--"):
        with pytest.raises(StoreError, match="not a prediction table name"):
            layout.parse_prediction_table_name(bad)
    with pytest.raises(StoreError, match="model id '../x' is not safe"):
        layout.prediction_table_name("../x", "oof")
    with pytest.raises(StoreError, match="run id 'a/b' is not safe"):
        layout.history_path("a/b")


def test_runs_and_models_are_apart():
    assert layout.history_path("wsi-mag20-fold0").startswith(f"{layout.RUNS}/")
    assert layout.state_path("wsi-mag20-fold0").startswith(layout.run_dir("wsi-mag20-fold0") + "/")
    assert layout.model_config_path("wsi-mag20-fold0-e29").startswith(f"{layout.MODELS}/")


def test_the_layout_imports_nothing_heavy():
    code = ("import sys, radpath_fs.layout; "
            "print(sorted(m for m in ('torch', 'pandas', 'pyarrow', 'fsspec', 'zarr', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
