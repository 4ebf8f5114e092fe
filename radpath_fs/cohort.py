"""`radpath ingest`: scan a CPM-RadPath folder, validate what is cheap to check, write the cases table.

Layout (the challenge's):
    DATA/Pathology/<ID>.tiff|.tif|.svs
    DATA/Radiology/<ID>/<ID>_{t1,t1ce,t2,flair}.nii.gz
    labels CSV: CPM_RadPath_2019_ID,class,age_in_days   (no class column, or an empty class: unlabelled)
                the challenge ships it at DATA's root (training_data_classification_labels.csv);
                without --labels, the one CSV there with this header is taken

Every invalid case yields one `InputError` naming the file and the problem. Without --skip-errors
they are all reported and nothing is written; with it, the cases are kept as excluded rows with
their reason, so the table says what was left out and why.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from radpath_fs import CLASSES, MODALITIES
from radpath_fs.config import IngestConfig
from radpath_fs.errors import BatchErrors, InputError, RadpathError, StoreError
from radpath_fs.folds import assign_folds
from radpath_fs.layout import CASES_TABLE
from radpath_fs.progress import info, progress_bar, warn
from radpath_fs.store import Store, check_name

SLIDE_SUFFIXES = (".tiff", ".tif", ".svs")
LABELS_HEADER = ("CPM_RadPath_2019_ID", "class", "age_in_days")
PLAUSIBLE_MPP = (0.05, 50.0)
_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9.]+)")


@dataclass
class SlideInfo:
    width: int
    height: int
    mpp: float | None


@dataclass
class CaseRecord:
    case_id: str
    label: str | None = None
    age_in_days: float | None = None
    slide_path: str | None = None
    mri: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(MODALITIES))
    slide: SlideInfo | None = None
    errors: list[InputError] = field(default_factory=list)


def cohort_of(case_id: str) -> str | None:
    """CPM ids carry the source cohort: CPM19_CBICA_xxx or CPM19_TCIA01_xxx."""
    for name in ("CBICA", "TCIA"):
        if name in case_id.upper():
            return name
    return None


def slide_mpp(image) -> float | None:
    """µm/px of a slide opened with pyvips: Aperio `MPP =` in the description, else TIFF resolution.

    libvips reports TIFF resolution in pixels per millimetre and 1.0 when the file has none, so
    only a resolution with an explicit unit is trusted.
    """
    fields = set(image.get_fields())
    for key in ("openslide.mpp-x", "aperio.MPP"):
        if key in fields:
            return float(image.get(key))
    if "image-description" in fields:
        m = _APERIO_MPP.search(str(image.get("image-description")))
        if m:
            return float(m.group(1))
    if "resolution-unit" in fields and image.xres > 0:
        mpp = 1000.0 / image.xres
        # Writers that know no resolution store a placeholder (libvips: 1 px/mm = 1000 µm/px);
        # anything outside what a microscope scans at is such a placeholder, not a measurement.
        if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            return mpp
    return None


def read_slide_info(path: Path) -> SlideInfo:
    """Open a slide's header with pyvips and decode its last tile row, which catches truncation."""
    import pyvips

    if not path.is_file():
        raise InputError(path, "slide file does not exist")
    if path.stat().st_size == 0:
        raise InputError(path, "slide file is empty (0 bytes)")
    try:
        # revalidate: libvips caches opened files by name, and the file may have changed since.
        image = pyvips.Image.new_from_file(str(path), access="random", revalidate=True)
        if image.bands < 3:
            raise InputError(path, f"slide has {image.bands} band(s); an RGB slide is expected")
        h = min(image.height, 256)
        image.crop(0, image.height - h, image.width, h).avg()
    except pyvips.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "libvips error"
        raise InputError(path, f"unreadable or corrupt slide ({first})") from None
    return SlideInfo(image.width, image.height, slide_mpp(image))


def _check_mri(record: CaseRecord) -> None:
    import nibabel as nib

    shapes: dict[str, tuple] = {}
    for mod, p in record.mri.items():
        if p is None:
            continue
        try:
            img = nib.load(p)
            shape = tuple(int(s) for s in img.shape)
            np.asanyarray(img.dataobj[..., -1:])  # the last slice ends the compressed stream: truncation shows here
        except Exception as e:  # nibabel raises many types for bad files
            record.errors.append(InputError(p, f"unreadable NIfTI volume ({type(e).__name__}: {e})"))
            continue
        if len(shape) != 3:
            record.errors.append(InputError(p, f"expected a 3D volume, got shape {shape}"))
            continue
        shapes[mod] = shape
    if len(set(shapes.values())) > 1:
        first = next(iter(shapes))
        for mod, shape in shapes.items():
            if shape != shapes[first]:
                record.errors.append(
                    InputError(record.mri[mod], f"shape {shape} differs from {first}'s {shapes[first]}")
                )


