"""Write the phone's copy of an int8 model: the same flatbuffer with every batch dimension fixed at 1.

LiteRT.js refuses a model whose input signature has a dynamic batch ([-1, 48, 48, 3]). The weights, the
quantization and the TFLite metadata are those of the source file; only the tensors' ``shape_signature`` changes
(-1 -> 1 in the first place), so its outputs on a batch of one are those of the source file, bit for bit
(checked here with ai-edge-litert on the sample cells). The card gets an entry for it under ``files``.

    python tools/export_batch1.py edge_runtime/models/malaria_int8.tflite
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np


def fix_batch(source: Path, target: Path) -> int:
    from tensorflow.lite.tools import flatbuffer_utils as fu  # the quantize side's tool: TensorFlow is there
    model = fu.read_model(str(source))
    changed = 0
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            sig = tensor.shapeSignature
            if sig is not None and len(sig) and int(sig[0]) == -1:
                sig[0] = 1
                changed += 1
    fu.write_model(model, str(target))
    return changed


def same_outputs(source: Path, target: Path, cells: list) -> int:
    """Run both files on each cell (batch of one); raise when any output differs. Returns the cells checked."""
    from ai_edge_litert.interpreter import Interpreter
    from malaria_edge.edge_runtime.images import prepare_cell
    a, b = Interpreter(model_path=str(source)), Interpreter(model_path=str(target))
    a.allocate_tensors()
    b.allocate_tensors()
    for path in cells:
        pixels = prepare_cell(path, 48)[None]
        out = []
        for it in (a, b):
            it.set_tensor(it.get_input_details()[0]["index"], pixels)
            it.invoke()
            out.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
        if not np.array_equal(out[0], out[1]):
            raise SystemExit(f"outputs differ on {path}: {out[0]} vs {out[1]}")
    return len(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    args = parser.parse_args()
    source = args.model
    target = source.with_name(source.stem + "_b1.tflite")
    changed = fix_batch(source, target)
    samples = Path(__file__).resolve().parent.parent / "edge_runtime" / "samples"
    checked = same_outputs(source, target, sorted(p for p in samples.rglob("*") if p.suffix in (".png", ".webp", ".jpg")))
    from malaria_edge.edge_runtime.bundle import find_card
    card_path = find_card(source)
    card = json.loads(card_path.read_text())
    data = target.read_bytes()
    info = dict(card["files"][source.name])
    info.update({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "batch": 1,
                 "derived_from": source.name,
                 "note": "the int8 file with its batch fixed at 1 for LiteRT.js (the phone page); same weights, "
                         "bit-identical outputs (tools/export_batch1.py)"})
    card["files"][target.name] = info
    card_path.write_text(json.dumps(card, indent=2, ensure_ascii=False))
    print(f"{target}: {changed} tensors fixed at batch 1, {checked} sample cells identical; card updated")


if __name__ == "__main__":
    main()
