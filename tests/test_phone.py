"""A phone's standard client loads our bundle as it is: MediaPipe Tasks ImageClassifier (the same C++ pipeline as on
Android and iOS), no code of ours, agrees with ``Classifier.predict`` on real cells."""
import random
from pathlib import Path

import numpy as np
import pytest

from malaria_edge.edge_runtime import Classifier
from malaria_edge.edge_runtime.results_io import expand_inputs
from malaria_edge.edge_runtime.images import load_image, prepare_cell

mp = pytest.importorskip("mediapipe", reason="mediapipe is in the dev extra: pip install -e '.[dev]'")
from mediapipe.tasks.python import vision  # noqa: E402
from mediapipe.tasks.python.core.base_options import BaseOptions  # noqa: E402

SHARED_CELLS = 500
# One step of the int8 file's uint8 scores (scale ~1/255): two integer kernels may round one step apart.
ONE_SCORE_STEP = 1 / 255 + 1e-6
RESIZE_MEAN_DIFF = 0.1
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cell_images"


def image_classifier(model_path):
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model_path)),
                                            max_results=2)
    return vision.ImageClassifier.create_from_options(options)


def mediapipe_parasitized(classifier, path, size=None) -> float:
    """P(parasitized) as a phone app gets it: the decoded photo at its own size goes in and MediaPipe resizes it;
    with ``size``, the cell is first resized exactly as our runtime does, so both clients see the same pixels."""
    image = load_image(path)
    if size is not None:
        image = prepare_cell(image, size)
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels))
    scores = {c.category_name: c.score for c in result.classifications[0].categories}
    assert set(scores) == {"parasitized", "uninfected"}
    return scores["parasitized"]


