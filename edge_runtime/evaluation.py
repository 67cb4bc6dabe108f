"""Evaluation assembled once: metrics, intervals over whole patients (or fields), group-level calls, and their
formatting. The training report and the model card both take what :func:`evaluate` returns, so a figure in one
is the same figure in the other. numpy only (device side), so a device can re-evaluate on its own labelled cells."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from .labels import CLASSES
from .metrics import binary_metrics, bootstrap_by_patient, pct
from .patients import evaluate_rule, per_patient_counts

BOOTSTRAP_ROUNDS = 1000


def classification_report(y_true: Sequence[int], prob: Sequence[float], threshold: float) -> Dict:
    """Per-class precision/recall/F1/support as sklearn's classification_report (the tutorial printed it)."""
    y = np.asarray(y_true)
    pred = (np.asarray(prob) >= threshold).astype(int)
    rows = {}
    for name, cls in ((CLASSES[0], 1), (CLASSES[1], 0)):
        tp = int(((pred == cls) & (y == cls)).sum())
        predicted = int((pred == cls).sum())
        support = int((y == cls).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return rows


def evaluate(split: str, y: Sequence[int], prob: Sequence[float], groups: Sequence[str], threshold: float,
             rule: Optional[Mapping] = None, unit: str = "patients", source: str = "NIH",
             bootstrap_rounds: int = BOOTSTRAP_ROUNDS) -> Dict:
    """Everything we say about a model on one split of one source, assembled in one place for the training report
    and the model card: which split and source, how many groups (patients, or fields for field data) and cells,
    the metrics with 95% intervals from resampling whole groups, the classification report, and the group-level
    calls when a rule is given (else the per-group counts a rule can be chosen from)."""
    y = np.asarray(y)
    groups = np.asarray(groups)
    counts = per_patient_counts(prob, y, groups, threshold)
    out = {
        "split": split,
        "source": source,
        "unit": unit,
        "groups": int(len(set(groups.tolist()))),
        "cells": int(len(y)),
        "cells_parasitized": int(y.sum()),
        "cells_uninfected": int(len(y) - y.sum()),
        "metrics": binary_metrics(y, prob, threshold),
        "ci95": bootstrap_by_patient(y, prob, groups, threshold, rounds=bootstrap_rounds),
        "bootstrap": f"{bootstrap_rounds} resamples of whole {unit}",
        "classification_report": classification_report(y, prob, threshold),
    }
    if unit == "patients":
        out["patients"] = out["groups"]
    if rule is not None:
        out["patient_level"] = evaluate_rule(counts, rule)
    else:
        out["patient_counts"] = counts
    return out


def format_evaluation(ev: Dict, title: str = "") -> str:
    """A human-readable block: the classification report, NIH metrics with intervals, the confusion matrix."""
    m, ci = ev["metrics"], ev["ci95"]
    lines = [f"{title}{ev.get('source', 'NIH')} {ev['split']} split: {ev['groups']} {ev.get('unit', 'patients')}, "
             f"{ev['cells']} cells "
             f"({ev['cells_parasitized']} parasitized, {ev['cells_uninfected']} uninfected)", "",
             f"{'':>12} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>8}"]
    for name, r in ev["classification_report"].items():
        lines.append(f"{name:>12} {r['precision']:9.4f} {r['recall']:9.4f} {r['f1']:9.4f} {r['support']:8d}")
    lines.append("")
    for key in ("accuracy", "sensitivity", "specificity", "f1", "mcc", "roc_auc"):
        value = m[key]
        interval = ci.get(key)
        if key in ("mcc", "roc_auc"):
            text = "n/a" if value is None else f"{value:.4f}"
            band = f"  (95% CI {interval[0]:.4f}-{interval[1]:.4f})" if interval else ""
        else:
            text = f"{pct(value):>6}"
            band = f"  (95% CI {pct(interval[0])}-{pct(interval[1])})" if interval else ""
        lines.append(f"{key:>12}: {text}{band}")
    cm = m["confusion_matrix"]
    lines += ["", "confusion matrix (rows: true, cols: predicted)", f"{'':>14}{'parasitized':>12}{'uninfected':>12}",
              f"{'parasitized':>14}{cm['tp']:>12}{cm['fn']:>12}", f"{'uninfected':>14}{cm['fp']:>12}{cm['tn']:>12}"]
    if "patient_level" in ev:
        pl = ev["patient_level"]["metrics"]
        lines += ["", f"patient-level calls: {pl['text']}; sensitivity {pct(pl['sensitivity'])}, "
                      f"specificity {pct(pl['specificity'])}, accuracy {pct(pl['accuracy'])}"]
    lines.append(f"95% CI: bootstrap, {ev.get('bootstrap', '1000 resamples of whole patients')}")
    return "\n".join(lines)
