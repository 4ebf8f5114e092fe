"""Security: nothing escapes the store, nothing is unpickled.

- Case ids and store locations cannot climb out of the store (`..`, absolute paths), and radpath
  writes and deletes nothing through a symbolic link inside a store (a link planted in tables/,
  tiles.zarr or mri.zarr is refused, and what it points at is left as it was).
- Checkpoints and training states are safetensors only: a pickle is refused with a message before
  a byte of it is unpickled (its payload would leave a marker file). Embedder --weights may also be
  a .pth state dict, read by torch's restricted (weights_only) unpickler, which refuses the payload.

Two more guarantees are tested with the module that gives them: pipeline YAML is safe-loaded
(test_config.py) and `radpath query` only reads (test_query.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_checks import exits_2_with, invoke
from test_ingest import snapshot
from test_tile import case_row, make_store, synthetic_slide

from radpath_fs.errors import InputError, StoreError
from radpath_fs.layout import (
    CASES_TABLE,
    LOCK_NAME,
    MODELS,
    MRI_ZARR,
    TABLES,
    TILES,
    model_config_path,
    model_dir,
    table_path,
)
from radpath_fs.store import Store


class Payload:
    """Unpickling this creates `marker`: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the store with a file in it, for links to point at."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("do not touch\n")
    return d


# ---- locations cannot climb out of the store ---------------------------------------------------
@pytest.mark.parametrize("rel", ["../escape.json", "tables/../../escape.json", "/tmp/escape.json"])
def test_store_locations_cannot_escape(tmp_path, rel):
    st = Store(tmp_path / "store", create=True)
    with pytest.raises(StoreError, match="not a location inside the store"):
        st.write_json(rel, {"x": 1})
    with pytest.raises(StoreError, match="not a location inside the store"):
        st.local_path(TILES, rel)
    with pytest.raises(StoreError, match="not safe as a path component"):
        st.fresh_group(TILES, f"{rel}/20")
    assert not (tmp_path / "escape.json").exists()


def test_ids_from_the_command_line_cannot_escape(tmp_path):
    st = Store(tmp_path / "store", create=True)
    before = snapshot(tmp_path)
    for model in ("../../x", "/etc/passwd", "..", "a/../../b"):
        exits_2_with(invoke(["predict", "--store", st.root, "--model", model]), f"model id {model!r} is not safe")
    assert snapshot(tmp_path) == before


# ---- links -------------------------------------------------------------------------------------
@pytest.mark.parametrize("link", [TABLES, table_path(CASES_TABLE), MODELS, model_dir("m1")])
def test_no_write_through_a_link_in_the_store(tmp_path, outside, link):
    st = Store(tmp_path / "store", create=True)
    at = tmp_path / "store" / link
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(outside / "precious.txt" if link.endswith(".parquet") else outside)
    before = snapshot(outside)
    with pytest.raises(StoreError, match=f"{link}: is a symbolic link"):
        if link.startswith(TABLES):
            st.write_table(CASES_TABLE, pd.DataFrame({"case_id": ["b"]}))
        else:
            st.write_json(model_config_path("m1"), {"model_id": "m1"})
    assert snapshot(outside) == before


@pytest.mark.parametrize("link", [TILES, f"{TILES}/C1", f"{TILES}/C1/20"])
def test_zarr_writes_and_deletes_do_not_follow_links(tmp_path, outside, link):
    st = Store(tmp_path / "store", create=True)
    if link != TILES:
        st.fresh_group(TILES, "C0/20").attrs["complete"] = True  # a real group beside the link
    (tmp_path / "store" / link).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "store" / link).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(StoreError, match="is a symbolic link"):
        st.fresh_group(TILES, "C1/20")  # a rewrite deletes what is there first
    assert snapshot(outside) == before
    if link != TILES:  # reading and writing beside the link still works
        assert st.group_is_complete(TILES, "C0/20")
        st.fresh_group(TILES, "C2/20").attrs["complete"] = True


def test_mri_cache_does_not_write_through_a_link(tmp_path, outside):
    from radpath_fs.mri.preprocess import write_cached

    st = Store(tmp_path / "store", create=True)
    write_cached(st, "C0", np.zeros((4, 4, 4, 4), np.float16), {})
    (tmp_path / "store" / MRI_ZARR / "C1").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(StoreError, match=r"mri.zarr/C1: is a symbolic link"):
        write_cached(st, "C1", np.ones((4, 4, 4, 4), np.float16), {})
    assert snapshot(outside) == before


