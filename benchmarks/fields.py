"""``edge-bench fields DIR --annotations FILE``: how well the field path finds, counts and calls red cells on
annotated microscope fields, and how long a field takes end to end on one core.

Annotations are the IML-Malaria layout, read, split and matched by ``edge_runtime.annotations`` (the same boxes,
split and IoU rule as training uses).
"""
from __future__ import annotations

import csv
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from malaria_edge.benchmarks.report import BenchError
from malaria_edge.benchmarks.worker import peak_rss_mb
from malaria_edge.edge_runtime.annotations import (MATCH_IOU, AnnotatedField, Box, iou,  # noqa: F401
                                                   load_annotations, match, touches_border)
from malaria_edge.edge_runtime.fields import FieldResult
from malaria_edge.edge_runtime.images import open_image
from malaria_edge.edge_runtime.labels import PARASITIZED


def left_out_detections(detections: Sequence[Box], truth: AnnotatedField, matched: Dict[int, int]) -> set:
    """Indexes of the unmatched detections that match a "difficult" box: neither scored nor held against us."""
    return {i for i, d in enumerate(detections) if i not in matched
            and any(iou(d, b) >= MATCH_IOU for b in truth.left_out)}


def count_errors(detections: Sequence[Box], truth: AnnotatedField, width: int, height: int,
                 matched: Optional[Dict[int, int]] = None,
                 left_out: Optional[set] = None) -> Tuple[Optional[float], Optional[float]]:
    """Signed relative count errors of one field against its annotated cells not touching the border: of every
    detection, and of the detections in the boxes' scope. The scope leaves out, on our side too, what the truth
    leaves out: a detection matched to an annotated cell that touches the border (the box is ~11 px looser than the
    cell, so a whole cell a few pixels from the edge is boxed against it) and one matching only a "difficult" box.
    None when the field has no whole annotated cell."""
    whole = {j for j, b in enumerate(truth.cells) if not touches_border(b, width, height)}
    if not whole:
        return None, None
    matched = match(detections, truth.cells) if matched is None else matched
    left_out = left_out_detections(detections, truth, matched) if left_out is None else left_out
    out_of_scope = sum(1 for j in matched.values() if j not in whole) + len(left_out)
    every = (len(detections) - len(whole)) / len(whole)
    return every, (len(detections) - out_of_scope - len(whole)) / len(whole)


def score_field(result: FieldResult, truth: AnnotatedField) -> Dict:
    """Detection, count and parasite figures of one field against its boxes."""
    dets = [c.box for c in result.cells]
    calls = [c.prediction for c in result.cells]
    whole = [j for j, b in enumerate(truth.cells) if not touches_border(b, result.width, result.height)]
    matched = match(dets, truth.cells)
    left_out = left_out_detections(dets, truth, matched)
    every, in_scope = count_errors(dets, truth, result.width, result.height, matched, left_out)
    parasite_index = {j for j, b in enumerate(truth.cells) if b in truth.parasites}
    found_whole = len(set(matched.values()) & set(whole))
    parasites_found = sum(1 for i, j in matched.items() if j in parasite_index and calls[i] == PARASITIZED)
    false_parasitized = sum(1 for i, c in enumerate(calls) if c == PARASITIZED and i not in left_out
                            and not (i in matched and matched[i] in parasite_index))
    # Cell-level classification on the matched cells: annotated stage vs the model's call.
    truth_pos = [matched[i] in parasite_index for i in matched]
    called_pos = [calls[i] == PARASITIZED for i in matched]
    return {
        "field": truth.name, "detected": len(dets), "scored_detections": len(dets) - len(left_out),
        "matched": len(matched), "annotated_whole": len(whole), "whole_found": found_whole,
        "count_error": in_scope, "count_error_every_detection": every,
        "parasites": len(truth.parasites), "parasites_found": parasites_found,
        "false_parasitized": false_parasitized,
        "tp": sum(t and c for t, c in zip(truth_pos, called_pos)),
        "fn": sum(t and not c for t, c in zip(truth_pos, called_pos)),
        "tn": sum((not t) and (not c) for t, c in zip(truth_pos, called_pos)),
        "fp": sum((not t) and c for t, c in zip(truth_pos, called_pos)),
        "seconds_segment": result.seconds_segment, "seconds_classify": result.seconds_classify,
    }


