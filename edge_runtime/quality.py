"""Is this field readable? A field the tool cannot read must never pass silently.

Two jobs, each a few small functions on plain arrays (numpy, and OpenCV imported the way segment.py does):

* :func:`measure_cell_diameter` -- the red-cell diameter of any field, also of wide views (mosaics, lower
  magnification) where a quick pass on a small copy sees cells too small to measure and returns a clump's size.
* :func:`assess_field` -- a :class:`FieldQuality` verdict: focus, exposure, cell size, too few cells, thick-smear
  look, each a short warning code with a one-line message saying what to do, and the measured figures.

Every threshold was chosen on IML training fields degraded on purpose and checked on validation fields
(``tools/quality_calibration.py``; figures and curves in docs/quality_gate.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from . import segment
from .segment import SegmentationUnavailable, _require_cv2  # noqa: F401  (re-exported for callers' except clauses)

try:
    import cv2
except ImportError:  # the hint is raised where a measurement is first needed (segment._require_cv2)
    cv2 = None


# ---------------------------------------------------------------------------------------------------------------
# Cell diameter at any magnification

# The first pass works like segment.field_diameter: lone blobs on a copy this many pixels on its long side, circles
# on a copy this many. On a 1280x960 field at 1000x (cells ~58 px) that puts cells at ~29 and ~18 px, enough for
# both; on a wider view (a mosaic, a lower magnification) the same copies hold cells of 9 px or less, the circle
# transform finds arcs of clumps instead, and the answer runs 2-3x too large.
FIRST_BLOB_SIDE = 640.0
FIRST_RIM_SIDE = 400.0

# The circles' answer is trusted when the cell it measures is at least this many pixels across on the copy the
# circles were sought on: below ~12 px a cell's rim and its pale centre blur into one dot (a 2x2 mosaic of 1000x
# fields on the 400 px copy: 9 px cells, 14 circles of "137 px").
RIM_MIN_PIXELS = 12.0

# ... and when its circles cover at least this fraction of the stained area (circle disks / stained pixels): real
# cells' circles cover most of it (all 184 IML fields 0.49-2.2, 1st percentile 0.69); the few big circles of an
# under-resolved copy cover little (2x2 mosaics: PA171690-93 0.05, PA171714-17 0.36). The margin is thin on the
# mosaic side: docs/quality_gate.md.
RIM_MIN_COVER = 0.42

# Each further pass doubles both copies' scale (up to full size); a 3x3 mosaic of 1000x fields needs three passes.
MAX_PASSES = 4

# A further pass follows one whose cells were too small to resolve, so after doubling they are still small: its
# circles are sought up to this radius (pixels of its copy) instead of an eighth of the copy, which halves the
# time of the Hough transform (its cost grows with the radius range) on a 2x2 mosaic.
REFINE_MAX_RADIUS = 40.0


def _side_scale(rgb: np.ndarray, side: float) -> float:
    """The factor bringing the image's long side to ``side`` pixels (never above 1: no upscaling)."""
    return min(1.0, side / float(max(rgb.shape[:2])))


def _blob_diameter(rgb: np.ndarray, scale: float) -> Optional[float]:
    """The lone round blobs' median diameter, in ``rgb``'s pixels, measured on a copy scaled by ``scale``
    (segment.field_diameter's first half)."""
    small = segment._resize(rgb, scale)
    density = segment.stain_density(small)
    mask = segment.foreground_mask(density, small)
    mask = segment.clean(mask, 1.5)
    mask = segment.fill_holes(mask, max_area=0.02 * mask.size)
    blobs = segment.estimate_diameter(mask)
    return None if blobs is None else blobs / scale


