"""``edge-bench cells``: latency, throughput, CPU, memory and energy per cell for each model, side by side in one
run, and what a battery buys.

The cells are decoded once per input size into a temporary folder; each model is then measured in a fresh Python
process of its own (``benchmarks/worker.py``), so its peak memory is its own. The int8 model is compared with its
full fp32 model (the reference for the ratios) and, when TensorFlow is installed, with the tutorial's Keras ResNet.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from malaria_edge.benchmarks.endtoend import spread_sample
from malaria_edge.benchmarks.energy import PROFILES, board_power, energy_report
from malaria_edge.benchmarks.report import BenchError
from malaria_edge.edge_runtime.bundle import DEFAULT_MODEL, ModelBundle, sha256_file
from malaria_edge.edge_runtime.images import ImageError, prepare_cell
from malaria_edge.edge_runtime.machine import machine_info
from malaria_edge.edge_runtime.results_io import expand_inputs

SAMPLES = Path(__file__).resolve().parent.parent / "edge_runtime" / "samples"
RATIO_KEYS = ("file_size", "load", "first_inference", "latency_p50", "latency_p95", "latency_mean",
              "throughput", "cpu_per_cell", "peak_rss")
Log = Callable[[str], None]


@dataclass
class CellBench:
    """What one ``edge-bench cells`` run measures, and on what power assumptions."""
    model: Optional[Path] = None          # None: the bundled int8 model
    reference: Optional[Path] = None      # None: the model's own fp32 model
    keras: Optional[Path] = None
    tutorial: bool = True                 # also time the tutorial's Keras ResNet (when TensorFlow is installed)
    images: Path = SAMPLES
    limit: Optional[int] = None           # at most this many cells of ``images`` (a spread sample)
    threads: int = 1
    runs: int = 300
    warmup: int = 20
    batch: int = 32
    device_profile: str = "raspberry-pi-4"
    watts_active: Optional[float] = None
    watts_idle: Optional[float] = None
    battery_wh: float = 37.0
    cells_per_slide: int = 5000


def _figure(value, unit: str) -> Dict:
    return {"value": value, "unit": unit}


def run_worker(spec: Dict) -> Dict:
    """Measure one model in a fresh Python process and return its raw figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run([sys.executable, "-m", "malaria_edge.benchmarks.worker", fh.name], capture_output=True,
                              text=True, env=env, timeout=1800)
    finally:
        os.unlink(fh.name)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"measuring {spec.get('path') or spec.get('preset')} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def portable_path(path) -> str:
    """A path as it may be committed: relative to the current folder when inside it, else the file name only (a
    report names files by name and SHA-256, never by this machine's absolute layout)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return resolved.name


def summarize(name: str, role: str, path: Optional[str], raw: Dict) -> Dict:
    """Raw worker figures -> the report's figures, each with its unit."""
    lat = np.array(raw["latencies_ms"])
    size = Path(path).stat().st_size if path else None
    return {
        "name": name, "role": role, "file": portable_path(path) if path else None,
        "sha256": sha256_file(Path(path)) if path and Path(path).is_file() else None, "kind": raw["kind"],
        "backend": raw["backend"], "backend_version": raw["backend_version"], "input_dtype": raw["input_dtype"],
        "figures": {
            "file_size": _figure(size / 1e6 if size else None, "MB"),
            "load": _figure(raw["load_ms"], "ms"),
            "first_inference": _figure(raw["first_inference_ms"], "ms"),
            "latency_p50": _figure(float(np.percentile(lat, 50)), "ms"),
            "latency_p95": _figure(float(np.percentile(lat, 95)), "ms"),
            "latency_mean": _figure(float(lat.mean()), "ms"),
            "latency_std": _figure(float(lat.std()), "ms"),
            "throughput": _figure(raw["throughput_cells_per_s"], "cells/s"),
            "cpu_per_cell": _figure(raw["cpu_ms_per_cell"], "ms"),
            "peak_rss": _figure(raw["peak_rss_mb"], "MB"),
            "rss_before_load": _figure(raw["rss_before_load_mb"], "MB"),
        },
        "measured_joules_per_cell": (raw["measured_joules"] / len(lat)) if raw.get("measured_joules") else None,
        "meter": raw.get("meter"),
        "latencies_ms": raw["latencies_ms"],
    }


def add_ratios(models: List[Dict], reference: Dict) -> None:
    """Each figure divided by the reference model's same figure (e.g. latency 0.1 = ten times faster)."""
    for m in models:
        for key in RATIO_KEYS:
            mine, ref = m["figures"][key]["value"], reference["figures"][key]["value"]
            m["figures"][key]["ratio_to_reference"] = (mine / ref) if mine is not None and ref else None