def test_cli_refuses_a_linked_tile_group_and_leaves_its_target_alone(tmp_path, outside):
    slide = synthetic_slide(tmp_path / "s.tif", size=(512, 512), mpp=0.5)
    st = make_store(tmp_path / "store", [case_row("C1", slide, 0.5)])
    st.open_zarr(TILES)
    (tmp_path / "store" / TILES / "C1").symlink_to(outside, target_is_directory=True)
    before, store_before = snapshot(outside), snapshot(tmp_path / "store")
    exits_2_with(invoke(["tile", "--store", st.root, "--mags", "20"]), "tiles.zarr/C1: is a symbolic link")
    assert snapshot(outside) == before
    assert snapshot(tmp_path / "store") == store_before and not (tmp_path / "store" / LOCK_NAME).exists()


def test_report_does_not_write_through_a_linked_report_folder(tmp_path, outside):
    st = Store(tmp_path / "store", create=True)
    st.write_table("cases", pd.DataFrame({"case_id": ["a"], "label": ["A"], "split": ["train"], "fold": [0],
                                          "cohort": [None], "has_slide": [False], "has_mri": [False],
                                          "excluded": [False], "age_in_days": [1.0]}))
    (tmp_path / "store" / "report").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    exits_2_with(invoke(["report", "--store", st.root]), "report: is a symbolic link")
    assert snapshot(outside) == before


def test_the_store_folder_itself_may_be_a_link(tmp_path):
    real = tmp_path / "disk" / "store"
    real.mkdir(parents=True)
    (tmp_path / "store").symlink_to(real, target_is_directory=True)
    st = Store(tmp_path / "store", create=True)
    st.write_table(CASES_TABLE, pd.DataFrame({"case_id": ["a"]}))
    st.fresh_group(TILES, "a/20").attrs["complete"] = True
    assert (real / table_path(CASES_TABLE)).is_file() and st.group_is_complete(TILES, "a/20")


# ---- nothing is unpickled ----------------------------------------------------------------------
def test_a_pickled_checkpoint_is_refused_unopened(tmp_path):
    import torch

    marker = tmp_path / "unpickled"
    st = Store(tmp_path / "store", create=True)
    st.write_json(model_config_path("wsi-mag20-fold0-e0"), {"model_id": "wsi-mag20-fold0-e0", "modality": "wsi",
                                                             "fold": 0, "snapshot": 0, "magnification": 20})
    path = tmp_path / "store" / "models" / "wsi-mag20-fold0-e0" / "model.safetensors"
    for writer in (lambda p: p.write_bytes(pickle.dumps(Payload(marker))),
                   lambda p: torch.save({"w": torch.zeros(1), "x": Payload(marker)}, p)):
        writer(path)
        before = snapshot(tmp_path / "store")
        exits_2_with(invoke(["predict", "--store", st.root, "--model", "wsi-mag20-fold0-e0", "--device", "cpu"]),
                     str(path), "is a pickle/torch.save file; radpath loads safetensors only")
        assert snapshot(tmp_path / "store") == before
    assert not marker.exists()


def test_a_pickled_training_state_is_refused(tmp_path):
    from radpath_fs.layout import state_path
    from radpath_fs.training import load_state

    marker = tmp_path / "unpickled"
    st = Store(tmp_path / "store", create=True)
    st.write_bytes(state_path("mri-fold0"), pickle.dumps(Payload(marker)))
    with pytest.raises(InputError, match="is a pickle"):
        load_state(st, "mri-fold0")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.pth", "evil.pt", "evil.bin", "evil.safetensors"])
def test_pickled_weights_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    weights = tmp_path / name
    weights.write_bytes(pickle.dumps(Payload(marker)))
    st = Store(tmp_path / "store", create=True)
    before = snapshot(tmp_path / "store")
    # .pth/.pt/.bin go through torch's restricted unpickler, which refuses the payload's global
    words = ["is a pickle"] if name.endswith(".safetensors") else ["weights_only", "UnpicklingError"]
    exits_2_with(invoke(["embed", "--store", st.root, "--weights", weights, "--device", "cpu"]), str(weights), *words)
    assert not marker.exists() and snapshot(tmp_path / "store") == before