def _rim_diameter(rgb: np.ndarray, scale: float, max_radius: Optional[float] = None) -> Tuple[Optional[float], bool]:
    """The median diameter of the round rims (Hough circles) on a copy scaled by ``scale``, in ``rgb``'s pixels,
    and whether that copy resolved the cells (see RIM_MIN_PIXELS and RIM_MIN_COVER). ``max_radius``: the largest
    circle sought, in the copy's pixels (default an eighth of the copy, as segment.field_diameter)."""
    small = segment._resize(rgb, scale)
    density = segment.stain_density(small)
    top = max(small.shape[:2]) / 8.0 if max_radius is None else min(max_radius, max(small.shape[:2]) / 8.0)
    found = segment.circles(density, 3, top, 4, segment.SIZE_CIRCLE_PERFECTNESS)
    if len(found) < 3:
        return None, scale >= 1.0
    diameter_small = 2.0 * float(np.median(found[:, 2]))
    stained = np.count_nonzero(segment.foreground_mask(density, small))
    cover = float(np.sum(np.pi * found[:, 2] ** 2)) / max(1, stained)
    resolved = diameter_small >= RIM_MIN_PIXELS and cover >= RIM_MIN_COVER
    return diameter_small / scale, resolved


def _combine(blobs: Optional[float], rims: Optional[float]) -> Optional[float]:
    """segment.field_diameter's rule: the blobs' median unless the circles disagree by more than
    DIAMETER_AGREEMENT (a dense smear whose lone blobs are specks), then the circles'."""
    if rims is not None and (blobs is None or not 1.0 / segment.DIAMETER_AGREEMENT <= blobs / rims
                             <= segment.DIAMETER_AGREEMENT):
        return rims
    return blobs


def measure_cell_diameter(rgb: np.ndarray) -> Optional[float]:
    """The red-cell diameter of a field in its own pixels (the equivalent-circle diameter segment_field expects),
    at any magnification or field of view. The first pass is segment.field_diameter's (so a normal field gets the
    same answer); when its circles did not resolve the cells (too few pixels per cell on the small copy), both
    copies are made twice as large and the field is measured again, up to full size. None when no cells."""
    _require_cv2()
    rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
    blob_scale = _side_scale(rgb, FIRST_BLOB_SIDE)
    rim_scale = _side_scale(rgb, FIRST_RIM_SIDE)
    diameter, max_radius = None, None
    for _ in range(MAX_PASSES):
        rims, resolved = _rim_diameter(rgb, rim_scale, max_radius)
        diameter = _combine(_blob_diameter(rgb, blob_scale), rims)
        if resolved or rim_scale >= 1.0:
            break
        blob_scale, rim_scale = min(1.0, 2.0 * blob_scale), min(1.0, 2.0 * rim_scale)
        max_radius = REFINE_MAX_RADIUS
    return diameter


def expected_diameter(diameters: Sequence[Optional[float]]) -> Optional[float]:
    """The cell diameter a slide's fields should share: the median of its fields' measured diameters (None where
    fewer than MIN_SLIDE_FIELDS were measured). One camera on one microscope at one magnification sees the same
    cells the same size, so a field far from its slide's median was measured wrongly or is a different view."""
    known = [float(d) for d in diameters if d]
    return float(np.median(known)) if len(known) >= MIN_SLIDE_FIELDS else None


# A slide's expected diameter needs this many measured fields (one odd field must not set it).
MIN_SLIDE_FIELDS = 3


# ---------------------------------------------------------------------------------------------------------------
# Field quality: measurements

# Focus is measured on a copy where a cell is at most this many pixels across (as segmentation's working copy), so
# that the bands below are the same part of a cell at every magnification (and the measurement costs the same).
FOCUS_DIAMETER = 40.0

# The focus bands, Gaussian scales as fractions of the cell diameter: the fine band (FOCUS_FINE to FOCUS_MID) holds
# a cell's rim and a parasite's chromatin dots (~1/8 of a cell and less), the coarse band (FOCUS_MID to
# FOCUS_COARSE) the cell's body and pale centre. Defocus removes the fine band first; the ratio of the two is a
# property of the optics, not of how many cells the field holds (both bands are measured on the same pixels).
FOCUS_FINE = 1.0 / 40.0
FOCUS_MID = 1.0 / 20.0
FOCUS_COARSE = 1.0 / 10.0

