"""Measure edge-adapt with the IML fields as the new lab (docs/experiments.md, "Adapting to a new lab").

Cuts labelled single cells from ../shared/data/fields/iml_vivax with the team's field split (sorted names, blocks
of 8 captures: block % 4 == 3 -> test, block % 8 == 1 -> val, else train), writes

  OUT/adapt_cells/{Parasitized,Uninfected}/   N + N cells drawn (seeded) from the "train" fields only
  OUT/val_cells/{Parasitized,Uninfected}/     every cell of the "val" fields (for choosing the recipe)
  OUT/test_cells/{Parasitized,Uninfected}/    every cell of the "test" fields (file names start with the field)

and, with --bundle, evaluates an int8 bundle on the test cells (AUC, sensitivity, specificity at the card's
threshold, 95% CI by bootstrap over the test fields). Cells are cut by the field path's own segmentation
(``train.iml.cut_field_cells``) and then go through ``prepare_cell``, as edge-adapt and edge-classify do.

    python docs/adapt_iml.py cells --out /tmp/iml
    python docs/adapt_iml.py evaluate --cells /tmp/iml/test_cells --bundle /tmp/nih_bundle/malaria_int8.tflite

The other way round (a model trained without NIH, `edge-train --hold-out NIH`, adapted to NIH as the new lab):
`nih-cells` draws the N + N adaptation cells from the NIH training patients and lays out the test patients' cells.

    python docs/adapt_iml.py nih-cells --manifest runs/data/manifest.csv --out /tmp/nih_lab
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import click
import numpy as np

from malaria_edge.edge_runtime.bundle import ModelBundle
from malaria_edge.edge_runtime.images import ImageError, is_image_path, prepare_cell
from malaria_edge.edge_runtime.labels import patient_id
from malaria_edge.edge_runtime.metrics import binary_metrics, bootstrap_by_patient, pct
from malaria_edge.edge_runtime.outputs import parasitized_probability

IML = Path(__file__).resolve().parents[2] / "shared" / "data" / "fields" / "iml_vivax"


@click.group()
def main():
    """IML cells for edge-adapt and their evaluation."""


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--fields", "field_dir", default=IML, show_default=True, type=click.Path(exists=True, path_type=Path))
@click.option("--per-class", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
def cells(out, field_dir, per_class, seed):
    """Cut every annotated field with the field path's segmentation (train.iml.cut_field_cells), then lay out the
    adaptation cells (drawn from the train fields) and the val and test fields' cells for edge-adapt."""
    from malaria_edge.train.iml import cut_field_cells
    if (out / "cut").is_dir():
        from malaria_edge.train.dataset import Cell
        cut = [Cell(str(p), p.parent.name.lower(), p.name.split("_")[0], p.parent.parent.name)
               for p in sorted((out / "cut").glob("*/*/*.png"))]
        stats = {"reused": str(out / "cut")}
    else:
        cut, stats = cut_field_cells(field_dir, out / "cut", log=lambda m: None)
    rng = random.Random(seed)
    groups = {"val_cells": [c for c in cut if c.split == "val"], "test_cells": [c for c in cut if c.split == "test"]}
    groups["adapt_cells"] = []
    for label in ("parasitized", "uninfected"):
        pool = sorted((c for c in cut if c.split == "train" and c.label == label), key=lambda c: c.path)
        drawn = []
        for c in rng.sample(pool, len(pool)):
            if len(drawn) == per_class:
                break
            try:
                prepare_cell(c.path, 48)   # a crop the runtime cannot read again is no use to a clinic either
            except ImageError:
                print(f"not drawn (prepare_cell refuses it): {c.path}")
                continue
            drawn.append(c)
        groups["adapt_cells"] += drawn
    for group, members in groups.items():
        link_cells(out / group, members)
        counts = {lab: len(list((out / group / lab).glob("*.png"))) for lab in ("Parasitized", "Uninfected")}
        print(f"{out / group}: {counts} from {len({Path(c.path).name.split('_')[0] for c in members})} fields")
    print(json.dumps({k: v for k, v in stats.items() if k != "bad_fields"}))


def link_cells(folder: Path, members) -> None:
    """Lay cells out as edge-adapt reads them: FOLDER/{Parasitized,Uninfected}/<name>, each a link to its file (a
    rerun keeps the links already there)."""
    for c in members:
        link = folder / ("Parasitized" if c.label == "parasitized" else "Uninfected") / Path(c.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path(c.path).resolve())


