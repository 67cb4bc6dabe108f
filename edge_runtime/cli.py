"""``edge-classify``: classify cell images on the device, against the full model, safe to interrupt."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional

import click
import numpy as np

from .backend import BackendError
from .bundle import ModelBundle, ModelError
from .classifier import MAX_BATCH, MAX_THREADS, Classifier, group_key
from .fields import INPUT_KINDS, field_or_cell
from .images import ImageError
from .patients import FIELD_RULE_REASON
from .segment import SegmentationUnavailable, cut_cell
from .labels import CLASSES, PARASITIZED, REVIEW, patient_id
from .metrics import binary_metrics, pct
from .results_io import (CELL_COLUMNS, GROUP_COLUMNS, REFERENCE_COLUMNS, Labels, OutputError, OutputLock, RowWriter,
                         atomic_write_text, check_outputs, expand_inputs, is_regular_target, prepare_resume,
                         recorded_side_files, run_settings, side_file, write_rows)



def _drop_last_field(path: Path, fmt: str) -> Optional[str]:
    """Resume on fields: a field is done only when all its rows are written, and only the last image of the file
    can be cut short, so when that image is a field (its rows have a cell index) its rows are removed and the
    field is classified again. Returns the path of the field dropped, if any."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    lines = path.read_bytes().splitlines(keepends=True)
    body_start = 1 if fmt == "csv" else 0

    def parse(line: bytes) -> Optional[Dict]:
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            if fmt == "csv":
                values = next(csv.reader([text]))
                header = next(csv.reader([lines[0].decode("utf-8", errors="surrogateescape")]))
                return dict(zip(header, values))
            return json.loads(text)
        except (ValueError, StopIteration):
            return None

    if len(lines) <= body_start:
        return None
    last = parse(lines[-1])
    if not last or last.get("cell") in (None, ""):
        return None
    keep = len(lines)
    while keep > body_start:
        row = parse(lines[keep - 1])
        if not row or row.get("path") != last.get("path"):
            break
        keep -= 1
    path.write_bytes(b"".join(lines[:keep]))
    return last.get("path")


def write_field(writer, rows: List[Dict], field, reference: Optional[Classifier], label: Optional[str]) -> int:
    """One row per cell of a classified field: its index and box in the field's pixels, its call. Returns the
    number of rows written."""
    per_cell_ms = 1000.0 * field.seconds_classify / max(1, field.n_cells)
    ref_probs = None
    if reference is not None and field.cells:
        pixels = np.stack([reference.prepare_crop(cut_cell(field.image, c.region)) for c in field.cells])
        ref_probs, ref_seconds = reference.probabilities(pixels)
    for i, cell in enumerate(field.cells):
        x, y, w, h = cell.box
        row = {"path": field.source, "cell": cell.index, "x": x, "y": y, "w": w, "h": h,
               "prediction": cell.prediction, "prob_parasitized": round(cell.prob_parasitized, 6),
               "latency_ms": round(per_cell_ms, 4), "true_label": label,
               "unfamiliar": None if cell.unfamiliar is None else round(cell.unfamiliar, 3)}
        if ref_probs is not None:
            prob = float(ref_probs[i])
            row.update({"ref_prediction": reference.decide(prob), "ref_prob_parasitized": round(prob, 6),
                        "ref_latency_ms": round(1000.0 * ref_seconds / len(field.cells), 4)})
        writer.write(row)
        rows.append(row)
    return len(field.cells)


def model_summary(rows: List[Dict], prefix: str, threshold: float) -> Dict:
    """Accuracy etc. where labels are known, latency percentiles, review count for one model's columns."""
    probs = [r[f"{prefix}prob_parasitized"] for r in rows]
    lat = np.array([r[f"{prefix}latency_ms"] for r in rows], dtype=float)
    out = {"cells": len(rows),
           "parasitized": sum(r[f"{prefix}prediction"] == PARASITIZED for r in rows),
           "review": sum(r[f"{prefix}prediction"] == REVIEW for r in rows),
           "latency_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
           "latency_ms_p95": float(np.percentile(lat, 95)) if len(lat) else None,
           "latency_ms_mean": float(lat.mean()) if len(lat) else None}
    labelled = [(r["true_label"], p) for r, p in zip(rows, probs) if r.get("true_label") in CLASSES]
    if labelled:
        m = binary_metrics([1 if lab == PARASITIZED else 0 for lab, _ in labelled], [p for _, p in labelled],
                           threshold)
        patients = {patient_id(r["path"]) for r in rows if r.get("true_label") in CLASSES}
        out.update({"labelled_cells": len(labelled), "labelled_patients": len(patients - {None}) or None,
                    "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
                    "specificity": m["specificity"], "roc_auc": m["roc_auc"],
                    "confusion_matrix": m["confusion_matrix"]})
    return out


