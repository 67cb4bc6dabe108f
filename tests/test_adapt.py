"""edge-adapt on real cells with the tiny real model: a bundle that edge-classify uses, a card that records the
adaptation, refusals in one line, and no half-written bundle after Ctrl-C."""
import json
import os
import shutil
import subprocess

import pytest

from malaria_edge.edge_runtime.bundle import sha256_file
from conftest import cli, interrupt_when

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def adapted(tiny_bundle, samples, sample_manifest, tmp_path_factory):
    """A real adaptation of the tiny bundle to the sample cells (through the Python twin)."""
    import malaria_edge
    out = tmp_path_factory.mktemp("adapted") / "clinic"
    from malaria_edge.train.adapt import Recipe
    logged = []
    result = malaria_edge.adapt(samples, out, model=tiny_bundle.parent, replay=sample_manifest, name="clinic",
                                recipe=Recipe(epochs=2, replay_cells=40), min_cells=10, log=logged.append)
    return result, logged


def test_adapted_bundle_is_complete_and_classifies(adapted, samples, tmp_path):
    result, logged = adapted
    assert sorted(p.name for p in result.out.iterdir()) == ["clinic.json", "clinic.keras", "clinic_fp32.tflite",
                                                            "clinic_int8.tflite"]
    epochs = [line for line in logged if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"] and all("loss" in line for line in epochs)
    done = cli("edge-classify", samples, "--model", result.int8_path, "--output", tmp_path / "rows.csv")
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "rows.csv").read_text().splitlines()
    assert len(rows) == 1 + 41 and "clinic_int8.tflite" in done.stderr


def test_card_records_the_adaptation(adapted, tiny_bundle, samples):
    result, _ = adapted
    card = json.loads(result.card_path.read_text())
    a = card["adaptation"]
    assert a["base_model"]["sha256"] == sha256_file(tiny_bundle)
    assert a["cells"]["parasitized"] == len(list((samples / "Parasitized").iterdir()))
    assert a["cells"]["uninfected"] == len(list((samples / "Uninfected").iterdir()))
    assert len(a["cells"]["list_sha256"]) == 64
    held = a["held_out"]
    assert held["unit"] == "patients" and a["cells"]["held_out"]["parasitized"] >= 3
    for key in ("before", "after"):
        assert 0.0 <= held[key]["metrics"]["roc_auc"] <= 1.0
        assert set(held[key]["ci95"]) >= {"sensitivity", "specificity"} and held[key]["unit"] == "patients"
    assert 0 < card["threshold"] < 1 and card["patient_rule"]["min_fraction"] > 0
    assert a["old_lab_test"]["cells"] > 0 and 0 < a["replay"]["cells"] <= 40
    assert card["keras_model"]["sha256"] == sha256_file(result.keras_path)
    for name, info in card["files"].items():
        assert info["sha256"] == sha256_file(result.out / name)
    u = a["unfamiliar"]
    assert u["refitted"] and u["clinic_cells"] == sum(a["cells"]["fine_tuned"].values())
    sources = [c["source"] for c in card["unfamiliar"]["statistics"]["components"]]
    assert sources[-1] == "clinic" and len(sources) >= 2


def test_an_adapted_bundle_adapts_again_from_its_own_keras_weights(adapted, samples, tmp_path):
    """The same list of cells gives the same list hash, and the adapted bundle is itself a valid base."""
    result, _ = adapted
    from malaria_edge.train.adapt import find_base
    base = find_base(result.out)
    assert base.keras_path == result.keras_path and base.int8_path == result.int8_path


def test_too_few_cells_is_refused_with_the_minimum_and_why(tiny_bundle, samples, tmp_path):
    done = cli("edge-adapt", "--cells", samples, "--out", tmp_path / "out", "--model", tiny_bundle.parent)
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert "at least 30 per class" in line and "held out" in line and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_images_are_listed_and_skipped(tiny_bundle, samples, tmp_path):
    cells = tmp_path / "cells"
    shutil.copytree(samples, cells)
    (cells / "Parasitized" / "broken.png").write_bytes(b"\x89PNG not really")
    (cells / "Uninfected" / "empty.jpg").write_bytes(b"")
    from malaria_edge.train.adapt import read_clinic_cells
    clinic = read_clinic_cells(cells, 32, None)
    failed = {os.path.basename(p): reason for p, reason in clinic.failed}
    assert set(failed) == {"broken.png", "empty.jpg"} and "empty" in failed["empty.jpg"]
    assert len(clinic.paths) == 41
    done = cli("edge-adapt", "--cells", cells, "--out", tmp_path / "out", "--model", tiny_bundle.parent)
    assert "broken.png" in done.stderr and "empty.jpg" in done.stderr


def test_a_model_that_is_not_a_bundle_is_refused(tmp_path, samples, tiny_bundle):
    not_bundle = tmp_path / "folder"
    not_bundle.mkdir()
    done = cli("edge-adapt", "--cells", samples, "--out", tmp_path / "out", "--model", not_bundle)
    assert done.returncode == 2 and "not a model bundle" in done.stderr and "Traceback" not in done.stderr
    no_keras = tmp_path / "no_keras"
    shutil.copytree(tiny_bundle.parent, no_keras)
    (no_keras / "tiny.keras").unlink()
    done = cli("edge-adapt", "--cells", samples, "--out", tmp_path / "out", "--model", no_keras / "tiny_int8.tflite")
    assert done.returncode == 2 and "no Keras weights" in done.stderr and "edge-quantize" in done.stderr


def test_an_existing_bundle_is_never_overwritten(tmp_path, samples, tiny_bundle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = cli("edge-adapt", "--cells", samples, "--out", out, "--model", tiny_bundle.parent)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_ctrl_c_leaves_no_half_written_bundle(tiny_bundle, samples, sample_manifest, tmp_path):
    """Interrupted during fine-tuning: no OUT folder and no temporary folder beside it."""
    cells = tmp_path / "cells"
    for label in ("Parasitized", "Uninfected"):
        (cells / label).mkdir(parents=True)
        for i, f in enumerate(sorted((samples / label).iterdir()) * 2):
            shutil.copy(f, cells / label / f"{i}_{f.name}")
    out = tmp_path / "out"
    status, rest = interrupt_when("edge-adapt", "--cells", cells, "--out", out, "--model", tiny_bundle.parent,
                                  "--epochs", 400, line_starts="epoch 1/")
    assert status == 130, rest
    assert "nothing was written" in rest and "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells"]


def test_the_python_twin_loads_tensorflow_only_when_used():
    import sys as _sys
    script = ("import sys, malaria_edge; assert 'tensorflow' not in sys.modules; "
              "from malaria_edge import Classifier; f = malaria_edge.adapt; "
              "assert f.__module__ == 'malaria_edge.train.adapt'; print('LAZY_OK')")
    done = subprocess.run([_sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "LAZY_OK" in done.stdout, done.stderr[-2000:]
