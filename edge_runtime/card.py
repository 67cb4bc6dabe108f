"""The model card: a versioned JSON schema, validated on load before any image is read.

A card that is wrong in any way a user cannot see (a threshold of NaN, a stain spread of 0, a negative patient-rule
count) would make every cell one class with exit 0. So every field the runtime acts on is checked here, and the
first problem is refused with one line naming the field and its value.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .errors import MalariaEdgeError
from .outputs import HEADS
from .results_io import atomic_write_text
from .slide import SlideRule, SlideRuleError

CARD_SCHEMA = "malaria-edge/model-card/2"
READABLE_SCHEMAS = ("malaria-edge/model-card/1", CARD_SCHEMA)
MAX_INPUT_SIZE = 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CardError(MalariaEdgeError, ValueError):
    """A card field that is missing or out of range; the message names the field and the value."""


@dataclass(frozen=True)
class PatientRule:
    """When a group of cells (a patient, a slide) is called positive, negative or indeterminate."""
    min_cells: int
    min_parasitized: int
    min_fraction: float
    max_review_fraction: float
    chosen_on: str = ""

    def as_dict(self) -> Dict:
        return {"min_cells": self.min_cells, "min_parasitized": self.min_parasitized,
                "min_fraction": self.min_fraction, "max_review_fraction": self.max_review_fraction,
                "chosen_on": self.chosen_on}


@dataclass(frozen=True)
class Unfamiliar:
    """How far a cell may sit from the training data before it is flagged, and the share of flagged cells above
    which a run's results are called unreliable."""
    method: str
    threshold: float
    warn_fraction: float
    statistics: Dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCard:
    """The checked card. ``raw`` keeps every field (metrics, training data, commands) for reports."""
    schema: str
    name: str
    labels: List[str]
    head: str
    input_size: int
    threshold: float
    files: Dict[str, Dict]
    stain: Optional[Dict] = None
    patient_rule: Optional[PatientRule] = None
    slide_rule: Optional[SlideRule] = None      # how a slide of field cells is read (slide.py); None: no slide call
    reference: Optional[str] = None
    unfamiliar: Optional[Unfamiliar] = None
    tool_version: Optional[str] = None     # the malaria-edge that wrote the card; None on cards older than the field
    provenance: Dict[str, Dict[str, str]] = field(default_factory=dict)  # training source -> origin, licence
    raw: Dict = field(default_factory=dict, repr=False)

    def to_json(self) -> Dict:
        """The card as written to its JSON file: every field it was parsed from, so
        ``parse_card(card.to_json()) == card`` and a card read, checked and written again loses nothing."""
        return copy.deepcopy(self.raw)


def _fail(name: str, value: Any, want: str) -> None:
    shown = repr(value)
    raise CardError(f"card field {name} = {shown[:60]}{'...' if len(shown) > 60 else ''}: {want}")


def _number(name: str, value: Any, low: float, high: float, open_low: bool = False,
            open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "must be a finite number")
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        _fail(name, value, f"must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}")
    return float(value)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(name, value, f"must be an integer in [{low}, {high}]")
    return int(value)


def _plain_file_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
            or "\0" in value:
        _fail(name, value, "must be a plain file name (no folders)")
    return value


