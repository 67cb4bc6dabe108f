"""Measure the slide rule on validation data and score it once on test data.

    python tools/slide_eval.py measure   # validation only -> docs/slide_rule.json
    python tools/slide_eval.py evaluate  # test only, with the rule from measure -> docs/slide_eval.json + table

Data (default: $MALARIA_DATA, else shared/data beside the repository):
  IML fields  fields/iml_vivax/{images,annotations.json}; split in blocks of 8 consecutive captures
              (edge_runtime.annotations.field_split: block % 4 == 3 test, block % 8 == 1 val). One block = one slide.
  NIH cells   cell_images/{Parasitized,Uninfected}; patients split as the model card records (data.patients),
              which is train.dataset.split_patients(seed 42, test 0.2, val 0.1) over the manifest's patients.

Each field is run through ``Classifier.classify_field`` exactly as edge-classify runs it; its cells are matched to
the annotated boxes at IoU >= 0.5 (benchmarks.fields.match). A parasite box no segmented cell matches is a parasite
the slide missed. Slides are read as edge-classify reads them, with the quality gate's warnings and the card's
unfamiliar limits: a field that fails the gate or has too many unfamiliar cells is left out of its slide's count
(its most probable candidates are still shown). Per-cell results
are cached under /tmp (keyed by the model's SHA-256) so a rerun costs seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from malaria_edge.benchmarks.fields import iou, left_out_detections, load_annotations, match
from malaria_edge.edge_runtime.classifier import Classifier
from malaria_edge.edge_runtime.images import open_image
from malaria_edge.edge_runtime.labels import PARASITIZED, patient_id
from malaria_edge.edge_runtime import slide as slide_mod

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SLIDE_EVAL_CACHE", "/tmp/slide_eval_cache"))
BLOCK = 8
CACHE_VERSION = 2  # 2: fields carry the quality gate's warnings


def data_root() -> Path:
    return Path(os.environ.get("MALARIA_DATA", ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------------- caching runs
def _cache_file(classifier: Classifier, name: str) -> Path:
    """Keyed by the model's SHA-256 and the source of the modules that find and cut cells and read the boxes: a
    cache written before a segmentation, quality-gate or annotation-reading change is never read after it."""
    import hashlib
    from malaria_edge.edge_runtime import annotations, classifier as classifier_mod, fields, images, quality, segment
    digest = classifier.bundle.card.files[Path(classifier.bundle.path).name]["sha256"][:12] \
        if hasattr(classifier.bundle, "path") else "model"
    modules = (segment, quality, images, classifier_mod, annotations, fields)
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()[:8]
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE / f"{name}_{digest}_{code}_v{CACHE_VERSION}.json"


def iml_fields(classifier: Classifier, split: str) -> List[Dict]:
    """Every field of ``split``, classified and matched: per cell its box, probability, unfamiliar score and truth
    ("parasite", "cell", "difficult" or "none" for a detection no box matches); ``edge_cells``, the cells cut by the
    image edge that the field shows for review (never counted), "parasite" when one holds an annotated parasite no
    whole cell matched, else "edge"."""
    path = _cache_file(classifier, f"iml_{split}")
    if path.is_file():
        return json.loads(path.read_text())
    folder = data_root() / "fields" / "iml_vivax"
    out = []
    for truth in load_annotations(folder / "annotations.json", split):
        rgb = np.asarray(open_image(folder / "images" / truth.name), dtype=np.uint8)
        result = classifier.classify_field(rgb, source=truth.name)
        dets = [c.box for c in result.cells]
        matched = match(dets, truth.cells)
        left_out = left_out_detections(dets, truth, matched)
        parasite_idx = {j for j, b in enumerate(truth.cells) if b in truth.parasites}
        cells = []
        for i, c in enumerate(result.cells):
            if i in matched:
                kind = "parasite" if matched[i] in parasite_idx else "cell"
            else:
                kind = "difficult" if i in left_out else "none"
            cells.append({"cell": c.index, "box": list(c.box), "prob": c.prob_parasitized,
                          "unfamiliar": c.unfamiliar_score, "truth": kind})
        segmented = set(matched.values())
        unmatched = [b for j, b in enumerate(truth.cells) if j in parasite_idx and j not in segmented]
        edge = [{"cell": c.index, "box": list(c.box), "prob": c.prob_parasitized, "unfamiliar": c.unfamiliar_score,
                 "truth": "parasite" if any(iou(c.box, b) >= 0.5 for b in unmatched) else "edge"}
                for c in result.edge_cells]
        out.append({"field": truth.name, "warnings": result.warnings, "annotated_cells": len(truth.cells),
                    "annotated_parasites": len(truth.parasites),
                    "parasites_segmented": sum(1 for j in matched.values() if j in parasite_idx),
                    "cells": cells, "edge_cells": edge})
        print(f"  {split} {truth.name}: {len(cells)} cells", file=sys.stderr)
    path.write_text(json.dumps(out))
    return out


def nih_cells(classifier: Classifier, split: str) -> List[Dict]:
    """Every NIH cell of the card's ``split`` patients: path, patient, label, probability, unfamiliar score."""
    path = _cache_file(classifier, f"nih_{split}")
    if path.is_file():
        return json.loads(path.read_text())
    patients = set(classifier.bundle.card.raw["data"]["patients"][split])
    root = data_root() / "cell_images"
    files = []
    for folder in ("Parasitized", "Uninfected"):
        files += [p for p in sorted((root / folder).iterdir()) if patient_id(p.name) in patients]
    out = []
    for p, pred in zip(files, classifier.predict([str(f) for f in files], batch_size=256)):
        if pred.error:
            continue
        out.append({"path": str(p.relative_to(root)), "patient": patient_id(p.name),
                    "label": "parasite" if p.parent.name == "Parasitized" else "cell",
                    "prob": pred.prob_parasitized, "unfamiliar": pred.unfamiliar_score})
    path.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------------------------- measuring
