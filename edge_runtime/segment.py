"""Find the red cells of a thin-smear microscope field and cut each one the way the training cells look.

One small function per picture step, each taking and returning plain arrays, with every size derived from the cell
diameter measured on the field itself (never a fixed pixel count, since magnification differs between labs):

    stain density -> foreground (local threshold) -> clean -> fill holes -> estimate diameter (checked by circles)
    -> distance -> seeds (circles + distance peaks) -> split -> take back what lies outside a cell's circle
    -> split clumps -> regions -> filter (size, shape, colour, border) -> give overlapping cells back their shared
    part -> cut

The NIH training crops are single cells masked on black in a tight box; :func:`cut_cell` makes the same picture
from a field, and :func:`central_cell` finds the one cell of a crop made by another tool, so the model sees one kind
of input whoever cut the cell. Uses OpenCV (``opencv-python-headless``); ``segment_field(rgb, debug_dir=...)``
writes every step's picture for tuning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .errors import MalariaEdgeError

try:
    import cv2
except ImportError:  # the hint is raised where segmentation is first needed
    cv2 = None

OPENCV_HINT = "whole-field images need OpenCV: pip install 'malaria-edge[fields]' (or opencv-python-headless)"

# Steps run on a copy scaled so that a red cell is about this many pixels across: enough to split touching cells,
# small enough that a 12 MP phone photo segments in well under a second.
WORK_DIAMETER = 40.0

# Below this optical density (stain absorbance relative to the local background) a pixel is background whatever
# Otsu says: guards a field with almost no cells, where Otsu would split the background's own noise.
MIN_DENSITY = 0.06

# Pixels this dark in every channel are not stain but a black mask, vignette or burned-in scale bar.
BLACK_LEVEL = 40


# A blob more than this fraction deep purple is a white cell's nucleus (or a stain blob), not a red cell.
NUCLEUS_FRACTION = 0.5

# A region this many cell areas or more is a clump of overlapping cells, split by k-means (see split_clumps).
CLUMP_AREA = 1.9
# ... unless it is one enlarged infected cell (P. vivax trophozoite, schizont, gametocyte: up to ~1.6 diameters,
# ENLARGED_AREA cell areas): round, its largest inscribed disk covering at least 1 / ONE_CELL_FILL of it, with no
# waist (ONE_CELL_SOLIDITY of its convex hull). Two overlapping cells big enough to reach CLUMP_AREA fill about 1.9
# inscribed disks. On the IML train fields the clump regions holding two annotated cells filled 1.41 or more, the
# infected cells that k-means cut in two 1.15-1.35 (parasites in a found cell 168 -> 170 of 178); val unchanged.
ENLARGED_AREA = 2.6
ONE_CELL_FILL = 1.35
ONE_CELL_SOLIDITY = 0.95
# A parasite the split cut in two shows in both halves. Two touching whole cells that both reach the candidate
# threshold are joined into one cell (:func:`joined_region`, called by fields.join_split_candidates) when their union
# is one round cell: connected, no bigger than ENLARGED_AREA cell areas and as solid as one cell (ONE_CELL_SOLIDITY
# of its convex hull; two round cells side by side have a waist: 0.88 touching, 0.94 with centres 0.8 d apart). The
# inscribed-disk fill of ONE_CELL_FILL is not asked: an elongated infected cell fills ~1.7. On the IML train fields
# it joins two pairs: the elongated infected cell of PA171741, cut across (IoU with its box 0.44 / 0.45 -> 0.78),
# and an infected cell found already with a piece of it cut off (0.75 -> 0.64); none on val. The touching candidate
# pairs that are two annotated cells reached at most 0.89 (train) and 0.91 (val).
# A candidate cut short (its pale side given to the glass or to a deep-stained neighbour, as enlarged infected cells
# are) is re-fitted to its own colour (:func:`refit_outline`, called by fields.refit_candidates): in a window of
# REFIT_PAD diameters around it, three colour models (mean and variance of the blurred log colour, blur REFIT_BLUR
# diameters): the cell's own core (its pixels deeper inside than REFIT_CORE diameters), its neighbours' cores
# (deeper than REFIT_NEIGHBOUR_CORE) and the glass. The pixels nearest its own model, within REFIT_REACH diameters
# of its outline, never in a neighbour's core, connected to its core, holes filled, opened by REFIT_OPEN diameters,
# are added to it when the cell stays one round cell (connected, ONE_CELL_SOLIDITY of its hull, up to ENLARGED_AREA
# cell areas). Only growth: an outline already right is left as it is. IML train fields: the held parasites'
# candidates fit their boxes better (mean IoU 0.778 -> 0.796, those below 0.65: 16 -> 11), none lost; val 0.787 ->
# 0.802 (5 -> 2). Designed on train; GrabCut did as well but OpenCV.js has none (docs/experiments.md, tenth pass).
REFIT_PAD = 0.6
REFIT_BLUR = 0.05
REFIT_CORE = 0.15
REFIT_NEIGHBOUR_CORE = 0.2
REFIT_REACH = 0.5
REFIT_OPEN = 0.1
# A colour model needs this many pixels; the variance floor keeps a flat class (black glass) finite.
REFIT_MIN_PIXELS = 10
REFIT_MIN_VARIANCE = 1e-4
# A region bigger than this many cells is not a clump k-means can cut sensibly (a failed threshold, a smear too
# thick to read): it stays whole and the size filter drops it.
CLUMP_MAX_CELLS = 6
NUCLEUS_DENSITY_RATIO = 2.0

# A mature P. vivax parasite (trophozoite, schizont, gametocyte) fills its cell with stain as dense as a nucleus,
# but holds brown pigment (hemozoin): a dense blob with at least PIGMENT_FRACTION of its pixels brown (blue
# absorbed more than red by PIGMENT_OD) is an infected red cell, not a white cell. On the IML train and val
# fields the white cells hold at most 0.09 (one, maybe an eosinophil's granules, 0.18), the infected cells the
# nucleus test dropped at least 0.13.
PIGMENT_OD = 0.1
PIGMENT_FRACTION = 0.11

# The local stain threshold is measured in tiles about this many (working-scale) cells across.
LOCAL_TILE_CELLS = 5

# A cell whose outline comes within this fraction of a diameter of the image edge may be cut there (its pale rim
# lost in the edge): it is not counted as a whole cell. (Counting cut cells with 80% of their diameter in view found
# 4 more train parasites but, against the annotated counts, read the validation slides' parasitemia 7% lower on
# average: the annotators boxed few cut cells. docs/experiments.md, fifth pass.)
BORDER_MARGIN = 0.05

# Circles sought by the Hough transform: radii from this fraction of the field's diameter to the next, and how
# round an edge must be to count (HOUGH_GRADIENT_ALT's 0-1 "perfectness"). Up to 0.75: a P. vivax infected cell
# is enlarged to ~1.4 diameters, and without a circle of its own it fragmented or merged.
CIRCLE_RADII = (0.35, 0.75)
CIRCLE_PERFECTNESS = 0.45

# OpenCV's own suppression of nearby circles (its minDist, in diameters) is kept small: at 0.45 d it also dropped
# the circle of a cell overlapping a stronger neighbour, leaving that cell without a seed. Seeding circles are then
# thinned by centre distance ourselves, in the order OpenCV returns them (its documentation: larger accumulator
# values first).
HOUGH_MIN_DISTANCE = 0.15
CIRCLE_SPACING = 0.55

# A circle whose centre falls on glass still seeds a cell when this fraction of its disk is stained: a pale cell
# whose central pallor opens onto the glass (a "C" in the mask). Its disk, shrunk by PALE_CENTRE_FILL, is filled.
PALE_CENTRE_COVER = 0.5
PALE_CENTRE_FILL = 0.9

# A circle-seeded region's pixels farther than these multiples of its circle's radius are not its own: beyond
# BORDER_TRIM and reaching the image edge they are a cut neighbour that had no seed (kept, the cell would count as
# cut by the border and be dropped); beyond REACH_TRIM and smaller than MIN_CELL_AREA they are a sliver of a
# neighbour that widens the cell's box.
BORDER_TRIM = 1.05
REACH_TRIM = 1.3
# ... and slivers trimmed from several cells that together cover SEEDLESS_AREA of a cell are a cell no seed reached
# (shared out among its neighbours: an enlarged infected cell with no circle of its own, or a cell in a dense smear):
# their convex hull becomes a cell. Half a cell, as for a cell cut by the image edge (EDGE_CELL_AREA), not fitted.
# IML train fields: the schizont of PA171851 is found (parasites in a found cell 172 -> 173 of 178), red-cell
# recall 97.32% -> 97.37%, count error unchanged; val unchanged.
SEEDLESS_AREA = 0.5

# An enlarged infected cell (P. vivax trophozoite, schizont, gametocyte) can be paler than its neighbours: in a
# deep-stained smear its density falls below the cell/glass threshold, so it comes out as glass (a hole too big to
# fill) and its rim goes to the neighbours. Pixels above PALE_LEVEL of the local threshold (never below PALE_FLOOR,
# where glass halos and pale smears' cell centres lie) and pink (green absorbed PALE_PINK times as much as red or
# more: glass of another brightness, as where the fields of a mosaic meet, is grey) that no region claims, opened
# by PALE_OPEN diameters, form a pale cell when they cover PALE_AREA cell areas and are solid (PALE_SOLIDITY of
# their convex hull); the cell is that hull grown by PALE_GROW diameters (the part its neighbours took). Chosen on
# the train fields (parasites in a found cell 161 -> 167 of 178), checked on val (no change, no region added on its
# pale smears) and on a 2x2 mosaic of pale-smear fields (2 regions of glass at the seams without PALE_PINK, none
# with it).
PALE_LEVEL = 0.45
PALE_FLOOR = 0.15
PALE_PINK = 1.25
PALE_OPEN = 0.2
PALE_AREA = (0.8, 2.6)
PALE_SOLIDITY = 0.85
PALE_GROW = 0.15

# The smallest region, in cell areas, that is counted as a red cell (platelets, debris and slivers are smaller).
MIN_CELL_AREA = 0.3

# A cell cut by the image edge is never counted (the annotators' convention, and a microscopist's: half a cell is not
# a cell to count), but one with at least EDGE_CELL_AREA cell areas in view is cut and classified so that a parasite
# at the edge can be shown for review (IML train fields: the 4 parasites at the edge, 0.94-1.36 cell areas in view,
# scored 0.96-0.99; 1.5% of the other cut cells reach the candidate threshold, about 0.3 a field).
EDGE_CELL_AREA = 0.5

# A hole in the stained mask up to HOLE_AREA cell areas is a cell's pale centre and is filled; a bigger one is glass
# ringed by touching cells (star-shaped between round cells), except a round one (ROUND_HOLE_SOLIDITY of its hull)
# up to ROUND_HOLE_AREA: the pale centre of an enlarged infected cell whose rim alone took the stain (on the IML
# train fields one more parasite in a found cell, 170 -> 171 of 178, no change in cell recall or count; val
# unchanged).
HOLE_AREA = 0.6
ROUND_HOLE_AREA = 1.3
ROUND_HOLE_SOLIDITY = 0.9
# The opening that removes speckle also breaks the thin rim of a pale enlarged cell, and its centre then opens onto
# the glass. A round hole of the stained mask before the opening (RIM_HOLE_AREA to ROUND_HOLE_AREA cell areas) is
# filled when the stain around it, after the opening, is no more than one enlarged cell (hole and touching parts up
# to ENLARGED_AREA): a broken rim. Glass ringed by several cells touches more stain and stays open (IML train fields:
# one more parasite in a found cell, 171 -> 172 of 178; val unchanged).
RIM_HOLE_AREA = 0.1

# Circles that measure a field's cell size must be rounder than seeds need to be: looser ones in a dense smear
# include arcs of two neighbouring cells, and their median runs a fifth too large.
SIZE_CIRCLE_PERFECTNESS = 0.6

# The lone blobs' diameter is trusted while it is within this factor of the circles' (see field_diameter).
DIAMETER_AGREEMENT = 1.33


class SegmentationUnavailable(MalariaEdgeError, RuntimeError):
    """OpenCV is not installed; the message says how to install it."""


def _require_cv2():
    if cv2 is None:
        raise SegmentationUnavailable(OPENCV_HINT)


@dataclass
class CellRegion:
    """One red cell found in an image. ``box`` is (x, y, w, h) in the image's own pixels; ``mask`` is a bool array
    of the box's shape, True on the cell; ``area`` its pixel count; ``centre`` (x, y) its centroid."""
    box: Tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)
    area: int = 0
    centre: Tuple[float, float] = (0.0, 0.0)
    touches_border: bool = False

    @property
    def diameter(self) -> float:
        """Equivalent-circle diameter in pixels."""
        return math.sqrt(4.0 * self.area / math.pi)


