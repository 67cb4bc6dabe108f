"""edge-quantize on a tiny real model: really integer, card hash, agreement on real cells, loud collapse."""
import json

import numpy as np
import pytest

from malaria_edge.edge_runtime.backend import find_interpreter
from malaria_edge.edge_runtime.bundle import sha256_file
from conftest import cli, two_lab_manifest

pytestmark = pytest.mark.train


def test_int8_file_is_really_integer(tiny_bundle):
    interpreter_cls, _, _ = find_interpreter()
    interp = interpreter_cls(model_path=str(tiny_bundle))
    interp.allocate_tensors()
    assert interp.get_input_details()[0]["dtype"] == np.uint8
    assert interp.get_output_details()[0]["dtype"] == np.uint8  # class scores a phone client reads
    assert interp.get_input_details()[0]["quantization"] == (1.0, 0)  # a raw pixel is the input value
    dtypes = {}
    for t in interp.get_tensor_details():
        dtypes.setdefault(np.dtype(t["dtype"]).name, 0)
        dtypes[np.dtype(t["dtype"]).name] += 1
    assert "float32" not in dtypes, dtypes
    assert dtypes.get("int8", 0) > 10 and dtypes.get("int32", 0) > 0  # int8 weights/activations, int32 biases


def test_card_hashes_sizes_and_metrics(tiny_bundle):
    card = json.loads((tiny_bundle.parent / "tiny.json").read_text())
    for name, info in card["files"].items():
        assert info["sha256"] == sha256_file(tiny_bundle.parent / name)
        assert info["bytes"] == (tiny_bundle.parent / name).stat().st_size
    assert card["labels"] == ["parasitized", "uninfected"] and card["input"]["size"] == 32
    assert card["reference"] == "tiny_fp32.tflite"
    assert card["data"]["counts"]["test"]["patients"] >= 1 and card["data"]["manifest_sha256"]
    test = card["test"]
    assert test["split"] == "test" and test["cells"] > 0
    assert 0.0 <= test["agreement_int8_fp32"] <= 1.0
    assert test["max_abs_prob_diff_fp32_keras"] < 1e-3  # the fp32 file is the same network
    for kind in ("int8", "fp32", "keras"):
        assert {"accuracy", "sensitivity", "specificity", "f1", "mcc", "roc_auc"} <= set(test[kind]["metrics"])
        assert test[kind]["unit"] == "patients" and test[kind]["patient_level"]["metrics"]["patients"] >= 1
    assert card["patient_rule"]["min_fraction"] > 0 and "validation" in card["patient_rule"]["chosen_on"]


def test_agreement_is_measured_on_real_cells(tiny_bundle, sample_manifest):
    """The card's agreement and max |dp| are what the runtime gives on the real test-split cells."""
    from malaria_edge.edge_runtime import Classifier
    from malaria_edge.train.dataset import read_manifest
    card = json.loads((tiny_bundle.parent / "tiny.json").read_text())
    paths = [c.path for c in read_manifest(sample_manifest) if c.split == "test"]
    int8 = Classifier.load(tiny_bundle).predict(paths)
    fp32 = Classifier.load(tiny_bundle.parent / "tiny_fp32.tflite").predict(paths)
    same = np.mean([a.prediction == b.prediction for a, b in zip(int8, fp32)])
    diff = max(abs(a.prob_parasitized - b.prob_parasitized) for a, b in zip(int8, fp32))
    assert card["test"]["cells"] == len(paths)
    assert card["test"]["agreement_int8_fp32"] == pytest.approx(same)
    assert card["test"]["max_abs_prob_diff_int8_fp32"] == pytest.approx(diff, abs=1e-6)


