"""The model bundle: a ``.tflite`` file plus its JSON model card, checked before it is trusted.

One card may describe several files (``malaria.json`` describes ``malaria_int8.tflite`` and ``malaria_fp32.tflite``);
a card named like the file (``x_int8.json``) takes precedence. The card holds the SHA-256 of each file, and a file
whose hash differs is refused: on a field device a half-copied model must not give confident wrong answers.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .backend import find_interpreter, make_interpreter
from .card import CardError, ModelCard, read_card
from .errors import MalariaEdgeError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = DEFAULT_MODEL_DIR / "malaria_int8.tflite"
TFLITE_IDENTIFIER = b"TFL3"


class ModelError(MalariaEdgeError, RuntimeError):
    """A model file or card that cannot be used; the message is one line saying what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_card(model: Path) -> Path:
    """``x_int8.json`` beside ``x_int8.tflite``, else ``x.json`` (the card of the whole bundle)."""
    own = model.with_suffix(".json")
    if own.is_file():
        return own
    shared = model.with_name(re.sub(r"_(int8|fp32|float32|float16|fp16)$", "", model.stem) + ".json")
    if shared.is_file():
        return shared
    raise ModelError(f"{model}: no model card ({own.name} or {shared.name}) beside it; a model travels with its card "
                     "(edge-quantize writes both)")


def check_flatbuffer(model: Path) -> None:
    """Refuse files that are not TFLite flatbuffers before an interpreter sees them (it may crash on garbage)."""
    if not model.is_file():
        raise ModelError(f"{model}: model file not found")
    size = model.stat().st_size
    with open(model, "rb") as fh:
        head = fh.read(8)
    if size < 16 or head[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(f"{model}: not a TFLite model (no TFL3 flatbuffer identifier); pass a .tflite file "
                         "written by edge-quantize")


class ModelBundle:
    """A checked TFLite model with its card, ready to run batches of uint8 cells."""

    def __init__(self, model, threads: Optional[int] = None, backend: Optional[str] = None, verify: bool = True):
        self.path = Path(model)
        check_flatbuffer(self.path)
        self.card_path = find_card(self.path)
        try:
            self.card: ModelCard = read_card(self.card_path)
        except CardError as exc:
            raise ModelError(f"{self.card_path}: {exc}; use the card written with this model") from None
        self.file_info = self.card.files.get(self.path.name)
        if self.file_info is None:
            raise ModelError(f"{self.card_path}: the card does not describe {self.path.name}; use the card written "
                             "with this model")
        if verify:
            actual = sha256_file(self.path)
            if actual != self.file_info.get("sha256"):
                raise ModelError(f"{self.path}: SHA-256 {actual[:12]}... does not match its card "
                                 f"({str(self.file_info.get('sha256'))[:12]}...); the file is damaged or not the one "
                                 "the card describes: copy the bundle again")
        interpreter_cls, self.backend, self.backend_version = find_interpreter(backend)
        self.threads = threads
        started = time.perf_counter()
        try:
            self.interpreter = make_interpreter(interpreter_cls, str(self.path), threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{self.path}: the interpreter cannot load this model ({exc})") from None
        self.load_seconds = time.perf_counter() - started
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = 1
        self.size = self.card.input_size
        if tuple(self._input["shape"][1:]) != (self.size, self.size, 3):
            raise ModelError(f"{self.path}: input shape {tuple(self._input['shape'])} disagrees with the card's "
                             f"{self.size}x{self.size}x3")

    @property
    def head(self) -> str:
        return self.card.head

    @property
    def stain(self) -> Optional[Dict]:
        return self.card.stain

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def kind(self) -> str:
        return self.file_info.get("kind", "unknown")

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._input["dtype"]).name

    @property
    def output_dtype(self) -> str:
        return np.dtype(self._output["dtype"]).name

    def reference_path(self) -> Optional[Path]:
        """The full (float32) model this file was made from, when the card names one beside it."""
        name = self.card.reference
        if name and name != self.path.name and (self.path.parent / name).is_file():
            return self.path.parent / name
        return None

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self._input["index"], [batch, self.size, self.size, 3])
            self.interpreter.allocate_tensors()
            self._input = self.interpreter.get_input_details()[0]
            self._output = self.interpreter.get_output_details()[0]
            self._batch = batch

    def _quantize_input(self, pixels: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if dtype == np.float32:
            return pixels.astype(np.float32)
        scale, zero = self._input["quantization"]
        if scale == 1.0 and zero == 0 and dtype == np.uint8:
            return pixels
        info = np.iinfo(dtype)
        return np.clip(np.round(pixels.astype(np.float32) / scale + zero), info.min, info.max).astype(dtype)

    def run(self, pixels: np.ndarray) -> Tuple[np.ndarray, float]:
        """Run a uint8 batch [N, size, size, 3]; return (float outputs [N, ...], seconds of inference)."""
        self._resize(len(pixels))
        self.interpreter.set_tensor(self._input["index"], self._quantize_input(pixels))
        started = time.perf_counter()
        self.interpreter.invoke()
        seconds = time.perf_counter() - started
        raw = self.interpreter.get_tensor(self._output["index"])
        if raw.dtype != np.float32:
            scale, zero = self._output["quantization"]
            raw = (raw.astype(np.float32) - zero) * scale
        return raw, seconds

    def describe(self) -> Dict:
        return {"path": str(self.path), "kind": self.kind, "bytes": self.path.stat().st_size,
                "sha256": self.file_info.get("sha256"), "backend": self.backend,
                "backend_version": self.backend_version, "threads": self.threads, "input_dtype": self.input_dtype}
