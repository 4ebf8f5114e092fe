"""A synthetic CPM-RadPath cohort: H&E-like slides, four-modality MRI and a labels CSV.

The output has the layout of the real challenge data (`radpath_fs.cohort`), so every later
step runs on it unchanged:

    OUT/Pathology/<ID>.tiff                           tiled JPEG TIFF, µm/px in its resolution tags
    OUT/Radiology/<ID>/<ID>_{t1,t1ce,t2,flair}.nii.gz int16 NIfTI with a per-case affine
    OUT/labels.csv                                    CPM_RadPath_2019_ID,class,age_in_days

Cases beyond `cfg.cases` (`cfg.unlabelled`) are written with slides and MRI but left out of
labels.csv: they play the hidden validation/test set.

Slides are built as a lazy libvips pipeline and streamed into the TIFF tile by tile, so their
size is bounded by disk, not memory (a CPM-sized 100k x 80k slide included). Tissue pieces
have a physical size (hundreds of µm, like biopsy fragments), whatever the slide's size.

The class lives in detail finer than 5 µm only, so that 20x (0.5 µm/px) shows it and 2.5x
(4 µm/px) cannot: chromatin clumping, nuclear contour roughness, a perinuclear halo and fine
fibrils differ between classes. Anything a 4 µm pixel resolves is class-independent by
construction, not by balancing: each slide is also rendered as a reference (the same case
without any class feature: same nuclei, stain, layout and cellularity), and the slide keeps
the reference's content below 0.2 cycles/µm and the class render's above it (`_fine_band`).
The tiler's 2.5x downsampling (lanczos3, wsi.downsample) passes under 1% of anything above
0.18 cycles/µm, so its tiles hold no class information (but for the few pixels the clamp to
0-255 cuts). Nuclear size, shape, darkness and density are therefore the same in every
class: at 4 µm/px they would show. Per-case nuisance
(stain strength and hue, tissue fraction and layout, cellularity, nuclear size) varies freely.

Nuclei are shot noise: sparse impulses taken from the upper tail of a Gaussian noise image,
convolved with a Gaussian bump and thresholded at half height, which gives discrete nuclei.
The MRI is small enough to be built in numpy.
"""

from __future__ import annotations

import functools
import math
import os
import string
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from radpath_fs import CLASSES, MODALITIES
from radpath_fs.config import SynthConfig
from radpath_fs.errors import InputError
from radpath_fs.progress import info
from radpath_fs.scheduler import map_tasks

LABELS_CSV = "labels.csv"
LABELS_HEADER = ("CPM_RadPath_2019_ID", "class", "age_in_days")
TIFF_TILE = 256
JPEG_QUALITY = 90

# Grids the slide fields are computed on, in µm per pixel: nuclei, chromatin and neuropil at
# 1 µm (they are smooth at that scale), cellularity, fascicle orientation and tissue edges at
# 8 µm. Only the final RGB image is resampled to the slide's own resolution.
_MID_UM = 1.0
_LO_UM = 8.0


# --------------------------------------------------------------------------------------------
# Cohort: ids, classes, label noise, ages
# --------------------------------------------------------------------------------------------


def allocate_classes(n: int, proportions: dict[str, float]) -> list[str]:
    """Class of each of `n` cases, in CLASSES order, by largest remainder.

    Every class with a positive proportion gets at least one case when `n` allows it, so that
    small cohorts still contain each class."""
    classes = [c for c in CLASSES if proportions.get(c, 0) > 0]
    total = sum(proportions[c] for c in classes)
    quota = {c: n * proportions[c] / total for c in classes}
    counts = {c: int(math.floor(quota[c])) for c in classes}
    by_remainder = sorted(classes, key=lambda c: (counts[c] - quota[c], CLASSES.index(c)))
    for c in by_remainder[: n - sum(counts.values())]:
        counts[c] += 1
    # Take a case from the largest class for every class left empty.
    for c in classes:
        if counts[c] == 0 and n >= len(classes):
            donor = max(classes, key=lambda k: (counts[k], -CLASSES.index(k)))
            counts[donor] -= 1
            counts[c] += 1
    return [c for c in classes for _ in range(counts[c])]


