"""Read and check prediction tables, and arrange them as arrays for fusion.

A fusion *member* (a candidate model) is one (modality, magnification, snapshot): the models of the
cross-validation folds together give its out-of-fold (OOF) predictions, one per labelled case, and
its predictions for unlabelled splits are the mean over those fold models (or the one model trained
on every case, fold -1, where there is one). Members come from those table columns, never from
parsing model ids. Rows of the `train` split (predictions on a model's own training cases) are not
used: they would reward overfitting.

Every check names the offending file (InputError), so a bad write is easy to find among hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from radpath_fs import CLASSES
from radpath_fs.errors import InputError
from radpath_fs.layout import PREDICTIONS, TABLES
from radpath_fs.metrics import encode_labels
from radpath_fs.predictions import PROBS, REQUIRED, SCHEMA, SPLITS
from radpath_fs.progress import warn

LOGITS = [f"logit_{c}" for c in CLASSES]
# Rows are float32 on disk: a row normalised in float64 then cast sums to 1 within ~1e-7.
PROB_SUM_TOLERANCE = 1e-3
FILE = "_file"
NOT_NULL = ("model_id", "modality", "snapshot", "fold", "split", "case_id", *LOGITS, *PROBS)
FUSED_SPLITS_SKIPPED = ("train",)


def _is_stringish(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_schema(schema: pa.Schema, source: str) -> None:
    """Required columns present with the contract's types (strings in any Arrow string flavour)."""
    missing = [n for n in REQUIRED if n not in schema.names]
    if missing:
        raise InputError(source, f"not a prediction table: missing column(s) {', '.join(missing)}")
    wrong = []
    for f in SCHEMA:
        actual = schema.field(f.name).type
        ok = _is_stringish(actual) if pa.types.is_string(f.type) else actual == f.type
        if not ok:
            wrong.append(f"{f.name} is {actual}, expected {f.type}")
    if wrong:
        raise InputError(source, "wrong column type(s): " + "; ".join(wrong))


def _normalise(table: pa.Table, files: pa.Array | list[str]) -> pa.Table:
    """The required columns, strings as plain `string`, plus the source file of each row."""
    cols = []
    for f in SCHEMA:
        col = table.column(f.name)
        if pa.types.is_string(f.type) and col.type != pa.string():
            col = col.cast(pa.string()) if not pa.types.is_dictionary(col.type) else col.dictionary_decode()
            col = col.cast(pa.string())
        cols.append(col)
    files = pa.array(files, pa.string()) if isinstance(files, list) else files
    return pa.Table.from_arrays([*cols, files], names=[*REQUIRED, FILE])


def read_prediction_files(store) -> pd.DataFrame:
    """Every table under `tables/predictions/`, schema-checked file by file, with a `_file` column."""
    names = store.list_tables(PREDICTIONS)
    if not names:
        raise InputError(
            store.path(TABLES, PREDICTIONS), "no prediction tables; run `radpath predict` first"
        )
    parts = []
    for name in names:
        path = store.path(store.table_rel(name))
        try:
            with store.fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise InputError(path, f"not a readable Parquet file ({e})") from None
        check_schema(table.schema, path)
        if table.num_rows == 0:
            raise InputError(path, "holds no rows")
        parts.append(_normalise(table, [path] * table.num_rows))
    return pa.concat_tables(parts).to_pandas()


