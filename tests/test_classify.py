"""edge-classify and the Classifier API on real cells with a real tiny model, and every bad input."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_edge.edge_runtime import Classifier, ModelError
from conftest import cli


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_python_api_takes_paths_pil_images_and_arrays(bundled_model, samples):
    clf = Classifier.load(bundled_model)
    path = next((samples / "Parasitized").glob("*.webp"))
    img = Image.open(path)
    results = clf.predict([path, img, np.asarray(img.convert("RGB"))], batch_size=2)
    assert len(results) == 3
    assert results[0].true_label == "parasitized" and results[1].true_label is None
    assert results[0].prob_parasitized == pytest.approx(results[1].prob_parasitized, abs=1e-6)
    assert results[0].prob_parasitized == pytest.approx(results[2].prob_parasitized, abs=1e-6)
    assert all(r.prediction in ("parasitized", "uninfected") and r.latency_ms > 0 for r in results)
    single = clf.predict(str(path))
    assert len(single) == 1


def test_classify_samples_against_the_full_model(bundled_model, samples, tmp_path):
    out, summary = tmp_path / "rows.csv", tmp_path / "summary.json"
    done = cli("edge-classify", samples, "--model", bundled_model, "--compare", "-o", out, "--summary-json", summary,
               check=True)
    rows = rows_of(out)
    n = len(list(samples.rglob("*.webp")))
    assert len(rows) == n
    assert set(rows[0]) >= {"path", "prediction", "prob_parasitized", "latency_ms", "true_label", "ref_prediction"}
    assert {r["true_label"] for r in rows} == {"parasitized", "uninfected"}
    s = json.loads(summary.read_text())
    assert s["model"]["backend"] in ("ai_edge_litert", "tflite_runtime", "tensorflow") and s["model"]["backend_version"]
    assert s["model"]["kind"] == "int8" and s["reference"]["kind"] == "fp32"
    for key in ("accuracy", "sensitivity", "specificity", "latency_ms_p50", "latency_ms_p95"):
        assert s["model"][key] is not None and s["reference"][key] is not None
    agree = np.mean([r["prediction"] == r["ref_prediction"] for r in rows])
    assert s["agreement"] == pytest.approx(agree)
    assert s["speed_ratio"] == pytest.approx(s["reference"]["latency_ms_p50"] / s["model"]["latency_ms_p50"])
    assert "agreement" in done.stderr and "ai_edge_litert" in done.stderr


def test_jsonl_threshold_and_review(bundled_model, samples, tmp_path):
    out = tmp_path / "rows.jsonl"
    cli("edge-classify", samples, "--model", bundled_model, "--format", "jsonl", "-o", out, "--threshold", "0.001",
        check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["prediction"] == ("parasitized" if r["prob_parasitized"] >= 0.001 else "uninfected")
                        for r in rows)
    assert sum(r["prediction"] == "parasitized" for r in rows) > len(rows) // 2
    done = cli("edge-classify", samples, "--model", bundled_model, "--min-confidence", "1.0", "--summary-json",
               tmp_path / "s.json", check=True)
    review = [r for r in csv.DictReader(done.stdout.splitlines())]
    assert all(r["prediction"] == "review" for r in review)
    assert json.loads((tmp_path / "s.json").read_text())["model"]["review"] == len(review)


def test_bad_images_are_named_skipped_and_the_rest_written(bundled_model, samples, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(samples, folder)
    (folder / "Uninfected" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "Uninfected" / "empty.png").write_bytes(b"")
    (folder / "Parasitized" / "text.png").write_text("not an image")
    Image.new("RGBA", (90, 90), (200, 100, 120, 255)).save(folder / "Parasitized" / "rgba.png")
    Image.new("L", (90, 90), 128).save(folder / "Parasitized" / "gray.tif")
    Image.new("P", (90, 90)).save(folder / "Parasitized" / "palette.gif")
    out = tmp_path / "rows.csv"
    done = cli("edge-classify", folder, "--model", bundled_model, "-o", out)
    assert done.returncode == 1
    # Flat colour and all-black pictures decode fine but show no cell: refused, never a prediction.
    for name in ("corrupt.jpg", "empty.png", "text.png", "rgba.png", "gray.tif", "palette.gif"):
        assert name in done.stderr
    rows = rows_of(out)
    n_good = len(list(samples.rglob("*.webp")))
    assert len([r for r in rows if r["prediction"]]) == n_good
    refused = {Path(r["path"]).name: r for r in rows if r["error"]}
    assert set(refused) == {"corrupt.jpg", "empty.png", "text.png", "rgba.png", "gray.tif", "palette.gif"}
    assert not any(r["prob_parasitized"] for r in refused.values())
    assert "6 of" in done.stderr


def test_resume_after_an_interrupted_run_neither_loses_nor_duplicates(bundled_model, samples, tmp_path):
    out = tmp_path / "rows.csv"
    cli("edge-classify", samples, "--model", bundled_model, "-o", out, check=True)
    full = out.read_text().splitlines()
    # a battery died after 10 rows, halfway through writing the 11th
    out.write_text("\n".join(full[:11]) + "\n" + full[11][:17])
    done = cli("edge-classify", samples, "--model", bundled_model, "-o", out, "--resume", check=True)
    rows = rows_of(out)
    assert len(rows) == len(full) - 1
    assert len({r["path"] for r in rows}) == len(rows)
    assert "10 already in the output" in done.stderr


def test_existing_output_is_not_overwritten_silently(bundled_model, samples, tmp_path):
    out = tmp_path / "rows.csv"
    out.write_text("precious\n")
    done = cli("edge-classify", samples, "--model", bundled_model, "-o", out)
    assert done.returncode == 2 and "--resume" in done.stderr and out.read_text() == "precious\n"


def test_models_that_are_not_tflite_are_refused(bundle_copy, samples):
    bundle_copy.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    done = cli("edge-classify", samples, "--model", bundle_copy)
    assert done.returncode == 1 and "not a TFLite model" in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_truncated_or_altered_model_fails_the_hash_check(bundle_copy, samples):
    data = bundle_copy.read_bytes()
    bundle_copy.write_bytes(data[: len(data) // 2])
    done = cli("edge-classify", samples, "--model", bundle_copy)
    assert done.returncode == 1 and "does not match its card" in done.stderr
    with pytest.raises(ModelError, match="SHA-256"):
        Classifier.load(bundle_copy)


def test_model_without_card_is_refused(bundle_copy, samples):
    for card in bundle_copy.parent.glob("*.json"):
        card.unlink()
    done = cli("edge-classify", samples, "--model", bundle_copy)
    assert done.returncode == 1 and "no model card" in done.stderr


def test_empty_folder_and_missing_paths(bundled_model, tmp_path):
    (tmp_path / "empty").mkdir()
    done = cli("edge-classify", tmp_path / "empty", tmp_path / "missing.png", "--model", bundled_model)
    assert done.returncode == 1
    assert "holds no images" in done.stderr and "no such file" in done.stderr


def test_globs_and_labels_csv(bundled_model, samples, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in samples.rglob("*.webp"):
        shutil.copy(f, flat / f.name)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for f in samples.rglob("*.webp"):
            w.writerow([f.name, f.parent.name.lower()])
    done = cli("edge-classify", str(flat / "*.webp"), "--model", bundled_model, "--labels", labels, check=True)
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert len(rows) == len(list(samples.rglob("*.webp"))) and all(r["true_label"] for r in rows)
