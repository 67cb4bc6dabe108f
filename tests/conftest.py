"""Shared fixtures: real sample cells, the shared NIH copy when present, and a tiny real model trained once per
session on the samples (about 30 s) and quantized into a real bundle."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "edge_runtime" / "samples"
SHARED_DATA = REPO.parent / "shared" / "data" / "cell_images"
BIN = Path(sys.executable).parent


def cli(name: str, *args, check: bool = False, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run one of our console scripts from the test environment, capturing output."""
    exe = BIN / name
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", _MODULES[name]]
    done = subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def interrupt_when(name: str, *args, line_starts: str, timeout: int = 300, sig: int = signal.SIGINT) -> tuple:
    """Start a console script, send Ctrl-C (SIGINT; or ``sig``) once it prints a stderr line starting with
    ``line_starts``, and return (exit status, the rest of its stderr). A shell without job control starts background jobs with SIGINT
    ignored; a user's Ctrl-C reaches a foreground process, so the child gets the default handler back."""
    proc = subprocess.Popen([str(BIN / name)] + [str(a) for a in args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    for line in proc.stderr:
        if line.startswith(line_starts):
            break
        assert time.time() < deadline, f"{name} never printed a line starting {line_starts!r}"
    proc.send_signal(sig)
    rest = proc.stderr.read()
    return proc.wait(timeout=timeout), rest


_MODULES = {"edge-classify": "malaria_edge.edge_runtime.cli", "edge-bench": "malaria_edge.benchmarks.cli"}


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "Parasitized").is_dir():
        pytest.skip("../shared/data/cell_images is absent (the NIH copy lives outside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_manifest(tmp_path_factory) -> Path:
    """The samples split by patient (6 patients, so larger fractions than the default to fill every split)."""
    from malaria_edge.train.dataset import prepare
    out = tmp_path_factory.mktemp("data")
    prepare(SAMPLES, out, seed=42, test_fraction=0.34, val_fraction=0.34, log=lambda m: None)
    return out / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_run(sample_manifest, tmp_path_factory) -> Path:
    """A tiny real ResNet trained on the samples' training patients, without stain normalisation (dropped: no
    measurable gain, and a phone's standard client cannot do it), so its bundle is phone-ready."""
    from malaria_edge.train.train import train
    out = tmp_path_factory.mktemp("tiny_run")
    train(sample_manifest, out, "tiny", epochs=30, learning_rate=0.01, no_stain=True, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, sample_manifest, tmp_path_factory) -> Path:
    """fp32 + int8 TFLite files and card of the tiny model; returns the int8 path."""
    from malaria_edge.quantize.job import quantize
    out = tmp_path_factory.mktemp("bundle")
    quantize(tiny_run / "model.keras", sample_manifest, out, name="tiny", calibration_size=40, log=lambda m: None)
    return out / "tiny_int8.tflite"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The default int8 model shipped inside the package (device layer: no TensorFlow needed)."""
    from malaria_edge.edge_runtime.bundle import DEFAULT_MODEL
    return DEFAULT_MODEL


@pytest.fixture()
def bundle_copy(bundled_model, tmp_path) -> Path:
    """A private copy of the bundled model (its tflite files and card) that a test may damage."""
    for f in bundled_model.parent.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    return tmp_path / bundled_model.name


# Tests that train or quantize need TensorFlow: they are the `train` layer. A device-only install runs
# `pytest -m "not train"`. Marked by module (pytestmark) or, here, by the fixtures that need TensorFlow.
TRAIN_FIXTURES = {"tiny_run", "tiny_bundle"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAIN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.train)


@pytest.fixture(scope="session")
def sample_slide():
    """The three bundled sample fields read by the bundled model as one slide: (classifier, fields, their cell rows,
    the card's measured slide rule with min_cells lowered to 20 so 67 sample cells make a readable slide)."""
    import json
    from malaria_edge.edge_runtime import Classifier
    from malaria_edge.edge_runtime.slide import SlideRule
    clf = Classifier.load(threads=1)
    fields = [clf.classify_field(p) for p in sorted((REPO / "edge_runtime" / "sample_fields").glob("*.jpg"))]
    rows = [{"path": f.source, "cell": c.index, "box": list(c.box), "prob_parasitized": c.prob_parasitized,
             "prediction": c.prediction} for f in fields for c in f.cells]
    rule = SlideRule.from_dict({**json.loads((REPO / "docs" / "slide_rule.json").read_text()), "min_cells": 20})
    return clf, fields, rows, rule


def two_lab_manifest(sample_manifest: Path, tmp_path: Path, sources=("NIH", "LAB2")):
    """The samples as two labs: NIH split by patient, and the same images again as a second source, LAB2, whose
    patients are its groups (a stand-in for another lab: every cell real, the source label is what matters here).
    ``sources`` picks which of the two the manifest holds. Returns (manifest, LAB2 cells, LAB2 groups)."""
    from dataclasses import replace

    from malaria_edge.edge_runtime.manifest import read_manifest, write_manifest
    cells = read_manifest(sample_manifest)
    second = [replace(c, source="LAB2", patient=f"F{c.patient}") for c in cells]
    path = tmp_path / "_".join(sources) / "manifest.csv"
    path.parent.mkdir()
    write_manifest((cells if "NIH" in sources else []) + (second if "LAB2" in sources else []), path)
    return path, len(second), len({c.patient for c in second})