def compare(model_path, paths, same_pixels=False) -> dict:
    """MediaPipe against our runtime on the same files: call agreement and the largest and mean |P(parasitized)
    difference|. ``same_pixels``: MediaPipe gets the cell already resized by our runtime; else it resizes."""
    classifier = Classifier.load(model_path)
    mine = np.array([r.prob_parasitized for r in classifier.predict(paths, batch_size=32)])
    size = classifier.bundle.size if same_pixels else None
    with image_classifier(model_path) as phone:
        theirs = np.array([mediapipe_parasitized(phone, p, size) for p in paths])
    t = classifier.threshold
    diff = np.abs(mine - theirs)
    return {"cells": len(paths), "agreement": float(np.mean((mine >= t) == (theirs >= t))),
            "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean())}


def report(name, figures, record_property) -> str:
    for key, value in figures.items():
        record_property(key, value)
    text = (f"MediaPipe vs edge_runtime, {name}, {figures['cells']} cells: agreement "
            f"{100 * figures['agreement']:.2f}%, max |dp| {figures['max_abs_prob_diff']:.4f}, mean |dp| "
            f"{figures['mean_abs_prob_diff']:.4f}")
    print(text)
    return text


def shared_sample(shared_data):
    everything = expand_inputs([str(shared_data)]).images
    return random.Random(15).sample(everything, min(SHARED_CELLS, len(everything)))


def test_the_int8_file_carries_labels_and_input_metadata(tiny_bundle):
    from malaria_edge.export.metadata import read_metadata
    info = read_metadata(tiny_bundle)
    assert info["packed_labels"] and list(info["packed_labels"].values())[0] == ["parasitized", "uninfected"]
    graph = info["subgraph_metadata"][0]
    cell = graph["input_tensor_metadata"][0]
    assert cell["content"]["content_properties"]["color_space"] == "RGB"
    assert "process_units" not in cell  # uint8 pixels go in as they are
    assert graph["output_tensor_metadata"][0]["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"


def test_the_fp32_file_says_how_to_normalise_its_float_input(tiny_bundle):
    from malaria_edge.export.metadata import read_metadata
    fp32 = tiny_bundle.parent / "tiny_fp32.tflite"
    cell = read_metadata(fp32)["subgraph_metadata"][0]["input_tensor_metadata"][0]
    norm = cell["process_units"][0]["options"]
    assert norm["mean"] == [0.0] and norm["std"] == [1.0]


def test_the_card_describes_the_phone_ready_files(tiny_bundle):
    import json
    card = json.loads((tiny_bundle.parent / "tiny.json").read_text())
    assert card["head"] == "softmax2" and card["labels"] == ["parasitized", "uninfected"]
    assert card["files"]["tiny_int8.tflite"]["input_dtype"] == "uint8"
    assert card["files"]["tiny_int8.tflite"]["output_dtype"] == "uint8"
    assert card["files"]["tiny_fp32.tflite"]["input_dtype"] == "float32"
    assert card["preprocessing"]["stain"] is None and card["quantization"]["phone_ready"] is True


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_mediapipe_loads_both_files_and_returns_both_classes(tiny_bundle, samples, kind):
    path = tiny_bundle.parent / f"tiny_{kind}.tflite"
    cell = next(iter(sorted(samples.rglob("*.webp"))))
    with image_classifier(path) as phone:
        p = mediapipe_parasitized(phone, cell)
    assert 0.0 <= p <= 1.0


@pytest.mark.parametrize("kind", ["int8", "fp32"])
def test_mediapipe_gives_our_scores_for_the_same_pixels(tiny_bundle, samples, kind, record_property):
    """Same pixels in, same scores out (to one output step): the graph, the labels, the uint8 input taken as raw
    pixels (scale 1, zero 0) and the fp32 file's normalisation (mean 0, std 1) mean exactly what our runtime means
    by them. Scores, not calls: the tiny smoke model puts many cells within a step of its threshold."""
    paths = expand_inputs([str(samples)]).images
    figures = compare(tiny_bundle.parent / f"tiny_{kind}.tflite", paths, same_pixels=True)
    text = report(f"tiny {kind}, same pixels", figures, record_property)
    assert figures["max_abs_prob_diff"] <= ONE_SCORE_STEP, text


def test_mediapipe_scores_stay_close_when_it_resizes_itself(tiny_bundle, samples, record_property):
    """Scores, not calls: the tiny smoke model may put many cells within a resize's difference of its threshold.
    MediaPipe's resize moves some cells' scores (the real model: median 0.008, max 0.33 on 4,397 test cells); the
    typical cell stays close, which a wrong label order or pixel scale would not."""
    paths = expand_inputs([str(samples)]).images
    figures = compare(tiny_bundle, paths)
    text = report("tiny int8, MediaPipe's resize", figures, record_property)
    assert figures["mean_abs_prob_diff"] < RESIZE_MEAN_DIFF, text


def test_mediapipe_agrees_on_shared_cells(tiny_bundle, shared_data, record_property):
    paths = shared_sample(shared_data)
    same = compare(tiny_bundle, paths, same_pixels=True)
    text = report("tiny int8, NIH cells, same pixels", same, record_property)
    assert same["max_abs_prob_diff"] <= ONE_SCORE_STEP, text
    own = compare(tiny_bundle, paths)
    text = report("tiny int8, NIH cells, MediaPipe's resize", own, record_property)
    assert own["mean_abs_prob_diff"] < RESIZE_MEAN_DIFF, text


@pytest.fixture(scope="module")
def bundled_phone_model():
    from malaria_edge.edge_runtime.bundle import DEFAULT_MODEL, ModelBundle
    card = ModelBundle(DEFAULT_MODEL, verify=False).card.raw
    if not card.get("quantization", {}).get("phone_ready"):
        pytest.skip("the bundled model predates phone-ready files (int8 output, stain normalisation in numpy); "
                    "re-quantize it with edge-quantize")
    return DEFAULT_MODEL


def test_mediapipe_agrees_with_edge_classify_on_the_bundled_model(bundled_phone_model, samples, record_property):
    """The shipped model through the phone's client as a phone app calls it: with the same pixels, the same scores
    (>= 99.5% of calls agree); when MediaPipe resizes the photo itself, close (the target is missed, see below)."""
    paths = expand_inputs([str(samples)]).images
    if (SHARED_DATA / "Parasitized").is_dir():
        paths += shared_sample(SHARED_DATA)
    same = compare(bundled_phone_model, paths, same_pixels=True)
    text = report("bundled int8, same pixels", same, record_property)
    assert same["agreement"] >= 0.995 and same["max_abs_prob_diff"] <= ONE_SCORE_STEP, text
    own = compare(bundled_phone_model, paths)
    text = report("bundled int8, MediaPipe's resize", own, record_property)
    # The target is 99.5% here too: with the shipped model 99.59% of the 4,397 NIH test cells and 99.51%
    # of all 18,873 agree (edge-bench phone), this sample of 541 gives 99.26%. The calls
    # that differ come from the resize, not the cut (next test). This floor catches a regression, not the target.
    if len(paths) >= 500:
        assert own["agreement"] >= 0.985, text
    else:  # the 41 samples alone: one differing call is 2.4 points, so bound the scores instead
        assert own["mean_abs_prob_diff"] <= 0.03 and own["max_abs_prob_diff"] <= 0.3, text


def test_the_phone_differs_from_edge_classify_by_its_resize_alone(bundled_phone_model, samples, record_property):
    """Why the phone's calls differ (README, "Use it on a phone"): our central-cell cut handed to MediaPipe changes
    next to nothing, and our cut resized the way MediaPipe resizes (benchmarks/phone.py's ``phone_resize``) gives
    the phone's scores, to about one output step, through our own interpreter."""
    from malaria_edge.benchmarks.phone import compare as diagnose
    paths = expand_inputs([str(samples)]).images
    report = diagnose(bundled_phone_model, paths, None)
    for name, row in report.items():
        record_property(name, row)
    assert report["phone on our cut"]["median_abs_dp"] <= ONE_SCORE_STEP, report
    assert report["our cut, phone's resize"]["median_abs_dp"] <= ONE_SCORE_STEP, report
    assert report["our cut, phone's resize"]["max_abs_dp"] < report["edge-classify"]["max_abs_dp"], report