# A pixel at least this fraction of the field's brightest grey is clear glass (see clear_fraction): a red cell
# absorbs more than a tenth of the light in some part of its body, glass does not.
CLEAR_LEVEL = 0.9

# Edges for the blur estimate: gradient maxima above this percentile of the field's gradient (cell rims and
# parasites, not the glass's noise), at least MIN_EDGE_PIXELS of them.
EDGE_PERCENTILE = 80
MIN_EDGE_PIXELS = 50

# Pixels whose brightest channel is at or below this are a black mask (composed fields, masked crops, vignette),
# not under-exposed glass: exposure is judged on the rest (segment's BLACK_LEVEL).
BLACK_LEVEL = segment.BLACK_LEVEL

# A channel value at or above this is clipped white; at or below CLIPPED_DARK (and not black mask) clipped dark.
CLIPPED_BRIGHT = 250
CLIPPED_DARK = 5


def _cell_copy(rgb: np.ndarray, diameter: float) -> Tuple[np.ndarray, float]:
    """``rgb`` scaled so a cell is at most FOCUS_DIAMETER pixels across (never upscaled), and the cell's diameter
    on that copy."""
    scale = min(1.0, FOCUS_DIAMETER / float(diameter))
    return segment._resize(np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8), scale), float(diameter) * scale


def _band_energy(density: np.ndarray, where: np.ndarray, fine: float, coarse: float) -> float:
    """Mean squared difference-of-Gaussians response of ``density`` between scales ``fine`` and ``coarse``
    (pixels; 0 means the picture itself) over the pixels ``where``."""
    low = cv2.GaussianBlur(density, (0, 0), coarse)
    high = density if fine <= 0 else cv2.GaussianBlur(density, (0, 0), fine)
    band = (high - low)[where]
    return float(np.mean(band * band)) if band.size else 0.0


def _gradient(density: np.ndarray, sigma: float) -> np.ndarray:
    """Gradient magnitude of ``density`` smoothed by a Gaussian of ``sigma`` pixels (density units per pixel)."""
    smooth = cv2.GaussianBlur(density, (0, 0), sigma)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    return np.sqrt(gx * gx + gy * gy)


def edge_blur(density: np.ndarray, diameter: float) -> float:
    """The blur of the field's edges as a Gaussian sigma, in pixels of a FOCUS_DIAMETER-pixel cell (so a number
    for the optics, whatever the magnification). Re-blur estimate: a step edge of any height blurred by sigma has a
    peak gradient proportional to 1/sqrt(sigma^2 + s^2) after a further Gaussian of s, so the ratio R of the peaks
    at s1 < s2 gives sigma^2 = (s2^2 - R^2 s1^2) / (R^2 - 1) with the edge's contrast cancelled: a field of pale
    cells and one of dark cells, crowded or sparse, read the same. Taken at the strongest edges (local maxima of
    the gradient above its EDGE_PERCENTILE), median over them; NaN when there are none."""
    s1, s2 = (max(0.5, f * diameter) for f in (FOCUS_FINE, FOCUS_MID))
    g1, g2 = _gradient(density, s1), _gradient(density, s2)
    peaks = (g2 >= cv2.dilate(g2, np.ones((3, 3), np.uint8))) & (g2 > np.percentile(g2, EDGE_PERCENTILE))
    ratio = g1[peaks] / np.maximum(g2[peaks], 1e-9)
    ratio = ratio[ratio > 1.0 + 1e-4]
    if ratio.size < MIN_EDGE_PIXELS:
        return float("nan")
    sigma2 = (s2 * s2 - ratio * ratio * s1 * s1) / (ratio * ratio - 1.0)
    return float(np.sqrt(max(float(np.median(sigma2)), 0.0))) * FOCUS_DIAMETER / diameter