def _data_lines(path: Path) -> list[int]:
    """The file line number of each data row: pandas skips blank (or whitespace-only) lines, so a
    row's index alone would put a bad row one line up per blank line above it."""
    filled = [n for n, text in enumerate(path.read_bytes().split(b"\n"), 1) if text.strip()]
    return filled[1:]  # the first filled line is the header


def read_labels(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, "labels CSV does not exist")
    try:
        df = pd.read_csv(path, dtype={"CPM_RadPath_2019_ID": str, "class": str})
    except pd.errors.EmptyDataError:
        raise InputError(path, f"labels CSV is empty; expected the header {','.join(LABELS_HEADER)}") from None
    except Exception as e:
        raise InputError(path, f"not a readable CSV ({e})") from None
    if "CPM_RadPath_2019_ID" not in df.columns:
        raise InputError(path, f"missing column 'CPM_RadPath_2019_ID'; expected {list(LABELS_HEADER[:2])} (+ age_in_days)")
    # The class is absent for hidden sets, so no class column, or an empty class, is an
    # unlabelled case (label None).
    df["class"] = df["class"].astype(object).where(df["class"].notna(), None) if "class" in df.columns else None
    line = _data_lines(path)
    dup = df["CPM_RadPath_2019_ID"][df["CPM_RadPath_2019_ID"].duplicated()].tolist()
    if dup:
        raise InputError(path, f"duplicate id(s) {dup[:5]}")
    bad = df[df["class"].notna() & ~df["class"].isin(CLASSES)]
    if len(bad):
        row = bad.iloc[0]
        raise InputError(
            path,
            f"class {row['class']!r} for {row['CPM_RadPath_2019_ID']} (line {line[bad.index[0]]}) "
            f"is not one of {list(CLASSES)}",
        )
    if "age_in_days" in df.columns:
        age = pd.to_numeric(df["age_in_days"], errors="coerce")
        bad = df[(age.isna() & df["age_in_days"].notna()) | (age < 0)]
        if len(bad):
            i = bad.index[0]
            raise InputError(
                path,
                f"age_in_days {str(df.at[i, 'age_in_days'])!r} for {df.at[i, 'CPM_RadPath_2019_ID']} (line {line[i]}) "
                "is not a non-negative number of days",
            )
        df["age_in_days"] = age
    return df


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def find_labels(data: Path) -> Path | None:
    """The labels CSV at the root of a cohort folder: the one CSV whose header is the labels header
    (or part of it with the id column: a hidden set's has no class). Two are an error naming both."""
    if not data.is_dir():
        return None
    found = []
    for p in sorted(data.iterdir()):
        if p.suffix.lower() != ".csv" or not p.is_file():
            continue
        header = [h.strip() for h in _csv_header(p)]
        if LABELS_HEADER[0] in header and set(header) <= set(LABELS_HEADER):
            found.append(p)
    if len(found) > 1:
        raise InputError(data, f"{len(found)} labels CSVs ({', '.join(p.name for p in found)}) have the header "
                               f"{','.join(LABELS_HEADER)}; say which with --labels (data.labels)")
    return found[0] if found else None


def scan(data: Path, labels: Path | None) -> list[CaseRecord]:
    """Find every case named by a slide, an MRI folder or a label row."""
    if not data.is_dir():
        raise InputError(data, "data folder does not exist")
    pathology, radiology = data / "Pathology", data / "Radiology"
    if not pathology.is_dir() and not radiology.is_dir():
        raise InputError(data, "neither Pathology/ nor Radiology/ found (CPM-RadPath layout expected)")
    records: dict[str, CaseRecord] = {}

    def record(case_id: str) -> CaseRecord:
        return records.setdefault(case_id, CaseRecord(case_id))

    if pathology.is_dir():
        for p in sorted(pathology.iterdir()):
            if p.suffix.lower() in SLIDE_SUFFIXES:
                r = record(p.stem)
                if r.slide_path is not None:
                    r.errors.append(InputError(p, f"second slide for case {p.stem} (also {r.slide_path})"))
                else:
                    r.slide_path = str(p)
    if radiology.is_dir():
        for d in sorted(radiology.iterdir()):
            if not d.is_dir():
                continue
            r = record(d.name)
            for mod in MODALITIES:
                found = [d / f"{d.name}_{mod}{ext}" for ext in (".nii.gz", ".nii")]
                hit = next((f for f in found if f.exists()), None)
                r.mri[mod] = str(hit) if hit else None
            missing = [m for m in MODALITIES if r.mri[m] is None]
            if missing and len(missing) < len(MODALITIES):
                for m in missing:
                    r.errors.append(InputError(d / f"{d.name}_{m}.nii.gz", "missing MRI modality"))
            elif len(missing) == len(MODALITIES):
                r.errors.append(InputError(d, "MRI folder holds none of the four modalities"))
    if labels is not None:
        df = read_labels(labels)
        for row in df.to_dict("records"):
            r = record(str(row["CPM_RadPath_2019_ID"]))
            r.label = row["class"]
            age = row.get("age_in_days")
            r.age_in_days = None if age is None or pd.isna(age) else float(age)
    for r in records.values():
        try:
            check_name(r.case_id, "case id")
        except StoreError as e:
            r.errors.insert(0, InputError(r.slide_path or data, str(e)))
        if r.slide_path is None and all(v is None for v in r.mri.values()):
            r.errors.append(InputError(labels or data, f"case {r.case_id} is listed in the labels CSV but has no slide and no MRI"))
    return [records[k] for k in sorted(records)]


