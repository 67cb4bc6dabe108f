"""What every released tool has, for edge-classify (device layer, real bundled model and sample images): its
version, a quiet mode, the tool version in the summary JSON, no runtime chatter on the terminal, rows made by one
``to_row`` per result type, and a house a newcomer can read (short functions, one name per meaning)."""
import ast
import csv
import json
import os
import re

import pytest

from conftest import REPO, cli

EDGE_RUNTIME = REPO / "edge_runtime"
FIELDS = EDGE_RUNTIME / "sample_fields"
XNNPACK_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
SUMMARY_STARTS = ("    model:", "           ", "   images:", "group ")


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_version_prints_the_tool_version():
    from malaria_edge.edge_runtime.version import __version__
    for flag in ("--version", "-V"):
        done = cli("edge-classify", flag, check=True)
        assert __version__ in done.stdout and "malaria-edge" in done.stdout


def test_quiet_hides_the_summary_but_not_warnings(bundled_model, samples, tmp_path):
    done = cli("edge-classify", samples, tmp_path / "typo", "--model", bundled_model, "-o", tmp_path / "rows.csv",
               "--group-by", "patient", "-q")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert not [line for line in lines if line.startswith(SUMMARY_STARTS)], done.stderr
    assert any("typo" in line and line.startswith("edge-classify:") for line in lines), done.stderr
    assert len(rows_of(tmp_path / "rows.csv")) == len(list(samples.rglob("*.webp")))


def test_verbose_says_which_model_loaded_on_which_backend(bundled_model, samples, tmp_path):
    done = cli("edge-classify", samples, "--model", bundled_model, "-o", tmp_path / "rows.csv", "-v", check=True)
    assert re.search(r"^model .*malaria_int8\.tflite .* loaded on \S+ \S+ in \d+ ms$", done.stderr, re.M), done.stderr
    assert "   images:" in done.stderr


def test_summary_json_carries_the_tool_version(bundled_model, samples, tmp_path):
    from malaria_edge.edge_runtime.version import __version__
    summary = tmp_path / "summary.json"
    cli("edge-classify", samples, "--model", bundled_model, "-o", tmp_path / "rows.csv", "--summary-json", summary,
        check=True)
    assert json.loads(summary.read_text())["tool_version"] == __version__


