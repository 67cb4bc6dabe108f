"""``edge-quantize``: the command line of :func:`malaria_edge.quantize.job.quantize`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from malaria_edge.edge_runtime.console import Console, command_line, common_options, require_tensorflow
from malaria_edge.edge_runtime.errors import EXIT_FAILED, EXIT_USAGE
from malaria_edge.quantize.job import check_card, format_card_summary, quantize, rechoose_patient_rule

PROG = "edge-quantize"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="model.keras from edge-train.")
@click.option("--manifest", required=True, type=click.Path(exists=True, path_type=Path),
              help="The manifest the model was trained on (calibration: train split; evaluation: test split).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the bundle.")
@click.option("--name", default="malaria", show_default=True, help="File stem of the bundle.")
@click.option("--calibration-size", default=400, show_default=True,
              help="Training cells used to calibrate int8 ranges (balanced by class and patient).")
@click.option("--max-drop", default=1.0, show_default=True,
              help="Fail when int8 accuracy is this many points below fp32.")
@click.option("--threads", type=int, help="Interpreter threads for the evaluation.")
@click.option("--patient-counts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Out-of-fold per-patient counts of the training patients (tools/patient_rule_cv.py): the "
                   "patient rule is chosen on them and the validation patients together.")
@click.option("--patient-specificity", type=click.FloatRange(0.5, 1.0),
              help="Choose the patient rule as the most sensitive one whose specificity on the rule's patients is at "
                   "least this (e.g. 0.93); default: Youden's J.")
@click.option("--rule-only", is_flag=True,
              help="Keep the bundle already in --out (files, slide rule) and only choose its patient rule again "
                   "with --patient-counts; the test figures are measured again with the same files.")
@common_options
def main(model_path, manifest, out, name, calibration_size, max_drop, threads, patient_counts, patient_specificity,
         rule_only, verbosity):
    """Convert a Keras model to a float32 TFLite "full model" and a full-integer int8 TFLite model, with a model card,
    and measure what int8 loses on the test patients.

    \b
    Example:
      edge-quantize --model runs/edge/model.keras --manifest runs/data/manifest.csv --out runs/bundle
    """
    console = Console(PROG, verbosity)
    require_tensorflow(PROG)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if rule_only and patient_counts is None:
        console.error("--rule-only needs --patient-counts (the out-of-fold counts to choose the rule on)")
        sys.exit(EXIT_USAGE)
    with console.exit_on_error(OSError, ValueError):
        if rule_only:
            card = rechoose_patient_rule(model_path, manifest, out, patient_counts, name, max_drop, threads,
                                         command_line(PROG), log=console.info, min_specificity=patient_specificity)
        else:
            card = quantize(model_path, manifest, out, name, calibration_size, max_drop, threads, command_line(PROG),
                            log=console.info, warn=console.warn, patient_counts=patient_counts,
                            min_specificity=patient_specificity)
    if not console.quiet:
        click.echo(format_card_summary(card))
        click.echo(f"bundle: {out / (name + '_int8.tflite')}, {out / (name + '_fp32.tflite')}, "
                   f"{out / (name + '.json')}, {out / (name + '.keras')}")
    problem = check_card(card, max_drop)
    if problem:
        console.error(f"FAILED: {problem}")
        sys.exit(EXIT_FAILED)
