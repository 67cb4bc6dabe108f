"""edge-adapt on real cells with the tiny real model: a bundle that edge-classify uses, a card that records the
adaptation, refusals in one line, and no half-written bundle after Ctrl-C."""
import json
import os
import shutil
import signal
import subprocess

import pytest
from PIL import Image

from malaria_edge.edge_runtime.bundle import sha256_file
from conftest import cli, interrupt_when, two_lab_manifest

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def distinct_cells(samples, tmp_path_factory):
    """Enough distinct real cells for the command's minimum of 30 a class: each sample cell upright and turned by
    90, 180 and 270 degrees (different files, the same cells as a microscope turned on its stage shows them)."""
    cells = tmp_path_factory.mktemp("distinct") / "cells"
    for label in ("Parasitized", "Uninfected"):
        (cells / label).mkdir(parents=True)
        for f in sorted((samples / label).iterdir()):
            image = Image.open(f).convert("RGB")
            for turn in (0, 90, 180, 270):
                image.rotate(turn, expand=True).save(cells / label / f"{f.stem}_r{turn}.png")
    return cells


@pytest.fixture(scope="module")
def adapted(tiny_bundle, samples, sample_manifest, tmp_path_factory):
    """A real adaptation of the tiny bundle to the sample cells (through the Python twin), with one held-out part
    and Youden's J (the cross-validated default has its own fixture below)."""
    import malaria_edge
    out = tmp_path_factory.mktemp("adapted") / "clinic"
    from malaria_edge.train.adapt import Recipe
    logged = []
    result = malaria_edge.adapt(samples, out, model=tiny_bundle.parent, replay=sample_manifest, name="clinic",
                                recipe=Recipe(epochs=2, replay_cells=40, folds=0, min_sensitivity=None), min_cells=10,
                                log=logged.append)
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


def test_adapted_files_carry_the_phone_metadata(adapted):
    """A clinic's adapted int8 file goes to its phones too: labels and the input description, as edge-quantize
    writes them."""
    from malaria_edge.export.metadata import read_metadata
    info = read_metadata(adapted[0].int8_path)
    assert list(info["packed_labels"].values())[0] == ["parasitized", "uninfected"]
    assert info["subgraph_metadata"][0]["input_tensor_metadata"][0]["content"]["content_properties"][
        "color_space"] == "RGB"


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
    assert a["old_lab_test"]["unit"] == "patients" and a["old_lab_test"]["after"]["unit"] == "patients"
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
    assert done.returncode == 1 and "no Keras weights" in done.stderr and "edge-quantize" in done.stderr


