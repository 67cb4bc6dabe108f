"""The review folder round trip: the microscopist moves a crop, the slide is recounted; the folder is what
edge-adapt reads."""
from __future__ import annotations

import csv
import shutil

import pytest

from malaria_edge.edge_runtime.review import (INDEX_NAME, field_crops, read_index, read_review, write_review)
from malaria_edge.edge_runtime.slide import FOUND, NONE_FOUND, assess_slide, is_left_out

pytest.importorskip("cv2", reason="slides of whole fields need OpenCV (the [fields] extra)")



@pytest.fixture(scope="module")
def slide_cells(sample_slide):
    """The three bundled sample fields read by the bundled model as one slide."""
    _, fields, rows, rule = sample_slide
    return fields, rows, rule


def test_review_round_trip_recounts_what_the_microscopist_moved(tmp_path, slide_cells):
    fields, rows, rule = slide_cells
    folder = write_review(tmp_path, "slide 7", rows, field_crops(fields), rule)
    assert folder == tmp_path / "slide_7"
    para = sorted(p.name for p in (folder / "Parasitized").iterdir())
    cands = [r for r in rows if r["prob_parasitized"] >= rule.candidate_threshold]
    assert len(para) == len(cands) > 3
    assert para[0].startswith("001_p0.99_nih_field_") and "_cell" in para[0]
    assert 0 < len(list((folder / "Uninfected").iterdir())) <= 12
    index = read_index(folder)
    first = index[para[0]]
    assert first["rank"] == "1" and first["path"].endswith(".jpg") and int(first["cell"]) >= 1
    assert set(next(csv.reader(open(folder / INDEX_NAME)))) >= {"rank", "file", "path", "cell", "prob_parasitized",
                                                                 "x", "y", "w", "h"}

    before = read_review(tmp_path)["slide 7"]
    assert before.reviewed and before.confirmed == len(cands) and before.call == FOUND
    # The microscopist rejects candidate 1 and confirms a parasite spotted among the negatives.
    shutil.move(folder / "Parasitized" / para[0], folder / "Uninfected" / para[0])
    negative = sorted((folder / "Uninfected").glob("n*.png"))[0]
    shutil.move(negative, folder / "Parasitized" / negative.name)
    after = read_review(tmp_path)["slide 7"]
    assert after.confirmed == before.confirmed and after.parasitemia == before.parasitemia
    shutil.move(folder / "Parasitized" / negative.name, negative)
    fewer = read_review(tmp_path)["slide 7"]
    assert fewer.confirmed == before.confirmed - 1 and fewer.parasitemia < before.parasitemia and fewer.reviewed
    # All rejected: nothing found, down to the detection limit.
    for p in (folder / "Parasitized").iterdir():
        shutil.move(p, folder / "Uninfected" / p.name)
    none = read_review(tmp_path)["slide 7"]
    assert none.call == NONE_FOUND and none.confirmed == 0 and none.detection_limit > 0


def test_a_candidate_cut_by_the_image_edge_is_reviewed_and_never_counted(tmp_path, slide_cells):
    fields, rows, rule = slide_cells
    field, cell = fields[0], fields[0].cells[0]
    edge = {"path": field.source, "cell": 999, "box": list(cell.box), "prob_parasitized": 0.97,
            "prediction": "parasitized", "at_edge": 1}
    crops = field_crops(fields)
    crops[(str(field.source), 999)] = crops[(str(field.source), cell.index)]
    folder = write_review(tmp_path, "s", rows + [edge], crops, rule)
    edge_file = next((folder / "Parasitized").glob("*_cell999_edge.png"))
    plain = write_review(tmp_path / "plain", "s", rows, field_crops(fields), rule)
    assert len(list((folder / "Parasitized").iterdir())) == len(list((plain / "Parasitized").iterdir())) + 1
    seen, without = read_review(tmp_path)["s"], read_review(tmp_path / "plain")["s"]
    assert seen.cells == without.cells and seen.confirmed == without.confirmed and seen.confirmed_edge == 1
    assert seen.parasitemia == without.parasitemia and seen.candidates == without.candidates + 1
    shutil.move(edge_file, folder / "Uninfected" / edge_file.name)
    rejected = read_review(tmp_path)["s"]
    assert rejected.confirmed_edge == 0 and rejected.parasitemia == without.parasitemia


def test_a_field_left_out_is_reviewed_and_never_counted(tmp_path, slide_cells):
    """A field that failed the quality gate: its most probable candidate is in the folder after the counted ones,
    named ``_left_out``, at the rank the slide result gives it; confirmed it makes the call, never the count."""
    fields, rows, rule = slide_cells
    left = str(fields[-1].source)
    marked = [dict(r, warnings=["out of focus"]) if str(r["path"]) == left else r for r in rows]
    folder = write_review(tmp_path, "s", marked, field_crops(fields), rule)
    result = assess_slide(marked, rule)
    shown = [c for c in result.candidate_list if is_left_out(c)]
    assert result.excluded_fields == [left] and len(shown) == 1 and shown[0]["rank"] == result.candidates
    files = sorted((folder / "Parasitized").glob("*_left_out.png"))
    assert [f.name[:3] for f in files] == [f"{shown[0]['rank']:03d}"] and f"_cell{shown[0]['cell']}_" in files[0].name
    seen = read_review(tmp_path)["s"]
    assert seen.confirmed_left_out == 1 and seen.confirmed == result.candidates - 1 and seen.call == FOUND
    shutil.move(files[0], folder / "Uninfected" / files[0].name)
    rejected = read_review(tmp_path)["s"]
    assert rejected.confirmed_left_out == 0 and rejected.parasitemia == seen.parasitemia


def test_a_review_in_progress_is_never_overwritten(tmp_path, slide_cells):
    fields, rows, rule = slide_cells
    write_review(tmp_path, "s", rows, field_crops(fields), rule)
    with pytest.raises(FileExistsError):
        write_review(tmp_path, "s", rows, field_crops(fields), rule)


def test_the_slide_folder_is_an_edge_adapt_cells_input(tmp_path, slide_cells):
    adapt = pytest.importorskip("malaria_edge.train.adapt")
    fields, rows, rule = slide_cells
    folder = write_review(tmp_path, "s", rows, field_crops(fields), rule)
    write_review(tmp_path, "t", rows, field_crops(fields), rule)
    assert {k: len(v) for k, v in adapt.clinic_class_folders(folder).items()} == {"parasitized": 1,
                                                                                  "uninfected": 1}
    # The parent of many slides too: the class folders of every slide, merged.
    merged = adapt.clinic_class_folders(tmp_path)
    assert sorted(f.parent.name for f in merged["parasitized"]) == ["s", "t"]
    clinic = adapt.read_clinic_cells(tmp_path, 32, None)
    crops = list(tmp_path.glob("*/*/*.png"))
    # Slide t holds the same cells as slide s: each is a cell once, its copy dropped as a duplicate.
    assert len(clinic.paths) == len(clinic.duplicates) == len(crops) // 2 and not clinic.failed
    assert int(clinic.labels.sum()) == len(list((tmp_path / "s").glob("Parasitized/*.png")))