"""The model card is a checked schema: a wrong card is refused with one line naming the field, before any image is
read; a card without a patient rule gives no patient calls. Device layer: the bundled model, no TensorFlow."""
import csv
import json
from pathlib import Path

import pytest

from conftest import cli
from malaria_edge.edge_runtime import Classifier, ModelError
from malaria_edge.edge_runtime.card import CARD_SCHEMA, CardError, parse_card, write_json_atomic


def _edit_card(bundle_copy, change):
    card_path = bundle_copy.parent / "malaria.json"
    card = json.loads(card_path.read_text())
    change(card)
    card_path.write_text(json.dumps(card))
    return card_path


def _set(path, value):
    def change(card):
        *parents, last = path.split(".")
        node = card
        for key in parents:
            node = node[key]
        node[last] = value
    return change


@pytest.mark.parametrize("field,value", [
    ("threshold", "abc"), ("threshold", float("nan")), ("threshold", 1e308), ("threshold", -1), ("threshold", 0),
    ("threshold", 1), ("input.size", 0), ("input.size", "48"), ("labels", ["parasitized", "parasitized"]),
    ("labels", ["parasitized"]),
    ("preprocessing.stain", {"mean": [180.0, 141.0, 151.0], "std": [33.0, 0.0, 27.0]}),
    ("patient_rule.min_parasitized", -1), ("patient_rule.min_fraction", float("nan")),
    ("patient_rule.max_review_fraction", 2.0), ("reference", "../elsewhere/model.tflite"), ("head", "sigmoid3"),
    ("schema", "malaria-edge/model-card/99"), ("slide_rule.candidate_threshold", 1.5),
    ("slide_rule.sources.iml.false_flag_n", 0),
])
def test_a_wrong_card_is_refused_with_one_line_naming_the_field(bundle_copy, samples, field, value):
    _edit_card(bundle_copy, _set(field, value))
    done = cli("edge-classify", samples, "--model", bundle_copy)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and "XNNPACK" not in line]
    assert len(lines) == 1, done.stderr
    assert field in lines[0] and "card field" in lines[0]
    assert done.stdout == "", "no image may be classified with a refused card"
    with pytest.raises(ModelError, match=field.replace(".", r"\.")):
        Classifier.load(bundle_copy)


def test_the_shipped_card_and_the_current_schema_both_read(bundled_model):
    card = Classifier.load(bundled_model).bundle.card
    assert 0 < card.threshold < 1 and card.input_size > 0 and card.labels[0] == "parasitized"
    upgraded = dict(card.raw, schema=CARD_SCHEMA)
    assert parse_card(upgraded).threshold == card.threshold


def test_the_shipped_card_carries_the_measured_slide_rule(bundled_model):
    """The slide rule measured on validation data (docs/slide_rule.json) travels in the card the runtime loads."""
    from malaria_edge.edge_runtime.slide import SlideRule
    measured = SlideRule.from_dict(json.loads((Path(__file__).resolve().parents[1] / "docs" / "slide_rule.json").read_text()))
    clf = Classifier.load(bundled_model)
    assert clf.slide_rule == measured
    assert clf.bundle.card.to_json()["slide_rule"]["candidate_threshold"] == measured.candidate_threshold
    assert parse_card({k: v for k, v in clf.bundle.card.raw.items() if k != "slide_rule"}).slide_rule is None


def test_a_card_without_a_patient_rule_gives_no_calls_and_says_so(bundle_copy, samples, tmp_path):
    _edit_card(bundle_copy, lambda card: card.pop("patient_rule"))
    summary = tmp_path / "summary.json"
    done = cli("edge-classify", samples, "--model", bundle_copy, "--group-by", "patient", "--summary-json", summary)
    assert done.returncode == 0, done.stderr
    assert "no patient rule" in done.stderr
    groups = json.loads(summary.read_text())["groups"]
    assert groups and all(g["call"] == "no call" for g in groups.values())


def test_cards_are_written_atomically(tmp_path):
    target = tmp_path / "card.json"
    target.write_text('{"old": true}')

    class Unserialisable:
        def __float__(self):
            raise TypeError("no")

        def __str__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError):
        write_json_atomic(target, {"a": 1, "b": Unserialisable()})
    assert json.loads(target.read_text()) == {"old": True}, "a failed write must leave the old file whole"
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"], "no temporary file may be left behind"
    write_json_atomic(target, {"new": 1})
    assert json.loads(target.read_text()) == {"new": 1}


def test_parse_card_names_a_missing_field():
    with pytest.raises(CardError, match="threshold"):
        parse_card({"schema": CARD_SCHEMA, "labels": ["parasitized", "uninfected"], "head": "logit",
                    "input": {"size": 48}, "files": {"m.tflite": {"sha256": "0" * 64}}})


def test_cells_unlike_the_training_data_are_flagged_and_the_group_gets_no_call(bundled_model, samples, tmp_path):
    """The shipped card's unfamiliar score: the real samples pass quietly; the same cells with their colour
    channels rotated (a stain no lab uses) raise the warning, and their slide's call is indeterminate."""
    from PIL import Image
    slide = tmp_path / "odd_stain"
    slide.mkdir()
    for path in sorted(samples.rglob("*.webp")):
        red, green, blue = Image.open(path).convert("RGB").split()
        Image.merge("RGB", (green, blue, red)).save(slide / f"{path.stem}.png")
    familiar = cli("edge-classify", samples, "--model", bundled_model, "--group-by", "folder")
    assert familiar.returncode == 0 and "WARNING" not in familiar.stderr, familiar.stderr
    odd = cli("edge-classify", slide, "--model", bundled_model, "--group-by", "folder", "-o", tmp_path / "rows.csv")
    assert odd.returncode == 0, odd.stderr
    assert "look unlike anything this model was trained on" in odd.stderr
    group_line = next(line for line in odd.stderr.splitlines() if line.startswith(str(slide)[-28:]))
    assert "indeterminate" in group_line and "unfamiliar images" in group_line
    with open(tmp_path / "rows.csv", newline="") as fh:
        assert all(row["unfamiliar"] for row in csv.DictReader(fh))


def test_a_card_written_through_the_typed_card_reads_back_the_same(bundled_model):
    """to_json is what the bundle writer writes: parsing it again gives the same card, and nothing is lost."""
    card = Classifier.load(bundled_model).bundle.card
    assert parse_card(card.to_json()) == card
    assert card.to_json() == json.loads((bundled_model.parent / "malaria.json").read_text())


def test_the_tool_version_is_kept_and_older_cards_without_it_still_read(bundled_model):
    from malaria_edge.edge_runtime.version import __version__
    raw = json.loads((bundled_model.parent / "malaria.json").read_text())
    older = parse_card({k: v for k, v in raw.items() if k != "tool_version"})
    assert older.tool_version is None
    stamped = parse_card(dict(raw, tool_version=__version__))
    assert stamped.tool_version == __version__ and stamped.to_json()["tool_version"] == __version__
    with pytest.raises(CardError, match="tool_version"):
        parse_card(dict(raw, tool_version=3))
