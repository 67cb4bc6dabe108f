"""Defect 13, measured: each field turned 0/90/180/270 degrees (diameter, cells, parasitized), the cells found
again, call flips, and the model alone on the 0-degree crops turned (docs/experiments.md, "Rotation").

    python tools/rotation_check.py PA171694.JPG,PA171692.JPG
"""
import sys
import numpy as np
from pathlib import Path
from malaria_edge.edge_runtime.classifier import Classifier
from malaria_edge.edge_runtime.images import open_image
from malaria_edge.edge_runtime.segment import cut_cell, field_diameter
from malaria_edge.edge_runtime.fields import classify_field_pixels

IML = Path(__file__).resolve().parents[2] / "shared" / "data" / "fields" / "iml_vivax" / "images"
clf = Classifier.load()
names = sys.argv[1].split(",")

def to_orig(x, y, k, W, H):
    # np.rot90(a, k): k=1: new(r, c) = old(c, W-1-r) ; point old (x=c_o, y=r_o) -> new (x=r_o, y=W-1-c_o)
    # inverse for k=1: old x = W-1-new_y, old y = new_x
    if k == 0: return x, y
    if k == 1: return W - 1 - y, x
    if k == 2: return W - 1 - x, H - 1 - y
    if k == 3: return y, H - 1 - x

out = []
for name in names:
    rgb0 = np.asarray(open_image(IML / name), dtype=np.uint8)
    H, W = rgb0.shape[:2]
    per = {}
    for k in range(4):
        rgb = np.ascontiguousarray(np.rot90(rgb0, k))
        d = field_diameter(rgb)
        res = classify_field_pixels(clf, rgb, diameter=d)
        cells = []
        for c in res.cells:
            cx, cy = c.region.centre
            ox, oy = to_orig(cx, cy, k, W, H)
            cells.append((ox, oy, c.prob_parasitized, c.prediction, c.region))
        per[k] = dict(d=d, n=res.n_cells, p=res.n_parasitized, cells=cells, rgb=rgb)
    base = per[0]
    line = [name, ]
    for k in range(4):
        line.append(f"{k*90}: d {per[k]['d']:.2f} cells {per[k]['n']} par {per[k]['p']}")
    print(" | ".join(line), flush=True)
    # decomposition vs 0
    D = per[0]['d']
    for k in (1, 2, 3):
        a, b = per[0]['cells'], per[k]['cells']
        bc = np.array([(x, y) for x, y, *_ in b]) if b else np.zeros((0, 2))
        matched = 0; flips = 0; par_unmatched0 = 0; par_unmatchedk = 0; used = set()
        ious = []
        for (x, y, p, call, reg) in a:
            dist = np.hypot(bc[:, 0] - x, bc[:, 1] - y)
            j = int(np.argmin(dist))
            if dist[j] < 0.25 * D and j not in used:
                used.add(j); matched += 1
                if (call == "parasitized") != (b[j][3] == "parasitized"):
                    flips += 1
                # mask agreement: area ratio
                ious.append(min(reg.area, b[j][4].area) / max(reg.area, b[j][4].area))
            elif call == "parasitized":
                par_unmatched0 += 1
        par_unmatchedk = sum(1 for j, c in enumerate(b) if j not in used and c[3] == "parasitized")
        print(f"   {k*90}: matched {matched}/{len(a)} vs {len(b)}; call flips on matched {flips}; parasitized only at 0: {par_unmatched0}, only at {k*90}: {par_unmatchedk}; area ratio median {np.median(ious):.3f} min {np.min(ious):.3f}", flush=True)
    # model rotation sensitivity on crops at 0
    crops = [cut_cell(per[0]['rgb'], c[4]) for c in per[0]['cells']]
    calls = []
    for k in range(4):
        px = np.stack([clf.prepare_crop(np.ascontiguousarray(np.rot90(c, k))) for c in crops])
        probs, _ = clf.probabilities(px)
        calls.append(np.array([clf.decide(float(p)) == "parasitized" for p in probs]))
    print(f"   crops of 0 rotated: parasitized {[int(c.sum()) for c in calls]}", flush=True)
