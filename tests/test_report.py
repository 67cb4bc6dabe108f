"""The one-file report: the numbers are the slide's JSON, overlays and gallery numbered like the rows, nothing
fetched from anywhere, and it really opens in a browser."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from malaria_edge.edge_runtime.overlay import SKY_BLUE, VERMILLION, draw_overlay, overlay_caption, ranks_for_field
from malaria_edge.edge_runtime.report import DISCLAIMER, SlidePage, fill, model_identity, render_report
from malaria_edge.edge_runtime.slide import JSON_KEYS, assess_slide
from malaria_edge.edge_runtime.version import __version__

pytest.importorskip("cv2", reason="slides of whole fields need OpenCV (the [fields] extra)")

CHROMIUM = Path("/usr/bin/chromium")


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(sample_slide):
    clf, fields, rows, rule = sample_slide
    result = assess_slide(rows, rule, name="sample slide", unfamiliar_limits=clf.unfamiliar_limits)
    name, sha = model_identity(clf)
    html = render_report([SlidePage(result, fields)], name, sha, date="2025-06-07")
    return html, result, fields, sha


def test_numbers_in_the_report_are_the_slide_json(report):
    html, result, _, _ = report
    p = Collect()
    p.feed(html)
    section = next(a for t, a in p.tags if t == "section")
    assert json.loads(section["data-json"]) == result.to_json()
    shown = {a["data-key"]: a["data-value"] for t, a in p.tags if "data-key" in a}
    j = result.to_json()
    assert set(shown) == set(JSON_KEYS)
    assert int(shown["cells"]) == j["cells"] and int(shown["candidates"]) == j["candidates"]
    for key in ("parasitemia", "parasites_per_ul", "detection_limit"):
        assert float(shown[key]) == j[key]
    assert json.loads(shown["parasitemia_ci"]) == j["parasitemia_ci"]
    assert shown["call"] == j["call"] and shown["reviewed"] == "false"


def test_the_report_is_self_contained_and_says_what_it_is(report):
    html, _, _, sha = report
    p = Collect()
    p.feed(html)
    for tag, attrs in p.tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith("data:"), (tag, attrs[key][:40])
        assert tag != "script"
    assert "http://" not in html and "https://" not in html
    assert DISCLAIMER in html and __version__ in html and sha[:12] in html and "2025-06-07" in html


def test_gallery_and_overlays_are_numbered_like_the_rows(report):
    html, result, fields, _ = report
    p = Collect()
    p.feed(html)
    gallery = [a for t, a in p.tags if t == "figure" and "data-rank" in a]
    assert [int(a["data-rank"]) for a in gallery] == [r["rank"] for r in result.candidate_list]
    for a, row in zip(gallery, result.candidate_list):
        assert a["data-field"] == row["path"] and int(a["data-cell"]) == row["cell"]
    overlays = [a for t, a in p.tags if t == "figure" and a.get("class") == "overlay"]
    assert [a["data-field"] for a in overlays] == [f.source for f in fields]
    for f in fields:
        assert f"{Path(f.source).name}: " in html


def test_overlay_is_colour_blind_safe_and_marks_candidates(report):
    _, result, fields, _ = report
    f = next(f for f in fields if ranks_for_field(f, result.candidate_list))
    ranks = ranks_for_field(f, result.candidate_list)
    img = draw_overlay(f, ranks)
    band = img.shape[0] - f.image.shape[0]
    body = img[band:]
    for c in f.cells:
        x, y, w, h = c.box
        patch = body[max(0, y - 4):y + h + 4, max(0, x - 4):x + w + 4].reshape(-1, 3)
        colour = VERMILLION if c.index in ranks else SKY_BLUE
        assert (np.abs(patch.astype(int) - colour).sum(axis=1) == 0).any(), (c.index, colour)
    # No pure red or pure green outlines anywhere.
    flat = img.reshape(-1, 3).astype(int)
    assert not ((flat == (230, 30, 30)).all(axis=1).any() or (flat == (40, 200, 60)).all(axis=1).any())


def test_the_overlay_caption_counts_in_words_that_agree(report):
    _, result, fields, _ = report
    f = next(f for f in fields if ranks_for_field(f, result.candidate_list))
    ranks = ranks_for_field(f, result.candidate_list)
    one = {next(c.index for c in f.cells if c.index in ranks): 1}
    assert overlay_caption(f, one).endswith(f"{len(f.cells)} cells, 1 candidate")
    assert overlay_caption(f, {}).endswith(" 0 candidates")
    assert overlay_caption(f, ranks).startswith(f"{Path(f.source).name}: ")


def test_template_fills_sections_and_escapes():
    t = "{{#xs}}<i>{{.}}</i>{{/xs}}{{^ys}}none{{/ys}}{{a.b}}{{#xs.length}}!{{/xs.length}}"
    assert fill(t, {"xs": ["<1>", "2"], "ys": [], "a": {"b": '"q"'}}) == "<i>&lt;1&gt;</i><i>2</i>none&quot;q&quot;!"


def _browser():
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Python playwright not installed (pip install playwright)")
    return sync_playwright


def test_report_opens_in_headless_chromium_offline(report, tmp_path):
    sync_playwright = _browser()
    html, result, _, _ = report
    page_file = tmp_path / "report.html"
    page_file.write_text(html, encoding="utf-8")
    requests = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            for width in (390, 1280):  # a phone, a laptop
                context = browser.new_context(offline=True, java_script_enabled=False,
                                              viewport={"width": width, "height": 900})
                page = context.new_page()
                page.on("request", lambda r: requests.append(r.url))
                page.goto(page_file.as_uri())
                assert page.inner_text("[data-key=call]") == result.call
                shot = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(
                    __import__("io").BytesIO(page.screenshot(full_page=True))).convert("L"))
                assert shot.std() > 10, "blank screenshot"
                imgs = page.query_selector_all("img")  # no JS on the page, and every picture laid out
                assert imgs and all(i.get_attribute("src").startswith("data:") for i in imgs)
                assert all((i.bounding_box() or {}).get("height", 0) > 20 for i in imgs)
                context.close()
        finally:
            browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


def test_the_report_says_what_the_model_learned_from_and_on_what_terms():
    from malaria_edge.edge_runtime import Classifier
    from malaria_edge.edge_runtime.report import render_report
    card = Classifier.load().bundle.card
    html = render_report([], "malaria_int8", "0" * 64, provenance=card.provenance)
    assert set(card.provenance) == {"NIH", "IML"}
    assert "public domain" in html and "no licence stated" in html and "research use" in html
