"""The NIH cell dataset: scan, verify, split by patient, and the manifest CSV that every later step reads.

The manifest itself (its cells, reading, hash and counts) lives in :mod:`malaria_edge.edge_runtime.manifest`, where
quantizing and adapting read it too; this module makes it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from malaria_edge.edge_runtime.bundle import sha256_file
from malaria_edge.edge_runtime.images import ImageError, is_image_path, open_image
from malaria_edge.edge_runtime.labels import PARASITIZED, UNINFECTED, patient_id
# Cell, DatasetError and read_manifest stay importable from here for the modules that make and test manifests.
from malaria_edge.edge_runtime.manifest import (NIH, SPLITS, Cell, DatasetError, manifest_hash,  # noqa: F401
                                                read_manifest, split_counts, write_manifest)

NIH_ZIP_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
# Size of the official archive as published by the NLM (337 MiB); used to resume and to check the download.
NIH_ZIP_BYTES = 353_452_851
# Limits on what a zip may unpack to: a cell image is tens of KB (16 MiB per member is generous), the NIH set is
# about 350 MB unpacked (4 GiB in all is generous), and PNG/JPEG/WebP compress at most a few times (a member of more
# than 1 MB compressed over 100:1 is a zip bomb: 1.5 MB of zip once wrote 1 GiB here).
ZIP_MAX_MEMBER_BYTES = 16 * 2**20
ZIP_MAX_TOTAL_BYTES = 4 * 2**30
ZIP_MAX_RATIO = 100.0
CLASS_FOLDERS = {"parasitized": PARASITIZED, "uninfected": UNINFECTED}   # folder names, in any case


def find_class_folders(root: Path, one_level_down: bool = False) -> Dict[str, Path]:
    """``Parasitized/`` and ``Uninfected/`` (any case) directly inside ``root``, or with ``one_level_down`` in the
    first subfolder holding both (the NIH zip nests ``cell_images/``). Returns {label: folder} for those found; the
    caller says in its own words what is missing."""
    def inside(base: Path) -> Dict[str, Path]:
        found = {}
        for child in sorted(base.iterdir()):
            label = CLASS_FOLDERS.get(child.name.lower())
            if label and child.is_dir():
                found[label] = child
        return found

    for base in [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if one_level_down else []):
        found = inside(base)
        if len(found) == 2:
            return found
    return inside(root)


def find_cell_folders(root: Path) -> Dict[str, List[Path]]:
    """{label: [folders]}: ``Parasitized/`` and ``Uninfected/`` directly inside ``root``, or else those of every
    subfolder holding both (an ``edge-classify --review`` folder: one subfolder per slide), merged."""
    direct = find_class_folders(root)
    if len(direct) == 2:
        return {label: [folder] for label, folder in direct.items()}
    merged: Dict[str, List[Path]] = {label: [folder] for label, folder in direct.items()}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() not in CLASS_FOLDERS):
        found = find_class_folders(sub)
        if len(found) == 2:
            for label, folder in found.items():
                merged.setdefault(label, []).append(folder)
    return merged


def _check_file(path: Path) -> Tuple[str, Optional[str]]:
    """Return (sha256, None) for a decodable image, or ("", reason) for a bad one."""
    try:
        data = path.read_bytes()
        open_image(path)
    except ImageError as exc:
        return "", str(exc)
    except OSError as exc:
        return "", f"cannot read file: {exc}"
    return hashlib.sha256(data).hexdigest(), None


def scan(root: Path, workers: int = 4) -> Tuple[List[Cell], List[Tuple[str, str]]]:
    """List every cell under the class folders; verify that each decodes. Returns (cells, [(path, reason), ...])."""
    folders = find_class_folders(root, one_level_down=True)
    if len(folders) != 2:
        raise DatasetError(f"{root}: no Parasitized/ and Uninfected/ folders found; point --data at the NIH "
                           "cell_images folder or at cell_images.zip")
    candidates: List[Cell] = []
    bad: List[Tuple[str, str]] = []
    for label, folder in folders.items():
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.name.lower() == "thumbs.db":
                continue
            if not is_image_path(path):
                bad.append((str(path), "not an image file (unknown suffix)"))
                continue
            pid = patient_id(path)
            if pid is None:
                bad.append((str(path), "no patient id in the file name (expected C<number>...)"))
                continue
            candidates.append(Cell(str(path.resolve()), label, pid))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(lambda c: _check_file(Path(c.path)), candidates))
    cells = []
    for cell, (digest, reason) in zip(candidates, checks):
        if reason:
            bad.append((cell.path, reason))
        else:
            cell.sha256 = digest
            cells.append(cell)
    if not cells:
        raise DatasetError(f"{root}: no readable cell images in Parasitized/ and Uninfected/")
    return cells, bad


def split_patients(cells: Iterable[Cell], seed: int = 42, test_fraction: float = 0.2,
                   val_fraction: float = 0.1) -> Dict[str, str]:
    """Assign each patient to train, val or test, stratified by infected/healthy patient.

    The tutorial's fractions, applied to patients: ``test_fraction`` of the patients to test, then ``val_fraction``
    of the remaining (training) patients to validation. A patient is infected when any of its cells is parasitized.
    """
    infected = defaultdict(bool)
    for cell in cells:
        infected[cell.patient] |= cell.label == PARASITIZED
    rng = random.Random(seed)
    assignment: Dict[str, str] = {}
    for group in (True, False):
        patients = sorted((p for p, inf in infected.items() if inf == group), key=int)
        rng.shuffle(patients)
        n_test = int(round(len(patients) * test_fraction))
        rest = patients[n_test:]
        n_val = int(round(len(rest) * val_fraction))
        for p in patients[:n_test]:
            assignment[p] = "test"
        for p in rest[:n_val]:
            assignment[p] = "val"
        for p in rest[n_val:]:
            assignment[p] = "train"
    return assignment


def format_counts(counts: Dict[str, Dict], unit: str = "patients") -> str:
    """The human table printed by edge-prepare; ``unit`` names the groups (patients, or fields for field data,
    where a field "with parasites" is one holding at least one parasitized cell)."""
    infected, healthy = ("infected", "healthy") if unit == "patients" else ("w/ para.", "without")
    lines = [f"{'split':<6} {unit:>8} {infected:>8} {healthy:>8} {'cells':>7} {'parasitized':>11} "
             f"{'uninfected':>10}"]
    total = Counter()
    for split, c in counts.items():
        lines.append(f"{split:<6} {c['patients']:>8} {c['infected_patients']:>8} {c['healthy_patients']:>8} "
                     f"{c['cells']:>7} {c['cells_parasitized']:>11} {c['cells_uninfected']:>10}")
        total.update(c)
    lines.append(f"{'total':<6} {total['patients']:>8} {total['infected_patients']:>8} {total['healthy_patients']:>8} "
                 f"{total['cells']:>7} {total['cells_parasitized']:>11} {total['cells_uninfected']:>10}")
    return "\n".join(lines)


def check_zip_sizes(archive: zipfile.ZipFile, name: Path, max_member_bytes: int = ZIP_MAX_MEMBER_BYTES,
                    max_total_bytes: int = ZIP_MAX_TOTAL_BYTES, max_ratio: float = ZIP_MAX_RATIO) -> None:
    """Refuse a zip that would fill the disk before anything is written: members larger than a cell image can be,
    more in all than the NIH set with a wide margin, or compressed more than images ever compress (a zip bomb).
    The sizes checked are the declared ones; Python's zip reader never yields more than a member declares."""
    total = 0
    for info in archive.infolist():
        if info.is_dir():
            continue
        if info.file_size > 1_000_000 and info.file_size > max_ratio * max(1, info.compress_size):
            raise DatasetError(f"{name}: member {info.filename} is compressed {info.file_size / max(1, info.compress_size):,.0f}:1"
                               f" (images compress at most {max_ratio:g}:1): a zip bomb, refused")
        if info.file_size > max_member_bytes:
            raise DatasetError(f"{name}: member {info.filename} unpacks to {info.file_size:,} bytes, more than a "
                               f"cell image can be (limit {max_member_bytes:,}); not the NIH cell zip")
        total += info.file_size
        if total > max_total_bytes:
            raise DatasetError(f"{name}: unpacks to more than {max_total_bytes:,} bytes in all; not the NIH cell "
                               "zip (about 350 MB)")