def focus_metrics(density: np.ndarray, cells: np.ndarray, diameter: float) -> Dict[str, float]:
    """``edge_blur`` (:func:`edge_blur`, the gate's focus figure) and ``focus`` (fine-to-coarse band energy
    ratio over the cells, FOCUS_FINE..FOCUS_MID over FOCUS_MID..FOCUS_COARSE: reported, not judged; it varies
    with the cells' own detail between slides as much as with blur)."""
    fine, mid, coarse = (max(0.5, f * diameter) for f in (FOCUS_FINE, FOCUS_MID, FOCUS_COARSE))
    base = _band_energy(density, cells, mid, coarse)
    band = _band_energy(density, cells, fine, mid) / base if base > 0 else float("nan")
    return {"edge_blur": edge_blur(density, diameter), "focus": band}


def exposure_metrics(rgb: np.ndarray, glass: np.ndarray) -> Dict[str, float]:
    """``glass_brightness``: median grey level of the bare glass (``glass``: bool mask of ``rgb``; NaN when the
    field shows none), ``clipped_bright``/``clipped_dark``: fractions of the non-black pixels with a channel clipped
    white / all channels clipped dark, ``glass_fraction``: share of the non-black pixels that is glass."""
    top = rgb.max(axis=2)
    lit = top > BLACK_LEVEL
    n_lit = max(1, int(np.count_nonzero(lit)))
    grey = rgb.mean(axis=2)
    glass = glass & lit
    return {"glass_brightness": float(np.median(grey[glass])) if np.any(glass) else float("nan"),
            "clipped_bright": float(np.count_nonzero(lit & (top >= CLIPPED_BRIGHT))) / n_lit,
            "clipped_dark": float(np.count_nonzero((top <= CLIPPED_DARK))) / max(1, top.size),
            "glass_fraction": float(np.count_nonzero(glass)) / n_lit}


def _regions_of(cells_or_regions) -> list:
    """CellRegion objects from a list of CellRegion or of FieldCell (whose ``region`` is one)."""
    return [getattr(c, "region", None) or c for c in cells_or_regions]


def field_metrics(rgb: np.ndarray, cells_or_regions, diameter: Optional[float]) -> Dict[str, float]:
    """Every figure the gate judges, as a flat dict of floats (the ``metrics`` of :class:`FieldQuality`)."""
    _require_cv2()
    regions = _regions_of(cells_or_regions)
    h, w = rgb.shape[:2]
    metrics: Dict[str, float] = {"diameter": float(diameter) if diameter else float("nan"),
                                 "cells": float(len(regions)),
                                 "cell_median_diameter": float(np.median([r.diameter for r in regions]))
                                 if regions else float("nan")}
    d = float(diameter) if diameter and diameter >= 6 else max(h, w) / 20.0
    small, d_small = _cell_copy(rgb, d)
    density = segment.stain_density(small)
    stained = segment.foreground_mask(density, small)
    near_cells = cv2.dilate(stained.astype(np.uint8), segment.disk(max(1.0, 0.1 * d_small))) > 0
    metrics.update(focus_metrics(density, near_cells, d_small))
    if not metrics["edge_blur"] == metrics["edge_blur"]:  # NaN: no edges at all (blank or uniform picture)
        metrics["edge_blur"] = float("inf")
    # Glass: well clear of any stain (a rim's halo is neither glass nor cell).
    glass_small = ~(cv2.dilate(stained.astype(np.uint8), segment.disk(max(1.0, 0.1 * d_small))) > 0)
    metrics.update(exposure_metrics(small, glass_small))
    n_lit = max(1, int(np.count_nonzero(small.max(axis=2) > BLACK_LEVEL)))
    metrics["stained_fraction"] = float(np.count_nonzero(stained)) / n_lit
    cell_area = float(sum(r.area for r in regions)) * (small.shape[0] / float(h)) ** 2
    metrics["cell_cover"] = cell_area / max(1, int(np.count_nonzero(stained)))
    metrics["clear_fraction"] = clear_fraction(small)
    return metrics


