"""The field path on one core: seconds per whole microscope field (decode, segment, classify) and what a field and
a slide cost in energy.

A slide is read field by field until ``cells_per_slide`` cells are counted, so fields per slide = cells per slide /
the mean cells found per field here. Energy is the profile's watts times the measured seconds (an estimate, as for
cells), unless a meter measured it.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from malaria_edge.benchmarks.endtoend import one_core
from malaria_edge.benchmarks.energy import EnergyMeter, board_power
from malaria_edge.benchmarks.report import BenchError
from malaria_edge.edge_runtime.classifier import Classifier
from malaria_edge.edge_runtime.images import ImageError, load_image

STEPS = ("decode", "segment", "classify")


def time_fields(model: Path, paths: List[str]) -> Dict:
    """Classify every field in ``paths`` on one core with one interpreter thread; per-field seconds by step."""
    from malaria_edge.edge_runtime.fields import classify_field_pixels

    core = one_core()
    if core is not None:
        os.sched_setaffinity(0, {core})
    classifier = Classifier.load(model, threads=1)
    rows, failed = [], []
    meter = EnergyMeter()
    meter.start()
    for path in paths:
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            rgb = np.asarray(load_image(path), dtype=np.uint8)
        except ImageError as exc:
            failed.append(f"{path}: {exc}")
            continue
        decoded = time.perf_counter()
        result = classify_field_pixels(classifier, rgb, str(path), keep_image=False)
        rows.append({"path": str(path), "cells": result.n_cells, "decode": decoded - started,
                     "segment": result.seconds_segment, "classify": result.seconds_classify,
                     "total": time.perf_counter() - started, "cpu": time.process_time() - cpu_started})
    joules = meter.stop()
    return {"model": str(classifier.bundle.path), "core": core, "fields": rows, "failed": failed,
            "measured_joules": joules, "meter": meter.source}


def field_energy(report: Dict, watts: float, cells_per_slide: int, battery_wh: float) -> Dict:
    """Seconds and joules per field and per slide (measured joules when a meter gave them)."""
    rows = report["fields"]
    seconds = float(np.mean([r["total"] for r in rows]))
    cells = float(np.mean([r["cells"] for r in rows]))
    joules = (report["measured_joules"] / len(rows)) if report.get("measured_joules") else watts * seconds
    fields_per_slide = math.ceil(cells_per_slide / cells) if cells else None
    out = {"basis": "measured" if report.get("measured_joules") else "estimated", "watts": watts,
           "seconds_per_field": seconds, "cells_per_field": cells, "joules_per_field": joules,
           "fields_per_slide": fields_per_slide, "cells_per_slide": cells_per_slide}
    if fields_per_slide:
        out.update({"slide_seconds": seconds * fields_per_slide, "slide_joules": joules * fields_per_slide,
                    "slides_per_charge": battery_wh * 3600.0 / (joules * fields_per_slide), "battery_wh": battery_wh})
    return out


def measure_fields(model: Path, paths: List[str], device_profile: str, watts_active: Optional[float],
                   cells_per_slide: int, battery_wh: float) -> Tuple[Dict, str]:
    """Time every field of ``paths`` on one core and cost a field and a slide in energy: (report, words saying where
    the watts came from)."""
    if not paths:
        raise BenchError("no field images")
    report = time_fields(model, paths)
    if not report["fields"]:
        raise BenchError("no readable field images")
    watts, profile_text = board_power(device_profile, watts_active, None, 1)
    report["energy"] = field_energy(report, watts, cells_per_slide, battery_wh)
    return report, profile_text


def format_fields(report: Dict, energy: Dict, machine: Dict, profile_text: str) -> str:
    rows = report["fields"]
    n = len(rows)
    lines = [f"edge-bench fields on {machine['cpu']} ({machine['cores']} cores), pinned to core {report['core']}, "
             f"1 interpreter thread, {n} fields, {sum(r['cells'] for r in rows):,} cells found "
             f"({energy['cells_per_field']:.0f} per field)",
             f"{'step':<12}{'median s':>10}{'mean s':>10}{'ms/cell':>10}"]
    cells = max(1, sum(r["cells"] for r in rows))
    for step in STEPS + ("total",):
        values = [r[step] for r in rows]
        lines.append(f"{step:<12}{np.median(values):>10.3f}{np.mean(values):>10.3f}"
                     f"{1000 * sum(values) / cells:>10.3f}")
    lines.append(f"{'CPU':<12}{np.median([r['cpu'] for r in rows]):>10.3f}{np.mean([r['cpu'] for r in rows]):>10.3f}"
                 f"{1000 * sum(r['cpu'] for r in rows) / cells:>10.3f}")
    line = (f"energy ({energy['basis']}; {profile_text}): {energy['joules_per_field']:.2f} J per field")
    if energy.get("fields_per_slide"):
        line += (f"; a {energy['cells_per_slide']:,}-cell slide is {energy['fields_per_slide']} fields, "
                 f"{energy['slide_seconds']:.0f} s and {energy['slide_joules']:.0f} J, "
                 f"{energy['slides_per_charge']:,.0f} slides per {energy['battery_wh']:g} Wh charge")
    lines.append(line)
    for f in report["failed"]:
        lines.append(f"  skipped {f}")
    return "\n".join(lines)
