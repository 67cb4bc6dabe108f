"""Choose a TFLite interpreter: ai_edge_litert, then tflite_runtime, then tensorflow.lite (only if installed).

Nothing here imports TensorFlow unless both light interpreters are missing.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Tuple

BACKENDS = (
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow.lite", "tensorflow"),
)


class BackendError(RuntimeError):
    """No usable TFLite interpreter; the message says what to install."""


def _version(distribution: str, module) -> str:
    """The backend's version: its package's ``__version__`` (ai-edge-litert, tflite-runtime and tensorflow all set
    it to the installed release), else the installed distribution's metadata. importlib.metadata is imported only
    then: its import alone is ~20 ms of every run's start-up."""
    package = sys.modules.get(module.__name__.split(".")[0])
    version = getattr(package, "__version__", None)
    if isinstance(version, str) and version:
        return version
    import importlib.metadata
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def find_interpreter(preferred: Optional[str] = None) -> Tuple[type, str, str]:
    """Return (Interpreter class, backend name, version). ``preferred`` forces one backend by name."""
    candidates = [b for b in BACKENDS if preferred in (None, b[0])]
    if not candidates:
        raise BackendError(f"unknown backend {preferred!r}; choose one of {[b[0] for b in BACKENDS]}")
    errors = []
    for name, module_name, distribution in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        interpreter = getattr(module, "Interpreter", None)
        if interpreter is None:
            errors.append(f"{name}: no Interpreter in {module_name}")
            continue
        return interpreter, name, _version(distribution, module)
    raise BackendError("no TFLite interpreter found; install one: pip install ai-edge-litert "
                       "(or tflite-runtime on older boards)" + (f" [{'; '.join(errors)}]" if errors else ""))
