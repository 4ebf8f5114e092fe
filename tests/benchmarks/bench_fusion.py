"""Fusion benchmarks (`make bench`): subset search speed and `radpath fuse --ablations` wall time.

Targets (issue 7): every subset of 10 models x 256 cases scored (soft vote + the metrics) in under
1 s; `radpath fuse --ablations` on such a store in under 3 s of wall time, Python start-up
included. Wall times depend on how busy the machine is: each figure is the best of several runs,
and the CPU time of the command is printed beside it.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/fusion_data.py

from fusion_data import make_prediction_store  # noqa: E402

from radpath_fs.fusion import ExhaustiveSearch, GreedySelection, all_subsets, evaluate_subsets  # noqa: E402
from radpath_fs.metrics import METRICS  # noqa: E402

N_MODELS, N_CASES = 10, 256


def _best_of(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def _probabilities(n_cases: int, n_models: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n_cases, p=[0.24, 0.16, 0.60])
    logits = 1.5 * np.eye(3)[y][:, None, :] + rng.normal(size=(n_cases, n_models, 3))
    P = np.exp(logits)
    return P / P.sum(axis=2, keepdims=True), y


def test_bench_all_subsets():
    P, y = _probabilities(N_CASES, N_MODELS)
    masks = all_subsets(N_MODELS)
    res = evaluate_subsets(P, y, masks, metrics=METRICS)
    assert all(len(v) == len(masks) == 2**N_MODELS - 1 for v in res.values())
    best, median = _best_of(lambda: evaluate_subsets(P, y, all_subsets(N_MODELS), metrics=METRICS), 7)
    print(
        f"\n[bench] all {len(masks)} non-empty subsets of {N_MODELS} models x {N_CASES} cases, soft vote + "
        f"{', '.join(METRICS)} + log loss: best {best * 1e3:.1f} ms, median {median * 1e3:.1f} ms (target < 1000 ms)"
    )
    fit_best, _ = _best_of(lambda: ExhaustiveSearch().fit(P, y), 5)
    print(f"[bench] ExhaustiveSearch.fit, {N_MODELS} candidates: {fit_best * 1e3:.1f} ms")
    P16, y16 = _probabilities(N_CASES, 16)
    big, _ = _best_of(lambda: ExhaustiveSearch().fit(P16, y16), 2)
    print(f"[bench] ExhaustiveSearch.fit, 16 candidates ({2**16 - 1} subsets): {big:.2f} s")
    greedy, _ = _best_of(lambda: GreedySelection().fit(P, y), 5)
    print(f"[bench] GreedySelection.fit (20 bags x 25 steps), {N_MODELS} candidates: {greedy * 1e3:.1f} ms")
    assert best < 1.0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_prediction_store(
        tmp_path_factory.mktemp("bench") / "store", n_cases=N_CASES, n_val=32, seed=0
    )


def _radpath() -> list[str]:
    exe = Path(sys.executable).with_name("radpath")
    return [str(exe)] if exe.exists() else [shutil.which("radpath") or "radpath"]


def test_bench_fuse_ablations(store):
    cmd = [*_radpath(), "fuse", "--store", store.url, "--ablations"]
    env = {**os.environ, "RADPATH_PROGRESS": "0"}
    walls, cpus = [], []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        assert proc.returncode == 0, proc.stderr
    assert "stacked-lr" in proc.stdout and "* pruned" in proc.stdout
    print(
        f"\n[bench] `{' '.join(cmd[-4:])}` ({N_MODELS} candidates x 5 fold models, {N_CASES} OOF cases, "
        f"13 experiments incl. nested CV and 1000 bootstrap resamples each): wall best {min(walls):.2f} s, "
        f"median {statistics.median(walls):.2f} s; CPU (user+sys) best {min(cpus):.2f} s (target < 3 s wall)"
    )
    load = os.getloadavg()[0]
    print(f"[bench] 1-minute load average during the run: {load:.1f} on {os.cpu_count()} CPU(s)")
    assert min(walls) < 3.0
