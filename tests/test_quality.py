"""The field quality gate: a field the tool cannot read never passes silently. Real images: the committed fields
composed from NIH cells, and IML fields from ../shared when present (degraded here on purpose)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2", reason="the quality gate needs OpenCV (the [fields] extra)")

from malaria_edge.edge_runtime.quality import assess_field, expected_diameter, measure_cell_diameter  # noqa: E402
from malaria_edge.edge_runtime.segment import segment_field  # noqa: E402
from conftest import REPO  # noqa: E402

FIELDS = REPO / "edge_runtime" / "sample_fields"
SAMPLE_NAMES = ["nih_field_sparse.jpg", "nih_field_touching.jpg", "nih_field_dense.jpg"]
IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax" / "images"
# The IML fields' cells are ~58 px (segmentation's equivalent diameter); blur sigmas are given in those pixels.
IML_DIAMETER = 58.0


def rgb_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def iml(name: str) -> np.ndarray:
    if not (IML / name).is_file():
        pytest.skip("../shared/data/fields/iml_vivax is absent (IML fields live outside the repo)")
    return rgb_of(IML / name)


def gate(rgb: np.ndarray, expected=None):
    diameter = measure_cell_diameter(rgb)
    regions = segment_field(rgb, diameter=diameter) if diameter else []
    return assess_field(rgb, regions, diameter, expected_diameter=expected)


def blurred(rgb: np.ndarray, sigma_at_iml_scale: float) -> np.ndarray:
    """A defocused copy: sigma given in IML field pixels, scaled to this image's cell size."""
    sigma = sigma_at_iml_scale * measure_cell_diameter(rgb) / IML_DIAMETER
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def exposed(rgb: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * factor, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_the_bundled_demo_fields_pass_the_gate(name):
    quality = gate(rgb_of(FIELDS / name))
    assert quality.ok, quality.messages


def test_a_sharp_well_lit_iml_field_passes_the_gate():
    quality = gate(iml("PA171690.JPG"))
    assert quality.ok, quality.messages
    assert quality.warnings == () and quality.messages == ()


def test_an_out_of_focus_field_is_flagged_and_says_to_refocus():
    """The adversarial trial: sigma 4 lost every parasite of PA171690 while the cell count stayed the same."""
    quality = gate(blurred(iml("PA171690.JPG"), 4))
    assert not quality.ok
    assert "out_of_focus" in quality.warnings
    assert any("refocus" in m for m in quality.messages)


@pytest.mark.parametrize("name", SAMPLE_NAMES[:1])
def test_an_out_of_focus_demo_field_is_flagged(name):
    assert "out_of_focus" in gate(blurred(rgb_of(FIELDS / name), 4)).warnings


def test_a_slightly_soft_field_is_not_refused():
    assert "out_of_focus" not in gate(blurred(iml("PA171690.JPG"), 1)).warnings


@pytest.mark.parametrize("source", ["nih_field_touching.jpg", "PA171690.JPG"])
def test_an_under_exposed_field_is_flagged_under_exposed(source):
    rgb = rgb_of(FIELDS / source) if source.startswith("nih") else iml(source)
    quality = gate(exposed(rgb, 0.35))
    assert "under_exposed" in quality.warnings, quality.metrics


@pytest.mark.parametrize("source", ["nih_field_touching.jpg", "PA171690.JPG"])
def test_an_over_exposed_field_is_flagged_over_exposed(source):
    rgb = rgb_of(FIELDS / source) if source.startswith("nih") else iml(source)
    quality = gate(exposed(rgb, 2.0))
    assert "over_exposed" in quality.warnings, quality.metrics


def test_a_mosaic_of_four_fields_is_measured_at_its_cells_size_not_a_clumps():
    """field_diameter said 137.6 px for this 2x2 mosaic (its circles ran on a copy where cells were 9 px)."""
    fields = [iml(f"PA17169{i}.JPG") for i in range(4)]
    truth = float(np.mean([measure_cell_diameter(f) for f in fields]))
    whole = np.vstack([np.hstack(fields[:2]), np.hstack(fields[2:])])
    assert abs(measure_cell_diameter(whole) / truth - 1) < 0.10
    half = cv2.resize(whole, (1280, 960), interpolation=cv2.INTER_AREA)
    assert abs(measure_cell_diameter(half) / (truth / 2) - 1) < 0.10


def test_a_mosaic_of_demo_fields_reduced_to_one_field_s_size_is_measured_right():
    """Always runs (committed images): a 3x3 mosaic of a demo field brought back to 1 field's width holds cells
    a third the size."""
    rgb = rgb_of(FIELDS / "nih_field_dense.jpg")
    truth = measure_cell_diameter(rgb)
    whole = np.vstack([np.hstack([rgb] * 3)] * 3)
    small = cv2.resize(whole, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
    assert abs(measure_cell_diameter(small) / (truth / 3) - 1) < 0.10


def test_a_field_far_from_its_slide_s_cell_size_is_flagged_cell_size():
    rgb = rgb_of(FIELDS / "nih_field_dense.jpg")
    slide = expected_diameter([measure_cell_diameter(rgb_of(FIELDS / n)) for n in SAMPLE_NAMES])
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    quality = gate(half, expected=slide)
    assert "cell_size" in quality.warnings
    assert gate(rgb, expected=slide).ok


def test_a_thick_smear_like_picture_is_flagged_not_counted():
    spec = importlib.util.spec_from_file_location("quality_calibration", REPO / "tools" / "quality_calibration.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in SAMPLE_NAMES[2:]:
        quality = gate(tool.thick_smear(rgb_of(FIELDS / name), seed=1))
        assert "thick_smear" in quality.warnings, quality.metrics


@pytest.mark.parametrize("size", [(64, 64), (600, 800)])
def test_an_empty_or_tiny_picture_is_flagged_too_few_cells(size):
    glass = np.full(size + (3,), 215, np.uint8)
    quality = gate(glass)
    assert "too_few_cells" in quality.warnings
    assert not quality.ok


@pytest.mark.parametrize("source", ["demo", "iml"])
def test_edge_classify_warns_on_each_blurred_field_and_leaves_its_slide_indeterminate(tmp_path, source):
    """End to end: fields blurred at sigma 4 (IML pixels) in one slide folder. Each field's summary is followed by
    its WARNING with the advice, its rows carry out_of_focus, no field reads as a clean "0 parasitized", and the
    slide is indeterminate because every field was left out, not because of a count."""
    import csv
    from conftest import cli
    if source == "demo":
        pictures = {name: rgb_of(FIELDS / name) for name in SAMPLE_NAMES}
    else:
        pictures = {name: iml(name) for name in ("PA171690.JPG", "PA171691.JPG")}
    slide = tmp_path / "slide"
    slide.mkdir()
    for name, rgb in pictures.items():
        Image.fromarray(blurred(rgb, 4)).save(slide / f"{Path(name).stem}.png")
    done = cli("edge-classify", slide, "--group-by", "folder", "-o", tmp_path / "rows.csv")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("field "):
            assert "WARNING: out of focus" in lines[i + 1] and "refocus" in lines[i + 1], line
    assert sum(line.strip().startswith("field ") for line in lines) == len(pictures)
    slide_line = next(line for line in lines if line.strip().startswith("slide "))
    assert "indeterminate" in slide_line and f"leaving out {len(pictures)} of {len(pictures)} fields" in slide_line
    with open(tmp_path / "rows.csv", newline="") as fh:
        assert all("out_of_focus" in row["warnings"] for row in csv.DictReader(fh))