def add_tutorial_speedups(models: List[Dict]) -> None:
    """How many times faster per cell (p50) each model is than the tutorial's, when the tutorial's was timed."""
    tutorial = next((m for m in models if m["role"] == "tutorial"), None)
    for m in models:
        if tutorial is not None and m is not tutorial:
            m["speedup_vs_tutorial"] = (tutorial["figures"]["latency_p50"]["value"]
                                        / m["figures"]["latency_p50"]["value"])


def _figure_row(key: str, models: List[Dict]) -> str:
    texts = []
    for m in models:
        f = m["figures"][key]
        if f["value"] is None:
            texts.append(f"{'n/a':>26}")
            continue
        ratio = f.get("ratio_to_reference")
        text = f"{f['value']:.4g}" + (f" ({ratio:.3g}x)" if ratio is not None and key in RATIO_KEYS else "")
        texts.append(f"{text:>26}")
    return f"{key:<18}{models[0]['figures'][key]['unit']:>8}" + "".join(texts)


def _energy_line(m: Dict) -> str:
    en = m["energy"]
    line = (f"  {m['name']:<14} {en['energy_per_cell']['value']:.3f} mJ/cell, "
            f"{en['cells_per_wh']['value']:,.0f} cells/Wh, a {en['cells_per_slide']:,}-cell slide takes "
            f"{en['slide_seconds']['value']:.2f} s and {en['slide_energy']['value'] / 1000:.2f} J")
    if "slides_per_charge" in en:
        line += f", {en['slides_per_charge']['value']:,.0f} slides per {en['battery_wh']['value']:g} Wh charge"
    return line


def format_table(report: Dict) -> str:
    """The human table: one column per model, one row per figure with its unit, then energy per cell and slide."""
    models, settings = report["models"], report["settings"]
    lines = [f"edge-bench cells on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
             f"threads={settings['threads']}, batch 1, {settings['runs']} runs after {settings['warmup']} warm-up, "
             f"{settings['images']} sample cells; ratios (x) are against {report['reference']}",
             f"{'figure':<18}{'unit':>8}" + "".join(f"{m['name']:>26}" for m in models)]
    lines += [_figure_row(key, models) for key in RATIO_KEYS + ("latency_std",)]
    lines += [f"  {m['name']}: {m['kind']} on {m['backend']} {m['backend_version']}"
              + (f" - {m['file']}" if m["file"] else "") for m in models]
    if report.get("tutorial_note"):
        lines.append(f"  {report['tutorial_note']}")
    lines += [f"  {m['name']} is {m['speedup_vs_tutorial']:.0f}x faster per cell than the tutorial's model "
              "(p50 latency, batch 1, same machine, same threads, this run)" for m in models
              if m.get("speedup_vs_tutorial")]
    lines += ["", f"energy ({report['energy']['basis']}; {report['energy']['profile_text']}):"]
    lines += [_energy_line(m) for m in models]
    return "\n".join(lines)


