"""Evaluation report on a split (the tutorial's classification report plus NIH's metrics, bootstrap intervals over
patients, patient-level calls) and the training plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from malaria_edge.edge_runtime.labels import CLASSES
from malaria_edge.edge_runtime.metrics import binary_metrics, bootstrap_by_patient, pct
from malaria_edge.edge_runtime.patients import evaluate_rule, per_patient_counts


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


def evaluate_split(name: str, y: Sequence[int], prob: Sequence[float], patients: Sequence[str], threshold: float,
                   rule: Optional[Dict] = None, bootstrap_rounds: int = 1000) -> Dict:
    """Everything we print about a model on one split: which split, how many patients and cells, the metrics with
    95% bootstrap-over-patients intervals, and the patient-level calls."""
    y = np.asarray(y)
    patients = np.asarray(patients)
    metrics = binary_metrics(y, prob, threshold)
    counts = per_patient_counts(prob, y, patients, threshold)
    out = {
        "split": name,
        "patients": int(len(set(patients.tolist()))),
        "cells": int(len(y)),
        "cells_parasitized": int(y.sum()),
        "cells_uninfected": int(len(y) - y.sum()),
        "metrics": metrics,
        "ci95": bootstrap_by_patient(y, prob, patients, threshold, rounds=bootstrap_rounds),
        "classification_report": classification_report(y, prob, threshold),
    }
    if rule is not None:
        out["patient_level"] = evaluate_rule(counts, rule)
    else:
        out["patient_counts"] = counts
    return out


def format_evaluation(ev: Dict, title: str = "") -> str:
    """A human-readable block: the classification report, NIH metrics with intervals, the confusion matrix."""
    m, ci = ev["metrics"], ev["ci95"]
    lines = [f"{title}{ev['split']} split: {ev['patients']} patients, {ev['cells']} cells "
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
    lines.append("bootstrap: 1000 resamples of whole patients")
    return "\n".join(lines)


def plot_history(history: Dict[str, List[float]], path: Path, title: str) -> None:
    """Training and validation loss and accuracy per epoch on one figure, as the tutorial's plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("loss", "-"), ("val_loss", "-"), ("accuracy", "--"), ("val_accuracy", "--")):
        if history.get(key):
            ax.plot(epochs, history[key], style, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss / accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: Dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
