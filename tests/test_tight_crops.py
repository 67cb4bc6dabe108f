"""Crops another tool cut tight (the cell fills the crop and touches every edge, no black background) are cells:
classified, never refused as "no cell found"; blank, black, uniform and noise pictures are still refused."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from malaria_edge.edge_runtime.images import ImageError, check_cell_plausible, prepare_cell, prepare_single_cell
from conftest import REPO

pytest.importorskip("cv2")
spec = importlib.util.spec_from_file_location("tight_crops", REPO / "scripts" / "tight_crops.py")
tight_crops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tight_crops)


def _refusal(image) -> str:
    """'' when both single-cell paths (the classifier's array path and prepare_cell) take the crop, else why not."""
    try:
        check_cell_plausible(Image.fromarray(image))
        prepare_single_cell(image, 48)
        prepare_cell(Image.fromarray(image), 48)
        return ""
    except ImageError as exc:
        return str(exc)


def test_tight_crops_of_the_sample_cells_are_classified(samples):
    rng = np.random.default_rng(0)
    for path in sorted(samples.rglob("*.webp")):
        versions = tight_crops.tight_versions(np.asarray(Image.open(path).convert("RGB")), rng)
        for kind in ("tight", "glass"):
            assert _refusal(versions[kind]) == "", f"{kind} crop of {path.name} refused"


def test_tight_crops_of_nih_cells_are_classified_as_their_cells_are(shared_data):
    """At least 99.5% of 400 NIH cells' tight and glass crops are classified, and their calls agree with the
    untouched cells' calls on most of them (the model was trained on cells on black)."""
    from malaria_edge.edge_runtime.classifier import Classifier
    files = sorted(shared_data.rglob("*.png")) + sorted(shared_data.rglob("*.webp"))
    rng = np.random.default_rng(1)
    files = [files[i] for i in rng.choice(len(files), 400, replace=False)]
    classifier = Classifier.load()
    calls = {"untouched": [], "tight": [], "glass": []}
    for path in files:
        for kind, image in tight_crops.tight_versions(np.asarray(Image.open(path).convert("RGB")), rng).items():
            calls[kind].append(classifier.predict(image)[0].prediction)
    for kind in ("tight", "glass"):
        taken = sum(c is not None for c in calls[kind])
        assert taken >= 0.995 * len(files), f"{kind}: only {taken} of {len(files)} classified"
        agree = np.mean([a == b for a, b in zip(calls["untouched"], calls[kind])])
        assert agree >= 0.85, f"{kind}: calls agree with the untouched cells' on only {agree:.1%}"


@pytest.mark.parametrize("name", ["white", "black", "uniform", "uniform noise", "grey noise", "glass noise"])
def test_pictures_that_fill_the_crop_but_are_no_cell_are_still_refused(name):
    rng = np.random.default_rng(0)
    image = {"white": np.full((100, 100, 3), 255, np.uint8), "black": np.zeros((100, 100, 3), np.uint8),
             "uniform": np.full((100, 100, 3), (180, 90, 120), np.uint8),
             "uniform noise": rng.integers(0, 256, (100, 100, 3), dtype=np.uint8),
             "grey noise": np.clip(150 + rng.normal(0, 12, (100, 100, 3)), 0, 255).astype(np.uint8),
             "glass noise": np.clip(212 + rng.normal(0, 3, (100, 100, 3)), 0, 255).astype(np.uint8)}[name]
    assert _refusal(image) != ""
    with pytest.raises(ImageError):
        prepare_cell(Image.fromarray(image), 48)
