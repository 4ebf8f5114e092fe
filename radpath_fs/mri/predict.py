"""MRI model inference: logits of a snapshot for the cases of each split, as prediction tables.

Splits: `oof` = the labelled cases of the model's held-out fold (an error for a fold -1 model),
`train` = the labelled cases it trained on, `val`/`test` = unlabelled cases of that split.
Default: oof (when the model has a fold) + every unlabelled split present. Called by
`radpath_fs.predict.predict_models` for models whose config.json says modality "mri".
"""

from __future__ import annotations

import pandas as pd
import torch

from radpath_fs.config import MRITrainConfig, PipelineConfig, validate_stored
from radpath_fs.errors import RadpathError
from radpath_fs.folds import default_splits, split_cases
from radpath_fs.layout import MRI_ERRORS_TABLE, model_config_path, model_dir
from radpath_fs.mri.data import CachedVolumes, default_workers, make_loader, volume_bytes
from radpath_fs.mri.preprocess import check_preprocess_version, is_cached, preprocess_cases, recorded_errors
from radpath_fs.mri.train import build_network, mri_runtime, predict_logits
from radpath_fs.predictions import SPLITS, prediction_table, write_predictions
from radpath_fs.progress import info, warn
from radpath_fs.store import Store
from radpath_fs.training import Runtime, load_checkpoint, resolve_device


def mri_network(state: dict, mcfg: MRITrainConfig, device: str = "auto") -> tuple[torch.nn.Module, Runtime]:
    """A trained network (weights `state`, architecture `mcfg`) on its device, and its runtime."""
    rt = mri_runtime(resolve_device(device), mcfg)
    model = build_network(mcfg)
    model.load_state_dict(state)
    return rt.prepare(model), rt


def predict_mri(
    store: str | Store,
    cfg: PipelineConfig,
    model_id: str,
    splits: list[str] | None = None,
    device: str = "auto",
) -> list[str]:
    """Write `tables/predictions/<model_id>--<split>.parquet` for each split; return the paths.

    The network and preprocessing come from the model's own config.json; `cfg` gives the
    inference batch size and loader workers. Cases not cached yet at the model's size are
    preprocessed first (the caller holds the store's writer lock).
    """
    store = store if isinstance(store, Store) else Store(store)
    state, config = load_checkpoint(store, model_id)
    if config.get("modality") != "mri":
        raise RadpathError(f"{store.path(model_dir(model_id))}: modality {config.get('modality')!r}, not an MRI model")
    check_preprocess_version(store.path(model_dir(model_id)), config)
    mcfg = validate_stored(MRITrainConfig, config["mri"], f"{store.path(model_config_path(model_id))}: mri")
    fold, snapshot = int(config["fold"]), int(config["snapshot"])
    cases = store.cases()
    wanted = default_splits(cases, fold, "mri") if splits is None else list(splits)
    bad = [s for s in wanted if s not in SPLITS]
    if bad:
        raise RadpathError(f"--split {bad[0]!r}: expected one of {', '.join(SPLITS)}")

    # Cases a `train-mri --skip-errors` run recorded as unreadable (and still uncached) get no row.
    skipped = {c for c in recorded_errors(store) if not is_cached(store, c, mcfg)}
    todo = []
    for split in wanted:
        rows = split_cases(cases, split, fold, config.get("train_cases"), modality="mri", model_id=model_id)
        left_out = sorted(set(rows["case_id"]) & skipped)
        if left_out:
            warn(f"{model_id} {split}: {len(left_out)} case(s) listed in {store.path(store.table_rel(MRI_ERRORS_TABLE))} "
                 f"get no row: {', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}")
            rows = rows[~rows["case_id"].isin(skipped)]
        if rows.empty:
            warn(f"{model_id}: no case with MRI in split {split!r}; nothing written for it")
        else:
            todo.append((split, rows))
    if not todo:
        return []
    preprocess_cases(store, mcfg, pd.concat([rows for _, rows in todo]).drop_duplicates("case_id"))

    model, rt = mri_network(state, mcfg, device)
    workers = min(default_workers(cfg.mri, rt.device), 4)
    written = []
    for split, rows in todo:
        ids = [str(c) for c in rows["case_id"]]
        loader = make_loader(CachedVolumes(store.url, ids), batch_size=cfg.mri.eval_batch_size,
                             num_workers=workers, pin_memory=rt.cuda, item_bytes=volume_bytes(mcfg))
        logits = predict_logits(model, loader, rt)
        table = prediction_table(
            model_id=model_id,
            modality="mri",
            magnification=None,
            snapshot=snapshot,
            fold=fold,
            split=split,
            case_ids=ids,
            labels=list(rows["label"]),
            logits=logits,
        )
        written.append(write_predictions(store, table))
        info(f"{model_id}: {len(ids)} {split} prediction(s) -> {written[-1]}")
    return written
