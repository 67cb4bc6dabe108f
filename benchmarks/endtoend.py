"""End to end on one core, files in -> rows on disk: what a user waits for, stage by stage.

Two measurements of the same cells, side by side for each batch size, each as wall time and as CPU time of this
process (on a shared machine the wall time includes other people's work; CPU time does not, but it leaves out waits
such as fsync's):

- the stages, timed in this process with the runtime's own functions in the order ``edge-classify`` calls them:
  decode (``Classifier.decode``: OpenCV's array for a plain WebP, else a Pillow image), preprocess
  (``images.prepare_single_cell`` on the decoded image: the is-it-a-cell check, the central-cell cut, the resize,
  and whatever the card asks for), interpreter (``Classifier.probabilities`` on a
  batch), unfamiliar (the card's colour statistics of the batch, when it has them), write (``RowWriter.write``, one
  row per cell as ``edge-classify`` writes it, flush and fsync included);
- ``edge-classify`` itself in a fresh process on the same core (start-up and model load included), for the wall
  time a user sees.
"""
from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from malaria_edge.edge_runtime.bundle import ModelBundle
from malaria_edge.edge_runtime.classifier import Classifier
from malaria_edge.edge_runtime.results_io import CELL_COLUMNS, RowWriter
from malaria_edge.edge_runtime.images import ImageError, prepare_single_cell

STAGES = ("decode", "preprocess", "interpreter", "unfamiliar", "write")


def one_core() -> Optional[int]:
    """The last core this process may run on, or None where affinity cannot be set (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return max(os.sched_getaffinity(0))


def spread_sample(paths: List[str], count: int) -> List[str]:
    """At most ``count`` of ``paths``: all of them when there are no more, else a seeded random sample in path order
    (so a short run draws from every folder, not only the first)."""
    if len(paths) <= count:
        return list(paths)
    return sorted(random.Random(0).sample(paths, count))


def pick_cells(paths: List[str], count: int, workdir: Path) -> List[str]:
    """``count`` distinct paths: a spread sample of ``paths`` when there are enough, else ``paths`` repeated through
    symbolic links in ``workdir`` (``edge-classify`` skips a path it has already seen)."""
    if len(paths) >= count:
        return spread_sample(paths, count)
    picked = []
    for i in range(count):
        source = Path(paths[i % len(paths)]).resolve()
        link = workdir / f"copy{i // len(paths)}" / source.parent.name / source.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(source)
        picked.append(str(link))
    return picked


class Clock:
    """Wall and CPU seconds since the last tick, added to a stage."""

    def __init__(self):
        self.wall = {s: 0.0 for s in STAGES}
        self.cpu = {s: 0.0 for s in STAGES}
        self.tick()

    def tick(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def add(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[stage] += wall - self._wall
        self.cpu[stage] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def time_stages(bundle: ModelBundle, paths: List[str], batch: int, output: Path) -> Dict:
    """Wall and CPU seconds spent in each stage over all ``paths``, and the loop's totals."""
    clock = Clock()
    writer = RowWriter(output, "csv", CELL_COLUMNS, append=False)
    pending: List[tuple] = []
    failed = 0

    classifier = Classifier(bundle)

    def flush():
        clock.tick()
        pixels = np.stack([cell for _, cell in pending])
        probs, seconds = classifier.probabilities(pixels)
        clock.add("interpreter")
        unfamiliar = classifier.unfamiliar_scores(pixels)
        clock.add("unfamiliar")
        for i, ((path, _), prob) in enumerate(zip(pending, probs)):
            writer.write({"path": path, "prediction": classifier.decide(float(prob)),
                          "prob_parasitized": round(float(prob), 6),
                          "latency_ms": round(1000.0 * seconds / len(pending), 4),
                          "unfamiliar": None if unfamiliar is None else round(float(unfamiliar[i]), 3)})
        clock.add("write")
        pending.clear()

    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        for path in paths:
            clock.tick()
            try:
                image = classifier.decode(path)
                clock.add("decode")
                cell = prepare_single_cell(image, bundle.size, bundle.stain)
                clock.add("preprocess")
            except ImageError:
                failed += 1
                continue
            pending.append((path, cell))
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
    finally:
        writer.close()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu, "wall_seconds": wall, "cpu_total_seconds": cpu,
            "other_seconds": wall - sum(clock.wall.values()), "other_cpu_seconds": cpu - sum(clock.cpu.values()),
            "failed": failed}


