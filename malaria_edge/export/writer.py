"""The one bundle writer: Keras model -> fp32 + int8 TFLite -> TFLite metadata -> SHA-256 -> Keras copy -> card.

edge-quantize and edge-adapt both write their bundles here, so the files and the card fields that describe them
(head, reference, files, keras_model, tool_version) are made one way. Every card goes through ``parse_card`` before
it is written: a card the runtime would refuse is never written.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from malaria_edge.edge_runtime.bundle import ModelBundle, sha256_file
from malaria_edge.edge_runtime.card import ModelCard, parse_card, write_json_atomic
from malaria_edge.edge_runtime.version import __version__

KINDS = ("int8", "fp32")


@dataclass(frozen=True)
class BundlePaths:
    """Where a bundle's four files go: ``<name>_int8.tflite``, ``<name>_fp32.tflite``, ``<name>.keras`` and the card
    ``<name>.json``, side by side in ``folder``."""
    folder: Path
    name: str

    @property
    def int8(self) -> Path:
        return self.folder / f"{self.name}_int8.tflite"

    @property
    def fp32(self) -> Path:
        return self.folder / f"{self.name}_fp32.tflite"

    @property
    def keras(self) -> Path:
        return self.folder / f"{self.name}.keras"

    @property
    def card(self) -> Path:
        return self.folder / f"{self.name}.json"

    def tflite(self, kind: str) -> Path:
        return self.int8 if kind == "int8" else self.fp32


def describe_file(path: Path, kind: Optional[str] = None) -> Dict:
    """A card's entry for one file of the bundle: its kind (when a model file), size and SHA-256."""
    entry = {"kind": kind} if kind else {}
    return {**entry, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_card(path: Path, card: Dict) -> ModelCard:
    """Stamp ``card`` with this tool's version, check it as the runtime will read it, and write it atomically.
    Returns the checked card."""
    card["tool_version"] = __version__
    checked = parse_card(card)
    write_json_atomic(path, checked.to_json())
    return checked


def write_bundle(model, calibration: np.ndarray, paths: BundlePaths, card: Dict,
                 keras_source: Optional[Path] = None) -> Dict:
    """Write a complete bundle for the Keras ``model``: both TFLite files (int8 calibrated on ``calibration``, uint8
    cells as the runtime prepares them), their phone metadata, the Keras weights (a copy of ``keras_source``, or
    ``model`` saved) and the card.

    ``card`` describes the model (labels, input size, preprocessing, threshold, training data...); the fields that
    describe the files are filled in here, in place. Returns ``card``, which the caller goes on filling with what it
    measures on the written files before :func:`write_card` writes it again."""
    from malaria_edge.export.convert import OUTPUT_HEAD, convert
    from malaria_edge.export.metadata import write_bundle_metadata

    paths.folder.mkdir(parents=True, exist_ok=True)
    convert(model, calibration, paths.fp32, paths.int8)
    write_bundle_metadata(paths.int8, paths.fp32, list(card["labels"]), int(card["input"]["size"]))
    if keras_source is not None:
        shutil.copyfile(keras_source, paths.keras)
    else:
        model.save(paths.keras)
    card["head"] = OUTPUT_HEAD
    card["reference"] = paths.fp32.name
    card["files"] = {paths.tflite(kind).name: describe_file(paths.tflite(kind), kind) for kind in KINDS}
    card["keras_model"] = {"file": paths.keras.name, **describe_file(paths.keras)}
    write_card(paths.card, card)
    return card


def load_written(paths: BundlePaths, card: Dict, threads: Optional[int] = None) -> Dict[str, ModelBundle]:
    """The bundle's two files loaded through the runtime (which checks them against the card just written), by
    kind; each file's tensor dtypes are recorded in ``card``."""
    bundles = {kind: ModelBundle(paths.tflite(kind), threads=threads) for kind in KINDS}
    for bundle in bundles.values():
        card["files"][bundle.path.name].update({"input_dtype": bundle.input_dtype,
                                                "output_dtype": bundle.output_dtype})
    return bundles
