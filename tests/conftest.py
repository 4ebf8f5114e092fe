"""Shared test set-up. Fixtures that build data live in tests/helpers.py so test modules can import them."""

import os

import pytest

# Progress bars draw only on a terminal; keep test logs plain either way.
os.environ.setdefault("RADPATH_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def chain_reference(tmp_path_factory):
    """(cohort folder, store): a tiny synthetic cohort through the real chain, `sync`, on a local
    folder (tests/chain_data.py). The remote-store and cluster tests compare their stores to it."""
    from chain_data import run_chain, synth_data

    root = tmp_path_factory.mktemp("chain")
    data = synth_data(root / "data")
    return data, run_chain(str(root / "sync"), data)
