"""``edge-classify``: classify cell images on the device, against the full model, safe to interrupt."""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import click
import numpy as np

from .backend import BackendError
from .bundle import ModelBundle, ModelError
from .classifier import Classifier, group_key
from .images import is_image_path
from .labels import CLASSES, PARASITIZED, REVIEW, patient_id
from .metrics import binary_metrics, pct

CELL_FIELDS = ["path", "cell", "x", "y", "w", "h", "prediction", "prob_parasitized", "latency_ms", "true_label"]
REFERENCE_FIELDS = ["ref_prediction", "ref_prob_parasitized", "ref_latency_ms"]
GROUP_FIELDS = ["group", "call", "cells", "parasitized", "review", "failed", "parasitized_fraction", "fraction_low",
                "fraction_high", "true_status", "reason"]


def expand_inputs(paths: List[str]) -> (List[str], List[str]):
    """Files, folders (recursive, sorted) and globs -> (image paths, problems)."""
    images, problems = [], []
    for item in paths:
        matches = [item] if os.path.exists(item) else sorted(glob.glob(item, recursive=True))
        if not matches:
            problems.append(f"{item}: no such file, folder or glob match")
        for match in matches:
            if os.path.isdir(match):
                found = sorted(str(p) for p in Path(match).rglob("*") if p.is_file() and is_image_path(p))
                if not found:
                    problems.append(f"{match}: folder holds no images (png, jpg, webp, tif, bmp, gif)")
                images.extend(found)
            else:
                images.append(match)
    seen, unique = set(), []
    for p in images:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique, problems


def read_labels(path: Path) -> Dict[str, str]:
    """A CSV with columns path,label (an edge-prepare manifest works); matched by full path, then by file name."""
    labels = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise click.UsageError(f"{path}: --labels needs a CSV with columns path,label")
        for row in reader:
            label = row["label"].strip().lower()
            if label in CLASSES:
                labels[row["path"]] = label
                labels[Path(row["path"]).name] = label
    return labels


class RowWriter:
    """Append rows one at a time and flush each, so a dead battery loses at most the row being written."""

    def __init__(self, path: Optional[Path], fmt: str, fields: List[str], append: bool):
        self.fmt, self.fields = fmt, fields
        if path is None:
            self.fh = sys.stdout
            new = True
        else:
            new = not (append and path.exists() and path.stat().st_size > 0)
            self.fh = open(path, "a" if append else "w", newline="")
        self.csv = csv.DictWriter(self.fh, fieldnames=fields, extrasaction="ignore") if fmt == "csv" else None
        if self.csv and new:
            self.csv.writeheader()
            self.fh.flush()

    def write(self, row: Dict) -> None:
        if self.csv:
            self.csv.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.fields})
        else:
            self.fh.write(json.dumps({k: row.get(k) for k in self.fields}) + "\n")
        self.fh.flush()
        if self.fh is not sys.stdout:
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


def read_previous(path: Path, fmt: str) -> List[Dict]:
    """Rows already in an output file (for --resume); a torn last line from a power cut is ignored."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    rows = []
    with open(path, newline="") as fh:
        if fmt == "csv":
            reader = csv.DictReader(fh)
            for row in reader:
                if row.get("latency_ms") not in (None, ""):
                    rows.append(row)
        else:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    for row in rows:
        for key in ("prob_parasitized", "latency_ms", "ref_prob_parasitized", "ref_latency_ms"):
            if row.get(key) not in (None, ""):
                row[key] = float(row[key])
    return rows


def _truncate_torn_line(path: Path) -> None:
    """Drop a partial last line left by a power cut so appended rows start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


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
                 f"{summary['skipped_resume']} already in the output, {summary['failed']} failed")
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
        if summary.get("patient_level"):
            pl = summary["patient_level"]
            lines.append(f"  {pl['text']} (sensitivity {pct(pl['sensitivity'])}, specificity "
                         f"{pct(pl['specificity'])}, {pl['indeterminate']} indeterminate)")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="A .tflite with its card (default: the bundled int8 model).")
@click.option("--compare", metavar="[FILE]", is_flag=False, flag_value="", default=None,
              help="Also run the full model on every image (default: the bundle's fp32 file) and compare.")
@click.option("--threads", type=int, help="Interpreter threads (default: the backend's).")
@click.option("--backend", type=click.Choice(["ai_edge_litert", "tflite_runtime", "tensorflow"]),
              help="Force an interpreter (default: the first one installed, in this order).")
