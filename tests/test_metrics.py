"""Metric arithmetic against values worked out by hand."""
import pytest

from malaria_edge.edge_runtime.metrics import binary_metrics, bootstrap_by_patient, roc_auc, wilson_interval


def test_confusion_and_rates():
    m = binary_metrics([1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.2, 0.1, 0.6, 0.3, 0.4])
    assert m["confusion_matrix"] == {"tp": 2, "fn": 1, "fp": 1, "tn": 3}
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["mcc"] == pytest.approx((2 * 3 - 1 * 1) / (3 * 3 * 4 * 4) ** 0.5)


def test_auc_counts_ties_as_half():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert roc_auc([1, 1], [0.1, 0.2]) is None


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(81, 263)
    assert low == pytest.approx(0.2553, abs=1e-3) and high == pytest.approx(0.3662, abs=1e-3)


def test_bootstrap_over_patients_brackets_the_estimate():
    y = [1, 1, 0, 0, 1, 0, 1, 0]
    p = [0.9, 0.7, 0.2, 0.6, 0.8, 0.1, 0.4, 0.3]
    patients = ["a", "a", "b", "b", "c", "c", "d", "d"]
    ci = bootstrap_by_patient(y, p, patients, rounds=200)
    acc = binary_metrics(y, p)["accuracy"]
    assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
