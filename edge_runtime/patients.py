"""From cells to a patient: parasitized fraction with its 95% interval and a positive/negative/indeterminate call.

A clinician acts on a patient, not a cell. With ~2-3% of healthy cells called parasitized, "any parasitized cell"
would call every healthy patient positive, so the call needs both a minimum count of confident parasitized cells and
a minimum fraction. The rule is chosen on the validation patients only and stored in the model card.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .labels import PARASITIZED, REVIEW
from .metrics import wilson_interval

POSITIVE, NEGATIVE, INDETERMINATE, NO_CALL = "positive", "negative", "indeterminate", "no call"
NO_RULE_REASON = "the model card has no patient rule"
FIELD_RULE_REASON = ("cells cut from whole fields: the card's patient rule was chosen on curated single-cell crops, "
                     "where infected patients show many parasitized cells; a field slide's parasitemia is often "
                     "0.1-2%, below that rule and near the false-positive rate: read the parasitized fraction and "
                     "its interval, and have a microscopist check the parasitized cells")

DEFAULT_RULE = {"min_cells": 20, "min_parasitized": 3, "min_fraction": 0.1, "max_review_fraction": 0.5}


def call_group(cells: int, parasitized: int, review: int, rule: Optional[Mapping], failed: int = 0,
               unfamiliar_cells: int = 0, warn_fraction: Optional[float] = None,
               no_rule_reason: str = NO_RULE_REASON) -> Dict:
    """Summarise one slide or patient: counts, parasitized fraction (of confidently classified cells) with its
    95% Wilson interval, and the call with its reason. Without a rule there is no call (never a default rule).
    When more than ``warn_fraction`` of the cells look unlike the training data (``unfamiliar_cells``), the call is
    indeterminate whatever the counts say: the model is out of its depth on these images."""
    classified = cells - review
    fraction = parasitized / classified if classified else None
    low, high = wilson_interval(parasitized, classified)
    if rule is None:
        call, reason = NO_CALL, no_rule_reason
    elif cells == 0:
        call, reason = INDETERMINATE, "no readable cell images" + (f" ({failed} failed)" if failed else "")
    elif warn_fraction is not None and cells and unfamiliar_cells / cells > warn_fraction:
        call, reason = INDETERMINATE, (f"unfamiliar images: {unfamiliar_cells}/{cells} cells look unlike the training "
                                       f"data (> {warn_fraction:.0%}); adapt the model with edge-adapt")
    elif cells < rule["min_cells"]:
        call, reason = INDETERMINATE, f"too few cells ({cells} < {rule['min_cells']})"
    elif review / cells > rule["max_review_fraction"]:
        call, reason = INDETERMINATE, (f"too many cells sent to review ({review}/{cells} > "
                                       f"{rule['max_review_fraction']:.0%})")
    elif parasitized >= rule["min_parasitized"] and fraction is not None and fraction >= rule["min_fraction"]:
        call, reason = POSITIVE, (f"{parasitized} parasitized cells >= {rule['min_parasitized']} and fraction "
                                  f"{fraction:.1%} >= {rule['min_fraction']:.1%}")
    else:
        call, reason = NEGATIVE, (f"{parasitized} parasitized cells, fraction "
                                  f"{(fraction or 0):.1%} below the rule ({rule['min_parasitized']} cells and "
                                  f"{rule['min_fraction']:.1%})")
    return {
        "cells": int(cells),
        "parasitized": int(parasitized),
        "review": int(review),
        "failed": int(failed),
        "unfamiliar": int(unfamiliar_cells),
        "parasitized_fraction": fraction,
        "fraction_ci95": [low, high] if classified else None,
        "call": call,
        "reason": reason,
    }


def summarize_groups(rows: Iterable[Mapping], rule: Optional[Mapping], key: str = "group",
                     unfamiliar_limits: Optional[Tuple[float, float]] = None) -> Dict[str, Dict]:
    """Group result rows (each with ``prediction`` and ``key``; failed rows carry ``error``) into per-group calls.
    When rows carry a ``true_label``, each group also gets its true status (infected if any cell is parasitized).
    ``unfamiliar_limits``: (score threshold, warn fraction) from the card; rows carry their score in the
    ``unfamiliar`` column, and each group counts its unfamiliar cells under the key ``unfamiliar``.
    A group holding cells cut from whole fields (rows with a ``cell`` index) gets no call: the card's rule was
    chosen on single-cell crops and does not transfer to a field slide's parasitemia (FIELD_RULE_REASON)."""
    groups: Dict[str, Dict] = {}
    for row in rows:
        g = groups.setdefault(str(row.get(key)), {"cells": 0, "parasitized": 0, "review": 0, "failed": 0,
                                                   "labelled_parasitized": 0, "labelled": 0, "unfamiliar": 0,
                                                   "field_cells": 0})
        if row.get("error"):
            g["failed"] += 1
            continue
        g["cells"] += 1
        g["field_cells"] += row.get("cell") not in (None, "")
        g["parasitized"] += row["prediction"] == PARASITIZED
        g["review"] += row["prediction"] == REVIEW
        score = row.get("unfamiliar")
        if unfamiliar_limits is not None and score not in (None, "") and float(score) > unfamiliar_limits[0]:
            g["unfamiliar"] += 1
        if row.get("true_label"):
            g["labelled"] += 1
            g["labelled_parasitized"] += row["true_label"] == PARASITIZED
    out = {}
    for name, g in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0])):
        from_fields = g["field_cells"] > 0
        summary = call_group(g["cells"], g["parasitized"], g["review"], None if from_fields else rule, g["failed"],
                             g["unfamiliar"], unfamiliar_limits[1] if unfamiliar_limits else None,
                             FIELD_RULE_REASON if from_fields else NO_RULE_REASON)
        if g["labelled"]:
            summary["true_status"] = "infected" if g["labelled_parasitized"] else "healthy"
        out[name] = summary
    return out