def test_an_existing_bundle_is_never_overwritten(tmp_path, samples, tiny_bundle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = cli("edge-adapt", "--cells", samples, "--out", out, "--model", tiny_bundle.parent)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_leaves_no_half_written_bundle(tiny_bundle, distinct_cells, tmp_path, sig, status):
    """Interrupted (Ctrl-C) or stopped (SIGTERM: kill, a service stop) during the first fold's fine-tuning: exit
    130 or 143 with a line, no OUT folder and no temporary folder beside it."""
    out = tmp_path / "out"
    code, rest = interrupt_when("edge-adapt", "--cells", distinct_cells, "--out", out, "--model", tiny_bundle.parent,
                                "--epochs", 400, line_starts="fold 1/5: epoch 1/", sig=sig)
    assert code == status, rest
    assert "nothing was written" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def test_sigterm_before_fine_tuning_leaves_no_partial_folder(tiny_bundle, distinct_cells, tmp_path):
    """SIGTERM while the base model is measured (outside fine-tuning) cleans up too."""
    out = tmp_path / "out"
    code, rest = interrupt_when("edge-adapt", "--cells", distinct_cells, "--out", out, "--model", tiny_bundle.parent,
                                "--epochs", 400, line_starts="before:", sig=signal.SIGTERM)
    assert code == 143 and "nothing was written" in rest, rest
    assert list(tmp_path.iterdir()) == []


def test_every_file_of_an_adapted_bundle_has_the_same_mode(adapted):
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in adapted[0].out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def _copies(samples, root, per_class, copies):
    for label in ("Parasitized", "Uninfected"):
        (root / label).mkdir(parents=True)
        for f in sorted((samples / label).iterdir())[:per_class]:
            for i in range(copies):
                shutil.copy(f, root / label / f"copy{i}_{f.name}")
    return root


def test_duplicate_files_count_once(tiny_bundle, samples, tmp_path):
    """15 distinct cells a class, each copied twice, are 15 cells a class: too few, and said so (exit 1), with
    how many duplicates were dropped; no copy can sit on both sides of a fold."""
    cells = _copies(samples, tmp_path / "cells", 15, 2)
    from malaria_edge.train.adapt import read_clinic_cells
    clinic = read_clinic_cells(cells, 32, None)
    assert clinic.count(1) == 15 and clinic.count(0) == 15 and len(clinic.duplicates) == 30
    done = cli("edge-adapt", "--cells", cells, "--out", tmp_path / "out", "--model", tiny_bundle.parent)
    assert done.returncode == 1, done.stderr
    assert "only 15 parasitized and 15 uninfected" in done.stderr
    assert "dropped 15 duplicate" in done.stderr and "Parasitized" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_same_cell_in_both_classes_is_refused(tiny_bundle, distinct_cells, tmp_path):
    """Uninfected/ a link to Parasitized/ (or any file in both): one line saying how many and an example, exit 1."""
    cells = tmp_path / "cells"
    shutil.copytree(distinct_cells / "Parasitized", cells / "Parasitized")
    (cells / "Uninfected").symlink_to(cells / "Parasitized", target_is_directory=True)
    done = cli("edge-adapt", "--cells", cells, "--out", tmp_path / "out", "--model", tiny_bundle.parent)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "84 files are in both" in line and "_r0.png" in line and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells"]
    one = tmp_path / "one"
    shutil.copytree(distinct_cells, one)
    shutil.copy(next((one / "Parasitized").iterdir()), one / "Uninfected" / "moved.png")
    done = cli("edge-adapt", "--cells", one, "--out", tmp_path / "out", "--model", tiny_bundle.parent)
    assert done.returncode == 1 and "1 file is in both" in done.stderr and "moved.png" in done.stderr


def test_an_adaptation_worse_than_the_base_is_written_but_not_recommended(tiny_bundle, distinct_cells, tmp_path):
    """A fine-tune that wrecks the model (a learning rate of 30) scores the clinic's cells out of fold worse than
    the base does: the bundle is written and its card says so, but the command says not to use it and exits 1."""
    out = tmp_path / "out"
    done = cli("edge-adapt", "--cells", distinct_cells, "--out", out, "--model", tiny_bundle.parent, "--folds", 2,
               "--epochs", 1, "--replay-cells", 0, "--learning-rate", 30)
    assert done.returncode == 1, done.stderr
    assert "use it:" not in done.stdout
    assert "do not use" in done.stderr and "worse than the base" in done.stderr and "Traceback" not in done.stderr
    card = json.loads(next(out.glob("*.json")).read_text())
    assert card["adaptation"]["recommended"] is False and "worse" in card["adaptation"]["not_recommended_because"]


@pytest.mark.parametrize("case,status", [("no cells folder", 2), ("no Uninfected folder", 2), ("too few cells", 1),
                                         ("out not empty", 2), ("not a bundle", 2), ("no such model", 2),
                                         ("damaged Keras weights", 1), ("no Keras weights", 1),
                                         ("no such manifest", 2), ("not a manifest", 1), ("bad folds", 2)])
def test_each_refusal_exits_by_the_one_rule(tiny_bundle, samples, distinct_cells, tmp_path, case, status):
    """2 when the command was called wrong (a missing folder or file, a refused option), 1 when the input or the
    model could not be used (too few cells, a damaged bundle, a file that is not a manifest)."""
    cells, model, extra = distinct_cells, tiny_bundle.parent, []
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.parent, bundle)
    if case == "no cells folder":
        cells = tmp_path / "nowhere"
    elif case == "no Uninfected folder":
        cells = tmp_path / "half"
        shutil.copytree(samples / "Parasitized", cells / "Parasitized")
    elif case == "too few cells":
        cells = samples
    elif case == "out not empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "not a bundle":
        model = tmp_path
    elif case == "no such model":
        model = tmp_path / "nothing"
    elif case == "damaged Keras weights":
        (bundle / "tiny.keras").write_bytes(b"not the weights")
        model = bundle
    elif case == "no Keras weights":
        (bundle / "tiny.keras").unlink()
        model = bundle
    elif case == "no such manifest":
        extra = ["--replay", tmp_path / "manifest.csv"]
    elif case == "not a manifest":
        (tmp_path / "manifest.csv").write_text("a,b\n1,2\n")
        extra = ["--replay", tmp_path / "manifest.csv"]
    elif case == "bad folds":
        extra = ["--folds", 1]
    done = cli("edge-adapt", "--cells", cells, "--out", tmp_path / "out", "--model", model, "--epochs", 1, *extra)
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("edge-adapt: ")


