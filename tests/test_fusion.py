"""Offline fusion: metrics (= scikit-learn), methods, nested CV, input checks, `radpath fuse`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fusion_data import make_prediction_store, simulate_tables
from sklearn import metrics as skm

from radpath_fs import CLASSES
from radpath_fs import metrics as fm
from radpath_fs.config import FusionConfig
from radpath_fs.errors import ConfigError, InputError
from radpath_fs.folds import stratified_case_folds
from radpath_fs.fusion import (
    ExhaustiveSearch,
    GreedySelection,
    HardVote,
    Prune,
    SoftVote,
    StackingLR,
    StackingXGB,
    all_subsets,
    evaluate,
    evaluate_subsets,
    load_fusion_data,
)
from radpath_fs.fusion.cli import fuse_store
from radpath_fs.layout import PREDICTIONS, table_path
from radpath_fs.predictions import prediction_table, write_predictions
from radpath_fs.store import Store

FAST = dict(bootstrap=200, greedy_bags=5, greedy_iterations=10)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def _label_pairs():
    rng = np.random.default_rng(0)
    pairs = []
    for n in (1, 2, 7, 50, 300):
        pairs.append((rng.integers(0, 3, n), rng.integers(0, 3, n)))
    pairs.append((np.array([0, 0, 1, 1]), np.array([0, 2, 1, 2])))  # class 2 predicted, never true
    pairs.append((np.array([2, 2, 1, 1]), np.array([2, 2, 2, 2])))  # one class predicted
    pairs.append((np.array([0, 0, 0]), np.array([0, 0, 0])))  # kappa undefined
    pairs.append((np.array([1, 1, 1, 2]), np.array([0, 0, 1, 2])))  # class 0 predicted, never true
    y = rng.integers(0, 3, 200)
    pairs.append((y, y.copy()))  # perfect
    return pairs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("y_true,y_pred", _label_pairs())
def test_metrics_equal_sklearn(y_true, y_pred):
    assert np.array_equal(
        fm.confusion_matrix(y_true, y_pred), skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2])
    )
    assert fm.balanced_accuracy(y_true, y_pred) == pytest.approx(
        skm.balanced_accuracy_score(y_true, y_pred), abs=1e-12
    )
    assert fm.f1_micro(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="micro"), abs=1e-12
    )
    assert fm.f1_macro(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12
    )
    expected = skm.cohen_kappa_score(y_true, y_pred)
    ours = fm.cohen_kappa(y_true, y_pred)
    assert (np.isnan(ours) and np.isnan(expected)) or ours == pytest.approx(expected, abs=1e-12)


def test_batched_metrics_equal_one_by_one():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 64)
    preds = rng.integers(0, 3, (40, 64))
    cms = fm.confusion_matrices(y, preds)
    assert cms.shape == (40, 3, 3)
    batch = fm.metrics_from_confusion(cms)
    for i in range(40):
        assert np.array_equal(cms[i], skm.confusion_matrix(y, preds[i], labels=[0, 1, 2]))
        assert batch["kappa"][i] == pytest.approx(skm.cohen_kappa_score(y, preds[i]))
        assert batch["balanced_accuracy"][i] == pytest.approx(skm.balanced_accuracy_score(y, preds[i]))


def test_metrics_reject_bad_codes():
    with pytest.raises(ValueError, match="class codes"):
        fm.confusion_matrix([0, 1, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="unknown class"):
        fm.encode_labels(["A", "X"])
    assert list(fm.encode_labels(["A", None, "G", float("nan")])) == [0, -1, 2, -1]


def test_bootstrap_intervals_match_case_resampling():
    """The multinomial draw of confusion cells is the case bootstrap: same quantiles."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    pred = np.where(rng.random(150) < 0.75, y, rng.integers(0, 3, 150))
    low, high = fm.bootstrap_intervals(y, pred, n_boot=20000, seed=3)
    idx = rng.integers(0, 150, (20000, 150))
    direct = fm.metrics_from_confusion(fm.confusion_matrices(y[idx], pred[idx]))
    for m in fm.METRICS:
        v = direct[m][np.isfinite(direct[m])]
        assert low[m] == pytest.approx(np.quantile(v, 0.025), abs=0.012)
        assert high[m] == pytest.approx(np.quantile(v, 0.975), abs=0.012)
    s = fm.score(y, pred, n_boot=500, seed=0)
    for m in fm.METRICS:
        assert s.low[m] < s.values[m] < s.high[m]
    assert fm.score(y, pred, n_boot=500, seed=0).low == s.low  # deterministic with a seed
    assert fm.score(y, pred, n_boot=500, seed=1).low != s.low  # ... and the seed draws the resamples
    wide = fm.score(y[:30], pred[:30], n_boot=500, seed=0)
    m = "balanced_accuracy"
    assert wide.high[m] - wide.low[m] > s.high[m] - s.low[m]  # fewer cases, wider interval


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
def _members(n=200, skills=(2.0, 1.5, 1.0, 0.0, 0.0), seed=0):
    """P (n, M, 3): members with a given skill (0 = pure noise), y (n,)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.25, 0.15, 0.6])
    logits = np.stack([s * np.eye(3)[y] + rng.normal(size=(n, 3)) for s in skills], axis=1)
    P = np.exp(logits)
    return P / P.sum(axis=2, keepdims=True), y


def test_soft_and_hard_vote():
    P, y = _members()
    sv = SoftVote().fit(P)
    assert np.allclose(sv.predict_proba(P), P.mean(axis=1))
    w = np.array([3, 1, 0, 0, 0])
    wv = SoftVote(weights=w).fit(P)
    assert np.allclose(wv.predict_proba(P), (P * (w / w.sum())[None, :, None]).sum(axis=1))
    assert list(wv.members_) == [0, 1]
    with pytest.raises(ValueError, match="weights"):
        SoftVote(weights=[1, 2]).fit(P)
    # Hard vote: 2 members say A, 1 says G -> A; a 1-1 tie goes to the higher mean probability.
    Q = np.array(
        [
            [[0.6, 0.1, 0.3], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]],
            [[0.55, 0.0, 0.45], [0.1, 0.0, 0.9], [0.3, 0.4, 0.3]],
        ]
    )
    hv = HardVote().fit(Q)
    assert np.allclose(hv.predict_proba(Q)[0], [2 / 3, 0, 1 / 3])
    assert list(hv.predict(Q)) == [0, 2]  # case 2: A, G, O one vote each; G has the highest mean


def test_prune_drops_the_worst():
    P, y = _members()
    pr = Prune(k=2).fit(P, y)
    assert sorted(pr.members_) == [0, 1, 2]
    assert np.allclose(pr.weights_[[0, 1, 2]], 1 / 3)
    assert pr.ranking_[0] == 0
    with pytest.raises(ValueError, match="leave none"):
        Prune(k=5).fit(P, y)


def test_greedy_selection_prefers_skilled_members():
    P, y = _members(skills=(2.0, 1.8, 0.0, 0.0, 0.0, 0.0))
    g = GreedySelection(bags=1, n_iter=10, init=1).fit(P, y)
    assert g.weights_.sum() == pytest.approx(1.0)
    assert g.weights_[:2].sum() > 0.7  # selected with replacement: the skilled members dominate
    single = max(skm.balanced_accuracy_score(y, P[:, m].argmax(axis=1)) for m in range(6))
    assert skm.balanced_accuracy_score(y, g.predict(P)) >= single  # the best along the way is kept
    bagged = GreedySelection(bags=10, random_state=0).fit(P, y)
    again = GreedySelection(bags=10, random_state=0).fit(P, y)
    assert np.array_equal(bagged.weights_, again.weights_)  # deterministic with a seed
    other = GreedySelection(bags=10, random_state=1).fit(P, y)
    assert not np.array_equal(bagged.weights_, other.weights_)  # ... and the seed draws the bags
    assert bagged.weights_.sum() == pytest.approx(1.0) and bagged.weights_[:2].sum() > 0.5


def test_exhaustive_search_equals_brute_force():
    P, y = _members(n=90, skills=(1.0, 0.8, 0.6, 0.3), seed=4)
    masks = all_subsets(4)
    assert masks.shape == (15, 4) and masks.any(axis=1).all()
    res = evaluate_subsets(P, y, masks)
    for s, mask in enumerate(masks):
        pred = P[:, mask].mean(axis=1).argmax(axis=1)
        assert res["balanced_accuracy"][s] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert res["kappa"][s] == pytest.approx(skm.cohen_kappa_score(y, pred))
        assert res["f1_micro"][s] == pytest.approx(skm.accuracy_score(y, pred))
    ex = ExhaustiveSearch().fit(P, y)
    chosen = np.flatnonzero(np.all(masks == (ex.weights_ > 0), axis=1))[0]
    assert res["balanced_accuracy"][chosen] == res["balanced_accuracy"].max()
    assert np.allclose(ex.weights_[ex.weights_ > 0], 1 / masks[chosen].sum())
    with pytest.raises(ValueError, match="max_candidates"):
        ExhaustiveSearch(max_candidates=3).fit(P, y)


@pytest.mark.parametrize("cls", [StackingLR, StackingXGB])
def test_stackers(cls):
    P, y = _members(n=240)
    est = cls().fit(P, y, groups=np.arange(len(y)))
    proba = est.predict_proba(P)
    assert proba.shape == (240, 3) and np.allclose(proba.sum(axis=1), 1)
    assert skm.balanced_accuracy_score(y, est.predict(P)) > 0.8
    # A training set without class O: its probability column is 0, the others still sum to 1.
    keep = y != 1
    est2 = cls().fit(P[keep], y[keep])
    p2 = est2.predict_proba(P)
    assert np.all(p2[:, 1] == 0) and np.allclose(p2.sum(axis=1), 1)


def test_stacking_lr_inner_cv_chooses_c():
    P, y = _members(n=150)
    est = StackingLR(Cs=(0.001, 1.0)).fit(P, y)
    assert est.C_ in (0.001, 1.0)
    assert StackingXGB(n_estimators=(5, 50)).fit(P, y).n_estimators_ in (5, 50)


def test_folds_are_grouped_and_stratified():
    y = np.repeat([0, 1, 2], [30, 20, 50])
    groups = np.array([f"c{i // 2}" for i in range(100)])  # two rows per case
    folds = stratified_case_folds(groups, y, 5, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    counts = np.bincount(folds, minlength=5)
    assert counts.max() - counts.min() <= 2
    with pytest.raises(ConfigError):
        stratified_case_folds(np.arange(3), np.zeros(3, int), 5)


def test_nested_estimate_removes_selection_optimism():
    """Noise members: choosing the best subset on the same cases looks good, nested does not."""
    rng = np.random.default_rng(5)
    y = rng.choice(3, 120)
    P = rng.dirichlet(np.ones(3), size=(120, 12))
    chance = 1 / 3
    for est in (ExhaustiveSearch(max_candidates=12), StackingLR()):
        ev = evaluate(est, P, y, n_boot=100)
        assert ev.is_nested
        assert ev.naive.values["balanced_accuracy"] > chance + 0.08
        assert ev.nested.values["balanced_accuracy"] < chance + 0.03
        assert len(ev.fold_weights) == 5
    fixed = evaluate(SoftVote(), P, y, n_boot=100)
    assert not fixed.is_nested and fixed.nested.values == fixed.naive.values


# ---------------------------------------------------------------------------------------------
# input checks: each error names the file
# ---------------------------------------------------------------------------------------------
def _table(
    model_id="m1",
    split="oof",
    cases=("c1", "c2", "c3"),
    labels=("A", "O", "G"),
    modality="wsi",
    mag=20.0,
    snapshot=49,
    fold=0,
    seed=0,
):
    logits = np.random.default_rng(seed).normal(size=(len(cases), 3))
    return prediction_table(
        model_id=model_id,
        modality=modality,
        magnification=mag if modality == "wsi" else None,
        snapshot=snapshot,
        fold=fold,
        split=split,
        case_ids=list(cases),
        labels=list(labels),
        logits=logits,
    )


def _store(tmp_path, *tables, names=None):
    store = Store(tmp_path / "s", create=True)
    for i, t in enumerate(tables):
        if names and names[i]:
            store.write_table(f"{PREDICTIONS}/{names[i]}", t)
        else:
            write_predictions(store, t)
    return store


def _replace(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


def test_missing_column_names_the_file(tmp_path):
    bad = _table().drop_columns(["prob_G"])
    store = _store(tmp_path, _table(model_id="ok"), bad, names=[None, "broken"])
    with pytest.raises(InputError, match=r"broken\.parquet.*missing column\(s\) prob_G"):
        load_fusion_data(store)


def test_wrong_type_names_the_file(tmp_path):
    t = _table()
    bad = _replace(t, "prob_A", t.column("prob_A").cast(pa.float64()))
    store = _store(tmp_path, bad)
    with pytest.raises(InputError, match=r"m1--oof\.parquet.*prob_A is double, expected float"):
        load_fusion_data(store)


def test_probabilities_not_summing_to_one(tmp_path):
    t = _table()
    bad = _replace(t, "prob_G", pa.array(np.array(t.column("prob_G")) + 0.2, pa.float32()))
    store = _store(tmp_path, _table(model_id="m0"), bad)
    with pytest.raises(InputError, match=r"m1--oof\.parquet.*do not sum to 1 in 3 row"):
        load_fusion_data(store)


def test_duplicate_rows(tmp_path):
    dup_in_file = _table(cases=("c1", "c1", "c2"), labels=("A", "A", "G"))
    with pytest.raises(
        InputError, match=r"m1--oof\.parquet.*duplicate rows for \(model m1, split oof, case c1\)"
    ):
        load_fusion_data(_store(tmp_path, dup_in_file))
    store = _store(tmp_path / "b", _table(), _table(cases=("c3",), labels=("G",)), names=[None, "again"])
    with pytest.raises(InputError, match=r"again\.parquet.*m1--oof\.parquet.*duplicate rows"):
        load_fusion_data(store)


def test_label_differs_between_files(tmp_path):
    store = _store(tmp_path, _table(model_id="m1"), _table(model_id="m2", mag=10.0, labels=("A", "G", "G")))
    with pytest.raises(
        InputError,
        match=r"m1--oof\.parquet, .*m2--oof\.parquet: case c2 has different labels between files: O in m1--oof\.parquet, G in m2--oof\.parquet",
    ):
        load_fusion_data(store)


def test_models_with_no_cases_in_common(tmp_path):
    store = _store(
        tmp_path,
        _table(model_id="m1"),
        _table(model_id="m2", mag=10.0, cases=("x1", "x2"), labels=("A", "G")),
    )
    with pytest.raises(
        InputError,
        match=r"m2--oof\.parquet.*member wsi-mag10-e49 \(m2\) share no OOF case with members wsi-mag20-e49",
    ):
        load_fusion_data(store)


def test_other_row_checks(tmp_path):
    no_label = _table(labels=("A", None, "G"))
    with pytest.raises(InputError, match="OOF rows need a label"):
        load_fusion_data(_store(tmp_path / "a", no_label))
    not_parquet = Store(tmp_path / "b", create=True)
    not_parquet.write_bytes(table_path(f"{PREDICTIONS}/junk"), b"not parquet")
    with pytest.raises(InputError, match=r"junk\.parquet: not a readable Parquet file"):
        load_fusion_data(not_parquet)
    with pytest.raises(InputError, match="no prediction tables"):
        load_fusion_data(Store(tmp_path / "c", create=True))
    # Two fold models of one member both holding out case c1.
    a = _table(model_id="f0", fold=0)
    b = _table(model_id="f1", fold=1, cases=("c1", "c4"), labels=("A", "O"))
    with pytest.raises(InputError, match="case c1 has OOF rows from several models of member wsi-mag20-e49"):
        load_fusion_data(_store(tmp_path / "d", a, b))


def test_members_come_from_columns_not_ids(tmp_path):
    """Ids without any convention; val of fold models averaged, a fold -1 model preferred."""
    oof = [
        _table(model_id="alpha", fold=0, cases=("c1", "c2"), labels=("A", "O"), seed=1),
        _table(model_id="beta", fold=1, cases=("c3", "c4"), labels=("G", "G"), seed=2),
        _table(
            model_id="gamma",
            modality="mri",
            snapshot=199,
            fold=0,
            cases=("c1", "c2"),
            labels=("A", "O"),
            seed=3,
        ),
        _table(
            model_id="delta",
            modality="mri",
            snapshot=199,
            fold=1,
            cases=("c3", "c4"),
            labels=("G", "G"),
            seed=4,
        ),
    ]
    val = [
        _table(model_id="alpha", split="val", fold=0, cases=("v1",), labels=(None,), seed=5),
        _table(model_id="beta", split="val", fold=1, cases=("v1",), labels=(None,), seed=6),
        _table(
            model_id="gamma",
            modality="mri",
            snapshot=199,
            split="val",
            fold=0,
            cases=("v1",),
            labels=(None,),
            seed=7,
        ),
        _table(
            model_id="omega",
            modality="mri",
            snapshot=199,
            split="val",
            fold=-1,
            cases=("v1",),
            labels=(None,),
            seed=8,
        ),
    ]
    data = load_fusion_data(_store(tmp_path, *oof, *val))
    assert data.names == ["wsi-mag20-e49", "mri-e199"]
    assert data.members[0].model_ids == ("alpha", "beta")
    assert list(data.oof.case_ids) == ["c1", "c2", "c3", "c4"]
    assert list(data.oof.y) == [0, 1, 2, 2]
    probs = lambda t: np.array([t.column(f"prob_{c}").to_pylist() for c in CLASSES]).T  # noqa: E731
    assert np.allclose(data.splits["val"].P[0, 0], (probs(val[0])[0] + probs(val[1])[0]) / 2, atol=1e-6)
    assert np.allclose(data.splits["val"].P[0, 1], probs(val[3])[0], atol=1e-6)  # fold -1 only


def test_load_from_duckdb_arrow_names_the_file(tmp_path):
    import duckdb

    t = _table()
    bad = _replace(t, "prob_G", pa.array(np.array(t.column("prob_G")) + 0.2, pa.float32()))
    store = _store(tmp_path, _table(model_id="m0"), bad)
    glob = str(tmp_path / "s" / "tables" / "predictions" / "*.parquet")
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{glob}', filename = true)")
    with pytest.raises(InputError, match=r"m1--oof\.parquet.*do not sum to 1"):
        load_fusion_data(rel.arrow())
    del store


# ---------------------------------------------------------------------------------------------
# radpath fuse
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    return make_prediction_store(tmp_path_factory.mktemp("fuse") / "store", n_cases=100, n_val=12, seed=1)


def test_fuse_store_writes_ablations(paper_store, capsys):
    cfg = FusionConfig(**FAST)
    table = fuse_store(paper_store.url, cfg, ablations=True)
    ens = paper_store.read_table("ensembles")
    assert len(ens) == len(table)
    expected = {
        "mri",
        "wsi",
        "wsi-mag20",
        "wsi-mag10",
        "wsi-mag5",
        "wsi-mag2.5",
        "snapshot-last",
        "snapshot-last-10",
        "all",
        "pruned",
        "selected",
        "exhaustive",
        "stacked-lr",
    }
    assert set(ens["experiment"]) == expected
    rows = ens.set_index("experiment")
    assert rows.loc["pruned", "primary"] and rows["primary"].sum() == 1
    # The paper's default: 10 candidates, the 2 worst (the weak 2.5x models here) pruned.
    assert rows.loc["pruned", "n_candidates"] == 10 and rows.loc["pruned", "n_members"] == 8
    assert not {"wsi-mag2.5-e49", "wsi-mag2.5-e39"} & set(rows.loc["pruned", "members"])
    assert set(rows.loc["mri", "members"]) == {"mri-e199", "mri-e189"}
    assert set(rows.loc["snapshot-last", "members"]) == {
        "wsi-mag20-e49",
        "wsi-mag10-e49",
        "wsi-mag5-e49",
        "wsi-mag2.5-e49",
        "mri-e199",
    }
    # Fixed votes: one honest number; selection/stacking: nested differs from naive.
    for name in ("mri", "all", "wsi-mag20"):
        assert not rows.loc[name, "fits_on_oof"]
        assert rows.loc[name, "nested_balanced_accuracy"] == rows.loc[name, "balanced_accuracy"]
    for name in ("pruned", "selected", "exhaustive", "stacked-lr"):
        assert rows.loc[name, "fits_on_oof"] and rows.loc[name, "outer_folds"] == 5
        assert len(json.loads(rows.loc[name, "nested_selections"])) == 5
    for m in fm.METRICS:
        assert (ens[f"nested_{m}_low"] <= ens[f"nested_{m}"] + 1e-12).all()
        assert (ens[f"nested_{m}"] <= ens[f"nested_{m}_high"] + 1e-12).all()
    assert all(len(c) == 9 and sum(c) == 100 for c in ens["nested_confusion"])
    # The weak magnification is the worst ablation; fusion beats MRI alone.
    assert rows["balanced_accuracy"].idxmin() == "wsi-mag2.5"
    assert rows.loc["pruned", "nested_balanced_accuracy"] > rows.loc["mri", "balanced_accuracy"]

    fused = paper_store.read_table("ensemble_predictions")
    primary = fused[fused["ensemble_id"] == rows.loc["pruned", "id"]]
    assert set(primary["split"]) == {"oof", "val"}
    assert (primary["split"] == "val").sum() == 12 and (primary["split"] == "oof").sum() == 100
    assert np.allclose(primary[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-5)
    assert primary.loc[primary["split"] == "val", "label"].isna().all()

    out = capsys.readouterr().out
    assert "* pruned" in out and "wsi-mag2.5" in out and "nested" in out

    # A rerun replaces its rows, it does not append them.
    fuse_store(paper_store.url, cfg, ablations=True)
    assert len(paper_store.read_table("ensembles")) == len(ens)
    assert len(paper_store.read_table("ensemble_predictions")) == len(fused)


def test_fuse_is_deterministic(tmp_path):
    store = make_prediction_store(tmp_path / "s", n_cases=60, n_val=0, seed=2)
    cfg = FusionConfig(method="greedy", **FAST)
    a = fuse_store(store.url, cfg).drop(columns=["created"])
    b = fuse_store(store.url, cfg).drop(columns=["created"])
    pd.testing.assert_frame_equal(a, b)
    other = fuse_store(store.url, cfg.model_copy(update={"seed": 1})).drop(columns=["created"])
    assert not other["weights"].equals(a["weights"])  # the seed draws the greedy bags


def test_an_ensembles_table_of_another_schema_is_one_rebuild_error(tmp_path):
    from radpath_fs.errors import StoreError
    from radpath_fs.layout import ENSEMBLES_TABLE

    store = make_prediction_store(tmp_path / "s", n_cases=40, n_val=0, seed=2)
    store.write_table(ENSEMBLES_TABLE, pd.DataFrame({"id": ["x"], "experiment": ["x"]}))
    with pytest.raises(StoreError, match="another schema than this radpath_fs writes; rebuild the store"):
        fuse_store(store.url, FusionConfig(method="soft_vote", **FAST))
    assert list(store.read_table(ENSEMBLES_TABLE).columns) == ["id", "experiment"]  # left as it was


def test_a_later_fuse_run_takes_primary_from_the_older_ones(tmp_path, capsys):
    """prune=2 then prune=3 write two `pruned` rows (different ids): only the latest stays primary,
    and the report, the run summary and `bundle` all take that one."""
    from radpath_fs.bundle.export import choose_ensemble
    from radpath_fs.fusion.cli import primary_id
    from radpath_fs.pipeline import summary
    from radpath_fs.report import ensembles_section

    store = make_prediction_store(tmp_path / "s", n_cases=40, n_val=0, seed=4)
    fuse_store(store.url, FusionConfig(prune=2, **FAST))
    fuse_store(store.url, FusionConfig(prune=3, **FAST))
    ens = store.read_table("ensembles")
    pruned = ens[ens["experiment"] == "pruned"]
    assert len(pruned) == 2 and ens["primary"].sum() == 1
    latest = pruned.sort_values("created")["id"].iloc[-1]
    assert ens.loc[ens["primary"], "id"].item() == latest == primary_id(ens) == choose_ensemble(store, None)["id"]
    assert ens.loc[ens["primary"], "n_members"].item() == 7  # 10 candidates, prune=3
    assert ensembles_section(ens).count("★") == 1
    capsys.readouterr()
    summary(store, tmp_path / "report" / "index.html")
    assert capsys.readouterr().err.count("* pruned") == 1
    # A table written before older flags were cleared: the readers still star only the latest.
    assert primary_id(ens.assign(primary=True)) == latest
    assert ensembles_section(ens.assign(primary=True)).count("★") == 1


def test_fuse_config_errors(tmp_path):
    store = make_prediction_store(tmp_path / "s", n_cases=40, n_val=0, seed=3)
    with pytest.raises(ConfigError, match="prune=10 would drop all 10"):
        fuse_store(store.url, FusionConfig(prune=10, **FAST))
    with pytest.raises(ConfigError, match="outer_folds"):
        fuse_store(store.url, FusionConfig(outer_folds=50, **FAST))


def test_fuse_plots(paper_store, tmp_path):
    fuse_store(paper_store.url, FusionConfig(**FAST), plots=tmp_path / "plots")
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["pruned-ao-scatter.png", "pruned-confusion.png", "pruned-probability-histograms.png"]
    for p in (tmp_path / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import json, sys
        from radpath_fs.cli import app
        try:
            app({args!r}, standalone_mode=False)
        finally:
            heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'sklearn', 'xgboost', 'matplotlib', 'timm', 'monai'}})
            print('MODULES=' + json.dumps(heavy))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RADPATH_PROGRESS": "0"},
    )


def _modules(proc) -> list[str]:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES=")][-1]
    return json.loads(line[len("MODULES=") :])


def test_cli_fuse_never_imports_torch(paper_store):
    proc = _run_cli(["fuse", "--store", paper_store.url, "--ablations"])
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in _modules(proc)
    assert "stacked-lr" in proc.stdout
    # The paper's default needs neither scikit-learn nor matplotlib: imports stay lazy.
    proc = _run_cli(["fuse", "--store", paper_store.url])
    assert proc.returncode == 0, proc.stderr
    assert _modules(proc) == []


def test_cli_fuse_bad_input_exits_2(tmp_path):
    from typer.testing import CliRunner

    from radpath_fs.cli import app

    t = _table()
    bad = _replace(t, "prob_G", pa.array(np.array(t.column("prob_G")) + 0.5, pa.float32()))
    store = _store(tmp_path, bad)
    res = CliRunner().invoke(app, ["fuse", "--store", store.url])
    assert res.exit_code == 2
    assert "m1--oof.parquet" in res.output and "do not sum to 1" in res.output
    res = CliRunner().invoke(app, ["fuse", "--store", store.url, "--method", "magic"])
    assert res.exit_code == 2 and "--method" in res.output


def test_fused_predictions_parquet_schema(paper_store):
    fuse_store(paper_store.url, FusionConfig(method="soft_vote", **FAST))
    path = paper_store.path("tables", "ensemble_predictions.parquet")
    schema = pq.read_schema(path)
    assert schema.field("prob_A").type == pa.float32()
    assert schema.field("pred").type == pa.string()
    ens = pq.read_table(paper_store.path("tables", "ensembles.parquet"))
    assert ens.schema.field("members").type == pa.list_(pa.string())


def test_simulated_tables_follow_the_contract():
    tables, cases = simulate_tables(n_cases=20, n_val=3, folds=2)
    assert len(tables) == 10 * 2 * 2 and len(cases) == 23