def patient_level_metrics(groups: Mapping[str, Mapping]) -> Dict:
    """Sensitivity, specificity and accuracy of the calls against each group's true status, with counts.
    Indeterminate calls are counted apart and never as correct."""
    infected = [g for g in groups.values() if g.get("true_status") == "infected"]
    healthy = [g for g in groups.values() if g.get("true_status") == "healthy"]
    found = sum(g["call"] == POSITIVE for g in infected)
    cleared = sum(g["call"] == NEGATIVE for g in healthy)
    n = len(infected) + len(healthy)
    return {
        "patients": n,
        "infected_patients": len(infected),
        "healthy_patients": len(healthy),
        "infected_called_positive": found,
        "healthy_called_negative": cleared,
        "indeterminate": sum(g["call"] == INDETERMINATE for g in list(infected) + list(healthy)),
        "sensitivity": found / len(infected) if infected else None,
        "specificity": cleared / len(healthy) if healthy else None,
        "accuracy": (found + cleared) / n if n else None,
        "text": (f"{found}/{len(infected)} infected patients called positive, {cleared}/{len(healthy)} healthy "
                 "patients called negative"),
    }


def per_patient_counts(probs: Sequence[float], labels: Sequence[int], patients: Sequence[str],
                       threshold: float) -> List[Dict]:
    """Per-patient cell counts from evaluation arrays (1 = parasitized): used to choose and test the rule."""
    probs, labels, patients = np.asarray(probs), np.asarray(labels), np.asarray(patients)
    out = []
    for pt in sorted(set(patients.tolist()), key=lambda p: (len(p), p)):
        idx = patients == pt
        out.append({"patient": pt, "cells": int(idx.sum()), "parasitized": int((probs[idx] >= threshold).sum()),
                    "infected": bool(labels[idx].max() == 1)})
    return out


def choose_rule(val_patients: List[Dict], min_cells: int = DEFAULT_RULE["min_cells"],
                max_review_fraction: float = DEFAULT_RULE["max_review_fraction"],
                chosen_on: str = "validation split", min_specificity: Optional[float] = None) -> Dict:
    """Pick the fraction threshold that best separates infected from healthy patients, taking the middle of the
    best range so the margin to either side is as wide as the data allow. Best: Youden's J (sensitivity +
    specificity), or with ``min_specificity`` the most sensitive threshold whose specificity is at least that (then
    the most specific among those): an operating point fixed in advance, so a handful of healthy patients does not
    outweigh many infected ones. The patients are the validation split's, or (``chosen_on`` says so) those plus
    out-of-fold predictions of the training patients."""
    candidates = [i / 200 for i in range(1, 101)]  # 0.5% .. 50%
    infected = [p["parasitized"] / p["cells"] for p in val_patients if p["infected"]]
    healthy = [p["parasitized"] / p["cells"] for p in val_patients if not p["infected"]]

    def rates(threshold: float) -> Tuple[float, float]:
        sens = float(np.mean([f >= threshold for f in infected])) if infected else 0.0
        spec = float(np.mean([f < threshold for f in healthy])) if healthy else 0.0
        return sens, spec

    scored = [(t, *rates(t)) for t in candidates]
    if min_specificity is None:
        keys = {t: (round(sens + spec, 12),) for t, sens, spec in scored}
    else:
        keys = {t: ((sens, spec) if spec >= min_specificity else (-1.0, spec)) for t, sens, spec in scored}
    best = max(keys.values())
    best_range = [t for t in candidates if keys[t] == best]
    fraction = float(best_range[len(best_range) // 2])
    sens, spec = rates(fraction)
    how = (f"Youden's J = {sens + spec - 1:.3f}" if min_specificity is None else
           f"the most sensitive with specificity >= {min_specificity:.0%}: sensitivity {sens:.1%}, "
           f"specificity {spec:.1%}")
    return {"min_cells": min_cells, "min_parasitized": 3, "min_fraction": round(fraction, 4),
            "max_review_fraction": max_review_fraction,
            "chosen_on": f"{chosen_on}, {len(val_patients)} patients ({how})"}


def evaluate_rule(patient_counts: List[Dict], rule: Mapping) -> Dict:
    """Apply the rule to per-patient counts (no review) and score the calls against the true status."""
    groups = {}
    for p in patient_counts:
        g = call_group(p["cells"], p["parasitized"], 0, rule)
        g["true_status"] = "infected" if p["infected"] else "healthy"
        groups[p["patient"]] = g
    return {"metrics": patient_level_metrics(groups), "patients": groups}