def _mapping(name: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        _fail(name, value, "must be an object")
    return value


def _rule(value: Any) -> PatientRule:
    rule = _mapping("patient_rule", value)
    for key in ("min_cells", "min_parasitized", "min_fraction", "max_review_fraction"):
        if key not in rule:
            _fail(f"patient_rule.{key}", None, "is required")
    return PatientRule(
        min_cells=_integer("patient_rule.min_cells", rule["min_cells"], 1, 1_000_000),
        min_parasitized=_integer("patient_rule.min_parasitized", rule["min_parasitized"], 1, 1_000_000),
        min_fraction=_number("patient_rule.min_fraction", rule["min_fraction"], 0.0, 1.0, open_low=True),
        max_review_fraction=_number("patient_rule.max_review_fraction", rule["max_review_fraction"], 0.0, 1.0),
        chosen_on=str(rule.get("chosen_on", "")))


def _slide_rule(value: Any) -> Optional[SlideRule]:
    if value is None:
        return None
    try:
        return SlideRule.from_dict(value)
    except SlideRuleError as exc:
        raise CardError(f"card field {exc}") from None


def _stain(value: Any) -> Optional[Dict]:
    if value is None:
        return None
    stain = _mapping("preprocessing.stain", value)
    for key, low in (("mean", 0.0), ("std", 0.0)):
        seq = stain.get(key)
        if not isinstance(seq, list) or len(seq) != 3:
            _fail(f"preprocessing.stain.{key}", seq, "must be a list of 3 numbers (R, G, B)")
        for i, v in enumerate(seq):
            _number(f"preprocessing.stain.{key}[{i}]", v, low, 255.0, open_low=key == "std")
    return {"mean": [float(v) for v in stain["mean"]], "std": [float(v) for v in stain["std"]]}


def _unfamiliar(value: Any) -> Optional[Unfamiliar]:
    if value is None:
        return None
    u = _mapping("unfamiliar", value)
    method = u.get("method")
    if not isinstance(method, str) or not method:
        _fail("unfamiliar.method", method, "must name the score")
    statistics = dict(_mapping("unfamiliar.statistics", u.get("statistics", {})))
    components = statistics.get("components")
    if not isinstance(components, list) or not components:
        _fail("unfamiliar.statistics.components", components, "must be a non-empty list of fitted sources")
    for i, comp in enumerate(components):
        mean, inverse = _mapping(f"unfamiliar.statistics.components[{i}]", comp).get("mean"), comp.get(
            "inverse_covariance")
        try:
            mean_arr, inv_arr = np.asarray(mean, dtype=float), np.asarray(inverse, dtype=float)
        except (TypeError, ValueError):
            _fail(f"unfamiliar.statistics.components[{i}]", comp.get("source"), "mean/inverse_covariance not numeric")
        if mean_arr.ndim != 1 or inv_arr.shape != (len(mean_arr), len(mean_arr)) or not (
                np.isfinite(mean_arr).all() and np.isfinite(inv_arr).all()):
            _fail(f"unfamiliar.statistics.components[{i}]", comp.get("source"),
                  "needs a finite mean vector and a matching square inverse covariance")
    return Unfamiliar(method=method,
                      threshold=_number("unfamiliar.threshold", u.get("threshold"), 0.0, 1e12, open_low=True),
                      warn_fraction=_number("unfamiliar.warn_fraction", u.get("warn_fraction"), 0.0, 1.0,
                                            open_low=True),
                      statistics=statistics)


def parse_card(card: Any) -> ModelCard:
    """Validate a card (a decoded JSON object) and return it typed; raise :class:`CardError` on the first problem."""
    card = _mapping("(card)", card)
    schema = card.get("schema")
    if schema not in READABLE_SCHEMAS:
        _fail("schema", schema, f"must be one of {', '.join(READABLE_SCHEMAS)} (a newer malaria-edge wrote it?)")
    labels = card.get("labels")
    if (not isinstance(labels, list) or len(labels) != 2 or not all(isinstance(x, str) and x for x in labels)
            or labels[0] == labels[1]):
        _fail("labels", labels, "must be two distinct names, parasitized first")
    head = card.get("head")
    if head not in HEADS:
        _fail("head", head, f"must be one of {', '.join(HEADS)}")
    size = _integer("input.size", _mapping("input", card.get("input")).get("size"), 1, MAX_INPUT_SIZE)
    threshold = _number("threshold", card.get("threshold"), 0.0, 1.0, open_low=True, open_high=True)
    files = _mapping("files", card.get("files"))
    if not files:
        _fail("files", dict(files), "must describe at least one model file")
    for name, info in files.items():
        _plain_file_name("files key", name)
        digest = _mapping(f"files.{name}", info).get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            _fail(f"files.{name}.sha256", digest, "must be 64 lowercase hex digits")
    reference = card.get("reference")
    if reference is not None:
        _plain_file_name("reference", reference)
    tool_version = card.get("tool_version")
    if tool_version is not None and (not isinstance(tool_version, str) or not tool_version):
        _fail("tool_version", tool_version, "must be a version string")
    preprocessing = card.get("preprocessing") or {}
    provenance = _provenance(card.get("provenance"))
    return ModelCard(
        schema=schema, name=str(card.get("name", "")), labels=list(labels), head=head, input_size=size,
        threshold=threshold, files={k: dict(v) for k, v in files.items()},
        stain=_stain(_mapping("preprocessing", preprocessing).get("stain")),
        patient_rule=_rule(card["patient_rule"]) if card.get("patient_rule") is not None else None,
        slide_rule=_slide_rule(card.get("slide_rule")),
        reference=reference, unfamiliar=_unfamiliar(card.get("unfamiliar")), tool_version=tool_version,
        provenance=provenance, raw=copy.deepcopy(dict(card)))


def _provenance(value: Any) -> Dict[str, Dict[str, str]]:
    """``provenance``: {training source: {"origin": ..., "licence": ...}}, both non-empty text; {} when absent."""
    if value is None:
        return {}
    sources = _mapping("provenance", value)
    checked = {}
    for source, terms in sources.items():
        terms = _mapping(f"provenance.{source}", terms)
        for key in ("origin", "licence"):
            if not isinstance(terms.get(key), str) or not terms[key].strip():
                _fail(f"provenance.{source}.{key}", terms.get(key), "must say where the data came from and on what terms")
        checked[str(source)] = {"origin": terms["origin"], "licence": terms["licence"]}
    return checked


def read_card(path: Path) -> ModelCard:
    """Read and validate a card file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"unreadable model card ({exc})") from None
    return parse_card(data)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through the one atomic writer: a reader never sees half a card or report, even after a power
    cut, and the file gets the same permissions as the bundle's other files."""
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    """numpy scalars and the like, as plain numbers."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