def cases_frame(records: list[CaseRecord], cfg: IngestConfig, unlabelled_split: str) -> pd.DataFrame:
    rows = []
    for r in records:
        s = r.slide
        rows.append(
            {
                "case_id": r.case_id,
                "label": r.label,
                "split": "train" if r.label is not None else unlabelled_split,
                "cohort": cohort_of(r.case_id),
                "age_in_days": r.age_in_days,
                "slide_path": r.slide_path,
                "slide_width": s.width if s else None,
                "slide_height": s.height if s else None,
                "slide_mpp": s.mpp if s else None,
                **{f"mri_{m}": r.mri[m] for m in MODALITIES},
                "has_slide": r.slide_path is not None,
                "has_mri": all(r.mri[m] is not None for m in MODALITIES),
                "excluded": bool(r.errors),
                "exclusion_reason": "; ".join(str(e) for e in r.errors) or None,
            }
        )
    df = pd.DataFrame(rows)
    df["fold"] = -1
    kept = ~df["excluded"]
    df.loc[kept, "fold"] = assign_folds(df.loc[kept, "label"].reset_index(drop=True), cfg.folds, cfg.seed)
    df["fold"] = df["fold"].astype("int32")
    for col in ("slide_width", "slide_height"):
        df[col] = df[col].astype("Int64")
    df["slide_mpp"] = df["slide_mpp"].astype("float64")
    df["age_in_days"] = df["age_in_days"].astype("float64")
    return df


def ingest(
    store_url: str,
    data: Path,
    labels: Path | None,
    cfg: IngestConfig,
    unlabelled_split: str = "val",
) -> pd.DataFrame:
    """Validate the cohort at `data` and write `tables/cases.parquet`; returns the table."""
    if unlabelled_split not in ("val", "test"):
        raise RadpathError(f"--unlabelled-split {unlabelled_split!r}: expected val or test")
    data, labels = Path(data), (Path(labels) if labels else None)
    try:
        existing = Store(store_url)
    except StoreError:
        existing = None  # a new store is made only once the cohort is valid
    if existing is not None:
        existing.check_unlocked()  # a second writer fails now, not after the validation
    if labels is None and (labels := find_labels(data)) is not None:
        info(f"labels: {labels} (the CSV at {data} with the labels header; --labels overrides)")
    records = scan(data, labels)
    if not records:
        raise InputError(data, "no cases found")
    with progress_bar("validating cases", total=len(records)) as advance:
        for r in records:
            if r.slide_path is not None:
                try:
                    r.slide = read_slide_info(Path(r.slide_path))
                    if r.slide.mpp is None:
                        if cfg.default_mpp is None:
                            raise InputError(
                                r.slide_path,
                                "µm/px unknown: no Aperio MPP and no TIFF resolution; pass --default-mpp",
                            )
                        r.slide.mpp = cfg.default_mpp
                except InputError as e:
                    r.errors.append(e)
            if any(v is not None for v in r.mri.values()):
                _check_mri(r)
            advance()
    errors = [e for r in records for e in r.errors]
    if errors and not cfg.skip_errors:
        raise BatchErrors(errors)
    df = cases_frame(records, cfg, unlabelled_split)
    store = Store(store_url, create=True)
    with store.lock("ingest"):
        store.write_table(CASES_TABLE, df)
    for e in errors:
        warn(f"excluded: {e}")
    kept = df[~df["excluded"]]
    if len(kept) and kept["label"].isna().all():
        where = f"in {labels}" if labels else f"and no CSV at {data} has the header {','.join(LABELS_HEADER)}"
        warn(f"no case is labelled ({where}): nothing can be trained or scored; embedding still works "
             "(--normalization dataset takes every case's tiles), or ingest again with --labels CSV")
    counts = kept["label"].value_counts().reindex(list(CLASSES), fill_value=0)
    info(
        f"ingested {len(kept)} case(s) ({', '.join(f'{c} {n}' for c, n in counts.items())}, "
        f"{kept['label'].isna().sum()} unlabelled; {int(kept['has_slide'].sum())} slides, "
        f"{int(kept['has_mri'].sum())} MRI), {int(df['excluded'].sum())} excluded -> {store.path(store.table_rel(CASES_TABLE))}"
    )
    return df
