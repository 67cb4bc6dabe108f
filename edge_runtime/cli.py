"""``edge-classify``: the click layer over :mod:`run`: options in, one :class:`ClassifyOptions`, the run's exit
status out. Nothing else lives here, and no module imports this one."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from .classifier import MAX_BATCH, MAX_THREADS
from .console import Console, common_options
from .fields import INPUT_KINDS
from .run import ClassifyOptions, run
from .slide import DEFAULT_RBC_PER_UL


def _open_unit_interval(ctx, param, value):
    """--threshold must lie strictly between 0 and 1: 0 or 1 (or a percent-style 50) calls every cell one class."""
    if value is not None and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise click.BadParameter(f"{value} is not a probability strictly between 0 and 1 (e.g. 0.5)")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="A .tflite with its card (default: the bundled int8 model).")
@click.option("--compare", metavar="[FILE]", is_flag=False, flag_value="", default=None,
              help="Also run the full model on every image (default: the bundle's fp32 file) and compare.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help=f"Interpreter threads, 1-{MAX_THREADS} (default: the backend's).")
@click.option("--backend", type=click.Choice(["ai_edge_litert", "tflite_runtime", "tensorflow"]),
              help="Force an interpreter (default: the first one installed, in this order).")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=32, show_default=True,
              help=f"Cells per interpreter call, 1-{MAX_BATCH} (rows are still written as each batch finishes).")
@click.option("--threshold", type=float, callback=_open_unit_interval,
              help="Decision threshold on P(parasitized), strictly between 0 and 1 (default: the card's).")
@click.option("--min-confidence", type=click.FloatRange(0.5, 1.0),
              help="Cells whose confidence is below this are marked 'review' (refer to a microscopist).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, path_type=Path),
              help="CSV path,label giving true labels (else taken from Parasitized/Uninfected folders).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write rows here (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--resume", is_flag=True, help="Skip images already in --output and append the rest (same settings "
              "only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output, --summary-json, --groups-output or --report (never a --review slide "
                   "folder).")
@click.option("--summary-json", type=click.Path(path_type=Path), help="Write the summary as JSON.")
@click.option("--group-by", type=click.Choice(["folder", "patient"]),
              help="Per-slide (folder) or per-patient (NIH file-name id) summary: a group of field cells is read as a "
                   "slide (the card's slide rule), a group of single-cell crops gets the patient rule's call.")
@click.option("--groups-output", type=click.Path(path_type=Path), help="Write per-group rows here (--format).")
@click.option("--input-kind", type=click.Choice(INPUT_KINDS), default="auto", show_default=True,
              help="cell: each image is one cell; field: each image is a microscope field whose red cells are "
                   "found and classified one by one; auto: decide per image from its size and what segmentation "
                   "finds.")
@click.option("--overlays", "overlays_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each field with every cell outlined (candidates thick and numbered: by slide rank when "
                   "grouped, like the review files and report) and a caption, here.")
@click.option("--save-crops", "crops_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each field's cells as <field>_cell<index>.png here, to sort into Parasitized/Uninfected.")
@click.option("--slide", metavar="NAME", help="All inputs are the fields (or cells) of one slide named NAME, read with "
              "the card's slide rule: candidates, corrected parasitemia with its 95% CI, parasites/µL, detection "
              "limit, call.")
@click.option("--rbc-per-ul", type=click.IntRange(100_000, 10_000_000), default=DEFAULT_RBC_PER_UL,
              show_default=True, help="The patient's red cells per µL, for a slide's parasites/µL.")
@click.option("--review", "review_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write DIR/<slide>/Parasitized (candidates, ranked) and Uninfected (a sample of negatives) for a "
                   "microscopist to sort; edge-review DIR recounts; edge-adapt --cells DIR learns from it.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one self-contained HTML report of the slides (opens offline on a phone).")
def main(paths, model_path, compare, threads, backend, batch_size, threshold, min_confidence, labels_csv, output,
         fmt, resume, overwrite, summary_json, group_by, groups_output, input_kind, overlays_dir, crops_dir, slide,
         rbc_per_ul, review_dir, report, verbosity):
    """Classify cell images as parasitized or uninfected, offline, with a TFLite model.

    PATHS are image files, folders (searched recursively) or globs; any format and mode Pillow reads.

    \b
    Examples:
      edge-classify edge_runtime/samples --compare
      edge-classify photos/ -o results.csv --resume --min-confidence 0.8
      edge-classify 'slides/**/*.jpg' --group-by folder --groups-output slides.csv
      edge-classify cells/ --model my_int8.tflite --format jsonl --summary-json summary.json
      edge-classify fields/ --input-kind field --overlays overlays/ --save-crops crops/ -o cells.csv
      edge-classify slide7/ --slide slide7 --review review/ --report slide7.html
    """
    options = ClassifyOptions(
        paths=tuple(paths), model=model_path, compare=compare, threads=threads, backend=backend,
        batch_size=batch_size, threshold=threshold, min_confidence=min_confidence, labels=labels_csv, output=output,
        format=fmt, resume=resume, overwrite=overwrite, summary_json=summary_json, group_by=group_by,
        groups_output=groups_output, input_kind=input_kind, overlays_dir=overlays_dir, crops_dir=crops_dir,
        slide=slide, rbc_per_ul=rbc_per_ul, review_dir=review_dir, report=report, verbosity=verbosity)
    problem = options.usage_problem()
    if problem:
        raise click.UsageError(problem)
    sys.exit(run(options, Console("edge-classify", verbosity)))


if __name__ == "__main__":
    main()
