"""Stage one, tiles: every slide read once, tiled at every magnification, background dropped.

For each case with a slide (`radpath tile`):

- the slide's level 0 (page 0) is opened with pyvips for *sequential* access and read in strips of
  whole tile rows, top to bottom: every level-0 pixel is decoded once, and memory holds a few
  strips, never a level (a 100k x 80k slide stays well under 2 GiB). A tiled TIFF is read one
  libvips call per strip; a strip TIFF (CPM's non-pyramidal slides) in one libvips evaluation;
- the finest requested magnification is level 0 itself when the slide's µm/px matches it (within
  ``mpp_tolerance``), a libvips reduce when it is an integer multiple, or a libvips resize
  otherwise; each coarser magnification is a libvips reduce (lanczos3 by default) of a finer one,
  computed strip by strip on k-aligned rows with enough margin for the kernel, so the pixels are
  exactly those of reducing the whole level (`downsample`). Magnifications finer than the slide
  are skipped, never upsampled;
- non-overlapping full tiles only; the background rule is exact: a tile is background when at
  least ``background_fraction`` of its pixels have R, G and B all > ``background_threshold``;
- kept tiles stream into ``tiles.zarr/<case>/<mag>`` (`radpath_fs.tilestore`), marked complete last.

One Dask task per slide (`map_tasks`), all magnifications from one open; results are the same
under every scheduler. `tables/tiles.parquet` is rebuilt from the complete groups by the client
once every task is done (one writer), and `report/tile_counts.png` is the paper's Fig. 4.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from radpath_fs.config import TileConfig, mag_to_mpp
from radpath_fs.errors import InputError, RadpathError
from radpath_fs.layout import TILE_COUNTS_PNG, TILE_ERRORS_TABLE, TILES, TILES_TABLE
from radpath_fs.progress import info, warn
from radpath_fs.scheduler import map_tasks
from radpath_fs.store import Store, mag_key
from radpath_fs.tilestore import (  # noqa: F401  (re-exported: the public tile API lives here)
    JpegCodec,
    TileGroupWriter,
    read_coords,
    read_tiles,
    read_tissue_fraction,
    remove_group,
    tile_count,
    tile_group_attrs,
    tile_group_path,
    write_tile_group,
)

if TYPE_CHECKING:
    import pyvips

# Threads per slide that compress tiles (zstd and libjpeg release the GIL) while the slide is read.
# Compressing is the largest cost after decoding, so one thread would be the bottleneck on a
# machine with cores to spare. Env RADPATH_TILE_WRITER_THREADS overrides.
WRITER_THREADS = int(os.environ.get("RADPATH_TILE_WRITER_THREADS") or 0) or min(4, os.cpu_count() or 1)


# ---- opening a slide ---------------------------------------------------------------------------
def _vips_problem(err: Exception) -> str:
    """The useful line of a libvips error (its first line only says which call failed)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else "libvips error"
    return detail.split(": ", 1)[1] if detail.startswith("Vips") and ": " in detail else detail


