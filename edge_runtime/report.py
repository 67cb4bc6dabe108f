"""One self-contained HTML report a clinic can keep: opens offline on a phone or a laptop, no script, no network.

Two steps, so the phone page can share the renderer: :func:`report_data` turns slides into a plain JSON dict (every
number already formatted, every picture a ``data:`` URI), and :func:`fill` puts that dict into :data:`TEMPLATE`, a
logic-less template (a Mustache subset: ``{{name}}`` escaped value, ``{{#list}}...{{/list}}`` repeat or show when
truthy, ``{{^name}}...{{/name}}`` show when empty/false, dotted names; ``{{.}}`` the current item). The JS page
fills the same template from the same dict with a ~30-line function, so both sides show the same report.

Per slide the page shows the call and the figures of ``SlideResult.to_json()`` (each in an element with
``data-key``/``data-value``, and the whole dict in the section's ``data-json``), every warning, the overlays with
candidates numbered (:mod:`overlay`), and the gallery of candidates by probability whose numbers are the ranks of
the rows and of the review file names.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .slide import SlideResult, cell_key, is_edge, is_left_out
from .version import __version__

DISCLAIMER = ("A screening aid, not a diagnosis: every candidate must be confirmed by a trained microscopist, and a "
              "negative result holds only down to the detection limit shown.")
OVERLAY_WIDTH = 960

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{{title}}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1000px;padding:12px;
color:#111;background:#fff;line-height:1.4}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.2em;margin:1em 0 .3em}
.disclaimer{border:2px solid #d55e00;padding:8px;font-weight:600}
.call{display:inline-block;padding:4px 10px;border-radius:4px;font-weight:700;border:2px solid #000}
.call-parasites-found{background:#d55e00;color:#fff}.call-review-needed{background:#e69f00}
.call-no-parasites-found{background:#56b4e9}.call-indeterminate{background:#ddd}
dl.figures{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px}dt{font-weight:600}
figure{margin:8px 0}img{max-width:100%;height:auto}
.gallery{display:flex;flex-wrap:wrap;gap:6px}.gallery figure{width:104px;text-align:center;font-size:.8em}
.gallery img{width:96px;height:96px;object-fit:contain;background:#000;image-rendering:pixelated}
.warnings li{color:#a33}footer{font-size:.85em;color:#444;margin-top:2em;border-top:1px solid #ccc}
</style></head><body>
<h1>{{title}}</h1>
<p class="disclaimer" id="disclaimer">{{disclaimer}}</p>
{{#slides}}
<section class="slide" id="slide-{{id}}" data-slide="{{name}}" data-json="{{json}}">
<h2>Slide {{name}}</h2>
<p>Call: <span class="call call-{{call_class}}" data-key="call" data-value="{{call}}">{{call}}</span>
{{#reviewed}}<span data-key="reviewed" data-value="true">(after review)</span>{{/reviewed}}
{{^reviewed}}<span data-key="reviewed" data-value="false">(before review)</span>{{/reviewed}}</p>
<p>{{reason}}</p>
<dl class="figures">
<dt>Cells examined</dt><dd data-key="cells" data-value="{{cells}}">{{cells_text}}</dd>
<dt>Candidates for review</dt><dd data-key="candidates" data-value="{{candidates}}">{{candidates_text}}</dd>
<dt>Parasitemia</dt><dd data-key="parasitemia" data-value="{{parasitemia}}">{{parasitemia_text}}</dd>
<dt>95% interval</dt><dd data-key="parasitemia_ci" data-value="{{parasitemia_ci}}">{{ci_text}}</dd>
<dt>Parasites per µL</dt><dd data-key="parasites_per_ul" data-value="{{parasites_per_ul}}">{{per_ul_text}}</dd>
<dt>Detection limit</dt><dd data-key="detection_limit" data-value="{{detection_limit}}">{{dl_text}}</dd>
</dl>
<p class="method">{{method}}</p>
{{#warnings.length}}<ul class="warnings">{{#warnings}}<li>{{.}}</li>{{/warnings}}</ul>{{/warnings.length}}
{{#gallery.length}}<h3>Candidates, most probable first</h3>
<div class="gallery">{{#gallery}}<figure id="{{id}}" data-rank="{{rank}}" data-field="{{field}}" data-cell="{{cell}}">
<img src="{{src}}" alt="candidate {{rank}}"><figcaption>#{{rank}} p={{prob}}<br>{{label}}</figcaption></figure>
{{/gallery}}</div>{{/gallery.length}}
{{#overlays}}<figure class="overlay" data-field="{{field}}"><img src="{{src}}" alt="overlay of {{name}}">
<figcaption>{{name}}: {{caption}}</figcaption></figure>{{/overlays}}
</section>
{{/slides}}
<footer>
<p>Model: <span id="model-name">{{model.name}}</span>, SHA-256 <span id="model-sha">{{model.sha256}}</span>.
Tool: malaria-edge <span id="tool-version">{{version}}</span>. Date: <span id="report-date">{{date}}</span>.</p>
{{#provenance.length}}<p>The model learned from: {{#provenance}}<span class="source">{{source}}: {{origin}}
({{licence}})</span>. {{/provenance}}</p>{{/provenance.length}}
<p>{{disclaimer}}</p>
</footer>
</body></html>
"""

