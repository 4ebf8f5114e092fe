"""The bad-input matrix: every kind of bad input, through the real `radpath` command line, gives
one clear message naming the file (or config key), exit code 2, and a store left exactly as it
was (every file hashed before and after; no lock left behind). With --skip-errors the batch
commands finish and list their failures in a table.

The per-step tests check each problem in depth at the function level; this file proves the
whole set end to end, from one small ingested and tiled store that every case starts from.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import typer
from chain_data import run_chain
from cli_checks import exits_2_with, invoke
from fusion_data import simulate_tables
from test_ingest import make_cohort, snapshot, write_slide, write_volume
from test_mri import _affine, _nan
from test_tile import blank_slide

from radpath_fs.cli import app, user_errors, with_options
from radpath_fs.cohort import ingest
from radpath_fs.config import IngestConfig, PredictConfig, TileConfig, load_config
from radpath_fs.layout import LOCK_NAME, MRI_ZARR, TILES, model_config_path, prediction_table_name
from radpath_fs.predictions import write_predictions
from radpath_fs.store import Store

TILE_YAML = "tile:\n  tile_size: 128\n  magnifications: [20, 10]\n"
# Small enough that a check that wrongly lets a case through trains in seconds, not hours.
MRI_YAML = (
    "mri:\n  epochs: 1\n  snapshots: [-1]\n  spatial_size: [32, 32, 32]\n  init_features: 4\n"
    "  growth_rate: 4\n  block_config: [1, 1, 1, 1]\n  batch_size: 2\n"
)
GOOD = "CPM19_CBICA_001_1"  # a labelled case of make_cohort with a slide and all four modalities


@dataclass
class Ctx:
    """One case's copy of the cohort and the store, and where to put extra files."""

    data: Path
    labels: Path
    store: Path
    tmp: Path

    def volume(self, modality: str, case: str = GOOD) -> Path:
        return self.data / "Radiology" / case / f"{case}_{modality}.nii.gz"

    def slide(self, case: str = GOOD) -> Path:
        return self.data / "Pathology" / f"{case}.tiff"

    def write(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def reingest(self, **kw) -> None:
        """A good ingest of the changed cohort (the bad part shows up at a later step)."""
        ingest(str(self.store), self.data, self.labels, IngestConfig(folds=2, **kw))

    # the commands
    def ingest_cmd(self, labels: Path | None = None, store: Path | None = None) -> list[str]:
        return ["ingest", str(self.data), "--labels", str(labels or self.labels), "--store", str(store or self.store),
                "--folds", "2"]

    def tile_cmd(self, *extra: str) -> list[str]:
        return ["tile", "--store", str(self.store), "--config", str(self.write("tile.yaml", TILE_YAML)), *extra]

    def mri_cmd(self, *extra: str) -> list[str]:
        return ["train-mri", "--store", str(self.store), "--config", str(self.write("mri.yaml", MRI_YAML)),
                "--fold", "0", "--device", "cpu", *extra]

    def fuse_cmd(self, mutate: Callable[[pa.Table], pa.Table]) -> list[str]:
        """Prediction tables of two members over the cohort, the first one broken by `mutate`."""
        st = Store(self.store)
        members = [("wsi", 20, 49, 1.0), ("mri", None, 199, 1.0)]
        tables, _ = simulate_tables(n_cases=12, n_val=0, folds=2, members=members, seed=0)
        write_predictions(st, mutate(tables[0]))
        for t in tables[1:]:
            write_predictions(st, t)
        return ["fuse", "--store", str(self.store), "--method", "soft_vote"]


def _then(_change, command: list[str]) -> list[str]:
    """`_then(change the input, command)`: the change is made as the argument is evaluated."""
    return command


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


def _labels(ctx: Ctx, text: str) -> Path:
    return ctx.write("labels.csv", text)


def _slide_without_resolution(ctx: Ctx) -> list[str]:
    write_slide(ctx.data, GOOD, mpp=None)
    return ctx.ingest_cmd()


def _four_d(ctx: Ctx) -> list[str]:
    write_volume(ctx.volume("t2"), data=np.ones((12, 12, 10, 2), np.float32))
    return ctx.ingest_cmd()


def _blank_slide(ctx: Ctx) -> list[str]:
    blank_slide(ctx.slide("CPM19_CBICA_BLK_1"), size=(600, 500))
    ctx.reingest(default_mpp=0.5)
    return ctx.tile_cmd()


def _tiny_slide(ctx: Ctx) -> list[str]:
    write_slide(ctx.data, "CPM19_CBICA_TNY_1", size=(100, 90))
    ctx.reingest()
    return ctx.tile_cmd()


def _store_is_a_file(ctx: Ctx) -> list[str]:
    f = ctx.write("not-a-store.txt", "hello\n")
    return ctx.ingest_cmd(store=f)


def _prob_not_one(t: pa.Table) -> pa.Table:
    return _set(t, "prob_G", np.asarray(t.column("prob_G")) * 0.5)  # still in [0, 1]


def _duplicate_rows(t: pa.Table) -> pa.Table:
    return pa.concat_tables([t, t.slice(0, 1)])


def _other_classes(t: pa.Table) -> pa.Table:
    return t.rename_columns([n.replace("_G", "_X") for n in t.column_names])


# name -> (set-up returning the command line, words the one error message must contain)
CASES: dict[str, tuple[Callable[[Ctx], list[str]], list[str]]] = {
    # ---- slides -------------------------------------------------------------------------------
    "slide truncated": (lambda c: _then(_truncate(c.slide()), c.ingest_cmd()),
                        [f"{GOOD}.tiff", "unreadable or corrupt slide"]),
    "slide corrupt TIFF": (lambda c: _then(c.slide().write_bytes(b"II*\x00" + b"\x13" * 4000), c.ingest_cmd()),
                           [f"{GOOD}.tiff", "unreadable or corrupt slide"]),
    "slide is a text file": (lambda c: _then(c.slide().write_text("not an image\n" * 50), c.ingest_cmd()),
                             [f"{GOOD}.tiff", "unreadable or corrupt slide"]),
    "slide 0 bytes": (lambda c: _then(c.slide().write_bytes(b""), c.ingest_cmd()),
                      [f"{GOOD}.tiff", "empty (0 bytes)"]),
    "slide without resolution, no --default-mpp": (_slide_without_resolution,
                                                   [f"{GOOD}.tiff", "µm/px unknown", "--default-mpp"]),
    "slide all background": (_blank_slide, ["CPM19_CBICA_BLK_1.tiff", "no tissue", "background"]),
    "slide smaller than a tile": (_tiny_slide, ["CPM19_CBICA_TNY_1.tiff", "smaller than one 128 px tile"]),
    "slide deleted after ingest": (lambda c: _then(c.slide().unlink(), c.tile_cmd()),
                                   [f"{GOOD}.tiff", "does not exist"]),
    "slide overwritten after ingest": (lambda c: _then(c.slide().write_text("x" * 999), c.tile_cmd()),
                                       [f"{GOOD}.tiff", "unreadable slide"]),
    # ---- volumes ------------------------------------------------------------------------------
    "volume truncated .nii.gz": (lambda c: _then(_truncate(c.volume("t1")), c.ingest_cmd()),
                                 [f"{GOOD}_t1.nii.gz", "unreadable NIfTI"]),
    "volume not gzip": (lambda c: _then(c.volume("flair").write_bytes(b"\x1f\x8b garbage" * 40), c.ingest_cmd()),
                        [f"{GOOD}_flair.nii.gz", "unreadable NIfTI"]),
    "volume 4D": (_four_d, [f"{GOOD}_t2.nii.gz", "expected a 3D volume", "(12, 12, 10, 2)"]),
    "volume shapes differ": (lambda c: _then(write_volume(c.volume("t1ce"), (12, 12, 9)), c.ingest_cmd()),
                             [f"{GOOD}_t1ce.nii.gz", "(12, 12, 9) differs from t1's (12, 12, 10)"]),
    "volume modality missing": (lambda c: _then(c.volume("t2").unlink(), c.ingest_cmd()),
                                [f"{GOOD}_t2.nii.gz", "missing MRI modality"]),
    "volume NaN voxels": (lambda c: _then(_nan(str(c.volume("t1ce"))), c.mri_cmd()),
                          [f"{GOOD}_t1ce.nii.gz", "NaN or infinite"]),
    "volume affines differ": (lambda c: _then(_affine(str(c.volume("flair"))), c.mri_cmd()),
                              [f"{GOOD}_flair.nii.gz", "affine differs from t1's", "co-registered"]),
    # ---- labels CSV ---------------------------------------------------------------------------
    "labels missing column": (lambda c: c.ingest_cmd(_labels(c, f"ID,class,age_in_days\n{GOOD},A,5\n")),
                              ["labels.csv", "missing column 'CPM_RadPath_2019_ID'"]),
    "labels unknown class": (lambda c: c.ingest_cmd(_labels(c, f"CPM_RadPath_2019_ID,class\n{GOOD},X\n")),
                             ["labels.csv", "class 'X'", "(line 2)"]),
    "labels duplicate id": (lambda c: c.ingest_cmd(_labels(c, f"CPM_RadPath_2019_ID,class\n{GOOD},A\n{GOOD},G\n")),
                            ["labels.csv", f"duplicate id(s) ['{GOOD}']"]),
    "labels bad age": (lambda c: c.ingest_cmd(_labels(c, f"CPM_RadPath_2019_ID,class,age_in_days\n{GOOD},A,old\n")),
                       ["labels.csv", "age_in_days", "'old'", "(line 2)"]),
    "labels negative age": (lambda c: c.ingest_cmd(_labels(c, f"CPM_RadPath_2019_ID,class,age_in_days\n{GOOD},A,-3\n")),
                            ["labels.csv", "age_in_days", "-3", "(line 2)"]),
    "labels empty file": (lambda c: c.ingest_cmd(_labels(c, "")), ["labels.csv", "empty"]),
    # ---- configs ------------------------------------------------------------------------------
    "config unknown key": (lambda c: ["tile", "--store", str(c.store), "--config",
                                      str(c.write("cfg.yaml", "tile:\n  tile_sise: 256\n"))],
                           ["cfg.yaml: tile.tile_sise: unknown key"]),
    "config wrong type": (lambda c: ["tile", "--store", str(c.store), "--config",
                                     str(c.write("cfg.yaml", "tile:\n  tile_size: big\n"))],
                          ["cfg.yaml: tile.tile_size:", "integer"]),
    "config bad value": (lambda c: ["tile", "--store", str(c.store), "--config",
                                    str(c.write("cfg.yaml", "tile:\n  background_fraction: 2\n"))],
                         ["cfg.yaml: tile.background_fraction:", "less than or equal to 1"]),
    "config YAML syntax": (lambda c: ["run", str(c.write("cfg.yaml", "tile: [1, 2\nwsi: {\n"))],
                           ["cfg.yaml: not valid YAML"]),
    # ---- option values (checked like config keys) ----------------------------------------------
    "option --codec png": (lambda c: c.tile_cmd("--codec", "png"), ["radpath tile options: codec:", "'zstd' or 'jpeg'"]),
    "option --mags 0": (lambda c: c.tile_cmd("--mags", "0"),
                        ["radpath tile options: magnifications:", "positive numbers"]),
    "option --default-mpp -1": (lambda c: [*c.ingest_cmd(), "--default-mpp", "-1"],
                                ["radpath ingest options: default_mpp:", "greater than 0"]),
    # ---- prediction tables --------------------------------------------------------------------
    "predictions missing column": (lambda c: c.fuse_cmd(lambda t: t.drop_columns(["logit_O"])),
                                   ["wsi-mag20-fold0-e49--oof.parquet", "missing column(s) logit_O"]),
    "predictions other class columns": (lambda c: c.fuse_cmd(_other_classes),
                                        ["wsi-mag20-fold0-e49--oof.parquet", "missing column(s) logit_G, prob_G"]),
    "predictions not summing to 1": (lambda c: c.fuse_cmd(_prob_not_one),
                                     ["wsi-mag20-fold0-e49--oof.parquet", "do not sum to 1"]),
    "predictions duplicate rows": (lambda c: c.fuse_cmd(_duplicate_rows),
                                   ["wsi-mag20-fold0-e49--oof.parquet", "duplicate rows for (model wsi-mag20-fold0-e49"]),
    # ---- store paths --------------------------------------------------------------------------
    "store does not exist": (lambda c: ["tile", "--store", str(c.tmp / "nowhere")],
                             ["nowhere: not a radpath store"]),
    "store is a file": (_store_is_a_file, ["not-a-store.txt", "not a folder"]),
    "case id with ../": (lambda c: c.ingest_cmd(_labels(c, "CPM_RadPath_2019_ID,class\n../../evil,A\n")),
                         ["labels.csv", "case id '../../evil' is not safe"]),
    "model id with ../": (lambda c: ["predict", "--store", str(c.store), "--model", "../../etc"],
                          ["model id '../../etc' is not safe"]),
    "model id absolute": (lambda c: ["predict", "--store", str(c.store), "--model", "/etc/passwd"],
                          ["model id '/etc/passwd' is not safe"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A cohort (make_cohort: 8 cases, slides and MRI) ingested into a store and tiled."""
    root = tmp_path_factory.mktemp("base")
    make_cohort(root / "data")
    (root / "tile.yaml").write_text(TILE_YAML)
    run_chain(str(root / "store"), root / "data", load_config(root / "tile.yaml"), through="tile", folds=2)
    return root / "data", root / "store"


def _copy(base: tuple[Path, Path], tmp_path: Path) -> Ctx:
    data, store = base
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(store, tmp_path / "store")
    (tmp_path / "work").mkdir()
    ctx = Ctx(tmp_path / "data", tmp_path / "data" / "labels.csv", tmp_path / "store", tmp_path / "work")
    ctx.reingest()  # the cases table names the files of this copy; the tiles stay complete
    return ctx


def _flat(text: str) -> str:
    """Warnings go through rich, which wraps them at 80 columns when not on a terminal."""
    return text.replace("\n", "")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_message_exit_2_and_an_unchanged_store(base, tmp_path, name):
    ctx = _copy(base, tmp_path)
    setup, words = CASES[name]
    argv = setup(ctx)
    before = snapshot(ctx.store)
    exits_2_with(invoke(argv), *words)
    assert snapshot(ctx.store) == before
    assert not (ctx.store / LOCK_NAME).exists()
    assert not (ctx.tmp / "nowhere").exists()


def test_cases_cover_every_kind_of_input():
    kinds = {name.split()[0] for name in CASES}
    assert kinds == {"slide", "volume", "labels", "config", "option", "predictions", "store", "case", "model"}
    assert len(CASES) >= 25


def test_only_a_commands_own_options_are_blamed_on_its_options(capsys):
    def stored_config():  # say, the predict section of a bundle.json
        PredictConfig.model_validate({"chunk": 1})

    def bad_option():
        with_options(TileConfig(), codec="png")

    for fn, message in ((stored_config, "error: invalid configuration: chunk: unknown key"),
                        (bad_option, "error: radpath bundle export options: codec:")):
        with pytest.raises(typer.Exit):
            user_errors("bundle export", fn)()
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("error:") == 1, err


# The command line (README.md): every command takes --store; those that compute also take --scheduler
# and --device. Each row: the command with its other required arguments ({tmp}: a scratch folder),
# whether it computes, and the error it reaches once its options are parsed (nothing is there).
CONTRACT = {
    "ingest": (["ingest", "{tmp}/data"], False, "data folder does not exist"),
    "tile": (["tile"], True, "not a radpath store"),
    "embed": (["embed"], True, "not a radpath store"),
    "train-wsi": (["train-wsi", "--mag", "20", "--fold", "0"], True, "not a radpath store"),
    "train-mri": (["train-mri", "--fold", "0"], True, "not a radpath store"),
    "predict": (["predict", "--model", "wsi-mag20-fold0-e49"], True, "not a radpath store"),
    "fuse": (["fuse"], False, "not a radpath store"),
    "query": (["query", "SELECT 1"], False, "not a radpath store"),
    "report": (["report"], False, "not a radpath store"),
    "run": (["run", "{tmp}/pipeline.yaml"], True, "cannot read the config"),
}


@pytest.mark.parametrize("name", list(CONTRACT))
def test_every_command_takes_the_options_design_md_gives_it(tmp_path, name):
    argv, computes, words = CONTRACT[name]
    options = ["--store", str(tmp_path / "nowhere"), *(["--scheduler", "threads", "--device", "cpu"] * computes)]
    result = invoke([a.format(tmp=tmp_path) for a in argv] + options)
    assert result.exit_code == 2 and words in result.stderr, result.output


def test_the_contract_lists_every_command():
    # synth writes a cohort folder, not a store; predict-case reads a bundle; embedders lists the
    # presets; bundle and weights (which works on weights files, not a store) are groups.
    commands = set(typer.main.get_command(app).commands)
    assert commands == set(CONTRACT) | {"synth", "predict-case", "embedders", "bundle", "weights"}


# ---- --skip-errors: the batch finishes and its failures are listed in a table ------------------
def test_tile_skip_errors_lists_the_failures(base, tmp_path):
    ctx = _copy(base, tmp_path)
    blank, broken = "CPM19_CBICA_BLK_1", "CPM19_CBICA_NEW_1"
    blank_slide(ctx.slide(blank), size=(600, 500))
    write_slide(ctx.data, broken)
    ctx.reingest(default_mpp=0.5)
    ctx.slide(broken).write_text("x" * 999)  # changed after ingest
    result = invoke(ctx.tile_cmd("--skip-errors"))
    assert result.exit_code == 0, result.output
    st = Store(ctx.store)
    errors = st.read_table("tile_errors").set_index("case_id")
    assert sorted(errors.index) == [blank, broken]
    assert "unreadable slide" in errors.loc[broken, "error"] and "no tissue" in errors.loc[blank, "error"]
    assert errors.loc[broken, "slide_path"] == str(ctx.slide(broken))
    # The 8 good slides are in the tiles table; the failed ones have no tiles anywhere.
    assert set(st.read_table("tiles")["case_id"]) == set(st.cases()["case_id"]) - {blank, broken}
    assert not (ctx.store / TILES / blank).exists() and not (ctx.store / TILES / broken).exists()
    assert "skipped:" in result.stderr and f"{blank}.tiff" in _flat(result.stderr)


def test_ingest_skip_errors_lists_the_failures(base, tmp_path):
    ctx = _copy(base, tmp_path)
    _truncate(ctx.slide())
    ctx.volume("t2", "CPM19_TCIA01_000_1").unlink()
    result = invoke([*ctx.ingest_cmd(), "--skip-errors"])
    assert result.exit_code == 0, result.output
    cases = Store(ctx.store).cases(include_excluded=True).set_index("case_id")
    excluded = cases[cases["excluded"]]
    assert sorted(excluded.index) == [GOOD, "CPM19_TCIA01_000_1"]
    assert "unreadable or corrupt slide" in excluded.loc[GOOD, "exclusion_reason"]
    assert "missing MRI modality" in excluded.loc["CPM19_TCIA01_000_1", "exclusion_reason"]


def test_mri_skip_errors_lists_the_failures_and_trains_on_the_rest(base, tmp_path):
    ctx = _copy(base, tmp_path)
    _nan(str(ctx.volume("t1ce")))
    result = invoke(ctx.mri_cmd("--skip-errors"))
    assert result.exit_code == 0, result.output
    st = Store(ctx.store)
    errors = st.read_table("mri_errors")
    assert errors["case_id"].tolist() == [GOOD]
    assert errors["path"].tolist() == [str(ctx.volume("t1ce"))] and "NaN" in errors["error"].iloc[0]
    assert not (ctx.store / MRI_ZARR / GOOD).exists()
    cases = st.cases()
    with_mri = set(cases.loc[cases["has_mri"], "case_id"]) - {GOOD}
    assert {p.name for p in (ctx.store / MRI_ZARR).iterdir() if p.is_dir()} == with_mri
    config = st.read_json(model_config_path("mri-fold0-e0"))
    assert GOOD not in config["train_cases"] + config["heldout_cases"]
    # predict leaves the recorded case out, with a warning, instead of failing on it again
    result = invoke(["predict", "--store", str(ctx.store), "--model", "mri-fold0-e0", "--device", "cpu",
                     "--config", str(ctx.tmp / "mri.yaml")])
    assert result.exit_code == 0, result.output
    assert f"1 case(s) listed in {ctx.store}/tables/mri_errors.parquet get no row: {GOOD}" in _flat(result.stderr)
    oof = st.read_table(prediction_table_name("mri-fold0-e0", "oof"))
    assert GOOD not in set(oof["case_id"]) and len(oof) > 0