def clear_fraction(rgb: np.ndarray) -> float:
    """The share of the lit pixels (not black mask) within CLEAR_LEVEL of the field's brightest grey (its 99.5th
    percentile): the clear glass between the cells. Relative to the field's own brightest, so exposure does not
    move it; a thin smear shows glass between its cells (0.27-0.74 on IML train fields, the densest included), a thick
    smear or a picture of something else almost none."""
    grey = rgb.mean(axis=2)
    lit = grey[rgb.max(axis=2) > BLACK_LEVEL]
    if lit.size == 0:
        return 0.0
    return float(np.mean(lit >= CLEAR_LEVEL * np.percentile(lit, 99.5)))


# ---------------------------------------------------------------------------------------------------------------
# Field quality: the verdict (thresholds from tools/quality_calibration.py on IML training fields)

# Out of focus when the edges' blur (edge_blur, pixels of a 40 px cell) is above this. Calibrated on IML train
# fields: sharp to blur sigma 1 (field pixels) measure 1.27-1.70, sigma 3 and more 1.88 and up; see
# docs/quality_gate.md.
FOCUS_MAX_BLUR = 1.8

# Glass darker than this grey level is under-exposed: the stain's contrast sinks into the camera's noise and the
# classifier calls dark cells parasitized (x0.35: 13 parasitized instead of 5). IML train glass: originals
# 171-220, x0.7 119-153, x0.5 85-110, x0.35 59-76; 115 is about the geometric middle of 76 and 171 (x0.5, half
# the light, is flagged too: it already cost a parasite in 3 fields of 5-8).
GLASS_DARK = 115.0
# More than this share of the lit pixels clipped white is over-exposed: pale cells and the pale rings of young
# parasites wash out into the glass (x1.5 left 4 and 35 cells of 150 and 136). IML train: originals 0.000,
# x1.5 0.40 and more.
CLIPPED_BRIGHT_MAX = 0.1
# More than this share of all pixels with every channel clipped dark is under-exposed. A black mask (composed
# fields) is dark too, so this is only a backstop to the glass grey level: it is set above any mask share seen.
CLIPPED_DARK_MAX = 0.5

# The measured cell size may differ from the slide's (or the caller's) expected size by this factor at most.
CELL_SIZE_TOLERANCE = 1.25
# Cells smaller than this many pixels across hold a ring stage in one or two pixels: too low a magnification.
MIN_READABLE_DIAMETER = 20.0
# The cells segmentation kept must have about the diameter it was given (median within this factor): otherwise it
# ran at the wrong scale (a mosaic measured at a clump's size keeps clumps).
SEGMENTED_SIZE_TOLERANCE = 1.4

# Fewer whole cells than this give a parasitemia whose 95% interval spans tens of percent.
MIN_CELLS = 10

# A thick smear (or anything that is not a thin smear): clear glass on less than this share of the lit pixels
# (IML thin fields 0.27-0.74 on train, the synthetic thick smears of tools/quality_calibration.py below 0.1) ...
THICK_CLEAR_FRACTION = 0.15
# ... or stain over more than this share of them.
THICK_STAINED_FRACTION = 0.9

MESSAGES = {
    "out_of_focus": "out of focus (edges blurred {edge_blur:.2f} > {limit:.2f} px per 40 px cell): parasites are "
                    "lost in a blurred field; refocus and capture again",
    "under_exposed": "under-exposed (glass grey {glass_brightness:.0f}, {clipped_dark:.0%} clipped dark): dark "
                     "cells read as parasitized; open the light or raise the exposure and capture again",
    "over_exposed": "over-exposed ({clipped_bright:.0%} of the field clipped white): pale parasites wash out; "
                    "lower the light or the exposure and capture again",
    "cell_size": "red cells measure {diameter:.0f} px ({reason}): check the magnification (1000x oil) and that "
                 "this is one field, not a mosaic or a crop; the counts are unreliable",
    "too_few_cells": "only {cells:.0f} whole red cells: too few for a parasitemia; capture a field in the "
                     "monolayer with more cells",
    "thick_smear": "this does not look like a thin smear (clear glass on {clear_fraction:.0%} of the field, "
                   "{stained_fraction:.0%} stained): thick smears and non-smear pictures cannot be counted by this "
                   "tool; capture the thin part of a thin smear",
}


