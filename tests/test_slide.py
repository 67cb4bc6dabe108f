"""The slide call a microscopist can check: constructed counts for every call, the rule's round trip, and a real
slide of IML fields read through the bundled model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from malaria_edge.edge_runtime import slide
from malaria_edge.edge_runtime.slide import (FOUND, INDETERMINATE, JSON_KEYS, NONE_FOUND, REVIEW_NEEDED, SlideRule,
                                             SlideRuleError, assess_slide)

REPO = Path(__file__).resolve().parent.parent
IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax"


@pytest.fixture(scope="module")
def rule() -> SlideRule:
    """The rule measured for the bundled model (docs/slide_rule.json, validation data only)."""
    return SlideRule.from_dict(json.loads((REPO / "docs" / "slide_rule.json").read_text()))


def rows(n: int, flagged: int = 0, band: int = 0, field: str = "f.jpg", band_p: float = 0.4, **extra):
    """n cells of one field: ``flagged`` at p=0.9, ``band`` at ``band_p`` (in the review band when it lies between the
    rule's candidate and call thresholds), the rest at p=0.01."""
    out = []
    for i in range(n):
        p = 0.9 if i < flagged else (band_p if i < flagged + band else 0.01)
        out.append({"path": field, "cell": i + 1, "prob_parasitized": p,
                    "prediction": "parasitized" if p >= 0.5 else "uninfected", **extra})
    return out


def review_band_p(rule: SlideRule) -> float:
    """A probability in the review band: a candidate the rule does not call parasitized."""
    return (rule.candidate_threshold + rule.threshold) / 2


def test_json_has_exactly_the_keys_the_external_check_reads(rule):
    j = assess_slide(rows(1000, 5), rule).to_json()
    assert tuple(j) == JSON_KEYS
    json.dumps(j)


def test_no_cells_is_indeterminate(rule):
    r = assess_slide([], rule, source="iml")
    assert r.call == INDETERMINATE and r.cells == 0 and r.parasitemia is None


def test_too_few_cells_is_indeterminate(rule):
    r = assess_slide(rows(rule.min_cells - 1, 3), rule)
    assert r.call == INDETERMINATE and "too few" in r.reason


def test_every_cell_a_candidate_is_parasites_found_at_full_parasitemia(rule):
    r = assess_slide(rows(200, 200), rule)
    assert r.call == FOUND and r.candidates == 200 and r.parasitemia == 1.0


def test_clear_positive(rule):
    r = assess_slide(rows(1000, 80), rule)  # 8% flagged where ~1.2% are false flags
    assert r.call == FOUND
    lo, hi = r.parasitemia_ci
    assert lo > 0 and lo <= r.parasitemia <= hi
    assert r.parasites_per_ul == pytest.approx(r.parasitemia * 5_000_000)


def test_within_false_flag_noise_is_review_needed(rule):
    r = assess_slide(rows(1000, 12, 3, band_p=review_band_p(rule)), rule)  # 1.2% flagged: what false flags alone give
    assert r.call == REVIEW_NEEDED and r.candidates == 15
    assert r.parasitemia_ci[0] == 0.0


def test_nothing_flagged_is_no_parasites_found_with_the_detection_limit(rule):
    r = assess_slide(rows(1000), rule)
    assert r.call == NONE_FOUND and r.candidates == 0 and r.parasitemia == 0.0
    s = rule.rates("iml").candidate_sensitivity
    assert r.detection_limit == pytest.approx((1 - 0.05 ** (1 / 1000)) / s)
    assert "detection limit" in r.reason
    # More cells examined, a lower limit.
    assert assess_slide(rows(4000), rule).detection_limit < r.detection_limit


def test_unfamiliar_cells_make_the_slide_indeterminate(rule):
    r = assess_slide(rows(500, 50, unfamiliar=True), rule)
    assert r.call == INDETERMINATE and any("unfamiliar" in w for w in r.warnings)
    scored = assess_slide(rows(500, 50, unfamiliar=99.0), rule, unfamiliar_limits=(46.8, 0.1))
    assert scored.call == INDETERMINATE


def test_fields_failing_the_quality_gate_are_left_out_and_the_rest_suffices(rule):
    bad = rows(100, 0, field="blurred.jpg", warnings=["out of focus"])
    assert assess_slide(bad, rule).call == INDETERMINATE
    good = rows(900, 60, field="good.jpg")
    r = assess_slide(bad + good, rule)
    assert r.cells == 900 and r.cells_total == 1000 and r.excluded_fields == ["blurred.jpg"]
    assert r.call == FOUND and any("out of focus" in w for w in r.warnings)
    thin = assess_slide(bad + rows(rule.min_cells - 1, field="good.jpg"), rule)
    assert thin.call == INDETERMINATE and "leaving out" in thin.reason


def test_review_counts_confirmed_cells_and_recalls(rule):
    cells = rows(1000, 12, 3, band_p=review_band_p(rule))
    confirmed = {("f.jpg", 1), ("f.jpg", 2), ("f.jpg", 14)}
    r = assess_slide(cells, rule, reviewed=confirmed)
    assert r.reviewed and r.call == FOUND and r.confirmed == 3
    s = rule.rates("iml").candidate_sensitivity
    assert r.parasitemia == pytest.approx(3 / 1000 / s)
    none = assess_slide(cells, rule, reviewed=set())
    assert none.call == NONE_FOUND and none.parasitemia == 0.0 and none.parasitemia_ci[0] == 0.0


def test_a_cell_cut_by_the_image_edge_is_a_candidate_never_counted(rule):
    edge = {"path": "f.jpg", "cell": 1001, "prob_parasitized": 0.95, "prediction": "parasitized", "at_edge": 1}
    cells = rows(1000) + [edge]
    r = assess_slide(cells, rule)
    assert r.cells == r.cells_total == 1000 and r.flagged == 0
    assert r.candidates == r.edge_candidates == 1 and r.candidate_list[0]["cell"] == 1001
    assert r.call == REVIEW_NEEDED and r.parasitemia == assess_slide(rows(1000), rule).parasitemia
    seen = assess_slide(cells, rule, reviewed={("f.jpg", 1001)})
    assert seen.call == FOUND and seen.confirmed == 0 and seen.confirmed_edge == 1 and seen.parasitemia == 0.0
    assert "cut by the image edge" in seen.reason
    rejected = assess_slide(cells, rule, reviewed=set())
    assert rejected.call == NONE_FOUND and rejected.confirmed_edge == 0
    few = assess_slide(rows(rule.min_cells - 1) + [dict(edge, cell=k) for k in range(1001, 1101)], rule)
    assert few.call == INDETERMINATE and few.cells == rule.min_cells - 1
    assert all(slide.is_edge({"at_edge": v}) for v in (1, "1", True, "true"))
    assert not any(slide.is_edge({"at_edge": v}) for v in (None, "", 0, "0")) and not slide.is_edge({})


def test_a_field_left_out_shows_its_most_probable_cells_never_counted(rule):
    """A parasite in a field that failed the quality gate (or looks unfamiliar) must not pass silently: the field's
    most probable candidates, up to the review budget of its cells, follow the counted ones."""
    blurred = rows(200, 10, field="blurred.jpg", warnings=["out of focus"])
    r = assess_slide(rows(1000) + blurred, rule)
    budget = math.ceil(rule.max_candidate_share * 200)
    assert r.excluded_fields == ["blurred.jpg"] and r.cells == 1000 and r.flagged == 0
    assert r.candidates == r.left_out_candidates == budget < 10
    assert [c["rank"] for c in r.candidate_list] == list(range(1, budget + 1))
    assert all(slide.is_left_out(c) and c["path"] == "blurred.jpg" for c in r.candidate_list)
    assert r.call == REVIEW_NEEDED and "fields left out" in r.reason  # was "no parasites found"
    assert r.parasitemia == assess_slide(rows(1000), rule).parasitemia
    counted = assess_slide(rows(1000, 0, 2, band_p=review_band_p(rule)) + blurred, rule)
    assert [slide.is_left_out(c) for c in counted.candidate_list] == [False] * 2 + [True] * budget
    seen = assess_slide(rows(1000) + blurred, rule, reviewed={("blurred.jpg", 1)})
    assert seen.call == FOUND and seen.confirmed == 0 and seen.confirmed_left_out == 1 and seen.parasitemia == 0.0
    assert "in fields left out" in seen.reason
    assert assess_slide(rows(1000) + blurred, rule, reviewed=set()).call == NONE_FOUND
    unread = assess_slide(blurred, rule)
    assert unread.call == INDETERMINATE and unread.candidates == budget and "shown for review" in unread.reason
    one = assess_slide(rows(1000) + rows(20, 5, field="odd.jpg", unfamiliar=True), rule)
    assert one.left_out_candidates == 1  # at least one, however few cells the field has
    assert not slide.is_left_out({}) and not any(slide.is_left_out(c) for c in assess_slide(rows(900, 9), rule)
                                                 .candidate_list)


def test_interval_is_deterministic(rule):
    a = assess_slide(rows(800, 15), rule).parasitemia_ci
    b = assess_slide(rows(800, 15), rule).parasitemia_ci
    assert a == b


def test_rule_round_trip_and_refusals(rule):
    again = SlideRule.from_dict(json.loads(json.dumps(rule.as_dict())))
    assert again == rule
    d = rule.as_dict()
    assert d["sources"]["iml"]["sensitivity_n"] >= 40 and d["sources"]["nih"]["false_flag_n"] >= 700
    with pytest.raises(SlideRuleError, match="candidate_threshold"):
        SlideRule.from_dict({**d, "candidate_threshold": 0.9})
    with pytest.raises(SlideRuleError, match="sources.iml.false_flag_n"):
        SlideRule.from_dict({**d, "sources": {"iml": {"sensitivity_n": 10, "sensitivity_k": 9}}})
    with pytest.raises(SlideRuleError, match="no rates for source"):
        rule.rates("clinic")


def test_p_value_against_a_plain_binomial():
    """With no spread between slides and a huge validation count, the beta-binomial tail is the binomial tail."""
    from math import comb
    p = slide.false_flag_p_value(5, 100, 10_000 * 0.01 - 0.5, 10_000 * 0.99 - 0.5)
    exact = 1 - sum(comb(100, k) * 0.01 ** k * 0.99 ** (100 - k) for k in range(5))
    assert p == pytest.approx(exact, rel=0.05)


@pytest.mark.skipif(not (IML / "annotations.json").is_file(), reason="IML fields not present in shared/data beside the repository")
def test_a_real_slide_of_iml_fields(rule):
    """Four consecutive IML captures read by the bundled model as one slide: a real call with its figures."""
    pytest.importorskip("cv2", reason="whole fields need OpenCV (the [fields] extra)")
    from malaria_edge.edge_runtime.classifier import Classifier
    clf = Classifier.load(threads=1)
    names = [f"PA1718{n}.JPG" for n in range(42, 46)]
    cells = []
    for name in names:
        f = clf.classify_field(IML / "images" / name)
        cells += [{"path": f.source, "cell": c.index, "box": c.box, "prob_parasitized": c.prob_parasitized,
                   "prediction": c.prediction, "unfamiliar": c.unfamiliar_score} for c in f.cells]
    r = assess_slide(cells, rule, name="PA171842-45", unfamiliar_limits=clf.unfamiliar_limits)
    assert r.cells > 300 and r.call in (FOUND, REVIEW_NEEDED)
    assert 0 <= r.parasitemia_ci[0] <= r.parasitemia <= r.parasitemia_ci[1] < 0.1