def flip_labels(labels: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
    """Replace round(fraction * n) labels, chosen at random, by another class chosen at random."""
    out = list(labels)
    k = int(round(fraction * len(out)))
    for i in rng.choice(len(out), size=k, replace=False):
        out[i] = str(rng.choice([c for c in CLASSES if c != out[i]]))
    return out


def case_ids(n: int, rng: np.random.Generator) -> list[str]:
    """Unique ids in the CPM-RadPath style, both cohorts mixed (CPM19_CBICA_ABC_1, CPM19_TCIA01_123_1)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        if rng.random() < 0.5:
            case = "CBICA_" + "".join(rng.choice(list(string.ascii_uppercase), size=3))
        else:
            case = f"TCIA{int(rng.integers(1, 9)):02d}_{int(rng.integers(100, 1000))}"
        cid = f"CPM19_{case}_1"
        if cid not in seen:
            seen.add(cid)
            ids.append(cid)
    return ids


# Age at diagnosis in years (mean, sd): glioblastoma patients are older, as in CPM-RadPath.
_AGE_YEARS = {"G": (61.0, 12.0), "A": (41.0, 13.0), "O": (46.0, 12.0)}


def _age_in_days(cls: str, rng: np.random.Generator) -> int:
    mean, sd = _AGE_YEARS[cls]
    years = float(np.clip(rng.normal(mean, sd), 18.0, 88.0))
    return int(round(years * 365.25))


# --------------------------------------------------------------------------------------------
# Slides
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nuclei:
    """Size, shape and darkness of a population of nuclei. Lengths in µm. A 4 µm pixel resolves
    all of these, so they are the same in every class; only the per-case jitter moves them."""

    sigma_long: float  # bump sigma along the nucleus' long axis (x or y, as the fascicles run)
    sigma_short: float  # and across it (equal: round nuclei)
    amp_spread: float  # spread of bump heights: nuclear size variation (pleomorphism)
    darkness: float  # haematoxylin optical density of the nucleus

    def jittered(self, rng: np.random.Generator) -> Nuclei:
        size = rng.uniform(0.9, 1.1)
        return replace(
            self,
            sigma_long=self.sigma_long * size * rng.uniform(0.95, 1.05),
            sigma_short=self.sigma_short * size,
            darkness=self.darkness * rng.uniform(0.95, 1.05),
        )


@dataclass(frozen=True)
class Morphology:
    """What tells a class's tumour apart: detail of its nuclei and neuropil finer than 5 µm.
    Its coarse trace (e.g. the mean clearing of a halo) is replaced by the reference's."""

    chromatin: float  # clumping: relative texture of the haematoxylin inside nuclei
    irregularity: float  # contour roughness (relative modulation of the bump field)
    halo: float  # 0, or the bump level down to which a clear perinuclear halo extends
    fibrils: float  # relative eosin contrast of fine fibres running along the fascicles


# Tumour nuclei, 7-10 µm across, moderately pleomorphic.
TUMOUR = Nuclei(3.0, 3.0, 0.8, 1.43)
# Non-neoplastic glial nuclei; they dominate where cellularity is low.
GLIA = Nuclei(1.9, 1.9, 0.2, 1.30)
# Glioblastoma: coarsely clumped chromatin, irregular contours. Astrocytoma: finer clumps in a
# fibrillary neuropil. Oligodendroglioma: smooth chromatin, regular contours and a wide clear
# perinuclear halo ("fried egg"). Strong, because only their detail finer than 5 µm is kept.
MORPHOLOGY: dict[str, Morphology] = {
    "G": Morphology(chromatin=1.0, irregularity=0.5, halo=0.0, fibrils=0.0),
    "A": Morphology(chromatin=0.5, irregularity=0.2, halo=0.0, fibrils=0.5),
    "O": Morphology(chromatin=0.0, irregularity=0.05, halo=0.08, fibrils=0.0),
}
# The reference render of a slide: none of the class features.
REFERENCE = Morphology(chromatin=0.0, irregularity=0.0, halo=0.0, fibrils=0.0)

# Stain optical densities per unit concentration (Ruifrok & Johnston's H&E vectors).
_OD_H = np.array([0.65, 0.70, 0.29])
_OD_E = np.array([0.07, 0.99, 0.11])
# The tumour nuclei's haematoxylin load (darkness x area fraction; the area fraction follows)
# and the mean eosin per tissue pixel, which the stroma makes up for where a halo clears it:
# the closer a class render stays to its reference, the smaller the correction `_fine_band`
# makes, and the fewer pixels the clamp to 0-255 cuts.
_TUMOUR_H_LOAD = 0.16
_GLIA_FRACTION = 0.025
_STROMA_H = 0.06
# Strong enough that the neuropil of a faintly stained case stays tissue under the background
# rule (R, G and B all > 180): at 0.5 its green channel crossed 180 and tiles inside the tissue
# counted as part background.
_MEAN_E = 0.7
_NUCLEUS_E = 0.05
_HALO_CLEARING = 0.85
_CELLULARITY = 0.2  # how strongly the cellularity field modulates the impulse threshold
_CELLULARITY_UM = 40.0  # scale of cellularity variations
_FASCICLE_UM = 60.0  # scale of the patches of one fascicle orientation
_ROUGH_UM = 1.6  # scale of nuclear contour roughness and of the neuropil texture
_GRAIN_UM = 0.6  # scale of chromatin clumps: most of their variance is finer than 5 µm
# Fibrils: about 1 µm thick and 10 µm long; the band-pass across them keeps little coarser
# than ~3 µm, where `_fine_band` would drop it anyway.
_FIBRE_ACROSS_UM, _FIBRE_ALONG_UM, _FIBRE_BAND_UM = 0.5, 5.0, 1.5
# `_fine_band`: the split between reference and class content, in cycles/µm, and the half
# length of its windowed-sinc low-pass in 1 µm taps. The tiler's 2.5x lanczos3 passes 9% at
# 0.16 cycles/µm and under 1% above 0.18: the low-pass must be flat up to there.
_SPLIT_CYCLES_PER_UM = 0.2
_SPLIT_HALF_TAPS = 12
# Tissue layout: pieces are smooth over at least this many µm per grid cell (~0.3-1 mm pieces),
# with edges ragged by roughly _RAGGED_UM. Relative to the slide's size instead, a 1 mm test
# slide would hold 60 µm crumbs whose edges cross most 20x tiles.
_LAYOUT_CELL_UM = 40.0
_RAGGED_UM = 10.0
_EDGE = 0.3  # width of the nuclear boundary ramp, in bump-height units


@dataclass(frozen=True)
class SlideStyle:
    """Everything that decides one slide: the class morphology and per-case nuisance."""

    cls: str
    morph: Morphology
    nuclei: Nuclei  # the tumour nuclei, jittered per case
    seed: int
    tissue_fraction: float
    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    background_od: tuple[float, float, float]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def slide_style(cls: str, rng: np.random.Generator) -> SlideStyle:
    """Draw one case's slide look: the class morphology plus stain, nuclei, tissue and layout
    nuisance. Only `morph` depends on the class; the draws do not."""
    # Stain strength and hue vary between labs and batches much more than any class difference.
    h = _unit(_OD_H + rng.normal(0, 0.06, 3).clip(-0.15, 0.15)) * rng.uniform(0.75, 1.3)
    e = _unit(_OD_E + rng.normal(0, 0.06, 3).clip(-0.15, 0.15)) * rng.uniform(0.75, 1.3)
    bg = rng.uniform(0.015, 0.05) + rng.normal(0, 0.006, 3)
    return SlideStyle(
        cls=cls,
        morph=MORPHOLOGY[cls],
        nuclei=TUMOUR.jittered(rng),
        seed=int(rng.integers(1, 2**31 - 1)),
        tissue_fraction=float(rng.uniform(0.22, 0.45)),
        stain_h=tuple(float(x) for x in h),
        stain_e=tuple(float(x) for x in e),
        background_od=tuple(float(x) for x in bg.clip(0.005, 0.08)),
    )


def _irwin_hall(z: np.ndarray, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Density and tail P(N > z) of libvips gaussnoise, which sums 12 uniforms (Irwin-Hall)
    rather than drawing a true Gaussian: its tail beyond 3 sigma, where the nuclei come from,
    is markedly thinner. Evaluated from the nearer end of the support (the distribution is
    symmetric), where the alternating sums do not cancel catastrophically."""
    z = np.asarray(z, dtype=np.float64)
    y = np.clip(n / 2 - np.abs(z), 0, n / 2)
    pdf = np.zeros_like(y)
    below = np.zeros_like(y)
    for k in range(n // 2 + 1):
        t = np.clip(y - k, 0, None)
        pdf += (-1) ** k * math.comb(n, k) * t ** (n - 1)
        below += (-1) ** k * math.comb(n, k) * t**n
    below /= math.factorial(n)  # P(N < -|z|)
    tail = np.where(z >= 0, below, 1 - below)
    return np.clip(pdf / math.factorial(n - 1), 0, None), np.clip(tail, 0, 1)


def _impulse_threshold(m: Nuclei, fraction: float, px_um: float, cellularity: float, sign: float) -> float:
    """Threshold z0 on the noise so that nuclei cover `fraction` of the tissue on average.

    An impulse at noise value z0 + x (x > 0) becomes a bump of height a = 1 + spread * z0 * x,
    which thresholded at 1/2 covers 2 pi sx sy ln(2a). Impulses are sparse, so coverage follows
    the Boolean model 1 - exp(-density * mean area), averaged over the cellularity field C ~ N(0, 1)
    that shifts the threshold locally to z0 - sign * cellularity * C."""
    from scipy.optimize import brentq

    nodes, weights = np.polynomial.hermite_e.hermegauss(41)
    weights = weights / weights.sum()
    excess = np.linspace(0, 6, 601)
    ellipse = 2 * math.pi * (m.sigma_long / px_um) * (m.sigma_short / px_um)

    def covered(z0: float) -> float:
        pdf, _ = _irwin_hall(z0 + excess)
        log_height = np.log(2 * (1 + m.amp_spread * z0 * excess))
        area = ellipse * float((log_height * pdf).sum() / max(pdf.sum(), 1e-300))
        _, density = _irwin_hall(z0 - sign * cellularity * nodes)
        return float((weights * (1 - np.exp(-density * area))).sum()) - fraction

    return float(brentq(covered, 0.0, 5.9))


def _kernel(sigma_px: float) -> np.ndarray:
    """1-D Gaussian with peak 1, so a unit impulse becomes a bump of height 1."""
    r = max(1, int(math.ceil(3 * sigma_px)))
    return np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)


def _separable(image, kx: np.ndarray, ky: np.ndarray):
    """Convolve with kx along x, then ky along y."""
    import pyvips

    image = image.conv(pyvips.Image.new_from_array(kx[None, :].tolist()), precision="float")
    return image.conv(pyvips.Image.new_from_array(ky[:, None].tolist()), precision="float")


def _conv2(image, sigma_x: float, sigma_y: float):
    return _separable(image, _kernel(sigma_x), _kernel(sigma_y))


def _smooth_unit(noise, sigma_px: float):
    """White noise smoothed into a stationary Gaussian field of unit variance. The input is
    padded first: the convolution would otherwise repeat the border pixels."""
    k = _kernel(sigma_px)
    r = len(k) // 2
    padded = noise.embed(r, r, noise.width + 2 * r, noise.height + 2 * r, extend="mirror")
    # White noise through the kernel along x then y has variance (sum k^2)^2.
    scale = 1.0 / float((k**2).sum())
    return _conv2(padded, sigma_px, sigma_px).crop(r, r, noise.width, noise.height) * scale


def _field(width: int, height: int, seed: int, sigma_px: float):
    """Lazy stationary Gaussian random field with unit variance (white noise, blurred)."""
    import pyvips

    return _smooth_unit(pyvips.Image.gaussnoise(width, height, mean=0.0, sigma=1.0, seed=seed), sigma_px)


def _fibrils(noise, orientation):
    """Unit-variance texture of fine fibres running along x or y as the fascicle orientation
    field says. Across the fibres the kernel is a difference of Gaussians (_FIBRE_ACROSS_UM minus
    _FIBRE_BAND_UM), so the texture has no coarse part left for low magnification to see."""
    along = _kernel(_FIBRE_ALONG_UM / _MID_UM)
    along /= along.sum()
    narrow, wide = _kernel(_FIBRE_ACROSS_UM / _MID_UM), _kernel(_FIBRE_BAND_UM / _MID_UM)
    across = -wide / wide.sum()
    c, r = len(across) // 2, len(narrow) // 2
    across[c - r : c + r + 1] += narrow / narrow.sum()
    pad = max(len(along), len(across)) // 2
    padded = noise.embed(pad, pad, noise.width + 2 * pad, noise.height + 2 * pad, extend="mirror")
    along_x = _separable(padded, along, across).crop(pad, pad, noise.width, noise.height)
    along_y = _separable(padded, across, along).crop(pad, pad, noise.width, noise.height)
    # White noise through separable kernels has variance (sum along^2)(sum across^2).
    scale = 1.0 / math.sqrt(float((along**2).sum() * (across**2).sum()))
    return (orientation > 0).ifthenelse(along_x, along_y) * scale


def _shared(image, rows: int = 6):
    """Cache a node that several later operations read: libvips recomputes a shared input once
    per consumer otherwise. The TIFF writer fills one row of tiles at a time across the full
    width, and the next row reuses the margin lines of the one above, so the cache holds a few
    bands of lines across the image: memory grows with the slide's width, not with its area."""
    per_row = image.width // 512 + 1
    return image.tilecache(tile_width=512, tile_height=32, max_tiles=per_row * rows, threaded=True)


def _clip01(image):
    return image.clamp(min=0.0, max=1.0)


def _tissue_layout(width_um: float, height_um: float, style: SlideStyle, rng: np.random.Generator):
    """Irregular tissue pieces on a coarse numpy grid (a few thousand cells whatever the slide
    size), thresholded at the quantile that gives the case's tissue fraction. Returns the field
    minus its threshold (positive inside tissue) and the grid's µm per cell."""
    from scipy.ndimage import gaussian_filter

    cell = max(max(width_um, height_um) / 64.0, _LAYOUT_CELL_UM)
    gw, gh = int(math.ceil(width_um / cell)) + 1, int(math.ceil(height_um / cell)) + 1
    field = gaussian_filter(rng.standard_normal((gh + 16, gw + 16)), sigma=4.0, mode="wrap")[8:-8, 8:-8]
    field /= field.std()
    # Keep tissue off the slide's edges, as on a glass slide.
    v, u = np.meshgrid(np.linspace(-1, 1, gh), np.linspace(-1, 1, gw), indexing="ij")
    field = field - 2.5 * np.maximum(np.abs(u), np.abs(v)) ** 6
    threshold = np.quantile(field, 1 - style.tissue_fraction)
    return (field - threshold).astype(np.float32), cell


def _bumps(noise, cellularity, orientation, m: Nuclei, z0: float, sign: int):
    """Nuclei as a bump field (a nucleus is where it exceeds 1/2). Impulses are the noise values
    beyond the local threshold z0 - cellularity * C (sign +1: upper tail, denser where C is
    high; sign -1: lower tail, sparser there), each convolved with the nuclei's Gaussian,
    along x or y as the fascicle orientation field says when the nuclei are elongated."""
    value = noise if sign > 0 else noise * -1.0
    excess = value - (cellularity * (-sign * _CELLULARITY) + z0)
    impulses = (excess > 0).ifthenelse(excess * (m.amp_spread * z0) + 1.0, 0.0)
    sl, ss = m.sigma_long / _MID_UM, m.sigma_short / _MID_UM
    if abs(sl - ss) < 1e-6:
        return _conv2(impulses, sl, ss)
    along_x = (orientation > 0).ifthenelse(impulses, 0.0)
    return _conv2(along_x, sl, ss) + _conv2(impulses - along_x, ss, sl)


def _above(bumps, level: float):
    """Soft mask of bumps > level. It ramps over about a pixel of the 1 µm grid, centred on the
    level, so nuclei are anti-aliased and their mean area is unchanged."""
    return _clip01((bumps - level) * (1 / _EDGE) + 0.5)


@functools.cache
def _overlap_correction(
    m: Nuclei, sign: int, halo: float = 0.0, size: int = 1024, seed: int = 3
) -> tuple[float, float]:
    """Nuclear coverage to ask of the Boolean model per unit of coverage wanted, and the
    coverage of a halo out to bump level `halo` per unit of nuclear coverage, measured on a
    simulated field of uniform cellularity. The Boolean model counts overlapping nuclei once
    while the bump field adds them up, which over-covers the more, the denser the nuclei."""
    import pyvips

    target = _TUMOUR_H_LOAD / m.darkness if sign > 0 else _GLIA_FRACTION
    flat = pyvips.Image.black(size, size).cast("float")
    noise = pyvips.Image.gaussnoise(size, size, mean=0.0, sigma=1.0, seed=seed).copy_memory()

    def coverage(fraction: float) -> tuple[float, float]:
        z0 = _impulse_threshold(m, fraction, _MID_UM, 0.0, sign)
        bumps = _bumps(noise, flat, flat, m, z0, sign).copy_memory()
        nuclei = _above(bumps, 0.5)
        ring = (_above(bumps, halo) - nuclei).avg() if halo > 0 else 0.0
        return nuclei.avg(), ring

    got, _ = coverage(target)
    ratio = target / got
    got, ring = coverage(target * ratio)
    return ratio, ring / got


def _lowpass_kernel() -> np.ndarray:
    """1-D windowed sinc (Lanczos window) cutting at _SPLIT_CYCLES_PER_UM on the 1 µm grid."""
    x = np.arange(-_SPLIT_HALF_TAPS, _SPLIT_HALF_TAPS + 1) * _MID_UM
    k = np.sinc(2 * _SPLIT_CYCLES_PER_UM * x) * np.sinc(x / (x[-1] + _MID_UM))
    return k / k.sum()


def _fine_band(cls, ref):
    """`cls`'s detail finer than 1 / _SPLIT_CYCLES_PER_UM on `ref`'s coarse content:
    cls + lowpass(ref - cls), with a linear, shift-invariant low-pass that is flat over the whole
    band a 4 µm pixel sees. Done on RGB intensity, the very values a downsampler averages: on
    optical density or stain concentrations, exp() would turn fine class texture into a coarse
    shift of intensity. A downsample-upsample pair (reduce then resize) instead of the low-pass
    aliases fine content into the coarse band and is not flat near its own Nyquist: in the
    tiler's 2.5x view it left 30% of the class render's difference to the reference (rms,
    measured), this low-pass under 2%. The clamp to 0-255 that follows cuts 0.01-0.3% of the
    pixels (darkest clumps, clearest holes), the only departure from the split."""
    # `cls` is read by both terms, yet a cache on it (_shared) cost 50 MiB more peak memory on
    # a 12000 px wide slide and saved no time (measured).
    k = _lowpass_kernel()
    r = len(k) // 2
    diff = ref - cls
    padded = diff.embed(r, r, diff.width + 2 * r, diff.height + 2 * r, extend="mirror")
    return cls + _separable(padded, k, k).crop(r, r, diff.width, diff.height)


def render_slide(width: int, height: int, mpp: float, style: SlideStyle):
    """The slide as a lazy 8-bit RGB pyvips image: nothing is computed until it is written.

    Stain concentrations and colour are computed on a 1 µm grid, once with the class's
    morphology and once with the reference one, from the same fields; `_fine_band` joins the
    two and the RGB image is resampled to the slide's resolution. At 20x-40x the upsampling
    stands in for the scanner's optical blur."""
    import pyvips

    rng = np.random.default_rng(style.seed)
    seeds = [int(s) for s in rng.integers(1, 2**31 - 1, size=8)]
    mid_um, lo_um = _MID_UM, _LO_UM
    mid_w, mid_h = int(math.ceil(width * mpp / mid_um)) + 2, int(math.ceil(height * mpp / mid_um)) + 2
    lo_w, lo_h = int(math.ceil(mid_w * mid_um / lo_um)) + 2, int(math.ceil(mid_h * mid_um / lo_um)) + 2

    # Coarse fields: tissue layout (numpy, tiny), cellularity, fascicle orientation, ragged edges.
    layout, cell_um = _tissue_layout(width * mpp, height * mpp, style, rng)
    tissue_lo = pyvips.Image.new_from_array(layout).resize(cell_um / lo_um, kernel="linear")
    tissue_lo = tissue_lo.embed(0, 0, lo_w, lo_h, extend="copy")
    cellularity = _field(lo_w, lo_h, seeds[0], _CELLULARITY_UM / lo_um)
    orientation = _field(lo_w, lo_h, seeds[1], _FASCICLE_UM / lo_um)
    # The layout field rises by about 1 per 4-6 cells across an edge: this moves edges ~_RAGGED_UM.
    tissue_lo = tissue_lo + _field(lo_w, lo_h, seeds[2], 12.0 / lo_um) * (_RAGGED_UM / (4.0 * cell_um))
    # Cached on the coarse grid: upsampling is cheap to redo, the wide blurs are not.
    lo = _shared(cellularity.bandjoin([orientation, tissue_lo]))
    lo = lo.resize(lo_um / mid_um, kernel="linear").crop(0, 0, mid_w, mid_h)
    cellularity, orientation, tissue = lo[0], lo[1], lo[2]

    # Chromatin grain, and a coarser texture that roughens nuclear contours and the neuropil:
    # two smoothings of one noise image.
    texture_noise = _shared(pyvips.Image.gaussnoise(mid_w, mid_h, mean=0.0, sigma=1.0, seed=seeds[4]))
    grain = _smooth_unit(texture_noise, _GRAIN_UM / mid_um)
    rough = _smooth_unit(texture_noise, _ROUGH_UM / mid_um)

    # Nuclei: tumour impulses from the upper tail of one noise image, glial ones from its lower
    # tail (disjoint), each denser or sparser where the cellularity field says.
    noise = _shared(pyvips.Image.gaussnoise(mid_w, mid_h, mean=0.0, sigma=1.0, seed=seeds[3]))
    tumour = style.nuclei
    fraction = _TUMOUR_H_LOAD / tumour.darkness
    ratio, _ = _overlap_correction(TUMOUR, +1)
    z_t = _impulse_threshold(tumour, fraction * ratio, mid_um, _CELLULARITY, +1)
    bumps = _shared(_bumps(noise, cellularity, orientation, tumour, z_t, +1))
    ratio_g, _ = _overlap_correction(GLIA, -1)
    z_g = _impulse_threshold(GLIA, _GLIA_FRACTION * ratio_g, mid_um, _CELLULARITY, -1)
    glia = _shared(_bumps(noise, cellularity, orientation, GLIA, z_g, -1))
    glia_nuc = _above(glia, 0.5)
    p_nuc = 1 - (1 - fraction) * (1 - _GLIA_FRACTION)
    inside = _clip01(tissue * (1 / 0.05))

    def stained(m: Morphology):
        """RGB intensity (float, 0-255) of the tissue drawn with morphology `m`."""
        # Multiplicative, so the roughness shapes nuclei without seeding specks in the stroma.
        shaped = bumps * (rough * m.irregularity + 1.0) if m.irregularity else bumps
        tumour_nuc = _above(shaped, 0.5)
        nuc = _clip01(tumour_nuc + glia_nuc)
        chromatin = (grain * m.chromatin + 1.0).clamp(min=0.0, max=1e6)  # no negative stain
        h = nuc * (-_STROMA_H) + _STROMA_H + tumour_nuc * chromatin * tumour.darkness
        h = h + glia_nuc * GLIA.darkness
        clear, halo_fraction = 0.0, 0.0
        if m.halo > 0:
            clear = _clip01(_above(shaped, m.halo) - tumour_nuc - glia_nuc) * _HALO_CLEARING
            halo_fraction = fraction * _overlap_correction(TUMOUR, +1, m.halo)[1]
        # Stroma eosin set so that the mean eosin per tissue pixel does not depend on the halo.
        stroma_e = (_MEAN_E - _NUCLEUS_E * p_nuc) / (1 - p_nuc - _HALO_CLEARING * halo_fraction)
        e = ((nuc * -1 + 1) - clear) * (rough * 0.18 + 1.0) * stroma_e + nuc * _NUCLEUS_E
        if m.fibrils:
            # Zero-mean modulation: the mean eosin is unchanged.
            fibres = _fibrils(
                pyvips.Image.gaussnoise(mid_w, mid_h, mean=0.0, sigma=1.0, seed=seeds[5]), orientation
            )
            e = (e * (fibres * m.fibrils + 1.0)).clamp(min=0.0, max=1e6)
        he = (h * inside).bandjoin(e * inside)
        # Beer-Lambert: optical density is linear in the stain concentrations.
        od = he.recomb([[style.stain_h[c], style.stain_e[c]] for c in range(3)]) + list(style.background_od)
        return (od * -1.0).math("exp") * 255.0

    rgb = _fine_band(stained(style.morph), stained(REFERENCE)).clamp(min=0.0, max=255.0).cast("uchar")
    scale = mid_um / mpp
    if scale != 1:
        rgb = rgb.resize(scale, kernel="linear" if scale > 1 else "lanczos3")
    return rgb.crop(0, 0, width, height).copy(interpretation="srgb", xres=1000.0 / mpp, yres=1000.0 / mpp)


def write_slide(path: Path, image) -> None:
    """Stream `image` into a tiled, JPEG-compressed, single-resolution TIFF. The µm/px is kept
    in the TIFF resolution tags (pixels per centimetre; libvips reads them back as pixels/mm).
    Written to a temporary name first so that an interrupted run leaves no valid-looking file."""
    tmp = path.with_name(f".tmp-{path.name}")
    image.tiffsave(
        str(tmp),
        tile=True,
        tile_width=TIFF_TILE,
        tile_height=TIFF_TILE,
        compression="jpeg",
        Q=JPEG_QUALITY,
        pyramid=False,
        resunit="cm",
        strip=True,
    )
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# MRI
# --------------------------------------------------------------------------------------------

# Mean signal per tissue and modality (t1, t1ce, t2, flair), in units of each modality's gain.
_SIGNAL = {
    "wm": (0.85, 0.85, 0.40, 0.45),
    "gm": (0.62, 0.64, 0.58, 0.58),
    "deep_gm": (0.70, 0.71, 0.50, 0.52),
    "csf": (0.22, 0.24, 1.00, 0.12),
    "choroid": (0.60, 1.15, 0.70, 0.55),
    "oedema": (0.62, 0.62, 0.80, 0.88),
    "necrosis": (0.30, 0.32, 0.88, 0.62),
    "rim": (0.55, 1.25, 0.72, 0.78),
    "tumour": (0.50, 0.52, 0.82, 0.80),
    "cyst": (0.24, 0.26, 1.00, 0.16),
    "calcification": (0.40, 0.30, 0.15, 0.18),
    "patchy": (0.55, 1.05, 0.78, 0.80),
}
_GAIN = (900.0, 1000.0, 1200.0, 800.0)
# CPM-RadPath / BraTS field of view (240 x 240 x 155 mm at 1 mm), kept whatever the grid.
_FOV_MM = (240.0, 240.0, 155.0)


def _smooth_noise(
    shape: tuple[int, ...], spacing: np.ndarray, sigma_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance smooth noise on the voxel grid, made on a coarse grid then interpolated,
    so its cost does not grow with the volume size."""
    from scipy.ndimage import gaussian_filter, zoom

    cell = sigma_mm / 2.0
    coarse = [max(4, int(math.ceil(n * s / cell)) + 4) for n, s in zip(shape, spacing, strict=True)]
    f = gaussian_filter(rng.standard_normal(coarse), sigma=2.0, mode="wrap")
    f = zoom(
        f, [n / c for n, c in zip(shape, coarse, strict=True)], order=1, grid_mode=True, mode="grid-wrap"
    )
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


def _ellipsoid(coords: list[np.ndarray], centre, semi) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside."""
    return np.sqrt(sum(((x - c) / a) ** 2 for x, c, a in zip(coords, centre, semi, strict=True)))


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def mri_affine(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A RAS-ish voxel-to-mm affine: BraTS field of view split over the grid, each spacing and
    the origin jittered a little per case, a small rotation about the axial axis."""
    spacing = np.array([f / n for f, n in zip(_FOV_MM, shape, strict=True)]) * rng.uniform(0.97, 1.03, 3)
    angle = math.radians(rng.uniform(-3, 3))
    rot = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    linear = rot @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    centre_vox = (np.array(shape) - 1) / 2.0
    offset = rng.uniform(-10, 10, 3) + np.array([0.0, 18.0, 12.0])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset - linear @ centre_vox
    return affine


def render_mri(
    shape: tuple[int, int, int], cls: str, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four co-registered, skull-stripped volumes (int16, zero outside the brain) and their affine.

    The tumour's look depends on the class: glioblastoma an enhancing rim around necrosis with
    wide FLAIR oedema; astrocytoma a homogeneous non-enhancing mass with a thin infiltrative
    margin, deep in white matter; oligodendroglioma a cortical, heterogeneous mass with
    calcifications and small cysts. Each class overlaps the others in size and position, some
    non-glioblastomas enhance a little, and brain size, position, intensity gain and bias field
    vary per case, so no single global statistic gives the class away."""
    from scipy.ndimage import gaussian_filter

    affine = mri_affine(shape, rng)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    coords = [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).reshape(
            [-1 if a == i else 1 for a in range(3)]
        )
        for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
    ]
    coords = [np.broadcast_to(c, shape) for c in coords]

    # Brain, cortex with gyri, deep grey matter, ventricles.
    scale = rng.uniform(0.88, 1.08)
    centre = rng.uniform(-6, 6, 3) + np.array([0.0, -8.0, 6.0])
    semi = np.array([68.0, 84.0, 60.0]) * scale * rng.uniform(0.95, 1.05, 3)
    rho = _ellipsoid(coords, centre, semi) * (1 + 0.05 * _smooth_noise(shape, spacing, 20.0, rng))
    brain = rho < 1.0
    gyri = _smooth_noise(shape, spacing, 4.0, rng)
    kinds = list(_SIGNAL)
    code = {k: np.uint8(i) for i, k in enumerate(kinds)}
    tissue = np.full(shape, code["wm"], dtype=np.uint8)
    tissue[rho > 0.82 + 0.05 * gyri] = code["gm"]
    tissue[(rho > 0.86) & (gyri > 1.3)] = code["csf"]  # sulci
    for side in (-1, 1):
        deep = _ellipsoid(
            coords, centre + np.array([side * 17.0, 0.0, -2.0]) * scale, np.array([10, 15, 10]) * scale
        )
        tissue[deep < 1] = code["deep_gm"]
    vent = rng.uniform(0.7, 1.4)
    for side in (-1, 1):
        v = _ellipsoid(
            coords, centre + np.array([side * 8.0, 4.0, 10.0]) * scale, np.array([5, 22, 8]) * scale * vent
        )
        tissue[v < 1] = code["csf"]
        plexus = _ellipsoid(
            coords, centre + np.array([side * 9.0, -14.0, 8.0]) * scale, np.array([3, 4, 3]) * scale
        )
        tissue[plexus < 1] = code["choroid"]

    # Tumour: position (cortical for O), size, irregular outline, class-specific parts.
    depth = {"O": (0.62, 0.8), "A": (0.2, 0.65), "G": (0.15, 0.65)}[cls]
    t_centre = centre + _random_direction(rng) * semi * rng.uniform(*depth)
    radius = rng.uniform(*{"G": (13.0, 30.0), "A": (11.0, 28.0), "O": (11.0, 26.0)}[cls]) * scale
    d = _ellipsoid(coords, t_centre, (radius,) * 3)
    d = d * (1 + 0.15 * _smooth_noise(shape, spacing, 8.0, rng))
    white = tissue == code["wm"]
    oedema_extent = {"G": rng.uniform(1.5, 2.2), "A": rng.uniform(1.1, 1.3), "O": rng.uniform(1.05, 1.2)}[cls]
    # Oedema tracks along white matter and spares the cortex.
    tissue[(d < oedema_extent) & (white | (d < 1.05))] = code["oedema"]
    tissue[d < 1] = code["tumour"]
    if cls == "G":
        # A thick, ragged enhancing ring around a necrotic core.
        rim = rng.uniform(0.25, 0.5)
        tissue[d < 1 - rim] = code["necrosis"]
        tissue[(d >= 1 - rim) & (d < 1)] = code["rim"]

    def spots(kind: str, count: int, reach: float, radii: tuple[float, float]) -> None:
        for _ in range(count):
            spot = t_centre + _random_direction(rng) * radius * rng.uniform(0, reach)
            tissue[(_ellipsoid(coords, spot, (rng.uniform(*radii),) * 3) < 1) & (d < 1)] = code[kind]

    if cls == "O":
        spots("calcification", int(rng.integers(2, 7)), 0.8, (1.5, 3.5))
        spots("cyst", int(rng.integers(0, 3)), 0.6, (3.0, 6.0))
    # Many oligodendrogliomas and some astrocytomas enhance in patches too.
    if cls != "G" and rng.random() < {"A": 0.25, "O": 0.45}[cls]:
        spots("patchy", int(rng.integers(1, 5)), 0.8, (2.0, 7.0))

    heterogeneity = {"G": 0.06, "A": 0.03, "O": 0.10}[cls]
    texture = _smooth_noise(shape, spacing, 3.0, rng)
    in_tumour = d < 1
    bias = np.exp(0.08 * _smooth_noise(shape, spacing, 60.0, rng))
    volumes = {}
    for m, name in enumerate(MODALITIES):
        levels = np.array([_SIGNAL[k][m] for k in kinds], dtype=np.float32)
        if name == "t1ce":
            # How strongly the ring enhances varies with dose and timing; a few glioblastomas
            # barely enhance at all.
            levels[code["rim"]] *= rng.uniform(0.8, 1.1) if rng.random() > 0.1 else rng.uniform(0.5, 0.7)
        signal = levels[tissue]
        signal = signal * (1 + 0.03 * texture + heterogeneity * texture * in_tumour)
        # Partial volume: tissue boundaries are not sharp at a voxel's scale.
        signal = gaussian_filter(signal, sigma=0.6)
        gain = _GAIN[m] * rng.uniform(0.7, 1.4)
        noisy = signal * bias + rng.normal(0, 0.02, shape).astype(np.float32)
        noisy = np.hypot(noisy, rng.normal(0, 0.02, shape).astype(np.float32))  # Rician magnitude
        value = np.clip(noisy * gain, 1, 32767)
        volumes[name] = np.where(brain, np.rint(value), 0).astype(np.int16)
    return volumes, affine


def write_mri(folder: Path, case_id: str, volumes: dict[str, np.ndarray], affine: np.ndarray) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    for name, data in volumes.items():
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm", "sec")
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        path = folder / f"{case_id}_{name}.nii.gz"
        tmp = folder / f".tmp-{case_id}_{name}.nii.gz"  # nibabel picks gzip from the suffix
        nib.save(image, tmp)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthCase:
    case_id: str
    cls: str  # the class the images are drawn from
    label: str | None  # the class written to labels.csv (after label noise); None: hidden set
    age_in_days: int
    seed: int


def plan_cohort(cfg: SynthConfig) -> list[SynthCase]:
    """Ids, classes, labels (with noise), ages and per-case seeds, all from `cfg.seed`."""
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    n = cfg.cases + cfg.unlabelled
    ids = case_ids(n, rng)
    labelled = [str(c) for c in rng.permutation(allocate_classes(cfg.cases, cfg.class_proportions))]
    hidden = [str(c) for c in rng.permutation(allocate_classes(cfg.unlabelled, cfg.class_proportions))]
    classes = labelled + hidden
    ages = [_age_in_days(c, rng) for c in classes]
    seeds = np.random.SeedSequence(cfg.seed).generate_state(n, dtype=np.uint64)
    # Last, so that the noise level changes nothing but the labels.
    labels: list[str | None] = [*flip_labels(labelled, cfg.label_noise, rng), *([None] * len(hidden))]
    return [SynthCase(ids[i], classes[i], labels[i], ages[i], int(seeds[i])) for i in range(n)]


def synth_case(case: SynthCase, out: str, cfg: SynthConfig) -> str:
    """Write one case's slide and four MRI volumes. A pure task: its files depend only on its
    arguments."""
    root = Path(out)
    rng = np.random.default_rng(case.seed)
    slide_rng, mri_rng = rng.spawn(2)
    width, height = cfg.wsi_size
    image = render_slide(width, height, cfg.wsi_mpp, slide_style(case.cls, slide_rng))
    write_slide(root / "Pathology" / f"{case.case_id}.tiff", image)
    volumes, affine = render_mri(tuple(cfg.mri_size), case.cls, mri_rng)
    write_mri(root / "Radiology" / case.case_id, case.case_id, volumes, affine)
    return case.case_id


def _check_out(out: Path, cases: list[SynthCase]) -> None:
    """Refuse to mix this cohort with cases already in OUT that it would not overwrite: ingest
    would take them for part of it."""
    ids = {c.case_id for c in cases}
    found = set()
    if (out / "Pathology").is_dir():
        found |= {
            p.stem for p in (out / "Pathology").iterdir() if p.suffix.lower() in (".tiff", ".tif", ".svs")
        }
    if (out / "Radiology").is_dir():
        found |= {p.name for p in (out / "Radiology").iterdir() if p.is_dir()}
    found = {f for f in found if not f.startswith(".")}  # temporaries of an interrupted run
    stale = sorted(found - ids)
    if stale:
        raise InputError(
            out,
            f"already holds {len(stale)} case(s) that are not part of this cohort (e.g. {stale[0]}); "
            "write into an empty folder",
        )


def _write_labels(path: Path, cases: list[SynthCase]) -> None:
    import csv

    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LABELS_HEADER)
        for c in sorted(cases, key=lambda c: c.case_id):
            if c.label is not None:
                writer.writerow([c.case_id, c.label, c.age_in_days])
    os.replace(tmp, path)


def synth_cohort(out: Path, cfg: SynthConfig) -> None:
    """Write a synthetic cohort in the CPM-RadPath layout into `out` (see the module docstring).

    labels.csv lists the `cfg.cases` labelled cases and is written last; the `cfg.unlabelled`
    others have slides and MRI only. Rerunning with the same config rewrites the same files;
    a folder holding other cases is refused rather than mixed with this cohort."""
    out = Path(out)
    cases = plan_cohort(cfg)
    _check_out(out, cases)
    (out / "Pathology").mkdir(parents=True, exist_ok=True)
    (out / "Radiology").mkdir(parents=True, exist_ok=True)
    map_tasks(synth_case, cases, scheduler="sync", description="synth cases", out=str(out), cfg=cfg)
    _write_labels(out / LABELS_CSV, cases)
    counts = {c: sum(1 for k in cases if k.label == c) for c in CLASSES}
    info(
        f"wrote {len(cases)} cases to {out} ({cfg.cases} labelled: "
        + ", ".join(f"{c} {counts[c]}" for c in CLASSES)
        + f"; {cfg.unlabelled} unlabelled)"
    )
