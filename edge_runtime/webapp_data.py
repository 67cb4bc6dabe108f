"""The phone page's share of the Python side: where its files are, and the one source of its constants.

The page (``edge_runtime/webapp/``, served by ``edge-serve``) finds cells, judges fields and reads slides with the
same numbers as ``segment``, ``quality``, ``slide`` and ``results_io``; :func:`constants` collects them (every
module-level UPPER_CASE value that JSON can hold, report.py's TEMPLATE included: the page fills the same
template) with the model card's figures the page needs, and
``webapp/constants.json`` is that dict, written by :func:`write_constants` and checked by a test, so the two sides
cannot drift apart. Numbers written inside a function body of segment.py (kernel fractions, Hough's dp) are not
module constants: the JS port repeats them next to a comment naming the Python line.

    python -m malaria_edge.edge_runtime.webapp_data   # rewrite webapp/constants.json
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from .bundle import sha256_file
from .version import __version__

WEBAPP_DIR = Path(__file__).resolve().parent / "webapp"
MODELS_DIR = Path(__file__).resolve().parent / "models"
CONSTANTS_FILE = WEBAPP_DIR / "constants.json"
PHONE_MODEL = "malaria_int8_b1.tflite"
CARD = "malaria.json"


def _module_constants(module) -> Dict[str, Any]:
    out = {}
    for name, value in vars(module).items():
        if not name.isupper() or name.startswith("_"):
            continue
        if isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        if isinstance(value, (int, float, str, list, dict)) and not isinstance(value, bool):
            out[name] = value
    return out


def output_quantization(model: Path) -> Dict[str, float]:
    """The int8 file's output scale and zero point (uint8 scores -> probabilities), read by the interpreter."""
    from .backend import find_interpreter, make_interpreter  # the one interpreter factory
    interpreter = make_interpreter(find_interpreter()[0], str(model))
    detail = interpreter.get_output_details()[0]
    scale, zero = detail["quantization"]
    return {"scale": float(scale), "zero_point": int(zero), "dtype": str(detail["dtype"].__name__)}


def constants() -> Dict[str, Any]:
    """Everything the page reads that Python decides: per module, its constants; the phone model's file, digest
    and output quantization."""
    from . import fields, images, labels, overlay, quality, report, results_io, segment, slide, unfamiliar
    modules = {"segment": segment, "quality": quality, "slide": slide, "results_io": results_io,
               "unfamiliar": unfamiliar, "images": images, "fields": fields, "labels": labels,
               "overlay": overlay, "report": report}
    out: Dict[str, Any] = {name: _module_constants(module) for name, module in modules.items()}
    out["version"] = __version__
    model = MODELS_DIR / PHONE_MODEL
    card = json.loads((MODELS_DIR / CARD).read_text())
    out["model"] = {"file": PHONE_MODEL, "card": CARD,
                    "sha256": sha256_file(model), "card_sha256": sha256_file(MODELS_DIR / CARD),
                    "size": int(card["input"]["size"]), "head": card["head"], "threshold": float(card["threshold"]),
                    "output": output_quantization(model)}
    return out


def constants_text() -> str:
    return json.dumps(constants(), indent=1, sort_keys=True) + "\n"


def write_constants(path: Path = CONSTANTS_FILE) -> Path:
    path.write_text(constants_text())
    return path


if __name__ == "__main__":
    print(write_constants())
