"""Write web/test/fixtures.json: what the Python side answers on small inputs, for the page's JS unit tests
(`node --test` in web/): Pillow's bilinear resize of cells, the unfamiliar score, slide readings and the report
template filled. Rerun after changing any of those on the Python side:

    python tools/webapp_fixtures.py
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from PIL import Image

from malaria_edge.edge_runtime import report, slide
from malaria_edge.edge_runtime.unfamiliar import cell_scores, colour_features

REPO = Path(__file__).resolve().parent.parent
CARD = json.loads((REPO / "edge_runtime" / "models" / "malaria.json").read_text())
# The interval is a percentile of Beta draws, and Python and the page draw from different generators: at the
# runtime's 4,000 draws the 97.5% point of a slide with nothing flagged moved 20% between them (0.0032 vs 0.0038);
# at 200,000 both land within 1% of each other, so the comparison tests the arithmetic, not the generators.
SLIDE_DRAWS = 200_000


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode()


def main() -> None:
    rng = np.random.default_rng(7)
    resizes = []
    for w, h in ((37, 29), (48, 48), (66, 51), (20, 61), (48, 30), (24, 24), (90, 31), (31, 90), (50, 47), (12, 13), (65, 117), (60, 73), (60, 72), (100, 153)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[: h // 4] = 0  # a black part, as a cell on black
        out = np.asarray(Image.fromarray(img).resize((48, 48), Image.BILINEAR))
        feats = colour_features(out[None])[0]
        score = float(cell_scores(out[None], CARD["unfamiliar"]["statistics"])[0])
        resizes.append({"width": w, "height": h, "input": b64(img), "output": b64(out),
                        "features": [float(v) for v in feats], "unfamiliar": score})
    rule = slide.SlideRule.from_dict(CARD["slide_rule"])
    band = round((rule.candidate_threshold + rule.threshold) / 2, 3)   # a candidate not called parasitized
    slides = []
    for n, probs in (("clean", [0.01] * 300), ("few", [0.01] * 20 + [0.9]),
                     ("flagged", [0.02] * 200 + [0.95] * 30 + [band] * 5),
                     ("band", [0.02] * 250 + [0.6] * 5 + [band] * 6),
                     ("left out", [0.9] * 5 + [band] * 2 + [0.01] * 293)):
        rows = [{"path": f"f{i // 100}.jpg", "cell": i % 100 + 1, "prob_parasitized": p,
                 "prediction": "parasitized" if p >= 0.5 else "uninfected"} for i, p in enumerate(probs)]
        if n == "left out":  # a field that failed the quality gate: its most probable cells shown, never counted
            rows = [dict(r, warnings=["out of focus"]) if r["path"] == "f0.jpg" else r for r in rows]
        r = slide.assess_slide(rows, rule, name=n, draws=SLIDE_DRAWS)
        reviewed = {slide.cell_key(c) for c in r.candidate_list[:2]}
        rr = slide.assess_slide(rows, rule, name=n, reviewed=reviewed, draws=SLIDE_DRAWS)
        result = {**r.to_json(), "reason": r.reason, "p_value": r.p_value, "flagged": r.flagged, "warnings": r.warnings,
                  "ranked": [[c["rank"], c["path"], c["cell"], slide.is_left_out(c)] for c in r.candidate_list]}
        slides.append({"name": n, "draws": SLIDE_DRAWS, "rows": rows, "result": result,
                       "reviewed_keys": [list(k) for k in sorted(reviewed)],
                       "reviewed": {**rr.to_json(), "reason": rr.reason, "confirmed": rr.confirmed}})
    data = {"title": "T <&>", "disclaimer": report.DISCLAIMER, "version": "v", "date": "d",
            "model": {"name": "m", "sha256": "abc"},
            "slides": [{"id": 0, "name": "s&1", "json": "{}", "call": "review needed", "call_class": "review-needed",
                        "reviewed": False, "reason": "r", "cells": 3, "candidates": 1, "parasitemia": "0.5",
                        "parasitemia_ci": "[0.1, 0.9]", "parasites_per_ul": "", "detection_limit": "0.01",
                        "cells_text": "3", "candidates_text": "1", "parasitemia_text": "50.00%", "ci_text": "x",
                        "per_ul_text": "n/a", "dl_text": "1%", "method": "m", "warnings": ["w1", "w<2>"],
                        "gallery": [{"id": "s0-c1", "rank": 1, "prob": "0.90", "field": "f", "cell": 2, "label": "l",
                                     "src": ""}], "overlays": []}]}
    out = {"resize": resizes, "slides": slides, "report": {"data": data, "html": report.fill(report.TEMPLATE, data)}}
    path = REPO / "web" / "test" / "fixtures.json"
    path.write_text(json.dumps(out))
    print(path)


if __name__ == "__main__":
    main()
