"""An adapted model reads slides with error rates measured on the clinic's own cells, never with the base model's
(which describe another model at another threshold)."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.train

from malaria_edge.edge_runtime.slide import SlideRule, assess_slide  # noqa: E402
from malaria_edge.train.adapt import clinic_slide_rule  # noqa: E402

BASE_RULE = json.loads((Path(__file__).resolve().parents[1] / "edge_runtime" / "models" / "malaria.json")
                       .read_text())["slide_rule"]


def test_the_adapted_rule_counts_the_clinics_cells_at_the_clinics_threshold():
    labels = np.array([1] * 100 + [0] * 100)
    prob = np.concatenate([np.linspace(0.3, 1.0, 100), np.linspace(0.0, 0.45, 100)])
    rule = SlideRule.from_dict(clinic_slide_rule(labels, prob, 0.4, BASE_RULE, "200 cells, out-of-fold"))
    rates = rule.rates("clinic")
    assert rule.threshold == 0.4 and rule.candidate_threshold <= 0.4
    assert (rates.sensitivity_k, rates.sensitivity_n) == (int(np.sum(prob[:100] >= 0.4)), 100)
    assert (rates.false_flag_k, rates.false_flag_n) == (int(np.sum(prob[100:] >= 0.4)), 100)
    assert rule.min_cells == BASE_RULE["min_cells"] and rule.alpha == BASE_RULE["alpha"]


def test_a_slide_of_fields_is_read_with_the_clinics_rates():
    labels = np.array([1] * 100 + [0] * 100)
    prob = np.concatenate([np.full(100, 0.9), np.full(100, 0.1)])
    rule = SlideRule.from_dict(clinic_slide_rule(labels, prob, 0.5, BASE_RULE, "clinic"))
    rows = [{"path": "f1.jpg", "cell": i, "prob_parasitized": 0.9 if i < 20 else 0.1,
             "prediction": "parasitized" if i < 20 else "uninfected"} for i in range(400)]
    result = assess_slide(rows, rule)
    assert result.source == "clinic" and result.call == "parasites found"


def test_no_rule_when_the_clinics_cells_cannot_tell_the_classes_apart():
    labels = np.array([1] * 50 + [0] * 50)
    prob = np.full(100, 0.7)
    assert clinic_slide_rule(labels, prob, 0.5, BASE_RULE, "clinic") is None
    assert clinic_slide_rule(labels, prob, 0.5, None, "clinic") is None