# ---------------------------------------------------------------------------------------------------------------
# Picture steps


def glass_level(channel: np.ndarray) -> np.ndarray:
    """The brightness of bare glass at every pixel of one channel: the brightest level in coarse tiles (max over
    3x3 tiles of 1/24 of the image, smoothed), which follows vignetting and uneven light."""
    h, w = channel.shape
    tile = max(8, int(round(max(h, w) / 24)))
    small = cv2.resize(channel, (max(1, w // tile), max(1, h // tile)), interpolation=cv2.INTER_AREA)
    # The glass is the bright part: a max filter over 3x3 tiles skips cells up to ~2 tiles across.
    background = cv2.dilate(small, np.ones((3, 3), np.uint8))
    background = cv2.GaussianBlur(background, (0, 0), 1.5)
    return cv2.resize(background, (w, h), interpolation=cv2.INTER_LINEAR)


def channel_densities(rgb: np.ndarray) -> List[np.ndarray]:
    """Optical density of each channel (red, green, blue), float32 >= 0: -log(pixel / glass), the glass level
    (:func:`glass_level`) taken per channel, which removes uneven illumination and the camera's white balance."""
    out = []
    for c in range(3):
        channel = rgb[:, :, c].astype(np.float32) + 1.0
        background = glass_level(channel)
        out.append(np.log(np.maximum(background, channel) / channel).astype(np.float32))
    return out


def stain_density(rgb: np.ndarray, channels: Optional[List[np.ndarray]] = None) -> np.ndarray:
    """Optical density of the stain, float32 >= 0: the largest of the three :func:`channel_densities`
    (``channels`` when the caller has them). Taking the channel that absorbs most keeps pink, magenta and
    blue-grey cells alike (Giemsa batches and cameras differ)."""
    channels = channel_densities(rgb) if channels is None else channels
    return np.maximum(np.maximum(channels[0], channels[1]), channels[2])


def pigment_mask(channels: List[np.ndarray]) -> np.ndarray:
    """Brown pixels, as of malaria pigment (hemozoin): blue absorbed more than red by PIGMENT_OD. Giemsa's purple
    absorbs red at least as much as blue, so a white cell's nucleus holds almost none."""
    return channels[2] - channels[0] > PIGMENT_OD


def _otsu_level(density: np.ndarray) -> float:
    """Otsu's threshold of a stain-density array, in density units."""
    scaled = np.clip(density * 255.0, 0, 255).astype(np.uint8).reshape(-1, 1)
    level, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return level / 255.0


def threshold_map(density: np.ndarray) -> np.ndarray:
    """The stain level that separates cells from glass at every pixel: Otsu's threshold of the whole field, lowered
    (never raised) where a tile of about LOCAL_TILE_CELLS cells across, holding both glass and cells, has its own
    lower Otsu level; smooth between tile centres. A thinner or less focused part of the smear has paler cells, and
    one threshold for the whole field loses them (they come out as rims and fragments); never below MIN_DENSITY."""
    whole = max(_otsu_level(density), MIN_DENSITY)
    h, w = density.shape
    tile = LOCAL_TILE_CELLS * WORK_DIAMETER
    rows, cols = max(1, int(round(h / tile))), max(1, int(round(w / tile)))
    grid = np.full((rows, cols), whole, np.float32)
    for i in range(rows):
        for j in range(cols):
            part = density[i * h // rows:(i + 1) * h // rows, j * w // cols:(j + 1) * w // cols]
            stained = float(np.mean(part > 2 * MIN_DENSITY))
            if 0.1 < stained < 0.95:
                grid[i, j] = min(whole, _otsu_level(part))
    if rows == 1 and cols == 1:
        return np.full((h, w), max(float(grid[0, 0]), MIN_DENSITY), np.float32)
    return np.maximum(cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR), MIN_DENSITY)


def foreground_mask(density: np.ndarray, rgb: np.ndarray, threshold: Optional[np.ndarray] = None) -> np.ndarray:
    """Cells vs glass: stain density above the local threshold (:func:`threshold_map`; ``threshold`` when the
    caller has it); black pixels (mask, vignette, scale bar) are never foreground."""
    mask = density > (threshold_map(density) if threshold is None else threshold)
    mask &= rgb.max(axis=2) > BLACK_LEVEL
    return mask


def disk(radius: float) -> np.ndarray:
    """A round structuring element of the given radius in pixels (at least 3x3)."""
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def clean(mask: np.ndarray, radius: float) -> np.ndarray:
    """Opening by a disk of ``radius``: removes speckle, fibrin threads, the scale bar's thin line and the thin
    bridges where two cells barely touch, without eroding whole cells."""
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk(radius)).astype(bool)


def fill_holes(mask: np.ndarray, max_area: float, round_max_area: float = 0.0) -> np.ndarray:
    """Fill enclosed background smaller than ``max_area``: a red cell's pale centre is below the stain threshold,
    but glass ringed by several touching cells (bigger than a cell) must stay background. Holes up to
    ``round_max_area`` are filled too when round (see ROUND_HOLE_AREA)."""
    inverse = (~mask).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(inverse, connectivity=4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (~touches) & (area <= max_area)
    fill[0] = False
    for hole in np.flatnonzero((~touches) & (area > max_area) & (area <= round_max_area)):
        if hole > 0:
            window = labels[y[hole]:y[hole] + bh[hole], x[hole]:x[hole] + bw[hole]] == hole
            fill[hole] = solidity(window) >= ROUND_HOLE_SOLIDITY
    return mask | fill[labels]


def fill_broken_rims(mask: np.ndarray, raw: np.ndarray, diameter: float) -> np.ndarray:
    """``mask`` (the cleaned, hole-filled stain) with the round holes of ``raw`` (the stain before the opening)
    filled where the opening broke a single cell's rim (see RIM_HOLE_AREA)."""
    cell_area = math.pi * diameter * diameter / 4.0
    count, holes, stats, _ = cv2.connectedComponentsWithStats((~raw).view(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    inside = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    sized = (area >= RIM_HOLE_AREA * cell_area) & (area <= ROUND_HOLE_AREA * cell_area)
    candidates = [hole for hole in np.flatnonzero(inside & sized) if hole > 0]
    if not candidates:
        return mask
    _, parts, part_stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    out = mask.copy()
    ring = np.ones((5, 5), np.uint8)
    for hole in candidates:
        x0, y0 = max(0, int(x[hole]) - 3), max(0, int(y[hole]) - 3)
        x1, y1 = min(w, int(x[hole] + bw[hole]) + 3), min(h, int(y[hole] + bh[hole]) + 3)
        window = holes[y0:y1, x0:x1] == hole
        if (mask[y0:y1, x0:x1] & window).any() or solidity(window) < ROUND_HOLE_SOLIDITY:
            continue
        around = parts[y0:y1, x0:x1][cv2.dilate(window.view(np.uint8), ring) > 0]
        touching = np.unique(around[around > 0])
        if len(touching) and area[hole] + part_stats[touching, cv2.CC_STAT_AREA].sum() <= ENLARGED_AREA * cell_area:
            out[y0:y1, x0:x1] |= window
    return out


def largest_hull(window: np.ndarray, method: int) -> np.ndarray:
    """The convex hull (OpenCV points) of the largest outer contour of a window (bool or 0/1), its contour traced
    with ``method`` (cv2.CHAIN_APPROX_NONE or _SIMPLE)."""
    contours, _ = cv2.findContours(window.astype(np.uint8), cv2.RETR_EXTERNAL, method)
    return cv2.convexHull(max(contours, key=cv2.contourArea))


def solidity(window: np.ndarray) -> float:
    """The share of its convex hull that a region (bool window) fills: 1 for a disk, lower for a waist or a star."""
    hull_area = cv2.contourArea(largest_hull(window, cv2.CHAIN_APPROX_NONE))
    return float(np.count_nonzero(window)) / max(1.0, hull_area)


def is_one_cell(window: np.ndarray) -> bool:
    """Whether a region too big for one normal cell (bool window) is one enlarged cell: round and without a waist
    (see ONE_CELL_FILL)."""
    inner = float(cv2.distanceTransform(np.pad(window, 1).astype(np.uint8), cv2.DIST_L2, 5).max())
    fill = np.count_nonzero(window) / max(1.0, math.pi * inner * inner)
    return fill <= ONE_CELL_FILL and solidity(window) >= ONE_CELL_SOLIDITY


def joined_region(a: CellRegion, b: CellRegion, diameter: float) -> Optional[CellRegion]:
    """``a`` and ``b`` (full-scale cells of a field with cells ``diameter`` px across) as one cell when their masks
    touch and their union is one round cell (connected, up to ENLARGED_AREA cell areas, ONE_CELL_SOLIDITY of its
    convex hull: a parasite cut in two, see the note after ONE_CELL_SOLIDITY); else None."""
    _require_cv2()
    x0, y0 = min(a.box[0], b.box[0]), min(a.box[1], b.box[1])
    x1 = max(a.box[0] + a.box[2], b.box[0] + b.box[2])
    y1 = max(a.box[1] + a.box[3], b.box[1] + b.box[3])
    union = np.zeros((y1 - y0, x1 - x0), bool)
    for cell in (a, b):
        x, y, w, h = cell.box
        union[y - y0:y - y0 + h, x - x0:x - x0 + w] |= cell.mask[:h, :w]
    area = int(np.count_nonzero(union))
    if area > ENLARGED_AREA * math.pi * diameter * diameter / 4.0:
        return None
    if cv2.connectedComponents(union.view(np.uint8), connectivity=8)[0] != 2 or solidity(union) < ONE_CELL_SOLIDITY:
        return None
    ys, xs = np.nonzero(union)
    return CellRegion((x0, y0, x1 - x0, y1 - y0), union, area, (x0 + float(xs.mean()), y0 + float(ys.mean())),
                      a.touches_border or b.touches_border)


def refit_outline(rgb: np.ndarray, cell: CellRegion, neighbours: List[CellRegion],
                  diameter: float) -> Optional[CellRegion]:
    """``cell`` (a full-scale cell of the field ``rgb`` with cells ``diameter`` px across) grown into the pixels
    around it that have its own colour rather than its ``neighbours``' or the glass's (see REFIT_PAD), when it stays
    one round cell; else None (nothing to add, or the growth would not be one cell)."""
    _require_cv2()
    full_h, full_w = rgb.shape[:2]
    pad = int(round(REFIT_PAD * diameter))
    x, y, w, h = cell.box
    x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(full_w, x + w + pad), min(full_h, y + h + pad)
    own = np.zeros((y1 - y0, x1 - x0), np.uint8)
    own[y - y0:y - y0 + h, x - x0:x - x0 + w] = cell.mask[:h, :w]
    others = np.zeros_like(own)
    for other in neighbours:
        ox, oy, ow, oh = other.box
        sx0, sy0, sx1, sy1 = max(ox, x0), max(oy, y0), min(ox + ow, x1), min(oy + oh, y1)
        if sx1 > sx0 and sy1 > sy0:
            others[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] |= other.mask[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
    scale = work_scale(rgb, diameter)
    d = diameter * scale
    small = _resize(np.ascontiguousarray(rgb[y0:y1, x0:x1, :3]), scale)
    size = (small.shape[1], small.shape[0])
    own_small = cv2.resize(own, size, interpolation=cv2.INTER_NEAREST)
    others_small = cv2.resize(others, size, interpolation=cv2.INTER_NEAREST) & (1 - own_small)
    core = cv2.erode(own_small, disk(REFIT_CORE * d))
    neighbour_core = cv2.erode(others_small, disk(REFIT_NEIGHBOUR_CORE * d))
    beyond = cv2.distanceTransform(1 - own_small, cv2.DIST_L2, 5)
    glass = (own_small == 0) & (others_small == 0) & (beyond > REFIT_OPEN * d)
    colour = -np.log1p(cv2.GaussianBlur(small.astype(np.float32), (0, 0), REFIT_BLUR * d))
    nearest_own = _nearest_own_colour(colour, core > 0, neighbour_core > 0, glass)
    if nearest_own is None:
        return None
    grown = (nearest_own & (beyond <= REFIT_REACH * d) & (neighbour_core == 0)) | (core > 0)
    grown = _parts_touching(grown, core, 4)
    grown = fill_holes(grown, HOLE_AREA * math.pi * d * d / 4.0) & (neighbour_core == 0)
    grown = _parts_touching(clean(grown, REFIT_OPEN * d), core, 8)
    if not grown.any():
        return None
    added = _to_full_scale(0, 0, grown, scale, x1 - x0, y1 - y0)
    ax, ay, aw, ah = added.box
    union = own.astype(bool)
    union[ay:ay + ah, ax:ax + aw] |= added.mask
    area = int(np.count_nonzero(union))
    if area <= cell.area or area > ENLARGED_AREA * math.pi * diameter * diameter / 4.0:
        return None
    if cv2.connectedComponents(union.view(np.uint8), connectivity=8)[0] != 2 or solidity(union) < ONE_CELL_SOLIDITY:
        return None
    return _tight_region(x0, y0, union, full_w, full_h)


def _nearest_own_colour(colour: np.ndarray, own: np.ndarray, neighbours: np.ndarray,
                        glass: np.ndarray) -> Optional[np.ndarray]:
    """The pixels of ``colour`` (HxWx3) more likely under the Gaussian model (per-channel mean and variance) of the
    ``own`` pixels than under the neighbours' or the glass's (a class with under REFIT_MIN_PIXELS pixels has no
    model); None when ``own`` has too few pixels for one."""
    likelihoods = []
    for pixels in (own, neighbours, glass):
        if np.count_nonzero(pixels) < REFIT_MIN_PIXELS:
            likelihoods.append(np.full(own.shape, -np.inf, np.float32))
            continue
        values = colour[pixels]
        mean, variance = values.mean(axis=0), values.var(axis=0) + REFIT_MIN_VARIANCE
        likelihoods.append(-0.5 * (((colour - mean) ** 2 / variance) + np.log(variance)).sum(axis=2))
    if np.isinf(likelihoods[0]).all():
        return None
    return likelihoods[0] >= np.maximum(likelihoods[1], likelihoods[2])


def _parts_touching(mask: np.ndarray, core: np.ndarray, connectivity: int) -> np.ndarray:
    """The connected parts of ``mask`` (bool) that hold a pixel of ``core`` (uint8)."""
    count, parts = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity)
    keep = np.zeros(count, bool)
    keep[np.unique(parts[(core > 0) & mask])] = True
    keep[0] = False
    return keep[parts]


def reading_order(box: Tuple[int, int, int, int], diameter: float) -> Tuple[int, int]:
    """The sort key of a cell's ``box`` in reading order: top to bottom in rows one cell ``diameter`` high, left to
    right within a row."""
    return box[1] // max(1, int(diameter)), box[0]


def in_reading_order(cells: List[CellRegion], diameter: float) -> List[CellRegion]:
    """``cells`` sorted in reading order (:func:`reading_order`)."""
    return sorted(cells, key=lambda c: reading_order(c.box, diameter))


def estimate_diameter(mask: np.ndarray) -> Optional[float]:
    """The typical red-cell diameter in pixels, measured on the field: the median equivalent diameter of the compact,
    round blobs (lone cells; clumps are less solid and are left out). None when nothing cell-like is found."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    h, w = mask.shape
    singles, all_blobs = [], []
    for contour in contours:
        area = cv2.contourArea(contour)
        if area < 30:
            continue
        x, y, bw, bh = cv2.boundingRect(contour)
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            continue
        diameter = math.sqrt(4.0 * area / math.pi)
        all_blobs.append(diameter)
        hull = cv2.contourArea(cv2.convexHull(contour))
        if hull > 0 and area / hull > 0.93 and max(bw, bh) <= 1.3 * min(bw, bh):
            singles.append(diameter)
    if len(singles) >= 3:
        return float(np.median(singles))
    if all_blobs:
        return float(np.median(all_blobs))
    return None


def distance_map(mask: np.ndarray) -> np.ndarray:
    """Distance from each cell pixel to the nearest background pixel: peaks at cell centres."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)


def markers(distance: np.ndarray, diameter: float) -> Tuple[np.ndarray, int]:
    """One seed per cell: local maxima of the distance map within a neighbourhood of about half a diameter that
    lie deeper than a third of a radius (so the ridge between two overlapping cells seeds neither)."""
    radius = diameter / 2.0
    smooth = cv2.GaussianBlur(distance, (0, 0), max(1.0, radius / 8.0))
    peaks = smooth >= cv2.dilate(smooth, disk(radius * 0.55))
    peaks &= smooth > radius * 0.35
    # Plateaus and near-ties within a cell merge into one seed.
    peaks = cv2.dilate(peaks.astype(np.uint8), disk(max(1.0, radius * 0.2)))
    count, labels = cv2.connectedComponents(peaks, connectivity=8)
    return labels.astype(np.int32), count - 1


def circles(density: np.ndarray, min_radius: float, max_radius: float, min_distance: float,
            perfectness: float = CIRCLE_PERFECTNESS) -> np.ndarray:
    """Round edges in the stain density (Hough transform, OpenCV's HOUGH_GRADIENT_ALT): an array of (x, y, radius)
    rows, empty when none. A red cell's rim is a circle even where it overlaps a neighbour, so circles find cells
    that the distance map cannot tell apart."""
    picture = np.clip(density * 400.0, 0, 255).astype(np.uint8)
    picture = cv2.GaussianBlur(picture, (0, 0), max(1.0, min_radius / 9.0))
    found = cv2.HoughCircles(picture, cv2.HOUGH_GRADIENT_ALT, dp=1.5, minDist=max(1.0, min_distance), param1=60,
                             param2=perfectness, minRadius=max(1, int(min_radius)),
                             maxRadius=int(math.ceil(max_radius)))
    return np.zeros((0, 3), np.float32) if found is None else found[0]


def seeding_circles(density: np.ndarray, mask: np.ndarray, diameter: float) -> Tuple[np.ndarray, np.ndarray]:
    """The circles that seed cells, (x, y, radius) rows, and the mask with the pale centres of their cells filled.
    Circles are taken in OpenCV's order and one is dropped when its centre lies within CIRCLE_SPACING diameters of
    one taken before; a circle counts when its centre is on a cell, or when PALE_CENTRE_COVER of its disk is stained
    (a pale cell whose centre opens onto the glass: that centre is filled so the cell is one region)."""
    mask = mask.copy()
    h, w = mask.shape
    spacing2 = (CIRCLE_SPACING * diameter) ** 2
    used: List[Tuple[float, float, float]] = []
    for x, y, r in circles(density, CIRCLE_RADII[0] * diameter, CIRCLE_RADII[1] * diameter,
                           HOUGH_MIN_DISTANCE * diameter):
        ix, iy = int(round(x)), int(round(y))
        if not (0 <= ix < w and 0 <= iy < h):
            continue
        if any((x - ux) ** 2 + (y - uy) ** 2 < spacing2 for ux, uy, _ in used):
            continue
        if not mask[iy, ix]:
            x0, y0 = max(0, int(x - r)), max(0, int(y - r))
            x1, y1 = min(w, int(x + r) + 1), min(h, int(y + r) + 1)
            centre = (int(round(x - x0)), int(round(y - y0)))
            disc = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.circle(disc, centre, int(round(r)), 1, -1)
            stained = np.count_nonzero(mask[y0:y1, x0:x1] & (disc > 0))
            if stained < PALE_CENTRE_COVER * np.count_nonzero(disc):
                continue
            pallor = np.zeros_like(disc)
            cv2.circle(pallor, centre, max(1, int(round(PALE_CENTRE_FILL * r))), 1, -1)
            mask[y0:y1, x0:x1] |= pallor > 0
        used.append((float(x), float(y), float(r)))
    return np.array(used, np.float32).reshape(-1, 3), mask


def cell_seeds(distance: np.ndarray, cell_circles: np.ndarray, mask: np.ndarray, diameter: float) -> np.ndarray:
    """One seed per cell: a small disk at the centre of every seeding circle (:func:`seeding_circles`), plus each
    distance-map peak (:func:`markers`) that no circle centre lies near (a cell too irregular or too faint for a
    clean circle). Returns int32 seed labels, 0 where no seed."""
    seeds = np.zeros(mask.shape, np.int32)
    for count, (x, y, _) in enumerate(cell_circles, start=1):
        cv2.circle(seeds, (int(round(x)), int(round(y))), max(1, int(round(diameter * 0.1))), count, -1)
    count = len(cell_circles)
    peaks, peak_count = markers(distance, diameter)
    near_circle = cv2.dilate((seeds > 0).astype(np.uint8), disk(diameter * 0.4)) > 0
    covered = np.zeros(peak_count + 1, bool)
    covered[np.unique(peaks[near_circle & (peaks > 0)])] = True
    lone = (peaks > 0) & ~covered[peaks]
    if np.any(lone):
        _, lone_ids = np.unique(peaks[lone], return_inverse=True)
        seeds[lone] = count + 1 + lone_ids.ravel()
    seeds[~mask] = 0
    return seeds


def split_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Split touching cells: within each blob, every pixel goes to its nearest seed (a watershed on the distance
    to the seeds, which for overlapping round cells cuts along the line between their centres). Blobs with one
    seed stay whole; blobs with none stay as one region for the filters to judge. Returns int32 labels (0
    background, 1..n regions)."""
    count, blobs, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    labels = np.zeros(mask.shape, np.int32)
    seed_blob = blobs[seeds > 0]
    seeds_per_blob = np.bincount(seed_blob, minlength=count)
    next_label = 1
    for b in range(1, count):
        x, y, w, h, _ = stats[b]
        window = blobs[y:y + h, x:x + w] == b
        if seeds_per_blob[b] <= 1:
            labels[y:y + h, x:x + w][window] = next_label
            next_label += 1
            continue
        local_seeds = np.where(window, seeds[y:y + h, x:x + w], 0)
        # Label each pixel by its nearest seed pixel; seeds are the zeros of the input.
        _, nearest = cv2.distanceTransformWithLabels((local_seeds == 0).astype(np.uint8), cv2.DIST_L2, 5,
                                                     labelType=cv2.DIST_LABEL_PIXEL)
        seed_of_pixel_label = np.zeros(int(nearest.max()) + 1, np.int32)
        sy, sx = np.nonzero(local_seeds)
        seed_of_pixel_label[nearest[sy, sx]] = local_seeds[sy, sx]
        owner = seed_of_pixel_label[nearest]
        unique = np.unique(owner[window])
        remap = np.zeros(int(owner.max()) + 1, np.int32)
        remap[unique] = np.arange(next_label, next_label + len(unique))
        labels[y:y + h, x:x + w][window] = remap[owner[window]]
        next_label += len(unique)
    return labels


def split_clumps(labels: np.ndarray, diameter: float) -> np.ndarray:
    """Split what the seeds left whole but is too big for one cell (a clump of overlapping cells whose distance map
    has one broad peak, up to CLUMP_MAX_CELLS cells): into round(area / cell area) parts by k-means on the pixel
    positions, i.e. the split of equal round cells. An enlarged infected cell (:func:`is_one_cell`, up to
    ENLARGED_AREA) stays whole. Deterministic (OpenCV's generator is seeded)."""
    cell_area = math.pi * diameter * diameter / 4.0
    out = labels.copy()
    next_label = int(labels.max()) + 1
    for blob in regions_of(labels):
        k = int(round(blob.area / cell_area))
        if blob.area < CLUMP_AREA * cell_area or k < 2 or k > CLUMP_MAX_CELLS:
            continue
        window = labels[blob.y:blob.y + blob.h, blob.x:blob.x + blob.w] == blob.label
        if blob.area <= ENLARGED_AREA * cell_area and is_one_cell(window):
            continue
        ys, xs = np.nonzero(window)
        points = np.stack([xs, ys], axis=1).astype(np.float32)
        cv2.setRNGSeed(0)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
        _, parts, _ = cv2.kmeans(points, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        target = out[blob.y:blob.y + blob.h, blob.x:blob.x + blob.w]
        for part in range(1, k):
            target[ys[parts[:, 0] == part], xs[parts[:, 0] == part]] = next_label
            next_label += 1
    return out


@dataclass
class _Blob:
    """A labelled region at working scale, before filtering."""
    label: int
    x: int
    y: int
    w: int
    h: int
    area: int


def regions_of(labels: np.ndarray) -> List[_Blob]:
    """Bounding box and area of every label (one pass over the pixels)."""
    flat = labels.ravel()
    on = np.flatnonzero(flat)
    if on.size == 0:
        return []
    ids = flat[on]
    order = np.argsort(ids, kind="stable")
    ids, on = ids[order], on[order]
    ys, xs = np.divmod(on, labels.shape[1])
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    blobs = []
    for s, e in zip(starts, ends):
        x0, x1 = int(xs[s:e].min()), int(xs[s:e].max())
        y0, y1 = int(ys[s:e].min()), int(ys[s:e].max())
        blobs.append(_Blob(int(ids[s]), x0, y0, x1 - x0 + 1, y1 - y0 + 1, int(e - s)))
    return blobs


def nucleus_mask(density: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Dense stain, as in white-cell nuclei: more than NUCLEUS_DENSITY_RATIO times the field's typical red-cell
    density (relative, because one lab's red cells are pale pink and another's deep magenta). Parasite chromatin is
    as dense but covers a small part of its cell."""
    cells = density[foreground]
    typical = float(np.median(cells)) if cells.size else 0.0
    return density > max(NUCLEUS_DENSITY_RATIO * typical, 4 * MIN_DENSITY)


def near_border(blob: _Blob, shape: Tuple[int, int], diameter: float) -> bool:
    """Is this blob cut by the image border, or within BORDER_MARGIN of a diameter of it? Half a cell seen is not a
    cell to count (see EDGE_CELL_AREA for what is still shown)."""
    h, w = shape
    margin = int(round(BORDER_MARGIN * diameter))
    return blob.x <= margin or blob.y <= margin or blob.x + blob.w >= w - margin or blob.y + blob.h >= h - margin


def keep_cell(blob: _Blob, labels: np.ndarray, nucleus: np.ndarray, pigment: np.ndarray, diameter: float) -> bool:
    """Is this blob a red cell? Size between a third and 2.2 cell areas, or up to ENLARGED_AREA for one enlarged
    infected cell (platelets, debris and merged clumps go); reasonably round and solid; not a white cell (a nucleus
    bigger than a large parasite, unless it holds malaria pigment: a mature parasite filling its cell, see
    PIGMENT_FRACTION). Whether it is whole is :func:`near_border`'s question."""
    cell_area = math.pi * diameter * diameter / 4.0
    if not MIN_CELL_AREA * cell_area <= blob.area <= ENLARGED_AREA * cell_area:
        return False
    if max(blob.w, blob.h) > 2.2 * diameter or min(blob.w, blob.h) < 0.4 * diameter:
        return False
    window = labels[blob.y:blob.y + blob.h, blob.x:blob.x + blob.w] == blob.label
    if blob.area > 2.2 * cell_area and not is_one_cell(window):
        return False
    if blob.area / float(blob.w * blob.h) < 0.45:
        return False
    dark = int(np.count_nonzero(nucleus[blob.y:blob.y + blob.h, blob.x:blob.x + blob.w] & window))
    if dark > NUCLEUS_FRACTION * blob.area:
        brown = int(np.count_nonzero(pigment[blob.y:blob.y + blob.h, blob.x:blob.x + blob.w] & window))
        return brown >= PIGMENT_FRACTION * blob.area
    return True


# ---------------------------------------------------------------------------------------------------------------
# Public API


def work_scale(rgb: np.ndarray, diameter: Optional[float] = None) -> float:
    """The factor that brings a cell to about WORK_DIAMETER pixels (never above 1: no upscaling)."""
    if diameter:
        return min(1.0, WORK_DIAMETER / diameter)
    return min(1.0, 640.0 / max(rgb.shape[:2]))


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (max(1, int(round(w * scale))), max(1, int(round(h * scale)))),
                      interpolation=cv2.INTER_AREA)


def _write_debug(debug_dir, name: str, picture: np.ndarray) -> None:
    if debug_dir is None:
        return
    Path(debug_dir).mkdir(parents=True, exist_ok=True)
    pic = picture
    if pic.dtype == bool:
        pic = pic.astype(np.uint8) * 255
    elif pic.dtype != np.uint8:
        top = float(pic.max()) or 1.0
        pic = np.clip(pic * (255.0 / top), 0, 255).astype(np.uint8)
    if pic.ndim == 3:
        pic = cv2.cvtColor(pic, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(Path(debug_dir) / f"{name}.png"), pic)


def field_diameter(rgb: np.ndarray) -> Optional[float]:
    """The red-cell diameter of a field in its own pixels, at any magnification or field of view
    (:func:`quality.measure_cell_diameter`: lone round blobs checked against the circles of the cells' rims, on a
    copy measured again at twice the scale while its cells are too small to resolve, as in a mosaic of fields)."""
    from .quality import measure_cell_diameter  # quality builds on this module's steps
    return measure_cell_diameter(rgb)


def label_cells(rgb: np.ndarray, diameter: float, drop_border: bool = True, debug_dir=None,
                channels: Optional[List[np.ndarray]] = None,
                pale_cells: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The watershed labels of ``rgb`` (already at working scale) for cells of ``diameter`` pixels, the stain
    density, and the circles that seeded cells. ``channels``: the :func:`channel_densities` when the caller has
    them; ``pale_cells``: look for pale cells among their neighbours (:func:`add_pale_cells`; a field's step)."""
    channels = channel_densities(rgb) if channels is None else channels
    density = stain_density(rgb, channels)
    threshold = threshold_map(density)
    stained = foreground_mask(density, rgb, threshold)
    _write_debug(debug_dir, "1_foreground", stained)
    mask = clean(stained, diameter / 14.0)
    _write_debug(debug_dir, "2_clean", mask)
    cell_area = math.pi * diameter ** 2 / 4.0
    mask = fill_holes(mask, max_area=HOLE_AREA * cell_area, round_max_area=ROUND_HOLE_AREA * cell_area)
    mask = fill_broken_rims(mask, stained, diameter)
    _write_debug(debug_dir, "3_filled", mask)
    distance = distance_map(mask)
    _write_debug(debug_dir, "4_distance", distance)
    cell_circles, mask = seeding_circles(density, mask, diameter)
    seeds = cell_seeds(distance, cell_circles, mask, diameter)
    _write_debug(debug_dir, "5_markers", seeds > 0)
    labels = split_touching(mask, seeds)
    labels = detach_beyond_circles(labels, cell_circles, diameter, drop_border)
    if pale_cells:
        labels = add_pale_cells(labels, channels, density, threshold, rgb, diameter)
    if debug_dir is not None:
        rng = np.random.default_rng(0)
        palette = rng.integers(60, 255, size=(int(labels.max()) + 1, 3), dtype=np.uint8)
        palette[0] = 0
        _write_debug(debug_dir, "6_split", palette[labels])
    return labels, density, cell_circles


def add_pale_cells(labels: np.ndarray, channels: List[np.ndarray], density: np.ndarray, threshold: np.ndarray,
                   rgb: np.ndarray, diameter: float) -> np.ndarray:
    """``labels`` with a new region for each pale cell the threshold left as glass (see PALE_LEVEL); the region
    takes its hull's pixels from any neighbour that claimed them. Modifies and returns ``labels``."""
    pale = (density > np.maximum(PALE_LEVEL * threshold, PALE_FLOOR)) & (density <= threshold)
    pale &= (PALE_PINK * channels[0] <= channels[1]) & (rgb.max(axis=2) > BLACK_LEVEL)
    pale = cv2.morphologyEx(pale.astype(np.uint8), cv2.MORPH_CLOSE, disk(diameter / 10.0))
    cell_area = math.pi * diameter ** 2 / 4.0
    pale = fill_holes(pale.astype(bool), max_area=HOLE_AREA * cell_area) & (labels == 0)
    pale = cv2.morphologyEx(pale.astype(np.uint8), cv2.MORPH_OPEN, disk(PALE_OPEN * diameter))
    count, parts, stats, _ = cv2.connectedComponentsWithStats(pale, connectivity=4)
    h, w = labels.shape
    grow = disk(PALE_GROW * diameter)
    pad = grow.shape[0] // 2 + 1
    next_label = int(labels.max()) + 1
    for part in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[part])
        if not PALE_AREA[0] * cell_area <= area <= PALE_AREA[1] * cell_area:
            continue
        hull = largest_hull(parts[y:y + bh, x:x + bw] == part, cv2.CHAIN_APPROX_SIMPLE)
        hull_area = cv2.contourArea(hull)
        if hull_area <= 0 or area / hull_area < PALE_SOLIDITY:
            continue
        x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(w, x + bw + pad), min(h, y + bh + pad)
        window = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(window, [hull + np.array([x - x0, y - y0], np.int32)], 1)
        window = cv2.dilate(window, grow)
        labels[y0:y1, x0:x1][window > 0] = next_label
        next_label += 1
    return labels


def detach_beyond_circles(labels: np.ndarray, cell_circles: np.ndarray, diameter: float,
                          drop_border: bool) -> np.ndarray:
    """Take from each circle-seeded region what lies well outside its circle. The split gives every pixel of a
    blob to some seed, so a neighbour without one is shared out among the cells around it: a cell cut by the image
    edge makes its whole neighbour reach the edge (and be dropped as cut), and a sliver of a neighbour widens a
    cell's box. Parts beyond BORDER_TRIM radii that reach the edge become regions of their own (when cut cells are
    dropped); parts beyond REACH_TRIM radii smaller than MIN_CELL_AREA become background, unless the parts of
    several cells together make a cell with no seed (:func:`claim_seedless_cells`). Labels change in place and are
    returned."""
    h, w = labels.shape
    next_label = int(labels.max()) + 1
    small = MIN_CELL_AREA * math.pi * diameter * diameter / 4.0
    trimmed = np.zeros(labels.shape, np.uint8)
    for label, (x, y, r) in circle_of_region(labels, cell_circles).items():
        x0, y0 = max(0, int(x - 3 * r)), max(0, int(y - 3 * r))
        x1, y1 = min(w, int(x + 3 * r) + 1), min(h, int(y + 3 * r) + 1)
        window = labels[y0:y1, x0:x1]
        yy, xx = np.ogrid[y0:y1, x0:x1]
        reach2 = (xx - x) ** 2 + (yy - y) ** 2
        if drop_border:
            for part, (px, py, pw, ph, _) in _parts_beyond(window, label, reach2, BORDER_TRIM * r):
                if y0 + py == 0 or x0 + px == 0 or y0 + py + ph == h or x0 + px + pw == w:
                    window[part] = next_label
                    next_label += 1
        for part, stats in _parts_beyond(window, label, reach2, REACH_TRIM * r):
            if stats[cv2.CC_STAT_AREA] < small:
                window[part] = 0
                trimmed[y0:y1, x0:x1][part] = 1
    return claim_seedless_cells(labels, trimmed, diameter)


def claim_seedless_cells(labels: np.ndarray, trimmed: np.ndarray, diameter: float) -> np.ndarray:
    """A cell with no seed is shared out among its neighbours, and :func:`detach_beyond_circles` trims what lies
    beyond their reach as slivers (``trimmed``, uint8). Where the slivers of several neighbours together cover
    SEEDLESS_AREA of a cell, they are that cell: their convex hull, filled (its pale centre too), becomes a region
    and takes back what the neighbours kept inside it. Labels change in place and are returned."""
    count, parts, stats, _ = cv2.connectedComponentsWithStats(trimmed, connectivity=8)
    least = SEEDLESS_AREA * math.pi * diameter * diameter / 4.0
    next_label = int(labels.max()) + 1
    for part in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[part])
        if area < least:
            continue
        hull = np.zeros((h, w), np.uint8)
        cv2.fillPoly(hull, [largest_hull(parts[y:y + h, x:x + w] == part, cv2.CHAIN_APPROX_SIMPLE)], 1)
        labels[y:y + h, x:x + w][hull > 0] = next_label
        next_label += 1
    return labels


def _parts_beyond(window: np.ndarray, label: int, reach2: np.ndarray, radius: float):
    """Each connected part of ``label`` in ``window`` lying farther than ``radius`` from the circle's centre
    (``reach2``: squared distances), as (bool mask, its connectedComponentsWithStats row); all found before the
    first is yielded, so the caller may relabel as it goes."""
    beyond = (window == label) & (reach2 > radius * radius)
    if not beyond.any():
        return
    count, parts, stats, _ = cv2.connectedComponentsWithStats(beyond.view(np.uint8), connectivity=8)
    for part in range(1, count):
        yield parts == part, stats[part]


def segment_field(rgb: np.ndarray, diameter: Optional[float] = None, drop_border: bool = True,
                  debug_dir=None, pale_cells: bool = True) -> List[CellRegion]:
    """Every whole red cell of a brightfield field image (HxWx3 uint8 RGB), in reading order (top to bottom, left
    to right). ``diameter``: the red-cell diameter in pixels when known; measured on the field otherwise.
    ``debug_dir``: write each step's picture there. ``pale_cells``: False for a single-cell crop, which has no
    neighbours for a pale cell to be told from (noise would pass for one)."""
    return segment_field_and_edge(rgb, diameter, drop_border, debug_dir, pale_cells)[0]


def segment_field_and_edge(rgb: np.ndarray, diameter: Optional[float] = None, drop_border: bool = True,
                           debug_dir=None, pale_cells: bool = True) -> Tuple[List[CellRegion], List[CellRegion]]:
    """:func:`segment_field`'s whole cells, and the cells cut by the image edge (or within BORDER_MARGIN of it)
    with at least EDGE_CELL_AREA in view, each list in reading order; the second is empty unless ``drop_border``."""
    _require_cv2()
    rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
    if diameter is None:
        diameter = field_diameter(rgb)
    if diameter is None or diameter < 6:
        return [], []
    scale = work_scale(rgb, diameter)
    small = _resize(rgb, scale)
    d_small = diameter * scale
    channels = channel_densities(small)
    labels, density, cell_circles = label_cells(small, d_small, drop_border, debug_dir, channels, pale_cells)
    labels = split_clumps(labels, d_small)
    nucleus = nucleus_mask(density, labels > 0)
    pigment = pigment_mask(channels)
    circle_of = circle_of_region(labels, cell_circles)
    full_h, full_w = rgb.shape[:2]
    cells, edge = [], []
    in_view = EDGE_CELL_AREA * math.pi * d_small * d_small / 4.0
    for blob in regions_of(labels):
        cut = drop_border and near_border(blob, labels.shape, d_small)
        if (cut and blob.area < in_view) or not keep_cell(blob, labels, nucleus, pigment, d_small):
            continue
        x0, y0, window = overlap_completed(blob, labels, circle_of.get(blob.label))
        (edge if cut else cells).append(_to_full_scale(x0, y0, window, scale, full_w, full_h))
    cells, edge = in_reading_order(cells, diameter), in_reading_order(edge, diameter)
    if debug_dir is not None:
        _write_debug(debug_dir, "7_cells", draw_outlines(rgb, cells))
    return cells, edge


def circle_of_region(labels: np.ndarray, cell_circles: np.ndarray) -> dict:
    """{region label: (x, y, radius)} for each region holding a seeding circle's centre (the first one)."""
    h, w = labels.shape
    out = {}
    for x, y, r in cell_circles:
        ix, iy = int(round(x)), int(round(y))
        if 0 <= ix < w and 0 <= iy < h and labels[iy, ix] > 0:
            out.setdefault(int(labels[iy, ix]), (float(x), float(y), float(r)))
    return out


def overlap_completed(blob: _Blob, labels: np.ndarray, circle) -> Tuple[int, int, np.ndarray]:
    """A region's mask window (x, y, bool array) at working scale. Where the cell overlaps a neighbour, the split
    gave the shared part to one of them; a cell seeded by a circle gets back the neighbours' pixels inside its
    circle, so each of two overlapping cells is cut whole, as a microscopist outlines it (overlapping masks)."""
    own = labels[blob.y:blob.y + blob.h, blob.x:blob.x + blob.w] == blob.label
    if circle is None:
        return blob.x, blob.y, own
    x, y, r = circle
    h, w = labels.shape
    x0, y0 = max(0, min(blob.x, int(math.floor(x - r)))), max(0, min(blob.y, int(math.floor(y - r))))
    x1 = min(w, max(blob.x + blob.w, int(math.ceil(x + r)) + 1))
    y1 = min(h, max(blob.y + blob.h, int(math.ceil(y + r)) + 1))
    window = labels[y0:y1, x0:x1]
    mine = window == blob.label
    inside = np.zeros(window.shape, np.uint8)
    cv2.circle(inside, (int(round(x - x0)), int(round(y - y0))), int(round(r)), 1, -1)
    full = mine | ((window > 0) & inside.astype(bool))
    return x0, y0, full


def _to_full_scale(x0: int, y0: int, window: np.ndarray, scale: float, full_w: int, full_h: int) -> CellRegion:
    """Map a working-scale mask window at (x0, y0) to the image's pixels: the box scaled, the mask resized smoothly
    and re-thresholded so its edge is not blocky, then the box tightened to the mask."""
    bh0, bw0 = window.shape
    window = window.astype(np.float32)
    fx0 = int(math.floor(x0 / scale))
    fy0 = int(math.floor(y0 / scale))
    fx1 = min(full_w, int(math.ceil((x0 + bw0) / scale)))
    fy1 = min(full_h, int(math.ceil((y0 + bh0) / scale)))
    w, h = max(1, fx1 - fx0), max(1, fy1 - fy0)
    if scale < 1.0:
        mask = cv2.resize(window, (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    else:
        mask = window.astype(bool)
    if not mask.any():
        mask = np.ones((h, w), bool)
    return _tight_region(fx0, fy0, mask, full_w, full_h)


def _tight_region(x0: int, y0: int, window: np.ndarray, full_w: int, full_h: int) -> CellRegion:
    """The cell of a bool ``window`` (not empty) at (x0, y0) of an image ``full_w`` x ``full_h``: its box
    tightened to the mask, its area and centroid, whether it touches the image edge."""
    ys, xs = np.nonzero(window)
    mx0, mx1, my0, my1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mask = window[my0:my1, mx0:mx1]
    bx, by = x0 + int(mx0), y0 + int(my0)
    area = int(mask.sum())
    cy, cx = (float(v.mean()) for v in np.nonzero(mask))
    touches = bx <= 0 or by <= 0 or bx + mask.shape[1] >= full_w or by + mask.shape[0] >= full_h
    return CellRegion((bx, by, int(mask.shape[1]), int(mask.shape[0])), mask, area, (bx + cx, by + cy), touches)


def cut_cell(rgb: np.ndarray, region: CellRegion, size: Optional[int] = None) -> np.ndarray:
    """The cell as the NIH crops show it: its tight bounding box, pixels outside its mask black (uint8 HxWx3).
    ``size``: also stretch it to ``size`` x ``size`` (NIH stretched its crops to squares); model input is made by
    ``images.prepare_cell``, so leave it None on the classification path."""
    x, y, w, h = region.box
    crop = np.ascontiguousarray(rgb[y:y + h, x:x + w, :3], dtype=np.uint8)
    mask = region.mask[:crop.shape[0], :crop.shape[1]]
    if cv2 is not None:  # a new array, ~10x faster than boolean indexing
        crop = cv2.bitwise_and(crop, crop, mask=mask.astype(np.uint8, copy=False))
    else:
        crop = crop.copy()
        crop[~mask] = 0
    if size is not None:
        _require_cv2()
        crop = cv2.resize(crop, (int(size), int(size)), interpolation=cv2.INTER_AREA)
    return crop


def nonblack_mask(rgb: np.ndarray) -> np.ndarray:
    """uint8 0/1 mask of the pixels whose channel sum is above 30 (not the black of a masked crop). The sums come
    from one box filter along each row of the interleaved bytes (every third output is a pixel's R + G + B, as
    uint16): a third faster than cv2.transform's float per-pixel matrix product."""
    height, width = rgb.shape[:2]
    sums = cv2.boxFilter(np.ascontiguousarray(rgb).reshape(height, width * 3), cv2.CV_16U, (3, 1), anchor=(0, 0),
                         normalize=False, borderType=cv2.BORDER_CONSTANT)
    return (sums[:, 0::3] > 30).view(np.uint8)


def is_on_black(rgb: np.ndarray, nonblack: Optional[np.ndarray] = None) -> bool:
    """True for a crop already masked on black (the NIH look): most of its border pixels are black.
    ``nonblack``: the crop's :func:`nonblack_mask`, when the caller has it already."""
    if nonblack is not None:
        edges = (nonblack[0], nonblack[-1], nonblack[:, 0], nonblack[:, -1])
        border = sum(len(edge) for edge in edges)
        return border - sum(cv2.countNonZero(edge) for edge in edges) > 0.5 * border
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.int32)
    sums = border[:, 0] + border[:, 1] + border[:, 2]
    return np.count_nonzero(sums <= 30) > 0.5 * len(sums)


def on_black_cell(rgb: np.ndarray, nonblack: Optional[np.ndarray] = None) -> Optional[CellRegion]:
    """The cell of a crop already masked on black (the NIH look): its largest non-black blob with its holes
    filled; a closing first joins a dithered or speckled cell into one blob. It runs once per single-cell image,
    so it uses whole-image OpenCV calls only (no statistics pass, no per-pixel numpy indexing). ``nonblack``: the
    crop's :func:`nonblack_mask`, when the caller has it already."""
    mask = nonblack_mask(rgb) if nonblack is None else nonblack
    joined = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _closing_disk())
    count, labels = cv2.connectedComponents(joined, connectivity=8)
    if count <= 1:
        return None
    if count == 2:  # one blob, the usual case
        blob = joined
    else:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        blob = (labels == int(np.argmax(sizes))).view(np.uint8)
    keep = fill_enclosed(blob)
    x0, y0, w, h = cv2.boundingRect(keep.view(np.uint8))
    box_mask = keep[y0:y0 + h, x0:x0 + w]
    # Area and centroid from the mask's column and row counts (cheaper than cv2.moments).
    columns = cv2.reduce(box_mask.view(np.uint8), 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    rows = cv2.reduce(box_mask.view(np.uint8), 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    area = int(columns.sum())
    centre = (x0 + float(columns @ np.arange(w)) / area, y0 + float(rows @ np.arange(h)) / area)
    return CellRegion((x0, y0, w, h), box_mask, area, centre, False)


@lru_cache(maxsize=1)
def _closing_disk() -> np.ndarray:
    """The 3x3 disk of :func:`on_black_cell`'s closing, made once (read-only)."""
    kernel = disk(1)
    kernel.flags.writeable = False
    return kernel


def fill_enclosed(mask: np.ndarray) -> np.ndarray:
    """``mask`` (uint8 0/1) with every background region that does not reach the image edge filled: the same as
    ``fill_holes(mask, max_area=mask.size)`` (4-connected background), by one flood fill from a 1-pixel frame."""
    framed = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def central_cell(rgb: np.ndarray, nonblack: Optional[np.ndarray] = None) -> Optional[CellRegion]:
    """The one cell of a single-cell crop cut by any tool: the region nearest the image centre. A crop on black is
    its non-black blob; a crop with natural background (glass, neighbours' edges) is segmented like a field whose
    cell fills most of the picture, and cells touching the crop's edge are allowed. ``nonblack``: the crop's
    :func:`nonblack_mask`, when the caller has it already."""
    _require_cv2()
    rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
    h, w = rgb.shape[:2]
    if nonblack is None:
        nonblack = nonblack_mask(rgb)
    if is_on_black(rgb, nonblack):
        return on_black_cell(rgb, nonblack)
    # A single-cell crop is about one to one and a half cells across; its own blobs mostly touch its edges, so
    # the field estimate does not apply.
    cells = segment_field(rgb, diameter=0.75 * min(h, w), drop_border=False, pale_cells=False)
    if not cells:
        return None
    centre = np.array([w / 2.0, h / 2.0])
    return min(cells, key=lambda c: float(np.hypot(*(np.array(c.centre) - centre))))


def draw_outlines(rgb: np.ndarray, cells: List[CellRegion], colours: Optional[List[Tuple[int, int, int]]] = None,
                  thickness: int = 2) -> np.ndarray:
    """A copy of ``rgb`` with each cell's mask outline drawn (default colour yellow)."""
    _require_cv2()
    out = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8).copy()
    for i, cell in enumerate(cells):
        colour = colours[i] if colours else (255, 220, 0)
        contours, _ = cv2.findContours(cell.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        x, y = cell.box[:2]
        cv2.drawContours(out, contours, -1, colour, thickness, offset=(x, y))
    return out