def format_summary(summary: Dict) -> str:
    lines = []
    for key in ("model", "reference"):
        s = summary.get(key)
        if not s:
            continue
        lines.append(f"{key:>9}: {s['file']} ({s['kind']}, {s['bytes'] / 1024:.0f} KiB) on {s['backend']} "
                     f"{s['backend_version']}, threads={s['threads'] or 'default'}")
        if not s.get("cells"):
            lines.append("           no cell classified")
            continue
        line = (f"           {s['cells']} cells: {s['parasitized']} parasitized, {s['review']} review; latency p50 "
                f"{s['latency_ms_p50']:.3f} ms, p95 {s['latency_ms_p95']:.3f} ms per cell")
        if "accuracy" in s:
            who = f" of {s['labelled_patients']} patients" if s.get("labelled_patients") else ""
            line += (f"; on {s['labelled_cells']} labelled cells{who} accuracy {pct(s['accuracy'])}, sensitivity "
                     f"{pct(s['sensitivity'])}, specificity {pct(s['specificity'])}")
        lines.append(line)
    if summary.get("agreement") is not None:
        lines.append(f"  against the full model: agreement {pct(summary['agreement'])}, max |dp| "
                     f"{summary['max_abs_prob_diff']:.4f}, speed ratio (full p50 / this p50) "
                     f"{summary['speed_ratio']:.2f}x")
    lines.append(f"   images: {summary['images']} found, {summary['classified']} classified, "
                 f"{summary['skipped_resume']} already in the output, {summary['failed']} failed"
                 + (f", {summary['duplicates_dropped']} duplicates dropped (the same file given twice)"
                    if summary.get("duplicates_dropped") else ""))
    if summary.get("without_patient_id"):
        lines.append(f"  {summary['without_patient_id']} cells carry no patient id in their file name (NIH "
                     "C<n>P<n>... names) and are in no patient's call")
    kinds = summary.get("input_kinds")
    if kinds and kinds.get("field"):
        how = "chosen per image" if summary.get("input_kind") == "auto" else f"--input-kind {summary['input_kind']}"
        lines.append(f"    kinds: {kinds['field']} fields, {kinds['cell']} single cells ({how})")
    for f in summary.get("fields") or []:
        frac = "n/a" if f["parasitemia"] is None else (
            f"{100 * f['parasitemia']:.1f}% (95% CI {100 * f['parasitemia_low']:.1f}-"
            f"{100 * f['parasitemia_high']:.1f}%)")
        lines.append(f"    field {Path(f['source']).name}: {f['cells']} cells, {f['parasitized']} parasitized, "
                     f"{f['review']} review, parasitemia {frac}")
    if summary.get("unfamiliar_warning"):
        lines.append(f"  WARNING: {summary['unfamiliar_warning']}")
    groups = summary.get("groups")
    if groups:
        lines.append("")
        lines.append(f"{'group':<28} {'call':<13} {'cells':>6} {'parasit.':>8} {'review':>6} {'fraction':>9} "
                     f"{'95% CI':>15} {'truth':>8}")
        for name, g in groups.items():
            frac = "n/a" if g["parasitized_fraction"] is None else f"{100 * g['parasitized_fraction']:.1f}%"
            ci = "" if not g["fraction_ci95"] else (f"{100 * g['fraction_ci95'][0]:.1f}-"
                                                    f"{100 * g['fraction_ci95'][1]:.1f}%")
            lines.append(f"{name[-28:]:<28} {g['call']:<13} {g['cells']:>6} {g['parasitized']:>8} {g['review']:>6} "
                         f"{frac:>9} {ci:>15} {g.get('true_status', ''):>8}"
                         + (f"  ({g['reason']})" if g["call"] == "indeterminate" else ""))
        if summary.get("patient_rule") is None:
            lines.append("  no calls: the model card has no patient rule (re-quantize with edge-quantize to get one)")
        elif any(g["reason"] == FIELD_RULE_REASON for g in groups.values()):
            lines.append(f"  no call for whole-field groups: {FIELD_RULE_REASON}")
        if summary.get("patient_level"):
            pl = summary["patient_level"]
            lines.append(f"  {pl['text']} (sensitivity {pct(pl['sensitivity'])}, specificity "
                         f"{pct(pl['specificity'])}, {pl['indeterminate']} indeterminate)")
    return "\n".join(lines)


