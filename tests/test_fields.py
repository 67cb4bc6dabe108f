"""Whole microscope fields: every red cell found, touching cells split, non-cell pictures refused, fields resumed,
overlays and crops written. Real images: the committed fields composed from NIH cells, and the IML fields from
../shared when present."""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="field segmentation needs OpenCV (the [fields] extra)")

from malaria_edge.benchmarks.fields import iou, load_annotations, match, score_field, touches_border  # noqa: E402
from malaria_edge.edge_runtime import Classifier  # noqa: E402
from malaria_edge.edge_runtime.segment import central_cell, cut_cell, segment_field  # noqa: E402
from conftest import REPO, SAMPLES, cli  # noqa: E402

FIELDS = REPO / "edge_runtime" / "sample_fields"
ANNOTATIONS = FIELDS / "annotations.json"
IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax"


def rgb_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def rows_of(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def classifier():
    return Classifier.load()


@pytest.mark.parametrize("name", ["nih_field_sparse.jpg", "nih_field_touching.jpg", "nih_field_dense.jpg"])
def test_every_whole_cell_of_a_composed_field_is_found_and_border_cells_are_not(name):
    truth = next(f for f in load_annotations(ANNOTATIONS, "all") if f.name == name)
    rgb = rgb_of(FIELDS / name)
    cells = segment_field(rgb)
    boxes = [c.box for c in cells]
    height, width = rgb.shape[:2]
    whole = [b for b in truth.cells if not touches_border(b, width, height)]
    matched = match(boxes, whole)
    assert len(matched) >= 0.95 * len(whole)
    assert not any(touches_border(b, width, height) for b in boxes)
    for cell in cells:
        assert cell.mask.shape == (cell.box[3], cell.box[2]) and cell.mask.dtype == bool
        assert cell.area == int(cell.mask.sum())


def test_touching_cells_are_split_into_one_region_each():
    truth = next(f for f in load_annotations(ANNOTATIONS, "all") if f.name == "nih_field_touching.jpg")
    rgb = rgb_of(FIELDS / truth.name)
    height, width = rgb.shape[:2]
    pairs = [(a, b) for i, a in enumerate(truth.cells) for b in truth.cells[i + 1:]
             if iou(a, b) > 0 and not touches_border(a, width, height) and not touches_border(b, width, height)]
    assert len(pairs) >= 3, "the composed field should hold touching pairs"
    boxes = [c.box for c in segment_field(rgb)]
    found = match(boxes, truth.cells)
    found_truths = set(found.values())
    split = sum(truth.cells.index(a) in found_truths and truth.cells.index(b) in found_truths for a, b in pairs)
    assert split >= 0.9 * len(pairs)


def test_an_nih_crop_cut_by_its_central_cell_is_the_same_cell():
    for path in sorted(SAMPLES.rglob("*.webp"))[:10]:
        rgb = rgb_of(path)
        region = central_cell(rgb)
        cut = cut_cell(rgb, region)
        x, y, w, h = region.box
        assert w * h >= 0.8 * rgb.shape[0] * rgb.shape[1]
        assert np.abs(cut.astype(int) - rgb[y:y + h, x:x + w].astype(int)).mean() < 2.0


def test_a_crop_with_glass_and_neighbours_is_cut_to_its_central_cell():
    truth = next(f for f in load_annotations(ANNOTATIONS, "all") if f.name == "nih_field_touching.jpg")
    rgb = rgb_of(FIELDS / truth.name)
    height, width = rgb.shape[:2]
    checked = 0
    for x, y, w, h in truth.cells:
        m = w // 4
        if x < m or y < m or x + w + m > width or y + h + m > height:
            continue
        crop = rgb[y - m:y + h + m, x - m:x + w + m]
        region = central_cell(crop)
        assert region is not None and iou(region.box, (m, m, w, h)) >= 0.5
        assert (cut_cell(crop, region)[~region.mask] == 0).all()
        checked += 1
    assert checked >= 5


def test_field_result_counts_draw_and_save_crops(classifier, tmp_path):
    result = classifier.classify_field(FIELDS / "nih_field_sparse.jpg")
    assert result.n_cells >= 15
    assert result.n_parasitized + result.n_uninfected + result.n_review == result.n_cells
    assert [c.index for c in result.cells] == list(range(1, result.n_cells + 1))
    lo, hi = result.parasitemia_ci
    assert lo <= result.parasitemia <= hi
    overlay = result.plot()
    assert overlay.shape[1] == result.width and overlay.shape[0] > result.height and overlay.dtype == np.uint8
    crops = result.save_crops(tmp_path)
    assert [p.name for p in crops][:2] == ["nih_field_sparse_cell1.png", "nih_field_sparse_cell2.png"]
    first = rgb_of(crops[0])
    assert first.shape[:2] == (result.cells[0].box[3], result.cells[0].box[2])


def test_edge_classify_writes_a_row_per_field_cell_overlays_and_crops(tmp_path):
    out = tmp_path / "cells.csv"
    done = cli("edge-classify", FIELDS, "-o", out, "--overlays", tmp_path / "overlays", "--save-crops",
               tmp_path / "crops", "--summary-json", tmp_path / "summary.json", check=True)
    rows = rows_of(out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["input_kinds"] == {"field": 3, "cell": 0}
    assert "3 fields" in done.stderr and "parasitemia" in done.stderr
    for row in rows:
        assert int(row["cell"]) >= 1 and all(int(row[k]) >= 0 for k in ("x", "y", "w", "h"))
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 3
    for overlay in overlays:
        with Image.open(overlay) as img:
            img.load()
            assert img.width > 800
    assert len(list((tmp_path / "crops").glob("*.png"))) == len(rows)


def test_cells_and_fields_mixed_are_told_apart(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cell = next((SAMPLES / "Parasitized").glob("*.webp"))
    (folder / cell.name).write_bytes(cell.read_bytes())
    (folder / "field.jpg").write_bytes((FIELDS / "nih_field_sparse.jpg").read_bytes())
    out = tmp_path / "rows.csv"
    done = cli("edge-classify", folder, "-o", out, check=True)
    rows = rows_of(out)
    single = [r for r in rows if r["path"].endswith(".webp")]
    assert len(single) == 1 and single[0]["cell"] == "" and single[0]["x"] == ""
    assert len([r for r in rows if r["path"].endswith("field.jpg")]) >= 15
    assert "1 fields, 1 single cells" in done.stderr


def test_pictures_that_are_neither_a_cell_nor_a_field_get_an_error_row(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 100, 100)).save(folder / "one_pixel.png")
    Image.new("RGB", (1280, 960)).save(folder / "all_black.png")
    Image.new("RGB", (1280, 960), (238, 236, 232)).save(folder / "blank_glass.jpg")
    ramp = (np.linspace(0, 255, 1280)[None, :, None] * np.ones((960, 1, 3))).astype(np.uint8)
    Image.fromarray(ramp).save(folder / "ramp.jpg")
    out = tmp_path / "rows.csv"
    done = cli("edge-classify", folder, "-o", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    rows = rows_of(out)
    assert len(rows) == 4
    assert all(r["error"] and not r["prediction"] and not r["prob_parasitized"] for r in rows)
    assert "too small" in next(r["error"] for r in rows if r["path"].endswith("one_pixel.png"))


def test_resume_redoes_a_field_cut_short_and_loses_nothing(tmp_path):
    full = tmp_path / "full.csv"
    cli("edge-classify", FIELDS, "-o", full, check=True)
    full_rows = rows_of(full)
    lines = full.read_text().splitlines(keepends=True)
    first_field = full_rows[0]["path"]
    cut_at = sum(1 for r in full_rows if r["path"] == first_field) + 5   # 5 rows into the second field
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(lines[:1 + cut_at]))
    shutil.copy(tmp_path / "full.csv.settings.json", tmp_path / "partial.csv.settings.json")  # same settings
    cli("edge-classify", FIELDS, "-o", partial, "--resume", check=True)
    resumed = rows_of(partial)
    key = lambda r: (r["path"], r["cell"], r["x"], r["y"], r["w"], r["h"], r["prediction"])
    assert [key(r) for r in resumed] == [key(r) for r in full_rows]


def test_edge_bench_scores_the_composed_fields(tmp_path):
    out = tmp_path / "fields.json"
    done = cli("edge-bench", "fields", FIELDS, "--annotations", ANNOTATIONS, "--split", "all", "--json", out,
               check=True)
    report = json.loads(out.read_text())
    assert report["fields"] == 3 and report["recall_whole"] >= 0.95
    assert "red-cell recall" in done.stdout and report["photo_12mp"]["cells"] > 0


def test_count_error_leaves_out_on_both_sides_what_the_boxes_leave_out():
    from malaria_edge.benchmarks.fields import AnnotatedField, count_errors
    whole = [(100, 100, 70, 70), (300, 100, 70, 70), (500, 100, 70, 70), (700, 100, 70, 70)]
    at_edge = (0, 400, 70, 70)
    truth = AnnotatedField("f.jpg", whole + [at_edge], [], left_out=[(300, 400, 70, 70)])
    found = [(104, 104, 62, 62), (304, 104, 62, 62), (504, 104, 62, 62), (704, 104, 62, 62)]
    detections = found + [(4, 404, 62, 62), (304, 404, 62, 62), (900, 600, 60, 60)]
    every, in_scope = count_errors(detections, truth, 1280, 960)
    assert every == pytest.approx(3 / 4)
    assert in_scope == pytest.approx(1 / 4), "the edge cell's and the difficult box's detections are out of scope"
    assert count_errors(found, AnnotatedField("g.jpg", [at_edge], [], []), 1280, 960) == (None, None)


def test_iml_fields_of_one_test_block_reach_the_recall_target():
    """A regression guard on one fixed block of 8 test fields (PA171810-817); the README reports all 40."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    fields = [f for f in load_annotations(IML / "annotations.json", "test") if "PA171810" <= f.name[:8] <= "PA171817"]
    assert len(fields) == 8
    found = total = 0
    for truth in fields:
        rgb = rgb_of(IML / "images" / truth.name)
        height, width = rgb.shape[:2]
        boxes = [c.box for c in segment_field(rgb)]
        whole = [j for j, b in enumerate(truth.cells) if not touches_border(b, width, height)]
        matched = set(match(boxes, truth.cells).values())
        found += len(matched & set(whole))
        total += len(whole)
    assert found >= 0.95 * total


def test_a_dense_smear_whose_cells_form_one_network_is_measured_by_its_cells_not_its_specks():
    """PA171746-747: the cells touch across the whole field, so the few lone blobs are specks and fragments; the
    diameter must still come out a red cell's (it came out a third of one, and the field as 400 fragments)."""
    from malaria_edge.edge_runtime.segment import field_diameter
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    for truth in load_annotations(IML / "annotations.json", "all"):
        if truth.name not in ("PA171746.JPG", "PA171747.JPG"):
            continue
        boxed = float(np.median([math.sqrt(w * h) for _, _, w, h in truth.cells]))
        assert 0.7 * boxed <= field_diameter(rgb_of(IML / "images" / truth.name)) <= 1.1 * boxed


def test_cells_beside_the_edge_s_cut_cells_and_pale_overlapping_cells_are_found():
    """Train fields PA171695, PA171710 and PA171711 (77% of their whole cells found before): a cut cell at the
    image edge with no seed of its own was shared out to its whole neighbour, which then reached the edge and was
    dropped; the circle of a cell overlapping a stronger neighbour was suppressed, leaving it without a seed; a
    pale cell whose centre opens onto the glass seeded nothing."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    names = ("PA171695.JPG", "PA171710.JPG", "PA171711.JPG")
    found = total = 0
    for truth in load_annotations(IML / "annotations.json", "train"):
        if truth.name not in names:
            continue
        rgb = rgb_of(IML / "images" / truth.name)
        height, width = rgb.shape[:2]
        whole = {j for j, b in enumerate(truth.cells) if not touches_border(b, width, height)}
        found += len(set(match([c.box for c in segment_field(rgb)], truth.cells).values()) & whole)
        total += len(whole)
    assert total > 300 and found >= 0.84 * total


def test_enlarged_pale_infected_cells_the_threshold_leaves_as_glass_are_found():
    """Train fields PA171854, PA171859, PA171862, PA171866: an enlarged P. vivax cell paler than its deep-magenta
    neighbours falls below the cell/glass threshold (a hole too big to fill); the pale-cell step finds it, and
    without that step none of the four is found."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    names = ("PA171854.JPG", "PA171859.JPG", "PA171862.JPG", "PA171866.JPG")
    fields = [t for t in load_annotations(IML / "annotations.json", "train") if t.name in names]
    assert len(fields) == 4

    def parasites_found(pale_cells: bool) -> int:
        found = 0
        for truth in fields:
            cells = segment_field(rgb_of(IML / "images" / truth.name), pale_cells=pale_cells)
            matched = match([c.box for c in cells], truth.cells)
            found += sum(truth.cells[j] in truth.parasites for j in matched.values())
        return found

    total = sum(len(t.parasites) for t in fields)
    with_step = parasites_found(pale_cells=True)
    without_step = parasites_found(pale_cells=False)
    assert with_step - without_step >= 4 and with_step == total


def test_an_enlarged_round_cell_stays_whole_and_two_overlapping_cells_do_not():
    import cv2
    from malaria_edge.edge_runtime.segment import fill_holes, is_one_cell
    enlarged = np.zeros((90, 90), np.uint8)
    cv2.ellipse(enlarged, (45, 45), (34, 28), 30, 0, 360, 1, -1)  # ~2.4 areas of a 40 px cell, round
    assert is_one_cell(enlarged.astype(bool))
    pair = np.zeros((90, 130), np.uint8)
    cv2.circle(pair, (40, 45), 22, 1, -1)
    cv2.circle(pair, (80, 45), 22, 1, -1)  # two overlapping cells, a waist between them
    assert not is_one_cell(pair.astype(bool))
    ring = np.ones((120, 240), bool)
    cv2.circle(ring.view(np.uint8), (60, 60), 25, 0, -1)  # a round pale centre, ~1.6x the plain hole limit
    star = np.ones((120, 120), np.uint8)
    for angle in range(0, 180, 45):  # glass between touching cells: the same area, star-shaped
        cv2.ellipse(star, (60, 60), (40, 7), angle, 0, 360, 0, -1)
    hole = math.pi * 25 ** 2
    filled = fill_holes(ring, max_area=0.6 * hole, round_max_area=1.2 * hole)
    assert filled[:, :120].all(), "a round hole within round_max_area is a pale centre"
    assert not fill_holes(ring, max_area=0.6 * hole)[60, 60], "without round_max_area only small holes are filled"
    star_hole = np.count_nonzero(star == 0)
    assert not fill_holes(star.astype(bool), max_area=0.6 * star_hole, round_max_area=1.2 * star_hole)[60, 60]


def test_enlarged_infected_cells_are_not_cut_in_two():
    """Train fields PA171853, PA171858, PA171873: an enlarged P. vivax cell of about two cell areas, round, was cut
    in two by the k-means split meant for clumps (or, in PA171853, its pale centre was a hole too big to fill); the
    whole-cell test and the round-hole filling find all three, and without them none is found."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    from malaria_edge.edge_runtime import segment
    wanted = {"PA171853.JPG": (704, 308, 89, 109), "PA171858.JPG": (444, 659, 100, 93),
              "PA171873.JPG": (626, 576, 107, 106)}
    fields = {t.name: t for t in load_annotations(IML / "annotations.json", "train") if t.name in wanted}
    assert all(wanted[n] in fields[n].parasites for n in wanted)

    def found() -> int:
        hits = 0
        for name, box in wanted.items():
            truth = fields[name]
            matched = match([c.box for c in segment_field(rgb_of(IML / "images" / name))], truth.cells)
            hits += truth.cells.index(box) in matched.values()
        return hits

    assert found() == 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment, "ONE_CELL_FILL", 0.0)
        patch.setattr(segment, "ROUND_HOLE_AREA", 0.0)
        assert found() == 0


def test_two_halves_of_one_cell_are_joined_and_two_cells_side_by_side_or_apart_are_not():
    import cv2
    from malaria_edge.edge_runtime.segment import CellRegion, joined_region

    def region(mask: np.ndarray) -> CellRegion:
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return CellRegion((int(x0), int(y0), int(x1 - x0), int(y1 - y0)), mask[y0:y1, x0:x1].astype(bool),
                          int(mask.sum()), (float(xs.mean()), float(ys.mean())))

    elongated = np.zeros((200, 200), np.uint8)
    cv2.ellipse(elongated, (100, 100), (22, 35), 0, 0, 360, 1, -1)  # a gametocyte ~1.9 areas of a 40 px cell
    top, bottom = elongated.copy(), elongated.copy()
    top[100:], bottom[:100] = 0, 0  # cut across by two seeds
    joined = joined_region(region(top), region(bottom), diameter=40.0)
    assert joined is not None and joined.area == int(elongated.sum())
    assert joined.box == region(elongated).box and np.array_equal(joined.mask, region(elongated).mask)
    left, right = np.zeros((200, 200), np.uint8), np.zeros((200, 200), np.uint8)
    cv2.circle(left, (80, 100), 20, 1, -1)
    cv2.circle(right, (120, 100), 20, 1, -1)  # two round cells touching: a waist
    assert joined_region(region(left), region(right), diameter=40.0) is None
    far = np.zeros((200, 200), np.uint8)
    cv2.circle(far, (150, 100), 20, 1, -1)
    assert joined_region(region(left), region(far), diameter=40.0) is None
    assert joined_region(region(top), region(bottom), diameter=25.0) is None, "more than ENLARGED_AREA cells"


def test_an_elongated_infected_cell_cut_across_is_joined_into_one_candidate(classifier):
    """Train field PA171741: an elongated infected cell seeded twice was cut across into two halves that both scored
    as parasitized (0.99, 0.97) and matched its box at IoU 0.44 / 0.45; joined, it is one cell at IoU >= 0.5."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    from malaria_edge.edge_runtime import fields
    from malaria_edge.edge_runtime.fields import edge_threshold
    box = (697, 411, 78, 112)
    result = classifier.classify_field(IML / "images" / "PA171741.JPG")
    hits = [c for c in result.cells if iou(c.box, box) >= 0.5]
    assert len(hits) == 1 and hits[0].prob_parasitized >= edge_threshold(classifier)
    assert [c.index for c in result.cells] == list(range(1, result.n_cells + 1))
    with pytest.MonkeyPatch.context() as patch:  # the refit, left on, would grow one half over the other
        patch.setattr(fields, "joined_region", lambda a, b, d: None)
        patch.setattr(fields, "refit_outline", lambda rgb, cell, neighbours, diameter: None)
        apart = classifier.classify_field(IML / "images" / "PA171741.JPG")
    assert all(iou(c.box, box) < 0.5 for c in apart.cells) and apart.n_cells == result.n_cells + 1


def test_slivers_of_several_cells_that_make_a_cell_become_one_and_a_lone_sliver_does_not():
    import cv2
    from malaria_edge.edge_runtime.segment import claim_seedless_cells
    labels = np.zeros((120, 200), np.int32)
    labels[:, :60], labels[:, 140:] = 1, 2  # two seeded neighbours
    trimmed = np.zeros(labels.shape, np.uint8)
    cv2.circle(trimmed, (100, 60), 20, 1, -1)  # a 40 px cell with no seed, trimmed off them in two halves
    trimmed[55:65, 95:105] = 0  # its pale centre, never stained
    trimmed[52:68, 84:88], labels[52:68, 84:88] = 0, 1  # a bit of it the left neighbour kept, within its reach
    out = claim_seedless_cells(labels.copy(), trimmed, diameter=40.0)
    assert out[60, 100] == 3 and out[60, 86] == 3 and np.count_nonzero(out == 3) >= 0.95 * math.pi * 20 ** 2
    assert np.count_nonzero(out == 1) == np.count_nonzero(labels[:, :60] == 1)
    sliver = np.zeros(labels.shape, np.uint8)
    cv2.circle(sliver, (100, 60), 12, 1, -1)  # about a third of a cell: a sliver, left as background
    assert claim_seedless_cells(labels.copy(), sliver, diameter=40.0).max() == 2


def test_an_infected_cell_no_seed_reached_is_found():
    """Train field PA171851: a schizont paler than its deep-magenta neighbours got no seed; shared out among them,
    its parts beyond their reach were trimmed off as slivers and it was not found. Together they make the cell."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    from malaria_edge.edge_runtime import segment
    box = (753, 611, 108, 110)
    rgb = rgb_of(IML / "images" / "PA171851.JPG")
    assert max(iou(c.box, box) for c in segment_field(rgb)) >= 0.5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment, "SEEDLESS_AREA", 100.0)
        assert max(iou(c.box, box) for c in segment_field(rgb)) < 0.5


def _smear(scale: int):
    """A constructed smear at ``scale`` x 40 px cells: glass, a pale enlarged infected cell (1.7 cell areas, dotted)
    at (90, 100), a deep-magenta cell touching it on the right and a pale cell of the same colour far left; with a
    CellRegion maker for a mask."""
    import cv2
    from malaria_edge.edge_runtime.segment import CellRegion
    rgb = np.zeros((200 * scale, 260 * scale, 3), np.uint8)
    rgb[:] = (225, 235, 225)
    cv2.circle(rgb, (90 * scale, 100 * scale), 26 * scale, (205, 170, 205), -1)
    for x, y in ((80, 92), (98, 96), (86, 110), (104, 106), (92, 84), (108, 98)):
        cv2.circle(rgb, (x * scale, y * scale), 2 * scale, (165, 110, 175), -1)
    cv2.circle(rgb, (136 * scale, 100 * scale), 20 * scale, (150, 50, 140), -1)
    cv2.circle(rgb, (24 * scale, 100 * scale), 20 * scale, (205, 170, 205), -1)

    def region(mask: np.ndarray) -> CellRegion:
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return CellRegion((int(x0), int(y0), int(x1 - x0), int(y1 - y0)), mask[y0:y1, x0:x1].astype(bool),
                          int(mask.sum()), (float(xs.mean()), float(ys.mean())))

    def disc(x: int, y: int, r: int) -> np.ndarray:
        mask = np.zeros(rgb.shape[:2], np.uint8)
        cv2.circle(mask, (x * scale, y * scale), r * scale, 1, -1)
        return mask
    return rgb, region, disc


@pytest.mark.parametrize("scale", [1, 2])
def test_a_pale_candidate_cut_short_is_grown_to_its_own_colour_and_never_into_a_neighbour(scale):
    from malaria_edge.edge_runtime.segment import refit_outline
    rgb, region, disc = _smear(scale)
    infected, deep, pale = disc(90, 100, 26), disc(136, 100, 20), disc(24, 100, 20)
    short = infected.copy()
    short[:, 100 * scale:] = 0  # its right side given to the glass and the deep neighbour
    neighbour = deep | (infected & ~short.astype(bool))  # the deep cell took the rest
    grown = refit_outline(rgb, region(short), [region(neighbour), region(pale)], diameter=40.0 * scale)
    assert grown is not None
    whole = np.zeros(rgb.shape[:2], bool)
    x, y, w, h = grown.box
    whole[y:y + h, x:x + w] = grown.mask
    assert np.count_nonzero(whole & infected.astype(bool)) >= 0.95 * infected.sum(), "the cell is whole again"
    assert np.count_nonzero(whole & deep.astype(bool)) <= 0.05 * deep.sum(), "the deep neighbour is not taken"
    assert not (whole & pale.astype(bool)).any()
    assert grown.area == int(grown.mask.sum()) and grown.mask.shape == (h, w)
    again = refit_outline(rgb, region(infected), [region(deep), region(pale)], diameter=40.0 * scale)
    assert again is None or again.area <= 1.05 * infected.sum(), "an outline already whole stays as it is (its blur)"


def test_a_candidate_is_not_grown_into_a_touching_cell_of_its_own_colour():
    from malaria_edge.edge_runtime.segment import refit_outline
    rgb, region, disc = _smear(1)
    import cv2
    cv2.circle(rgb, (56, 100), 20, (205, 170, 205), -1)  # a pale cell of the candidate's colour touching it
    left, right = disc(56, 100, 20), disc(90, 100, 26)
    right &= ~left.astype(bool)
    grown = refit_outline(rgb, region(left), [region(right), region(disc(136, 100, 20))], diameter=40.0)
    assert grown is None or np.count_nonzero(grown.mask) <= 1.1 * left.sum()


def test_an_infected_cell_cut_short_is_refitted_whole():
    """Train field PA171870: a schizont in a deep-stained smear, its lower part given to its neighbours, matched its
    box at IoU 0.60; re-fitted to its own colour it matches at 0.8, still a candidate."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    from malaria_edge.edge_runtime import fields
    from malaria_edge.edge_runtime.fields import edge_threshold
    box = (682, 365, 106, 110)
    classifier = Classifier.load()
    best = max(classifier.classify_field(IML / "images" / "PA171870.JPG").cells, key=lambda c: iou(c.box, box))
    assert iou(best.box, box) >= 0.75 and best.prob_parasitized >= edge_threshold(classifier)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fields, "refit_outline", lambda rgb, cell, neighbours, diameter: None)
        before = classifier.classify_field(IML / "images" / "PA171870.JPG")
    assert max(iou(c.box, box) for c in before.cells) < 0.65


def test_a_broken_rim_of_one_enlarged_cell_is_filled_and_a_centre_ringed_by_other_cells_is_not():
    import cv2
    from malaria_edge.edge_runtime.segment import fill_broken_rims
    raw = np.zeros((160, 400), np.uint8)
    for x in (80, 280):
        cv2.circle(raw, (x, 80), 22, 1, 3)  # an enlarged cell's thin rim, its centre below the stain threshold
    cleaned = raw.copy()
    for x in (80, 280):  # the opening broke each rim on both sides, so its centre opens onto the glass
        cleaned[76:85, x - 26:x - 18] = 0
        cleaned[76:85, x + 18:x + 26] = 0
    for x in (237, 323):  # the second rim touches two whole cells: the hole may be glass ringed by cells
        cv2.circle(raw, (x, 80), 20, 1, -1)
        cv2.circle(cleaned, (x, 80), 20, 1, -1)
    filled = fill_broken_rims(cleaned.astype(bool), raw.astype(bool), diameter=40.0)
    yy, xx = np.ogrid[:160, :400]
    assert filled[(xx - 80) ** 2 + (yy - 80) ** 2 <= 19 ** 2].all(), "one cell's centre is filled"
    assert not filled[80, 280], "a centre whose stain includes other whole cells stays open"
    assert np.array_equal(filled[:, 160:], cleaned[:, 160:].astype(bool))


def test_a_pale_enlarged_cell_whose_rim_the_opening_broke_is_found():
    """Train field PA171867: an enlarged P. vivax cell whose thin stained rim the speckle opening broke in two, its
    pale centre then open onto the glass (two crescents were found instead of the cell)."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    from malaria_edge.edge_runtime import segment
    name, box = "PA171867.JPG", (466, 874, 104, 83)
    truth = next(t for t in load_annotations(IML / "annotations.json", "train") if t.name == name)
    assert box in truth.parasites
    rgb = rgb_of(IML / "images" / name)

    def found() -> bool:
        return truth.cells.index(box) in match([c.box for c in segment_field(rgb)], truth.cells).values()

    assert found()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment, "RIM_HOLE_AREA", 10.0)
        assert not found()


def test_a_parasite_in_a_cell_cut_by_the_image_edge_is_shown_and_never_counted(classifier):
    """Train field PA171743: an infected cell cut by the right edge. It is not a whole cell (not counted, as the
    annotators' convention and a microscopist's), but it is classified and shown for review."""
    if not (IML / "annotations.json").is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    from malaria_edge.edge_runtime import segment
    from malaria_edge.edge_runtime.fields import edge_threshold
    box = (1224, 342, 56, 90)
    result = classifier.classify_field(IML / "images" / "PA171743.JPG")
    shown = [c for c in result.edge_cells if iou(c.box, box) >= 0.5]
    assert len(shown) == 1 and shown[0].at_edge and shown[0].prob_parasitized >= edge_threshold(classifier)
    assert all(iou(c.box, box) < 0.5 for c in result.cells) and shown[0].index > result.n_cells
    assert all(c.prob_parasitized >= edge_threshold(classifier) for c in result.edge_cells)
    rows = result.to_rows()
    assert len(rows) == result.n_cells + len(result.edge_cells)
    assert [r["cell"] for r in rows if r["at_edge"] == 1] == [c.index for c in result.edge_cells]
    assert "cut by the image edge" in result.caption() and result.summary()["cells"] == result.n_cells
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment, "EDGE_CELL_AREA", 100.0)
        assert classifier.classify_field(IML / "images" / "PA171743.JPG").edge_cells == []


def test_a_cut_neighbour_shared_out_to_a_whole_cell_is_given_back_to_the_edge():
    import cv2
    from malaria_edge.edge_runtime.segment import detach_beyond_circles
    labels = np.zeros((80, 120), np.int32)
    cv2.circle(labels, (60, 40), 20, 1, -1)
    labels[30:50, 60:120] = 1  # the part of a cell cut by the right edge, given to the whole cell by the split
    cell_circles = np.array([[60.0, 40.0, 20.0]], np.float32)
    kept = detach_beyond_circles(labels.copy(), cell_circles, 40.0, drop_border=False)
    assert np.array_equal(kept, labels), "cells cut by the edge are kept (single-cell crops): nothing to give back"
    given_back = detach_beyond_circles(labels.copy(), cell_circles, 40.0, drop_border=True)
    whole = np.argwhere(given_back == 1)
    assert whole[:, 1].max() < 119 and set(np.unique(given_back)) == {0, 1, 2}
    assert np.count_nonzero(given_back == 2) > 0 and np.all(given_back[30:50, 119] == 2)


def test_without_opencv_nih_crops_still_classify_and_fields_say_what_to_install(monkeypatch):
    from malaria_edge.edge_runtime import segment
    from malaria_edge.edge_runtime.images import ImageError, prepare_cell
    cell = next((SAMPLES / "Uninfected").glob("*.webp"))
    with_cv2 = prepare_cell(cell, 48)
    monkeypatch.setattr(segment, "cv2", None)
    assert np.abs(prepare_cell(cell, 48).astype(int) - with_cv2.astype(int)).mean() < 3.0
    with pytest.raises(ImageError, match="pip install"):
        prepare_cell(FIELDS / "nih_field_sparse.jpg", 48)
    with pytest.raises(ImageError, match="no cell"):
        prepare_cell(np.zeros((100, 100, 3), np.uint8), 48)


def test_a_close_up_of_one_cell_larger_than_a_crop_is_classified_as_a_cell(tmp_path):
    """An NIH cell (masked on black) enlarged to 500x500 is over the single-cell size, but it is one cell: auto
    gives it the same call as --input-kind cell, never a 'field' of fragments or 'no red cells found'."""
    from PIL import Image
    sample = sorted((Path(__file__).resolve().parents[1] / "edge_runtime" / "samples" / "Parasitized").iterdir())[0]
    close_up = tmp_path / "close_up.png"
    Image.open(sample).convert("RGB").resize((500, 500), Image.BICUBIC).save(close_up)
    auto = cli("edge-classify", close_up, check=True).stdout.splitlines()
    as_cell = cli("edge-classify", close_up, "--input-kind", "cell", check=True).stdout.splitlines()
    assert len(auto) == 2 and auto[1].split(",")[1] == ""      # one row, no cell index: a cell, not a field
    assert auto[1].split(",")[6:8] == as_cell[1].split(",")[6:8]


def iml_rgb(name: str) -> np.ndarray:
    path = IML / "images" / name
    if not path.is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    return rgb_of(path)


def parasitized_of_crops(classifier, crops, turns: int) -> int:
    pixels = np.stack([classifier.prepare_crop(np.ascontiguousarray(np.rot90(c, turns))) for c in crops])
    return sum(classifier.decide(float(p)) == "parasitized" for p in classifier.probabilities(pixels)[0])


# Rotation (defect 13), measured on 12 IML fields at 0/90/180/270 degrees (docs/experiments.md): the count of a
# turned field differs from the same cells' crops turned by at most 4 (segmentation: OpenCV's Hough circles are
# not rotation-equivariant, 85-90% of circles found again); the crops' own spread is the model's.
ROTATION_SEGMENTATION_TOLERANCE = 4


@pytest.mark.parametrize("name", ["PA171694.JPG", "PA171692.JPG"])
def test_a_field_turned_by_quarter_turns_keeps_its_cells_and_moves_its_calls_only_by_the_model_s_spread(
        classifier, name):
    """Defect 13: PA171694 turned 90 degrees gave 16 parasitized where it gave 9. Measured on crops, the model
    itself calls 9, 17, 12, 10 of the same 157 cells turned 0/90/180/270 degrees: the model's own rotation
    sensitivity on this field's many borderline cells (probabilities 0.2-0.6). The bound: cells within 3%, and the
    parasitized count within the crops' spread plus segmentation's share."""
    from malaria_edge.edge_runtime.fields import classify_field_pixels
    rgb = iml_rgb(name)
    base = classify_field_pixels(classifier, rgb)
    crops = [cut_cell(rgb, cell.region) for cell in base.cells]
    spread = np.ptp([parasitized_of_crops(classifier, crops, k) for k in range(4)])
    for turns in (1, 2, 3):
        turned = classify_field_pixels(classifier, np.ascontiguousarray(np.rot90(rgb, turns)))
        assert abs(turned.n_cells - base.n_cells) <= 0.03 * base.n_cells, (turns, turned.n_cells, base.n_cells)
        moved = abs(turned.n_parasitized - base.n_parasitized)
        assert moved <= spread + ROTATION_SEGMENTATION_TOLERANCE, (turns, turned.n_parasitized, base.n_parasitized)


@pytest.fixture(scope="module")
def mosaic_counts(classifier):
    """The four fields PA171690-93 alone (summed), as a 2x2 mosaic and that mosaic at 1280x960."""
    import cv2
    from malaria_edge.edge_runtime.fields import classify_field_pixels
    fields = [iml_rgb(f"PA17169{i}.JPG") for i in range(4)]
    alone = [classify_field_pixels(classifier, f, keep_image=False) for f in fields]
    whole = np.vstack([np.hstack(fields[:2]), np.hstack(fields[2:])])
    half = cv2.resize(whole, (1280, 960), interpolation=cv2.INTER_AREA)
    mosaics = [classify_field_pixels(classifier, m, keep_image=False) for m in (whole, half)]
    return (sum(r.n_cells for r in alone), sum(r.n_parasitized for r in alone),
            [(m.n_cells, m.n_parasitized) for m in mosaics])


def test_a_2x2_mosaic_finds_the_four_fields_cells_within_5_percent(mosaic_counts):
    cells, _, mosaics = mosaic_counts
    for found, _ in mosaics:
        assert abs(found / cells - 1) <= 0.05, (found, cells)


def test_a_2x2_mosaic_calls_the_four_fields_parasites_within_2(mosaic_counts):
    _, parasitized, mosaics = mosaic_counts
    for _, found in mosaics:
        assert abs(found - parasitized) <= 2, (found, parasitized)