@main.command("nih-cells")
@click.option("--manifest", required=True, type=click.Path(exists=True, path_type=Path),
              help="An edge-prepare manifest with NIH cells (its split is the team's patient split).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--per-class", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
def nih_cells(manifest, out, per_class, seed):
    """NIH as the new lab, for a model trained without NIH (edge-train --hold-out NIH): N + N adaptation cells drawn
    from the training patients, the val patients' cells (for choosing, as `sweep --on val`) and the test patients'
    cells, laid out for edge-adapt and `evaluate`."""
    from malaria_edge.edge_runtime.manifest import NIH, read_manifest
    cells = [c for c in read_manifest(manifest) if c.source == NIH]
    rng = random.Random(seed)
    groups = {"val_cells": [c for c in cells if c.split == "val"], "test_cells": [c for c in cells if c.split == "test"],
              "adapt_cells": []}
    for label in ("parasitized", "uninfected"):
        pool = sorted((c for c in cells if c.split == "train" and c.label == label), key=lambda c: c.path)
        groups["adapt_cells"] += rng.sample(pool, per_class)
    for group, members in groups.items():
        link_cells(out / group, members)
        print(f"{out / group}: {len(members)} cells of {len({c.patient for c in members})} patients")


@main.command()
@click.option("--cells", "cells_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--bundle", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json-out", type=click.Path(path_type=Path))
def evaluate(cells_dir, bundle, json_out):
    """AUC, sensitivity and specificity of a bundle on test cells, CI over fields (IML) or patients (NIH)."""
    result = evaluate_bundle(cells_dir, bundle)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


def evaluate_bundle(cells_dir: Path, bundle: Path) -> dict:
    model = ModelBundle(bundle)
    y, prob, fields = score_cells(cells_dir, bundle)
    m = binary_metrics(y, prob, model.threshold)
    ci = bootstrap_by_patient(y, prob, fields, model.threshold)
    unit = "fields" if all(f.startswith("PA") for f in fields) else "patients"
    print(f"{bundle.name}: {len(set(fields))} {unit}, {len(y)} cells ({y.sum()} parasitized); threshold "
          f"{model.threshold}: AUC {m['roc_auc']:.4f} ({ci['roc_auc'][0]:.4f}-{ci['roc_auc'][1]:.4f}), sensitivity "
          f"{pct(m['sensitivity'])} ({pct(ci['sensitivity'][0])}-{pct(ci['sensitivity'][1])}), specificity "
          f"{pct(m['specificity'])} ({pct(ci['specificity'][0])}-{pct(ci['specificity'][1])})")
    return {"bundle": str(bundle), "fields": len(set(fields)), "metrics": m, "ci95_fields": ci}


HELD_OUT = dict(folds=0, min_sensitivity=None)   # edge-adapt's first default: 30% held out, Youden's J
RECIPES = {
    "head": dict(strategy="head", learning_rate=3e-3, **HELD_OUT),
    "last": dict(strategy="last", **HELD_OUT),
    "all": dict(strategy="all", **HELD_OUT),
    "all-no-replay": dict(strategy="all", replay_cells=0, **HELD_OUT),
    "all-lr3e-4": dict(strategy="all", learning_rate=3e-4, **HELD_OUT),
    "all-10ep": dict(strategy="all", epochs=10, **HELD_OUT),
    "cv5": dict(strategy="all", folds=5, min_sensitivity=0.95),   # the default now
    "cv4": dict(strategy="all", folds=4, min_sensitivity=0.95),
    "cv4-replay1000": dict(strategy="all", folds=4, replay_cells=1000, min_sensitivity=0.95),
}
# Threshold rules compared on the same adapted models: Youden's J, or the most specific threshold keeping at least
# this sensitivity on the cells the threshold is chosen on.
RULES = {"youden": None, "sens>=0.90": 0.90, "sens>=0.95": 0.95, "sens>=0.97": 0.97, "sens>=0.98": 0.98, "sens>=1": 1.0}


def score_cells(cells_dir: Path, bundle: Path):
    """Labels, P(parasitized) and field of every cell under ``cells_dir`` through an int8 bundle. A crop that
    ``prepare_cell`` refuses is left out and counted, as edge-classify would give it an error row, not a call."""
    model = ModelBundle(bundle)
    pixels, labels, fields, refused = [], [], [], 0
    for label, value in (("Parasitized", 1), ("Uninfected", 0)):
        for p in sorted(p for p in (cells_dir / label).iterdir() if is_image_path(p)):
            try:
                pixels.append(prepare_cell(p, model.size, model.stain))
            except ImageError:
                refused += 1
                continue
            labels.append(value)
            fields.append(patient_id(p) or p.name.split("_")[0])   # NIH: the patient; IML: the field
    if refused:
        print(f"{cells_dir}: {refused} crops refused by prepare_cell (no cell found), left out", file=sys.stderr)
    x = np.stack(pixels)
    prob = np.concatenate([parasitized_probability(model.run(x[i:i + 64])[0], model.head)
                           for i in range(0, len(x), 64)])
    return np.array(labels), prob, fields


@main.command()
@click.option("--cells", "cells_root", required=True, type=click.Path(exists=True, path_type=Path),
              help="OUT of the cells command.")
@click.option("--model", required=True, type=click.Path(exists=True, path_type=Path), help="Base bundle.")
@click.option("--replay", required=True, type=click.Path(exists=True, path_type=Path), help="NIH manifest.")
@click.option("--work", required=True, type=click.Path(path_type=Path), help="Folder for the adapted bundles.")
@click.option("--on", "split", default="val", show_default=True, help="Fields to score on: val (choosing) or test.")
@click.option("--recipe", "names", multiple=True, help="Recipes to run (default: all).")
@click.option("--rule", "rule_names", multiple=True, type=click.Choice(list(RULES)),
              help="Threshold rules to score (default: all); on the test fields, only the one chosen on val.")
@click.option("--seed", default=0, show_default=True)
def sweep(cells_root, model, replay, work, split, names, rule_names, seed):
    """Adapt with each recipe (a bundle folder already in --work is scored again, not re-adapted) and score it on
    the val (or test) fields' cells under every threshold rule of RULES (or those of --rule, with 95% intervals
    over fields), the rule applied to the cells edge-adapt chose its threshold on; one JSON line per recipe, scores
    kept in WORK/NAME_seedS/scores.npz."""
    from malaria_edge.train.adapt import Recipe, adapt, choose_decision_threshold
    for name in names or RECIPES:
        out = work / f"{name}_seed{seed}"
        saved = out / "scores.npz"
        if not saved.is_file():
            result = adapt(cells_root / "adapt_cells", out, model,
                           replay if RECIPES[name].get("replay_cells", 1) else None,
                           recipe=Recipe(**RECIPES[name], seed=seed), log=lambda m: print(m, file=sys.stderr))
            y_choose, p_choose = result.threshold_cells
            np.savez(saved, y_choose=y_choose, p_choose=p_choose)
        card = json.loads(next(p for p in out.glob("*.json")).read_text())
        a = card["adaptation"]
        chosen = np.load(saved)
        y, prob, fields = score_cells(cells_root / f"{split}_cells", next(out.glob("*_int8.tflite")))
        rules = {}
        for rule in rule_names or RULES:
            t = choose_decision_threshold(chosen["y_choose"], chosen["p_choose"], RULES[rule])
            m = binary_metrics(y, prob, t)
            rules[rule] = {"threshold": t, "sensitivity": round(m["sensitivity"], 4),
                           "specificity": round(m["specificity"], 4)}
            if rule_names:
                ci = bootstrap_by_patient(y, prob, fields, t)
                rules[rule]["ci95_fields"] = {k: [round(v, 4) for v in ci[k]]
                                              for k in ("roc_auc", "sensitivity", "specificity")}
        old = a.get("old_lab_test") or {}
        evaluation = a.get("out_of_fold") or a["held_out"]
        print(json.dumps({"recipe": name, "seed": seed, "on": split, "cells": len(y), "parasitized": int(y.sum()),
                          "auc": round(binary_metrics(y, prob)["roc_auc"], 4),
                          "choose_auc": round(evaluation["after"]["metrics"]["roc_auc"], 4),
                          "wall_s": round(a["wall_seconds"]), "cpu_s": round(a["cpu_seconds"]),
                          "nih_auc": (old.get("after") or {}).get("metrics", {}).get("roc_auc"), "rules": rules}),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
