"""Cells as arrays: a manifest's cells decoded once with the runtime's own preprocessing (and cached), and
P(parasitized) of such arrays through a bundle's interpreter.

numpy and pillow only, so training, quantizing and adapting share it without importing TensorFlow or one another.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .bundle import ModelBundle
from .images import ImageError, prepare_cell
from .labels import PARASITIZED
from .manifest import NIH, Cell
from .outputs import parasitized_probability


# Bump when prepare_cell's output changes, so no stale cache is trained on.
PREPROCESSING_VERSION = 2  # 2: single cells cut to their central cell; field cells kept as the segmentation cut them


def cache_key(cells: List[Cell], size: int, stain: Optional[Dict]) -> str:
    digest = hashlib.sha256(json.dumps([size, stain, PREPROCESSING_VERSION], sort_keys=True).encode())
    for c in cells:
        digest.update(f"{c.path},{c.sha256}\n".encode())
    return digest.hexdigest()[:16]


def load_arrays(cells: List[Cell], size: int, stain: Optional[Dict] = None, cache_dir: Optional[Path] = None,
                workers: int = 4) -> Tuple[np.ndarray, np.ndarray]:
    """Return (pixels uint8 [N, size, size, 3], labels int [N], 1 = parasitized), cached as .npz when asked.

    Cells of a field source were cut by the runtime's segmentation (``segment.cut_cell``) and go in as they are,
    exactly as the field path feeds them to the model; single-cell crops (NIH) are cut to their central cell, as
    the runtime does for any single-cell image."""
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"cells_{size}_{cache_key(cells, size, stain)}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as data:
                return data["x"], data["y"]
    def prepare(cell: Cell) -> np.ndarray:
        try:
            return prepare_cell(cell.path, size, stain, central=cell.source == NIH)
        except ImageError as exc:
            raise ImageError(f"{cell.path}: {exc}; run edge-prepare again if the data moved") from None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pixels = list(pool.map(prepare, cells))
    x = np.stack(pixels).astype(np.uint8) if pixels else np.zeros((0, size, size, 3), np.uint8)
    y = np.array([1 if c.label == PARASITIZED else 0 for c in cells], dtype=np.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer: two trainings decoding the same cells at once each finish their file and
        # the last rename wins (both files hold the same cells), instead of one renaming the other's away.
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(cache_file)
    return x, y


def bundle_probabilities(bundle: ModelBundle, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    """P(parasitized) for uint8 cells [N, size, size, 3] through the runtime's interpreter wrapper, ``batch`` at a
    time: how edge-quantize and edge-adapt measure the files they write."""
    out = [parasitized_probability(bundle.run(pixels[i:i + batch])[0], bundle.head)
           for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros(0)
