"""notebooks/ensemble_ablations.ipynb runs top to bottom on the session's finished demo store, without torch."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "ensemble_ablations.ipynb"


def test_notebook_executes_without_torch(finished, tmp_path, monkeypatch):
    store = finished.store
    monkeypatch.setenv("RADPATH_STORE", store.url)
    monkeypatch.setenv("RADPATH_BOOTSTRAP", "100")
    monkeypatch.setenv("RADPATH_PROGRESS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json, sys\n"
            "print('HEAVY=' + json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'monai'})))"
        )
    )
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    heavy = json.loads(text.split("HEAVY=")[1].splitlines()[0])
    assert heavy == []
    cfg, cases = finished.cfg, store.cases()
    candidates = len(cfg.wsi.magnifications) * len(cfg.wsi.snapshots) + len(cfg.mri.snapshots)
    assert f"{candidates} candidates, {cases['label'].notna().sum()} OOF cases" in text
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 3
    html = "".join(o.data.get("text/html", "") for o in outputs if o.output_type == "execute_result")
    for experiment in store.read_table("ensembles")["experiment"]:  # the ablations `radpath fuse` ran
        assert experiment in html, experiment
    unlabelled = cases.loc[cases["label"].isna(), "case_id"]
    assert len(unlabelled) and all(c in html for c in unlabelled)  # the unlabelled cases got fused predictions


def test_notebook_is_valid():
    nb = nbformat.reads(NOTEBOOK.read_text(), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert not any("import torch" in c.source for c in nb.cells)