def extract_zip(zip_path: Path, dest: Path, max_member_bytes: int = ZIP_MAX_MEMBER_BYTES,
                max_total_bytes: int = ZIP_MAX_TOTAL_BYTES, max_ratio: float = ZIP_MAX_RATIO) -> Path:
    """Extract a cell_images.zip into ``dest`` once per zip: ``dest/.extracted`` holds the zip's SHA-256, so the
    same zip is not unpacked again and another zip (even of the same size) replaces the old cells entirely. A
    folder at ``dest`` that edge-prepare did not extract is never touched."""
    marker = dest / ".extracted"
    digest = sha256_file(zip_path)
    if marker.exists() and marker.read_text().strip() == digest:
        return dest
    if dest.exists() and any(dest.iterdir()) and not marker.exists():
        raise DatasetError(f"{dest} exists and was not extracted by edge-prepare; move it away or choose another "
                           "--out")
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            check_zip_sizes(archive, zip_path, max_member_bytes, max_total_bytes, max_ratio)
            broken = archive.testzip()
            if broken:
                raise DatasetError(f"{zip_path}: member {broken} fails its CRC check; download the zip again")
            archive.extractall(partial)
    except zipfile.BadZipFile:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetError(f"{zip_path}: not a zip archive or truncated; download it again (edge-prepare --download)")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / ".extracted").write_text(digest + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(partial, dest)
    return dest


def download_zip(dest: Path, url: str = NIH_ZIP_URL, expected_bytes: int = NIH_ZIP_BYTES,
                 timeout: float = 30.0) -> Path:
    """Download the official zip to ``dest``, resuming a partial file, then check its size and zip integrity."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    if dest.exists() and dest.stat().st_size == expected_bytes:
        return dest
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            mode = "ab" if have and response.status == 206 else "wb"
            with open(part, mode) as fh:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    fh.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DatasetError(f"cannot download {url} ({reason}); this machine may be offline: copy cell_images.zip "
                           "here by hand and pass it with --data") from None
    size = part.stat().st_size
    if size != expected_bytes:
        raise DatasetError(f"download stopped at {size:,} of {expected_bytes:,} bytes; run the same command again "
                           "to resume")
    try:
        with zipfile.ZipFile(part) as archive:
            if archive.testzip():
                raise zipfile.BadZipFile
    except zipfile.BadZipFile:
        part.unlink()
        raise DatasetError("the downloaded zip is corrupt (CRC check failed); it was deleted, run again") from None
    os.replace(part, dest)
    return dest


def prepare(data: Path, out: Path, seed: int = 42, test_fraction: float = 0.2, val_fraction: float = 0.1,
            command: str = "", log=lambda msg: print(msg, file=sys.stderr), fields: Optional[Path] = None,
            unboxed_negatives: bool = False) -> Dict:
    """Scan ``data`` (folder or zip), split by patient, write ``manifest.csv`` and ``prepare.json`` to ``out``.

    ``fields``: a folder of annotated whole fields (IML-Malaria layout); their red cells are cut by the runtime's
    segmentation into ``out/field_cells`` and added as a second source, split by blocks of fields;
    ``unboxed_negatives``: see ``train.iml.cut_field_cells``."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data}: no such file or folder")
    if data.is_file():
        if not zipfile.is_zipfile(data):
            raise DatasetError(f"{data}: not a zip archive; pass the NIH cell_images folder or cell_images.zip")
        log(f"extracting {data} into {out / 'cell_images'} (once)")
        data = extract_zip(data, out / "cell_images")
    cells, bad = scan(data)
    assignment = split_patients(cells, seed, test_fraction, val_fraction)
    for cell in cells:
        cell.split = assignment[cell.patient]
    field_stats = None
    if fields is not None:
        from malaria_edge.train.iml import SOURCE, cut_field_cells
        log(f"cutting the red cells of {fields} with the runtime's segmentation")
        field_cells, field_stats = cut_field_cells(Path(fields), out / "field_cells", log,
                                                    unboxed_negatives=unboxed_negatives)
        cells += field_cells
    manifest = out / "manifest.csv"
    write_manifest(cells, manifest)
    counts = split_counts(cells)
    report = {
        "sources": {NIH: {"unit": "patients", "counts": counts}},
        "data": str(data.resolve()),
        "manifest": str(manifest.resolve()),
        "manifest_sha256": manifest_hash(cells),
        "seed": seed,
        "command": command,
        "fractions": {"test_of_patients": test_fraction, "val_of_train_patients": val_fraction},
        "counts": counts,
        "patients": {s: sorted({c.patient for c in cells if c.split == s and c.source == NIH}, key=int)
                     for s in SPLITS},
        "bad_files": [{"path": p, "reason": r} for p, r in bad],
    }
    if field_stats is not None:
        report["sources"][SOURCE] = {"unit": "fields", "counts": split_counts(cells, SOURCE),
                                     "segmentation": field_stats}
    (out / "prepare.json").write_text(json.dumps(report, indent=2))
    return report


def describe_bad(bad: List[Dict]) -> str:
    out = io.StringIO()
    for item in bad:
        out.write(f"skipped {item['path']}: {item['reason']}\n")
    return out.getvalue()
