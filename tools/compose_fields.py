"""Compose the committed sample fields (edge_runtime/sample_fields) from public-domain NIH cells.

The IML fields have no licence and may not be copied into the repository, so the samples that tests and
``make demo`` use are made here: NIH cells (masked on black, public domain) pasted onto a glass-coloured background
with uneven light, some apart, some touching or overlapping, one cut by the border. Each cell's box and class go
to ``annotations.json`` in the IML layout (``red blood cell`` / ``parasitized``), so ``edge-bench fields --annotations`` can
score them. Seeded: the same command makes the same files.

    python tools/compose_fields.py --cells ../shared/data/cell_images --out edge_runtime/sample_fields
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

GLASS_RGB = (226, 214, 222)

# name, width, height, cells, touching pairs, cells cut by the border, parasitized fraction, light falloff
FIELDS = [
    ("nih_field_sparse", 900, 680, 20, 0, 0, 0.25, 0.05),
    ("nih_field_touching", 900, 680, 24, 6, 1, 0.3, 0.10),
    ("nih_field_dense", 1000, 750, 34, 8, 2, 0.2, 0.18),
]


def load_cell(path: Path, scale: float) -> tuple:
    """A cell on black -> (RGB array, bool mask of the cell), scaled."""
    img = Image.open(path).convert("RGB")
    size = max(24, int(round(img.width * scale)))
    img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    mask = arr.astype(np.int32).sum(axis=2) > 60
    # Drop the dark anti-aliased rim the NIH masking left, so no black outline shows on the glass.
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return arr, inner


def place_centres(rng, width, height, count, touching, cut, diameter) -> list:
    """Centres: ``touching`` pairs at 0.8-0.9 diameters, the rest at least 1.15 diameters from every other cell,
    ``cut`` of them straddling the border."""
    centres = []

    def free(x, y, gap):
        return all(math.hypot(x - cx, y - cy) >= gap * diameter for cx, cy, _ in centres)

    attempts = 0
    for i in range(cut):
        side = i % 4
        x = [0.0, width, rng.uniform(diameter, width - diameter), rng.uniform(diameter, width - diameter)][side]
        y = [rng.uniform(diameter, height - diameter), rng.uniform(diameter, height - diameter), 0.0, height][side]
        centres.append((x, y, "cut"))
    margin = 0.6 * diameter
    while len(centres) < count and attempts < 20000:
        attempts += 1
        x, y = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        if not free(x, y, 1.15 if touching == 0 else 1.9):
            continue
        if touching > 0:
            angle = rng.uniform(0, 2 * math.pi)
            dist = rng.uniform(0.8, 0.9) * diameter
            x2, y2 = x + dist * math.cos(angle), y + dist * math.sin(angle)
            if not (margin < x2 < width - margin and margin < y2 < height - margin):
                continue
            centres.append((x, y, "pair"))
            centres.append((x2, y2, "pair"))
            touching -= 1
        else:
            centres.append((x, y, "single"))
    return centres[:count]


def compose(rng, cells_root: Path, name, width, height, count, touching, cut, parasitized_fraction, falloff):
    parasitized = sorted((cells_root / "Parasitized").glob("*.png")) + sorted((cells_root / "Parasitized").glob("*.webp"))
    uninfected = sorted((cells_root / "Uninfected").glob("*.png")) + sorted((cells_root / "Uninfected").glob("*.webp"))
    diameter = 118.0
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = GLASS_RGB
    objects = []
    for x, y, kind in place_centres(rng, width, height, count, touching, cut, diameter):
        is_parasitized = rng.random() < parasitized_fraction
        source = (parasitized if is_parasitized else uninfected)[int(rng.integers(0, len(parasitized if is_parasitized else uninfected)))]
        arr, mask = load_cell(source, rng.uniform(0.85, 1.0))
        h, w = mask.shape
        x0, y0 = int(round(x - w / 2)), int(round(y - h / 2))
        fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x0 + w), min(height, y0 + h)
        if fx1 <= fx0 or fy1 <= fy0:
            continue
        sub_mask = mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
        sub = arr[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0].astype(np.float32)
        window = canvas[fy0:fy1, fx0:fx1]
        window[sub_mask] = sub[sub_mask]
        ys, xs = np.nonzero(sub_mask)
        objects.append({"type": "parasitized" if is_parasitized else "red blood cell",
                        "bbox": {"x": str(fx0 + int(xs.min())), "y": str(fy0 + int(ys.min())),
                                 "w": str(int(xs.max() - xs.min() + 1)), "h": str(int(ys.max() - ys.min() + 1))},
                        "source": source.name})
    # Uneven light: brighter in one corner, darker towards the opposite one.
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    r2 = ((gx - cx) ** 2 + (gy - cy) ** 2) / float(width * width + height * height)
    canvas *= (1.0 - falloff * 2.0 * r2)[:, :, None]
    canvas += rng.normal(0, 2.0, canvas.shape).astype(np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), objects


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=Path, default=Path("../shared/data/cell_images"))
    parser.add_argument("--out", type=Path, default=Path("edge_runtime/sample_fields"))
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    annotations = []
    for name, width, height, count, touching, cut, fraction, falloff in FIELDS:
        image, objects = compose(rng, args.cells, name, width, height, count, touching, cut, fraction, falloff)
        Image.fromarray(image).save(args.out / f"{name}.jpg", quality=90)
        annotations.append({"image_name": f"{name}.jpg", "objects": objects})
        print(f"{name}.jpg: {len(objects)} cells, {sum(o['type'] == 'parasitized' for o in objects)} parasitized")
    (args.out / "annotations.json").write_text(json.dumps(annotations, indent=1))


if __name__ == "__main__":
    main()
