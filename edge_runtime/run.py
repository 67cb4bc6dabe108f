"""An ``edge-classify`` run as named steps, from one frozen :class:`ClassifyOptions`:

load models -> find inputs -> check outputs -> resume -> classify -> summarise -> write.

Each step either returns what the next one needs or raises a :class:`MalariaEdgeError` whose ``exit_code`` is the
run's exit status; :func:`run` ties them together. The click layer (``cli.py``) only parses options into
:class:`ClassifyOptions`; what reaches the terminal goes through a :class:`Console`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import click
import numpy as np

from .bundle import ModelBundle, ModelError
from .classifier import Classifier, Prediction, group_key
from .console import NORMAL, Console
from .errors import EXIT_FAILED, EXIT_USAGE, MalariaEdgeError
from .fields import CELL_MAX_SIDE, FIELD_MIN_SIDE, OVERLAY_NAME, OVERLAY_PATTERN, FieldResult, field_or_cell, image_size
from .images import ImageError
from .run_slides import check_slide_outputs, read_slides, write_slide_outputs
from .results_io import (CELL_COLUMNS, GROUP_COLUMNS, REFERENCE_COLUMNS, Inputs, Labels, OutputLock, RowWriter,
                         atomic_write_text, check_outputs, check_side_files, check_side_folders, drop_last_field,
                         expand_inputs, is_regular_target, prepare_resume, recorded_side_files, run_settings,
                         side_file, write_rows)
from .segment import SegmentationUnavailable
from .slide import DEFAULT_RBC_PER_UL
from .summary import build_summary, format_summary, group_table_rows, resumed_coverage

EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class ClassifyOptions:
    """Everything one ``edge-classify`` run was asked to do, built once (like MediaPipe's
    ``ImageClassifierOptions``); ``None`` means the model card's or the backend's default."""
    paths: Tuple[str, ...]
    model: Optional[Path] = None
    compare: Optional[str] = None
    threads: Optional[int] = None
    backend: Optional[str] = None
    batch_size: int = 32
    threshold: Optional[float] = None
    min_confidence: Optional[float] = None
    labels: Optional[Path] = None
    output: Optional[Path] = None
    format: str = "csv"
    resume: bool = False
    overwrite: bool = False
    summary_json: Optional[Path] = None
    group_by: Optional[str] = None
    groups_output: Optional[Path] = None
    input_kind: str = "auto"
    overlays_dir: Optional[Path] = None
    crops_dir: Optional[Path] = None
    slide: Optional[str] = None
    rbc_per_ul: float = DEFAULT_RBC_PER_UL
    review_dir: Optional[Path] = None
    report: Optional[Path] = None
    verbosity: int = NORMAL

    def usage_problem(self) -> Optional[str]:
        """Why these options cannot go together, or None."""
        if self.resume and not self.output:
            return "--resume needs --output FILE"
        if self.resume and not is_regular_target(self.output):
            return f"--resume needs a regular --output file; {self.output} is a folder, device or pipe"
        if self.groups_output and not self.grouping:
            return "--groups-output needs --group-by or --slide"
        return slide_usage_problem(self)

    @property
    def grouping(self):
        """How rows are grouped: --group-by's name, or with --slide NAME a function naming every input NAME."""
        return (lambda path: self.slide) if self.slide else self.group_by

    @property
    def regular_output(self) -> bool:
        """True when --output is a file of ours (locked, fsynced, resumable), not stdout, a device or a pipe."""
        return self.output is not None and is_regular_target(self.output)


def slide_usage_problem(options: ClassifyOptions) -> Optional[str]:
    """Why the slide options (--slide, --review, --report) cannot go with the others, or None."""
    if options.slide is not None and options.group_by:
        return "--slide NAME makes all inputs one slide; --group-by makes several: give one of them"
    if (options.review_dir or options.report) and not options.grouping:
        return "--review and --report read slides: give --slide NAME or --group-by folder|patient"
    if (options.review_dir or options.report) and options.resume:
        return "--review and --report need every field's cells from this run; run without --resume"
    return None