def test_collapsed_int8_model_fails_loudly(tiny_run, sample_manifest, tmp_path):
    import keras
    model = keras.models.load_model(tiny_run / "model.keras")
    head = model.get_layer("logit")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 0.0, bias * 0.0 + 8.0])  # a model that calls every cell parasitized
    broken = tmp_path / "collapsed" / "model.keras"
    broken.parent.mkdir()
    model.save(broken)
    done = cli("edge-quantize", "--model", broken, "--manifest", sample_manifest, "--out", tmp_path / "b",
               "--calibration-size", 20)
    assert done.returncode == 1
    assert "predicts one class" in done.stderr and "try" in done.stderr


def test_quantize_refuses_a_missing_model(tmp_path, sample_manifest):
    done = cli("edge-quantize", "--model", tmp_path / "nope.keras", "--manifest", sample_manifest, "--out", tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_a_model_trained_without_nih_is_measured_on_nih_as_a_lab_never_seen(sample_manifest, tmp_path):
    """edge-train --hold-out NIH, then edge-quantize: the card's NIH test block and unfamiliar figures say the model
    never saw NIH (this crashed inside Keras on an empty NIH split before)."""
    from malaria_edge.edge_runtime.manifest import read_manifest
    from malaria_edge.quantize.job import quantize
    from malaria_edge.train.train import train
    manifest, _, _ = two_lab_manifest(sample_manifest, tmp_path)
    train(manifest, tmp_path / "without_nih", "tiny", epochs=2, hold_out="NIH", log=lambda m: None)
    card = quantize(tmp_path / "without_nih" / "model.keras", manifest, tmp_path / "bundle", name="lab2",
                    calibration_size=20, log=lambda m: None)
    nih_test = sum(1 for c in read_manifest(sample_manifest) if c.split == "test")
    assert card["test"]["trained_on"] is False and card["test"]["cells"] == nih_test
    assert card["test_sources"]["LAB2"]["trained_on"] is True
    flagged = card["unfamiliar"]["test_flagged"]
    assert flagged["NIH"]["trained_on"] is False and flagged["LAB2"]["trained_on"] is True
    assert card["unfamiliar"]["fitted_on"]["sources"] == ["LAB2"]


def test_quantize_refuses_a_manifest_without_nih_patients_before_writing(tiny_run, sample_manifest, tmp_path):
    manifest, _, _ = two_lab_manifest(sample_manifest, tmp_path, sources=("LAB2",))
    done = cli("edge-quantize", "--model", tiny_run / "model.keras", "--manifest", manifest, "--out",
               tmp_path / "b", "--calibration-size", 20)
    assert done.returncode == 1, done.stderr
    assert "no NIH val or test patients" in done.stderr and "edge-prepare --data" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b").exists()


def test_a_quantize_that_fails_after_converting_leaves_no_card(tiny_run, sample_manifest, tmp_path):
    """A test cell that cannot be read fails the run after the files were written: the first card (no test figures,
    no patient rule, no unfamiliar statistics) goes too, so nothing loads that bundle unmeasured."""
    from dataclasses import replace

    from malaria_edge.edge_runtime.manifest import read_manifest, write_manifest
    cells = read_manifest(sample_manifest)
    first_test = next(i for i, c in enumerate(cells) if c.split == "test")
    cells[first_test] = replace(cells[first_test], path=str(tmp_path / "gone.png"))
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.parent.mkdir()
    write_manifest(cells, manifest)
    done = cli("edge-quantize", "--model", tiny_run / "model.keras", "--manifest", manifest, "--out", tmp_path / "b",
               "--calibration-size", 20)
    assert done.returncode == 1 and "gone.png" in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert (tmp_path / "b" / "malaria_int8.tflite").exists() and not (tmp_path / "b" / "malaria.json").exists()


def _counts_file(path, patients):
    path.write_text(json.dumps({"how": "constructed for the test", "patients": patients}))
    return path


def _separable_counts(path):
    """Ten training patients' counts: healthy ones at 0-4% flagged, infected ones at 10-30%."""
    healthy = [{"patient": f"H{i}", "cells": 100, "parasitized": i, "infected": False} for i in range(5)]
    infected = [{"patient": f"I{i}", "cells": 100, "parasitized": 10 + 5 * i, "infected": True} for i in range(5)]
    return _counts_file(path, healthy + infected)


def test_patient_counts_refuse_validation_or_test_patients(tiny_run, sample_manifest, tmp_path):
    """Out-of-fold counts that hold a validation or test patient would choose the rule on the patients it is then
    judged on: refused in one line before anything is converted."""
    from malaria_edge.edge_runtime.manifest import read_manifest
    val = next(c.patient for c in read_manifest(sample_manifest) if c.split == "val")
    counts = _counts_file(tmp_path / "oof.json", [{"patient": val, "cells": 50, "parasitized": 1, "infected": False}])
    done = cli("edge-quantize", "--model", tiny_run / "model.keras", "--manifest", sample_manifest,
               "--out", tmp_path / "bundle", "--patient-counts", counts)
    assert done.returncode == 1 and "validation or test patients" in done.stderr and val in done.stderr
    assert not (tmp_path / "bundle").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = cli("edge-quantize", "--model", tiny_run / "model.keras", "--manifest", sample_manifest,
               "--out", tmp_path / "bundle", "--patient-counts", broken)
    assert done.returncode == 1 and "not a patient-counts file" in done.stderr


def test_patient_rule_chosen_with_out_of_fold_counts(tiny_run, sample_manifest, tmp_path):
    """Training patients' out-of-fold counts join the validation patients: the rule separates the healthy ones
    (flagged fraction <= 4%) from the infected ones (>= 10%) and the card says what it was chosen on."""
    from malaria_edge.quantize.job import quantize
    counts = _separable_counts(tmp_path / "oof.json")
    card = quantize(tiny_run / "model.keras", sample_manifest, tmp_path / "bundle", name="tiny",
                    calibration_size=40, log=lambda m: None, patient_counts=counts)
    rule = card["patient_rule"]
    assert "10 training patients out of fold (constructed for the test)" in rule["chosen_on"]
    val_patients = card["data"]["counts"]["val"]["patients"]
    assert f"{val_patients} validation patients" in rule["chosen_on"]
    assert f", {val_patients + 10} patients" in rule["chosen_on"]
    assert 0.04 < rule["min_fraction"] <= 0.10


def test_rule_only_keeps_the_files_and_their_figures_and_changes_the_rule(tiny_run, tiny_bundle, sample_manifest,
                                                                         tmp_path):
    """--rule-only on a copy of a bundle: the same files (bytes), the same cell-level test figures, a new patient
    rule chosen with the out-of-fold counts; without --patient-counts it is a usage error."""
    import shutil
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.parent, folder)
    before = json.loads((folder / "tiny.json").read_text())
    int8_sha = sha256_file(folder / "tiny_int8.tflite")
    done = cli("edge-quantize", "--model", tiny_run / "model.keras", "--manifest", sample_manifest,
               "--out", folder, "--name", "tiny", "--rule-only")
    assert done.returncode == 2 and "--rule-only needs --patient-counts" in done.stderr
    counts = _separable_counts(tmp_path / "oof.json")
    done = cli("edge-quantize", "--model", tiny_run / "model.keras", "--manifest", sample_manifest, "--out", folder,
               "--name", "tiny", "--rule-only", "--patient-counts", counts)
    assert done.returncode in (0, 1), done.stderr  # 1 only when the tiny model fails the card check
    after = json.loads((folder / "tiny.json").read_text())
    assert sha256_file(folder / "tiny_int8.tflite") == int8_sha
    assert after["files"]["tiny_int8.tflite"]["sha256"] == int8_sha
    assert "training patients out of fold" in after["patient_rule"]["chosen_on"]
    for kind in ("int8", "fp32", "keras"):
        assert after["test"][kind]["metrics"] == before["test"][kind]["metrics"]
    assert after["commands"][-1].startswith("edge-quantize") and "--rule-only" in after["commands"][-1]
