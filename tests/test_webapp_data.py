"""The page and the Python side read one set of numbers: webapp/constants.json is what webapp_data.constants()
writes from the Python modules and the card (regenerate: python -m malaria_edge.edge_runtime.webapp_data), and the
JS unit tests (web/test, `node --test`) pass. No browser needed."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from malaria_edge.edge_runtime import quality, report, results_io, segment, slide
from malaria_edge.edge_runtime.webapp_data import CONSTANTS_FILE, constants

REPO = Path(__file__).resolve().parent.parent


def test_constants_json_is_what_python_says():
    assert json.loads(CONSTANTS_FILE.read_text()) == json.loads(json.dumps(constants())), (
        "edge_runtime/webapp/constants.json is stale: python -m malaria_edge.edge_runtime.webapp_data")


def test_constants_hold_the_numbers_the_page_uses():
    c = json.loads(CONSTANTS_FILE.read_text())
    assert c["segment"]["WORK_DIAMETER"] == segment.WORK_DIAMETER
    assert c["segment"]["CIRCLE_RADII"] == list(segment.CIRCLE_RADII)
    assert c["quality"]["FOCUS_MAX_BLUR"] == quality.FOCUS_MAX_BLUR
    assert c["quality"]["MESSAGES"] == quality.MESSAGES
    assert c["results_io"]["CELL_COLUMNS"] == list(results_io.CELL_COLUMNS)
    assert c["slide"]["CALLS"] == list(slide.CALLS)
    assert c["report"]["TEMPLATE"] == report.TEMPLATE


def test_the_phone_model_is_in_the_card_with_its_digest():
    card = json.loads((REPO / "edge_runtime" / "models" / "malaria.json").read_text())
    c = json.loads(CONSTANTS_FILE.read_text())
    assert card["files"][c["model"]["file"]]["sha256"] == c["model"]["sha256"]
    assert card["files"][c["model"]["file"]]["batch"] == 1


def test_js_unit_tests_pass():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs)")
    if not (REPO / "web" / "node_modules" / "@techstark" / "opencv-js").is_dir():
        pytest.skip("npm ci has not run in web/ (make webapp)")
    done = subprocess.run([node, "--test", "test/"], cwd=REPO / "web", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