_TAG = re.compile(r"\{\{([#^/]?)\s*([\w.]+)\s*\}\}")


def _lookup(stack: List[Any], name: str) -> Any:
    if name == ".":
        return stack[-1]
    head, *rest = name.split(".")
    for ctx in reversed(stack):
        if isinstance(ctx, Mapping) and head in ctx:
            value = ctx[head]
            break
    else:
        return None
    for part in rest:
        if part == "length" and isinstance(value, (list, tuple)):
            value = len(value)
        elif isinstance(value, Mapping):
            value = value.get(part)
        else:
            return None
    return value


def fill(template: str, data: Mapping) -> str:
    """Fill the logic-less template with ``data`` (see the module docstring for the tags)."""
    def render(text: str, stack: List[Any]) -> str:
        out, pos = [], 0
        while True:
            m = _TAG.search(text, pos)
            if not m:
                out.append(text[pos:])
                return "".join(out)
            out.append(text[pos:m.start()])
            kind, name = m.group(1), m.group(2)
            if kind in ("#", "^"):
                depth, scan = 1, m.end()
                while depth:
                    inner = _TAG.search(text, scan)
                    if inner is None:
                        raise ValueError(f"template: section {name} is not closed")
                    if inner.group(2) == name and inner.group(1) in ("#", "^"):
                        depth += 1
                    elif inner.group(2) == name and inner.group(1) == "/":
                        depth -= 1
                    scan = inner.end()
                body = text[m.end():inner.start()]
                value = _lookup(stack, name)
                if kind == "^":
                    if not value:
                        out.append(render(body, stack))
                elif isinstance(value, (list, tuple)):
                    out.extend(render(body, stack + [item]) for item in value)
                elif value:
                    out.append(render(body, stack + [value]))
                pos = scan
            else:
                value = _lookup(stack, name)
                out.append("" if value is None else html.escape(str(value), quote=True))
                pos = m.end()
    return render(template, [data])


def data_uri(rgb: np.ndarray, fmt: str = "PNG", max_width: Optional[int] = None, quality: int = 82) -> str:
    """An RGB array as a ``data:`` URI (PNG for crops, JPEG for overlays), scaled down to ``max_width``."""
    from PIL import Image
    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if max_width and img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