def time_edge_classify(model: Path, paths: List[str], batch: int, output: Path, core: Optional[int]) -> tuple:
    """(wall, CPU) seconds of ``edge-classify`` over ``paths`` with one interpreter thread, pinned to ``core``."""
    command = [sys.executable, "-m", "malaria_edge.edge_runtime.cli", *paths, "--model", str(model),
               "--threads", "1", "--batch-size", str(batch), "--output", str(output), "--overwrite"]
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=pin,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"edge-classify failed: {tail[0]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def end_to_end(model: Path, images: List[str], cells: int, batches: List[int]) -> Dict:
    """Measure ``cells`` cells end to end at each batch size, on one core with one interpreter thread."""
    core = one_core()
    if core is not None:
        os.sched_setaffinity(0, {core})
    bundle = ModelBundle(model, threads=1)
    runs = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-e2e-") as tmp:
        tmp = Path(tmp)
        paths = pick_cells(images, cells, tmp)
        distinct = len({Path(p).resolve() for p in paths})
        for batch in batches:
            stages = time_stages(bundle, paths, batch, tmp / f"stages_{batch}.csv")
            wall, cpu = time_edge_classify(bundle.path, paths, batch, tmp / f"classify_{batch}.csv", core)
            runs.append({"batch": batch, **stages, "edge_classify_wall_seconds": wall,
                         "edge_classify_cpu_seconds": cpu})
    return {"model": str(bundle.path), "kind": bundle.kind, "backend": bundle.backend,
            "backend_version": bundle.backend_version, "stain": bool(bundle.stain), "cells": len(paths),
            "distinct_files": distinct, "core": core, "threads": 1,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "runs": runs}


def format_end_to_end(report: Dict, machine: Dict) -> str:
    """The per-stage table: per batch size, ms per cell and seconds in all, as wall time and as CPU time."""
    n = report["cells"]
    runs = report["runs"]
    load = report.get("load_average")
    lines = [f"edge-bench e2e on {machine['cpu']} ({machine['cores']} cores), pinned to core "
             f"{report['core']}, 1 interpreter thread, {n:,} cells ({report['distinct_files']:,} distinct files); "
             f"{report['kind']} on {report['backend']} {report['backend_version']}"
             + (f"; load average {load[0]:.1f} while measuring" if load else ""),
             f"{'':<24}" + "".join(f"{'batch ' + str(r['batch']) + ', wall':>22}{'CPU':>18}" for r in runs),
             f"{'stage':<24}" + "".join(f"{'ms/cell':>11}{'s':>11}{'ms/cell':>9}{'s':>9}" for _ in runs)]

    def row(name: str, wall, cpu) -> str:
        cells = ""
        for r in runs:
            w, c = wall(r), cpu(r)
            cells += f"{1000 * w / n:>11.3f}{w:>11.2f}" + (f"{1000 * c / n:>9.3f}{c:>9.2f}" if c is not None
                                                            else f"{'':>18}")
        return f"{name:<24}" + cells

    for stage in STAGES:
        lines.append(row(stage, lambda r, s=stage: r["seconds"][s], lambda r, s=stage: r["cpu_seconds"][s]))
    lines.append(row("other (loop)", lambda r: r["other_seconds"], lambda r: r["other_cpu_seconds"]))
    lines.append(row("files -> rows", lambda r: r["wall_seconds"], lambda r: r["cpu_total_seconds"]))
    lines.append(row("edge-classify", lambda r: r["edge_classify_wall_seconds"],
                     lambda r: r["edge_classify_cpu_seconds"]))
    note = "" if not report["stain"] else "; the card asks for stain normalisation (in preprocess)"
    lines.append("  edge-classify: a fresh process on the same core, --threads 1, --batch-size as the column; "
                 "start-up, model load and summary included" + note)
    return "\n".join(lines)
