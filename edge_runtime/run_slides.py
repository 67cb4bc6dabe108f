"""The slide steps of an ``edge-classify`` run: which groups are slides, each read with the card's slide rule
(:mod:`slide`), then the review folders (:mod:`review`), the overlays numbered by candidate rank (:mod:`overlay`)
and the one-file report (:mod:`report`).

Which groups are slides: with ``--slide NAME`` all the inputs, fields or single-cell crops, are one slide; with
``--group-by`` a group holding cells cut from whole fields is a slide. A group of single-cell crops only (an NIH
patient) keeps the patient rule's call, the rule chosen and tested on NIH patients. A card without a slide rule
reads no slide: field groups keep "no call".

A field's image is not held for the whole run: its cells (boxes and outlines) are, and the image is decoded again
when its slide's crops, overlay or report figure are drawn.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from .classifier import Classifier, group_key
from .errors import EXIT_USAGE, MalariaEdgeError
from .fields import OVERLAY_NAME
from .images import open_image
from .overlay import ranks_for_field
from .report import SlidePage, model_identity, render_report
from .results_io import atomic_write_text
from .review import safe_name, write_review
from .slide import DEFAULT_RBC_PER_UL, SlideResult, assess_slide, cell_key


@dataclass
class RunSlide:
    """One slide of a run: its reading and every row it was read from (the review folder keeps them all)."""
    result: SlideResult
    rows: List[Dict]


def slide_row(row: Mapping) -> Dict:
    """A written row as the slide reads it: a field cell's box as ``box`` (the review index and report use it)."""
    out = dict(row)
    if row.get("cell") not in (None, "") and row.get("x") not in (None, ""):
        out["box"] = [int(row[k]) for k in ("x", "y", "w", "h")]
    return out


def read_slides(classifier: Classifier, rows: Iterable[Mapping], failed: Sequence[str], grouping,
                every_group: bool = False, rbc_per_ul: float = DEFAULT_RBC_PER_UL) -> Dict[str, RunSlide]:
    """{group name: RunSlide} for the groups that are slides (see the module docstring); ``grouping``: "folder",
    "patient" or a function of the path; ``every_group``: --slide, every group is a slide. Empty when the card has
    no slide rule."""
    rule = classifier.slide_rule
    if rule is None or not grouping:
        return {}
    keyer = group_key(grouping)
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        name = keyer(r["path"])
        if name is not None:
            groups.setdefault(str(name), []).append(slide_row(r))
    for path in failed:
        name = keyer(path)
        if name is not None:
            groups.setdefault(str(name), []).append({"path": path, "error": "failed"})
    out = {}
    for name, group in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if every_group or any(r.get("cell") not in (None, "") for r in group):
            result = assess_slide(group, rule, name=name, rbc_per_ul=rbc_per_ul,
                                  unfamiliar_limits=classifier.unfamiliar_limits)
            if result.failed:
                result.warnings.append(f"{result.failed} image(s) of this slide could not be read (named on the "
                                       "terminal) and are not counted")
            out[name] = RunSlide(result, group)
    return out


def check_slide_outputs(review_dir: Optional[Path], report: Optional[Path], overwrite: bool, classifier: Classifier,
                        names: Iterable[str]) -> None:
    """Before any image is read: a slide rule to read slides with, no review in progress overwritten (a slide
    folder that exists is refused even with --overwrite), no report replaced without --overwrite."""
    if (review_dir or report) and classifier.slide_rule is None:
        raise MalariaEdgeError(f"{classifier.bundle.path}: the model card has no slide_rule, so no slide can be "
                               "read for --review or --report (use a card with one, e.g. the bundled model's)",
                               exit_code=EXIT_USAGE)
    if report is not None and report.exists() and not overwrite:
        raise MalariaEdgeError(f"--report {report} exists; pass --overwrite to replace it", exit_code=EXIT_USAGE)
    if review_dir is not None:
        taken = sorted({safe_name(n) for n in names if (review_dir / safe_name(n)).exists()})
        if taken:
            raise MalariaEdgeError(f"--review {review_dir}: {', '.join(taken)} exist(s): a review in progress is never "
                                   "overwritten; choose another DIR", exit_code=EXIT_USAGE)


