"""Shared test set-up. Fixtures that build data live in tests/helpers.py so test modules can import them."""

import os

# Progress bars draw only on a terminal; keep test logs plain either way.
os.environ.setdefault("RADPATH_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
