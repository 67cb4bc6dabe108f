"""Segmentation alone on annotated fields of one split: red-cell recall, count error, parasites inside a found cell.

Faster than ``edge-bench fields --annotations`` (no classification), for tuning ``edge_runtime/segment.py`` on the
train fields and checking on val; report test with ``edge-bench fields --annotations`` once a design is chosen. The
same split, matching (IoU >= 0.5) and notion of a whole cell (annotated box not touching the border) as the bench
and training: all from ``edge_runtime.annotations``.

    python tools/segment_eval.py --split train [--fields DIR] [--worst 12]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from malaria_edge.benchmarks.fields import count_errors
from malaria_edge.edge_runtime.annotations import SPLIT_CHOICES, load_annotations, match, touches_border
from malaria_edge.edge_runtime.images import open_image
from malaria_edge.edge_runtime.segment import field_diameter, segment_field

IML = Path(__file__).resolve().parents[2] / "shared" / "data" / "fields" / "iml_vivax"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="train")
    parser.add_argument("--fields", type=Path, default=IML, help="folder with images/ and annotations.json")
    parser.add_argument("--worst", type=int, default=12, help="list this many fields with the lowest recall")
    args = parser.parse_args()
    rows = []
    cpu = time.process_time()
    for truth in load_annotations(args.fields / "annotations.json", args.split):
        rgb = np.asarray(open_image(args.fields / "images" / truth.name), dtype=np.uint8)
        height, width = rgb.shape[:2]
        diameter = field_diameter(rgb)
        boxes = [c.box for c in segment_field(rgb, diameter=diameter)]
        whole = {j for j, b in enumerate(truth.cells) if not touches_border(b, width, height)}
        matched = match(boxes, truth.cells)
        found = set(matched.values())
        every, in_scope = count_errors(boxes, truth, width, height, matched)
        parasites = {j for j, b in enumerate(truth.cells) if b in truth.parasites}
        rows.append({"field": truth.name, "whole": len(whole), "found": len(found & whole), "detected": len(boxes),
                     "count_error": in_scope, "count_error_every": every, "diameter": diameter,
                     "parasites": len(parasites), "parasites_found": len(found & parasites)})
    for r in sorted(rows, key=lambda r: r["found"] / max(1, r["whole"]))[:args.worst]:
        print(f"{r['field']:>14}  whole {r['whole']:4d}  found {r['found']:4d} ({r['found'] / max(1, r['whole']):.1%})"
              f"  detected {r['detected']:4d}  count error {r['count_error'] or 0:+.1%}  diameter {r['diameter'] or 0:.1f} px")
    whole, found = sum(r["whole"] for r in rows), sum(r["found"] for r in rows)
    errors = [r["count_error"] for r in rows if r["count_error"] is not None]
    every = [r["count_error_every"] for r in rows if r["count_error"] is not None]
    print(f"{args.split}: {len(rows)} fields, recall {found / whole:.2%} ({found}/{whole}), median count error "
          f"{statistics.median(errors):+.1%} (median |error| {statistics.median(abs(e) for e in errors):.1%}; every "
          f"detection {statistics.median(every):+.1%}), "
          f"fields >= 95% {sum(r['found'] >= 0.95 * r['whole'] for r in rows)}, parasites inside a found cell "
          f"{sum(r['parasites_found'] for r in rows)}/{sum(r['parasites'] for r in rows)}, "
          f"{(time.process_time() - cpu) / max(1, len(rows)):.2f} s CPU per field")


if __name__ == "__main__":
    main()