def with_image(field):
    """The FieldResult with its field decoded again (the run keeps only its cells)."""
    if field.image is not None:
        return field
    return dataclasses.replace(field, image=np.asarray(open_image(field.source), dtype=np.uint8))


def fields_of(slide: RunSlide, fields: Sequence) -> List:
    """The run's FieldResults whose cells are in this slide, in input order, with their images."""
    sources = {str(r.get("path")) for r in slide.rows if r.get("cell") not in (None, "")}
    return [with_image(f) for f in fields if str(f.source) in sources]


def crop_source(fields: Sequence) -> Callable[[Mapping], np.ndarray]:
    """The crop of a row: a field cell as the model saw it (``segment.cut_cell``), a single-cell image as it is.
    Cut when asked: a review needs its candidates and a sample of negatives, a report only its single-cell crops."""
    from .segment import cut_cell
    cells = {(str(f.source), int(c.index)): (f, c) for f in fields for c in f.shown_cells}

    def crop(row: Mapping) -> np.ndarray:
        found = cells.get(cell_key(row))
        if found is not None:
            field, cell = found
            return cut_cell(field.image, cell.region)
        return np.asarray(open_image(row["path"]), dtype=np.uint8)
    return crop


def write_slide_outputs(slides: Mapping[str, RunSlide], fields: Sequence, classifier: Classifier,
                        review_dir: Optional[Path] = None, report: Optional[Path] = None,
                        overlays_dir: Optional[Path] = None, names: Optional[Mapping[str, str]] = None) -> List[Path]:
    """Per slide its review folder and its fields' overlays (candidates numbered by slide rank; a field in no
    slide numbers its own), then the report of every slide; returns what was written. ``fields``: the run's
    FieldResults (images may be dropped); ``names``: each field's overlay name (edge-classify's unique names)."""
    written: List[Path] = []
    pages, drawn = [], set()
    name, sha = model_identity(classifier)
    for slide in slides.values():
        result, slide_fields = slide.result, fields_of(slide, fields)
        crop = crop_source(slide_fields)
        if overlays_dir is not None:
            written += [save_overlay(f, overlays_dir, ranks_for_field(f, result.candidate_list), names)
                        for f in slide_fields]
            drawn.update(str(f.source) for f in slide_fields)
        if review_dir is not None:
            written.append(write_review(review_dir, result.name, slide.rows, crop,
                                        classifier.slide_rule, source=result.source, rbc_per_ul=result.rbc_per_ul,
                                        unfamiliar_limits=classifier.unfamiliar_limits,
                                        model={"name": name, "sha256": sha}))
        if report is not None:
            cell_crops = {cell_key(r): crop(r) for r in result.candidate_list if r.get("cell") in (None, "")}
            pages.append(SlidePage(result, slide_fields, crops=cell_crops))
    if overlays_dir is not None:
        written += [save_overlay(with_image(f), overlays_dir, names=names) for f in fields
                    if str(f.source) not in drawn]
    if report is not None:
        atomic_write_text(report, render_report(pages, name, sha, provenance=classifier.bundle.card.provenance))
        written.append(report)
    return written


def save_overlay(field, directory: Path, ranks: Optional[Mapping[int, int]] = None,
                 names: Optional[Mapping[str, str]] = None) -> Path:
    """The field's overlay in ``directory``, named as edge-classify names it (``names``, else the field's stem)."""
    name = (names or {}).get(str(field.source)) or field.file_stem()
    return field.save_plot(directory / OVERLAY_NAME.format(name=name), ranks=ranks)
