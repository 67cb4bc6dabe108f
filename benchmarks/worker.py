"""Measure one model in a process of its own, so peak memory belongs to that model alone.

Run as ``python -m malaria_edge.benchmarks.worker SPEC.json``; prints one JSON object. A TFLite model runs through the edge
runtime's own wrapper; a Keras model runs as the tutorial ran it (``model.predict``, float32).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from malaria_edge.benchmarks.energy import EnergyMeter


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _time_loop(infer: Callable[[np.ndarray], object], cells: np.ndarray, runs: int, warmup: int) -> Dict:
    for i in range(warmup):
        infer(cells[i % len(cells)][None])
    meter = EnergyMeter()
    meter.start()
    cpu0 = time.process_time()
    latencies = []
    for i in range(runs):
        cell = cells[i % len(cells)][None]
        t0 = time.perf_counter()
        infer(cell)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    cpu = time.process_time() - cpu0
    joules = meter.stop()
    return {"latencies_ms": latencies, "cpu_ms_per_cell": 1000.0 * cpu / runs,
            "measured_joules": joules, "meter": meter.source}


def _throughput(infer: Callable[[np.ndarray], object], cells: np.ndarray, batch: int, seconds: float = 1.0) -> float:
    stacked = np.stack([cells[i % len(cells)] for i in range(batch)])
    infer(stacked)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        infer(stacked)
        done += batch
    return done / (time.perf_counter() - t0)


def measure_tflite(spec: Dict, cells: np.ndarray) -> Dict:
    from malaria_edge.edge_runtime.bundle import ModelBundle
    rss_before = rss_mb()
    t0 = time.perf_counter()
    bundle = ModelBundle(spec["path"], threads=spec["threads"])
    load_ms = (time.perf_counter() - t0) * 1000.0

    def infer(batch):
        return bundle.run(batch)

    t0 = time.perf_counter()
    infer(cells[:1])
    first_ms = (time.perf_counter() - t0) * 1000.0
    loop = _time_loop(infer, cells, spec["runs"], spec["warmup"])
    throughput = _throughput(infer, cells, spec["batch"])
    info = bundle.describe()
    return {"load_ms": load_ms, "first_inference_ms": first_ms, "throughput_cells_per_s": throughput,
            "rss_before_load_mb": rss_before, "peak_rss_mb": peak_rss_mb(), "backend": info["backend"],
            "backend_version": info["backend_version"], "kind": info["kind"], "input_dtype": info["input_dtype"],
            **loop}


def measure_keras(spec: Dict, cells: np.ndarray) -> Dict:
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    if spec["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    rss_before = rss_mb()
    t0 = time.perf_counter()
    if spec.get("path"):
        model = keras.models.load_model(spec["path"])
    else:
        from malaria_edge.train.model import PRESETS, build_resnet
        model = build_resnet(PRESETS[spec["preset"]])
    load_ms = (time.perf_counter() - t0) * 1000.0

    def infer(batch):
        return model.predict(batch.astype(np.float32), verbose=0)

    t0 = time.perf_counter()
    infer(cells[:1])
    first_ms = (time.perf_counter() - t0) * 1000.0
    loop = _time_loop(infer, cells, spec["runs"], spec["warmup"])
    throughput = _throughput(infer, cells, spec["batch"])
    return {"load_ms": load_ms, "first_inference_ms": first_ms, "throughput_cells_per_s": throughput,
            "rss_before_load_mb": rss_before, "peak_rss_mb": peak_rss_mb(), "backend": "keras (tensorflow)",
            "backend_version": f"keras {keras.__version__}, tensorflow {tf.__version__}", "kind": "keras float32",
            "input_dtype": "float32", "parameters": int(model.count_params()), **loop}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    cells = np.load(spec["cells"])
    result = measure_keras(spec, cells) if spec["type"] == "keras" else measure_tflite(spec, cells)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