def _open_unit_interval(ctx, param, value):
    """--threshold must lie strictly between 0 and 1: 0 or 1 (or a percent-style 50) calls every cell one class."""
    if value is not None and not (math.isfinite(value) and 0.0 < value < 1.0):
        raise click.BadParameter(f"{value} is not a probability strictly between 0 and 1 (e.g. 0.5)")
    return value


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (a phone's task killer, systemd stop) handled like Ctrl-C: the rows written so far are made durable."""


def _on_sigterm(signum, frame):
    raise _Interrupted()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--overwrite", is_flag=True, help="Replace an existing --output, --summary-json or --groups-output.")
@click.option("--summary-json", type=click.Path(path_type=Path), help="Write the summary as JSON.")
@click.option("--group-by", type=click.Choice(["folder", "patient"]),
              help="Per-slide (folder) or per-patient (NIH file-name id) summary with a positive/negative call.")
@click.option("--groups-output", type=click.Path(path_type=Path), help="Write per-group rows here (--format).")
@click.option("--input-kind", type=click.Choice(INPUT_KINDS), default="auto", show_default=True,
              help="cell: each image is one cell; field: each image is a microscope field whose red cells are "
                   "found and classified one by one; auto: decide per image from its size and what segmentation "
                   "finds.")
@click.option("--overlays", "overlays_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each field with every cell outlined by its call, and a caption, here.")
@click.option("--save-crops", "crops_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each field's cells as <field>_cell<index>.png here, to sort into Parasitized/Uninfected.")
def main(paths, model_path, compare, threads, backend, batch_size, threshold, min_confidence, labels_csv, output,
         fmt, resume, overwrite, summary_json, group_by, groups_output, input_kind, overlays_dir, crops_dir):
    """Classify cell images as parasitized or uninfected, offline, with a TFLite model.

    PATHS are image files, folders (searched recursively) or globs; any format and mode Pillow reads.

    \b
    Examples:
      edge-classify edge_runtime/samples --compare
      edge-classify photos/ -o results.csv --resume --min-confidence 0.8
      edge-classify 'slides/**/*.jpg' --group-by folder --groups-output slides.csv
      edge-classify cells/ --model my_int8.tflite --format jsonl --summary-json summary.json
      edge-classify fields/ --input-kind field --overlays overlays/ --save-crops crops/ -o cells.csv
    """
    if resume and not output:
        raise click.UsageError("--resume needs --output FILE")
    if resume and not is_regular_target(output):
        raise click.UsageError(f"--resume needs a regular --output file; {output} is a folder, device or pipe")
    if groups_output and not group_by:
        raise click.UsageError("--groups-output needs --group-by")
    try:
        classifier = Classifier.load(model_path, threads, backend, threshold, min_confidence)
        reference = None
        if compare is not None:
            ref_path = Path(compare) if compare else classifier.bundle.reference_path()
            if ref_path is None:
                raise ModelError(f"{classifier.bundle.path}: the card names no full model beside it; "
                                 "pass --compare FILE")
            reference = Classifier(ModelBundle(ref_path, threads, backend), threshold, min_confidence)
    except (ModelError, BackendError, ValueError) as exc:
        click.echo(f"edge-classify: {exc}", err=True)
        sys.exit(2 if isinstance(exc, ValueError) else 1)

    found = expand_inputs(list(paths))
    for problem in found.problems:
        click.echo(f"edge-classify: {problem}", err=True)
    targets = {"--output": output, "--summary-json": summary_json, "--groups-output": groups_output}
    used = [str(classifier.bundle.path)] + ([str(reference.bundle.path)] if reference else [])
    used += [str(labels_csv)] if labels_csv else []
    regular_output = output is not None and is_regular_target(output)
    settings = run_settings(classifier.bundle.file_info.get("sha256"), classifier.threshold,
                            classifier.min_confidence, fmt,
                            reference.bundle.file_info.get("sha256") if reference else None,
                            input_kind=input_kind, side_files=[os.path.realpath(p) for p in (summary_json, groups_output) if p])
    try:
        check_outputs(targets, found.images + used, resume, overwrite, recorded_side_files(output), found.real)
        labels = Labels.read(labels_csv) if labels_csv else None
        if not found.images:
            click.echo("edge-classify: no images to classify", err=True)
            sys.exit(1)
        lock = OutputLock(output).__enter__() if regular_output else None
    except OutputError as exc:
        click.echo(f"edge-classify: {exc}", err=True)
        sys.exit(exc.code)
    try:
        code = _classify(classifier, reference, found, labels, output, regular_output, fmt, resume, settings,
                         batch_size, summary_json, group_by, groups_output, input_kind, overlays_dir, crops_dir)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    sys.exit(code)


def _classify(classifier, reference, found, labels, output, regular_output, fmt, resume, settings, batch_size,
              summary_json, group_by, groups_output, input_kind, overlays_dir, crops_dir) -> int:
    """The run itself, under the output's lock: resume check, rows, summary. Returns the exit status."""
    images = found.images
    previous: List[Dict] = []
    done: set = set()
    try:
        if resume:
            previous, done = prepare_resume(output, fmt, settings)
        if regular_output:
            atomic_write_text(side_file(output, ".settings.json"), json.dumps(settings, indent=2))
    except OutputError as exc:
        click.echo(f"edge-classify: {exc}", err=True)
        return exc.code
    dropped = _drop_last_field(output, fmt) if resume and regular_output else None
    if dropped is not None:
        previous = [r for r in previous if r.get("path") != dropped]
        done.discard(os.path.realpath(dropped))
    todo = [p for p in images if found.real(p) not in done] if done else list(images)

    fields = CELL_COLUMNS + (REFERENCE_COLUMNS if reference else [])
    writer = RowWriter(output, fmt, fields, append=bool(resume))
    rows: List[Dict] = list(previous)
    failed: List[str] = []
    show_bar = sys.stderr.isatty() and len(todo) > 1
    if reference:
        share_preprocessing(classifier, reference)
    kinds: Dict[str, int] = {"cell": 0, "field": 0}
    field_results: List[Dict] = []
    written = 0

    def true_label(source: str) -> Optional[str]:
        return labels.get(source) if labels else None

    def write_error(source: str, reason: str) -> None:
        """An image that is neither a cell nor a field with cells: a row with the reason, never a prediction
        (tried again on --resume)."""
        failed.append(source)
        click.echo(f"edge-classify: skipped {source}: {reason}", err=True)
        writer.write({"path": source, "error": reason})

    def write_cell(result, ref) -> None:
        nonlocal written
        if result.error:
            write_error(result.source, result.error)
            return
        kinds["cell"] += 1
        row = {"path": result.source, "prediction": result.prediction,
               "prob_parasitized": round(result.prob_parasitized, 6),
               "latency_ms": round(result.latency_ms, 4),
               "true_label": true_label(result.source) or result.true_label,
               "unfamiliar": None if result.unfamiliar is None else round(result.unfamiliar, 3)}
        if ref:
            row.update({"ref_prediction": ref.prediction, "ref_prob_parasitized": round(ref.prob_parasitized, 6),
                        "ref_latency_ms": round(ref.latency_ms, 4)})
        writer.write(row)
        written += 1
        rows.append(row)

    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with click.progressbar(length=len(todo), label="classifying", file=sys.stderr,
                               hidden=not show_bar) as bar:
            if input_kind == "cell":
                ref_iter = reference.iter_predict(todo, batch_size) if reference else None
                for result in classifier.iter_predict(todo, batch_size):
                    bar.update(1)
                    write_cell(result, next(ref_iter) if ref_iter else None)
            else:
                cells: List[str] = []

                def classify_cells() -> None:
                    """The single-cell images seen since the last field or error, in batches, rows in input order."""
                    ref_iter = reference.iter_predict(cells, batch_size) if reference else None
                    for result in classifier.iter_predict(cells, batch_size):
                        write_cell(result, next(ref_iter) if ref_iter else None)
                    cells.clear()

                for path in todo:
                    bar.update(1)
                    try:
                        kind, field = field_or_cell(classifier, path, input_kind)
                    except (ImageError, SegmentationUnavailable) as exc:
                        classify_cells()
                        write_error(path, str(exc))
                        continue
                    if kind == "cell":
                        cells.append(path)
                        if len(cells) >= batch_size:
                            classify_cells()
                        continue
                    classify_cells()
                    kinds["field"] += 1
                    written += write_field(writer, rows, field, reference, true_label(path))
                    field_results.append(field.summary())
                    if overlays_dir:
                        field.save_plot(overlays_dir / f"{Path(path).stem}_overlay.png")
                    if crops_dir:
                        field.save_crops(crops_dir)
                classify_cells()
    except KeyboardInterrupt:
        writer.close()
        where = f" to {output}" if output else ""
        click.echo(f"edge-classify: interrupted; {written} new rows are written{where}"
                   + ("; run the same command with --resume to classify the rest" if regular_output else ""),
                   err=True)
        return 130
    finally:
        writer.close()
        signal.signal(signal.SIGTERM, previous_handler)

    summary = build_summary(classifier, reference, rows, images, todo, failed, group_by)
    summary["duplicates_dropped"] = found.duplicates
    summary["input_problems"] = found.problems
    summary["input_kind"] = input_kind
    summary["input_kinds"] = kinds
    summary["fields"] = field_results
    click.echo(format_summary(summary), err=True)
    if summary_json:
        atomic_write_text(summary_json, json.dumps(summary, indent=2))
    if groups_output and summary.get("groups") is not None:
        write_rows(groups_output, fmt, GROUP_COLUMNS,
                   ({"group": name, **g, "fraction_low": (g["fraction_ci95"] or [None, None])[0],
                     "fraction_high": (g["fraction_ci95"] or [None, None])[1]} for name, g in summary["groups"].items()))
    if failed:
        click.echo(f"edge-classify: {len(failed)} of {len(images)} images failed (named above); the other results "
                   "are written", err=True)
    if found.problems:
        click.echo(f"edge-classify: {len(found.problems)} input path(s) could not be used (named above); the images "
                   "found are classified", err=True)
    return 1 if failed or found.problems else 0


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


def build_summary(classifier: Classifier, reference: Optional[Classifier], rows: List[Dict], images: List[str],
                  todo: List[str], failed: List[str], group_by: Optional[str]) -> Dict:
    """The run's summary: per model, their comparison, and the per-group calls."""
    def describe(c: Classifier, prefix: str) -> Dict:
        info = c.bundle.describe()
        return {"file": info["path"], **info, **(model_summary(rows, prefix, c.threshold) if rows else {})}

    summary: Dict = {"images": len(images), "classified": len(rows), "skipped_resume": len(images) - len(todo),
                     "failed": len(failed), "failed_paths": failed, "threshold": classifier.threshold,
                     "min_confidence": classifier.min_confidence, "model": describe(classifier, "")}
    if reference is not None and rows:
        summary["reference"] = describe(reference, "ref_")
        same = [r["prediction"] == r["ref_prediction"] for r in rows]
        diffs = [abs(r["prob_parasitized"] - r["ref_prob_parasitized"]) for r in rows]
        summary["agreement"] = float(np.mean(same))
        summary["max_abs_prob_diff"] = float(np.max(diffs))
        summary["speed_ratio"] = summary["reference"]["latency_ms_p50"] / summary["model"]["latency_ms_p50"]
    if group_by:
        keyer = group_key(group_by)
        group_rows = [{**r, "group": keyer(r["path"])} for r in rows]
        group_rows += [{"group": keyer(p), "error": "failed"} for p in failed]
        summary["without_patient_id"] = sum(g["group"] is None and not g.get("error") for g in group_rows)
        from .patients import patient_level_metrics, summarize_groups
        groups = summarize_groups([g for g in group_rows if g["group"] is not None], classifier.rule,
                                  unfamiliar=classifier.unfamiliar_limits)
        summary["groups"] = groups
        summary["patient_rule"] = classifier.rule
        if any("true_status" in g for g in groups.values()):
            summary["patient_level"] = patient_level_metrics(groups)
    limits = classifier.unfamiliar_limits
    if limits and rows:
        scored = [float(r["unfamiliar"]) for r in rows if r.get("unfamiliar") not in (None, "")]
        flagged = sum(classifier.is_unfamiliar(v) for v in scored)
        summary["unfamiliar_cells"] = flagged
        summary["unfamiliar_fraction"] = flagged / len(scored) if scored else None
        if scored and flagged / len(scored) > limits[1]:
            summary["unfamiliar_warning"] = (
                f"{100 * flagged / len(scored):.0f}% of cells look unlike anything this model was trained on: "
                "results are unreliable; adapt it with edge-adapt")
    if not rows:
        summary["model"].setdefault("cells", 0)
    return summary


if __name__ == "__main__":
    main()
