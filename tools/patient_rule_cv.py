"""Choose the NIH patient rule on out-of-fold predictions over the training patients, not on 11 validation patients.

    python tools/patient_rule_cv.py folds --manifest runs/data_ml4/manifest.csv --out runs/cv --folds 4
    for k in 0 1 2 3; do edge-train --manifest runs/cv/fold_$k/manifest.csv --out runs/cv/fold_$k/model \\
        --cache runs/data_ml4/cache --epochs 12; done
    python tools/patient_rule_cv.py counts --out runs/cv      # -> runs/cv/out_of_fold_patients.json
    edge-quantize --model runs/multilab5n/model.keras --manifest runs/data_ml5n/manifest.csv --out runs/bundle_ml5n \
        --rule-only --patient-counts runs/cv/out_of_fold_patients.json --patient-specificity 0.93

``folds`` splits the NIH training patients into K folds stratified by status (infected: any parasitized cell;
healthy: none), seeded. Fold k's manifest is the original one with fold k's NIH patients moved to the test split
and the original NIH test patients dropped: its model never sees those patients (nor the real test patients), and
edge-train's report scores them as its test split. Validation (NIH val patients, IML val fields) and every IML
cell are kept as they are, so the recipe is the default one apart from the epochs.

``counts`` gathers, from each fold's report.json, the per-patient counts (cells, cells called parasitized at the
card threshold, true status) of its held-out patients: every training patient is scored once, by a model that never
trained on it. ``edge-quantize --patient-counts`` adds them to the validation patients it scores itself and chooses
the rule on all of them (``--patient-specificity 0.93``: the most sensitive rule with specificity >= 93%, the
operating point asked of it; Youden's J without it); ``--rule-only`` does so for a bundle already written, keeping
its files. 12 epochs per fold (the default recipe runs 20) to fit the four folds in an hour on two cores.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path
from typing import Dict, List

NIH = "NIH"


def fold_patients(rows: List[Dict], folds: int, seed: int) -> List[List[str]]:
    """The NIH training patients in ``folds`` folds, infected and healthy dealt round-robin so each fold holds both."""
    infected: Dict[str, bool] = {}
    for r in rows:
        if r["source"] == NIH and r["split"] == "train":
            infected[r["patient"]] = infected.get(r["patient"], False) or r["label"] == "parasitized"
    rng = random.Random(seed)
    out: List[List[str]] = [[] for _ in range(folds)]
    i = 0
    for status in (True, False):
        group = sorted((p for p, s in infected.items() if s is status), key=lambda p: (len(p), p))
        rng.shuffle(group)
        for p in group:
            out[i % folds].append(p)
            i += 1
    return out


def write_folds(manifest: Path, out: Path, folds: int, seed: int) -> None:
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    plan = fold_patients(rows, folds, seed)
    for k, held in enumerate(plan):
        held_set = set(held)
        folder = out / f"fold_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        kept = 0
        with open(folder / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                if r["source"] == NIH and r["split"] == "test":
                    continue
                if r["source"] == NIH and r["patient"] in held_set:
                    r = {**r, "split": "test"}
                writer.writerow(r)
                kept += 1
        print(f"fold {k}: {len(held)} NIH training patients held out, {kept} rows -> {folder / 'manifest.csv'}")
    (out / "folds.json").write_text(json.dumps({"manifest": str(manifest), "seed": seed, "folds": plan}, indent=1))


def gather_counts(out: Path) -> None:
    plan = json.loads((out / "folds.json").read_text())
    patients: Dict[str, Dict] = {}
    for k, held in enumerate(plan["folds"]):
        report = json.loads((out / f"fold_{k}" / "model" / "report.json").read_text())
        test = report["test"]
        for pid, g in test["patient_level"]["patients"].items():
            if pid not in held:
                sys.exit(f"fold {k}: patient {pid} in its test report was not held out by it")
            patients[pid] = {"patient": pid, "cells": g["cells"],
                             "parasitized": g["parasitized"], "infected": g["true_status"] == "infected",
                             "fold": k}
    expected = {p for held in plan["folds"] for p in held}
    if set(patients) != expected:
        sys.exit(f"missing out-of-fold patients: {sorted(expected - set(patients))}")
    result = {"schema": "malaria-edge/patient-counts/1",
              "how": (f"out-of-fold: {len(plan['folds'])}-fold cross-validation over the {len(patients)} NIH "
                      f"training patients (stratified by status, seed {plan['seed']}); each patient scored once by "
                      "a model of the default recipe that never trained on it"),
              "epochs": report.get("epochs_run"), "patients": sorted(patients.values(), key=lambda p: p["patient"])}
    path = out / "out_of_fold_patients.json"
    path.write_text(json.dumps(result, indent=1))
    infected = [p for p in patients.values() if p["infected"]]
    healthy = [p for p in patients.values() if not p["infected"]]
    print(f"{len(patients)} patients ({len(infected)} infected, {len(healthy)} healthy) -> {path}")
    for name, group in (("healthy", healthy), ("infected", infected)):
        fr = sorted(p["parasitized"] / p["cells"] for p in group)
        print(f"  {name}: flagged fraction lowest {fr[:5]} highest {fr[-5:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("folds")
    f.add_argument("--manifest", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--folds", type=int, default=4)
    f.add_argument("--seed", type=int, default=42)
    c = sub.add_parser("counts")
    c.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "folds":
        write_folds(args.manifest, args.out, args.folds, args.seed)
    else:
        gather_counts(args.out)


if __name__ == "__main__":
    main()