def test_the_python_twin_loads_tensorflow_only_when_used():
    import sys as _sys
    script = ("import sys, malaria_edge; assert 'tensorflow' not in sys.modules; "
              "from malaria_edge import Classifier; f = malaria_edge.adapt; "
              "assert f.__module__ == 'malaria_edge.train.adapt'; print('LAZY_OK')")
    done = subprocess.run([_sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "LAZY_OK" in done.stdout, done.stderr[-2000:]


def test_folds_cover_every_cell_once_with_both_classes_in_each():
    import numpy as np
    from malaria_edge.train.adapt import stratified_folds
    labels = np.array([1] * 23 + [0] * 17)
    parts = stratified_folds(labels, 5, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(40))
    assert sorted(int(labels[p].sum()) for p in parts) == [4, 4, 5, 5, 5]
    assert sorted(int((labels[p] == 0).sum()) for p in parts) == [3, 3, 3, 4, 4]
    assert [p.tolist() for p in stratified_folds(labels, 5, seed=3)] == [p.tolist() for p in parts]


def test_a_minimum_sensitivity_moves_the_threshold_below_the_parasites_youden_gives_up():
    """Ten parasitized cells, one scoring among the uninfected: Youden's J gives that one up for specificity; with
    a minimum sensitivity of 100% the threshold sits below it, in the middle of the gap to the next lower score."""
    import numpy as np
    from malaria_edge.train.adapt import choose_decision_threshold
    pos = np.array([0.95, 0.96, 0.97, 0.98, 0.99, 0.93, 0.94, 0.92, 0.91, 0.30])
    neg = np.array([0.02, 0.05, 0.10, 0.20, 0.25, 0.40, 0.45, 0.08, 0.12, 0.15])
    y = np.array([1] * 10 + [0] * 10)
    prob = np.concatenate([pos, neg])
    youden = choose_decision_threshold(y, prob)
    assert 0.45 < youden < 0.91
    screening = choose_decision_threshold(y, prob, min_sensitivity=1.0)
    assert 0.25 < screening < 0.30 and (pos >= screening).all() and (neg >= screening).sum() == 2
    assert choose_decision_threshold(y, prob, min_sensitivity=0.9) == youden


@pytest.fixture(scope="module")
def cross_validated(tiny_bundle, samples, sample_manifest, tmp_path_factory):
    """A real adaptation whose threshold comes from 3 folds' out-of-fold scores, the bundle tuned on every cell.
    Its base card says "logit", as bundles written before edge-quantize's two-score files do."""
    import malaria_edge
    from malaria_edge.train.adapt import Recipe
    base = tmp_path_factory.mktemp("older_base")
    for f in tiny_bundle.parent.iterdir():
        shutil.copy(f, base / f.name)
    card = json.loads((base / "tiny.json").read_text())
    card["head"] = "logit"
    (base / "tiny.json").write_text(json.dumps(card))
    out = tmp_path_factory.mktemp("cv") / "clinic"
    logged = []
    result = malaria_edge.adapt(samples, out, model=base, replay=sample_manifest, name="clinic",
                                recipe=Recipe(epochs=2, replay_cells=40, folds=3, min_sensitivity=0.9), min_cells=10,
                                log=logged.append)
    return result, logged


def test_cross_validated_threshold_rests_on_every_cell_out_of_fold(cross_validated, samples, tmp_path):
    import numpy as np
    from malaria_edge.train.adapt import choose_decision_threshold, format_adaptation
    result, logged = cross_validated
    a = result.adaptation
    total = a["cells"]["parasitized"] + a["cells"]["uninfected"]
    assert a["cells"]["fine_tuned"] == {"parasitized": a["cells"]["parasitized"], "uninfected": a["cells"]["uninfected"]}
    oof = a["cells"]["out_of_fold"]
    assert oof["folds"] == 3 and sum(oof["cells_per_fold"]) == total and "held_out" not in a["cells"]
    assert "held_out" not in a and a["out_of_fold"]["after"]["cells"] == total
    assert a["out_of_fold"]["threshold_rule"] == "most specific keeping sensitivity >= 90.00%"
    for k in (1, 2, 3):
        assert any(line.startswith(f"fold {k}/3: epoch 2/2") for line in logged)
    assert [line.split()[1] for line in logged if line.startswith("epoch ")] == ["1/2", "2/2"]
    y, scores = result.threshold_cells
    assert len(y) == total and result.card["threshold"] == choose_decision_threshold(y, scores, 0.9)
    assert a["out_of_fold"]["after"]["metrics"]["sensitivity"] >= 0.9
    assert np.mean(scores[y == 1]) > np.mean(scores[y == 0])
    assert "out of fold (3 folds)" in format_adaptation(result.card)
    done = cli("edge-classify", samples, "--model", result.int8_path, "--output", tmp_path / "rows.csv")
    assert done.returncode == 0, done.stderr


def test_the_adapted_card_describes_the_scores_its_files_return(adapted, cross_validated):
    """Whatever the base bundle's head, the adapted files return [parasitized, uninfected] scores and say so."""
    from malaria_edge.edge_runtime.bundle import ModelBundle
    for result in (adapted[0], cross_validated[0]):
        bundle = ModelBundle(result.int8_path)
        assert result.card["head"] == "softmax2" and bundle.head == "softmax2"
        assert tuple(bundle.interpreter.get_output_details()[0]["shape"]) == (1, 2)


def test_a_threshold_chosen_on_saturated_scores_stays_inside_zero_and_one():
    """A wrecked fine-tune scores every cell ~0 or ~1: the threshold is still one a card accepts (0 < t < 1), so
    the run writes its not-recommended bundle instead of failing on its own card."""
    import numpy as np
    from malaria_edge.train.adapt import choose_decision_threshold
    y = np.array([1] * 30 + [0] * 30)
    for prob in (np.full(60, 1e-9), np.full(60, 1 - 1e-9), np.r_[np.full(30, 1e-7), np.full(30, 1e-9)]):
        for minimum in (None, 0.95):
            assert 0 < choose_decision_threshold(y, prob, minimum) < 1


def test_an_old_lab_of_fields_is_counted_in_fields(sample_manifest, tmp_path):
    """The old lab's test split is bootstrapped over what it is made of: an IML-style lab's fields, not
    "patients" (an IML-only base adapted to NIH printed "40 patients" for 40 fields)."""
    from malaria_edge.train.adapt import _replay_and_old_test
    for sources, unit in ((("LAB2",), "fields"), (("NIH",), "patients"), (("NIH", "LAB2"), "patients and fields")):
        manifest, _, _ = two_lab_manifest(sample_manifest, tmp_path, sources=sources)
        _, test, _ = _replay_and_old_test(manifest, 32, None, 0, 0)
        assert test[3] == unit, sources

