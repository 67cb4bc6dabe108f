"""The microscopist's review folder: candidates to confirm, a sample of confident negatives, and the recount.

``write_review(DIR, slide, rows, crops, rule)`` writes::

    DIR/<slide>/Parasitized/003_p0.97_PA171701_cell42.png   every candidate of the slide, rank first (the ranks of
                                                            ``SlideResult.candidate_list``, as on the report)
    DIR/<slide>/Uninfected/n004_p0.02_PA171702_cell7.png    a small sample of confident negatives, stratified by
                                                            probability (so a missed parasite has a chance to show)
    DIR/<slide>/review_index.csv                            rank, file, folder, field path, cell index, prob, box
    DIR/<slide>/review_slide.json                           every cell's row and the rule: what the recount needs

The microscopist moves what is wrong to the other folder (a false candidate to Uninfected/, a parasite spotted in
the sample to Parasitized/). ``read_review(DIR)`` reads where the files are now and recomputes each slide: cells in
Parasitized/ are confirmed and counted exactly, the rest carry the measured miss rate (``slide.assess_slide`` with
``reviewed``).

The same ``DIR/<slide>`` is an ``edge-adapt --cells`` input as it is (Parasitized/ and Uninfected/ directly inside,
crops cut by ``segment.cut_cell`` like edge-classify --save-crops), and so is ``DIR`` itself: edge-adapt merges
the class folders of every slide folder (``DIR/*/Parasitized``, ``DIR/*/Uninfected``).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from .slide import (SlideResult, SlideRule, assess_slide, candidate_rows, cell_key, doubtful_fields, is_edge,
                    is_left_out)

PARASITIZED_DIR, UNINFECTED_DIR = "Parasitized", "Uninfected"
INDEX_NAME, SLIDE_NAME = "review_index.csv", "review_slide.json"
INDEX_COLUMNS = ("rank", "file", "folder", "path", "cell", "prob_parasitized", "x", "y", "w", "h")
NEGATIVE_SAMPLE = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
CropSource = Union[Mapping[Hashable, np.ndarray], Callable[[Mapping], np.ndarray]]


def safe_name(text: str) -> str:
    """A file or folder name from any text: letters, digits, dot, dash and underscore only."""
    return _UNSAFE.sub("_", str(text)).strip("._") or "slide"


def crop_file_name(row: Mapping, prefix: str) -> str:
    """``<prefix>_p<prob>_<field stem>_cell<index>.png``: the rank (or sample number) first so a file browser
    shows candidates in review order; the field and cell name the outline on the report's overlay; ``_edge`` before
    the suffix for a cell cut by the image edge, ``_left_out`` for one of a field left out of the count (shown, not
    counted)."""
    stem = safe_name(Path(str(row.get("path") or "cell")).stem)
    cell = row.get("cell")
    tail = f"_cell{int(cell)}" if cell not in (None, "") else ""
    if is_edge(row):
        tail += "_edge"
    if is_left_out(row):
        tail += "_left_out"
    return f"{prefix}_p{float(row['prob_parasitized']):.2f}_{stem}{tail}.png"


def field_crops(fields: Iterable) -> Dict[Tuple[str, int], np.ndarray]:
    """{(field source, cell index): crop} for FieldResults that kept their image: the cell as the model saw it
    (``segment.cut_cell``)."""
    from .segment import cut_cell
    out = {}
    for f in fields:
        for c in f.shown_cells:
            out[(str(f.source), int(c.index))] = cut_cell(f.image, c.region)
    return out


def negative_sample(rows: List[Mapping], rule: SlideRule, k: int = NEGATIVE_SAMPLE, seed: int = 0) -> List[Mapping]:
    """Up to ``k`` confident negatives (below the candidate threshold), stratified: equal shares from the four
    probability quartiles of the slide's negatives, drawn with a fixed seed."""
    neg = sorted((r for r in rows if not r.get("error") and not is_edge(r)
                  and float(r["prob_parasitized"]) < rule.candidate_threshold),
                 key=lambda r: float(r["prob_parasitized"]))
    if not neg or k <= 0:
        return []
    rng = np.random.default_rng(seed)
    strata = [s for s in np.array_split(np.arange(len(neg)), 4) if len(s)]
    picked: List[int] = []
    for i, s in enumerate(strata):
        want = k // len(strata) + (1 if i < k % len(strata) else 0)
        picked += rng.choice(s, size=min(want, len(s)), replace=False).tolist()
    return [neg[i] for i in sorted(picked, key=lambda i: -float(neg[i]["prob_parasitized"]))]


def _crop(crops: CropSource, row: Mapping) -> np.ndarray:
    return crops(row) if callable(crops) else crops[cell_key(row)]


def _plain_row(row: Mapping) -> Dict:
    keep = ("path", "cell", "box", "at_edge", "prob_parasitized", "prediction", "warnings", "unfamiliar", "error")
    out = {k: row[k] for k in keep if k in row}
    if "box" in out and out["box"] is not None:
        out["box"] = [int(v) for v in out["box"]]
    return out