@dataclass
class Models:
    """The model that decides, and the full model it is compared with (``--compare``)."""
    classifier: Classifier
    reference: Optional[Classifier] = None

    def paths(self) -> List[str]:
        return [str(self.classifier.bundle.path)] + ([str(self.reference.bundle.path)] if self.reference else [])


@dataclass
class Progress:
    """What the classify step has done so far: rows (the first ``resumed`` of them found in the output by
    --resume), failures, kinds, fields."""
    rows: List[Dict]
    resumed: int = 0
    failed: List[str] = field(default_factory=list)
    kinds: Dict[str, int] = field(default_factory=lambda: {"cell": 0, "field": 0})
    fields: List[Dict] = field(default_factory=list)
    written: int = 0
    field_results: List[FieldResult] = field(default_factory=list)   # without their images (run_slides)
    slides: Dict = field(default_factory=dict)


def run(options: ClassifyOptions, console: Console) -> int:
    """The whole run; returns the exit status (0, 1 when some inputs failed, 2 for usage, 130 when interrupted)."""
    try:
        models = load_models(options, console)
    except (MalariaEdgeError, ValueError) as exc:
        console.error(str(exc))
        return EXIT_USAGE if isinstance(exc, ValueError) else exc.exit_code  # a bad option value is a usage error
    try:
        found = find_inputs(options, console)
        settings = run_settings_of(options, models)
        labels = check_run_outputs(options, models, found)
        with output_lock(options):
            return classify_and_report(options, console, models, found, labels, settings)
    except MalariaEdgeError as exc:
        console.error(str(exc))
        return exc.exit_code


def load_models(options: ClassifyOptions, console: Console) -> Models:
    """Step 1: the model (its SHA-256 checked) and, with --compare, the full model it came from."""
    classifier = Classifier.load(options.model, options.threads, options.backend, options.threshold,
                                 options.min_confidence)
    describe_load(console, "model", classifier.bundle)
    reference = None
    if options.compare is not None:
        ref_path = Path(options.compare) if options.compare else classifier.bundle.reference_path()
        if ref_path is None:
            raise ModelError(f"{classifier.bundle.path}: the card names no full model beside it; pass --compare FILE")
        reference = Classifier(ModelBundle(ref_path, options.threads, options.backend), options.threshold,
                               options.min_confidence)
        describe_load(console, "reference", reference.bundle)
    return Models(classifier, reference)


def describe_load(console: Console, role: str, bundle: ModelBundle) -> None:
    """-v: which file loaded on which interpreter, and how long the load took."""
    console.detail(f"{role} {bundle.path} ({bundle.kind}, {bundle.input_dtype} input) loaded on {bundle.backend} "
                   f"{bundle.backend_version} in {1000 * bundle.load_seconds:.0f} ms")


def find_inputs(options: ClassifyOptions, console: Console) -> Inputs:
    """Step 2: the images named by the arguments, each once; every unusable argument is named on stderr."""
    found = expand_inputs(list(options.paths))
    for problem in found.problems:
        console.warn(problem)
    console.detail(f"{len(found.images)} images found" + (f", {found.duplicates} duplicates dropped"
                                                          if found.duplicates else ""))
    return found


def run_settings_of(options: ClassifyOptions, models: Models) -> Dict:
    """The settings that decide a row, recorded beside --output so a resume can refuse different ones."""
    reference = models.reference
    side_files = [os.path.realpath(p) for p in (options.summary_json, options.groups_output) if p]
    return run_settings(models.classifier.bundle.file_info.get("sha256"), models.classifier.threshold,
                        models.classifier.min_confidence, options.format,
                        reference.bundle.file_info.get("sha256") if reference else None,
                        input_kind=options.input_kind, side_files=side_files)


