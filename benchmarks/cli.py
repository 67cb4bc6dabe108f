"""``edge-bench``: a click group, one subcommand per thing measured (``cells``, ``fields``, ``e2e``, ``phone``).

A thin layer: it reads the options, calls the measurement in ``benchmarks/cells.py``, ``fields.py``,
``field_energy.py``, ``endtoend.py`` or ``phone.py``, prints that module's table and writes its report through
``benchmarks.report.write_report`` (every JSON carries ``tool_version``). Bare ``edge-bench`` prints the group's help
and exits 0: a measurement takes minutes, so none starts unasked.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional

import click

from malaria_edge.benchmarks.cells import SAMPLES, CellBench, format_table, measure_cells, plot_latencies
from malaria_edge.benchmarks.endtoend import end_to_end, format_end_to_end
from malaria_edge.benchmarks.energy import PROFILES
from malaria_edge.benchmarks.report import write_report
from malaria_edge.edge_runtime.annotations import SPLIT_CHOICES
from malaria_edge.edge_runtime.bundle import DEFAULT_MODEL, ModelError
from malaria_edge.edge_runtime.classifier import MAX_BATCH, MAX_THREADS
from malaria_edge.edge_runtime.console import Console, common_options, version_option
from malaria_edge.edge_runtime.errors import EXIT_FAILED, MalariaEdgeError
from malaria_edge.edge_runtime.machine import machine_info
from malaria_edge.edge_runtime.results_io import expand_inputs

PROG = "edge-bench"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@contextmanager
def reported(console: Console):
    """A measurement that stops for a reason the user can act on ends in one line and exit status 1, never a
    traceback."""
    try:
        yield
    except (MalariaEdgeError, ModelError, ValueError, FileNotFoundError) as exc:
        console.error(str(exc))
        sys.exit(getattr(exc, "exit_code", EXIT_FAILED))


def save(console: Console, json_path: Optional[Path], report: Dict) -> None:
    if json_path:
        write_report(json_path, report)
        console.detail(f"wrote {json_path}")


def model_option(help_text: str) -> Callable:
    return click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        help=help_text)


def json_option(func: Callable) -> Callable:
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                        help="Also write every figure with its unit (and tool_version) to this JSON file.")(func)


def power_options(with_idle: bool) -> Callable:
    """The energy assumptions: a device profile or the board's measured watts, a slide's cells, a battery."""
    options = [
        click.option("--device-profile", type=click.Choice(sorted(PROFILES)), default="raspberry-pi-4",
                     show_default=True, help="Power profile for the energy estimate when there is no meter."),
        click.option("--watts-active", type=float, help="Board watts (W) while inferring (instead of a profile)."),
        click.option("--battery-wh", type=float, default=37.0, show_default=True,
                     help="Battery capacity in Wh for slides per charge (37 Wh: a 10,000 mAh 3.7 V power bank)."),
        click.option("--cells-per-slide", type=click.IntRange(1), default=5000, show_default=True,
                     help="Cells counted per slide."),
    ]
    if with_idle:
        options.insert(2, click.option("--watts-idle", type=float, help="Board watts (W) idle (with --watts-active)."))

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def show(console: Console, table: str) -> None:
    """The mode's table on stdout, unless -q asked for warnings and errors only."""
    if not console.quiet:
        click.echo(table)


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@version_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """Measure malaria-edge where it will run: one subcommand per thing measured. Each has its own options and
    examples (edge-bench MODE --help).

    \b
    Modes:
      cells   per cell: latency, throughput, CPU, memory and energy of the int8 model, its fp32 model and the
              tutorial's Keras ResNet, side by side; slides per battery charge
      fields  per whole microscope field: seconds and energy per field and per slide on one core; with
              --annotations, red-cell detection, counts and parasites against the boxes
      e2e     files in -> rows on disk on one core, stage by stage, and edge-classify's own wall time
      phone   a phone's standard client (MediaPipe ImageClassifier) against edge-classify on real cells

    Bare edge-bench prints this help and exits 0: a measurement takes minutes, so none starts unasked. Each mode
    prints its table (every figure with its unit) on stdout; -q keeps only warnings and errors (use it with
    --json), -v adds details.

    \b
    Examples:
      edge-bench cells --threads 1 --json bench.json --plot bench.png
      edge-bench fields ../shared/data/fields/iml_vivax/images --limit 10
      edge-bench e2e --images ../shared/data/cell_images --limit 5000
      edge-bench --version
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command(context_settings=CONTEXT)
@model_option("Model to measure (default: the bundled int8 model).")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reference model for the ratios (default: the model's full fp32 model).")
@click.option("--keras", "keras_path", type=click.Path(exists=True, path_type=Path),
              help="Also time this Keras model (needs TensorFlow).")
@click.option("--no-tutorial", is_flag=True, help="Skip timing the tutorial's ResNet in Keras.")
@click.option("--images", type=click.Path(exists=True, path_type=Path), default=SAMPLES,
              help="Folder of cell images (default: the bundled samples, 41 cells).")
@click.option("--limit", type=click.IntRange(1), metavar="CELLS",
              help="Measure with at most this many cells of --images (a spread sample; default: all of them).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True,
              help="Interpreter / TensorFlow threads.")
@click.option("--runs", type=click.IntRange(1), default=300, show_default=True,
              help="Timed batch-1 inferences per model.")
@click.option("--warmup", type=click.IntRange(0), default=20, show_default=True, help="Untimed inferences first.")
@click.option("--batch", type=click.IntRange(1, MAX_BATCH), default=32, show_default=True,
              help="Batch size for the throughput figure (cells/s).")
@power_options(with_idle=True)
@json_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG of each model's latency spread.")
@common_options
def cells(model_path, reference, keras_path, no_tutorial, images, limit, threads, runs, warmup, batch,
          device_profile, watts_active, watts_idle, battery_wh, cells_per_slide, json_path, plot_path, verbosity):
    """Per cell: the int8 model against its full fp32 model (and the tutorial's Keras ResNet when TensorFlow is
    installed), each in a process of its own: file size (MB), load and first inference (ms), latency p50/p95/mean
    (ms, batch 1), throughput (cells/s), CPU per cell (ms), peak memory (MB), energy per cell (mJ) and per slide
    (s, J), slides per battery charge. Energy is measured where the machine has a meter, else estimated from
    --device-profile or --watts-active, and labelled so.

    \b
    Examples:
      edge-bench cells
      edge-bench cells --threads 1 --json bench.json --plot bench.png
      edge-bench cells --limit 20 --runs 50 --no-tutorial          # a quick look
      edge-bench cells --device-profile raspberry-pi-5 --battery-wh 20
      edge-bench cells --model my_int8.tflite --reference my_fp32.tflite --keras runs/edge/model.keras
    """
    console = Console(PROG, verbosity)
    if watts_idle is not None and watts_active is None:
        raise click.UsageError("--watts-idle needs --watts-active")
    bench = CellBench(model_path, reference, keras_path, not no_tutorial, images, limit, threads, runs, warmup,
                      batch, device_profile, watts_active, watts_idle, battery_wh, cells_per_slide)
    with reported(console):
        report = measure_cells(bench, log=console.info, warn=console.warn)
    show(console, format_table(report))
    save(console, json_path, report)
    if plot_path:
        try:
            plot_latencies(report, plot_path)
        except ImportError:
            console.warn("matplotlib is not installed; no plot (pip install matplotlib)")


@main.command(context_settings=CONTEXT)
@click.argument("fields_dir", metavar="FIELDS", type=click.Path(exists=True, path_type=Path))
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fields' boxes (IML-Malaria annotations.json layout): score detection, counts and parasites "
                   "against them instead of timing.")
@click.option("--split", type=click.Choice(SPLIT_CHOICES), default="test", show_default=True,
              help="With --annotations: which fields of the block split to score (tune on train, report on test).")
@click.option("--limit", type=click.IntRange(1), metavar="FIELDS",
              help="At most this many fields (the first by name; default: all of them).")
@model_option("Model (default: the bundled int8 model).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True,
              help="With --annotations: interpreter and OpenCV threads (timing always runs on one core, 1 thread).")
@power_options(with_idle=False)
@json_option
@common_options
def fields(fields_dir, annotations, split, limit, model_path, threads, device_profile, watts_active, battery_wh,
           cells_per_slide, json_path, verbosity):
    """Per whole microscope field (FIELDS: a folder of field images or one image). Without --annotations: seconds
    per field by step (decode, segment, classify; s and ms per cell) on one core, and energy per field and per slide
    (J, s, slides per charge). With --annotations: red-cell recall and precision against the boxes, count error,
    parasites found, false parasitized per field, seconds per field (s), a 12 MP photo (s) and peak memory (MB);
    power options do not apply.

    \b
    Examples:
      edge-bench fields ../shared/data/fields/iml_vivax/images --limit 10
      edge-bench fields ../shared/data/fields/iml_vivax/images \\
                 --annotations ../shared/data/fields/iml_vivax/annotations.json --split test --json fields.json
      edge-bench fields edge_runtime/sample_fields --annotations edge_runtime/sample_fields/annotations.json \\
                 --split all
    """
    console = Console(PROG, verbosity)
    with reported(console):
        if annotations is not None:
            report = run_scoring(console, model_path, fields_dir, annotations, split, threads, limit)
        else:
            report = run_timing(console, model_path, fields_dir, limit, device_profile, watts_active,
                                 cells_per_slide, battery_wh)
    save(console, json_path, report)


def run_scoring(console: Console, model_path, fields_dir: Path, annotations: Path, split: str, threads: int,
                 limit: Optional[int]) -> Dict:
    from malaria_edge.benchmarks.fields import evaluate_model_on_fields, format_report
    report = evaluate_model_on_fields(model_path, fields_dir, annotations, split, threads, limit, log=console.info)
    show(console, format_report(report, report["machine"]))
    return report


def run_timing(console: Console, model_path, fields_dir: Path, limit: Optional[int], device_profile: str,
                watts_active: Optional[float], cells_per_slide: int, battery_wh: float) -> Dict:
    from malaria_edge.benchmarks.field_energy import format_fields, measure_fields
    found = expand_inputs([str(fields_dir)])
    for problem in found.problems:
        console.warn(problem)
    report, profile_text = measure_fields(model_path or DEFAULT_MODEL, found.images[:limit], device_profile,
                                          watts_active, cells_per_slide, battery_wh)
    machine = machine_info()
    show(console, format_fields(report, report["energy"], machine, profile_text))
    return {"machine": machine, **report}


@main.command(context_settings=CONTEXT)
@model_option("Model (default: the bundled int8 model).")
@click.option("--images", type=click.Path(exists=True, path_type=Path), default=SAMPLES,
              help="Folder of cell images (default: the bundled samples).")
@click.option("--limit", type=click.IntRange(1), default=5000, show_default=True, metavar="CELLS",
              help="Cells to run: a spread sample of --images, or its files repeated up to this many.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1, MAX_BATCH), default=(1, 32),
              show_default=True, help="Batch size; repeat the option for one run per size.")
@json_option
@common_options
def e2e(model_path, images, limit, batches, json_path, verbosity):
    """End to end on one core with one interpreter thread, files in -> rows on disk: decode, preprocess,
    interpreter, unfamiliar score and row writing, each in ms per cell and s in all (wall and CPU), and
    edge-classify's own wall time in a fresh process, for each --batch.

    \b
    Examples:
      edge-bench e2e
      edge-bench e2e --images ../shared/data/cell_images --limit 5000
      edge-bench e2e --limit 60 --batch 1 --batch 8 --json e2e.json
    """
    console = Console(PROG, verbosity)
    with reported(console):
        found = expand_inputs([str(images)])
        for problem in found.problems:
            console.warn(problem)
        if not found.images:
            raise click.ClickException(f"{images}: no images to run end to end")
        report = end_to_end(model_path or DEFAULT_MODEL, found.images, limit, list(batches))
    machine = machine_info()
    show(console, format_end_to_end(report, machine))
    save(console, json_path, {"machine": machine, **report})


@main.command(context_settings=CONTEXT)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An edge-prepare manifest: its NIH cells of --split (labels from the manifest).")
@click.option("--split", default="test", show_default=True, help="Which split of --manifest.")
@click.option("--images", "image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Or a folder of cells (labels from Parasitized/Uninfected folders).")
@model_option("The int8 model (default: the bundled one).")
@json_option
@common_options
def phone(manifest, split, image_dir, model_path, json_path, verbosity):
    """A phone's standard client (MediaPipe Tasks ImageClassifier, the same C++ pipeline as on Android and iOS)
    against edge-classify on real cells: agreement of the calls (%), largest and median difference in
    P(parasitized), accuracy (%) and ROC AUC where labels are known. Needs mediapipe (the dev extra) and OpenCV.

    \b
    Examples:
      edge-bench phone --images edge_runtime/samples
      edge-bench phone --manifest runs/data_ml/manifest.csv --split test --json phone.json
    """
    from malaria_edge.benchmarks.phone import cells_to_compare, compare, format_comparison
    console = Console(PROG, verbosity)
    if not manifest and not image_dir:
        raise click.UsageError("give --manifest or --images")
    paths, labels = cells_to_compare(manifest, split, image_dir)
    if not paths:
        raise click.UsageError("no cells to compare")
    model = model_path or DEFAULT_MODEL
    with reported(console):
        report = compare(model, paths, labels)
    show(console, format_comparison(report, len(paths), model))
    save(console, json_path, {"model": str(model), "cells": len(paths), "scorings": report})


if __name__ == "__main__":
    main()
