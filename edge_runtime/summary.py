"""A run's summary: built from its rows (per model, their agreement, per-group calls, the slides, the unfamiliar
warning) and written for people (stderr lines) and for programs (the ``--summary-json`` dict, with the tool's
version).

A group that is a slide (:mod:`run_slides`) holds exactly the keys of ``SlideResult.to_json()`` under ``groups``;
how its figures were reached, its line of text and its ranked candidates are under ``slide_details``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from .classifier import Classifier, group_key
from .labels import CLASSES, PARASITIZED, REVIEW, UNINFECTED, patient_id
from .metrics import binary_metrics, figure, pct, wilson_interval
from .patients import FIELD_RULE_REASON, patient_level_metrics, summarize_groups
from .slide import INDETERMINATE, SlideResult, is_edge, is_left_out
from .version import __version__


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


def build_summary(classifier: Classifier, reference: Optional[Classifier], rows: List[Dict], images: List[str],
                  todo: List[str], failed: List[str], group_by, slides: Optional[Mapping[str, SlideResult]] = None
                  ) -> Dict:
    """The run's summary: the tool's version, per model, their comparison, the per-group calls (``slides``: the
    groups read as slides), the unfamiliar share. ``group_by``: "folder", "patient", a function of the path, or
    None."""
    shown = len(rows)
    rows = [r for r in rows if not is_edge(r)]  # cells cut by the image edge are shown for review, never counted

    def describe(c: Classifier, prefix: str) -> Dict:
        info = c.bundle.describe()
        return {"file": info["path"], **info, **(model_summary(rows, prefix, c.threshold) if rows else {})}

    summary: Dict = {"tool_version": __version__, "images": len(images), "classified": shown,
                     "skipped_resume": len(images) - len(todo), "failed": len(failed), "failed_paths": failed,
                     "threshold": classifier.threshold, "min_confidence": classifier.min_confidence,
                     "model": describe(classifier, "")}
    if shown > len(rows):
        summary["edge_cells_shown"] = shown - len(rows)
    if reference is not None and rows:
        summary["reference"] = describe(reference, "ref_")
        summary.update(agreement(rows, summary["reference"], summary["model"]))
    if group_by:
        summary.update(group_summary(classifier, rows, failed, group_by, slides or {}))
    if classifier.unfamiliar_limits and rows:
        summary.update(unfamiliar_summary(classifier, rows))
    if not rows:
        summary["model"].setdefault("cells", 0)
    return summary


def resumed_coverage(rows: List[Dict]) -> Tuple[Dict[str, int], List[Dict]]:
    """What the rows a resume found already written cover, so that the summary describes the whole output and not
    only this run: the kinds ({"cell": n, "field": n}; a field's rows carry a ``cell`` index, a single cell's do
    not) and each field's figures as :meth:`FieldResult.summary` gives them, in the order the rows were written."""
    kinds = {"cell": 0, "field": 0}
    by_field: Dict[str, List[str]] = {}
    for row in rows:
        if row.get("cell") in (None, ""):
            kinds["cell"] += 1
        elif is_edge(row):
            by_field.setdefault(row["path"], [])
        else:
            by_field.setdefault(row["path"], []).append(row.get("prediction"))
    kinds["field"] = len(by_field)
    fields = []
    for source, calls in by_field.items():
        parasitized, uninfected = calls.count(PARASITIZED), calls.count(UNINFECTED)
        decided = parasitized + uninfected
        low, high = wilson_interval(parasitized, decided) if decided else (None, None)
        fields.append({"source": source, "cells": len(calls), "parasitized": parasitized, "uninfected": uninfected,
                       "review": calls.count(REVIEW), "parasitemia": parasitized / decided if decided else None,
                       "parasitemia_low": low, "parasitemia_high": high})
    return kinds, fields


def agreement(rows: List[Dict], reference: Dict, model: Dict) -> Dict:
    """How the model agrees with the full model on the same cells (``--compare``), and how much faster it is."""
    same = [r["prediction"] == r["ref_prediction"] for r in rows]
    diffs = [abs(r["prob_parasitized"] - r["ref_prob_parasitized"]) for r in rows]
    return {"agreement": float(np.mean(same)), "max_abs_prob_diff": float(np.max(diffs)),
            "speed_ratio": reference["latency_ms_p50"] / model["latency_ms_p50"]}


def group_summary(classifier: Classifier, rows: List[Dict], failed: List[str], group_by,
                  slides: Mapping[str, SlideResult]) -> Dict:
    """Per-patient calls with the card's patient rule, and the slides' readings in place of their groups' (see the
    module docstring); cells in no group are counted apart."""
    keyer = group_key(group_by)
    group_rows = [{**r, "group": keyer(r["path"])} for r in rows]
    group_rows += [{"group": keyer(p), "error": "failed"} for p in failed]
    out: Dict = {"without_patient_id": sum(g["group"] is None and not g.get("error") for g in group_rows)}
    groups = summarize_groups([g for g in group_rows if g["group"] is not None], classifier.rule,
                              unfamiliar_limits=classifier.unfamiliar_limits)
    groups.update({name: r.to_json() for name, r in slides.items()})
    out["groups"] = groups
    out["patient_rule"] = classifier.rule
    if slides:
        out["slide_details"] = slide_details(slides)
    if any("true_status" in g for g in groups.values()):
        out["patient_level"] = patient_level_metrics(groups)
    return out