def rates_at(threshold: float, fields=None, nih=None) -> Dict:
    """Sensitivity (annotated parasites found by a cell at or above ``threshold``; lost by segmentation = missed)
    and false-flag rate (cells that are not parasites at or above it), with their counts."""
    if fields is not None:
        parasites = sum(f["annotated_parasites"] for f in fields)
        found = sum(c["truth"] == "parasite" and c["prob"] >= threshold for f in fields for c in f["cells"])
        negatives = [c for f in fields for c in f["cells"] if c["truth"] in ("cell", "none")]
    else:
        parasites = sum(c["label"] == "parasite" for c in nih)
        found = sum(c["label"] == "parasite" and c["prob"] >= threshold for c in nih)
        negatives = [c for c in nih if c["label"] == "cell"]
    flagged = sum(c["prob"] >= threshold for c in negatives)
    return {"sensitivity_k": int(found), "sensitivity_n": int(parasites),
            "false_flag_k": int(flagged), "false_flag_n": len(negatives)}


def between_sd(kw: Dict, threshold: float = 0.5) -> float:
    """How much the false-flag rate varies from one unit to the next beyond binomial noise (method of moments):
    units are IML fields or NIH patients (their uninfected cells). Fields stand in for slides: conservative if
    fields of one slide vary as much as slides do, and the only unit the validation data offer in numbers."""
    if kw.get("fields") is not None:
        units = [[c["prob"] for c in f["cells"] if c["truth"] in ("cell", "none")] for f in kw["fields"]]
    else:
        by = {}
        for c in kw["nih"]:
            if c["label"] == "cell":
                by.setdefault(c["patient"], []).append(c["prob"])
        units = list(by.values())
    units = [np.asarray(u) for u in units if len(u)]
    ns = np.array([len(u) for u in units], float)
    xs = np.array([(u >= threshold).sum() for u in units], float)
    m = xs.sum() / ns.sum()
    r = xs / ns
    var = np.average((r - m) ** 2, weights=ns) * len(ns) / (len(ns) - 1) - m * (1 - m) / ns.mean()
    return float(np.sqrt(max(var, 0.0)))