def frame_from_table(table: pa.Table | pd.DataFrame, source: str = "<predictions>") -> pd.DataFrame:
    """Rows read some other way (DuckDB, a DataFrame); a `filename` (DuckDB's) or `_file` column,
    when present, names each row's file in errors."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    check_schema(table.schema, source)
    for col in (FILE, "filename"):
        if col in table.column_names:
            files = table.column(col).cast(pa.string()).combine_chunks()
            break
    else:
        files = [source] * table.num_rows
    return _normalise(table, files).to_pandas()


def _files(df: pd.DataFrame, mask) -> str:
    files = sorted(set(df.loc[mask, FILE]))
    shown = ", ".join(files[:3])
    return shown + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")


def check_rows(df: pd.DataFrame) -> None:
    """Row checks of the contract, then the checks across files; the first problem is raised."""
    for col in NOT_NULL:
        bad = df[col].isna()
        if bad.any():
            raise InputError(_files(df, bad), f"{int(bad.sum())} row(s) with a null {col}")
    checks = [
        (~df["modality"].isin(["wsi", "mri"]), "modality must be 'wsi' or 'mri'"),
        (~df["split"].isin(SPLITS), f"split must be one of {', '.join(SPLITS)}"),
        (
            df["label"].notna() & ~df["label"].isin(CLASSES),
            f"label must be one of {', '.join(CLASSES)} or null",
        ),
        ((df["modality"] == "wsi") & ~(df["magnification"] > 0), "WSI rows need a positive magnification"),
        ((df["modality"] == "mri") & df["magnification"].notna(), "MRI rows must have a null magnification"),
        ((df["split"] == "oof") & df["label"].isna(), "OOF rows need a label (they are scored)"),
    ]
    for bad, problem in checks:
        if bad.any():
            example = df.loc[bad].iloc[0]
            raise InputError(
                _files(df, bad), f"{problem} (e.g. case {example['case_id']} of model {example['model_id']})"
            )

    probs = df[PROBS].to_numpy(np.float64)
    logits = df[LOGITS].to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(axis=1) | ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise InputError(
            _files(df, bad), f"{int(bad.sum())} row(s) with NaN or infinite logits/probabilities"
        )
    bad = ((probs < -PROB_SUM_TOLERANCE) | (probs > 1 + PROB_SUM_TOLERANCE)).any(axis=1)
    if bad.any():
        raise InputError(_files(df, bad), f"{int(bad.sum())} row(s) with probabilities outside [0, 1]")
    sums = probs.sum(axis=1)
    bad = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            _files(df, bad),
            f"probabilities do not sum to 1 in {int(bad.sum())} row(s) "
            f"(case {df['case_id'].iat[i]} of model {df['model_id'].iat[i]} sums to {sums[i]:.6f})",
        )

    meta = df.groupby("model_id", sort=False)[["modality", "magnification", "snapshot", "fold"]].nunique(
        dropna=False
    )
    bad_models = meta.index[(meta > 1).any(axis=1)]
    if len(bad_models):
        m = bad_models[0]
        raise InputError(
            _files(df, df["model_id"] == m),
            f"model {m} has rows with different modality/magnification/snapshot/fold",
        )

    dup = df.duplicated(["model_id", "split", "case_id"], keep=False)
    if dup.any():
        first = df.loc[dup].iloc[0]
        same = (
            dup
            & (df["model_id"] == first["model_id"])
            & (df["split"] == first["split"])
            & (df["case_id"] == first["case_id"])
        )
        raise InputError(
            _files(df, same),
            f"duplicate rows for (model {first['model_id']}, split {first['split']}, case {first['case_id']}); "
            f"{int(dup.sum())} duplicated row(s) in all",
        )

    labelled = df[df["label"].notna()]
    n_labels = labelled.groupby("case_id", sort=False)["label"].nunique()
    conflicting = n_labels.index[n_labels > 1]
    if len(conflicting):
        case = conflicting[0]
        rows = labelled[labelled["case_id"] == case]
        seen = rows.drop_duplicates("label")
        detail = ", ".join(
            f"{lab} in {f.rsplit('/', 1)[-1]}" for lab, f in zip(seen["label"], seen[FILE], strict=True)
        )
        raise InputError(
            _files(rows, rows.index), f"case {case} has different labels between files: {detail}"
        )


@dataclass(frozen=True)
class Member:
    """One fusion candidate: every fold model of a (modality, magnification, snapshot)."""

    name: str
    modality: str
    magnification: float | None
    snapshot: int
    snapshot_offset: int  # epochs before the modality's latest snapshot (0 = last)
    model_ids: tuple[str, ...]
    files: tuple[str, ...]


@dataclass
class SplitData:
    """One split as arrays: P[i, m, c] is member m's probability of class c for case i (NaN: missing)."""

    case_ids: np.ndarray
    labels: np.ndarray  # class name or None
    P: np.ndarray

    @property
    def y(self) -> np.ndarray:
        return encode_labels(self.labels)

    def complete(self, members: list[int]) -> np.ndarray:
        """Rows where every one of `members` has a prediction."""
        return ~np.isnan(self.P[:, members, 0]).any(axis=1)


@dataclass
class FusionData:
    members: list[Member]
    oof: SplitData
    splits: dict[str, SplitData] = field(default_factory=dict)  # unlabelled splits (val, test)
    dropped_oof_cases: int = 0

    def index(self, names: list[str]) -> list[int]:
        pos = {m.name: i for i, m in enumerate(self.members)}
        return [pos[n] for n in names]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


def member_name(modality: str, magnification: float | None, snapshot: int) -> str:
    if modality == "wsi":
        return f"wsi-mag{float(magnification):g}-e{int(snapshot)}"
    return f"{modality}-e{int(snapshot)}"


def _members(df: pd.DataFrame) -> tuple[list[Member], pd.Series]:
    """The members, and each row's member name. Models are grouped by table columns only."""
    keys = pd.MultiIndex.from_arrays(
        [df["modality"], df["magnification"].fillna(-1.0), df["snapshot"].astype(np.int64)]
    )
    codes, uniques = keys.factorize()
    names = [member_name(mo, None if ma < 0 else ma, s) for mo, ma, s in uniques]
    row_names = pd.Series(np.asarray(names, dtype=object)[codes], index=df.index)
    latest = df.groupby("modality")["snapshot"].max()
    models = df.groupby(codes)["model_id"].unique()
    files = df.groupby(codes)[FILE].unique()
    members = [
        Member(
            name=names[i],
            modality=mo,
            magnification=None if ma < 0 else float(ma),
            snapshot=int(snap),
            snapshot_offset=int(latest[mo] - snap),
            model_ids=tuple(sorted(models[i])),
            files=tuple(sorted(files[i])),
        )
        for i, (mo, ma, snap) in enumerate(uniques)
    ]
    # WSI first, finest magnification first, latest snapshot first; then MRI.
    members.sort(key=lambda m: (m.modality != "wsi", -(m.magnification or 0), m.snapshot_offset, m.name))
    return members, row_names


