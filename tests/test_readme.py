"""The README tells the truth: its pasted demo output is what a fresh demo prints (counts, calls, accuracy), and it
names no issue numbers and no machine's folders."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_readme_demo.py"
README = REPO / "README.md"


def load_check():
    spec = importlib.util.spec_from_file_location("check_readme_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_demo_output_matches_a_fresh_demo_run():
    pytest.importorskip("cv2", reason="the demo's whole fields need OpenCV: pip install 'malaria-edge[fields]'")
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


FRESH = """$ edge-classify edge_runtime/samples --compare
    model: /somewhere/site-packages/malaria_edge/edge_runtime/models/malaria_int8.tflite (int8, 288 KiB) on ai_edge_litert 2.3.0, threads=default
           41 cells: 19 parasitized, 0 review; latency p50 0.231 ms, p95 0.236 ms per cell; on 41 labelled cells
  against the full model: agreement 97.56%, max |dp| 0.0654, speed ratio (full p50 / this p50) 2.21x

group                        call           cells parasit. review  fraction          95% CI    truth
7                            indeterminate      6        0      0      0.0%       0.0-39.0%  healthy
  0/4 infected patients called positive, 0/2 healthy patients called negative"""


def test_the_demo_check_ignores_timings_paths_and_trimmed_lines():
    check = load_check()
    fresh = check.display("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n" + FRESH)
    pasted = [line.replace("0.231 ms", "0.250 ms").replace("2.21x", "1.83x") for line in fresh
              if not line.lstrip().startswith("model:")]
    assert not check.compare(pasted, fresh, strict=False)
    assert "    model: edge_runtime/models/malaria_int8.tflite (int8, 288 KiB)" in "\n".join(fresh)


def test_the_demo_check_catches_a_changed_count_or_a_missing_group():
    check = load_check()
    fresh = check.display(FRESH)
    changed = [line.replace("19 parasitized", "20 parasitized") for line in fresh]
    assert check.compare(changed, fresh, strict=False)
    missing = [line for line in fresh if not line.startswith("7 ")]
    assert check.compare(missing, fresh, strict=False)


def test_the_readme_names_no_issue_numbers():
    assert not re.findall(r"(?<![\w&])#\d+\b", README.read_text(encoding="utf-8"))


def test_every_docs_link_in_the_readme_exists():
    text = README.read_text(encoding="utf-8")
    targets = {t.split("#")[0] for t in re.findall(r"\]\(((?:docs|edge_runtime|scripts|tools)/[^)\s]+)\)", text)}
    assert targets, "the README links to its docs"
    missing = sorted(t for t in targets if not (REPO / t).exists())
    assert not missing, missing


def test_the_strict_demo_check_lets_readme_leave_lines_out_but_not_change_them():
    check = load_check()
    fresh = check.display(FRESH)
    assert not check.compare([line for line in fresh if "model:" not in line or "full" in line], fresh, strict=True)
    changed = [line.replace("288 KiB", "300 KiB") for line in fresh]
    assert check.compare(changed, fresh, strict=True)
    assert not check.compare(changed, fresh, strict=False)
