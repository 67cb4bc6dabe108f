"""``edge-review``: the click layer over :func:`review.read_review`: a review folder in, each slide recounted
from the cells the microscopist left in Parasitized/, the same summary as ``edge-classify`` out (reviewed true),
and optionally the report after review."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .console import Console, common_options
from .errors import EXIT_FAILED, EXIT_USAGE, MalariaEdgeError
from .report import SlidePage, render_report
from .results_io import atomic_write_text
from .review import SLIDE_NAME, read_review, review_crops, review_model
from .summary import group_lines, slides_summary


def review_folder(directory: Path, summary_json, report, overwrite: bool) -> dict:
    """Recount every slide of ``directory``; write --summary-json and --report; return the summary."""
    for target, option in ((summary_json, "--summary-json"), (report, "--report")):
        if target is not None and Path(target).exists() and not overwrite:
            raise MalariaEdgeError(f"{option} {target} exists; pass --overwrite to replace it", exit_code=EXIT_USAGE)
    slides = read_review(directory)
    if not slides:
        raise MalariaEdgeError(f"{directory}: no slide folder with {SLIDE_NAME} (write one with edge-classify "
                               "--review DIR)", exit_code=EXIT_FAILED)
    summary = slides_summary(slides)
    summary["review_dir"] = str(directory)
    if summary_json:
        atomic_write_text(Path(summary_json), json.dumps(summary, indent=2))
    if report:
        crops = review_crops(directory)
        model = review_model(directory)
        pages = [SlidePage(r, (), crops=crops.get(name, {})) for name, r in slides.items()]
        atomic_write_text(Path(report), render_report(pages, model["name"], model["sha256"]))
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report after review: one self-contained HTML file.")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the recounted slides as JSON (the same groups and slide_details as edge-classify's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --report or --summary-json.")
def main(directory, report, summary_json, overwrite, verbosity):
    """Recount the slides of a review folder after a microscopist sorted its crops.

    DIRECTORY is what edge-classify --review wrote: one folder per slide with Parasitized/ (the candidates) and
    Uninfected/ (a sample of negatives). Cells left in Parasitized/ are confirmed and counted exactly; the call
    becomes "parasites found" or "no parasites found" (down to the detection limit).

    \b
    Examples:
      edge-review review/
      edge-review review/ --report slide7_reviewed.html --summary-json reviewed.json
    """
    console = Console("edge-review", verbosity)
    with console.exit_on_error(OSError, ValueError, KeyError):
        summary = review_folder(directory, summary_json, report, overwrite)
    console.info("\n".join(line for line in group_lines(summary) if line))
    sys.exit(0)


if __name__ == "__main__":
    main()