def check_run_outputs(options: ClassifyOptions, models: Models, found: Inputs) -> Optional[Labels]:
    """Step 3: no output may overwrite an input, the model or another output unless allowed; read --labels; stop
    when there is nothing to classify. Returns the labels (or None)."""
    targets = {"--output": options.output, "--summary-json": options.summary_json,
               "--groups-output": options.groups_output}
    used = models.paths() + ([str(options.labels)] if options.labels else [])
    check_outputs(targets, found.images + used, options.resume, options.overwrite,
                  recorded_side_files(options.output), found.real)
    check_picture_folders(options, found)
    labels = Labels.read(options.labels) if options.labels else None
    check_slide_outputs(options.review_dir, options.report, options.overwrite, models.classifier,
                        {str(group_key(options.grouping)(p)) for p in found.images} if options.grouping else ())
    if not found.images:
        raise MalariaEdgeError("no images to classify", exit_code=EXIT_FAILED)
    return labels


CROP_PATTERN = r"(?P<name>.+)_cell\d+\.png"


def check_picture_folders(options: ClassifyOptions, found: Inputs) -> None:
    """--overlays and --save-crops: never inside an input folder (their pictures would be read back as inputs),
    and never replacing a file already there without --overwrite (refused up front, before any row, so a run
    never stops half-way with its rows written and its pictures not; --resume replaces this output's own)."""
    folders = {"--overlays": options.overlays_dir, "--save-crops": options.crops_dir}
    check_side_folders(folders, found.folders)
    if options.overwrite or options.resume or not (options.overlays_dir or options.crops_dir):
        return
    names = found.output_names().values()
    check_side_files("--overlays", options.overlays_dir, names, OVERLAY_PATTERN)
    check_side_files("--save-crops", options.crops_dir, names, CROP_PATTERN)


def output_lock(options: ClassifyOptions):
    """The lock that keeps two runs off one --output file (nothing to lock for stdout or a pipe)."""
    return OutputLock(options.output) if options.regular_output else contextlib.nullcontext()


def classify_and_report(options: ClassifyOptions, console: Console, models: Models, found: Inputs,
                        labels: Optional[Labels], settings: Dict) -> int:
    """Steps 4-7 under the output's lock: resume, classify, summarise, write. Returns the exit status."""
    previous, todo = resume_point(options, settings, found)
    if len(todo) < len(found.images):
        console.detail(f"{len(found.images) - len(todo)} images already in {options.output}; "
                       f"{len(todo)} to classify")
    progress = Progress(rows=list(previous), resumed=len(previous))
    try:
        names = found.output_names() if options.overlays_dir or options.crops_dir else None
        classify(options, console, models, todo, labels, progress, names)
    except KeyboardInterrupt:
        where = f" to {options.output}" if options.output else ""
        console.warn(f"interrupted; {progress.written} new rows are written{where}"
                     + ("; run the same command with --resume to classify the rest" if options.regular_output
                        else ""))
        return EXIT_INTERRUPTED
    summary = summarise(options, models, found, todo, progress)
    status = write_results(options, console, summary, found, progress)
    for path in write_slide_outputs(progress.slides, progress.field_results, models.classifier, options.review_dir,
                                    options.report, options.overlays_dir if options.grouping else None,
                                    found.output_names() if options.overlays_dir else None):
        console.detail(f"wrote {path}")
    return status


