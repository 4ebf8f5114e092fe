"""Head-mode accuracy on a synthetic cohort through the real stage one: the class is found where the
generator draws it and not where the tiler's downsampling removed it. The helpers serve `make
bench` too (tests/benchmarks/bench_mil.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from chain_data import run_chain, synth_data

from radpath_fs.config import PipelineConfig
from radpath_fs.layout import prediction_table_name
from radpath_fs.mil import train_wsi
from radpath_fs.predict import predict_models
from radpath_fs.store import Store


def out_of_fold_balanced_accuracy(store: Store, cfg: PipelineConfig, mag: float, folds: int) -> tuple[float, int]:
    """Train a head per fold at `mag`, predict each fold's held-out cases; the balanced accuracy
    over all of them and how many there were."""
    from sklearn.metrics import balanced_accuracy_score

    oof = []
    for fold in range(folds):
        (model_id,) = train_wsi(store, cfg, mag, fold, device="cpu")
        predict_models(store, cfg, [model_id], ["oof"], device="cpu")
        oof.append(store.read_table(prediction_table_name(model_id, "oof")))
    df = pd.concat(oof)
    return float(balanced_accuracy_score(df["label"], df["pred_vote"])), len(df)


# Random weights (nothing is downloaded): a random convnet's pooled features are texture
# statistics. Measured on the cohort below, 20x balanced accuracy: 0.90 with this one, 0.89
# with test_efficientnet, 0.99 with test_resnet.
ACCURACY_EMBEDDER = "mobilenetv3_small_050"


def accuracy_head_config(embedder: str) -> PipelineConfig:
    """Head-mode settings for the 90-case synthetic chain. For 60 training cases rather than the
    paper's 221: a larger step than its 5e-5, whole bags of up to 200 tiles, and lighter dropout
    than 0.5."""
    return PipelineConfig.model_validate({
        "tile": {"tile_size": 64, "magnifications": [20, 2.5]},
        "embed": {"name": embedder, "weights": "random", "input_size": 64, "batch_size": 128},
        "wsi": {"mode": "head", "epochs": 60, "snapshots": [-1], "lr": 1e-3, "tiles_per_slide": 200,
                "head": {"dropout": 0.2}},
        "predict": {"repeats": 5},
    })


def accuracy_chain(root: Path, cfg: PipelineConfig, *, seed: int) -> Store:
    """90 balanced synthetic cases (2048x1536 slides) through ingest -> tile -> embed under `cfg`,
    in 3 folds, under `root`."""
    data = synth_data(root / "data", cases=90, unlabelled=0, seed=seed, wsi_size=(2048, 1536), mri_size=(16, 16, 16))
    return run_chain(str(root / "store"), data, cfg, through="embed", folds=3)


def test_head_mode_finds_the_class_at_20x_and_not_at_2_5x(tmp_path):
    """The real chain (synth -> ingest -> tile -> embed -> train-wsi head -> predict) on 90
    balanced synthetic cases in 3 folds, so every case is held out once. The generator puts the
    class in detail finer than 5 µm only (radpath_fs.synth): a 64 px tile at 20x (32 µm) shows
    chromatin clumps, contour roughness, halos and fibrils; at 2.5x (4 µm/px) the tiler's
    downsampling keeps only the slide's class-independent reference content, and the chain must
    not find the class there. Chance is 1/3 with a standard deviation of about 0.05 at 30 cases
    per class: 0.5 is over three above it. Measured: 0.90 at 20x, 0.29 at 2.5x (synth seeds 1
    and 2: 0.92/0.41, 0.96/0.37). Other random embedders at 2.5x: test_resnet 0.41, 0.38, 0.34
    (seeds 5, 1, 2; 0.62 on the generator before its coarse content was made class-independent),
    resnet18 0.34."""
    cfg = accuracy_head_config(ACCURACY_EMBEDDER)
    store = accuracy_chain(tmp_path, cfg, seed=5)
    at20, n20 = out_of_fold_balanced_accuracy(store, cfg, 20, folds=3)
    at2_5, n2_5 = out_of_fold_balanced_accuracy(store, cfg, 2.5, folds=3)
    assert n20 == 90 and n2_5 >= 80, (n20, n2_5)  # 2.5x: a case may have no tissue tile at 256 µm
    assert at20 >= 0.85, (at20, at2_5)
    assert at2_5 <= 0.5, (at20, at2_5)