@click.option("--batch-size", default=1, show_default=True, help="Cells per interpreter call.")
@click.option("--threshold", type=float, help="Decision threshold on P(parasitized) (default: the card's).")
@click.option("--min-confidence", type=click.FloatRange(0.5, 1.0),
              help="Cells whose confidence is below this are marked 'review' (refer to a microscopist).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, path_type=Path),
              help="CSV path,label giving true labels (else taken from Parasitized/Uninfected folders).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write rows here (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--resume", is_flag=True, help="Skip images already in --output and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--summary-json", type=click.Path(path_type=Path), help="Write the summary as JSON.")
@click.option("--group-by", type=click.Choice(["folder", "patient"]),
              help="Per-slide (folder) or per-patient (NIH file-name id) summary with a positive/negative call.")
@click.option("--groups-output", type=click.Path(path_type=Path), help="Write per-group rows here (--format).")
def main(paths, model_path, compare, threads, backend, batch_size, threshold, min_confidence, labels_csv, output,
         fmt, resume, overwrite, summary_json, group_by, groups_output):
    """Classify cell images as parasitized or uninfected, offline, with a TFLite model.

    PATHS are image files, folders (searched recursively) or globs; any format and mode Pillow reads.

    \b
    Examples:
      edge-classify edge_runtime/samples --compare
      edge-classify photos/ -o results.csv --resume --min-confidence 0.8
      edge-classify 'slides/**/*.jpg' --group-by folder --groups-output slides.csv
      edge-classify cells/ --model my_int8.tflite --format jsonl --summary-json summary.json
    """
    if resume and not output:
        raise click.UsageError("--resume needs --output FILE")
    if output and output.exists() and output.stat().st_size and not (resume or overwrite):
        raise click.UsageError(f"{output} exists; pass --resume to continue it or --overwrite to replace it")
    if groups_output and not group_by:
        raise click.UsageError("--groups-output needs --group-by")
    if batch_size < 1:
        raise click.UsageError("--batch-size must be at least 1")
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

    images, problems = expand_inputs(list(paths))
    for problem in problems:
        click.echo(f"edge-classify: {problem}", err=True)
    labels = read_labels(labels_csv) if labels_csv else {}
    previous: List[Dict] = []
    if resume and output:
        _truncate_torn_line(output)
        previous = read_previous(output, fmt)
    done = {r["path"] for r in previous}
    todo = [p for p in images if p not in done]
    if not images:
        click.echo("edge-classify: no images to classify", err=True)
        sys.exit(1)

    fields = CELL_FIELDS + (REFERENCE_FIELDS if reference else [])
    writer = RowWriter(output, fmt, fields, append=bool(resume))
    rows: List[Dict] = list(previous)
    failed: List[str] = []
    show_bar = sys.stderr.isatty() and len(todo) > 1
    ref_iter = reference.iter_predict(todo, batch_size) if reference else None
    try:
        with click.progressbar(length=len(todo), label="classifying", file=sys.stderr,
                               hidden=not show_bar) as bar:
            for result in classifier.iter_predict(todo, batch_size):
                ref = next(ref_iter) if ref_iter else None
                bar.update(1)
                if result.error:
                    failed.append(result.source)
                    click.echo(f"edge-classify: skipped {result.source}: {result.error}", err=True)
                    continue
                row = {"path": result.source, "prediction": result.prediction,
                       "prob_parasitized": round(result.prob_parasitized, 6),
                       "latency_ms": round(result.latency_ms, 4),
                       "true_label": labels.get(result.source) or labels.get(Path(result.source).name) or result.true_label}
                if ref:
                    row.update({"ref_prediction": ref.prediction, "ref_prob_parasitized": round(ref.prob_parasitized, 6),
                                "ref_latency_ms": round(ref.latency_ms, 4)})
                writer.write(row)
                rows.append(row)
    finally:
        writer.close()

    summary = build_summary(classifier, reference, rows, images, todo, failed, group_by)
    click.echo(format_summary(summary), err=True)
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2))
    if groups_output and summary.get("groups"):
        group_writer = RowWriter(groups_output, fmt, GROUP_FIELDS, append=False)
        for name, g in summary["groups"].items():
            ci = g["fraction_ci95"] or [None, None]
            group_writer.write({"group": name, **g, "fraction_low": ci[0], "fraction_high": ci[1]})
        group_writer.close()
    if failed:
        click.echo(f"edge-classify: {len(failed)} of {len(images)} images failed (named above); the other results "
                   "are written", err=True)
        sys.exit(1)


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
        from .patients import patient_level_metrics, summarize_groups
        groups = summarize_groups(group_rows, classifier.rule)
        summary["groups"] = groups
        summary["patient_rule"] = classifier.rule
        if any("true_status" in g for g in groups.values()):
            summary["patient_level"] = patient_level_metrics(groups)
    if not rows:
        summary["model"].setdefault("cells", 0)
    return summary


if __name__ == "__main__":
    main()
