"""Measure how the single-cell path treats crops cut tight by another tool (the cell fills the crop, touching every
edge): NIH cells cut to the bounding box of their non-black mask, then 5-15% further inward on each side, on their
own black corners ("tight") and with the black background replaced by glass-coloured light ("glass"). Prints the
share classified (not refused) and the accuracy against the folder labels, untouched vs tight vs glass.

    python scripts/tight_crops.py [CELL_IMAGES] [--cells 2000] [--model BUNDLE_INT8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from malaria_edge.edge_runtime.classifier import Classifier

GLASS = np.array([214, 200, 212], np.float32)


def tight_versions(rgb: np.ndarray, rng: np.random.Generator) -> dict:
    """The untouched cell, its tight crop on its own black, and the same with the black turned to glass."""
    nonblack = rgb.astype(np.int32).sum(axis=2) > 30
    ys, xs = np.nonzero(nonblack)
    box = rgb[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    mask = nonblack[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape[:2]
    top, bottom = (int(round(h * f)) for f in rng.uniform(0.05, 0.15, 2))
    left, right = (int(round(w * f)) for f in rng.uniform(0.05, 0.15, 2))
    window = (slice(top, h - bottom), slice(left, w - right))
    glass = np.where(mask[..., None], box, np.clip(GLASS + rng.normal(0, 3, box.shape), 0, 255)).astype(np.uint8)
    return {"untouched": rgb, "tight": np.ascontiguousarray(box[window]),
            "glass": np.ascontiguousarray(glass[window])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                       "cell_images"))
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    files = sorted(Path(args.data).rglob("*.png")) + sorted(Path(args.data).rglob("*.webp"))
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.choice(len(files), min(args.cells, len(files)), replace=False)]
    classifier = Classifier.load(args.model) if args.model else Classifier.load()
    kinds = ("untouched", "tight", "glass")
    done = {k: 0 for k in kinds}
    right = {k: 0 for k in kinds}
    refused = {k: [] for k in kinds}
    for path in files:
        label = "parasitized" if path.parent.name.lower() == "parasitized" else "uninfected"
        for kind, image in tight_versions(np.asarray(Image.open(path).convert("RGB")), rng).items():
            result = classifier.predict(image)[0]
            if result.error:
                refused[kind].append(f"{path.name}: {result.error}")
                continue
            done[kind] += 1
            right[kind] += result.prediction == label
    for kind in kinds:
        print(f"{kind:<10} classified {done[kind]}/{len(files)} ({100 * done[kind] / len(files):.2f}%), accuracy "
              f"{100 * right[kind] / max(1, done[kind]):.2f}% of those")
        for line in refused[kind][:3]:
            print(f"   refused {line}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