def _oof_split(df: pd.DataFrame, members: list[Member]) -> tuple[SplitData, int]:
    oof = df[df["split"] == "oof"]
    if oof.empty:
        raise InputError(
            sorted(set(df[FILE]))[0].rsplit("/", 1)[0],
            "no OOF rows (split 'oof'): fusion selects and scores on held-out predictions",
        )
    # Two fold models of one member must not both hold a case out.
    dup = oof.duplicated(["_member", "case_id"], keep=False)
    if dup.any():
        first = oof.loc[dup].iloc[0]
        same = dup & (oof["_member"] == first["_member"]) & (oof["case_id"] == first["case_id"])
        raise InputError(
            _files(oof, same),
            f"case {first['case_id']} has OOF rows from several models of member {first['_member']} "
            f"({', '.join(sorted(oof.loc[same, 'model_id']))}); a case is held out by one fold model",
        )
    common: set[str] | None = None
    seen: list[str] = []
    for m in members:
        cases = set(oof.loc[oof["_member"] == m.name, "case_id"])
        joined = cases if common is None else common & cases
        if not joined:
            raise InputError(
                _files(oof, oof["_member"] == m.name),
                f"models of member {m.name} ({', '.join(m.model_ids)}) share no OOF case with members "
                f"{', '.join(seen)}",
            )
        common = joined
        seen.append(m.name)
    cases = np.array(sorted(common), dtype=object)
    all_cases = oof["case_id"].nunique()
    split = _matrix(oof[oof["case_id"].isin(common)], members, cases)
    return split, all_cases - len(cases)


def _matrix(rows: pd.DataFrame, members: list[Member], cases: np.ndarray) -> SplitData:
    """(n, M, C) probabilities, mean over the rows of each (case, member) (fold models)."""
    col = {m.name: j for j, m in enumerate(members)}
    row = {c: i for i, c in enumerate(cases)}
    i = rows["case_id"].map(row).to_numpy()
    j = rows["_member"].map(col).to_numpy()
    P = np.zeros((len(cases), len(members), len(CLASSES)))
    count = np.zeros((len(cases), len(members)))
    np.add.at(P, (i, j), rows[PROBS].to_numpy(np.float64))
    np.add.at(count, (i, j), 1.0)
    with np.errstate(invalid="ignore"):
        P = P / count[..., None]  # NaN where a member has no prediction for a case
    labels = rows.groupby("case_id")["label"].first().reindex(cases)
    labels = np.array([lab if isinstance(lab, str) else None for lab in labels], dtype=object)
    return SplitData(case_ids=cases, labels=labels, P=P)


def _unlabelled_splits(df: pd.DataFrame, members: list[Member]) -> dict[str, SplitData]:
    out = {}
    for split in [s for s in SPLITS if s not in ("oof", *FUSED_SPLITS_SKIPPED)]:
        rows = df[df["split"] == split]
        if rows.empty:
            continue
        # A model trained on every labelled case (fold -1) replaces the fold models' mean.
        has_full = rows.groupby("_member")["fold"].transform(lambda f: (f < 0).any())
        rows = rows[~has_full | (rows["fold"] < 0)]
        out[split] = _matrix(rows, members, np.array(sorted(rows["case_id"].unique()), dtype=object))
    return out


def arrange(df: pd.DataFrame) -> FusionData:
    """Checked rows -> members and per-split arrays."""
    check_rows(df)
    df = df[~df["split"].isin(FUSED_SPLITS_SKIPPED)]
    if df.empty:
        raise InputError("<predictions>", "only `train` split rows; fusion needs OOF predictions")
    members, names = _members(df)
    df = df.assign(_member=names)
    scored = set(df.loc[df["split"] == "oof", "_member"])
    for m in [m for m in members if m.name not in scored and scored]:
        warn(
            f"member {m.name} has no OOF rows ({', '.join(m.files)}): left out, it cannot be scored or selected"
        )
    if scored:
        members = [m for m in members if m.name in scored]
        df = df[df["_member"].isin(scored)]
    oof, dropped = _oof_split(df, members)
    if dropped:
        warn(f"{dropped} OOF case(s) lack a prediction from some member and are left out of fusion")
    return FusionData(
        members=members, oof=oof, splits=_unlabelled_splits(df, members), dropped_oof_cases=dropped
    )


def load_fusion_data(source) -> FusionData:
    """Predictions from a store (Store or URL), an Arrow table/reader or a DataFrame, checked and arranged."""
    from radpath_fs.store import Store

    if isinstance(source, pa.RecordBatchReader):  # e.g. DuckDB's relation.arrow()
        source = source.read_all()
    if isinstance(source, (pa.Table, pd.DataFrame)):
        return arrange(frame_from_table(source))
    store = source if isinstance(source, Store) else Store(source)
    return arrange(read_prediction_files(store))
