"""Keras -> float32 TFLite (the "full model") and full-integer int8 TFLite, calibrated on training patients only.

The path that works with Keras 3 on TF 2.21: ``model.export(dir)`` writes a SavedModel, then
``tf.lite.TFLiteConverter.from_saved_model(dir)`` converts it. int8: weights per channel, activations int8,
uint8 input (raw pixels go straight in: the model's first layer rescales 0..255) and int8 output.
"""
from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import List

import numpy as np

from malaria_edge.train.dataset import Cell


def calibration_cells(cells: List[Cell], count: int = 400, seed: int = 0) -> List[Cell]:
    """Draw ``count`` training cells balanced by class and spread over patients (round-robin over patients
    within each class), so no single patient's staining dominates the activation ranges."""
    train = [c for c in cells if c.split == "train"]
    if not train:
        raise ValueError("the manifest has no training cells to calibrate on")
    rng = random.Random(seed)
    chosen: List[Cell] = []
    labels = sorted({c.label for c in train})
    for label in labels:
        by_patient = defaultdict(list)
        for c in train:
            if c.label == label:
                by_patient[c.patient].append(c)
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_patient.items())]
        rng.shuffle(queues)
        want = count // len(labels)
        picked: List[Cell] = []
        while len(picked) < want and any(queues):
            for q in queues:
                if q and len(picked) < want:
                    picked.append(q.pop())
        chosen.extend(picked)
    rng.shuffle(chosen)
    return chosen


def _export(model, workdir: Path) -> Path:
    saved = workdir / "saved_model"
    model.export(str(saved), verbose=False)
    return saved


def convert(model, calibration: np.ndarray, fp32_path: Path, int8_path: Path) -> None:
    """Write the float32 and the full-integer int8 TFLite files of a Keras model.

    ``calibration``: uint8 cells [N, size, size, 3], preprocessed exactly as the runtime does.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        saved = _export(model, Path(tmp))
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        fp32_path.write_bytes(converter.convert())

        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative():
            for cell in calibration:
                yield [cell[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.int8
        int8_path.write_bytes(converter.convert())
