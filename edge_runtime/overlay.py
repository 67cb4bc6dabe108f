"""The field overlay a reader can use whatever their colour vision: candidates numbered, everything else quiet.

Colours are Okabe-Ito (safe for the common colour-vision deficiencies) and never carry meaning alone: a candidate
is a thick vermillion outline with its rank in a white-on-black label (the rank is the row's ``rank``, the review
file's leading number and the report gallery's number); every other cell is a thin sky-blue outline. The caption
names the field so an overlay found on its own still says where it came from. ``FieldResult.plot`` (and so
``edge-classify --overlays``) and the report both draw with :func:`draw_overlay`: one renderer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

# Okabe-Ito palette (RGB).
VERMILLION = (213, 94, 0)
ORANGE = (230, 159, 0)
SKY_BLUE = (86, 180, 233)
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


def overlay_caption(field, ranks: Mapping[int, int]) -> str:
    """The overlay's caption: the field's name, its whole cells and its candidates (those cut by the edge named)."""
    n_cand = sum(1 for c in field.shown_cells if c.index in ranks)
    candidates = f"{n_cand} candidate" + ("" if n_cand == 1 else "s")
    caption = f"{Path(str(field.source)).name}: {len(field.cells)} cells, {candidates}"
    n_edge = sum(1 for c in field.edge_cells if c.index in ranks)
    return caption + (f" ({n_edge} cut by the edge, not counted)" if n_edge else "")


def draw_overlay(field, ranks: Mapping[int, int], image: Optional[np.ndarray] = None) -> np.ndarray:
    """``field``: a FieldResult; ``ranks``: {cell index: candidate rank} for this field's candidates. Returns an
    RGB array: the field with every cell outlined (candidates thick vermillion with their rank, the others thin sky
    blue) under a caption band with the field's name, its counts and the legend."""
    import cv2
    base = field.image if image is None else image
    if base is None:
        raise ValueError("this result keeps no image; pass the field to draw_overlay(field, ranks, image)")
    out = np.ascontiguousarray(base[:, :, :3], dtype=np.uint8).copy()
    side = max(out.shape[:2])
    thin = max(1, int(round(side / 1000)))
    thick = max(3, int(round(side / 300)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.5, side / 1600.0)
    for c in field.shown_cells:
        rank = ranks.get(c.index)
        colour, width = (VERMILLION, thick) if rank is not None else (SKY_BLUE, thin)
        x, y, w, h = c.box
        if c.region is not None:
            contours, _ = cv2.findContours(c.region.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, width, offset=(x, y))
        else:
            cv2.rectangle(out, (x, y), (x + w, y + h), colour, width)
    for c in field.shown_cells:  # labels last, so no outline crosses a number
        rank = ranks.get(c.index)
        if rank is None:
            continue
        x, y, w, h = c.box
        label = str(rank)
        (tw, th), base_line = cv2.getTextSize(label, font, 0.9 * scale, max(1, thick - 1))
        lx = int(min(max(0, x + w - tw // 2), out.shape[1] - tw - 6))
        ly = int(max(th + 6, y + th // 2))
        cv2.rectangle(out, (lx - 3, ly - th - 5), (lx + tw + 3, ly + base_line), BLACK, -1)
        cv2.rectangle(out, (lx - 3, ly - th - 5), (lx + tw + 3, ly + base_line), ORANGE, max(1, thin))
        cv2.putText(out, label, (lx, ly), font, 0.9 * scale, WHITE, max(1, thick - 1), cv2.LINE_AA)
    band = int(40 * scale)
    canvas = np.full((out.shape[0] + band, out.shape[1], 3), 255, np.uint8)
    canvas[band:] = out
    cv2.putText(canvas, overlay_caption(field, ranks), (int(8 * scale), int(band * 0.7)), font, 0.7 * scale, BLACK,
                max(1, int(round(1.5 * scale))), cv2.LINE_AA)
    legend = [("candidate (numbered)", VERMILLION, thick), ("other cell", SKY_BLUE, thin)]
    x = canvas.shape[1]
    for text, colour, width in legend:
        (tw, _), _ = cv2.getTextSize(text, font, 0.6 * scale, 1)
        x -= tw + int(40 * scale)
        yc = int(band * 0.5)
        cv2.line(canvas, (x, yc), (x + int(22 * scale), yc), colour, width)
        cv2.putText(canvas, text, (x + int(28 * scale), int(band * 0.7)), font, 0.6 * scale, BLACK,
                    max(1, int(round(1.2 * scale))), cv2.LINE_AA)
    return canvas


def ranks_for_field(field, candidates) -> dict:
    """{cell index: rank} of the ranked candidate rows (``slide.candidate_rows``) that belong to ``field``."""
    return {int(r["cell"]): int(r["rank"]) for r in candidates
            if str(r.get("path")) == str(field.source) and r.get("cell") not in (None, "")}