@dataclass(frozen=True)
class FieldQuality:
    """The gate's verdict on one field. ``ok``: no warning. ``warnings``: short codes (out_of_focus,
    under_exposed, over_exposed, cell_size, too_few_cells, thick_smear); ``messages``: one line per warning saying
    what is wrong and what to do; ``metrics``: every figure measured (see :func:`field_metrics`)."""
    ok: bool
    warnings: Tuple[str, ...] = ()
    messages: Tuple[str, ...] = ()
    metrics: Dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def warning_text(self) -> str:
        """The codes joined by ';' (the ``warnings`` column of a result row), empty when ok."""
        return ";".join(self.warnings)


def _size_problem(metrics: Dict[str, float], expected: Optional[float]) -> Optional[str]:
    """Why the cell size is wrong, or None."""
    d = metrics["diameter"]
    if not d == d:  # NaN: no diameter at all
        return "no cell size could be measured"
    if d < MIN_READABLE_DIAMETER:
        return f"below {MIN_READABLE_DIAMETER:.0f} px"
    if expected and not 1.0 / CELL_SIZE_TOLERANCE <= d / expected <= CELL_SIZE_TOLERANCE:
        return f"expected about {expected:.0f} px"
    kept = metrics["cell_median_diameter"]
    if kept == kept and metrics["cells"] >= MIN_CELLS and not (
            1.0 / SEGMENTED_SIZE_TOLERANCE <= kept / d <= SEGMENTED_SIZE_TOLERANCE):
        return f"the cells kept measure {kept:.0f} px"
    return None


def judge(metrics: Dict[str, float], expected_diameter: Optional[float] = None) -> FieldQuality:
    """The verdict on measured ``metrics`` (a pure function of the figures: the calibration replays it)."""
    m = metrics
    found = []
    thick = m["stained_fraction"] > THICK_STAINED_FRACTION or m["clear_fraction"] < THICK_CLEAR_FRACTION
    if thick:  # the one thing to say: what else is measured on such a picture means nothing
        return FieldQuality(False, ("thick_smear",), (MESSAGES["thick_smear"].format(**m),), dict(m))
    if m["cells"] < MIN_CELLS:
        found.append(("too_few_cells", {}))
    if m["edge_blur"] > FOCUS_MAX_BLUR and m["cells"] >= 1:
        found.append(("out_of_focus", {"limit": FOCUS_MAX_BLUR}))
    if m["glass_brightness"] < GLASS_DARK or m["clipped_dark"] > CLIPPED_DARK_MAX:
        found.append(("under_exposed", {}))
    if m["clipped_bright"] > CLIPPED_BRIGHT_MAX:
        found.append(("over_exposed", {}))
    reason = _size_problem(m, expected_diameter)
    if reason:
        found.append(("cell_size", {"reason": reason}))
    codes = tuple(code for code, _ in found)
    messages = tuple(MESSAGES[code].format(**{**m, **extra}) for code, extra in found)
    return FieldQuality(not codes, codes, messages, dict(m))


def assess_field(rgb: np.ndarray, cells_or_regions, diameter: Optional[float],
                 expected_diameter: Optional[float] = None) -> FieldQuality:
    """Can this field be read? ``rgb``: the field (HxWx3 uint8); ``cells_or_regions``: what segmentation kept
    (CellRegion or FieldCell objects); ``diameter``: the cell diameter segmentation used (pixels);
    ``expected_diameter``: what this slide's cells should measure (:func:`expected_diameter` of its other fields,
    or a model card's range), None to skip that check."""
    return judge(field_metrics(rgb, cells_or_regions, diameter), expected_diameter)