def run_field(classifier, path: Path, sink: io.TextIOBase) -> Tuple[FieldResult, float, float]:
    """Decode, segment, cut, classify and write one row per cell, as edge-classify does; the wall seconds and the
    process CPU seconds (the fair figure on a shared machine, where wall time includes waiting for a core)."""
    start = time.perf_counter()
    cpu = time.process_time()
    rgb = np.asarray(open_image(path), dtype=np.uint8)
    result = classifier.classify_field(rgb, source=str(path))
    writer = csv.writer(sink)
    for c in result.cells:
        writer.writerow([str(path), c.index, *c.box, c.prediction, f"{c.prob_parasitized:.6f}"])
    sink.flush()
    return result, time.perf_counter() - start, time.process_time() - cpu


def twelve_megapixel_seconds(classifier, field_path: Path, runs: int = 3) -> Dict:
    """End-to-end seconds for a 12 MP photo (4000x3000 JPEG made by upscaling a field), median of ``runs``."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / f"{field_path.stem}_12mp.jpg"
        Image.open(field_path).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(big, quality=92)
        times, cpu_times, cells = [], [], 0
        with open(Path(tmp) / "rows.csv", "w", newline="") as sink:
            for _ in range(runs):
                result, seconds, cpu = run_field(classifier, big, sink)
                times.append(seconds)
                cpu_times.append(cpu)
                cells = result.n_cells
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times), "cells": cells,
            "size": "4000x3000", "from": field_path.name}


def evaluate_fields(classifier, folder: Path, annotations: Path, split: str = "test",
                    log=lambda message: None, limit: Optional[int] = None) -> Dict:
    """Every figure of the field path on the annotated fields of ``split`` (the first ``limit`` of them by name
    when given)."""
    fields = load_annotations(annotations, split)[:limit]
    if not fields:
        raise ValueError(f"no annotated fields in split {split!r}")
    missing = [f.name for f in fields if not (folder / f.name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} annotated fields are not in {folder} (first: {missing[0]})")
    per_field, seconds, cpu_seconds = [], [], []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "rows.csv", "w", newline="") as sink:
        run_field(classifier, folder / fields[0].name, sink)  # warm-up: first interpreter call and imports
        for number, truth in enumerate(fields, start=1):
            result, wall, cpu = run_field(classifier, folder / truth.name, sink)
            scores = score_field(result, truth)
            scores["seconds"] = wall
            scores["cpu_seconds"] = cpu
            per_field.append(scores)
            seconds.append(wall)
            cpu_seconds.append(cpu)
            log(f"{number}/{len(fields)} {truth.name}: {result.n_cells} cells, {wall:.2f} s")
    total = lambda key: sum(f[key] for f in per_field)
    tp, fn, tn, fp = total("tp"), total("fn"), total("tn"), total("fp")
    errors = [f["count_error"] for f in per_field if f["count_error"] is not None]
    every = [f["count_error_every_detection"] for f in per_field if f["count_error"] is not None]
    report = {
        "split": split, "fields": len(per_field),
        "annotated_cells_whole": total("annotated_whole"),
        "recall_whole": total("whole_found") / max(1, total("annotated_whole")),
        "precision": total("matched") / max(1, total("scored_detections")),
        "median_count_error": float(np.median(errors)) if errors else None,
        "median_abs_count_error": float(np.median(np.abs(errors))) if errors else None,
        "median_count_error_every_detection": float(np.median(every)) if every else None,
        "parasites": total("parasites"), "parasites_found": total("parasites_found"),
        "parasite_recall": total("parasites_found") / total("parasites") if total("parasites") else None,
        "false_parasitized_per_field": total("false_parasitized") / len(per_field),
        "cell_sensitivity": tp / (tp + fn) if tp + fn else None,
        "cell_specificity": tn / (tn + fp) if tn + fp else None,
        "seconds_per_field_median": statistics.median(seconds),
        "seconds_per_field_p90": float(np.percentile(seconds, 90)),
        "cpu_seconds_per_field_median": statistics.median(cpu_seconds),
        "seconds_segment_median": statistics.median(f["seconds_segment"] for f in per_field),
        "seconds_classify_median": statistics.median(f["seconds_classify"] for f in per_field),
        "cells_per_field_median": statistics.median(f["detected"] for f in per_field),
        "per_field": per_field,
    }
    log("timing a 12 MP photo ...")
    report["photo_12mp"] = twelve_megapixel_seconds(classifier, folder / fields[0].name)
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def evaluate_model_on_fields(model: Optional[Path], folder: Path, annotations: Path, split: str, threads: int,
                             limit: Optional[int] = None, log: Callable[[str], None] = lambda message: None) -> Dict:
    """``evaluate_fields`` with ``model`` (default: the bundled one) loaded for ``threads`` interpreter and OpenCV
    threads, in this process; the report says on what machine, model and threads it ran."""
    from malaria_edge.edge_runtime.classifier import Classifier
    from malaria_edge.edge_runtime.machine import machine_info
    from malaria_edge.edge_runtime.segment import OPENCV_HINT, cv2
    if cv2 is None:
        raise BenchError(OPENCV_HINT)
    cv2.setNumThreads(threads)
    classifier = Classifier.load(model, threads=threads)
    report = evaluate_fields(classifier, folder, annotations, split, log=log, limit=limit)
    report.update({"machine": machine_info(), "threads": threads, "model": str(classifier.bundle.path)})
    return report


def format_report(report: Dict, machine: Dict) -> str:
    """The human table of an evaluation."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"
    lines = [
        f"Fields: {report['fields']} ({report['split']} split), {report['annotated_cells_whole']} annotated cells "
        f"not touching the border, median {report['cells_per_field_median']:.0f} cells found per field",
        f"  red-cell recall (IoU >= {MATCH_IOU})   {pct(report['recall_whole'])}   (target >= 95%)",
        f"  precision vs boxes           {pct(report['precision'])}   (a lower bound: some cells are unboxed)",
        f"  median count error           {pct(report['median_count_error'])} "
        f"(median |error| {pct(report['median_abs_count_error'])}; target within 5%); counting also the cells "
        f"whose box touches the border: {pct(report['median_count_error_every_detection'])}",
        f"  parasites found              {report['parasites_found']} of {report['parasites']} "
        f"({pct(report['parasite_recall'])}) matched by a cell called parasitized",
        f"  false parasitized per field  {report['false_parasitized_per_field']:.2f}",
        f"  cell sensitivity/specificity {pct(report['cell_sensitivity'])} / {pct(report['cell_specificity'])} "
        "(matched cells)",
        f"  seconds per field            {report['seconds_per_field_median']:.3f} s median, "
        f"{report['seconds_per_field_p90']:.3f} s p90 (segment {report['seconds_segment_median']:.3f} s, "
        f"classify {report['seconds_classify_median']:.3f} s); CPU {report['cpu_seconds_per_field_median']:.3f} s; "
        "target <= 0.5 s",
        f"  12 MP photo ({report['photo_12mp']['size']})      {report['photo_12mp']['seconds']:.2f} s "
        f"(CPU {report['photo_12mp']['cpu_seconds']:.2f} s), {report['photo_12mp']['cells']} cells; target <= 3 s",
        f"  peak RSS                     {report['peak_rss_mb']:.0f} MB",
        f"Machine: {machine.get('cpu', '?')}, one thread (decode, segment, cut, classify, write rows)",
    ]
    return "\n".join(lines)