def open_slide(path: str | os.PathLike, access: str = "sequential") -> pyvips.Image:
    """Level 0 (page 0) of a slide as a lazy pyvips image, RGB uchar.

    Decoding problems found later (a truncated or corrupt tile) raise instead of turning into
    grey pixels (``fail_on="error"``). Raises `InputError` naming the file for a missing, empty,
    unreadable or non-image file.
    """
    import pyvips

    path = Path(path)
    if not path.exists():
        raise InputError(path, "slide file does not exist")
    if not path.is_file():
        raise InputError(path, "slide path is not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "slide file is empty (0 bytes)")
    try:
        image = pyvips.Image.new_from_file(str(path), access=access, fail_on="error")
    except pyvips.Error as e:
        raise InputError(path, f"unreadable slide: {_vips_problem(e)}") from None
    try:
        return _as_rgb(image)
    except pyvips.Error as e:
        raise InputError(path, f"cannot convert the slide to RGB: {_vips_problem(e)}") from None


def _as_rgb(image: pyvips.Image) -> pyvips.Image:
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.bands < 3:
        image = image.colourspace("srgb")
    if image.format != "uchar":
        image = image.cast("uchar", shift=image.format in ("ushort", "short"))
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    return image


# ---- the magnification plan --------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One magnification of one slide: how its pixels are made from level 0."""

    magnification: float
    mpp: float  # µm/px of the level's pixels (the slide's, times the reduce factors)
    width: int
    height: int
    parent: float | None  # magnification this level is reduced from; None: a root, made from level 0
    factor: int  # integer reduce factor from the parent (1 for a root)
    root_shrink: int  # roots: integer reduce of level 0 (1 = level 0 itself); 0 when resized
    root_scale: float  # roots: level-0 px per level px


def _near_int(ratio: float, tolerance: float) -> int | None:
    k = max(1, round(ratio))
    return k if abs(ratio - k) <= tolerance * k else None


def plan_levels(
    native_mpp: float, width: int, height: int, magnifications: list[float], tolerance: float
) -> tuple[list[Level], list[tuple[float, str]]]:
    """Levels to build, finest first, and the (magnification, reason) pairs skipped.

    A level derives from the coarsest finer level it is an integer multiple of (2x reduces for
    40/20/10/5/2.5); else it is a root made from level 0, which costs its own pass over the slide.
    """
    levels: list[Level] = []
    skipped: list[tuple[float, str]] = []
    for mag in sorted({float(m) for m in magnifications}, reverse=True):
        target = mag_to_mpp(mag)
        ratio0 = target / native_mpp
        if ratio0 < 1 - tolerance:
            skipped.append(
                (mag, f"{mag_key(mag)}x ({target:.3g} µm/px) is finer than the slide ({native_mpp:.3g} µm/px)")
            )
            continue
        parent = None
        for lv in reversed(levels):
            k = _near_int(target / mag_to_mpp(lv.magnification), tolerance)
            if k is not None and k >= 2:
                parent = (lv, k)
                break
        if parent is not None:
            lv, k = parent
            levels.append(Level(mag, lv.mpp * k, lv.width // k, lv.height // k, lv.magnification, k, 0, 0.0))
            continue
        # Within the tolerance below native is native: never upsample.
        k0 = 1 if ratio0 <= 1 else _near_int(ratio0, tolerance)
        if k0 is not None:
            levels.append(Level(mag, native_mpp * k0, width // k0, height // k0, None, 1, k0, float(k0)))
        else:
            w, h = max(1, round(width / ratio0)), max(1, round(height / ratio0))
            levels.append(Level(mag, native_mpp * width / w, w, h, None, 1, 0, ratio0))
        if levels[-1].width < 1 or levels[-1].height < 1:
            levels.pop()
            skipped.append((mag, f"{mag_key(mag)}x leaves less than one pixel"))
    return levels, skipped


# Half-width of each libvips reduce kernel, in output pixels.
KERNEL_SUPPORT = {"linear": 1, "cubic": 2, "mitchell": 2, "lanczos2": 2, "lanczos3": 3}


def downsample(image: pyvips.Image, k: int, kernel: str = "lanczos3") -> pyvips.Image:
    """A level k times coarser: libvips reduce of the largest k-multiple crop (floor(W/k) x floor(H/k)).

    Cropping first keeps the ratio exactly k (libvips otherwise rounds the output size and
    stretches the sampling grid to fit), so k-aligned strips with a few rows of margin give the
    same pixels as the whole level: this is the definition the streaming tiler reproduces.
    """
    w, h = image.width // k * k, image.height // k * k
    if (w, h) != (image.width, image.height):
        image = image.crop(0, 0, w, h)
    return image.reduce(k, k, kernel=kernel)


def _root_image(slide: pyvips.Image, root: Level, kernel: str) -> pyvips.Image:
    if root.root_shrink == 1:
        return slide
    if root.root_shrink > 1:
        return downsample(slide, root.root_shrink, kernel)
    # A non-integer ratio to level 0: libvips resize, sized to the plan.
    return slide.resize(root.width / slide.width, vscale=root.height / slide.height, kernel=kernel)


# ---- the background rule -----------------------------------------------------------------------
def background_counts(row: np.ndarray, threshold: int, block: int = 64) -> np.ndarray:
    """Per tile of a (T, W, 3) tile row: how many pixels have R, G and B all > threshold.

    Works `block` image rows at a time, so temporaries stay a few MB on a 100k px wide row.
    """
    T = row.shape[0]
    W = row.shape[1] // T * T
    # Bright pixels per column, summed down the rows first: adding whole rows is one vectorised
    # pass, where summing along each tile's 512 px of a row is a slow strided reduction.
    column = np.zeros(W, dtype=np.uint16 if T <= np.iinfo(np.uint16).max else np.uint32)
    darkest = np.empty((min(block, T), W), dtype=np.uint8)
    for y in range(0, T, block):
        v = row[y : y + block, :W]
        d = darkest[: v.shape[0]]
        # all(R, G, B > t) == min(R, G, B) > t: two strided passes instead of three
        np.minimum(v[..., 0], v[..., 1], out=d)
        np.minimum(d, v[..., 2], out=d)
        bright = np.greater(d, threshold, out=d.view(np.bool_))
        column += np.add.reduce(bright, axis=0, dtype=column.dtype)
    return column.reshape(-1, T).sum(axis=1, dtype=np.int64)


def is_background(counts: np.ndarray, tile_size: int, fraction: float) -> np.ndarray:
    """The exact rule: background when >= `fraction` of the tile's pixels are bright."""
    return np.asarray(counts, dtype=np.float64) >= fraction * tile_size * tile_size


# ---- streaming one slide -----------------------------------------------------------------------
class _LevelCutter:
    """Collects a level's rows strip by strip, cuts each full tile row, sends kept tiles on."""

    def __init__(self, level: Level, cfg: TileConfig, writer: TileGroupWriter | None):
        self.level = level
        self.cfg = cfg
        self.writer = writer
        self.T = cfg.tile_size
        self.rows: list[np.ndarray] = []
        self.buffered = 0
        self.y = 0  # level row of the next tile row
        self.tile_rows = level.height // self.T
        self.cols = level.width // self.T

    def feed(self, rows: np.ndarray, transient: bool = False) -> None:
        """Take the level's next rows; `transient`: they are a reused buffer (a slide strip), so
        rows kept for the next call are copied."""
        if self.writer is None or rows.shape[0] == 0:
            return
        self.rows.append(rows)
        self.buffered += rows.shape[0]
        T = self.T
        while self.buffered >= T and self.y // T < self.tile_rows:
            block = self.rows[0] if self.rows[0].shape[0] >= T else np.concatenate(self.rows, axis=0)
            self._cut(block[:T])
            rest = block[T:]
            self.rows = [rest] if rest.shape[0] else []
            self.buffered = rest.shape[0]
            self.y += T
        if transient:
            self.rows = [r.copy() for r in self.rows]

    def _cut(self, row: np.ndarray) -> None:
        T, cols = self.T, self.cols
        if cols == 0:
            return
        row = row[:, : cols * T]
        counts = background_counts(row, self.cfg.background_threshold)
        keep = np.flatnonzero(~is_background(counts, T, self.cfg.background_fraction))
        if keep.size == 0:
            return
        # Views: the writer copies each tile once, into the shard it is building.
        grid = row.reshape(T, cols, T, 3).transpose(1, 0, 2, 3)
        tiles = [grid[i] for i in keep]
        coords = np.stack([keep * T, np.full(keep.size, self.y)], axis=1).astype(np.int64)
        fractions = (1.0 - counts[keep] / float(T * T)).astype(np.float32)
        self.writer.append(tiles, coords, fractions)


def _vips_rows(rows: np.ndarray, width: int) -> pyvips.Image:
    """A numpy (h, W, 3) uint8 block as a pyvips image of its first `width` columns, no copy."""
    import pyvips

    rows = rows if rows.flags.c_contiguous else np.ascontiguousarray(rows)
    image = pyvips.Image.new_from_memory(rows.data, rows.shape[1], rows.shape[0], 3, "uchar")
    return image if width == rows.shape[1] else image.crop(0, 0, width, rows.shape[0])


class _Reducer:
    """Streams a child level out of its parent's rows, strip by strip.

    Each call reduces a k-aligned run of parent rows with `margin` rows either side, enough for
    the kernel, so the rows it returns are exactly those of `downsample(parent, k)`; rows too close
    to the end of what has arrived wait, as a small copied tail, for the next strip. The strip
    itself is never copied: libvips reads it in place, joined under the tail.
    """

    def __init__(self, parent: Level, child: Level, kernel: str):
        self.k = child.factor
        self.kernel = kernel
        self.margin = self.k * (KERNEL_SUPPORT[kernel] + 2)
        self.height = parent.height // self.k * self.k  # the k-multiple crop of the parent
        self.width = parent.width // self.k * self.k
        self.out_height = self.height // self.k
        self.tail = np.zeros((0, self.width, 3), dtype=np.uint8)
        self.tail_start = 0  # parent row of tail[0]
        self.seen = 0  # parent rows received so far
        self.y = 0  # next child row to emit

    def feed(self, rows: np.ndarray) -> np.ndarray:
        k, m = self.k, self.margin
        take = max(0, min(rows.shape[0], self.height - self.seen))
        self.seen += rows.shape[0]
        new = rows[:take]
        have = self.tail_start + self.tail.shape[0] + take  # parent rows [tail_start, have) in hand
        end = self.out_height if have >= self.height else max(self.y, (have - m) // k)
        if end > self.y:
            parts = [_vips_rows(p, self.width) for p in (self.tail, new) if p.shape[0]]
            joined = parts[0] if len(parts) == 1 else parts[0].join(parts[1], "vertical")
            i0, i1 = max(0, self.y * k - m), min(self.height, end * k + m)
            part = joined.crop(0, i0 - self.tail_start, self.width, i1 - i0)
            small = part.reduce(k, k, kernel=self.kernel)
            out = np.ndarray((small.height, small.width, 3), dtype=np.uint8, buffer=small.write_to_memory())
            out = out[self.y - i0 // k : end - i0 // k]
            self.y = end
        else:
            out = np.zeros((0, self.width // k, 3), dtype=np.uint8)
        # Keep (a copy of) what the next rows will need: from end*k - margin on.
        keep = max(self.tail_start, max(0, self.y * k - m))
        in_tail = self.tail[keep - self.tail_start :]
        from_new = new[max(0, keep - self.tail_start - self.tail.shape[0]) :, : self.width]
        self.tail = np.concatenate([in_tail, from_new]) if in_tail.shape[0] else from_new.copy()
        self.tail_start = keep
        return out


def _strips(image: pyvips.Image, height: int, path: str, any_order: bool = False) -> Iterator[np.ndarray]:
    """Strips of `height` rows, top to bottom, decoded by libvips on a reader thread.

    The next strip decodes (libvips' own threads, GIL released) while this one is cut and written.
    A strip is only valid until the next one is asked for: libvips decodes into two reused
    buffers, so that no strip costs fresh pages (their page faults took ~8% of a pass's CPU).

    `any_order`: the source reads any rows at any time (a tiled TIFF), so each strip is its own
    libvips call, written straight into its buffer. Otherwise (a strip TIFF) the whole image is
    one libvips evaluation whose rows are copied into the strips as they come: a sequential reader
    drops its cache after each call, so a strip whose rows (or reduce margin) began in a TIFF strip
    already passed would fail "out of order", and random access would decode the whole slide to a
    temporary file first.
    """
    import pyvips

    out: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    # Two strips alive at most: the one being cut and the one being decoded (a 100k px wide
    # strip of 512 rows is 150 MB).
    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(None)  # allocated on first use

    def put(item) -> bool:
        """Hand `item` over unless the consumer has gone (then the reader just ends)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take() -> np.ndarray | None:
        """A free strip buffer, or None once the consumer has gone."""
        while True:
            try:
                buf = free.get(timeout=0.1)
                break
            except queue.Empty:
                if stop.is_set():
                    return None
        return np.empty((height, image.width, 3), dtype=np.uint8) if buf is None else buf

    def each_strip() -> bool:
        for y in range(0, image.height, height):
            h = min(height, image.height - y)
            buf = take()
            if buf is None:
                return False
            strip = buf[:h]
            image.crop(0, y, image.width, h).write(
                pyvips.Image.new_from_memory(strip.data, image.width, h, 3, "uchar")
            )
            if not put((buf, strip)):
                return False
        return True

    def one_pass() -> bool:
        row_bytes = image.width * 3
        buf, filled, y = None, 0, 0  # the strip being filled: its buffer, bytes in it, first row
        failure: list[BaseException] = []

        def fill(chunk) -> int:
            nonlocal buf, filled, y
            data = np.frombuffer(chunk, dtype=np.uint8)
            while data.size:
                if buf is None:
                    buf = take()
                    if buf is None:
                        return -1  # the consumer has gone: libvips ends the evaluation
                h = min(height, image.height - y)
                n = min(data.size, h * row_bytes - filled)
                buf.reshape(-1)[filled : filled + n] = data[:n]
                filled, data = filled + n, data[n:]
                if filled == h * row_bytes:
                    if not put((buf, buf[:h])):
                        return -1
                    buf, filled, y = None, 0, y + h
            return len(chunk)

        def on_write(chunk) -> int:
            try:
                return fill(chunk)
            except BaseException as e:  # pragma: no cover - a callback must not raise into libvips
                failure.append(e)
                return -1

        target = pyvips.TargetCustom()
        target.on_write(on_write)
        try:
            image.rawsave_target(target)
        except pyvips.Error:
            if failure:
                raise failure[0] from None
            if stop.is_set():
                return False
            raise
        return True

    def read() -> None:
        try:
            if (each_strip if any_order else one_pass)():
                put(None)
        except pyvips.Error as e:
            put(InputError(path, f"cannot decode the slide (truncated or corrupt?): {_vips_problem(e)}"))
        except BaseException as e:  # pragma: no cover - handed to the consumer, re-raised there
            put(e)

    reader = threading.Thread(target=read, name="radpath-slide-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buf, strip = item
            yield strip
            del item, strip
            free.put(buf)
    finally:
        stop.set()
        reader.join()


def _descendants(levels: list[Level], root: Level) -> list[Level]:
    """`root` and every level made from it, parents before children."""
    tree = [root]
    for lv in levels:
        if lv.parent is not None and any(lv.parent == t.magnification for t in tree):
            tree.append(lv)
    return tree


def _tile_pass(path: str, root: Level, tree: list[Level], writers: dict[float, TileGroupWriter], cfg: TileConfig) -> None:
    """One sequential read of the slide, building `root` and the levels reduced from it."""
    slide = open_slide(path)
    image = _root_image(slide, root, cfg.downsample_kernel)
    # libvips reads a tiled TIFF's tiles on demand (it records their size); other slides, strip
    # TIFFs above all, can only be read top to bottom.
    any_order = slide.get_typeof("tile-width") != 0
    by_mag = {lv.magnification: lv for lv in tree}
    needed = _needed_levels(tree, set(writers))
    order = [lv for lv in tree if lv.magnification in needed]
    cutters = {lv.magnification: _LevelCutter(lv, cfg, writers.get(lv.magnification)) for lv in order}
    reducers = {
        lv.magnification: _Reducer(by_mag[lv.parent], lv, cfg.downsample_kernel) for lv in order if lv.parent is not None
    }
    for rows in _strips(image, cfg.tile_size, path, any_order):
        made = {root.magnification: rows}
        for lv in order:
            if lv.parent is not None:
                made[lv.magnification] = reducers[lv.magnification].feed(made[lv.parent])
            cutters[lv.magnification].feed(made[lv.magnification], transient=lv is root)
        del made, rows
        _trim_heap()


# Above this resident size a worker hands freed heap memory back to the OS after each strip.
TRIM_ABOVE_BYTES = 1 << 30


def _trim_heap() -> None:
    """Give freed memory back to the OS when the process has grown large.

    glibc keeps large freed blocks in per-thread arenas, so libvips' and numpy's strip-sized
    buffers pile up as RSS on 100k px wide slides. Trimming costs page faults when the memory is
    used again, so it is done only above `TRIM_ABOVE_BYTES`.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes

        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        import psutil

        if psutil.Process().memory_info().rss > TRIM_ABOVE_BYTES:
            _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _needed_levels(tree: list[Level], todo: set[float]) -> set[float]:
    """Levels to compute: those to write and every level they are shrunk from."""
    by_mag = {lv.magnification: lv for lv in tree}
    needed: set[float] = set()
    for mag in todo:
        lv = by_mag[mag]
        needed.add(mag)
        while lv.parent is not None:
            needed.add(lv.parent)
            lv = by_mag[lv.parent]
    return needed


def _recipe(level: Level, cfg: TileConfig) -> dict[str, Any]:
    """What a tile group's pixels depend on, besides the slide: recorded in its attrs."""
    return {
        "tile_size": cfg.tile_size,
        "codec": cfg.codec,
        "compression_level": cfg.jpeg_quality if cfg.codec == "jpeg" else cfg.zstd_level,
        "background_threshold": cfg.background_threshold,
        "background_fraction": cfg.background_fraction,
        "downsample_kernel": cfg.downsample_kernel,
        "derived_from": "level0" if level.parent is None else mag_key(level.parent),
        "shrink": level.root_shrink if level.parent is None else level.factor,
        "level_width": level.width,
        "level_height": level.height,
    }


def _is_done(store: Store, case_id: str, level: Level, cfg: TileConfig) -> bool:
    """Complete, and made with this recipe: a rerun with another codec or rule redoes the group."""
    path = tile_group_path(case_id, level.magnification)
    if not store.group_is_complete(TILES, path):
        return False
    attrs = store.open_group(TILES, path, mode="r").attrs
    return all(attrs.get(k) == v for k, v in _recipe(level, cfg).items())


def _slide_mpp(case: dict, path: str) -> float:
    mpp = case.get("slide_mpp")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise InputError(path, "µm/px unknown in the cases table; ingest it with --default-mpp")
    return float(mpp)


def _no_level_problem(native: float, skipped: list[tuple[float, str]], tolerance: float) -> str:
    if all(mag_to_mpp(m) / native < 1 - tolerance for m, _ in skipped):  # plan_levels' test for "finer"
        mags = ", ".join(f"{mag_key(m)}x" for m, _ in skipped)
        return f"every requested magnification ({mags}) is finer than the slide's {native:.3g} µm/px"
    return "no requested magnification can be made: " + "; ".join(why for _, why in skipped)


def tile_case(case: dict, *, store_url: str, cfg: TileConfig) -> dict[str, Any]:
    """Tile one slide (a pure Dask task): writes `tiles.zarr/<case>/<mag>` for each incomplete mag.

    Returns a small summary: case_id, status ("done", "complete" or "error"), tiles per
    magnification written, skipped magnifications with reasons, the error message.
    """
    store = Store(store_url)
    case_id = str(case["case_id"])
    path = str(case["slide_path"])
    summary: dict[str, Any] = {"case_id": case_id, "slide_path": path, "status": "done", "tiles": {},
                               "skipped": [], "error": None, "seconds": 0.0}
    start = time.perf_counter()
    writers: dict[float, TileGroupWriter] = {}
    try:
        native = _slide_mpp(case, path)
        slide = open_slide(path)  # the header only: a bad file fails before anything is written
        levels, skipped = plan_levels(native, slide.width, slide.height, cfg.magnifications, cfg.mpp_tolerance)
        if not levels:
            # No tile can come of it: bad input like a blank slide, not a "complete" one.
            raise InputError(path, _no_level_problem(native, skipped, cfg.mpp_tolerance))
        summary["skipped"] = [[m, why] for m, why in skipped]
        summary["fits_a_tile"] = any(lv.width >= cfg.tile_size and lv.height >= cfg.tile_size for lv in levels)
        todo = [lv for lv in levels if not _is_done(store, case_id, lv, cfg)]
        if not todo:
            summary["status"] = "complete"
            return summary
        for root in (lv for lv in levels if lv.parent is None):
            tree = _descendants(levels, root)
            pass_todo = [lv for lv in tree if lv in todo]
            if not pass_todo:
                continue
            with ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="radpath-tile-writer") as pool:
                pass_writers = {
                    lv.magnification: TileGroupWriter(store, case_id, lv.magnification, cfg, executor=pool)
                    for lv in pass_todo
                }
                writers.update(pass_writers)
                _tile_pass(path, root, tree, pass_writers, cfg)
                for lv in pass_todo:
                    attrs = {"mpp": lv.mpp, "slide_path": path, "slide_mpp": native, **_recipe(lv, cfg)}
                    summary["tiles"][mag_key(lv.magnification)] = pass_writers[lv.magnification].close(attrs)
    except InputError as e:
        # The slide is bad: whatever this task began is removed, so the case's part of the store
        # is as it was (complete groups were skipped above and never opened for writing).
        for w in writers.values():
            w.abort()
        summary.update(status="error", error=str(e), tiles={})
    except BaseException:
        for w in writers.values():
            if not w.closed:
                w.abort()
        raise
    summary["seconds"] = time.perf_counter() - start
    return summary


# ---- the batch ---------------------------------------------------------------------------------
def tile_store(
    store_url: str,
    cfg: TileConfig | None = None,
    *,
    scheduler: str = "sync",
    skip_errors: bool = False,
) -> list[dict[str, Any]]:
    """`radpath tile`: tile every case with a slide, then rebuild tables/tiles.parquet.

    A bad slide stops the command (exit 2) after the other slides are done, unless `skip_errors`:
    then it is recorded in tables/tile_errors.parquet and the batch completes.
    """
    cfg = cfg or TileConfig()
    store = Store(store_url)
    cases = store.cases()
    slides = cases[cases["has_slide"].astype(bool)].reset_index(drop=True)
    items = [_case_item(row) for row in slides.to_dict("records")]
    with store.lock("tile"):
        store.open_zarr(TILES)  # the root exists before the tasks write its children
        results = map_tasks(tile_case, items, scheduler=scheduler, description="tile slides",
                            store_url=store.url, cfg=cfg)
        _warn_skipped(results)
        for r in results:
            if r["status"] == "done":
                _reject_if_no_tile(store, r, cfg)
        errors = [r for r in results if r["status"] == "error"]
        if errors and not skip_errors:
            lines = "\n".join(f"  {r['error']}" for r in errors)
            raise RadpathError(
                f"{len(errors)} slide(s) could not be tiled; their part of the store is untouched "
                f"(rerun with --skip-errors to record them and go on):\n{lines}"
            )
        done = sum(r["status"] == "done" for r in results)
        if not done and not errors and store.has_table(TILES_TABLE):
            # Every slide was complete: the tables already say so, and rewriting them would make
            # every downstream step think its inputs changed.
            info(f"all {len(results)} slide(s) already tiled; {store.path(store.table_rel(TILES_TABLE))}")
            return results
        store.write_table(
            TILE_ERRORS_TABLE,
            pd.DataFrame(
                {
                    "case_id": pd.Series([r["case_id"] for r in errors], dtype="string"),
                    "slide_path": pd.Series([r["slide_path"] for r in errors], dtype="string"),
                    "error": pd.Series([r["error"] for r in errors], dtype="string"),
                }
            ),
        )
        for r in errors:
            warn(f"skipped: {r['error']}")
        table = tiles_table(store, slides["case_id"].tolist())
        if len(table):
            store.write_bytes(TILE_COUNTS_PNG, plot_tile_counts(store, table=table))
        # Last: a rerun that finds every slide complete and this table present does nothing more.
        store.write_table(TILES_TABLE, table)
    info(
        f"tiled {done} slide(s), {sum(r['status'] == 'complete' for r in results)} already complete, "
        f"{len(errors)} failed; {len(table)} tiles in {store.path(store.table_rel(TILES_TABLE))}"
    )
    return results


def _reject_if_no_tile(store: Store, result: dict[str, Any], cfg: TileConfig) -> None:
    """A slide that gives no tile at any magnification (a blank scan, a thumbnail) is bad input:
    nothing could be learnt from it. Its empty groups go, and it fails like an unreadable slide."""
    case_id = result["case_id"]
    mags = _mags_of_case(store, case_id)
    if not mags or sum(tile_count(store, case_id, float(m)) for m in mags) > 0:
        return
    store.fs.rm(store.path(TILES, case_id), recursive=True)
    where = ", ".join(f"{m}x" for m in sorted(mags, key=float, reverse=True))
    T = cfg.tile_size
    if result.get("fits_a_tile", True):
        problem = (f"no tissue: every {T} px tile at {where} is background (at least {cfg.background_fraction:.0%} "
                   f"of its pixels have R, G and B > {cfg.background_threshold})")
    else:
        problem = f"the slide is smaller than one {T} px tile at every magnification ({where})"
    result.update(status="error", error=str(InputError(result["slide_path"], problem)), tiles={})


def _warn_skipped(results: list[dict[str, Any]]) -> None:
    """One warning per skipped magnification, not one per slide (a cohort scanned at 20x)."""
    by_mag: dict[float, list[str]] = {}
    for r in results:
        for mag, why in r["skipped"]:
            by_mag.setdefault(mag, []).append(f"{r['case_id']}: {why}")
    for mag, reasons in sorted(by_mag.items(), reverse=True):
        more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
        warn(
            f"magnification {mag_key(mag)} skipped for {len(reasons)} slide(s), never upsampled: "
            + "; ".join(reasons[:3]) + more
        )


def _case_item(row: dict) -> dict:
    keep = ("case_id", "slide_path", "slide_mpp", "slide_width", "slide_height")
    item = {k: row.get(k) for k in keep}
    for k in ("slide_mpp",):
        item[k] = None if item[k] is None or pd.isna(item[k]) else float(item[k])
    for k in ("slide_width", "slide_height"):
        item[k] = None if item[k] is None or pd.isna(item[k]) else int(item[k])
    return item


def _mags_of_case(store: Store, case_id: str) -> list[str]:
    folder = store.path(TILES, case_id)
    if not store.fs.exists(folder):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[1] for p in store.fs.ls(folder, detail=False)]
    return [n for n in names if n != "zarr.json" and store.group_is_complete(TILES, f"{case_id}/{n}")]


def tiles_table(store: Store, case_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per kept tile of every complete group: the contents of tables/tiles.parquet.

    Sorted by case, magnification (finest first) and tile index, so equal stores give equal tables.
    """
    if case_ids is None:
        case_ids = store.cases()["case_id"].tolist()
    parts = []
    for case_id in sorted(case_ids):
        for key in sorted(_mags_of_case(store, case_id), key=lambda k: -float(k)):
            g = store.open_group(TILES, f"{case_id}/{key}", mode="r")
            coords = np.asarray(g["coords"][:], dtype=np.int64).reshape(-1, 2)
            n = len(coords)
            parts.append(
                pd.DataFrame(
                    {
                        "case_id": pd.Series([case_id] * n, dtype="string"),
                        "magnification": np.full(n, float(g.attrs["magnification"])),
                        "mpp": np.full(n, float(g.attrs["mpp"])),
                        "tile_index": np.arange(n, dtype=np.int64),
                        "x": coords[:, 0],
                        "y": coords[:, 1],
                        "tissue_fraction": np.asarray(g["tissue_fraction"][:], dtype=np.float32),
                    }
                )
            )
    if not parts:
        return pd.DataFrame(
            {
                "case_id": pd.Series([], dtype="string"),
                "magnification": pd.Series([], dtype="float64"),
                "mpp": pd.Series([], dtype="float64"),
                "tile_index": pd.Series([], dtype="int64"),
                "x": pd.Series([], dtype="int64"),
                "y": pd.Series([], dtype="int64"),
                "tissue_fraction": pd.Series([], dtype="float32"),
            }
        )
    return pd.concat(parts, ignore_index=True)


def plot_tile_counts(store: Store | str, path: str | os.PathLike | None = None, *, table: pd.DataFrame | None = None) -> bytes:
    """The paper's Fig. 4: a histogram of kept tiles per slide for each magnification, as PNG bytes.

    Slides with zero kept tiles count (their groups are complete and empty). Written to `path` too
    when given.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    store = store if isinstance(store, Store) else Store(store)
    if table is None:
        table = store.read_table(TILES_TABLE)
    counts: dict[float, list[int]] = {}
    case_ids = sorted(set(store.cases()["case_id"]))
    for case_id in case_ids:
        for key in _mags_of_case(store, case_id):
            counts.setdefault(float(key), [])
    per = table.groupby(["magnification", "case_id"], observed=True).size()
    for mag in counts:
        for case_id in case_ids:
            if store.group_is_complete(TILES, f"{case_id}/{mag_key(mag)}"):
                counts[mag].append(int(per.get((mag, case_id), 0)))
    mags = sorted(counts, reverse=True)
    fig, axes = plt.subplots(1, max(1, len(mags)), figsize=(3.2 * max(1, len(mags)), 3.0), squeeze=False)
    for ax, mag in zip(axes[0], mags, strict=False):
        values = np.asarray(counts[mag])
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#7b4f9d", edgecolor="white")
        ax.set_title(f"{mag_key(mag)}x: {len(values)} slides, median {np.median(values):.0f}", fontsize=10)
        ax.set_xlabel("kept tiles per slide")
        ax.yaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("slides")
    fig.suptitle("Tiles per slide after the background rule")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