def slide_details(slides: Mapping[str, SlideResult]) -> Dict[str, Dict]:
    """The summary's ``slide_details``: how each slide's figures were reached, its one-line text and its ranked
    candidates (rank, field, cell, probability: the numbers on the overlays, review files and report)."""
    return {name: {**r.detail(), "text": slide_text(r),
                   "candidate_cells": [{"rank": c["rank"], "path": c.get("path"), "cell": c.get("cell"),
                                        "prob_parasitized": float(c["prob_parasitized"]), "at_edge": is_edge(c),
                                        "left_out": is_left_out(c)} for c in r.candidate_list]}
            for name, r in slides.items()}


def slide_text(result: SlideResult) -> str:
    """The slide's line for a terminal: SlideResult.text, with the reason when there is no call."""
    text = result.text()
    return text if result.call != INDETERMINATE or result.reason in text else f"{text} ({result.reason})"


def slides_summary(slides: Mapping[str, SlideResult]) -> Dict:
    """The summary of slides alone (``edge-review``): the same ``groups`` and ``slide_details`` as edge-classify's."""
    return {"tool_version": __version__, "groups": {name: r.to_json() for name, r in slides.items()},
            "slide_details": slide_details(slides)}


def unfamiliar_summary(classifier: Classifier, rows: List[Dict]) -> Dict:
    """How many scored cells look unlike the training data, and a warning when too many do."""
    scored = [float(r["unfamiliar"]) for r in rows if r.get("unfamiliar") not in (None, "")]
    flagged = sum(classifier.is_unfamiliar(v) for v in scored)
    out: Dict = {"unfamiliar_cells": flagged, "unfamiliar_fraction": flagged / len(scored) if scored else None}
    if scored and flagged / len(scored) > classifier.unfamiliar_limits[1]:
        out["unfamiliar_warning"] = (
            f"{100 * flagged / len(scored):.0f}% of cells look unlike anything this model was trained on: "
            "results are unreliable; adapt it with edge-adapt")
    return out


def group_table_rows(groups: Dict[str, Dict]) -> List[Dict]:
    """The per-group rows of ``--groups-output`` (GROUP_COLUMNS): the group's name and its interval split in two."""
    return [{"group": name, **g, "fraction_low": (g["fraction_ci95"] or [None, None])[0],
             "fraction_high": (g["fraction_ci95"] or [None, None])[1]} if "fraction_ci95" in g else
            {"group": name, "call": g["call"], "cells": g["cells"], "parasitized_fraction": g["parasitemia"],
             "fraction_low": (g["parasitemia_ci"] or [None, None])[0],
             "fraction_high": (g["parasitemia_ci"] or [None, None])[1]} for name, g in groups.items()]


def format_summary(summary: Dict) -> str:
    """The human summary on stderr: models, inputs, fields, the unfamiliar warning, the group table."""
    return "\n".join(model_lines(summary) + input_lines(summary) + group_lines(summary))


def model_lines(summary: Dict) -> List[str]:
    """One block per model (file, backend, counts, latency, labelled metrics), then their agreement."""
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
                f"{figure(s['latency_ms_p50'], '.3f')} ms, p95 {figure(s['latency_ms_p95'], '.3f')} ms per cell")
        if "accuracy" in s:
            who = f" of {s['labelled_patients']} patients" if s.get("labelled_patients") else ""
            line += (f"; on {s['labelled_cells']} labelled cells{who} accuracy {pct(s['accuracy'])}, sensitivity "
                     f"{pct(s['sensitivity'])}, specificity {pct(s['specificity'])}")
        lines.append(line)
    if summary.get("agreement") is not None:
        lines.append(f"  against the full model: agreement {pct(summary['agreement'])}, max |dp| "
                     f"{figure(summary['max_abs_prob_diff'], '.4f')}, speed ratio (full p50 / this p50) "
                     f"{figure(summary['speed_ratio'], '.2f')}x")
    return lines


def input_lines(summary: Dict) -> List[str]:
    """The images counted, what kind they were, each field's parasitemia, and the unfamiliar warning."""
    lines = [f"   images: {summary['images']} found, {summary['classified']} classified, "
             f"{summary['skipped_resume']} already in the output, {summary['failed']} failed"
             + (f", {summary['duplicates_dropped']} duplicates dropped (the same file given twice)"
                if summary.get("duplicates_dropped") else "")]
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
        lines += [f"      WARNING: {message}" for message in f.get("warning_messages") or []]
    if summary.get("unfamiliar_warning"):
        lines.append(f"  WARNING: {summary['unfamiliar_warning']}")
    return lines


def group_lines(summary: Dict) -> List[str]:
    """The per-group table with each call and why there is no call, the calls' patient-level accuracy, then one
    line per slide."""
    details = summary.get("slide_details") or {}
    groups = {k: g for k, g in (summary.get("groups") or {}).items() if k not in details}
    lines = patient_table(summary, groups) if groups else []
    if details:
        lines += ["", "slides (candidates are for a microscopist to confirm; edge-review recounts them):"]
    for d in details.values():
        lines.append(f"    slide {d['text']}")
        lines += [f"      warning: {w}" for w in d["warnings"]]
    return lines


def patient_table(summary: Dict, groups: Dict[str, Dict]) -> List[str]:
    """The patient-rule groups as a table with each call, why there is no call, and their patient-level accuracy."""
    lines = ["", f"{'group':<28} {'call':<13} {'cells':>6} {'parasit.':>8} {'review':>6} {'fraction':>9} "
                 f"{'95% CI':>15} {'truth':>8}"]
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
    return lines
