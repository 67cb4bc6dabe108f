"""Choose a TFLite interpreter: ai_edge_litert, then tflite_runtime, then tensorflow.lite (only if installed).

Nothing here imports TensorFlow unless both light interpreters are missing.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from typing import Iterator, Optional, Tuple

from .errors import MalariaEdgeError

BACKENDS = (
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow.lite", "tensorflow"),
)


# What the TFLite C++ runtime writes to fd 2 when it applies its default CPU delegate: runtime chatter, not a
# message for the user, so it is kept off the terminal (every other line it writes is passed on).
RUNTIME_CHATTER = ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)


class BackendError(MalariaEdgeError, RuntimeError):
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


@contextlib.contextmanager
def native_stderr_filtered(chatter: Tuple[str, ...] = RUNTIME_CHATTER) -> Iterator[None]:
    """Catch what native code writes to file descriptor 2 while the block runs, then pass every line on to
    ``sys.stderr`` except the runtime's chatter. The C++ runtime writes past Python's ``sys.stderr``, so only
    redirecting the descriptor itself keeps its INFO line off the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode("utf-8", errors="replace")
        kept = [line for line in text.splitlines(keepends=True) if line.strip() not in chatter]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def make_interpreter(interpreter_cls: type, model_path: str, threads: Optional[int] = None):
    """The one place an interpreter is created: built and its tensors allocated (when the runtime applies its CPU
    delegate and says so on fd 2), with that chatter filtered out by :func:`native_stderr_filtered`."""
    with native_stderr_filtered():
        interpreter = interpreter_cls(model_path=model_path, num_threads=threads)
        interpreter.allocate_tensors()
    return interpreter
