"""edge-train end to end on real cells: outputs, report contents, Ctrl-C + --resume, mirrored strategy."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import BIN, REPO, interrupt_when, two_lab_manifest

pytestmark = pytest.mark.train


def test_training_writes_model_history_plot_and_report(tiny_run):
    for name in ("model.keras", "history.json", "plot.png", "report.json", "report.txt", "config.json"):
        assert (tiny_run / name).is_file(), name
    history = json.loads((tiny_run / "history.json").read_text())
    assert len(history["loss"]) == 30 and len(history["val_loss"]) == 30
    report = json.loads((tiny_run / "report.json").read_text())
    test = report["test"]
    assert test["split"] == "test" and test["patients"] >= 1 and test["cells"] > 0
    for key in ("accuracy", "sensitivity", "specificity", "f1", "mcc", "roc_auc", "confusion_matrix"):
        assert key in test["metrics"]
    assert set(test["ci95"]) >= {"accuracy", "sensitivity", "specificity", "roc_auc"}
    assert set(test["classification_report"]) == {"parasitized", "uninfected"}
    assert "patient_level" in test and report["patient_rule"]["min_fraction"] > 0
    assert report["training_wall_seconds"] > 0 and report["machine"]["cores"] >= 1
    text = (tiny_run / "report.txt").read_text()
    assert "test split" in text and "patients" in text and "95% CI" in text


def test_ctrl_c_keeps_the_best_checkpoint_and_resume_finishes(sample_manifest, tmp_path):
    out = tmp_path / "run"
    status, rest = interrupt_when("edge-train", "--manifest", sample_manifest, "--out", out, "--preset", "tiny",
                                  "--epochs", 400, line_starts="epoch 2/")
    assert status == 130, rest
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    assert "--resume" in rest and (out / "model.keras").is_file()
    done_before = json.loads((out / "train_state.json").read_text())["epoch"]
    assert 2 <= done_before < 400
    config = json.loads((out / "config.json").read_text())
    config["preset"]["epochs"] = done_before + 2  # finish quickly: the schedule is what --resume continues
    (out / "config.json").write_text(json.dumps(config))
    resumed = subprocess.run([str(BIN / "edge-train"), "--resume", str(out)], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at epoch {done_before + 1}" in resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == done_before + 2
    assert json.loads((out / "report.json").read_text())["epochs_run"] == done_before + 2


def test_mirrored_strategy_on_two_logical_cpus(sample_manifest, tmp_path):
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from malaria_edge.train.train import make_strategy, train
        assert make_strategy("mirrored").num_replicas_in_sync == 2
        report = train({str(sample_manifest)!r}, {str(tmp_path / "mirrored")!r}, "tiny", epochs=1,
                       strategy="mirrored", log=lambda m: None)
        print("REPLICAS_OK", report["epochs_run"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REPLICAS_OK 1" in done.stdout


def test_leave_one_lab_out_reports_the_lab_never_trained_on(sample_manifest, tmp_path):
    """--hold-out trains on the other lab only and reports every cell of the held-out one, in both directions."""
    from malaria_edge.train.train import train
    manifest, lab2_cells, lab2_groups = two_lab_manifest(sample_manifest, tmp_path)
    report = train(manifest, tmp_path / "without_lab2", "tiny", epochs=2, hold_out="lab2", log=lambda m: None)
    held = report["held_out"]
    assert report["sources"] == ["NIH"] and held["source"] == "LAB2" and held["unit"] == "fields"
    assert held["cells"] == lab2_cells and held["groups"] == lab2_groups
    assert report["patient_rule"] is not None and report["test"]["source"] == "NIH"
    assert json.loads((tmp_path / "without_lab2" / "config.json").read_text())["hold_out"] == "lab2"
    assert "LAB2 all (lab never trained on) split" in (tmp_path / "without_lab2" / "report.txt").read_text()

    report = train(manifest, tmp_path / "without_nih", "tiny", epochs=2, hold_out="NIH", log=lambda m: None)
    assert report["sources"] == ["LAB2"] and report["held_out"]["source"] == "NIH"
    assert report["held_out"]["unit"] == "patients" and report["held_out"]["cells"] == lab2_cells
    assert report["test"]["source"] == "LAB2" and report["patient_rule"] is None


def test_holding_out_an_unknown_or_the_only_lab_is_refused(sample_manifest):
    from malaria_edge.edge_runtime.manifest import read_manifest
    from malaria_edge.train.train import split_off_source
    cells = read_manifest(sample_manifest)
    with pytest.raises(ValueError, match="no cells of source 'IML' to hold out; its sources: NIH"):
        split_off_source(cells, "IML", sample_manifest)
    with pytest.raises(ValueError, match="NIH is its only source"):
        split_off_source(cells, "nih", sample_manifest)