def test_the_runtime_delegate_line_never_reaches_the_terminal_but_warnings_do(bundled_model, samples, tmp_path):
    done = cli("edge-classify", samples, tmp_path / "typo", "--model", bundled_model, "--compare",
               "-o", tmp_path / "rows.csv", env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert XNNPACK_LINE not in done.stderr
    assert "XNNPACK" not in done.stderr
    assert any(line.startswith("edge-classify:") and "typo" in line for line in done.stderr.splitlines())
    assert "   images:" in done.stderr


def test_other_native_stderr_lines_are_passed_on(capfd):
    from malaria_edge.edge_runtime.backend import native_stderr_filtered
    with native_stderr_filtered():
        os.write(2, (XNNPACK_LINE + "\nERROR: a real runtime problem\n").encode())
    err = capfd.readouterr().err
    assert "ERROR: a real runtime problem" in err and XNNPACK_LINE not in err


def test_a_single_cell_row_is_its_columns(bundled_model, samples, tmp_path):
    """Prediction.to_row gives exactly the row edge-classify writes for that image (same keys, same rounding)."""
    from malaria_edge.edge_runtime import Classifier
    from malaria_edge.edge_runtime.results_io import CELL_COLUMNS, REFERENCE_COLUMNS
    image = sorted((samples / "Parasitized").glob("*.webp"))[0]
    out = tmp_path / "rows.csv"
    cli("edge-classify", image, "--model", bundled_model, "--compare", "-o", out, check=True)
    written = rows_of(out)[0]
    clf = Classifier.load(bundled_model)
    full = Classifier.load(clf.bundle.reference_path())
    row = clf.predict(str(image))[0].to_row(reference=full.predict(str(image))[0])
    field_only = {"cell", "x", "y", "w", "h", "at_edge", "warnings", "error"}
    assert set(row) | field_only == set(CELL_COLUMNS + REFERENCE_COLUMNS)
    assert row["unfamiliar"] is not None and row["true_label"] == "parasitized"
    for key, value in row.items():
        if key not in ("latency_ms", "ref_latency_ms"):
            assert written[key] == ("" if value is None else str(value)), key


def test_a_field_cell_row_is_its_columns(bundled_model, tmp_path):
    """FieldCell.to_row (through FieldResult.to_rows) gives exactly the rows edge-classify writes for a field."""
    pytest.importorskip("cv2", reason="whole fields need OpenCV (the [fields] extra)")
    from malaria_edge.edge_runtime import Classifier
    from malaria_edge.edge_runtime.results_io import CELL_COLUMNS
    field = FIELDS / "nih_field_sparse.jpg"
    out = tmp_path / "rows.csv"
    cli("edge-classify", field, "--model", bundled_model, "-o", out, check=True)
    written = rows_of(out)
    rows = Classifier.load(bundled_model).classify_field(field).to_rows()
    assert len(rows) == len(written) > 1
    assert set(rows[0]) | {"error"} == set(CELL_COLUMNS)
    for row, line in zip(rows, written):
        for key, value in row.items():
            if key != "latency_ms":
                assert line[key] == ("" if value is None else str(value)), key


def test_errors_share_one_base_with_their_exit_codes():
    from malaria_edge.edge_runtime.backend import BackendError
    from malaria_edge.edge_runtime.bundle import ModelError
    from malaria_edge.edge_runtime.errors import MalariaEdgeError
    from malaria_edge.edge_runtime.images import ImageError
    from malaria_edge.edge_runtime.results_io import OutputError
    from malaria_edge.edge_runtime.segment import SegmentationUnavailable
    for error, old_base in ((ImageError, ValueError), (ModelError, RuntimeError), (BackendError, RuntimeError),
                            (OutputError, Exception), (SegmentationUnavailable, RuntimeError)):
        assert issubclass(error, MalariaEdgeError) and issubclass(error, old_base)
    assert ModelError("x").exit_code == 1 and BackendError("x").exit_code == 1
    assert OutputError("x").exit_code == 2 and OutputError("x", exit_code=1).exit_code == 1


def test_undefined_figures_print_n_a():
    from malaria_edge.edge_runtime.metrics import figure, pct
    assert pct(None) == "n/a" and pct(float("nan")) == "n/a" and pct(0.0) == "0.00%"
    assert figure(float("nan"), ".3f") == "n/a" and figure(1.5, ".2f") == "1.50"


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_in_the_device_side_is_over_60_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(EDGE_RUNTIME.glob("*.py")) for node in _functions(path)
            if node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_no_module_imports_the_cli():
    offenders = []
    for path in sorted(EDGE_RUNTIME.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [])
            if any(name == "cli" or name.endswith(".cli") for name in names):
                offenders.append(path.name)
    assert not offenders, offenders


def test_old_names_are_gone_from_the_device_side():
    """One meaning per word: the unfamiliar threshold is chosen by choose_unfamiliar_threshold, the foreground
    limit is defined once, and fields.classify_field_pixels is not mistaken for Classifier.classify_field."""
    text = {path.name: path.read_text() for path in EDGE_RUNTIME.glob("*.py")}
    assert not [name for name, t in text.items() if re.search(r"\bchoose_threshold\b", t)]
    assert [name for name, t in text.items() if re.search(r"^FOREGROUND_MIN_SUM\s*=", t, re.M)] == ["images.py"]
    assert not [name for name, t in text.items() if re.search(r"^def classify_field\(", t, re.M)]
    from malaria_edge.edge_runtime.unfamiliar import choose_unfamiliar_threshold
    assert choose_unfamiliar_threshold([1.0, 2.0, 3.0], 0.5) == pytest.approx(2.0)
