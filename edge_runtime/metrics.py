"""Binary classification metrics (NIH's set), intervals, and a patient-level bootstrap. numpy only."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np


def pct(value: Optional[float]) -> str:
    """A rate as a percentage with two decimals, or n/a when it is undefined (None or NaN, e.g. no positives)."""
    return "n/a" if is_undefined(value) else f"{100 * value:.2f}%"


def is_undefined(value: Optional[float]) -> bool:
    """True for a figure that has no value (None or NaN): printed as n/a, never as 0."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def figure(value: Optional[float], spec: str) -> str:
    """A number in the given format spec (e.g. ".3f"), or n/a when it is undefined."""
    return "n/a" if is_undefined(value) else format(value, spec)


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> Optional[float]:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted as one half."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den else None


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float = 0.5) -> Dict:
    """Accuracy, sensitivity (recall on parasitized), specificity, precision, F1, MCC, ROC AUC and the confusion
    matrix, with 1 = parasitized (the positive class)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    pred = (p >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = (2 * precision * sensitivity / (precision + sensitivity)
          if precision is not None and sensitivity is not None and precision + sensitivity > 0 else None)
    mcc_den = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "cells": int(len(y)),
        "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "mcc": (tp * tn - fp * fn) / mcc_den if mcc_den else None,
        "roc_auc": roc_auc(y, p),
        "threshold": float(threshold),
        "confusion_matrix": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
    }


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple:
    """95% Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    phat = successes / n
    den = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / den
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_by_patient(y_true, prob, patients, threshold: float = 0.5, rounds: int = 1000, seed: int = 0,
                         keys=("accuracy", "sensitivity", "specificity", "f1", "mcc", "roc_auc")) -> Dict:
    """95% percentile intervals from resampling whole patients with replacement (cells of a patient are correlated,
    so resampling cells would give intervals that are too narrow)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    pts = np.asarray(patients)
    unique = np.unique(pts)
    index_of = {pt: np.flatnonzero(pts == pt) for pt in unique}
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in keys}
    for _ in range(rounds):
        chosen = rng.choice(unique, size=len(unique), replace=True)
        idx = np.concatenate([index_of[c] for c in chosen])
        m = binary_metrics(y[idx], p[idx], threshold)
        for k in keys:
            if m[k] is not None:
                samples[k].append(m[k])
    return {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None)
            for k, v in samples.items()}
