"""`radpath ingest`: the round trip from a synthetic cohort, the real CMU slide, and every bad input."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import pyvips
from typer.testing import CliRunner

from radpath_fs.cli import app
from radpath_fs.cohort import ingest
from radpath_fs.config import IngestConfig, SynthConfig
from radpath_fs.errors import BatchErrors, InputError
from radpath_fs.store import Store

CMU = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def write_volume(path: Path, shape=(12, 12, 10), affine=None, data=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.zeros(shape, np.float32)
        data[2:-2, 2:-2, 2:-2] = 1 + np.arange(np.prod(shape) // 1)[: (shape[0] - 4) * (shape[1] - 4) * (shape[2] - 4)].reshape(
            shape[0] - 4, shape[1] - 4, shape[2] - 4) % 7
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine), str(path))


def write_mri(root: Path, case: str, modalities=("t1", "t1ce", "t2", "flair"), shape=(12, 12, 10)):
    for m in modalities:
        write_volume(root / "Radiology" / case / f"{case}_{m}.nii.gz", shape)


def write_slide(root: Path, case: str, mpp: float | None = 0.5, size=(600, 500)):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = pyvips.Image.new_from_array(a)
    kw = {}
    if mpp is not None:
        im = im.copy(xres=1000.0 / mpp, yres=1000.0 / mpp)
        kw["resunit"] = "cm"
    p = root / "Pathology" / f"{case}.tiff"
    p.parent.mkdir(parents=True, exist_ok=True)
    im.tiffsave(str(p), tile=True, compression="jpeg", **kw)
    return p


def write_labels(root: Path, rows, header="CPM_RadPath_2019_ID,class,age_in_days"):
    p = root / "labels.csv"
    p.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return p


def make_cohort(root: Path, n=6):
    """n labelled cases (two of each class) with slide + MRI, one unlabelled, one slide-only."""
    rows = []
    for i in range(n):
        case = f"CPM19_{'CBICA' if i % 2 else 'TCIA01'}_{i:03d}_1"
        write_slide(root, case)
        write_mri(root, case)
        rows.append((case, "AOG"[i % 3], 1000 + i))
    write_slide(root, "CPM19_CBICA_HID_1")
    write_mri(root, "CPM19_CBICA_HID_1")
    write_slide(root, "CPM19_TCIA01_SLO_1")
    rows.append(("CPM19_TCIA01_SLO_1", "G", 5))
    return write_labels(root, rows)


def snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_synth_then_ingest_round_trip(tmp_path):
    from radpath_fs.synth import synth_cohort

    synth_cohort(tmp_path / "data", SynthConfig(cases=9, seed=3, wsi_size=(1024, 768), mri_size=(24, 24, 20),
                                                unlabelled=2))
    df = ingest(str(tmp_path / "store"), tmp_path / "data", tmp_path / "data" / "labels.csv",
                IngestConfig(folds=3, seed=0))
    labels = pd.read_csv(tmp_path / "data" / "labels.csv")
    assert len(df) == 11 and not df["excluded"].any()
    assert df["has_slide"].all() and df["has_mri"].all()
    assert (df["slide_width"] == 1024).all() and (df["slide_height"] == 768).all()
    assert np.allclose(df["slide_mpp"], 0.5, atol=1e-3)
    merged = df.merge(labels, left_on="case_id", right_on="CPM_RadPath_2019_ID")
    assert (merged["label"] == merged["class"]).all() and len(merged) == 9
    unl = df[df["label"].isna()]
    assert len(unl) == 2 and (unl["split"] == "val").all() and (unl["fold"] == -1).all()
    assert sorted(df.loc[df["label"].notna(), "fold"].unique()) == [0, 1, 2]
    assert set(df["cohort"].dropna()) <= {"CBICA", "TCIA"}
    pd.testing.assert_frame_equal(Store(tmp_path / "store").read_table("cases"), df)


def test_real_svs_and_layout(tmp_path):
    data = tmp_path / "data"
    labels = make_cohort(data)
    shutil.copy(CMU, data / "Pathology" / "CPM19_CBICA_SVS_1.svs")
    labels.write_text(labels.read_text() + "CPM19_CBICA_SVS_1,O,77\n")
    df = ingest(str(tmp_path / "st"), data, labels, IngestConfig(folds=2, seed=1)).set_index("case_id")
    svs = df.loc["CPM19_CBICA_SVS_1"]
    assert (svs.slide_width, svs.slide_height) == (2220, 2967)
    assert svs.slide_mpp == pytest.approx(0.499)
    assert svs.has_slide and not svs.has_mri and svs.cohort == "CBICA"
    assert df.loc["CPM19_TCIA01_SLO_1"].has_slide and not df.loc["CPM19_TCIA01_SLO_1"].has_mri
    assert df.loc["CPM19_CBICA_000_1".replace("CBICA", "TCIA01")].cohort == "TCIA"
    assert df.loc["CPM19_CBICA_HID_1"].fold == -1 and pd.isna(df.loc["CPM19_CBICA_HID_1"].label)
    # Stratified: each fold holds members of each class present at least twice.
    lab = df[df["label"].notna()]
    for c in "AOG":
        assert lab.loc[lab["label"] == c, "fold"].nunique() == 2


def test_folds_are_seeded(tmp_path):
    data = tmp_path / "data"
    labels = make_cohort(data)
    a = ingest(str(tmp_path / "s1"), data, labels, IngestConfig(folds=2, seed=5))
    b = ingest(str(tmp_path / "s2"), data, labels, IngestConfig(folds=2, seed=5))
    pd.testing.assert_frame_equal(a, b)
    c = ingest(str(tmp_path / "s3"), data, labels, IngestConfig(folds=2, seed=6))
    assert not c["fold"].equals(a["fold"])


def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


BAD_INPUTS = {
    "missing modality": (lambda d: (d / "Radiology/CPM19_TCIA01_000_1/CPM19_TCIA01_000_1_t2.nii.gz").unlink(),
                         "CPM19_TCIA01_000_1_t2.nii.gz: missing MRI modality"),
    "shape mismatch": (lambda d: write_volume(d / "Radiology/CPM19_CBICA_001_1/CPM19_CBICA_001_1_flair.nii.gz",
                                              (12, 12, 9)),
                       "CPM19_CBICA_001_1_flair.nii.gz: shape (12, 12, 9) differs from t1's (12, 12, 10)"),
    "truncated nifti": (lambda d: _truncate(d / "Radiology/CPM19_CBICA_001_1/CPM19_CBICA_001_1_t1.nii.gz"),
                        "CPM19_CBICA_001_1_t1.nii.gz: unreadable NIfTI volume"),
    "zero-byte slide": (lambda d: (d / "Pathology/CPM19_TCIA01_002_1.tiff").write_bytes(b""),
                        "CPM19_TCIA01_002_1.tiff: slide file is empty (0 bytes)"),
    "corrupt slide": (lambda d: (d / "Pathology/CPM19_TCIA01_002_1.tiff").write_bytes(b"II*\x00garbage" * 50),
                      "CPM19_TCIA01_002_1.tiff: unreadable or corrupt slide"),
    "truncated slide": (lambda d: _truncate(d / "Pathology/CPM19_TCIA01_002_1.tiff"),
                        "CPM19_TCIA01_002_1.tiff: unreadable or corrupt slide"),
    "no mpp": (lambda d: write_slide(d, "CPM19_TCIA01_002_1", mpp=None),
               "CPM19_TCIA01_002_1.tiff: µm/px unknown"),
    "unsafe id": (lambda d: write_slide(d, "bad id!"), "case id 'bad id!' is not safe"),
    "label without data": (lambda d: (d / "labels.csv").write_text((d / "labels.csv").read_text() + "CPM19_X_9_1,A,1\n"),
                           "case CPM19_X_9_1 is listed in the labels CSV but has no slide and no MRI"),
    # A row without a class is an unlabelled case: the message must not claim it has a label.
    "classless row without data": (
        lambda d: (d / "labels.csv").write_text((d / "labels.csv").read_text() + "CPM19_X_9_1,,1\n"),
        "case CPM19_X_9_1 is listed in the labels CSV but has no slide and no MRI"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_case_is_reported_and_store_unchanged(tmp_path, name):
    data = tmp_path / "data"
    labels = make_cohort(data)
    store = tmp_path / "st"
    ingest(str(store), data, labels, IngestConfig(folds=2))  # an earlier good ingest
    before = snapshot(store)
    mutate, message = BAD_INPUTS[name]
    mutate(data)
    with pytest.raises(BatchErrors) as e:
        ingest(str(store), data, labels, IngestConfig(folds=2))
    assert message in str(e.value)
    assert snapshot(store) == before
    # With --skip-errors the batch finishes and the case is recorded as excluded, with its reason.
    df = ingest(str(store), data, labels, IngestConfig(folds=2, skip_errors=True))
    excluded = df[df["excluded"]]
    assert len(excluded) == 1 and message in excluded["exclusion_reason"].iloc[0]
    assert (excluded["fold"] == -1).all()
    assert not df.loc[~df["excluded"], "exclusion_reason"].notna().any()


def test_default_mpp_fills_in(tmp_path):
    data = tmp_path / "data"
    labels = make_cohort(data)
    write_slide(data, "CPM19_TCIA01_002_1", mpp=None)
    df = ingest(str(tmp_path / "st"), data, labels, IngestConfig(folds=2, default_mpp=0.25)).set_index("case_id")
    assert df.loc["CPM19_TCIA01_002_1"].slide_mpp == 0.25
    assert df.loc["CPM19_CBICA_001_1"].slide_mpp == pytest.approx(0.5)


@pytest.mark.parametrize(
    "content, message",
    [
        ("CPM_RadPath_2019_ID,class\nCPM19_CBICA_001_1,X\n", "class 'X' for CPM19_CBICA_001_1 (line 2) is not one of"),
        ("CPM_RadPath_2019_ID,class\nCPM19_CBICA_001_1,A\nCPM19_CBICA_001_1,G\n", "duplicate id(s) ['CPM19_CBICA_001_1']"),
        ("id,label\nCPM19_CBICA_001_1,A\n", "missing column 'CPM_RadPath_2019_ID'"),
        # pandas skips blank lines; the line reported is the file's
        ("CPM_RadPath_2019_ID,class,age_in_days\n\nCPM19_CBICA_001_1,A,1\n  \nCPM19_CBICA_003_1,X,1\n",
         "class 'X' for CPM19_CBICA_003_1 (line 5)"),
        ("CPM_RadPath_2019_ID,class,age_in_days\r\n\r\nCPM19_CBICA_001_1,A,old\r\n",
         "age_in_days 'old' for CPM19_CBICA_001_1 (line 3)"),
    ],
)
def test_bad_labels_csv(tmp_path, content, message):
    data = tmp_path / "data"
    make_cohort(data)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(InputError) as e:
        ingest(str(tmp_path / "st"), data, bad, IngestConfig(folds=2))
    assert str(e.value).startswith(str(bad)) and message in str(e.value)
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("header, row", [("CPM_RadPath_2019_ID,age_in_days", "{case},7"),
                                         ("CPM_RadPath_2019_ID,class,age_in_days", "{case},,7")])
def test_labels_without_class_are_unlabelled_cases(tmp_path, header, row):
    """The class is absent for hidden sets (no class column, or an empty class)."""
    data = tmp_path / "data"
    make_cohort(data)
    cases = ["CPM19_CBICA_001_1", "CPM19_CBICA_HID_1"]
    labels = write_labels(tmp_path, [], header=header + "\n" + "\n".join(row.format(case=c) for c in cases))
    df = ingest(str(tmp_path / "st"), data, labels, IngestConfig(folds=2)).set_index("case_id")
    assert df["label"].isna().all() and not df["excluded"].any()
    assert (df.loc[cases, "age_in_days"] == 7).all() and (df.loc[cases, "split"] == "val").all()
    assert (df["fold"] == -1).all()


def test_cli_exit_code_2_lists_each_problem(tmp_path):
    data = tmp_path / "data"
    labels = make_cohort(data)
    (data / "Pathology/CPM19_TCIA01_002_1.tiff").write_bytes(b"")
    (data / "Radiology/CPM19_TCIA01_000_1/CPM19_TCIA01_000_1_t2.nii.gz").unlink()
    r = subprocess.run([sys.executable, "-m", "radpath_fs.cli", "ingest", str(data), "--labels", str(labels),
                        "--store", str(tmp_path / "st"), "--folds", "2"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "2 invalid case(s); nothing was written" in r.stderr
    assert "slide file is empty" in r.stderr and "missing MRI modality" in r.stderr
    assert not (tmp_path / "st").exists()


def _ingest_cli(data: Path, store: Path):
    return CliRunner().invoke(app, ["ingest", str(data), "--store", str(store)])


def _flat(text: str) -> str:
    """Console output without whitespace: rich wraps long paths anywhere."""
    return "".join(text.split())


def test_labels_csv_is_found_by_its_header_where_the_challenge_ships_it(tmp_path):
    data = tmp_path / "data"
    make_cohort(data).rename(data / "training_data_classification_labels.csv")
    (data / "notes.csv").write_text("case,comment\nCPM19_CBICA_HID_1,blurry\n")  # another CSV, another header
    result = _ingest_cli(data, tmp_path / "store")
    assert result.exit_code == 0, result.output
    assert _flat(f"labels: {data / 'training_data_classification_labels.csv'}") in _flat(result.output)
    cases = Store(str(tmp_path / "store")).cases().set_index("case_id")
    assert cases["label"].notna().sum() == 7 and cases.at["CPM19_TCIA01_000_1", "label"] == "A"
    assert cases.at["CPM19_TCIA01_000_1", "age_in_days"] == 1000


def test_two_labels_csvs_are_an_error_naming_both_and_nothing_is_written(tmp_path):
    data = tmp_path / "data"
    labels = make_cohort(data)
    shutil.copy(labels, data / "training_data_classification_labels.csv")
    result = _ingest_cli(data, tmp_path / "store")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "labels.csv" in errors[0] and "training_data_classification_labels.csv" in errors[0]
    assert "--labels" in errors[0]
    assert not (tmp_path / "store").exists()


def test_a_cohort_without_a_labelled_case_is_warned_about(tmp_path):
    data = tmp_path / "data"
    make_cohort(data).unlink()
    result = _ingest_cli(data, tmp_path / "store")
    assert result.exit_code == 0, result.output
    out = _flat(result.output)
    assert _flat("warning: no case is labelled") in out and _flat(f"no CSV at {data}") in out
    assert Store(str(tmp_path / "store")).cases()["label"].isna().all()
    # What follows names that cause, not a missing step.
    train = CliRunner().invoke(app, ["train-wsi", "--store", str(tmp_path / "store"), "--mode", "head", "--mag", "20",
                                     "--fold", "0", "--device", "cpu"])
    assert train.exit_code == 2 and "no labelled case" in train.output and "radpath tile" not in train.output
