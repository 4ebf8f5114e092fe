"""CPU benchmark (`make bench`): reading tiles back, zarr's own reader vs `TileReader`, same store.

Two access patterns over 2 cases x 256 synthetic 512 px tiles, zstd and JPEG stores:
- sequential 224 px center crops in batches of 64 (what `radpath embed` reads);
- 50 random tiles per bag (what finetune training and the inference protocol sample).
Sizes: RADPATH_BENCH_READER_TILES (per case).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_embed import make_tile_store  # noqa: E402  (the same synthetic tiles as the embed benchmark)


def _rate(read, ids) -> float:
    t0 = time.perf_counter()
    n = sum(read(c) for c in ids)
    return n / (time.perf_counter() - t0)


@pytest.mark.parametrize("codec", ["zstd", "jpeg"])
def test_tile_reader_vs_zarr(tmp_path, codec):
    from radpath_fs.normstats import tile_pixels
    from radpath_fs.tilestore import TileReader

    tiles = int(os.environ.get("RADPATH_BENCH_READER_TILES", "256"))
    store, ids = make_tile_store(tmp_path / codec, cases=2, tiles=tiles, tile_size=512, codec=codec)
    a, b, batch = 144, 368, 64
    picks = {c: np.random.default_rng(i).integers(0, tiles, 50) for i, c in enumerate(ids)}

    def zarr_crops(c):
        px = tile_pixels(store, c, 20)
        return sum(px[s : s + batch, a:b, a:b].shape[0] for s in range(0, tiles, batch))

    def reader_crops(c):
        r = TileReader(store, c, 20)
        return sum(r.read(slice(s, s + batch), (a, b)).shape[0] for s in range(0, tiles, batch))

    def zarr_random(c):
        uniq, inverse = np.unique(picks[c], return_inverse=True)
        return np.asarray(tile_pixels(store, c, 20).oindex[uniq])[inverse].shape[0]

    def reader_random(c):
        return TileReader(store, c, 20).read(picks[c]).shape[0]

    res = {
        name: round(max(_rate(fn, ids) for _ in range(2)), 1)
        for name, fn in [("zarr_crops", zarr_crops), ("reader_crops", reader_crops),
                         ("zarr_random", zarr_random), ("reader_random", reader_random)]
    }
    res.update(codec=codec, cpu_cores=os.cpu_count(), load_avg_1m=os.getloadavg()[0])
    print(f"\ntile reader ({codec}):", json.dumps(res))
    pick = picks[ids[0]]  # the same pixels either way
    np.testing.assert_array_equal(TileReader(store, ids[0], 20).read(pick), tile_pixels(store, ids[0], 20)[:][pick])
    assert res["reader_random"] > res["zarr_random"], res
