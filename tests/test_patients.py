"""From cells to a patient: the call rule, its intervals, indeterminate cases, and --group-by on real cells."""
import csv
import json
import shutil

import pytest

from malaria_edge.edge_runtime import Classifier
from malaria_edge.edge_runtime.patients import (DEFAULT_RULE, FIELD_RULE_REASON, NO_CALL, call_group, choose_rule,
                                               evaluate_rule, patient_level_metrics, summarize_groups)
from conftest import cli

RULE = {"min_cells": 20, "min_parasitized": 3, "min_fraction": 0.1, "max_review_fraction": 0.5}


def test_calls_follow_the_rule():
    assert call_group(150, 4, 0, RULE)["call"] == "negative"       # 2.7%: false positives of a healthy patient
    assert call_group(150, 30, 0, RULE)["call"] == "positive"
    assert call_group(10, 9, 0, RULE)["call"] == "indeterminate"    # too few cells
    g = call_group(100, 30, 60, RULE)
    assert g["call"] == "indeterminate" and "review" in g["reason"]
    g = call_group(0, 0, 0, RULE, failed=4)
    assert g["call"] == "indeterminate" and "4 failed" in g["reason"] and g["fraction_ci95"] is None


def test_field_slides_get_no_call_from_a_rule_chosen_on_crops():
    """A vivax slide at 1.2% parasitemia (the IML fields' level) is far below the crops' rule: no call, not a
    false negative; the same counts from single-cell crops keep their call."""
    field_rows = [{"group": "slide", "cell": i, "prediction": "parasitized" if i < 3 else "uninfected"}
                  for i in range(250)]
    crop_rows = [{**r, "group": "crops", "cell": ""} for r in field_rows]
    groups = summarize_groups(field_rows + crop_rows, RULE)
    assert groups["slide"]["call"] == NO_CALL and groups["slide"]["reason"] == FIELD_RULE_REASON
    assert groups["slide"]["parasitized_fraction"] == pytest.approx(0.012)
    assert groups["crops"]["call"] == "negative"


def test_fraction_interval_is_wilson():
    g = call_group(100, 10, 0, RULE)
    assert g["parasitized_fraction"] == pytest.approx(0.1)
    assert g["fraction_ci95"] == pytest.approx([0.0552, 0.1744], abs=1e-3)


def test_rule_is_chosen_between_healthy_and_infected_patients():
    patients = [{"patient": "1", "cells": 100, "parasitized": 3, "infected": False},
                {"patient": "2", "cells": 100, "parasitized": 5, "infected": False},
                {"patient": "3", "cells": 100, "parasitized": 40, "infected": True},
                {"patient": "4", "cells": 100, "parasitized": 70, "infected": True}]
    rule = choose_rule(patients)
    assert 0.05 < rule["min_fraction"] <= 0.40
    result = evaluate_rule(patients, rule)["metrics"]
    assert result["sensitivity"] == 1.0 and result["specificity"] == 1.0
    assert result["text"] == "2/2 infected patients called positive, 2/2 healthy patients called negative"


def test_rule_at_a_fixed_specificity_gives_up_one_healthy_patient_not_three_infected_ones():
    """Eighty infected patients, three of them at 4-6%, and twenty healthy ones, one at 7% (NIH's mix: few healthy
    patients): Youden's J keeps every healthy patient negative (threshold above 7%, three infected missed); at
    specificity >= 93% the rule may call that one healthy patient and keeps the three infected ones."""
    infected = [{"patient": f"I{i}", "cells": 100, "parasitized": 4 + i if i < 3 else 20 + i % 50, "infected": True}
                for i in range(80)]
    healthy = [{"patient": f"H{i}", "cells": 100, "parasitized": 7 if i == 0 else i % 3, "infected": False}
               for i in range(20)]
    youden = choose_rule(infected + healthy)
    assert youden["min_fraction"] > 0.07 and "Youden" in youden["chosen_on"]
    fixed = choose_rule(infected + healthy, min_specificity=0.93)
    assert 0.02 < fixed["min_fraction"] <= 0.04
    assert "specificity >= 93%: sensitivity 100.0%, specificity 95.0%" in fixed["chosen_on"]


def test_failed_only_group_is_indeterminate_not_a_crash():
    groups = summarize_groups([{"group": "slide1", "error": "corrupt"}], RULE)
    assert groups["slide1"]["call"] == "indeterminate"
    assert patient_level_metrics(groups)["patients"] == 0


def test_rule_is_read_from_the_card(bundle_copy):
    card_path = bundle_copy.parent / "malaria.json"
    card = json.loads(card_path.read_text())
    card["patient_rule"] = {**DEFAULT_RULE, "min_cells": 1234}
    card_path.write_text(json.dumps(card))
    clf = Classifier.load(bundle_copy)
    assert clf.rule["min_cells"] == 1234
    summary = clf.summarize([{"source": "a/Uninfected/C1P1_cell.png", "prediction": "uninfected"}], group="folder")
    assert summary["a"]["call"] == "indeterminate" and "1234" in summary["a"]["reason"]


def _slides(samples, tmp_path):
    """Two slides of real cells: one only uninfected cells, one only parasitized cells (20+ each)."""
    healthy, infected = tmp_path / "slide_healthy", tmp_path / "slide_infected"
    healthy.mkdir(), infected.mkdir()
    for f in (samples / "Uninfected").glob("*.webp"):
        shutil.copy(f, healthy / f.name)
    for f in (samples / "Parasitized").glob("*.webp"):
        shutil.copy(f, infected / f.name)
    return healthy, infected


def test_bundled_model_calls_real_slides(samples, tmp_path):
    """The shipped model: a slide of only uninfected cells is negative, one of parasitized cells positive."""
    healthy, infected = _slides(samples, tmp_path)
    clf = Classifier.load()
    results = clf.predict(sorted(healthy.iterdir()) + sorted(infected.iterdir()), batch_size=8)
    summary = clf.summarize(results, group="folder")
    assert summary[str(healthy)]["call"] == "negative", summary[str(healthy)]
    assert summary[str(infected)]["call"] == "positive", summary[str(infected)]
    limits = clf.unfamiliar_limits
    for g in summary.values():
        assert g["call"] == call_group(g["cells"], g["parasitized"], g["review"], clf.rule, 0, g["unfamiliar"],
                                       limits[1] if limits else None)["call"]


def test_tiny_model_calls_follow_the_card_rule(tiny_bundle, samples, tmp_path):
    healthy, infected = _slides(samples, tmp_path)
    clf = Classifier.load(tiny_bundle)
    summary = clf.summarize(clf.predict(sorted(healthy.iterdir()) + sorted(infected.iterdir())), group="folder")
    assert set(summary) == {str(healthy), str(infected)}
    limits = clf.unfamiliar_limits
    for g in summary.values():
        assert g["call"] == call_group(g["cells"], g["parasitized"], g["review"], clf.rule, 0, g["unfamiliar"],
                                       limits[1] if limits else None)["call"]


def test_group_by_patient_cli_writes_group_rows(bundled_model, samples, tmp_path):
    groups = tmp_path / "groups.csv"
    summary = tmp_path / "summary.json"
    cli("edge-classify", samples, "--model", bundled_model, "--group-by", "patient", "--groups-output", groups,
        "--summary-json", summary, check=True)
    with open(groups, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["group"] for r in rows} == {"7", "55", "82", "122", "132", "207"}
    assert all(r["call"] == "indeterminate" for r in rows)  # 6-9 cells each, fewer than the rule needs
    s = json.loads(summary.read_text())
    assert s["patient_level"]["patients"] == 6 and s["patient_level"]["indeterminate"] == 6