def resume_point(options: ClassifyOptions, settings: Dict, found: Inputs) -> Tuple[List[Dict], List[str]]:
    """Step 4: with --resume, the rows already written (same settings only) and the images still to do; the
    settings are recorded beside --output. A field cut short at the end of the file is classified again."""
    previous: List[Dict] = []
    done: Set[str] = set()
    if options.resume:
        previous, done = prepare_resume(options.output, options.format, settings)
    if options.regular_output:
        atomic_write_text(side_file(options.output, ".settings.json"), json.dumps(settings, indent=2))
    dropped = drop_last_field(options.output, options.format) if options.resume and options.regular_output else None
    if dropped is not None:
        previous = [r for r in previous if r.get("path") != dropped]
        done.discard(os.path.realpath(dropped))
    todo = [p for p in found.images if found.real(p) not in done] if done else list(found.images)
    return previous, todo


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (a phone's task killer, systemd stop) handled like Ctrl-C: the rows written so far are made durable."""


def _on_sigterm(signum, frame):
    raise _Interrupted()


def classify(options: ClassifyOptions, console: Console, models: Models, todo: List[str],
             labels: Optional[Labels], progress: Progress, names: Optional[Dict[str, str]] = None) -> None:
    """Step 5: classify every image still to do, writing each row as soon as its batch has run; SIGTERM stops
    the run like Ctrl-C, with the rows written so far made durable. ``names``: each image's name for its overlay
    and crops (:meth:`Inputs.output_names`)."""
    columns = CELL_COLUMNS + (REFERENCE_COLUMNS if models.reference else [])
    writer = RowWriter(options.output, options.format, columns, append=bool(options.resume))
    if models.reference:
        share_preprocessing(models.classifier, models.reference)
    job = _Job(options, console, models, labels, writer, progress)
    job.names = names or {}
    show_bar = sys.stderr.isatty() and len(todo) > 1 and not console.quiet
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with click.progressbar(length=len(todo), label="classifying", file=sys.stderr, hidden=not show_bar) as bar:
            if options.input_kind == "cell":
                job.classify_cells(todo, bar)
            else:
                job.classify_mixed(todo, bar)
    finally:
        writer.close()
        signal.signal(signal.SIGTERM, previous_handler)


class _Job:
    """The classify step's loop: single cells in batches, fields one by one, every row written in input order."""

    def __init__(self, options: ClassifyOptions, console: Console, models: Models, labels: Optional[Labels],
                 writer: RowWriter, progress: Progress):
        self.options, self.console, self.models = options, console, models
        self.labels, self.writer, self.progress = labels, writer, progress
        self.names: Dict[str, str] = {}

    def true_label(self, source: str) -> Optional[str]:
        return self.labels.get(source) if self.labels else None

    def write_error(self, source: str, reason: str) -> None:
        """An image that is neither a cell nor a field with cells: a row with the reason, never a prediction
        (tried again on --resume)."""
        self.progress.failed.append(source)
        self.console.warn(f"skipped {source}: {reason}")
        self.writer.write({"path": source, "error": reason})

    def write_rows(self, rows: List[Dict]) -> None:
        for row in rows:
            self.writer.write(row)
        self.progress.written += len(rows)
        self.progress.rows.extend(rows)

    def write_cell(self, result: Prediction, reference: Optional[Prediction]) -> None:
        if result.error:
            self.write_error(result.source, self.cell_error(result.source, result.error))
            return
        self.progress.kinds["cell"] += 1
        self.write_rows([result.to_row(self.true_label(result.source), reference)])

    def cell_error(self, source: str, reason: str) -> str:
        """Why a single-cell image failed; when --input-kind auto read it as a cell only for its size and it is
        big enough to be a field, say so and how to read it as a field (a small field is otherwise told "no cell
        found ... not a blood smear" with no hint why it was taken for a cell)."""
        if self.options.input_kind != "auto":
            return reason
        try:
            width, height = image_size(source)
        except ImageError:
            return reason
        if max(width, height) > CELL_MAX_SIDE or min(width, height) < FIELD_MIN_SIDE:
            return reason
        return (f"{reason}; read as a single cell because it is {width}x{height} px (a field is over "
                f"{CELL_MAX_SIDE} px a side): if it is a microscope field, pass --input-kind field")

    def classify_cells(self, paths: List[str], bar=None) -> None:
        """Single-cell images in batches of --batch-size, with the full model beside the model on --compare."""
        batch_size = self.options.batch_size
        reference = self.models.reference
        ref_iter = reference.iter_predict(paths, batch_size) if reference else None
        for result in self.models.classifier.iter_predict(paths, batch_size):
            if bar is not None:
                bar.update(1)
            self.write_cell(result, next(ref_iter) if ref_iter else None)

    def classify_mixed(self, todo: List[str], bar) -> None:
        """Each image decided cell or field (--input-kind); cells wait in a batch, a field or a failure first
        flushes the cells seen before it, so rows stay in input order."""
        cells: List[str] = []
        for path in todo:
            bar.update(1)
            try:
                kind, result = field_or_cell(self.models.classifier, path, self.options.input_kind)
            except (ImageError, SegmentationUnavailable) as exc:
                self.flush_cells(cells)
                self.write_error(path, str(exc))
                continue
            if kind == "cell":
                cells.append(path)
                if len(cells) >= self.options.batch_size:
                    self.flush_cells(cells)
                continue
            self.flush_cells(cells)
            self.write_field(path, result)
        self.flush_cells(cells)

    def flush_cells(self, cells: List[str]) -> None:
        """The single-cell images seen since the last field or error, classified now."""
        self.classify_cells(cells)
        cells.clear()

    def write_field(self, path: str, result: FieldResult) -> None:
        """A field's rows, its figures for the summary, and its overlay and crops when asked for."""
        self.progress.kinds["field"] += 1
        self.write_rows(result.to_rows(self.true_label(path), self.models.reference))
        self.progress.fields.append(result.summary())
        self.progress.field_results.append(dataclasses.replace(result, image=None))
        name = self.names.get(path)
        if self.options.overlays_dir and not self.options.grouping:
            result.save_plot(self.options.overlays_dir / OVERLAY_NAME.format(name=name or result.file_stem()))
        if self.options.crops_dir:
            result.save_crops(self.options.crops_dir, stem=name)


def share_preprocessing(classifier: Classifier, reference: Classifier) -> None:
    """Decode each image once with --compare: when both models want the same input (size and stain), the
    reference takes the cell the model already prepared instead of decoding the file again. The model runs first
    on every batch, so the cell is always there; a cell it could not prepare is prepared (and refused) again."""
    if (reference.bundle.size, reference.bundle.stain) != (classifier.bundle.size, classifier.bundle.stain):
        return
    prepared: Dict[str, np.ndarray] = {}
    own, theirs = classifier.preprocess, reference.preprocess

    def keep(item):
        pixels = own(item)
        if isinstance(item, str):
            prepared[item] = pixels
        return pixels

    def reuse(item):
        pixels = prepared.pop(item, None) if isinstance(item, str) else None
        return theirs(item) if pixels is None else pixels

    classifier.preprocess, reference.preprocess = keep, reuse


def summarise(options: ClassifyOptions, models: Models, found: Inputs, todo: List[str], progress: Progress) -> Dict:
    """Step 6: the run's summary (see :mod:`summary`) with what the inputs and their kinds were, over the whole
    output: the rows a --resume found written count with this run's."""
    progress.slides = read_slides(models.classifier, progress.rows, progress.failed, options.grouping,
                                  every_group=options.slide is not None, rbc_per_ul=options.rbc_per_ul)
    kinds, fields = resumed_coverage(progress.rows[:progress.resumed])
    summary = build_summary(models.classifier, models.reference, progress.rows, found.images, todo,
                            progress.failed, options.grouping, {k: s.result for k, s in progress.slides.items()})
    summary["duplicates_dropped"] = found.duplicates
    summary["input_problems"] = found.problems
    summary["input_kind"] = options.input_kind
    summary["input_kinds"] = {kind: kinds[kind] + progress.kinds[kind] for kind in kinds}
    summary["fields"] = fields + progress.fields
    return summary


def write_results(options: ClassifyOptions, console: Console, summary: Dict, found: Inputs,
                  progress: Progress) -> int:
    """Step 7: the human summary (hidden by -q), --summary-json, --groups-output, and what failed. Returns the
    exit status: 1 when an image or an argument could not be used."""
    console.info(format_summary(summary))
    if options.summary_json:
        atomic_write_text(options.summary_json, json.dumps(summary, indent=2))
    if options.groups_output and summary.get("groups") is not None:
        write_rows(options.groups_output, options.format, GROUP_COLUMNS, group_table_rows(summary["groups"]))
    if progress.failed:
        console.warn(f"{len(progress.failed)} of {len(found.images)} images failed (named above); the other results "
                     "are written")
    if found.problems:
        console.warn(f"{len(found.problems)} input path(s) could not be used (named above); the images found are "
                     "classified")
    return EXIT_FAILED if progress.failed or found.problems else 0
