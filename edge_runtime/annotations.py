"""Annotated whole fields (the IML-Malaria layout), in one place: the boxes, how two boxes overlap, and the one rule
that splits fields into train / val / test. Training (``train/iml.py``), the field benchmark
(``benchmarks/fields.py``) and the segmentation tuner (``tools/segment_eval.py``) all read fields through here, so a
field is in the same split and a cell matches a box by the same overlap everywhere.

Layout: ``annotations.json`` is a list of ``{"image_name", "objects": [{"type", "bbox": {x, y, w, h}}]}`` with pixel
boxes (numbers or strings holding numbers). ``type`` is ``red blood cell`` (uninfected), a life-cycle stage
(``ring``, ``trophozoite``, ``schizont``, ``gametocyte``) or ``parasitized`` (the composed sample fields' word), both
parasitized, or ``difficult`` (unsure: neither counted nor held against a detection). Any other type is refused,
not guessed.

One cell boxed twice is read as one cell (``merge_double_boxes``): IML boxes a few infected cells both as a stage and
as a ``red blood cell`` (9 cells in 184 fields), and one parasite twice. Read as two, the field path's one detection
matches either box: the infected cell is trained as uninfected, or counted as a missed parasite.

Pure standard library: no TensorFlow, no OpenCV, no image decoding.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import MalariaEdgeError
from .labels import PARASITIZED, UNINFECTED

Box = Tuple[int, int, int, int]           # x, y, w, h in field pixels

UNINFECTED_TYPES = ("red blood cell",)
PARASITE_TYPES = ("ring", "trophozoite", "schizont", "gametocyte", "parasitized")
LEFT_OUT_TYPES = ("difficult",)
MATCH_IOU = 0.5           # a found cell is an annotated cell when their boxes overlap at least this much
SAME_CELL_INSIDE = 0.9    # ... or when this share of the parasite's box lies inside a red-cell box
BLOCK = 8                 # consecutive captures per split block (neighbouring shots are likely one slide)
SPLITS = ("train", "val", "test")


class AnnotationError(MalariaEdgeError):
    """Annotated fields that cannot be used; one line saying what to fix."""


@dataclass(frozen=True)
class Annotation:
    """One annotated object of a field: its type as written in the file and its box."""
    kind: str
    box: Box

    @property
    def label(self) -> Optional[str]:
        """``parasitized`` or ``uninfected``; None for a ``difficult`` box (left out of scoring)."""
        if self.kind in UNINFECTED_TYPES:
            return UNINFECTED
        if self.kind in PARASITE_TYPES:
            return PARASITIZED
        return None


def overlap_area(a: Box, b: Box) -> int:
    """The area two ``(x, y, w, h)`` boxes share (0 when they do not overlap)."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes (0 when they do not overlap)."""
    inter = overlap_area(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


def _box(bbox: Dict) -> Box:
    return tuple(int(float(bbox[k])) for k in ("x", "y", "w", "h"))


def read_objects(path: Path) -> Dict[str, List[Annotation]]:
    """annotations.json -> {image name: [Annotation]}, in the file's order; unknown object types are refused."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: unreadable annotations ({exc})") from None
    known = UNINFECTED_TYPES + PARASITE_TYPES + LEFT_OUT_TYPES
    out: Dict[str, List[Annotation]] = {}
    for entry in entries:
        objects = []
        for obj in entry.get("objects", []):
            if obj["type"] not in known:
                raise AnnotationError(f"{path}: unknown object type {obj['type']!r} in {entry['image_name']}")
            objects.append(Annotation(obj["type"], _box(obj["bbox"])))
        out[entry["image_name"]] = merge_double_boxes(objects)
    return out


def inside_share(inner: Box, outer: Box) -> float:
    """The share of ``inner``'s area that lies inside ``outer`` (0 for an empty box)."""
    area = inner[2] * inner[3]
    return overlap_area(inner, outer) / area if area else 0.0


def _same_cell(parasite: Box, other: Box) -> bool:
    return iou(parasite, other) >= MATCH_IOU or inside_share(parasite, other) >= SAME_CELL_INSIDE


def merge_double_boxes(objects: List[Annotation]) -> List[Annotation]:
    """One annotation per cell: a parasite box that overlaps an earlier parasite box at IoU >= MATCH_IOU is dropped;
    a parasite box and a ``red blood cell`` box of one cell (IoU >= MATCH_IOU, or the parasite's box at least 90%
    inside) become one object with the red-cell box's outline (on the IML fields it follows the cell; the stage's
    box is often smaller or shifted) and the parasite's stage. Other objects keep their order."""
    kept: List[Annotation] = []
    for obj in objects:
        if obj.label == PARASITIZED and any(k.label == PARASITIZED and iou(k.box, obj.box) >= MATCH_IOU
                                            for k in kept):
            continue
        kept.append(obj)
    merged: List[Optional[Annotation]] = list(kept)
    for i, obj in enumerate(kept):
        if obj.label != PARASITIZED:
            continue
        hosts = [(iou(obj.box, o.box), j) for j, o in enumerate(merged)
                 if o is not None and o.label == UNINFECTED and _same_cell(obj.box, o.box)]
        if hosts:
            _, j = max(hosts)
            merged[i] = Annotation(obj.kind, merged[j].box)
            merged[j] = None
    return [o for o in merged if o is not None]


def capture_number(name: str) -> int:
    """The sequential capture number in a camera file name (``PA171690.JPG`` -> 171690)."""
    digits = re.findall(r"\d+", Path(name).stem)
    if not digits:
        raise AnnotationError(f"{name}: no capture number in the file name; fields are split by capture order")
    return int(digits[-1])


def field_split(name: str, first_capture: int) -> str:
    """train / val / test for a field by its block of 8 consecutive captures counted from ``first_capture``:
    block % 4 == 3 -> test, block % 8 == 1 -> val, else train (about 60/15/25 of blocks)."""
    block = (capture_number(name) - first_capture) // BLOCK
    if block % 4 == 3:
        return "test"
    if block % 8 == 1:
        return "val"
    return "train"


def field_splits(names: Iterable[str]) -> Dict[str, str]:
    """The split of every field of one annotations file, blocks counted from its first capture."""
    names = list(names)
    if not names:
        return {}
    first = min(capture_number(n) for n in names)
    return {n: field_split(n, first) for n in names}
SPLIT_CHOICES = SPLITS + ("all",)


@dataclass
class AnnotatedField:
    """One field's boxes as scoring reads them."""
    name: str
    cells: List[Box]          # every scored cell (uninfected and parasitized)
    parasites: List[Box]      # the parasitized ones
    left_out: List[Box]       # "difficult": neither counted nor held against a detection


def load_annotations(path: Path, split: str = "test") -> List[AnnotatedField]:
    """The annotated fields of one split (or ``all``), sorted by image name."""
    annotations = read_objects(path)
    splits = field_splits(annotations) if split != "all" else {}
    fields = []
    for name in sorted(annotations):
        if split != "all" and splits[name] != split:
            continue
        objects = annotations[name]
        fields.append(AnnotatedField(name, [a.box for a in objects if a.label is not None],
                                     [a.box for a in objects if a.label == PARASITIZED],
                                     [a.box for a in objects if a.label is None]))
    return fields


def match(detections: Sequence[Box], truths: Sequence[Box], threshold: float = MATCH_IOU) -> Dict[int, int]:
    """Greedy one-to-one matching by descending IoU (pairs at or above ``threshold``): {detection: truth}."""
    pairs = []
    for i, d in enumerate(detections):
        for j, t in enumerate(truths):
            if abs(d[0] - t[0]) < d[2] + t[2] and abs(d[1] - t[1]) < d[3] + t[3]:
                v = iou(d, t)
                if v >= threshold:
                    pairs.append((v, i, j))
    pairs.sort(reverse=True)
    used_d, used_t, out = set(), set(), {}
    for _, i, j in pairs:
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
            out[i] = j
    return out


def touches_border(box: Box, width: int, height: int) -> bool:
    """Whether a box reaches the field's edge (its cell may be cut by the border)."""
    x, y, w, h = box
    return x <= 0 or y <= 0 or x + w >= width or y + h >= height
