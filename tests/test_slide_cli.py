"""From fields to a slide result on the command line: edge-classify reads a slide with the card's slide rule, writes
the review folder and the report; edge-review recounts after the microscopist moved a crop. Real model, real
sample fields; the IML fields when the shared data is there."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli
from malaria_edge.edge_runtime.overlay import SKY_BLUE, VERMILLION
from malaria_edge.edge_runtime.slide import FOUND, JSON_KEYS, NONE_FOUND, REVIEW_NEEDED
from test_report import CHROMIUM, Collect, _browser

pytest.importorskip("cv2", reason="slides of whole fields need OpenCV (the [fields] extra)")

REPO = Path(__file__).resolve().parent.parent
FIELDS = REPO / "edge_runtime" / "sample_fields"
IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The three sample fields as one slide (their folder), with review folder, report and overlays."""
    out = tmp_path_factory.mktemp("slide")
    done = cli("edge-classify", FIELDS, "--group-by", "folder", "-o", out / "rows.csv", "--summary-json",
               out / "summary.json", "--review", out / "review", "--report", out / "report.html", "--overlays",
               out / "overlays", check=True)
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "rows.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return out, done, summary, rows


def test_a_field_group_is_exactly_the_slide_json_and_one_line(run):
    _, done, summary, _ = run
    (name, group), = summary["groups"].items()
    assert list(group) == list(JSON_KEYS) and group["reviewed"] is False
    assert group["cells"] == 67 and group["call"] in (FOUND, REVIEW_NEEDED)
    lo, hi = group["parasitemia_ci"]
    assert lo <= group["parasitemia"] <= hi and group["parasites_per_ul"] == pytest.approx(5e6 * group["parasitemia"])
    line = next(x for x in done.stderr.splitlines() if x.strip().startswith("slide "))
    assert f"{group['call']}; 67 cells, {group['candidates']} candidates" in line and "/µL" in line
    assert "detection limit" in line and "no call" not in done.stderr
    first = summary["slide_details"][name]["candidate_cells"][0]
    assert first["rank"] == 1 and first["at_edge"] is False and first["left_out"] is False


def test_slide_name_makes_all_inputs_one_slide(tmp_path):
    for sub in ("a", "b"):
        shutil.copytree(FIELDS, tmp_path / sub, ignore=shutil.ignore_patterns("*.json", "*.md"))
    done = cli("edge-classify", tmp_path / "a", tmp_path / "b", "--slide", "patient 12", "--rbc-per-ul", "4000000",
               "--summary-json", tmp_path / "s.json", "-o", tmp_path / "rows.csv", check=True)
    groups = json.loads((tmp_path / "s.json").read_text())["groups"]
    assert list(groups) == ["patient 12"] and groups["patient 12"]["cells"] == 2 * 67
    g = groups["patient 12"]
    assert g["parasites_per_ul"] == pytest.approx(4e6 * g["parasitemia"]) and "slide patient 12:" in done.stderr
    bad = cli("edge-classify", tmp_path / "a", "--slide", "x", "--group-by", "folder")
    assert bad.returncode == 2 and "--slide" in bad.stderr


def test_patient_groups_of_single_cells_keep_the_patient_rule(samples, tmp_path):
    cli("edge-classify", samples, "--group-by", "patient", "--summary-json", tmp_path / "s.json", check=True)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert all("fraction_ci95" in g for g in summary["groups"].values()) and "slide_details" not in summary


def test_review_then_edge_review_recounts_what_the_microscopist_moved(run, tmp_path):
    out, _, summary, _ = run
    review = tmp_path / "review"
    shutil.copytree(out / "review", review)
    (folder,) = [p for p in review.iterdir() if p.is_dir()]
    para = sorted((folder / "Parasitized").iterdir())
    (name, before), = summary["groups"].items()
    assert len(para) == before["candidates"] and (folder / "Uninfected").is_dir()
    shutil.move(para[0], folder / "Uninfected" / para[0].name)
    done = cli("edge-review", review, "--summary-json", tmp_path / "after.json", "--report", tmp_path / "after.html",
               check=True)
    after = json.loads((tmp_path / "after.json").read_text())["groups"][name]
    assert list(after) == list(JSON_KEYS) and after["reviewed"] is True
    detail = json.loads((tmp_path / "after.json").read_text())["slide_details"][name]
    assert detail["confirmed"] == before["candidates"] - 1 and after["call"] == FOUND
    assert "(reviewed)" in done.stderr and 'data-value="true"' in (tmp_path / "after.html").read_text()
    for p in (folder / "Parasitized").iterdir():
        shutil.move(p, folder / "Uninfected" / p.name)
    cli("edge-review", review, "--summary-json", tmp_path / "none.json", check=True)
    assert json.loads((tmp_path / "none.json").read_text())["groups"][name]["call"] == NONE_FOUND
    again = cli("edge-classify", FIELDS, "--group-by", "folder", "--review", review)
    assert again.returncode == 2 and "never overwritten" in again.stderr


