"""`radpath run` end to end (the session's `finished` demo run), the rerun that skips everything, and
the report opened in headless Chromium (images must load; a screenshot is kept in artifacts/)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from radpath_fs.layout import REPORT_DIR, REPORT_INDEX, model_weights_path, prediction_table_name
from radpath_fs.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def run(finished):
    return finished.cfg, finished.store, finished.timings


def test_every_step_ran_and_wrote_its_outputs(run):
    cfg, store, timings = run
    for step in ("synth", "ingest", "tile", "embed", "predict", "fuse", "report"):
        assert step in timings, step
    cases, synth = store.cases(), cfg.data.synth
    assert len(cases) == synth.cases + synth.unlabelled and cases["label"].isna().sum() == synth.unlabelled
    assert len(store.read_table("tiles")) > 0
    folds = sorted(cases.loc[cases["fold"] >= 0, "fold"].unique())
    for mag in cfg.wsi.magnifications:
        for fold in folds:
            for epoch in cfg.wsi.snapshot_epochs():
                model_id = f"wsi-mag{mag:g}-fold{fold}-e{epoch}"
                assert store.exists(model_weights_path(model_id))
                assert store.has_table(prediction_table_name(model_id, "oof"))
    for fold in folds:
        for epoch in cfg.mri.snapshot_epochs():
            assert store.has_table(prediction_table_name(f"mri-fold{fold}-e{epoch}", "oof"))
            assert store.has_table(prediction_table_name(f"mri-fold{fold}-e{epoch}", "val"))
    ens = store.read_table("ensembles")
    assert ens["primary"].sum() == 1
    assert {"mri", "wsi", "all", "pruned", "selected", "stacked-lr"} <= set(ens["experiment"])
    assert set(ens.loc[ens["experiment"] == "mri", "members"].iloc[0]) == {f"mri-e{e}" for e in cfg.mri.snapshot_epochs()}
    assert (Path(cfg.store) / REPORT_DIR / REPORT_INDEX).exists()


def test_rerun_skips_every_step(run):
    cfg, store, _ = run
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.store).rglob("*.parquet")}
    assert run_pipeline(cfg) == {}
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.store).rglob("*.parquet")}
    assert after == before


def test_query_sees_every_view(run):
    from radpath_fs.query import query

    cfg, store, _ = run
    df = query(cfg.store, "SELECT modality, count(DISTINCT model_id) AS n FROM predictions GROUP BY 1 ORDER BY 1")
    assert df.column("modality").to_pylist() == ["mri", "wsi"]
    assert min(df.column("n").to_pylist()) > 0
    assert query(cfg.store, "SELECT count(*) AS n FROM ensembles").column("n")[0].as_py() > 0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the report test: `make test` installs Debian's chromium")


def test_report_opens_in_headless_chromium_with_every_image_loaded(run, tmp_path):
    cfg, store, _ = run
    page = Path(cfg.store) / REPORT_DIR / REPORT_INDEX
    html = page.read_text()
    n_images = len(re.findall(r"<img ", html))
    assert n_images >= 6 and "http://" not in html and "https://" not in html  # self-contained
    for section in ("Cohort", "Tiles (Fig. 4)", "Models (out-of-fold", "Ensembles and ablations", "Fig. 5a",
                    "Fig. 5b", "Confusion matrix", "tile contributions"):
        assert section in html, section
    # A copy of the page reports each image's naturalWidth into its title once everything has loaded.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace(
        "</body>",
        "<script>window.addEventListener('load', () => { document.title = 'WIDTHS=' + "
        "JSON.stringify([...document.images].map(i => i.complete ? i.naturalWidth : 0)); });</script></body>"))
    chrome = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=10000"]
    dom = subprocess.run([chrome, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"WIDTHS=(\[[^<]*\])", dom.stdout)
    assert m, dom.stderr[-2000:]
    widths = json.loads(m.group(1))
    assert len(widths) == n_images and all(w > 0 for w in widths), widths
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    subprocess.run([chrome, *flags, "--window-size=1280,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_tile_contributions_sum_to_the_logit_through_a_standardising_linear_head():
    import numpy as np
    import torch

    from radpath_fs.mil import PooledHead
    from radpath_fs.report import tile_contributions

    torch.manual_seed(0)
    head = PooledHead(16, 3, hidden=[], dropout=0.5).eval()
    # A feature mean far from 0 (as head mode's `wsi.head.standardize` sets from the training bags):
    # sharing out g * z instead of g * (z - mu) would put the g * mu offset on the tiles.
    mu = torch.rand(16) + 2.0
    head.set_standardization(mu, torch.rand(16) + 0.5)
    emb = torch.randn(40, 16) + mu
    contrib = tile_contributions(head, emb.numpy())
    assert contrib.shape == (40, 3)
    with torch.no_grad():
        logits = head(emb)[0]
    bias = head.classifier[-1].bias.detach()
    np.testing.assert_allclose(contrib.sum(0), (logits - bias).numpy(), rtol=1e-4, atol=1e-4)
    # The max half goes only to tiles that won a feature's max: a tile below every other on every
    # feature gets its mean-half share and nothing else.
    emb2 = torch.cat([emb, (emb.min(0).values - 1)[None]])
    c2 = tile_contributions(head, emb2.numpy())
    g = torch.autograd.functional.jacobian(lambda v: head.classify(v[None])[0], head.pool(emb2[None])[0])
    np.testing.assert_allclose(c2[-1], ((emb2[-1] - mu) @ g[:, 16:].T / len(emb2)).numpy(), rtol=1e-4, atol=1e-6)


def test_a_run_prints_each_warning_once(capsys):
    """`radpath run` reads the same predictions in fuse, report and summary: one warning each."""
    from radpath_fs.progress import each_warning_once, warn

    with each_warning_once():
        warn("3 OOF case(s) lack a prediction")
        with each_warning_once():  # nested steps share the outer run's memory
            warn("3 OOF case(s) lack a prediction")
        warn("member m has no OOF rows")
    warn("3 OOF case(s) lack a prediction")  # outside a run every call prints
    err = capsys.readouterr().err
    assert err.count("lack a prediction") == 2 and err.count("no OOF rows") == 1, err


def test_a_changed_training_setting_retrains_and_predicts_again(run, tmp_path):
    """Another `wsi.lr`: the slide models train again and their predictions are redone; the MRI
    models, trained with unchanged settings, are skipped as up to date."""
    cfg, store, _ = run
    copy = tmp_path / "store"
    shutil.copytree(cfg.store, copy)
    changed = cfg.model_copy(update={"wsi": cfg.wsi.model_copy(update={"lr": cfg.wsi.lr * 10})})
    tables = {p.name: p.stat().st_mtime_ns for p in (copy / "tables" / "predictions").glob("*.parquet")}
    timings = run_pipeline(changed, store=str(copy))
    folds = sorted(store.cases().query("fold >= 0")["fold"].unique())
    trained = {f"train-wsi mag {mag:g} fold {f}" for mag in cfg.wsi.magnifications for f in folds}
    assert set(timings) == {*trained, "predict", "fuse", "report"}
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "tables" / "predictions").glob("*.parquet")}
    assert after.keys() == tables.keys()
    assert {n for n in after if after[n] != tables[n]} == {n for n in tables if n.startswith("wsi-")}
    assert run_pipeline(changed, store=str(copy)) == {}
