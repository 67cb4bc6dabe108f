"""The split manifest every step after ``edge-prepare`` reads: one row per cell (path, label, patient, split, sha256,
source), never a copy of the images.

Pure Python, so training, quantizing and adapting share one reading of it without importing one another. Its hash
is computed over the NIH-relative names, not the absolute paths, so the same split has the same hash on every
machine.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .errors import MalariaEdgeError
from .labels import CLASSES, PARASITIZED

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "label", "patient", "split", "sha256", "source")
NIH = "NIH"
# Where each training source came from and on what terms, recorded in every card a model trained on it carries, so a
# clinic knows what its model learned from (shown in the report and README).
PROVENANCE = {
    "NIH": {"origin": "NIH malaria cell images (Rajaraman et al., PeerJ 6:e4568, 2018), U.S. National Library of "
                      "Medicine: segmented red cells of Giemsa thin smears, P. falciparum, Chittagong, Bangladesh",
            "licence": "public domain (a work of the U.S. government)"},
    "IML": {"origin": "IML-Malaria fields (Arshad et al., Neural Computing and Applications 34:4473-4485, 2022), "
                      "Lahore, Pakistan: annotated Giemsa thin-smear fields, P. vivax; cells cut by this tool's "
                      "segmentation",
            "licence": "no licence stated in its repository: research use only; cite the paper"},
}


class DatasetError(MalariaEdgeError, RuntimeError):
    """A dataset problem the user must fix; the message is one line that says what to do."""


@dataclass
class Cell:
    path: str
    label: str
    patient: str
    split: str = ""
    sha256: str = ""
    source: str = NIH         # which lab the cell comes from; ``patient`` is then a patient (NIH) or a field (IML)

    @property
    def nih_name(self) -> str:
        """``Parasitized/C100P61ThinF_..._cell_162`` without the extension (other sources prefixed with their name):
        the same on every machine and format."""
        folder = "Parasitized" if self.label == PARASITIZED else "Uninfected"
        prefix = "" if self.source == NIH else f"{self.source}/"
        return f"{prefix}{folder}/{Path(self.path).stem}"


def group_order(name: str):
    """Patients numerically (NIH ids), then any other group names (fields) alphabetically."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def manifest_hash(cells: Iterable[Cell]) -> str:
    """SHA-256 over (NIH name, label, patient, split, image sha256): independent of where the data lives."""
    digest = hashlib.sha256()
    for cell in sorted(cells, key=lambda c: c.nih_name):
        extra = "" if cell.source == NIH else f",{cell.source}"
        digest.update(f"{cell.nih_name},{cell.label},{cell.patient},{cell.split},{cell.sha256}{extra}\n".encode())
    return digest.hexdigest()


def write_manifest(cells: List[Cell], path: Path) -> None:
    """Write the manifest CSV in split, source, patient order, replacing the file in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        for c in sorted(cells, key=lambda c: (SPLITS.index(c.split), c.source != NIH, group_order(c.patient),
                                              c.path)):
            writer.writerow([c.path, c.label, c.patient, c.split, c.sha256, c.source])
    os.replace(tmp, path)


def read_manifest(path) -> List[Cell]:
    """Read a manifest CSV; relative paths are taken relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found; run edge-prepare --data DIR --out DIR first")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_FIELDS) - {"source"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path}: not a manifest (missing columns {sorted(missing)}); run edge-prepare")
        cells = []
        for row in reader:
            p = Path(row["path"])
            if not p.is_absolute():
                p = path.parent / p
            cells.append(Cell(str(p), row["label"], row["patient"], row["split"], row["sha256"],
                              row.get("source") or NIH))
    return cells


def split_counts(cells: Iterable[Cell], source: Optional[str] = NIH) -> Dict[str, Dict]:
    """Patients (fields, for field sources) and cells per split and label of one source, as stored in reports and
    model cards."""
    counts: Dict[str, Dict] = {}
    by_split = defaultdict(list)
    for c in cells:
        if source is None or c.source == source:
            by_split[c.split].append(c)
    for split in SPLITS:
        group = by_split.get(split, [])
        labels = Counter(c.label for c in group)
        infected = {c.patient for c in group if c.label == PARASITIZED}
        patients = {c.patient for c in group}
        counts[split] = {
            "patients": len(patients),
            "infected_patients": len(infected),
            "healthy_patients": len(patients - infected),
            "cells": len(group),
            **{f"cells_{label}": labels.get(label, 0) for label in CLASSES},
        }
    return counts


def load_prepare_report(manifest: Path) -> Dict:
    """The prepare.json written beside a manifest, or a report rebuilt from the manifest itself."""
    side = Path(manifest).parent / "prepare.json"
    cells = read_manifest(manifest)
    info = json.loads(side.read_text()) if side.is_file() else {}
    info["manifest_sha256"] = manifest_hash(cells)
    info["counts"] = split_counts(cells)
    for source in sorted({c.source for c in cells} - {NIH}):
        info.setdefault("sources", {})[source] = {"unit": "fields", "counts": split_counts(cells, source)}
    return info


def calibration_cells(cells: List[Cell], count: int = 400, seed: int = 0) -> List[Cell]:
    """Draw ``count`` training cells balanced by class and spread over patients (round-robin over patients
    within each class), so no single patient's staining dominates: the int8 calibration set, and the old lab's
    cells edge-adapt replays."""
    train = [c for c in cells if c.split == "train"]
    if not train:
        raise ValueError("the manifest has no training cells to calibrate on")
    rng = random.Random(seed)
    chosen: List[Cell] = []
    labels = sorted({c.label for c in train})
    for label in labels:
        by_patient = defaultdict(list)
        for c in train:
            if c.label == label:
                by_patient[c.patient].append(c)
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_patient.items())]
        rng.shuffle(queues)
        want = count // len(labels)
        picked: List[Cell] = []
        while len(picked) < want and any(queues):
            for q in queues:
                if q and len(picked) < want:
                    picked.append(q.pop())
        chosen.extend(picked)
    rng.shuffle(chosen)
    return chosen
