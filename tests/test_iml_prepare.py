"""edge-prepare --fields: annotated fields' red cells cut by the runtime's own segmentation, labelled by the box
they match, split by blocks of consecutive captures so no block sits on two sides. Needs ../shared's IML fields
and OpenCV (the segmentation)."""
import json
from pathlib import Path

import pytest

from conftest import REPO
from malaria_edge.train.dataset import prepare, read_manifest
from malaria_edge.train.iml import capture_number, field_split, iou, read_annotations

IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax"


def test_blocks_of_eight_captures_split_train_val_test():
    first = 171690
    splits = [field_split(f"PA{first + i}.JPG", first) for i in range(0, 184)]
    assert splits[0:8] == ["train"] * 8 and splits[8:16] == ["val"] * 8 and splits[24:32] == ["test"] * 8
    for block in range(23):
        assert len(set(splits[block * 8:(block + 1) * 8])) == 1, "a block never straddles two splits"
    assert splits.count("test") == 40 and splits.count("val") == 24
    assert capture_number("PA171874.JPG") == 171874
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)


@pytest.fixture(scope="module")
def small_field_set(tmp_path_factory):
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent")
    pytest.importorskip("cv2", reason="the field segmentation needs OpenCV (the [fields] extra)")
    names = sorted(p.name for p in (IML / "images").iterdir())
    chosen = names[0:2] + names[24:26]          # two train fields (block 0), two test fields (block 3)
    root = tmp_path_factory.mktemp("fields")
    (root / "images").mkdir()
    for name in chosen:
        (root / "images" / name).symlink_to(IML / "images" / name)
    entries = [e for e in json.loads((IML / "annotations.json").read_text()) if e["image_name"] in chosen]
    (root / "annotations.json").write_text(json.dumps(entries))
    return root, chosen


def test_prepare_adds_field_cells_as_a_second_source(small_field_set, samples, tmp_path):
    root, chosen = small_field_set
    report = prepare(samples, tmp_path, seed=42, test_fraction=0.34, val_fraction=0.34, log=lambda m: None,
                     fields=root)
    cells = read_manifest(tmp_path / "manifest.csv")
    field_cells = [c for c in cells if c.source == "IML"]
    assert {c.patient for c in field_cells} <= {n.split(".")[0] for n in chosen}
    by_field = {}
    for c in field_cells:
        by_field.setdefault(c.patient, set()).add(c.split)
    assert all(len(s) == 1 for s in by_field.values()), "a field's cells stay in one split"
    assert {c.split for c in field_cells} == {"train", "test"}
    annotations = read_annotations(root / "annotations.json")
    boxed = sum(1 for n in chosen for a in annotations[n] if a.label)
    stats = report["sources"]["IML"]["segmentation"]
    assert stats["fields"] == 4 and stats["matched"] >= 0.8 * boxed * 0.9
    assert {c.label for c in field_cells} <= {"parasitized", "uninfected"}
    assert report["sources"]["IML"]["unit"] == "fields"
    nih = [c for c in cells if c.source == "NIH"]
    assert len(nih) == len(list(samples.rglob("*.webp")))


def test_unboxed_detections_of_training_fields_can_be_kept_as_uninfected(small_field_set, samples, tmp_path):
    root, chosen = small_field_set
    plain = prepare(samples, tmp_path / "plain", seed=42, test_fraction=0.34, val_fraction=0.34,
                    log=lambda m: None, fields=root)
    report = prepare(samples, tmp_path / "kept", seed=42, test_fraction=0.34, val_fraction=0.34,
                     log=lambda m: None, fields=root, unboxed_negatives=True)
    stats = report["sources"]["IML"]["segmentation"]
    assert plain["sources"]["IML"]["segmentation"]["unboxed_negatives"] == 0
    assert 0 < stats["unboxed_negatives"] <= stats["unmatched"]
    unboxed = [c for c in read_manifest(tmp_path / "kept" / "manifest.csv") if "_unboxed" in Path(c.path).name]
    assert len(unboxed) == stats["unboxed_negatives"]
    assert {(c.split, c.label) for c in unboxed} == {("train", "uninfected")}, "evaluation fields stay as cut"
    before = read_manifest(tmp_path / "plain" / "manifest.csv")
    assert len(read_manifest(tmp_path / "kept" / "manifest.csv")) == len(before) + len(unboxed)
