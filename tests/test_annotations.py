"""The one home of the IML annotation helpers: the split of the shared fields is the one every earlier round used,
training and the field bench agree on it, and the module stays light (no TensorFlow, no OpenCV)."""
import subprocess
import sys

import pytest

from conftest import REPO
from malaria_edge.edge_runtime.annotations import (SPLITS, Annotation, field_splits, iou, load_annotations,
                                                   match, merge_double_boxes, read_objects)

IML_ANNOTATIONS = REPO.parent / "shared" / "data" / "fields" / "iml_vivax" / "annotations.json"


def _captures(*ranges):
    return {f"PA{n}.JPG" for first, last in ranges for n in range(first, last + 1)}


# The split both former rules (train/iml.py by capture number, benchmarks/fields.py by sorted index) gave, field by
# field, before they were made one: blocks of 8 captures from PA171690.
VAL = _captures((171698, 171705), (171762, 171769), (171826, 171833))
TEST = _captures((171714, 171721), (171746, 171753), (171778, 171785), (171810, 171817), (171842, 171849))


@pytest.fixture(scope="module")
def iml_names():
    if not IML_ANNOTATIONS.is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent")
    return list(read_objects(IML_ANNOTATIONS))


def test_the_shared_fields_split_as_they_always_have(iml_names):
    splits = field_splits(iml_names)
    assert len(splits) == 184
    assert {n for n, s in splits.items() if s == "val"} == VAL
    assert {n for n, s in splits.items() if s == "test"} == TEST
    assert sum(s == "train" for s in splits.values()) == 120


def test_the_bench_scores_the_fields_training_holds_out(iml_names):
    for split in SPLITS:
        scored = {f.name for f in load_annotations(IML_ANNOTATIONS, split)}
        assert scored == {n for n, s in field_splits(iml_names).items() if s == split}


def test_a_found_cell_matches_one_box_at_iou_one_half():
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    # the better overlap wins a box; a detection below IoU 0.5 matches nothing
    assert match([(0, 0, 10, 10), (1, 0, 10, 10), (50, 50, 10, 10)], [(1, 0, 10, 10)]) == {1: 0}


def test_one_cell_boxed_twice_is_read_as_one_infected_cell():
    host = Annotation("red blood cell", (100, 100, 110, 100))
    objects = [Annotation("red blood cell", (0, 0, 80, 80)), host,
               Annotation("gametocyte", (105, 110, 85, 80)),        # inside its host's box (IoU 0.62)
               Annotation("gametocyte", (107, 112, 84, 80)),        # the same parasite boxed again
               Annotation("ring", (300, 300, 80, 80)), Annotation("red blood cell", (340, 300, 80, 80)),  # neighbours
               Annotation("difficult", (0, 0, 80, 80))]
    merged = merge_double_boxes(objects)
    assert merged == [objects[0], Annotation("gametocyte", host.box), objects[4], objects[5], objects[6]]


def test_the_shared_fields_double_boxes_are_merged(iml_names):
    import json
    raw = json.loads(IML_ANNOTATIONS.read_text())
    boxes = sum(len(entry["objects"]) for entry in raw)
    read = read_objects(IML_ANNOTATIONS)
    # 9 infected cells also boxed as red blood cells, 1 parasite boxed twice; 287 parasitized cells remain
    assert sum(len(objects) for objects in read.values()) == boxes - 10
    assert sum(a.label == "parasitized" for objects in read.values() for a in objects) == 287
    assert Annotation("gametocyte", (587, 148, 116, 106)) in read["PA171705.JPG"]


def test_annotations_load_without_tensorflow_or_opencv():
    code = ("import sys, malaria_edge.edge_runtime.annotations; "
            "print(sorted(m for m in ('tensorflow', 'cv2', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
