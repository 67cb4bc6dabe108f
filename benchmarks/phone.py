"""How close a phone's standard client (MediaPipe Tasks ``ImageClassifier``, the same C++ pipeline as on Android
and iOS) comes to ``edge-classify`` on many real cells, and why they differ.

``edge-bench phone --manifest runs/data_ml/manifest.csv --split test`` (needs ``mediapipe``,
in the dev extra, and OpenCV). Four ways to score the same cells, each against the phone's own (the photo handed to
MediaPipe as it is), with accuracy and ROC AUC where labels are known:

- ``edge-classify``: our runtime (central-cell cut, Pillow's antialiased bilinear resize);
- ``phone on our cut``: MediaPipe given the crop after our central-cell cut (isolates the cut);
- ``our cut, phone's resize``: our cut, then the resize MediaPipe does on the CPU (bilinear sampling of output pixel
  ``j`` at source ``j * W / S``, no averaging of the pixels in between), through our interpreter (isolates the
  resize);
- ``phone``: the reference itself.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from malaria_edge.edge_runtime import Classifier
from malaria_edge.edge_runtime.images import cut_central_cell, load_image
from malaria_edge.edge_runtime.labels import PARASITIZED, label_from_folder
from malaria_edge.edge_runtime.metrics import roc_auc


def phone_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """MediaPipe's CPU resize as measured on its 1.2 wheel: bilinear, output pixel ``j`` sampled at source
    ``j * W / size`` (corners aligned at pixel edges, no half-pixel offset), edge pixels replicated, no averaging
    over the source pixels a step skips."""
    import cv2
    height, width = rgb.shape[:2]
    warp = np.float32([[width / size, 0, 0], [0, height / size, 0]])
    return cv2.warpAffine(np.ascontiguousarray(rgb), warp, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def phone_scores(model: Path, images: List[np.ndarray]) -> np.ndarray:
    """P(parasitized) from MediaPipe's ImageClassifier for each RGB uint8 image."""
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=2)
    out = []
    with vision.ImageClassifier.create_from_options(options) as phone:
        for rgb in images:
            result = phone.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
            out.append({c.category_name: c.score for c in result.classifications[0].categories}[PARASITIZED])
    return np.array(out)


def compare(model: Path, paths: List[str], labels: Optional[List[str]]) -> Dict[str, Dict]:
    """The four scorings of ``paths`` (see the module docstring), each with its agreement with the phone."""
    classifier = Classifier.load(model, threads=1)
    size, threshold = classifier.bundle.size, classifier.threshold
    photos = [np.asarray(load_image(p), dtype=np.uint8) for p in paths]
    cuts = [np.asarray(cut_central_cell(load_image(p)), dtype=np.uint8) for p in paths]
    phone = phone_scores(model, photos)
    resized = np.stack([phone_resize(c, size) for c in cuts])
    ours_with_phone_resize = np.concatenate([classifier.probabilities(resized[i:i + 64])[0]
                                             for i in range(0, len(resized), 64)])
    scorings = {"edge-classify": np.array([r.prob_parasitized for r in classifier.predict(paths, batch_size=32)]),
                "phone on our cut": phone_scores(model, cuts),
                "our cut, phone's resize": ours_with_phone_resize,
                "phone": phone}
    truth = None if labels is None else np.array([label == PARASITIZED for label in labels])
    report = {}
    for name, probs in scorings.items():
        diff = np.abs(probs - phone)
        row = {"agreement": float(np.mean((probs >= threshold) == (phone >= threshold))),
               "max_abs_dp": float(diff.max()), "median_abs_dp": float(np.median(diff))}
        if truth is not None:
            row["accuracy"] = float(np.mean((probs >= threshold) == truth))
            row["roc_auc"] = roc_auc(truth.astype(int), probs)
        report[name] = row
    return report


def cells_to_compare(manifest: Optional[Path], split: str, image_dir: Optional[Path]
                     ) -> Tuple[List[str], Optional[List[str]]]:
    """The cells to score and their labels: the NIH cells of ``split`` in an edge-prepare manifest, or every image
    under ``image_dir`` (labels from Parasitized/Uninfected folders, None unless every cell has one)."""
    if manifest:
        with open(manifest, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == split and r["source"] == "NIH"]
        return [r["path"] for r in rows], [r["label"] for r in rows]
    paths = sorted(str(p) for p in image_dir.rglob("*") if p.suffix.lower() in (".webp", ".png", ".jpg"))
    labels = [label_from_folder(p) for p in paths]
    return paths, (labels if all(labels) else None)


def format_comparison(report: Dict[str, Dict], cells: int, model: Path) -> str:
    """The human table: each scoring's agreement with the phone (%), its probability differences (|dp|, a
    probability, no unit), accuracy (%) and ROC AUC where labels are known."""
    lines = [f"{cells:,} cells, {model.name}; each scoring against MediaPipe given the photo",
             f"{'scoring':<26}{'agreement':>10}{'max |dp|':>10}{'median':>9}{'accuracy':>10}{'AUC':>8}"]
    for name, row in report.items():
        acc = f"{100 * row['accuracy']:.2f}%" if "accuracy" in row else "n/a"
        auc = f"{row['roc_auc']:.4f}" if row.get("roc_auc") is not None else "n/a"
        lines.append(f"{name:<26}{100 * row['agreement']:>9.2f}%{row['max_abs_dp']:>10.4f}"
                     f"{row['median_abs_dp']:>9.4f}{acc:>10}{auc:>8}")
    return "\n".join(lines)
