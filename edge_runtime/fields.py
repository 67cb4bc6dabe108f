"""Whole microscope fields: every red cell found, classified, counted, drawn and saved.

``Classifier.classify_field(image)`` returns a :class:`FieldResult`: its ``cells`` (each a :class:`FieldCell` with
its box in the field's pixels, call and probability), the counts, the parasitemia with its Wilson 95% interval,
``plot()`` for the overlay a clinician looks at and ``save_crops(dir)`` for the crops a microscopist sorts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .classifier import Prediction
from .images import ImageError, open_image, open_image_size, safe_file_name
from .labels import PARASITIZED, REVIEW, UNINFECTED
from .metrics import wilson_interval
from .quality import FieldQuality, assess_field
from .segment import (REFIT_PAD, CellRegion, cut_cell, field_diameter, is_on_black, joined_region,
                      reading_order, refit_outline, segment_field_and_edge)


# An overlay's file name from its field's name (the field's path relative to the inputs' common folder), and the
# pattern that recognises one, so a rerun can tell its own overlays from foreign files.
OVERLAY_NAME = "{name}_overlay.png"
OVERLAY_PATTERN = r"(?P<name>.+)_overlay\.png"


@dataclass
class FieldCell:
    """One red cell of a field. ``index`` counts from 1 in reading order (the cells cut by the image edge after the
    whole ones); ``box`` is (x, y, w, h) in the field's own pixels; ``unfamiliar_score`` is the out-of-distribution
    score when the model card has one (else None); ``at_edge``: cut by the image edge, shown for review, never
    counted (``FieldResult.edge_cells``)."""
    index: int
    box: Tuple[int, int, int, int]
    prediction: str
    prob_parasitized: float
    unfamiliar_score: Optional[float] = None
    region: Optional[CellRegion] = field(default=None, repr=False)
    at_edge: bool = False

    def to_row(self, source: str, latency_ms: float, true_label: Optional[str] = None,
               reference: Optional[Prediction] = None, warnings: str = "") -> Dict:
        """The output row of this cell of the field ``source`` (CELL_COLUMNS, rounded as written): its index, its
        box in the field's pixels, its call; ``reference`` adds the full model's REFERENCE_COLUMNS."""
        x, y, w, h = self.box
        row = {"path": source, "cell": self.index, "x": x, "y": y, "w": w, "h": h,
               "at_edge": 1 if self.at_edge else None, "prediction": self.prediction,
               "prob_parasitized": round(self.prob_parasitized, 6),
               "latency_ms": round(latency_ms, 4), "true_label": true_label,
               "unfamiliar": None if self.unfamiliar_score is None else round(self.unfamiliar_score, 3),
               "warnings": warnings or None}
        if reference is not None:
            row.update(reference.reference_columns())
        return row


@dataclass
class FieldResult:
    """A classified field. ``parasitemia`` is parasitized / decided cells (cells sent to review are left out of
    both), with its Wilson 95% interval; None when no cell was decided. ``cells`` are the whole cells, the ones
    counted; ``edge_cells`` the cells cut by the image edge that look parasitized enough to be a candidate
    (:func:`edge_threshold`): shown for review, in the rows (``at_edge``) and on the overlay, never counted."""
    source: str
    width: int
    height: int
    cells: List[FieldCell]
    diameter: Optional[float]
    seconds_segment: float
    seconds_classify: float
    image: Optional[np.ndarray] = field(default=None, repr=False)
    quality: Optional[FieldQuality] = None
    edge_cells: List[FieldCell] = field(default_factory=list)

    @property
    def shown_cells(self) -> List[FieldCell]:
        """The whole cells, then the cells at the edge shown for review: what rows, overlays and crops cover."""
        return self.cells + self.edge_cells

    @property
    def warnings(self) -> str:
        """The quality gate's codes for this field joined by ';' (the rows' ``warnings`` column), empty when the
        field could be read."""
        return self.quality.warning_text if self.quality is not None else ""

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def count(self, call: str) -> int:
        return sum(1 for c in self.cells if c.prediction == call)

    @property
    def n_parasitized(self) -> int:
        return self.count(PARASITIZED)

    @property
    def n_review(self) -> int:
        return self.count(REVIEW)

    @property
    def n_uninfected(self) -> int:
        return self.count(UNINFECTED)

    @property
    def parasitemia(self) -> Optional[float]:
        decided = self.n_parasitized + self.n_uninfected
        return self.n_parasitized / decided if decided else None

    @property
    def parasitemia_ci(self) -> Optional[Tuple[float, float]]:
        decided = self.n_parasitized + self.n_uninfected
        return wilson_interval(self.n_parasitized, decided) if decided else None

    def caption(self) -> str:
        """One line: cells, parasitized, review and parasitemia with its interval."""
        text = f"{self.n_cells} cells, {self.n_parasitized} parasitized"
        if self.n_review:
            text += f", {self.n_review} review"
        if self.parasitemia is not None:
            lo, hi = self.parasitemia_ci
            text += f", parasitemia {100 * self.parasitemia:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)"
        if self.edge_cells:
            text += f"; {len(self.edge_cells)} cut by the image edge to look at (not counted)"
        if self.warnings:
            text += f"; NOT READABLE: {self.warnings}"
        return text

    def summary(self) -> dict:
        """The per-field figures as a plain dict (for summaries and --groups-output)."""
        ci = self.parasitemia_ci
        return {"source": self.source, "cells": self.n_cells, "parasitized": self.n_parasitized,
                "uninfected": self.n_uninfected, "review": self.n_review,
                "parasitemia": self.parasitemia, "parasitemia_low": ci[0] if ci else None,
                "parasitemia_high": ci[1] if ci else None,
                "warnings": list(self.quality.warnings) if self.quality is not None else [],
                "warning_messages": list(self.quality.messages) if self.quality is not None else []}

    def to_rows(self, true_label: Optional[str] = None, reference=None) -> List[Dict]:
        """One row per cell (:meth:`FieldCell.to_row`), each with its share of the field's classify time; with a
        ``reference`` classifier (``--compare``) the same cells are run through it too, in one batch."""
        shown = self.shown_cells
        per_cell_ms = 1000.0 * self.seconds_classify / max(1, len(shown))
        references: List[Optional[Prediction]] = [None] * len(shown)
        if reference is not None and shown:
            pixels = np.stack([reference.prepare_crop(cut_cell(self.image, c.region)) for c in shown])
            probs, seconds = reference.probabilities(pixels)
            references = [Prediction(self.source, reference.decide(float(p)), float(p),
                                     1000.0 * seconds / len(shown)) for p in probs]
        return [cell.to_row(self.source, per_cell_ms, true_label, ref, self.warnings)
                for cell, ref in zip(shown, references)]

    def own_ranks(self) -> Dict[int, int]:
        """{cell index: rank} of this field's cells called parasitized, most probable first: the numbers of an
        overlay drawn without a slide (a slide numbers its candidates across all its fields)."""
        called = sorted((c for c in self.shown_cells if c.prediction == PARASITIZED), key=lambda c: -c.prob_parasitized)
        return {c.index: rank for rank, c in enumerate(called, 1)}

    def plot(self, image: Optional[np.ndarray] = None, ranks: Optional[Dict[int, int]] = None) -> np.ndarray:
        """The overlay as an RGB array (:func:`overlay.draw_overlay`, colour-blind safe): candidates outlined thick
        and numbered by ``ranks`` ({cell index: rank}; default :meth:`own_ranks`), the other cells thin."""
        from .overlay import draw_overlay
        return draw_overlay(self, self.own_ranks() if ranks is None else ranks, image)

    def save_plot(self, path, image: Optional[np.ndarray] = None, ranks: Optional[Dict[int, int]] = None) -> Path:
        """Write the overlay (:meth:`plot`) as an image file in the format its suffix names (PNG, JPEG...); a path
        without a suffix, or with one Pillow cannot write, gets ``.png`` added. Returns the path written."""
        from PIL import Image
        path = Path(path)
        if path.suffix.lower() not in Image.registered_extensions():
            path = path.with_name(path.name + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.plot(image, ranks)).save(path)
        return path

    def file_stem(self) -> str:
        """The source's file stem, safe as a file name on every system (``field-1`` for an array field)."""
        return safe_file_name(Path(self.source).stem)

    def crop_name(self, cell: FieldCell, stem: Optional[str] = None) -> str:
        """``<stem>_cell<index>.png``; ``stem`` defaults to :meth:`file_stem` (edge-classify passes the field's
        path relative to its inputs' common folder, so two ``field1`` of two slides never share a name)."""
        return f"{stem or self.file_stem()}_cell{cell.index}.png"

    def save_crops(self, directory, image: Optional[np.ndarray] = None, stem: Optional[str] = None) -> List[Path]:
        """Write each cell as the model sees it before resizing (tight box, masked on black) as
        :meth:`crop_name` gives it, ready to be sorted into Parasitized/ and Uninfected/."""
        from PIL import Image
        base = self.image if image is None else image
        if base is None:
            raise ValueError("this result keeps no image; pass the field to save_crops(dir, image)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for cell in self.shown_cells:
            path = directory / self.crop_name(cell, stem)
            Image.fromarray(cut_cell(base, cell.region)).save(path)
            written.append(path)
        return written


def classify_field_pixels(classifier, rgb: np.ndarray, source: str = "<field>", keep_image: bool = True,
                          diameter: Optional[float] = None, expected_diameter: Optional[float] = None) -> FieldResult:
    """Segment a field already decoded to ``rgb`` (HxWx3 uint8), cut every cell, classify them in one batch.
    ``Classifier.classify_field`` takes any image input and comes here; benchmarks call this to time the pixels'
    part alone (``keep_image=False``) or with a known ``diameter``. The quality gate (:func:`quality.assess_field`)
    judges the field: a field it cannot read carries its warnings into every row, its summary and its slide."""
    start = time.perf_counter()
    diameter = diameter if diameter is not None else field_diameter(rgb)
    regions, cut = segment_field_and_edge(rgb, diameter=diameter) if diameter is not None else ([], [])
    found_diameter = float(np.median([r.diameter for r in regions])) if regions else None
    quality = assess_field(rgb, regions, diameter, expected_diameter)
    seconds_segment = time.perf_counter() - start
    start = time.perf_counter()
    cells: List[FieldCell] = []
    edge: List[FieldCell] = []
    if regions or cut:
        pixels = np.stack([classifier.prepare_crop(cut_cell(rgb, r)) for r in regions + cut])
        probs, _ = classifier.probabilities(pixels)
        scores = classifier.unfamiliar_scores(pixels)
        edge_min = edge_threshold(classifier)
        regions, probs, scores = join_split_candidates(classifier, rgb, regions, cut, probs, scores, edge_min,
                                                       diameter)
        regions, probs, scores = refit_candidates(classifier, rgb, regions, cut, probs, scores, edge_min, diameter)
        for i, (region, prob) in enumerate(zip(regions + cut, probs)):
            at_edge = i >= len(regions)
            if at_edge and prob < edge_min:
                continue
            score = None if scores is None else float(scores[i])
            (edge if at_edge else cells).append(
                FieldCell(len(cells) + len(edge) + 1, region.box, classifier.decide(float(prob)), float(prob), score,
                          region, at_edge=at_edge))
    seconds_classify = time.perf_counter() - start
    return FieldResult(source, int(rgb.shape[1]), int(rgb.shape[0]), cells, found_diameter, seconds_segment,
                       seconds_classify, rgb if keep_image else None, quality, edge)


def join_split_candidates(classifier, rgb: np.ndarray, regions: List[CellRegion], cut: List[CellRegion],
                          probs: np.ndarray, scores: Optional[np.ndarray], threshold: float, diameter: float):
    """A parasite the split cut in two shows in both halves: touching whole cells that both score at or above
    ``threshold`` (the candidate threshold) and together make one round cell (:func:`segment.joined_region`) become
    one cell, classified again. ``probs``/``scores`` cover ``regions + cut``; returns (regions, probs, scores)
    for the new ``regions + cut``, the whole cells in reading order. Nothing to join: the inputs as they are."""
    parts = [(r, [i]) for i, r in enumerate(regions) if probs[i] >= threshold]
    while True:
        pair = next(((a, b, region) for a in range(len(parts)) for b in range(a + 1, len(parts))
                     if _boxes_meet(parts[a][0].box, parts[b][0].box)
                     and (region := joined_region(parts[a][0], parts[b][0], diameter)) is not None), None)
        if pair is None:
            break
        a, b, region = pair
        parts[a] = (region, parts[a][1] + parts[b][1])
        del parts[b]
    merged = [p for p in parts if len(p[1]) > 1]
    return _replaced(classifier, rgb, regions, cut, probs, scores, merged, diameter)


def refit_candidates(classifier, rgb: np.ndarray, regions: List[CellRegion], cut: List[CellRegion],
                     probs: np.ndarray, scores: Optional[np.ndarray], threshold: float, diameter: float):
    """A candidate cut short (its pale side given to the glass or a deep-stained neighbour) is shown and classified
    whole: each whole cell scoring at or above ``threshold`` grown to its own colour (:func:`segment.refit_outline`)
    is classified again. Same inputs and returns as :func:`join_split_candidates`."""
    refits = []
    pad = int(round(REFIT_PAD * diameter))
    everyone = regions + cut
    for i, region in enumerate(regions):
        if probs[i] < threshold:
            continue
        x, y, w, h = region.box
        reach = (x - pad, y - pad, w + 2 * pad, h + 2 * pad)
        neighbours = [other for other in everyone if other is not region and _boxes_meet(reach, other.box)]
        refit = refit_outline(rgb, region, neighbours, diameter)
        if refit is not None:
            refits.append((refit, [i]))
    return _replaced(classifier, rgb, regions, cut, probs, scores, refits, diameter)


def _replaced(classifier, rgb: np.ndarray, regions: List[CellRegion], cut: List[CellRegion], probs: np.ndarray,
              scores: Optional[np.ndarray], replacements: List[Tuple[CellRegion, List[int]]], diameter: float):
    """``regions`` with each (new region, indices of the whole cells it replaces) of ``replacements`` in place of
    those cells, the new ones classified in one batch; returns (regions, probs, scores) as
    :func:`join_split_candidates` does, the whole cells in reading order. No replacements: the inputs as they are."""
    if not replacements:
        return regions, probs, scores
    pixels = np.stack([classifier.prepare_crop(cut_cell(rgb, r)) for r, _ in replacements])
    new_probs, _ = classifier.probabilities(pixels)
    new_scores = classifier.unfamiliar_scores(pixels)
    gone = {i for _, members in replacements for i in members}
    kept = [i for i in range(len(regions)) if i not in gone]
    whole = [(regions[i], probs[i], None if scores is None else scores[i]) for i in kept]
    whole += [(r, new_probs[k], None if new_scores is None else new_scores[k])
              for k, (r, _) in enumerate(replacements)]
    whole.sort(key=lambda e: reading_order(e[0].box, diameter))
    entries = whole + [(r, probs[len(regions) + k], None if scores is None else scores[len(regions) + k])
                       for k, r in enumerate(cut)]
    return ([e[0] for e in whole], np.array([e[1] for e in entries], np.float32),
            None if scores is None else np.array([e[2] for e in entries], np.float32))


def _boxes_meet(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    """Whether two boxes overlap or touch (a cheap test before the masks are compared)."""
    return a[0] <= b[0] + b[2] and b[0] <= a[0] + a[2] and a[1] <= b[1] + b[3] and b[1] <= a[1] + a[3]


def edge_threshold(classifier) -> float:
    """The probability from which a cell cut by the image edge is shown for review: the slide rule's candidate
    threshold (what makes a whole cell a candidate), else the call threshold."""
    rule = classifier.slide_rule
    return rule.candidate_threshold if rule is not None else classifier.threshold


# An image this small on its longest side is a single-cell crop (NIH crops are 100-150 px; a field is ~1000+ px).
CELL_MAX_SIDE = 400
# A field must be at least a few cells across to be worth segmenting.
FIELD_MIN_SIDE = 200
INPUT_KINDS = ("auto", "cell", "field")


def image_size(path) -> Tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels; ImageError when unreadable."""
    return open_image_size(path)


def field_or_cell(classifier, path, input_kind: str = "auto") -> Tuple[str, Optional[FieldResult]]:
    """Decide what an image is and, for a field, classify it: ("cell", None) for a single-cell image (classify it
    with ``classifier.predict``), ("field", result) for a field with cells. Raises ImageError with the reason for
    an image that is neither (no cells found, too small to be a field)."""
    width, height = image_size(path)
    if input_kind == "cell" or (input_kind == "auto" and max(width, height) <= CELL_MAX_SIDE):
        return "cell", None
    if min(width, height) < FIELD_MIN_SIDE and input_kind == "field":
        raise ImageError(f"image is {width}x{height} px, too small to be a microscope field "
                         f"(at least {FIELD_MIN_SIDE} px a side)")
    rgb = np.asarray(open_image(path), dtype=np.uint8)
    if input_kind == "auto" and is_on_black(rgb):
        # A large crop masked on black (the NIH look, enlarged): a close-up of one cell, never a field of glass.
        return "cell", None
    result = classifier.classify_field(rgb, source=str(path))
    if result.n_cells == 0:
        raise ImageError(f"no red cells found in this {width}x{height} image (not a thin-smear field, or far out "
                         "of focus)")
    if input_kind == "auto" and result.n_cells == 1:
        # One cell filling a large photo: a close-up of a single cell, classified as a cell.
        return "cell", None
    return "field", result
