"""Console entry points ``edge-prepare``, ``edge-train`` and ``edge-adapt``: click options in, the library's job
functions called, their results shown through a :class:`Console` (``-q`` hides summaries and progress)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from malaria_edge.edge_runtime.console import Console, command_line, common_options, require_tensorflow
from malaria_edge.edge_runtime.errors import EXIT_FAILED
from malaria_edge.train.adapt import Recipe
from malaria_edge.train.dataset import NIH_ZIP_URL, describe_bad, download_zip, format_counts, prepare

INTERRUPTED = 130
TERMINATED = 143   # 128 + SIGTERM, as a shell reports a process the signal ended


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(path_type=Path), help="NIH cell_images folder, or cell_images.zip.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for manifest.csv and prepare.json.")
@click.option("--seed", default=42, show_default=True, help="Seed of the patient split.")
@click.option("--test-fraction", default=0.2, show_default=True, help="Share of patients held out for test.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Share of training patients for validation.")
@click.option("--download", is_flag=True, help=f"Fetch the official zip ({NIH_ZIP_URL}) into --out, resuming.")
@click.option("--fields", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Annotated whole fields (images/ + annotations.json, IML-Malaria layout) to add as a second "
                   "source: their red cells are cut by the runtime's segmentation, split by blocks of fields.")
@click.option("--unboxed-negatives/--no-unboxed-negatives", default=False, show_default=True,
              help="Keep the training fields' detections that match no annotated box and touch no parasite "
                   "(unboxed cells, white cells, debris, the scale bar) as uninfected cells.")
@common_options
def prepare_main(data, out, seed, test_fraction, val_fraction, download, fields, unboxed_negatives, verbosity):
    """Split the NIH malaria cells by patient into train/val/test and write a manifest (no images are copied).

    \b
    Examples:
      edge-prepare --data ../shared/data/cell_images --out runs/data
      edge-prepare --data cell_images.zip --out runs/data
      edge-prepare --download --out runs/data
      edge-prepare --data ../shared/data/cell_images --fields ../shared/data/fields/iml_vivax --out runs/data2
    """
    console = Console("edge-prepare", verbosity)
    if not data and not download:
        raise click.UsageError("give --data DIR|ZIP or --download")
    with console.exit_on_error():
        if download:
            data = download_zip(out / "cell_images.zip")
        report = prepare(data, out, seed, test_fraction, val_fraction, command_line("edge-prepare"), fields=fields,
                         log=console.info, unboxed_negatives=unboxed_negatives)
    if report["bad_files"]:
        click.echo(describe_bad(report["bad_files"]), err=True, nl=False)
        click.echo(f"{len(report['bad_files'])} files skipped (listed in {out / 'prepare.json'})", err=True)
    if console.quiet:
        return
    click.echo(format_counts(report["counts"]))
    for source, info in report["sources"].items():
        if info["unit"] == "fields":
            click.echo(f"\n{source} cells (group = field; split by blocks of consecutive fields):")
            click.echo(format_counts(info["counts"], unit="fields"))
    click.echo(f"manifest: {report['manifest']}  (sha256 {report['manifest_sha256'][:16]}..., seed {seed}; "
               "no patient is in two splits)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--manifest", type=click.Path(path_type=Path), help="manifest.csv from edge-prepare.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (model.keras, report, plot).")
@click.option("--preset", type=click.Choice(["edge", "edge-nih", "seed", "tiny"]), default="edge", show_default=True,
              help="edge: our compact multi-lab ResNet; edge-nih: the first NIH-only recipe; seed: the tutorial's "
                   "ResNet and recipe; tiny: a smoke test.")
@click.option("--epochs", type=int, help="Override the preset's epochs.")
@click.option("--batch-size", type=int, help="Override the preset's batch size.")
@click.option("--input-size", type=int, help="Override the preset's input size (pixels a side).")
@click.option("--learning-rate", type=float, help="Override the preset's peak learning rate.")
@click.option("--augment", type=click.Choice(["tutorial", "dihedral_color", "multilab", "anylab"]),
              help="Override the preset's augmentation (for experiments): multilab is the edge preset's, anylab "
                   "adds stain density, grey, gamma, blur, JPEG and cell-size jitter.")
@click.option("--no-stain-norm", is_flag=True, help="Turn off stain normalisation (for experiments).")
@click.option("--hold-out", "hold_out", metavar="SOURCE",
              help="Leave one lab out: train without any cell of SOURCE (e.g. IML or NIH) and report on all of them "
                   "as a lab never seen.")
@click.option("--seed", default=42, show_default=True)
@click.option("--resume", type=click.Path(path_type=Path), help="Continue an interrupted run in this folder.")
@click.option("--strategy", type=click.Choice(["none", "mirrored", "multiworker"]), default="none",
              show_default=True, help="tf.distribute strategy (multiworker reads TF_CONFIG).")
@click.option("--cache", type=click.Path(path_type=Path), help="Where decoded cells are cached "
              "(default: <manifest folder>/cache).")
@common_options
def train_main(manifest, out, preset, epochs, batch_size, input_size, learning_rate, augment, no_stain_norm, hold_out,
               seed, resume, strategy, cache, verbosity):
    """Train a ResNet on the training patients of a manifest; report on the test patients.

    \b
    Examples:
      edge-train --manifest runs/data/manifest.csv --out runs/edge
      edge-train --manifest runs/data/manifest.csv --out runs/seed --preset seed --epochs 5
      edge-train --manifest runs/data/manifest.csv --out runs/lolo_iml --hold-out IML
      edge-train --resume runs/edge
    """
    console = Console("edge-train", verbosity)
    require_tensorflow("edge-train")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if resume:
        out = resume
        if manifest is None:
            manifest = Path(json.loads((resume / "config.json").read_text())["manifest"])
    if manifest is None or out is None:
        raise click.UsageError("give --manifest and --out (or --resume DIR)")
    from malaria_edge.train.train import TrainOptions, train
    options = TrainOptions(preset=preset, epochs=epochs, batch_size=batch_size, input_size=input_size,
                           learning_rate=learning_rate, augment=augment, no_stain=no_stain_norm,
                           hold_out=hold_out, seed=seed, resume=bool(resume),
                           strategy=strategy, cache_dir=cache)
    with console.exit_on_error(FileNotFoundError, ValueError):
        report = train(manifest, out, options, command=command_line("edge-train"), log=console.info)
    if report["interrupted"]:
        sys.exit(INTERRUPTED)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cells", "cells_dir", required=True, type=click.Path(path_type=Path),
              help="The clinic's labelled cells: a folder holding Parasitized/ and Uninfected/ crops.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder for the adapted bundle.")
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="Bundle to start from: its folder, _int8.tflite or card (default: the bundled model). It must "
                   "carry its Keras weights (<name>.keras).")
@click.option("--replay", type=click.Path(path_type=Path),
              help="edge-prepare manifest of the lab the model was trained on: its training cells are replayed so "
                   "that lab is not forgotten, its test split measures what is.")
@click.option("--name", help="File stem of the new bundle (default: <base name>_adapted).")
@click.option("--strategy", type=click.Choice(["head", "last", "all"]), default="all", show_default=True,
              help="What is fine-tuned: the dense head, the last stage and head, or every layer.")
@click.option("--epochs", default=6, show_default=True)
@click.option("--learning-rate", default=1e-3, show_default=True)
@click.option("--replay-cells", default=2000, show_default=True, help="Old-lab cells mixed into every epoch.")
@click.option("--holdout", default=0.3, show_default=True,
              help="Share of each class held out to choose the threshold and measure before/after.")
@click.option("--folds", default=Recipe.folds, show_default=True,
              help="2-10: choose the threshold on out-of-fold scores of every clinic cell (one fine-tune per fold), "
                   "then fine-tune the bundle on all of them; 0: hold out --holdout and never train on it.")
@click.option("--min-sensitivity", type=float, default=Recipe.min_sensitivity, show_default=True,
              help="The threshold is the most specific one that keeps at least this sensitivity on the clinic's "
                   "out-of-fold (or held-out) cells; 0: the best Youden's J instead.")
@click.option("--seed", default=0, show_default=True, help="Seed of the held-out split, replay draw and training.")
@common_options
def adapt_main(cells_dir, out, model_path, replay, name, strategy, epochs, learning_rate, replay_cells, holdout, folds,
               min_sensitivity, seed, verbosity):
    """Fine-tune a model bundle on a clinic's own labelled cells and write a new bundle for edge-classify.

    \b
    Examples:
      edge-adapt --cells clinic_cells --out clinic_model
      edge-adapt --cells clinic_cells --out clinic_model --model runs/bundle --replay runs/data/manifest.csv
      edge-classify new_slide/ --model clinic_model/malaria_adapted_int8.tflite
    """
    console = Console("edge-adapt", verbosity)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from malaria_edge.train.adapt import Terminated, adapt, format_adaptation, terminate_like_ctrl_c
    terminate_like_ctrl_c()
    recipe = Recipe(strategy=strategy, epochs=epochs, learning_rate=learning_rate, replay_cells=replay_cells,
                    seed=seed, folds=folds, min_sensitivity=min_sensitivity or None)
    try:
        with console.exit_on_error():
            result = adapt(cells_dir, out, model_path, replay, name, recipe, holdout,
                           command=command_line("edge-adapt"), log=console.info, warn=console.warn)
    except KeyboardInterrupt as exc:
        stopped = isinstance(exc, Terminated)
        console.error(f"{'stopped (SIGTERM)' if stopped else 'interrupted'}; nothing was written to {out}")
        sys.stdout.flush()
        sys.stderr.flush()
        # TensorFlow's input-pipeline threads can hold a normal interpreter exit for minutes after an interrupted
        # fit; the temporary folder is already removed, so leave at once.
        os._exit(TERMINATED if stopped else INTERRUPTED)
    if not console.quiet:
        click.echo(format_adaptation(result.card))
        click.echo(f"bundle: {result.int8_path}, {result.fp32_path}, {result.card_path}, {result.keras_path}")
        if result.recommended:
            click.echo(f"use it: edge-classify CELLS --model {result.int8_path}")
    if not result.recommended:
        console.warn(f"do not use {result.out}: {result.adaptation['not_recommended_because']} (written for "
                     "inspection; check the labels of Parasitized/ and Uninfected/, or keep the base model)")
        sys.exit(EXIT_FAILED)
    if result.failed:
        console.warn(f"{len(result.failed)} unreadable images skipped (named above); the bundle is written from the "
                     "others")
        sys.exit(EXIT_FAILED)
