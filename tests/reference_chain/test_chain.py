"""The real chain on the session's chain store: every module's real output feeds the next."""

import shutil

from chain_data import CHAIN

from radpath_fs.embedders import embedder_id
from radpath_fs.layout import model_config_path, prediction_table_name
from radpath_fs.mil import train_wsi
from radpath_fs.predict import pending_predictions, predict_models
from radpath_fs.store import Store


def test_real_chain_synth_tile_embed_train_predict(chain_reference, tmp_path):
    """synth -> ingest -> tile -> embed -> train-wsi (head) -> predict on a small synthetic cohort
    (the session's chain store; another magnification trained on a copy): every module's real
    output feeds the next, and the tables come out in the contract's shape. (Accuracy on a
    synthetic cohort: tests/test_mil_accuracy.py.)"""
    _, reference = chain_reference
    shutil.copytree(reference.root, tmp_path / "store")
    store = Store(tmp_path / "store")
    cfg = CHAIN
    model_id, at5 = (f"wsi-mag{mag}-fold0-e{cfg.wsi.epochs - 1}" for mag in (20, 5))
    assert pending_predictions(store) == []
    assert train_wsi(store.url, cfg, 5, 0, device="cpu") == [at5]
    assert pending_predictions(store) == [at5]
    predict_models(store.url, cfg, [at5], None, device="cpu")
    assert pending_predictions(store) == []
    cases = store.cases()
    oof = store.read_table(prediction_table_name(model_id, "oof"))
    val = store.read_table(prediction_table_name(model_id, "val"))
    assert sorted(oof["case_id"]) == sorted(cases.loc[cases["label"].notna() & (cases["fold"] == 0), "case_id"])
    assert sorted(val["case_id"]) == sorted(cases.loc[cases["label"].isna(), "case_id"])
    tiles = store.read_table("tiles")
    per_case = tiles[tiles["magnification"] == 20].groupby("case_id").size()
    assert (oof.set_index("case_id")["tiles"] == per_case.loc[oof["case_id"]].to_numpy()).all()
    config = store.read_json(model_config_path(model_id))
    assert config["embedder"]["id"] == embedder_id(cfg.embed)
