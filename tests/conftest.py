"""Suite-wide test set-up.

`make test` runs the suite on two pytest-xdist workers. A unit of work is a test file, or a whole
folder under tests/ (`tests/demo/`, `tests/reference_chain/`): such a folder's conftest holds a
session store that its files share, and a session fixture is built once per worker, so the files
that share it run on one worker.
"""

from __future__ import annotations

import os

import pytest

# Progress bars draw only on a terminal; keep test logs plain either way.
os.environ.setdefault("RADPATH_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# Each xdist worker is a process of its own: two of them with a torch thread per core each would
# oversubscribe the cores, and spinning OpenMP threads then run many times slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown to a pytest without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    # In collection order (tests/demo, the longest unit, first), not xdist's default of the units
    # with the most tests first: the long units then start at once and the short ones fill in.
    config.option.loadscopereorder = False

    class FilesAndFolders(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0].split("/")
            return "/".join(path[:2]) if len(path) > 2 else "/".join(path)

    return FilesAndFolders(config, log)