def choose_band(fields: List[Dict], nih: List[Dict], threshold: float, max_share: float = 0.03,
                parasite_allowance: float = 0.01) -> Dict:
    """The candidate threshold: the lowest (so the most parasites held) at which, in every source, the cells that
    are not parasites but become candidates stay within ``max_share - parasite_allowance`` of the cells: the review
    load then stays within ``max_share`` on a slide whose parasites are up to ``parasite_allowance`` of its cells
    (a real slide's 0.1-2%). Measured on validation cells only (IML val fields, NIH val patients)."""
    iml_neg = [c["prob"] for f in fields for c in f["cells"] if c["truth"] in ("cell", "none")]
    nih_neg = [c["prob"] for c in nih if c["label"] == "cell"]
    budget = max_share - parasite_allowance

    def load(t: float) -> float:
        return max(np.mean(np.asarray(iml_neg) >= t), np.mean(np.asarray(nih_neg) >= t))

    grid = [round(x, 2) for x in np.arange(0.05, threshold + 1e-9, 0.01)]
    ok = [t for t in grid if load(t) <= budget]
    chosen = min(ok) if ok else threshold
    slides = [fields[i:i + BLOCK] for i in range(0, len(fields), BLOCK)]
    shares = [sum(c["prob"] >= chosen for f in s for c in f["cells"]) / max(1, sum(len(f["cells"]) for f in s))
              for s in slides]
    return {"candidate_threshold": chosen, "false_flag_load": float(load(chosen)), "budget": budget,
            "iml_val_slide_shares": shares}


def measure(args) -> Dict:
    classifier = Classifier.load(args.model)
    fields = iml_fields(classifier, "val")
    nih = nih_cells(classifier, "val")
    t = classifier.threshold
    band = choose_band(fields, nih, t, args.max_share)
    ct = band["candidate_threshold"]
    sources = {}
    for name, kw in (("iml", {"fields": fields}), ("nih", {"nih": nih})):
        at_t, at_c = rates_at(t, **kw), rates_at(ct, **kw)
        unit = (f"IML val fields ({len(fields)} fields, blocks of 8 captures)" if name == "iml" else
                f"NIH val patients ({len({c['patient'] for c in nih})}: "
                f"{', '.join(sorted({c['patient'] for c in nih}, key=int))})")
        sources[name] = {
            "sensitivity": at_t["sensitivity_k"] / at_t["sensitivity_n"], "sensitivity_n": at_t["sensitivity_n"],
            "sensitivity_k": at_t["sensitivity_k"],
            "false_flag_rate": at_t["false_flag_k"] / at_t["false_flag_n"], "false_flag_n": at_t["false_flag_n"],
            "false_flag_k": at_t["false_flag_k"],
            "candidate_sensitivity": at_c["sensitivity_k"] / at_c["sensitivity_n"],
            "candidate_sensitivity_k": at_c["sensitivity_k"],
            "candidate_false_flag_rate": at_c["false_flag_k"] / at_c["false_flag_n"],
            "candidate_false_flag_k": at_c["false_flag_k"],
            "false_flag_sd": between_sd(kw),
            "measured_on": unit + "; false_flag_sd: spread of the false-flag rate between " +
                           ("fields" if name == "iml" else "patients") + " beyond binomial noise"}
    rule = slide_mod.SlideRule(
        threshold=t, candidate_threshold=ct, max_candidate_share=args.max_share, min_cells=args.min_cells,
        alpha=args.alpha, sources=sources,
        chosen_on=(f"validation only: candidate threshold = lowest with the false-flag load <= {band['budget']:.0%} of "
                   f"cells in every source ({band['false_flag_load']:.2%}); IML val slides' candidate shares "
                   f"{', '.join(f'{v:.2%}' for v in band['iml_val_slide_shares'])}; model "
                   f"{classifier.bundle.card.name} sha256 {_sha(classifier)[:12]}"))
    out = args.out or ROOT / "docs" / "slide_rule.json"
    out.write_text(json.dumps(rule.as_dict(), indent=2) + "\n")
    print(json.dumps(rule.as_dict(), indent=2))
    return rule.as_dict()


def _sha(classifier: Classifier) -> str:
    files = classifier.bundle.card.files
    return next((v["sha256"] for k, v in files.items() if k.endswith("int8.tflite")), "")


