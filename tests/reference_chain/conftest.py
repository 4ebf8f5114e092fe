"""`chain_reference`: a tiny synthetic cohort through the real chain (tests/chain_data.py), `sync`,
on a local folder. The remote-store and cluster tests rebuild it elsewhere and compare to it."""

import pytest


@pytest.fixture(scope="session")
def chain_reference(tmp_path_factory):
    """(cohort folder, store)."""
    from chain_data import run_chain, synth_data

    root = tmp_path_factory.mktemp("chain")
    data = synth_data(root / "data")
    return data, run_chain(str(root / "sync"), data)