def write_review(directory, slide_name: str, cell_records: Iterable[Mapping], crops: CropSource, rule: SlideRule,
                 source: Optional[str] = None, negatives: int = NEGATIVE_SAMPLE, rbc_per_ul: Optional[float] = None,
                 unfamiliar_limits: Optional[Tuple[float, float]] = None, model: Optional[Mapping] = None) -> Path:
    """Write one slide's review folder (see the module docstring) and return it. ``crops``: {cell_key: crop} (see
    :func:`field_crops`) or a function of the row; ``model``: {name, sha256} of the model that read it, for the
    report after review. Refuses a slide folder that already exists: a review in
    progress is never overwritten."""
    from PIL import Image
    rows = [dict(r) for r in cell_records]
    folder = Path(directory) / safe_name(slide_name)
    if folder.exists():
        raise FileExistsError(f"{folder} exists: a review in progress is never overwritten; choose another DIR")
    (folder / PARASITIZED_DIR).mkdir(parents=True)
    (folder / UNINFECTED_DIR).mkdir(parents=True)
    index = []
    for r in candidate_rows(rows, rule, left_out=doubtful_fields(rows, unfamiliar_limits)[1]):
        name = crop_file_name(r, f"{r['rank']:03d}")
        Image.fromarray(_crop(crops, r)).save(folder / PARASITIZED_DIR / name)
        index.append((r["rank"], name, PARASITIZED_DIR, r))
    for j, r in enumerate(negative_sample(rows, rule, negatives), 1):
        name = crop_file_name(r, f"n{j:03d}")
        Image.fromarray(_crop(crops, r)).save(folder / UNINFECTED_DIR / name)
        index.append(("", name, UNINFECTED_DIR, r))
    with open(folder / INDEX_NAME, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(INDEX_COLUMNS)
        for rank, name, where, r in index:
            box = list(r.get("box") or ("", "", "", ""))
            w.writerow([rank, name, where, r.get("path", ""), r.get("cell", ""),
                        f"{float(r['prob_parasitized']):.6f}", *box])
    meta = {"slide": slide_name, "source": source, "rule": rule.as_dict(), "rbc_per_ul": rbc_per_ul,
            "unfamiliar_limits": list(unfamiliar_limits) if unfamiliar_limits else None, "model": dict(model or {}),
            "rows": [_plain_row(r) for r in rows]}
    (folder / SLIDE_NAME).write_text(json.dumps(meta), encoding="utf-8")
    return folder


def read_index(folder: Path) -> Dict[str, Dict]:
    """{file name: index row} of one slide's review folder."""
    with open(Path(folder) / INDEX_NAME, newline="", encoding="utf-8") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def confirmed_cells(folder: Path) -> Tuple[set, List[str]]:
    """The cell keys whose crops are now in Parasitized/, and the names of files there the index does not know
    (renamed or added by hand: not counted, reported)."""
    index = read_index(folder)
    confirmed, unknown = set(), []
    for p in sorted((Path(folder) / PARASITIZED_DIR).glob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        entry = index.get(p.name)
        if entry is None:
            unknown.append(p.name)
            continue
        confirmed.add(cell_key({"path": entry["path"], "cell": entry["cell"]}))
    return confirmed, unknown


def read_slide_folder(folder) -> SlideResult:
    """Recompute one slide from where its files are now."""
    folder = Path(folder)
    meta = json.loads((folder / SLIDE_NAME).read_text(encoding="utf-8"))
    rule = SlideRule.from_dict(meta["rule"])
    confirmed, unknown = confirmed_cells(folder)
    kwargs = {"rbc_per_ul": meta["rbc_per_ul"]} if meta.get("rbc_per_ul") else {}
    limits = meta.get("unfamiliar_limits")
    result = assess_slide(meta["rows"], rule, name=meta["slide"], source=meta.get("source"), reviewed=confirmed,
                          unfamiliar_limits=tuple(limits) if limits else None, **kwargs)
    if unknown:
        result.warnings.append(f"{len(unknown)} file(s) in {PARASITIZED_DIR}/ not in {INDEX_NAME} (not counted): "
                               + ", ".join(unknown[:5]))
    return result


def read_review(directory) -> Dict[str, SlideResult]:
    """Every slide of a review folder, recomputed: {slide name: SlideResult with reviewed=True}."""
    out = {}
    for folder in sorted(p for p in Path(directory).iterdir() if (p / SLIDE_NAME).is_file()):
        result = read_slide_folder(folder)
        out[result.name] = result
    return out


def review_crops(directory) -> Dict[str, Dict[Tuple[str, object], np.ndarray]]:
    """{slide name: {cell_key: crop}} of every crop in a review folder, read from where it is now (the report
    after review shows them)."""
    from PIL import Image
    out: Dict[str, Dict[Tuple[str, object], np.ndarray]] = {}
    for folder in sorted(p for p in Path(directory).iterdir() if (p / SLIDE_NAME).is_file()):
        name = json.loads((folder / SLIDE_NAME).read_text(encoding="utf-8"))["slide"]
        crops = out.setdefault(name, {})
        for file_name, entry in read_index(folder).items():
            for where in (PARASITIZED_DIR, UNINFECTED_DIR):
                path = folder / where / file_name
                if path.is_file():
                    with Image.open(path) as img:
                        crops[cell_key({"path": entry["path"], "cell": entry["cell"]})] = np.asarray(img.convert("RGB"))
                    break
    return out


def review_model(directory) -> Dict[str, str]:
    """{name, sha256} of the model that read the slides of a review folder (the first slide that records it)."""
    for folder in sorted(p for p in Path(directory).iterdir() if (p / SLIDE_NAME).is_file()):
        model = json.loads((folder / SLIDE_NAME).read_text(encoding="utf-8")).get("model")
        if model:
            return {"name": str(model.get("name", "")), "sha256": str(model.get("sha256", ""))}
    return {"name": "unknown", "sha256": ""}