# -------------------------------------------------------------------------------------------------------- evaluate
def field_rows(f: Dict, threshold: float) -> List[Dict]:
    """The rows edge-classify writes for a cached field: its whole cells, then its cells at the edge (``at_edge``),
    each with the field's quality-gate warnings."""
    return [{"path": f["field"], "cell": c["cell"], "box": c["box"], "prob_parasitized": c["prob"],
             "prediction": PARASITIZED if c["prob"] >= threshold else "uninfected", "unfamiliar": c["unfamiliar"],
             "warnings": f["warnings"] or None, "truth": c["truth"], "at_edge": 1 if edge else None}
            for edge, cells in ((False, f["cells"]), (True, f.get("edge_cells", []))) for c in cells]


def evaluate(args) -> Dict:
    classifier = Classifier.load()
    rule = slide_mod.SlideRule.from_dict(json.loads((ROOT / "docs" / "slide_rule.json").read_text()))
    fields = iml_fields(classifier, "test")
    nih = nih_cells(classifier, "test")
    infected, negative = [], []
    limits = classifier.unfamiliar_limits  # as edge-classify reads a slide: unfamiliar fields are left out
    for i in range(0, len(fields), BLOCK):
        block = fields[i:i + BLOCK]
        rows = [r for f in block for r in field_rows(f, rule.threshold)]
        annotated = sum(f["annotated_cells"] for f in block)
        parasites = sum(f["annotated_parasites"] for f in block)
        before = slide_mod.assess_slide(rows, rule, source="iml", unfamiliar_limits=limits)
        confirmed = {(r["path"], r["cell"]) for r in rows if r["truth"] == "parasite"}
        after = slide_mod.assess_slide(rows, rule, source="iml", reviewed=confirmed, unfamiliar_limits=limits)
        cands = before.candidate_list
        held = sum(r["truth"] == "parasite" for r in cands)
        left_out = set(before.excluded_fields)
        at_edge = sum(c["truth"] == "parasite" for f in block for c in f.get("edge_cells", []))
        entry = {"slide": f"{block[0]['field']}..{block[-1]['field']}", "fields": len(block),
                 "annotated_cells": annotated, "annotated_parasites": parasites,
                 "annotated_parasitemia": parasites / annotated, "candidates_holding_parasites": held,
                 "candidates_at_edge_holding_parasites": sum(r["truth"] == "parasite" and slide_mod.is_edge(r)
                                                             for r in cands),
                 "candidates_left_out_holding_parasites": sum(r["truth"] == "parasite" and slide_mod.is_left_out(r)
                                                              for r in cands),
                 "parasites_lost_by_segmentation": parasites - sum(f["parasites_segmented"] for f in block) - at_edge,
                 "parasites_in_fields_left_out": sum(f["annotated_parasites"] for f in block if f["field"] in left_out),
                 "before": before.to_json(), "after": after.to_json(), "detail": before.detail()}
        (infected if parasites else negative).append(entry)
    patients = {}
    for c in nih:
        patients.setdefault(c["patient"], []).append(c)
    for pt, cells in sorted(patients.items(), key=lambda kv: int(kv[0])):
        if any(c["label"] == "parasite" for c in cells):
            continue
        rows = [{"path": c["path"], "prob_parasitized": c["prob"], "unfamiliar": c["unfamiliar"],
                 "prediction": PARASITIZED if c["prob"] >= rule.threshold else "uninfected"} for c in cells]
        before = slide_mod.assess_slide(rows, rule, source="nih", unfamiliar_limits=limits)
        after = slide_mod.assess_slide(rows, rule, source="nih", reviewed=set(), unfamiliar_limits=limits)
        negative.append({"slide": f"NIH patient {pt}", "annotated_cells": len(cells), "annotated_parasites": 0,
                         "annotated_parasitemia": 0.0, "before": before.to_json(), "after": after.to_json(),
                         "detail": before.detail()})
    summary = score(infected, negative)
    report = {"rule": rule.as_dict(), "summary": summary, "infected": infected, "negative": negative}
    (ROOT / "docs" / "slide_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(infected, negative, summary))
    return report


def score(infected: List[Dict], negative: List[Dict]) -> Dict:
    every = infected + negative
    cells = sum(s["before"]["cells"] for s in every)
    cands = sum(s["before"]["candidates"] for s in every)
    parasites = sum(s["annotated_parasites"] for s in infected)
    held = sum(s["candidates_holding_parasites"] for s in infected)
    within = [abs(s["after"]["parasitemia"] - s["annotated_parasitemia"]) <= 0.25 * s["annotated_parasitemia"]
              for s in infected]
    covered = [s["before"]["parasitemia_ci"][0] <= s["annotated_parasitemia"] <= s["before"]["parasitemia_ci"][1]
               for s in infected]
    high = [s for s in infected if s["annotated_parasitemia"] >= 0.005]
    return {
        "slides_infected": len(infected), "slides_negative": len(negative),
        "candidate_share_pooled": cands / cells,
        "candidate_share_pooled_of_cells_examined": cands / sum(s["detail"]["cells_total"] for s in every),
        "candidate_share_max": max(s["before"]["candidates"] / max(1, s["before"]["cells"]) for s in every),
        "parasites_annotated": parasites, "parasites_held_by_candidates": held,
        "parasites_held_by_candidates_at_edge": sum(s["candidates_at_edge_holding_parasites"] for s in infected),
        "parasites_held_by_candidates_of_fields_left_out": sum(s["candidates_left_out_holding_parasites"]
                                                               for s in infected),
        "parasites_lost_by_segmentation": sum(s["parasites_lost_by_segmentation"] for s in infected),
        "parasites_in_fields_left_out": sum(s["parasites_in_fields_left_out"] for s in infected),
        "fields_left_out": [f for s in infected + negative for f in s["detail"]["excluded_fields"]],
        "parasites_held_share": held / parasites if parasites else None,
        "after_review_within_25pct": f"{sum(within)}/{len(within)}",
        "before_review_ci_covers": f"{sum(covered)}/{len(covered)}",
        "negative_called_parasites_found_before": sum(s["before"]["call"] == slide_mod.FOUND for s in negative),
        "negative_called_parasites_found_after": sum(s["after"]["call"] == slide_mod.FOUND for s in negative),
        "infected_ge_0.5pct": len(high),
        "infected_ge_0.5pct_called_none_before": sum(s["before"]["call"] == slide_mod.NONE_FOUND for s in high),
        "infected_ge_0.5pct_called_none_after": sum(s["after"]["call"] == slide_mod.NONE_FOUND for s in high),
    }


def format_table(infected, negative, summary) -> str:
    lines = [f"{'slide':<28}{'cells':>6}{'cand':>6}{'annot':>8}{'before':>8} {'95% CI':<16}{'after':>8}  "
             f"{'call before':<20}{'call after':<20}"]
    for s in infected + negative:
        b, a = s["before"], s["after"]
        ci = b["parasitemia_ci"]
        lines.append(f"{s['slide']:<28}{b['cells']:>6}{b['candidates']:>6}{s['annotated_parasitemia']:>8.2%}"
                     f"{b['parasitemia']:>8.2%} {f'{ci[0]:.2%}-{ci[1]:.2%}':<16}{a['parasitemia']:>8.2%}  "
                     f"{b['call']:<20}{a['call']:<20}")
    lines.append(json.dumps(summary, indent=2))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("cache", "measure", "evaluate"))
    parser.add_argument("--max-share", type=float, default=0.03, help="review load: candidates per cell, at most")
    parser.add_argument("--min-cells", type=int, default=slide_mod.DEFAULT_MIN_CELLS)
    parser.add_argument("--alpha", type=float, default=slide_mod.DEFAULT_ALPHA)
    parser.add_argument("--model", type=Path, help="bundle to measure (default: the shipped model); measure only")
    parser.add_argument("--out", type=Path, help="where measure writes the rule (default: docs/slide_rule.json)")
    args = parser.parse_args(argv)
    if args.step == "cache":
        classifier = Classifier.load(threads=1)
        for split in ("val", "test"):
            iml_fields(classifier, split)
            nih_cells(classifier, split)
        return 0
    (measure if args.step == "measure" else evaluate)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
