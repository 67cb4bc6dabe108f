"""``edge-bench``: latency, throughput, memory and energy per cell for each model, side by side in one run, and
what a battery buys."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import click
import numpy as np

from malaria_edge.benchmarks.endtoend import end_to_end, format_end_to_end
from malaria_edge.benchmarks.energy import PROFILES, active_watts, energy_report
from malaria_edge.benchmarks.field_energy import field_energy, format_fields, time_fields
from malaria_edge.edge_runtime.bundle import DEFAULT_MODEL, ModelBundle, ModelError, sha256_file
from malaria_edge.edge_runtime.classifier import MAX_BATCH, MAX_THREADS
from malaria_edge.edge_runtime.results_io import expand_inputs
from malaria_edge.edge_runtime.images import ImageError, prepare_cell
from malaria_edge.edge_runtime.machine import machine_info

SAMPLES = Path(__file__).resolve().parent.parent / "edge_runtime" / "samples"
RATIO_KEYS = ("file_size", "load", "first_inference", "latency_p50", "latency_p95", "latency_mean",
              "throughput", "cpu_per_cell", "peak_rss")


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
        raise RuntimeError(f"measuring {spec.get('path') or spec.get('preset')} failed: {tail[0]}")
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
        "sha256": sha256_file(Path(path)) if path and Path(path).is_file() else None, "kind": raw["kind"], "backend": raw["backend"],
        "backend_version": raw["backend_version"], "input_dtype": raw["input_dtype"],
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


def format_table(report: Dict) -> str:
    models = report["models"]
    ref_name = report["reference"]
    header = f"{'figure':<18}{'unit':>8}" + "".join(f"{m['name']:>26}" for m in models)
    lines = [f"edge-bench on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
             f"threads={report['settings']['threads']}, batch 1, {report['settings']['runs']} runs after "
             f"{report['settings']['warmup']} warm-up, {report['settings']['images']} sample cells; "
             f"ratios (x) are against {ref_name}", header]
    for key in RATIO_KEYS + ("latency_std",):
        unit = models[0]["figures"][key]["unit"]
        cells = []
        for m in models:
            f = m["figures"][key]
            if f["value"] is None:
                cells.append(f"{'n/a':>26}")
                continue
            ratio = f.get("ratio_to_reference")
            text = f"{f['value']:.4g}" + (f" ({ratio:.3g}x)" if ratio is not None and key in RATIO_KEYS else "")
            cells.append(f"{text:>26}")
        lines.append(f"{key:<18}{unit:>8}" + "".join(cells))
    for m in models:
        lines.append(f"  {m['name']}: {m['kind']} on {m['backend']} {m['backend_version']}"
                     + (f" - {m['file']}" if m["file"] else ""))
    if report.get("tutorial_note"):
        lines.append(f"  {report['tutorial_note']}")
    for m in models:
        if m.get("speedup_vs_tutorial"):
            lines.append(f"  {m['name']} is {m['speedup_vs_tutorial']:.0f}x faster per cell than the tutorial's model "
                         "(p50 latency, batch 1, same machine, same threads, this run)")
    e = report["energy"]
    lines.append("")
    lines.append(f"energy ({e['basis']}; {e['profile_text']}):")
    for m in models:
        en = m["energy"]
        line = (f"  {m['name']:<14} {en['energy_per_cell']['value']:.3f} mJ/cell, "
                f"{en['cells_per_wh']['value']:,.0f} cells/Wh, a {en['cells_per_slide']:,}-cell slide takes "
                f"{en['slide_seconds']['value']:.2f} s and {en['slide_energy']['value'] / 1000:.2f} J")
        if "slides_per_charge" in en:
            line += f", {en['slides_per_charge']['value']:,.0f} slides per {en['battery_wh']['value']:g} Wh charge"
        lines.append(line)
    return "\n".join(lines)


def plot_latencies(report: Dict, path: Path) -> None:
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


def field_benchmark(model_path, fields_dir: Path, annotations: Path, split: str, threads: int,
                    json_path: Optional[Path]) -> None:
    """The field path on annotated fields: detection, counts, parasites, seconds per field, in this process."""
    from malaria_edge.benchmarks.fields import evaluate_fields, format_report
    from malaria_edge.edge_runtime.classifier import Classifier
    from malaria_edge.edge_runtime.segment import OPENCV_HINT, cv2
    if cv2 is None:
        click.echo(f"edge-bench: {OPENCV_HINT}", err=True)
        sys.exit(1)
    cv2.setNumThreads(threads)
    try:
        classifier = Classifier.load(model_path, threads=threads)
        report = evaluate_fields(classifier, fields_dir, annotations, split,
                                 log=lambda m: click.echo(f"edge-bench: {m}", err=True))
    except (ModelError, ValueError, FileNotFoundError) as exc:
        click.echo(f"edge-bench: {exc}", err=True)
        sys.exit(1)
    machine = machine_info()
    report["machine"] = machine
    report["threads"] = threads
    report["model"] = str(classifier.bundle.path)
    click.echo(format_report(report, machine))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))


def load_cells(images: List[str], size: int, stain: Optional[Dict]) -> (np.ndarray, List[str]):
    cells, bad = [], []
    for p in images:
        try:
            cells.append(prepare_cell(p, size, stain))
        except ImageError as exc:
            bad.append(f"{p}: {exc}")
    if not cells:
        raise click.ClickException("no readable images to benchmark with")
    return np.stack(cells), bad


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="Model to measure (default: bundled int8).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Reference model for ratios (default: the model's full fp32 model).")
@click.option("--keras", "keras_path", type=click.Path(exists=True, path_type=Path),
              help="Also time this Keras model (needs TensorFlow).")
@click.option("--no-tutorial", is_flag=True, help="Skip timing the tutorial's ResNet in Keras.")
@click.option("--images", type=click.Path(exists=True, path_type=Path), default=SAMPLES, show_default=False,
              help="Folder of cell images (default: the bundled samples).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True,
              help="Interpreter / TensorFlow threads.")
@click.option("--runs", type=click.IntRange(1), default=300, show_default=True,
              help="Timed batch-1 inferences per model.")
@click.option("--warmup", type=click.IntRange(0), default=20, show_default=True, help="Untimed inferences first.")
@click.option("--batch", type=click.IntRange(1, MAX_BATCH), default=32, show_default=True,
              help="Batch size for the throughput figure.")
@click.option("--device-profile", type=click.Choice(sorted(PROFILES)), default="raspberry-pi-4", show_default=True,
              help="Power profile for the energy estimate when there is no meter.")
@click.option("--watts-active", type=float, help="Board watts while inferring (instead of a profile).")
@click.option("--watts-idle", type=float, help="Board watts idle (with --watts-active).")
@click.option("--battery-wh", type=float, default=37.0, show_default=True,
              help="Battery capacity for slides per charge (37 Wh: a 10,000 mAh 3.7 V power bank).")
@click.option("--cells-per-slide", type=click.IntRange(1), default=5000, show_default=True, help="Cells counted per slide.")
@click.option("--fields", "fields_dir", type=click.Path(exists=True, path_type=Path),
              help="Whole microscope fields (a folder or one image): with --annotations, evaluate detection and "
                   "parasites against the boxes; without, seconds per field on one core and energy per field and "
                   "per slide.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fields' boxes (IML-Malaria annotations.json layout); with --fields.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True,
              help="Which fields of the team's block split to evaluate (tune on train, report on test).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every figure with its unit.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="PNG of each model's latency spread.")
@click.option("--end-to-end", "end_to_end_mode", is_flag=True,
              help="Files in -> rows on disk on one core: decode, preprocess, interpreter and write per cell, and "
                   "edge-classify's own wall time, for each --e2e-batch.")
@click.option("--limit", default=5000, show_default=True,
              help="Cells for --end-to-end (a spread sample of --images, or its files repeated up to this many); "
                   "fields for --fields.")
@click.option("--e2e-batch", "e2e_batches", multiple=True, type=click.IntRange(1), default=(1, 32),
              show_default=True, help="Batch sizes for --end-to-end (repeat the option).")
def main(model_path, reference, keras_path, no_tutorial, images, threads, runs, warmup, batch, device_profile,
         watts_active, watts_idle, battery_wh, cells_per_slide, fields_dir, annotations, split, json_path, plot_path,
         end_to_end_mode, limit, e2e_batches):
    """Benchmark the int8 model against the full fp32 model (and the tutorial's Keras ResNet when TensorFlow is
    installed): latency, throughput, CPU, memory, energy per cell and slides per battery charge.

    \b
    Examples:
      edge-bench
      edge-bench --threads 1 --json bench.json --plot bench.png
      edge-bench --device-profile raspberry-pi-5 --battery-wh 20
      edge-bench --model my_int8.tflite --reference my_fp32.tflite --keras runs/edge/model.keras
      edge-bench --fields ../shared/data/fields/iml_vivax/images \
                 --annotations ../shared/data/fields/iml_vivax/annotations.json --split test --json fields.json
      edge-bench --end-to-end --images ../shared/data/cell_images --limit 5000
      edge-bench --fields ../shared/data/fields/iml_vivax/images --limit 40
    """
    if annotations is not None:
        if fields_dir is None:
            raise click.UsageError("--annotations needs --fields DIR")
        field_benchmark(model_path, fields_dir, annotations, split, threads, json_path)
        return
    if (watts_active is None) != (watts_idle is None) and watts_active is None:
        raise click.UsageError("--watts-idle needs --watts-active")
    try:
        bundle = ModelBundle(model_path or DEFAULT_MODEL, threads=threads)
        ref_path = reference or bundle.reference_path()
        ref_bundle = ModelBundle(ref_path, threads=threads) if ref_path else None
    except ModelError as exc:
        click.echo(f"edge-bench: {exc}", err=True)
        sys.exit(1)
    found = expand_inputs([str(images)])
    paths = found.images
    for p in found.problems:
        click.echo(f"edge-bench: {p}", err=True)
    if fields_dir is not None:
        field_found = expand_inputs([str(fields_dir)])
        for p in field_found.problems:
            click.echo(f"edge-bench: {p}", err=True)
        field_paths = field_found.images
        if not field_paths:
            raise click.ClickException(f"{fields_dir}: no field images")
        if watts_active is not None:
            watts, profile_text = watts_active, f"--watts-active {watts_active} W"
        else:
            watts = active_watts(PROFILES[device_profile], 1)
            profile_text = (f"profile {device_profile}: {watts:.2f} W with 1 busy core; latency measured on this "
                            "machine")
        report = time_fields(bundle.path, field_paths[:limit])
        if not report["fields"]:
            raise click.ClickException("no readable field images")
        energy = field_energy(report, watts, cells_per_slide, battery_wh)
        click.echo(format_fields(report, energy, machine_info(), profile_text))
        if json_path:
            json_path.write_text(json.dumps({"machine": machine_info(), **report, "energy": energy}, indent=2))
        return
    if end_to_end_mode:
        if not paths:
            raise click.ClickException(f"{images}: no images to run end to end")
        report = end_to_end(bundle.path, paths, limit, list(e2e_batches))
        click.echo(format_end_to_end(report, machine_info()))
        if json_path:
            json_path.write_text(json.dumps({"machine": machine_info(), **report}, indent=2))
        return
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    try:
        _bench(bundle, ref_bundle, paths, tmp, images, keras_path, no_tutorial, threads, runs, warmup, batch,
               device_profile, watts_active, watts_idle, battery_wh, cells_per_slide, json_path, plot_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(bundle, ref_bundle, paths, tmp, images, keras_path, no_tutorial, threads, runs, warmup, batch,
           device_profile, watts_active, watts_idle, battery_wh, cells_per_slide, json_path, plot_path):
    """Decode the cells once per input size into ``tmp``, measure each model in its own process, print the table."""
    cell_files: Dict[str, str] = {}
    cell_counts: List[int] = []

    def cells_file(size: int, stain) -> str:
        """Decode the images once per (size, stain) and hand the workers a .npy of them."""
        key = json.dumps([size, stain], sort_keys=True)
        if key not in cell_files:
            arrays, bad = load_cells(paths, size, stain)
            if not cell_files:
                for b in bad:
                    click.echo(f"edge-bench: skipped {b}", err=True)
            cell_counts.append(len(arrays))
            cell_files[key] = str(tmp / f"cells_{len(cell_files)}.npy")
            np.save(cell_files[key], arrays)
        return cell_files[key]

    specs = []

    common = {"threads": threads, "runs": runs, "warmup": warmup, "batch": batch}
    model_cells = cells_file(bundle.size, bundle.stain)
    specs.append((f"{bundle.kind} (this)", "model", {"type": "tflite", "path": str(bundle.path),
                                                     "cells": model_cells, **common}))
    if ref_bundle:
        specs.append((f"{ref_bundle.kind} (full)", "reference",
                      {"type": "tflite", "path": str(ref_bundle.path),
                       "cells": cells_file(ref_bundle.size, ref_bundle.stain), **common}))
    has_tf = importlib.util.find_spec("tensorflow") is not None
    note = None
    if keras_path and has_tf:
        specs.append(("keras (ours)", "keras", {"type": "keras", "path": str(keras_path),
                                                "cells": model_cells, **common}))
    if not no_tutorial and has_tf:
        tutorial_runs = max(20, runs // 5)
        specs.append(("tutorial keras", "tutorial", {"type": "keras", "preset": "seed",
                                                     "cells": cells_file(64, None), **common,
                                                     "runs": tutorial_runs, "warmup": min(warmup, 10)}))
        note = (f"tutorial keras: the tutorial's ResNet (stages 3,4,6; filters 64-512; 64x64; 2,163,918 parameters) "
                f"timed as the tutorial runs it, model.predict in float32, {tutorial_runs} runs")
    elif not has_tf:
        note = "TensorFlow is not installed: the tutorial's Keras model was not timed (pip install '.[train]')"
        click.echo(f"edge-bench: {note}", err=True)

    models = []
    for name, role, spec in specs:
        click.echo(f"edge-bench: measuring {name} ...", err=True)
        models.append(summarize(name, role, spec.get("path"), run_worker(spec)))
    reference_model = next((m for m in models if m["role"] == "reference"), models[0])
    add_ratios(models, reference_model)
    tutorial = next((m for m in models if m["role"] == "tutorial"), None)
    for m in models:
        if tutorial is not None and m is not tutorial:
            m["speedup_vs_tutorial"] = (tutorial["figures"]["latency_p50"]["value"]
                                        / m["figures"]["latency_p50"]["value"])

    if watts_active is not None:
        profile_text = f"--watts-active {watts_active} W, --watts-idle {watts_idle} W"
        watts = watts_active
    else:
        profile = PROFILES[device_profile]
        watts = active_watts(profile, threads)
        profile_text = (f"profile {device_profile}: {watts:.2f} W with {threads} busy core(s); source: "
                        f"{profile['source']}; latency measured on this machine")
    basis = "estimated"
    for m in models:
        measured = m["measured_joules_per_cell"]
        if measured is not None:
            basis = f"measured ({m['meter']})"
        m["energy"] = energy_report(m["figures"]["latency_mean"]["value"] / 1000.0, watts, cells_per_slide,
                                    battery_wh, measured, "measured" if measured is not None else "estimated")
    report = {
        "machine": machine_info(),
        "settings": {"threads": threads, "runs": runs, "warmup": warmup, "batch": batch, "images": cell_counts[0],
                     "images_folder": portable_path(images), "cells_per_slide": cells_per_slide, "battery_wh": battery_wh},
        "reference": reference_model["name"],
        "models": models,
        "energy": {"basis": basis, "profile": device_profile if watts_active is None else "command line",
                   "profile_text": profile_text, "watts_idle": watts_idle if watts_active is not None
                   else PROFILES[device_profile]["watts_idle"]},
        "tutorial_note": note,
    }
    click.echo(format_table(report))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    if plot_path:
        try:
            plot_latencies(report, plot_path)
        except ImportError:
            click.echo("edge-bench: matplotlib is not installed; no plot (pip install matplotlib)", err=True)