def _report_tags(path: Path):
    p = Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p.tags


def test_report_figures_are_the_summary_json(run):
    out, _, summary, _ = run
    tags = _report_tags(out / "report.html")
    (name, group), = summary["groups"].items()
    section = next(a for t, a in tags if t == "section")
    assert section["data-slide"] == name and json.loads(section["data-json"]) == group
    shown = {a["data-key"]: a["data-value"] for t, a in tags if "data-key" in a}
    assert set(shown) == set(JSON_KEYS)
    assert int(shown["cells"]) == group["cells"] and int(shown["candidates"]) == group["candidates"]
    for key in ("parasitemia", "parasites_per_ul", "detection_limit"):
        assert float(shown[key]) == group[key]
    assert json.loads(shown["parasitemia_ci"]) == group["parasitemia_ci"] and shown["call"] == group["call"]
    text = (out / "report.html").read_text()
    assert summary["model"]["sha256"][:12] in text and summary["tool_version"] in text


def test_overlays_and_gallery_are_numbered_like_the_review_files_and_rows(run):
    out, _, summary, rows = run
    (name, _), = summary["groups"].items()
    cands = summary["slide_details"][name]["candidate_cells"]
    gallery = [a for t, a in _report_tags(out / "report.html") if t == "figure" and "data-rank" in a]
    assert [(int(a["data-rank"]), a["data-field"], int(a["data-cell"])) for a in gallery] == \
        [(c["rank"], c["path"], c["cell"]) for c in cands]
    files = sorted(p.name for p in next((out / "review").iterdir()).joinpath("Parasitized").iterdir())
    assert [(int(f[:3]), f.split("_cell")[1][:-4]) for f in files] == [(c["rank"], str(c["cell"])) for c in cands]
    for field in sorted(FIELDS.glob("*.jpg")):
        overlay = np.asarray(Image.open(out / "overlays" / f"{field.name}_overlay.png").convert("RGB")).astype(int)
        band = overlay.shape[0] - Image.open(field).height
        mine = {c["cell"] for c in cands if c["path"] == str(field)}
        for row in (r for r in rows if r["path"] == str(field)):
            x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
            patch = overlay[band + max(0, y - 4):band + y + h + 4, max(0, x - 4):x + w + 4].reshape(-1, 3)
            colour = VERMILLION if int(row["cell"]) in mine else SKY_BLUE
            assert (np.abs(patch - colour).sum(axis=1) == 0).any(), (field.name, row["cell"])


def test_the_report_opens_in_headless_chromium(run):
    sync_playwright = _browser()
    out, _, summary, _ = run
    (_, group), = summary["groups"].items()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                           "--disable-gpu"])
        try:
            page = browser.new_context(offline=True, java_script_enabled=False).new_page()
            page.goto((out / "report.html").as_uri())
            assert page.inner_text("[data-key=call]") == group["call"]
            assert all((i.bounding_box() or {}).get("height", 0) > 20 for i in page.query_selector_all("img"))
        finally:
            browser.close()


@pytest.mark.skipif(not (IML / "annotations.json").is_file(), reason="IML fields not in shared/data")
def test_a_slide_of_iml_fields(tmp_path):
    images = [IML / "images" / f"PA1718{n}.JPG" for n in range(42, 46)]
    cli("edge-classify", *images, "--slide", "PA171842-45", "--summary-json", tmp_path / "s.json", "--report",
        tmp_path / "r.html", check=True)
    g = json.loads((tmp_path / "s.json").read_text())["groups"]["PA171842-45"]
    assert list(g) == list(JSON_KEYS) and g["cells"] > 300 and g["call"] in (FOUND, REVIEW_NEEDED)
    assert g["parasitemia_ci"][1] < 0.1