@dataclass
class SlidePage:
    """What the report shows of one slide: its result, and the FieldResults (with images) its cells came from, or
    crops for single-cell slides ({cell_key: crop})."""
    result: SlideResult
    fields: Sequence[Any] = ()
    crops: Optional[Mapping] = None
    gallery_limit: int = 60


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def slide_data(page: SlidePage, index: int) -> Dict:
    """The plain dict of one slide for the template."""
    from .overlay import draw_overlay, ranks_for_field
    from .segment import cut_cell
    r = page.result
    j = r.to_json()
    cands = r.candidate_list
    by_field = {str(f.source): f for f in page.fields}
    gallery = []
    for row in cands[:page.gallery_limit]:
        crop = None
        f = by_field.get(str(row.get("path")))
        if f is not None and f.image is not None and row.get("cell") not in (None, ""):
            cell = next((c for c in f.shown_cells if c.index == int(row["cell"])), None)
            crop = cut_cell(f.image, cell.region) if cell is not None and cell.region is not None else None
        elif page.crops is not None:
            crop = page.crops.get(cell_key(row))
        stem = Path(str(row.get("path") or "")).stem
        gallery.append({"id": f"s{index}-c{row['rank']}", "rank": row["rank"], "prob": f"{row['prob_parasitized']:.2f}",
                        "field": str(row.get("path") or ""), "cell": row.get("cell", ""),
                        "label": (f"{stem} cell {row['cell']}" if row.get("cell") not in (None, "") else stem)
                        + (" (cut by the image edge, not counted)" if is_edge(row) else "")
                        + (" (field left out, not counted)" if is_left_out(row) else ""),
                        "src": data_uri(crop) if crop is not None else ""})
    overlays = []
    for f in page.fields:
        if f.image is None:
            continue
        ranks = ranks_for_field(f, cands)
        overlays.append({"field": str(f.source), "name": Path(str(f.source)).name,
                         "caption": f"{len(f.cells)} cells; candidates " +
                                    (", ".join(f"#{v}" for v in sorted(ranks.values())) or "none"),
                         "src": data_uri(draw_overlay(f, ranks), "JPEG", OVERLAY_WIDTH)})
    ci = j["parasitemia_ci"]
    extra = "" if len(cands) <= page.gallery_limit else f" (gallery shows the first {page.gallery_limit})"
    d = r.detail()
    return {
        "id": index, "name": r.name or f"{index + 1}", "json": json.dumps(j), "call": r.call,
        "call_class": r.call.replace(" ", "-"), "reviewed": r.reviewed, "reason": r.reason,
        "cells": j["cells"], "candidates": j["candidates"],
        "parasitemia": "" if j["parasitemia"] is None else repr(j["parasitemia"]),
        "parasitemia_ci": "" if ci is None else json.dumps(ci),
        "parasites_per_ul": "" if j["parasites_per_ul"] is None else repr(j["parasites_per_ul"]),
        "detection_limit": "" if j["detection_limit"] is None else repr(j["detection_limit"]),
        "cells_text": f"{j['cells']:,}" + (f" (of {r.cells_total:,}; fields left out below)" if r.excluded_fields
                                           else ""),
        "candidates_text": f"{j['candidates']:,}" + extra + (f"; {r.confirmed} confirmed" if r.reviewed else ""),
        "parasitemia_text": _pct(j["parasitemia"]),
        "ci_text": "n/a" if ci is None else f"{_pct(ci[0])} to {_pct(ci[1])}",
        "per_ul_text": "n/a" if j["parasites_per_ul"] is None else
        f"{j['parasites_per_ul']:,.0f} (at {r.rbc_per_ul:,.0f} red cells/µL)",
        "dl_text": f"{_pct(j['detection_limit'])} ({d['detection_limit_meaning']})",
        "method": f"{d['method']}; rates measured on {d['rates'].get('measured_on', '?')} ({r.source}).",
        "warnings": list(r.warnings), "gallery": gallery, "overlays": overlays,
    }


def report_data(pages: Sequence[SlidePage], model_name: str, model_sha256: str, date: Optional[str] = None,
                title: str = "Malaria screening report", provenance: Optional[Mapping] = None) -> Dict:
    """The whole report as a plain JSON-able dict (the phone page builds the same dict). ``provenance``: the card's
    {training source: {origin, licence}}, so a clinic sees what its model learned from."""
    return {"title": title, "disclaimer": DISCLAIMER, "version": __version__,
            "date": date or _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "model": {"name": model_name, "sha256": (model_sha256 or "")[:12]},
            "provenance": [{"source": k, **v} for k, v in (provenance or {}).items()],
            "slides": [slide_data(p, i) for i, p in enumerate(pages)]}


def render_report(pages: Sequence[SlidePage], model_name: str, model_sha256: str, date: Optional[str] = None,
                  title: str = "Malaria screening report", template: str = TEMPLATE,
                  provenance: Optional[Mapping] = None) -> str:
    """One self-contained HTML page (see the module docstring)."""
    return fill(template, report_data(pages, model_name, model_sha256, date, title, provenance))


def model_identity(classifier) -> tuple:
    """(name, SHA-256) of a loaded Classifier's model file, for the report's footer."""
    bundle = classifier.bundle
    info = bundle.card.files.get(Path(bundle.path).name, {})
    return bundle.card.name or Path(bundle.path).stem, info.get("sha256", "")
