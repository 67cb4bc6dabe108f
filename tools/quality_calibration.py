"""Calibrate the field quality gate (edge_runtime/quality.py) on IML fields degraded on purpose.

Every chosen field is degraded (blur, exposure, scale, mosaics, a synthetic thick smear), measured the way the
runtime measures it (measure_cell_diameter -> segment_field -> field_metrics) and judged with the thresholds in
quality.py. Thresholds are chosen on the train split, checked on val, and test is reported once at the end.

    python tools/quality_calibration.py --iml ../shared/data/fields/iml_vivax --splits train val
    python tools/quality_calibration.py --iml ../shared/data/fields/iml_vivax --splits test --per-split 8

Measurements are cached (one JSON line per field and degradation) under --cache, so a rerun only judges again.
Writes a CSV of every measurement (--csv) and prints the tables of docs/quality_gate.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from malaria_edge.edge_runtime.annotations import field_splits  # noqa: E402
from malaria_edge.edge_runtime import quality, segment  # noqa: E402

BLURS = (0.5, 1, 1.5, 2, 3, 4, 6)
EXPOSURES = (0.35, 0.5, 0.7, 1.5, 2.0)
SCALES = (0.5, 0.75, 1.5)
# Cell layers stacked in the synthetic thick smear (a thick smear is many cells deep; a thin one is one).
THICK_LAYERS = 8


def degrade(rgb: np.ndarray, kind: str, value: float, seed: int) -> np.ndarray:
    """One degraded copy: ``blur`` (Gaussian, sigma in the field's pixels), ``exposure`` (multiply, clip),
    ``scale`` (resize), ``thick`` (:func:`thick_smear`)."""
    import cv2
    if kind == "none":
        return rgb
    if kind == "blur":
        return cv2.GaussianBlur(rgb, (0, 0), float(value))
    if kind == "exposure":
        return np.clip(rgb.astype(np.float32) * float(value), 0, 255).astype(np.uint8)
    if kind == "scale":
        size = (int(round(rgb.shape[1] * value)), int(round(rgb.shape[0] * value)))
        return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if value < 1 else cv2.INTER_CUBIC)
    if kind == "thick":
        return thick_smear(rgb, seed)
    raise ValueError(kind)


def thick_smear(rgb: np.ndarray, seed: int) -> np.ndarray:
    """A thick-smear-like picture made from a thin field: the optical densities of THICK_LAYERS copies of the
    field, each flipped and shifted at random, are added (layers of cells lying over each other, as in a drop of
    blood dried unspread: stain almost everywhere, hardly any glass, no separable cell), with a little
    low-frequency unevenness; then turned back into light with the field's own glass colour (its 99th
    percentile). Eight layers leave glass on under a tenth of even a sparse field (0.73 glass per layer)."""
    import cv2
    rng = np.random.default_rng(seed)
    rgb_f = rgb.astype(np.float32) + 1.0
    glass = np.percentile(rgb_f.reshape(-1, 3), 99, axis=0)
    od = np.log(glass / np.minimum(rgb_f, glass))
    total = np.zeros_like(od)
    h, w = od.shape[:2]
    for _ in range(THICK_LAYERS):
        layer = od[::rng.choice([1, -1]), ::rng.choice([1, -1])]
        layer = np.roll(layer, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
        total += layer
    uneven = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 60)
    total *= (1.0 + 0.2 * uneven / (np.abs(uneven).max() + 1e-6))[:, :, None]
    return np.clip(glass * np.exp(-total) - 1.0, 0, 255).astype(np.uint8)


def mosaic(images, n: int) -> np.ndarray:
    rows = [np.hstack(images[r * n:(r + 1) * n]) for r in range(n)]
    return np.vstack(rows)


def cases():
    """(name, kind, value) of every single-field degradation."""
    out = [("original", "none", 0)]
    out += [(f"blur {s:g}", "blur", s) for s in BLURS]
    out += [(f"exposure x{e:g}", "exposure", e) for e in EXPOSURES]
    out += [(f"scale x{s:g}", "scale", s) for s in SCALES]
    out += [("thick smear", "thick", 0)]
    return out


def measure(rgb: np.ndarray) -> dict:
    start = time.perf_counter()
    diameter = quality.measure_cell_diameter(rgb)
    middle = time.perf_counter()
    regions = segment.segment_field(rgb, diameter=diameter) if diameter else []
    after_segment = time.perf_counter()
    metrics = quality.field_metrics(rgb, regions, diameter)
    end = time.perf_counter()
    metrics["ms_diameter"] = 1000 * (middle - start)
    metrics["ms_metrics"] = 1000 * (end - after_segment)
    return metrics


def load(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def run_split(iml: Path, split: str, per_split: int, cache: Path):
    names = sorted(e["image_name"] for e in json.loads((iml / "annotations.json").read_text()))
    split_of = field_splits(names)
    in_split = [(i, n) for i, n in enumerate(names) if split_of[n] == split]
    step = max(1, len(in_split) // per_split)
    chosen = in_split[::step][:per_split]
    cache.mkdir(parents=True, exist_ok=True)
    store = cache / f"{split}.jsonl"
    done = {}
    if store.is_file():
        for line in store.read_text().splitlines():
            row = json.loads(line)
            done[(row["field"], row["case"])] = row
    with store.open("a") as out:
        def record(field_name, case, rgb, expected):
            if (field_name, case) not in done:
                row = {"field": field_name, "case": case, "split": split, "expected": expected,
                       "width": int(rgb.shape[1]), **measure(rgb)}
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[(field_name, case)] = row
            return done[(field_name, case)]

        for index, name in chosen:
            rgb = load(iml / "images" / name)
            expected = None
            for case, kind, value in cases():
                row = record(name, case, degrade(rgb, kind, value, index), expected)
                if case == "original":
                    expected = row["diameter"]
                    print(f"{split} {name} {row['diameter']:.1f}px", file=sys.stderr, flush=True)
        # Mosaics: 4 (2x2) and 9 (3x3) consecutive captures of one block of this split, at full and reduced size.
        for n in (2, 3):
            for index, name in chosen[: max(1, per_split // 4)]:
                group = [names[j] for j in range(index, index + n * n)]
                if len(group) < n * n or any(split_of[g] != split for g in group):
                    continue
                expected = done[(name, "original")]["diameter"]
                full = mosaic([load(iml / "images" / g) for g in group], n)
                record(name, f"mosaic {n}x{n}", full, expected)
                record(name, f"mosaic {n}x{n} 1/{n}", degrade(full, "scale", 1.0 / n, 0), expected / n)
    return [r for r in done.values() if r["field"] in {n for _, n in chosen}]


def flagged(row: dict, with_expected: bool = False) -> quality.FieldQuality:
    metrics = {k: (float("nan") if v is None else v) for k, v in row.items()
               if k not in ("field", "case", "split", "expected", "width")}
    expected = row["expected"] if with_expected else None
    return quality.judge(metrics, expected)


def case_order(case: str) -> tuple:
    names = [c for c, _, _ in cases()]
    return (names.index(case), case) if case in names else (len(names), case)


def summary(rows, with_expected: bool):
    """Per case: fields, median focus/glass/clipped/stained/cover/diameter, and the share flagged per code."""
    table = []
    for case in sorted({r["case"] for r in rows}, key=case_order):
        some = [r for r in rows if r["case"] == case]
        verdicts = [flagged(r, with_expected) for r in some]
        codes = sorted({c for v in verdicts for c in v.warnings})
        med = {k: float(np.nanmedian([np.nan if r[k] is None else r[k] for r in some]))
               for k in ("edge_blur", "focus", "glass_brightness", "clipped_bright", "stained_fraction",
                         "clear_fraction", "diameter", "cells")}
        blur = [np.nan if r["edge_blur"] is None else r["edge_blur"] for r in some]
        lo_focus, hi_focus = float(np.nanmin(blur)), float(np.nanmax(blur))
        table.append({"case": case, "n": len(some), **med, "focus_min": lo_focus, "focus_max": hi_focus,
                      "flagged": float(np.mean([not v.ok for v in verdicts])),
                      "codes": " ".join(f"{c}:{sum(c in v.warnings for v in verdicts)}" for c in codes)})
    return table


def print_table(split: str, table, with_expected: bool):
    print(f"\n### {split}" + (" (expected diameter = the undegraded field's)" if with_expected else ""))
    print("| case | n | diameter px | cells | edge blur median (min-max) | band ratio | glass grey | clipped white |"
          " stained | clear glass | flagged | warnings |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['case']} | {t['n']} | {t['diameter']:.1f} | {t['cells']:.0f} | {t['edge_blur']:.2f} "
              f"({t['focus_min']:.2f}-{t['focus_max']:.2f}) | {t['focus']:.3f} | {t['glass_brightness']:.0f} | "
              f"{t['clipped_bright']:.3f} | {t['stained_fraction']:.2f} | {t['clear_fraction']:.2f} | "
              f"{100 * t['flagged']:.0f}% | {t['codes']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iml", type=Path, default=REPO.parent / "shared" / "data" / "fields" / "iml_vivax")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--per-split", type=int, default=16, help="fields per split (evenly spaced)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/quality_calibration"))
    parser.add_argument("--csv", type=Path, help="write every measurement here")
    parser.add_argument("--expected", action="store_true", help="also judge with the undegraded field's diameter "
                        "as the expected one (the slide's diameter)")
    args = parser.parse_args(argv)
    everything = []
    for split in args.splits:
        rows = run_split(args.iml, split, args.per_split, args.cache)
        everything += rows
        print_table(split, summary(rows, False), False)
        if args.expected:
            print_table(split, summary(rows, True), True)
    if args.csv:
        keys = sorted({k for r in everything for k in r})
        with args.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, keys)
            writer.writeheader()
            for r in everything:
                writer.writerow(r)


if __name__ == "__main__":
    main()