def plot_latencies(report: Dict, path: Path) -> None:
    """A PNG of each model's batch-1 latency spread (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    data = [m["latencies_ms"] for m in report["models"]]
    ax.boxplot(data, vert=False, showfliers=True)
    ax.set_yticks(range(1, len(data) + 1), [m["name"] for m in report["models"]])
    ax.set_xscale("log")
    ax.set_xlabel("latency per cell, batch 1 (ms, log scale)")
    ax.set_title(f"edge-bench: {report['machine']['cpu']}, threads={report['settings']['threads']}")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_cells(images: List[str], size: int, stain: Optional[Dict]) -> Tuple[np.ndarray, List[str]]:
    """The images as model-ready cells, and a line for each one that could not be read."""
    cells, bad = [], []
    for p in images:
        try:
            cells.append(prepare_cell(p, size, stain))
        except ImageError as exc:
            bad.append(f"{p}: {exc}")
    if not cells:
        raise BenchError("no readable images to benchmark with")
    return np.stack(cells), bad


class CellArrays:
    """The images decoded once per (input size, stain) into ``.npy`` files in ``folder`` for the workers."""

    def __init__(self, paths: List[str], folder: Path, warn: Log):
        self.paths, self.folder, self.warn = paths, folder, warn
        self.files: Dict[str, str] = {}
        self.counts: List[int] = []

    def file(self, size: int, stain: Optional[Dict]) -> str:
        key = json.dumps([size, stain], sort_keys=True)
        if key not in self.files:
            arrays, bad = load_cells(self.paths, size, stain)
            if not self.files:
                for b in bad:
                    self.warn(f"skipped {b}")
            self.counts.append(len(arrays))
            self.files[key] = str(self.folder / f"cells_{len(self.files)}.npy")
            np.save(self.files[key], arrays)
        return self.files[key]


def model_specs(bench: CellBench, bundle: ModelBundle, ref_bundle: Optional[ModelBundle], cells: CellArrays,
                warn: Log) -> Tuple[List[Tuple[str, str, Dict]], Optional[str]]:
    """(name, role, worker spec) for every model to time, and the note on the tutorial's model."""
    common = {"threads": bench.threads, "runs": bench.runs, "warmup": bench.warmup, "batch": bench.batch}
    model_cells = cells.file(bundle.size, bundle.stain)
    specs = [(f"{bundle.kind} (this)", "model",
              {"type": "tflite", "path": str(bundle.path), "cells": model_cells, **common})]
    if ref_bundle:
        specs.append((f"{ref_bundle.kind} (full)", "reference", {"type": "tflite", "path": str(ref_bundle.path),
                      "cells": cells.file(ref_bundle.size, ref_bundle.stain), **common}))
    has_tf = importlib.util.find_spec("tensorflow") is not None
    if bench.keras and has_tf:
        specs.append(("keras (ours)", "keras", {"type": "keras", "path": str(bench.keras), "cells": model_cells,
                                                **common}))
    note = None
    if bench.tutorial and has_tf:
        tutorial_runs = max(20, bench.runs // 5)
        specs.append(("tutorial keras", "tutorial", {"type": "keras", "preset": "seed", "cells": cells.file(64, None),
                                                     **common, "runs": tutorial_runs,
                                                     "warmup": min(bench.warmup, 10)}))
        note = (f"tutorial keras: the tutorial's ResNet (stages 3,4,6; filters 64-512; 64x64; 2,163,918 parameters) "
                f"timed as the tutorial runs it, model.predict in float32, {tutorial_runs} runs")
    elif not has_tf:
        note = "TensorFlow is not installed: the tutorial's Keras model was not timed (pip install '.[train]')"
        warn(note)
    return specs, note


def add_energy(models: List[Dict], bench: CellBench) -> Dict:
    """Each model's energy per cell and per slide (measured when a meter gave joules, else estimated), and the
    report's energy basis."""
    watts, profile_text = board_power(bench.device_profile, bench.watts_active, bench.watts_idle, bench.threads)
    basis = "estimated"
    for m in models:
        measured = m["measured_joules_per_cell"]
        if measured is not None:
            basis = f"measured ({m['meter']})"
        m["energy"] = energy_report(m["figures"]["latency_mean"]["value"] / 1000.0, watts, bench.cells_per_slide,
                                    bench.battery_wh, measured, "measured" if measured is not None else "estimated")
    from_profile = bench.watts_active is None
    return {"basis": basis, "profile": bench.device_profile if from_profile else "command line",
            "profile_text": profile_text,
            "watts_idle": PROFILES[bench.device_profile]["watts_idle"] if from_profile else bench.watts_idle}


def cell_paths(bench: CellBench, warn: Log) -> List[str]:
    """The cell images of ``bench.images`` to measure with (a spread sample of ``bench.limit`` when given)."""
    found = expand_inputs([str(bench.images)])
    for problem in found.problems:
        warn(problem)
    return spread_sample(found.images, bench.limit) if bench.limit else found.images


def measure_cells(bench: CellBench, log: Log = lambda m: None, warn: Log = lambda m: None) -> Dict:
    """Every figure of every model on the cells of ``bench.images``: the report ``format_table`` prints."""
    bundle = ModelBundle(bench.model or DEFAULT_MODEL, threads=bench.threads)
    ref_path = bench.reference or bundle.reference_path()
    ref_bundle = ModelBundle(ref_path, threads=bench.threads) if ref_path else None
    paths = cell_paths(bench, warn)
    folder = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    try:
        cells = CellArrays(paths, folder, warn)
        specs, note = model_specs(bench, bundle, ref_bundle, cells, warn)
        models = []
        for name, role, spec in specs:
            log(f"measuring {name} ...")
            models.append(summarize(name, role, spec.get("path"), run_worker(spec)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    reference_model = next((m for m in models if m["role"] == "reference"), models[0])
    add_ratios(models, reference_model)
    add_tutorial_speedups(models)
    energy = add_energy(models, bench)
    return {
        "machine": machine_info(),
        "settings": {"threads": bench.threads, "runs": bench.runs, "warmup": bench.warmup, "batch": bench.batch,
                     "images": cells.counts[0], "images_folder": portable_path(bench.images), "limit": bench.limit,
                     "cells_per_slide": bench.cells_per_slide, "battery_wh": bench.battery_wh},
        "reference": reference_model["name"], "models": models, "energy": energy, "tutorial_note": note,
    }
