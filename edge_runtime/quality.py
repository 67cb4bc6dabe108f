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
# cells' circles cover most of it (0.4-1.0 on normal fields, dense or sparse); the few big circles of an
# under-resolved copy cover almost none (0.05).
RIM_MIN_COVER = 0.25

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
