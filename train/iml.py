"""Red cells of annotated whole fields (IML-Malaria layout) as training and evaluation cells, cut by the device's own
segmentation so the model learns exactly the crops the field path will feed it.

Layout: ``DIR/images/*.JPG`` and ``DIR/annotations.json`` (``[{"image_name", "objects": [{"type", "bbox": {x, y, w,
h}}]}]``; ``red blood cell`` is uninfected, a life-cycle stage is parasitized, ``difficult`` is left out).
Fields are split in blocks of consecutive captures (neighbouring shots are likely one slide), so no slide's
neighbouring fields sit on both sides of a split.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from malaria_edge.edge_runtime.annotations import (MATCH_IOU, Annotation, AnnotationError, Box,  # noqa: F401
                                                   capture_number, field_split, field_splits, inside_share, iou,
                                                   match)
from malaria_edge.edge_runtime.annotations import read_objects
from malaria_edge.edge_runtime.images import ImageError, open_image
from malaria_edge.edge_runtime.labels import PARASITIZED, UNINFECTED
from malaria_edge.train.dataset import Cell, DatasetError

BOX_MARGIN = 0.15         # context around an annotated box when a parasite the segmentation missed is cut by box
OVERLAP_SHARE = 0.1       # an unboxed detection this much covered by a parasite box may be a piece of that parasite
SOURCE = "IML"


class FieldDataError(DatasetError):
    """Annotated fields that cannot be used; one line saying what to fix."""


def read_annotations(path: Path) -> Dict[str, List[Annotation]]:
    """annotations.json -> {image name: [Annotation]} (``edge_runtime.annotations``), refusals as a dataset error."""
    try:
        return read_objects(path)
    except AnnotationError as exc:
        raise FieldDataError(str(exc)) from None


def _splits(annotations: Dict[str, List[Annotation]]) -> Dict[str, str]:
    """Every annotated field's split (``edge_runtime.annotations.field_splits``), refusals as a dataset error."""
    try:
        return field_splits(annotations)
    except AnnotationError as exc:
        raise FieldDataError(str(exc)) from None


def match_regions(regions: Sequence, annotations: Sequence[Annotation]) -> List[Optional[Annotation]]:
    """For each segmented region, the annotation it matches (``edge_runtime.annotations.match``: IoU >= MATCH_IOU,
    greedy, best pairs first), else None."""
    matched = match([r.box for r in regions], [a.box for a in annotations])
    return [annotations[matched[i]] if i in matched else None for i in range(len(regions))]


def _box_crop(rgb: np.ndarray, box: Box) -> np.ndarray:
    x, y, w, h = box
    mx, my = int(w * BOX_MARGIN), int(h * BOX_MARGIN)
    return rgb[max(0, y - my):y + h + my, max(0, x - mx):x + w + mx]


def _save(pixels: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clear_of_parasites(box: Box, annotations: Sequence[Annotation]) -> bool:
    """Whether no parasite or ``difficult`` box covers more than OVERLAP_SHARE of ``box``."""
    return all(inside_share(box, ann.box) <= OVERLAP_SHARE for ann in annotations if ann.label != UNINFECTED)


def _keep(pixels: np.ndarray, path: Path, label: str, field: str, split: str) -> Cell:
    """Save one cut cell and return its manifest row."""
    return Cell(str(path.resolve()), label, field, split, _save(pixels, path), SOURCE)


def _missed_parasites(rgb: np.ndarray, anns: Sequence[Annotation], matches: Sequence[Optional[Annotation]],
                      folder: Path, stem: str, split: str, stats: Dict) -> List[Cell]:
    """Count the field's annotated parasites; in training fields, cut the ones no segmented cell matched by their
    box, through the same central-cell masking."""
    from malaria_edge.edge_runtime.segment import central_cell, cut_cell

    matched_ids = {id(a) for a in matches if a is not None}
    cells = []
    for j, ann in enumerate(anns):
        if ann.label != PARASITIZED:
            continue
        stats["parasites_annotated"] += 1
        if id(ann) in matched_ids or split != "train":
            continue
        crop_rgb = _box_crop(rgb, ann.box)
        region = central_cell(crop_rgb)
        if region is None:
            continue
        cells.append(_keep(cut_cell(crop_rgb, region), folder / "Parasitized" / f"{stem}_box{j}.png", PARASITIZED,
                           stem, split))
        stats["parasites_by_box"] += 1
    return cells


def cut_field_cells(field_dir: Path, out_dir: Path, log=print,
                    unboxed_negatives: bool = False) -> Tuple[List[Cell], Dict]:
    """Segment every annotated field with the runtime's segmentation, label each cut cell by the annotated box it
    matches, and save the crops (PNG, lossless) under ``out_dir``. Parasites the segmentation missed are cut by
    their box through the same central-cell masking, in training fields only (more of the rare class to learn
    from); evaluation fields keep exactly what the field path produces.

    ``unboxed_negatives``: training fields' detections that match no box and overlap no parasite or ``difficult``
    box (unboxed red cells, merged pairs, white cells, platelets, debris, the scale bar) are kept as uninfected: the
    field path feeds them to the model, so it should have seen them."""
    from malaria_edge.edge_runtime.segment import cut_cell, segment_field

    field_dir, out_dir = Path(field_dir), Path(out_dir)
    annotations = read_annotations(field_dir / "annotations.json")
    images = sorted(p for p in (field_dir / "images").iterdir() if p.name in annotations)
    if not images:
        raise FieldDataError(f"{field_dir}: no annotated images in images/; expected the IML-Malaria layout")
    splits = _splits(annotations)
    cells: List[Cell] = []
    stats = {"fields": 0, "segmented": 0, "matched": 0, "unmatched": 0, "difficult": 0,
             "parasites_annotated": 0, "parasites_segmented": 0, "parasites_by_box": 0, "unboxed_negatives": 0,
             "bad_fields": []}
    for done, path in enumerate(images, 1):
        try:
            rgb = np.asarray(open_image(path))
        except ImageError as exc:
            stats["bad_fields"].append({"path": path.name, "reason": str(exc)})
            continue
        split = splits[path.name]
        anns = annotations[path.name]
        regions = segment_field(rgb)
        matches = match_regions(regions, anns)
        stats["fields"] += 1
        stats["segmented"] += len(regions)
        for index, (region, ann) in enumerate(zip(regions, matches)):
            if ann is None:
                stats["unmatched"] += 1
                if unboxed_negatives and split == "train" and _clear_of_parasites(region.box, anns):
                    crop = out_dir / split / "Uninfected" / f"{path.stem}_unboxed{index}.png"
                    cells.append(_keep(cut_cell(rgb, region), crop, UNINFECTED, path.stem, split))
                    stats["unboxed_negatives"] += 1
                continue
            if ann.label is None:
                stats["difficult"] += 1
                continue
            stats["matched"] += 1
            stats["parasites_segmented"] += ann.label == PARASITIZED
            folder = "Parasitized" if ann.label == PARASITIZED else "Uninfected"
            crop = out_dir / split / folder / f"{path.stem}_cell{index}.png"
            cells.append(_keep(cut_cell(rgb, region), crop, ann.label, path.stem, split))
        cells += _missed_parasites(rgb, anns, matches, out_dir / split, path.stem, split, stats)
        if done % 20 == 0:
            log(f"  cut {done}/{len(images)} fields: {len(cells)} labelled cells")
    return cells, stats
