"""From every cell of a slide to one call a microscopist can check: candidates, corrected parasitemia, detection limit.

A real slide's parasitemia (0.1-2%) is as small as the model's false-flag rate (~1-2% of healthy cells), so the raw
"flagged / cells" is about twice the truth and "any flagged cell" calls every slide positive. Microscopy practice
is used instead: every cell is examined, the few worth a look (the *candidates*: cells at or above the rule's
candidate threshold, a band just under the call threshold included) are ranked for the microscopist, and what they
confirm makes the count.

Figures of a slide (all fractions of the cells examined, N):

* ``parasitemia`` before review: Rogan-Gladen, p = (q + spec - 1) / (sens + spec - 1) with q = flagged / N (cells at
  or above the call threshold), sens and 1 - spec (the false-flag rate) measured on validation data of the slide's
  source (``SlideRule.sources``), clipped to [0, 1].
  After review: p = confirmed / (N * candidate sensitivity): confirmed cells are counted exactly, the cells left
  unreviewed carry the measured miss rate of the candidate band (parasites lost by segmentation count as missed).
* ``parasitemia_ci``: 95% interval from ``draws`` Monte Carlo draws (fixed seed): q ~ Beta(x + 1/2, N - x + 1/2)
  (Jeffreys), sens ~ Beta(k + 1/2, n - k + 1/2), and the slide's false-flag rate ~ a Beta with the measured mean
  and a variance that adds the between-slide spread measured on validation (``false_flag_sd``: the false-flag
  rate differs from slide to slide, 0.4-2% on the IML validation slides, far beyond binomial noise); each draw put
  through the same formula; 2.5th and 97.5th percentiles. The lower end is 0 when nothing was flagged or
  confirmed.
* ``parasites_per_ul`` = parasitemia x RBC/µL (assumed 5,000,000 unless the caller gives the patient's count).
* ``detection_limit``: the lowest parasitemia at which, with 95% probability, at least one parasite among these N
  cells lands among the candidates and so is put in front of the microscopist: (1 - 0.05^(1/N)) / candidate
  sensitivity. A "no parasites found" means "none down to this level".

Cells cut by the image edge (rows with ``at_edge``) are never counted: they are not among the N cells and not in
any figure above. One at or above the candidate threshold is still a candidate, ranked with the others and counted
in ``candidates``, so that a parasite at the edge of a field is put in front of the microscopist; once confirmed it
makes the call after review, not the parasitemia.

Fields left out of the count (a failed quality gate, too many unfamiliar cells; see the call below) are not among
the N cells either, but a parasite in one must not pass silently: the most probable candidates of each such field,
at most the rule's review budget of its cells (``max_candidate_share`` of them, at least one), follow the counted
candidates in the ranking, marked ``left_out``. The microscopist sees them with the field's warning; one confirmed
makes the call after review, never the parasitemia.

The call, exactly one of CALLS:

* ``indeterminate``: fewer than ``min_cells`` usable cells. A field whose rows carry warnings (a failed quality
  gate) or whose unfamiliar share exceeds the card's warn fraction is left out; the slide is still read when the
  remaining good fields hold ``min_cells`` cells ("suffice"), and the left-out fields are named in ``warnings``.
* before review: ``parasites found`` when more cells are flagged than false flags explain: the one-sided p-value
  P(X >= flagged) under the beta-binomial of false flags on N cells (the slide's false-flag rate ~ that Beta) is
  below the rule's
  ``alpha``; ``review needed`` when it is not but there are candidates; ``no parasites found`` when there are none.
* after review: ``parasites found`` when the microscopist confirmed at least ``min_confirmed`` cells, else
  ``no parasites found`` (with the detection limit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

FOUND, REVIEW_NEEDED, NONE_FOUND, INDETERMINATE = ("parasites found", "review needed", "no parasites found",
                                                   "indeterminate")
CALLS = (FOUND, REVIEW_NEEDED, NONE_FOUND, INDETERMINATE)
JSON_KEYS = ("cells", "candidates", "parasitemia", "parasitemia_ci", "parasites_per_ul", "detection_limit", "call",
             "reviewed")
DEFAULT_RBC_PER_UL = 5_000_000
DEFAULT_MIN_CELLS = 50
DEFAULT_ALPHA = 0.01
DEFAULT_DRAWS = 4000
DEFAULT_UNFAMILIAR_WARN = 0.1
DEFAULT_MAX_CANDIDATE_SHARE = 0.03
SEED = 20250607
SOURCES = ("iml", "nih")
RULE_SCHEMA = "malaria-edge/slide-rule/1"


class SlideRuleError(ValueError):
    """A slide-rule field that is missing or out of range; the message names the field and the value."""


# ------------------------------------------------------------------------------------------------------------ rule
@dataclass(frozen=True)
class SourceRates:
    """The model's measured error rates on one source, with their counts (k of n). At the call threshold:
    sensitivity (annotated parasites found and called parasitized) and false-flag rate (1 - specificity: cells that
    are not parasites but called parasitized); at the candidate threshold the same two, for the review band."""
    sensitivity_k: int
    sensitivity_n: int
    false_flag_k: int
    false_flag_n: int
    candidate_sensitivity_k: int
    candidate_false_flag_k: int
    measured_on: str = ""
    false_flag_sd: float = 0.0

    def false_flag_beta(self) -> Tuple[float, float]:
        """Beta(a, b) of a new slide's false-flag rate: mean k/n, variance = the between-slide variance measured on
        validation (``false_flag_sd``, the spread of the rate from one field or patient to the next beyond
        binomial noise) + the uncertainty of the mean itself (~ m(1 - m)/n)."""
        m = (self.false_flag_k + 0.5) / (self.false_flag_n + 1.0)
        var = self.false_flag_sd ** 2 + m * (1 - m) / (self.false_flag_n + 2.0)
        phi = max(m * (1 - m) / var - 1.0, 1e-3)
        return m * phi, (1 - m) * phi

    @property
    def sensitivity(self) -> float:
        return self.sensitivity_k / self.sensitivity_n

    @property
    def false_flag_rate(self) -> float:
        return self.false_flag_k / self.false_flag_n

    @property
    def candidate_sensitivity(self) -> float:
        return self.candidate_sensitivity_k / self.sensitivity_n

    @property
    def candidate_false_flag_rate(self) -> float:
        return self.candidate_false_flag_k / self.false_flag_n

    def as_dict(self) -> Dict:
        return {"sensitivity": self.sensitivity, "sensitivity_k": self.sensitivity_k,
                "sensitivity_n": self.sensitivity_n, "false_flag_rate": self.false_flag_rate,
                "false_flag_k": self.false_flag_k, "false_flag_n": self.false_flag_n,
                "candidate_sensitivity": self.candidate_sensitivity,
                "candidate_sensitivity_k": self.candidate_sensitivity_k,
                "candidate_false_flag_rate": self.candidate_false_flag_rate,
                "candidate_false_flag_k": self.candidate_false_flag_k, "false_flag_sd": self.false_flag_sd,
                "measured_on": self.measured_on}


def _count(name: str, value: Any, low: int = 0, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise SlideRuleError(f"slide_rule.{name} = {value!r}: must be an integer in [{low}, {high if high is not None else 'inf'}]")
    return int(value)


def _fraction(name: str, value: Any, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0 < value if open_low else 0 <= value) or value > 1:
        raise SlideRuleError(f"slide_rule.{name} = {value!r}: must be a number in {'(' if open_low else '['}0, 1]")
    return float(value)


def _rates(name: str, d: Mapping) -> SourceRates:
    if not isinstance(d, Mapping):
        raise SlideRuleError(f"slide_rule.sources.{name} = {d!r}: must be an object")
    for key in ("sensitivity_n", "false_flag_n"):
        if key not in d:
            raise SlideRuleError(f"slide_rule.sources.{name}.{key} is required")
    sn = _count(f"sources.{name}.sensitivity_n", d["sensitivity_n"], 1)
    fn = _count(f"sources.{name}.false_flag_n", d["false_flag_n"], 1)

    def k(key: str, rate_key: str, n: int) -> int:
        if key in d:
            return _count(f"sources.{name}.{key}", d[key], 0, n)
        if rate_key in d:  # a card that gives the rate and n only
            return int(round(_fraction(f"sources.{name}.{rate_key}", d[rate_key]) * n))
        raise SlideRuleError(f"slide_rule.sources.{name}.{key} (or {rate_key}) is required")

    rates = SourceRates(k("sensitivity_k", "sensitivity", sn), sn, k("false_flag_k", "false_flag_rate", fn), fn,
                        k("candidate_sensitivity_k", "candidate_sensitivity", sn),
                        k("candidate_false_flag_k", "candidate_false_flag_rate", fn), str(d.get("measured_on", "")),
                        _fraction(f"sources.{name}.false_flag_sd", d.get("false_flag_sd", 0.0)))
    if rates.sensitivity <= rates.false_flag_rate:
        raise SlideRuleError(f"slide_rule.sources.{name}: sensitivity {rates.sensitivity:.3f} <= false-flag rate "
                             f"{rates.false_flag_rate:.3f}; the model cannot tell parasites from false flags")
    return rates


@dataclass(frozen=True)
class SlideRule:
    """How a slide is read: the call threshold, the candidate threshold (the review band's lower end), the measured
    rates per source, the fewest usable cells, the test level, and where each was chosen or measured. Lives in the
    model card as ``slide_rule`` (schema RULE_SCHEMA)."""
    threshold: float
    candidate_threshold: float
    sources: Mapping[str, Mapping]
    min_cells: int = DEFAULT_MIN_CELLS
    alpha: float = DEFAULT_ALPHA
    max_candidate_share: float = DEFAULT_MAX_CANDIDATE_SHARE
    min_confirmed: int = 1
    chosen_on: str = ""

    def __post_init__(self):
        _fraction("threshold", self.threshold, open_low=True)
        _fraction("candidate_threshold", self.candidate_threshold, open_low=True)
        if self.candidate_threshold > self.threshold:
            raise SlideRuleError(f"slide_rule.candidate_threshold = {self.candidate_threshold}: must not exceed the "
                                 f"threshold {self.threshold}")
        _count("min_cells", self.min_cells, 1)
        _count("min_confirmed", self.min_confirmed, 1)
        _fraction("alpha", self.alpha, open_low=True)
        _fraction("max_candidate_share", self.max_candidate_share, open_low=True)
        if not isinstance(self.sources, Mapping) or not self.sources:
            raise SlideRuleError(f"slide_rule.sources = {self.sources!r}: must name at least one source")
        for name, d in self.sources.items():
            _rates(name, d)

    def source_for(self, source: str) -> str:
        """The source whose rates apply: ``source`` itself, or a clinic's own rule's only source (an adapted
        model's rates were measured on that clinic's cells, which are what it reads)."""
        return next(iter(self.sources)) if source not in self.sources and len(self.sources) == 1 else source

    def rates(self, source: str) -> SourceRates:
        if source not in self.sources:
            raise SlideRuleError(f"slide_rule has no rates for source {source!r} (has {', '.join(self.sources)})")
        return _rates(source, self.sources[source])

    @classmethod
    def from_dict(cls, d: Mapping) -> "SlideRule":
        if not isinstance(d, Mapping):
            raise SlideRuleError(f"slide_rule = {d!r}: must be an object")
        for key in ("threshold", "candidate_threshold", "sources"):
            if key not in d:
                raise SlideRuleError(f"slide_rule.{key} is required")
        return cls(threshold=d["threshold"], candidate_threshold=d["candidate_threshold"],
                   sources={k: _rates(k, v).as_dict() for k, v in d["sources"].items()},
                   min_cells=d.get("min_cells", DEFAULT_MIN_CELLS), alpha=d.get("alpha", DEFAULT_ALPHA),
                   max_candidate_share=d.get("max_candidate_share", DEFAULT_MAX_CANDIDATE_SHARE),
                   min_confirmed=d.get("min_confirmed", 1),
                   chosen_on=str(d.get("chosen_on", "")))

    def as_dict(self) -> Dict:
        return {"schema": RULE_SCHEMA, "threshold": self.threshold, "candidate_threshold": self.candidate_threshold,
                "max_candidate_share": self.max_candidate_share, "min_cells": self.min_cells, "alpha": self.alpha,
                "min_confirmed": self.min_confirmed,
                "sources": {k: _rates(k, v).as_dict() for k, v in self.sources.items()}, "chosen_on": self.chosen_on}


# ------------------------------------------------------------------------------------------------------ statistics
def _beta(rng: np.random.Generator, k: int, n: int, draws: int) -> np.ndarray:
    """Jeffreys posterior draws of a proportion from k of n."""
    return rng.beta(k + 0.5, n - k + 0.5, draws)


def false_flag_p_value(flagged: int, cells: int, a: float, b: float) -> float:
    """P(X >= flagged) when X counts false flags on ``cells`` cells with no parasite at all and the slide's
    false-flag rate ~ Beta(a, b) (:meth:`SourceRates.false_flag_beta`): a beta-binomial tail."""
    if flagged <= 0:
        return 1.0
    if flagged > cells:
        return 0.0
    lbeta_ab = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    ln_choose0 = math.lgamma(cells + 1)
    below = 0.0
    for x in range(flagged):
        log_pmf = (ln_choose0 - math.lgamma(x + 1) - math.lgamma(cells - x + 1)
                   + math.lgamma(x + a) + math.lgamma(cells - x + b) - math.lgamma(cells + a + b) - lbeta_ab)
        below += math.exp(log_pmf)
    return float(min(1.0, max(0.0, 1.0 - below)))


def corrected_parasitemia(count: int, cells: int, sens: Tuple[int, int], false_flag: Optional[SourceRates],
                          draws: int = DEFAULT_DRAWS, seed: int = SEED) -> Tuple[float, Tuple[float, float]]:
    """Rogan-Gladen estimate and 95% interval. ``count`` of ``cells`` observed positive; ``sens`` = (k, n) of the
    test's sensitivity; ``false_flag``: the rates whose false-flag rate applies, or None when positives are
    confirmed (no false flags: after review). See the module docstring for the draws."""
    se = sens[0] / sens[1]
    ff = false_flag.false_flag_rate if false_flag else 0.0
    point = float(np.clip((count / cells - ff) / (se - ff), 0.0, 1.0))
    rng = np.random.default_rng(seed)
    q = _beta(rng, count, cells, draws)
    s = _beta(rng, sens[0], sens[1], draws)
    f = rng.beta(*false_flag.false_flag_beta(), draws) if false_flag else np.zeros(draws)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.clip((q - f) / np.maximum(s - f, 1e-9), 0.0, 1.0)
    low, high = (float(v) for v in np.percentile(p, [2.5, 97.5]))
    if count == 0:
        low = 0.0
    return point, (min(low, point), max(high, point))


def detection_limit(cells: int, candidate_sensitivity: float, power: float = 0.95) -> Optional[float]:
    """The lowest parasitemia at which, with probability ``power``, at least one parasite among ``cells`` cells is
    a candidate: 1 - (1 - p s)^N >= power  <=>  p >= (1 - (1 - power)^(1/N)) / s. None when there are no cells."""
    if cells <= 0 or candidate_sensitivity <= 0:
        return None
    return float(min(1.0, (1.0 - (1.0 - power) ** (1.0 / cells)) / candidate_sensitivity))


# ----------------------------------------------------------------------------------------------------------- slide
def cell_key(row: Mapping) -> Tuple[str, Any]:
    """How a cell is named across rows, review folders and reports: (field path, cell index)."""
    cell = row.get("cell")
    return (str(row.get("path") or row.get("source") or ""), None if cell in (None, "") else int(cell))


def is_edge(row: Mapping) -> bool:
    """Whether a row is a cell cut by the image edge (``at_edge``): shown for review, never counted."""
    return str(row.get("at_edge") or "").strip().lower() in ("1", "true")


def is_left_out(row: Mapping) -> bool:
    """Whether a candidate comes from a field left out of the count (``left_out``): shown for review, never counted."""
    return bool(row.get("left_out"))


def _most_probable_first(rows: Iterable[Mapping], rule: SlideRule) -> List[Dict]:
    """Copies of the rows at or above the candidate threshold, most probable first (ties by field and cell)."""
    cands = [dict(r) for r in rows if float(r["prob_parasitized"]) >= rule.candidate_threshold]
    cands.sort(key=lambda r: (-float(r["prob_parasitized"]), str(r.get("path") or ""), int(r.get("cell") or 0)))
    return cands


def candidate_rows(rows: Iterable[Mapping], rule: SlideRule, left_out: Collection[str] = ()) -> List[Dict]:
    """The candidates, ranked: :func:`_most_probable_first`, each a copy of its row with ``rank`` from 1. Rows of
    the fields in ``left_out`` (:func:`doubtful_fields`) come after the others: per field its most probable
    candidates, at most ``max_candidate_share`` of its whole cells (at least one), marked ``left_out``. Rows with
    an error are never candidates."""
    left_out = set(left_out)
    counted: List[Mapping] = []
    by_field: Dict[str, List[Mapping]] = {}
    for r in rows:
        if r.get("error"):
            continue
        path = str(r.get("path") or "")
        if path in left_out:
            by_field.setdefault(path, []).append(r)
        else:
            counted.append(r)
    shown = []
    for frows in by_field.values():
        budget = max(1, math.ceil(rule.max_candidate_share * sum(not is_edge(r) for r in frows) - 1e-9))
        shown += [{**r, "left_out": 1} for r in _most_probable_first(frows, rule)[:budget]]
    cands = _most_probable_first(counted, rule) + _most_probable_first(shown, rule)
    for rank, r in enumerate(cands, 1):
        r["rank"] = rank
    return cands


def _is_unfamiliar(value: Any, threshold: Optional[float]) -> bool:
    if isinstance(value, bool):
        return value
    if value in (None, "") or threshold is None:
        return False
    return float(value) > threshold


def _warnings_of(row: Mapping) -> List[str]:
    w = row.get("warnings")
    if not w:
        return []
    return [w] if isinstance(w, str) else [str(x) for x in w]


@dataclass
class SlideResult:
    """One slide's reading. ``to_json()`` holds exactly JSON_KEYS; ``detail()`` says how they were reached."""
    name: str
    cells: int
    candidates: int
    parasitemia: Optional[float]
    parasitemia_ci: Optional[Tuple[float, float]]
    parasites_per_ul: Optional[float]
    detection_limit: Optional[float]
    call: str
    reviewed: bool
    reason: str = ""
    source: str = ""
    flagged: int = 0
    confirmed: Optional[int] = None
    p_value: Optional[float] = None
    rbc_per_ul: float = DEFAULT_RBC_PER_UL
    warnings: List[str] = field(default_factory=list)
    excluded_fields: List[str] = field(default_factory=list)
    cells_total: int = 0
    failed: int = 0
    rates: Dict = field(default_factory=dict)
    rule: Dict = field(default_factory=dict)
    candidate_list: List[Dict] = field(default_factory=list, repr=False)
    edge_candidates: int = 0
    confirmed_edge: Optional[int] = None
    left_out_candidates: int = 0
    confirmed_left_out: Optional[int] = None

    def to_json(self) -> Dict:
        return {"cells": self.cells, "candidates": self.candidates, "parasitemia": self.parasitemia,
                "parasitemia_ci": None if self.parasitemia_ci is None else [float(v) for v in self.parasitemia_ci],
                "parasites_per_ul": self.parasites_per_ul, "detection_limit": self.detection_limit,
                "call": self.call, "reviewed": self.reviewed}

    def detail(self) -> Dict:
        return {"name": self.name, "reason": self.reason, "source": self.source, "flagged": self.flagged,
                "confirmed": self.confirmed, "p_value": self.p_value, "rbc_per_ul": self.rbc_per_ul,
                "warnings": list(self.warnings), "excluded_fields": list(self.excluded_fields),
                "cells_total": self.cells_total, "failed": self.failed, "edge_candidates": self.edge_candidates,
                "confirmed_edge": self.confirmed_edge, "left_out_candidates": self.left_out_candidates,
                "confirmed_left_out": self.confirmed_left_out, "rates": dict(self.rates),
                "rule": dict(self.rule),
                "method": ("Rogan-Gladen on cells flagged at the call threshold, 95% interval from Beta draws of the "
                           "observed rate, sensitivity and false-flag rate" if not self.reviewed else
                           "confirmed cells divided by the candidate band's sensitivity, 95% interval from Beta draws "
                           "of the confirmed rate and that sensitivity"),
                "detection_limit_meaning": ("lowest parasitemia at which, with 95% probability, at least one "
                                            "parasite of these cells is among the candidates")}

    def text(self) -> str:
        """One line for a terminal or a report caption."""
        if self.parasitemia is None:
            return f"{self.name}: {self.call} ({self.reason})"
        lo, hi = self.parasitemia_ci
        dl = "n/a" if self.detection_limit is None else f"{self.detection_limit:.2%}"
        return (f"{self.name}: {self.call}; {self.cells} cells, {self.candidates} candidates, parasitemia "
                f"{self.parasitemia:.2%} (95% CI {lo:.2%}-{hi:.2%}), {self.parasites_per_ul:,.0f}/µL, detection "
                f"limit {dl}{' (reviewed)' if self.reviewed else ''}")


def default_source(rows: Sequence[Mapping]) -> str:
    """``iml`` (whole fields: rows with a cell index) or ``nih`` (single-cell crops)."""
    return "iml" if any(r.get("cell") not in (None, "") for r in rows) else "nih"


def assess_slide(rows: Iterable[Mapping], rule: SlideRule, name: str = "", source: Optional[str] = None,
                 reviewed: Optional[Collection[Hashable]] = None, rbc_per_ul: float = DEFAULT_RBC_PER_UL,
                 unfamiliar_limits: Optional[Tuple[float, float]] = None,
                 draws: int = DEFAULT_DRAWS) -> SlideResult:
    """Read one slide from its cell rows (dicts with ``prob_parasitized`` and ``prediction``; optionally ``path``,
    ``cell``, ``box``, ``warnings``, ``unfamiliar`` (score or bool), ``error``).

    ``reviewed``: None before review; after review, the keys (:func:`cell_key`) of the cells the microscopist
    confirmed as parasitized (an empty set: all candidates rejected). ``unfamiliar_limits``: (score threshold, warn
    fraction) from the card. ``source``: which measured rates apply (default: :func:`default_source`).
    Steps: leave out doubtful fields, count, estimate, call."""
    rows = list(rows)
    readable = [r for r in rows if not r.get("error")]
    source = rule.source_for(source or default_source(readable))
    rates = rule.rates(source)
    counted = [r for r in readable if not is_edge(r)]
    warnings, excluded = doubtful_fields(readable, unfamiliar_limits)
    left_out = set(excluded)
    shown = [r for r in readable if str(r.get("path") or "") not in left_out]
    good = [r for r in shown if not is_edge(r)]
    cands = candidate_rows(readable, rule, left_out=excluded)
    result = SlideResult(name=name, cells=len(good), candidates=len(cands), parasitemia=None, parasitemia_ci=None,
                         parasites_per_ul=None, detection_limit=detection_limit(len(good),
                                                                                rates.candidate_sensitivity),
                         call=INDETERMINATE, reviewed=reviewed is not None, source=source,
                         flagged=sum(float(r["prob_parasitized"]) >= rule.threshold for r in good),
                         rbc_per_ul=float(rbc_per_ul), warnings=warnings, excluded_fields=excluded,
                         cells_total=len(counted), failed=len(rows) - len(readable),
                         rates=rates.as_dict(), rule=rule.as_dict(), candidate_list=cands,
                         edge_candidates=sum(is_edge(r) and not is_left_out(r) for r in cands),
                         left_out_candidates=sum(is_left_out(r) for r in cands))
    result.warnings = [w + left_out_note(path, cands) for w, path in zip(warnings, excluded)]
    if good:
        estimate(result, good, rates, reviewed, draws)
    if reviewed is not None:
        confirmed = set(reviewed)
        result.confirmed_edge = sum(cell_key(r) in confirmed for r in shown if is_edge(r))
        result.confirmed_left_out = sum(cell_key(r) in confirmed for r in readable
                                        if str(r.get("path") or "") in left_out)
    call_slide(result, rule, rates, fields=len({str(r.get("path") or "") for r in readable}))
    return result


def left_out_note(path: str, cands: Sequence[Mapping]) -> str:
    """What a left-out field's warning adds: that it is not counted, and which candidates of it are shown."""
    ranks = [int(r["rank"]) for r in cands if is_left_out(r) and str(r.get("path") or "") == path]
    shown = ", ".join(f"#{k}" for k in ranks)
    return " (left out of the count" + (f"; its candidates {shown} shown for review)" if ranks else ")")


def doubtful_fields(rows: Sequence[Mapping],
                    unfamiliar_limits: Optional[Tuple[float, float]]) -> Tuple[List[str], List[str]]:
    """(warnings, fields left out): a field whose rows carry warnings (a failed quality gate) or whose share of
    unfamiliar cells exceeds the warn fraction is left out of the slide, and named with its reasons. Judged on the
    readable whole cells (rows with an error or ``at_edge`` are passed over)."""
    threshold_u, warn = unfamiliar_limits if unfamiliar_limits else (None, DEFAULT_UNFAMILIAR_WARN)
    by_field: Dict[str, List[Mapping]] = {}
    for r in rows:
        if not r.get("error") and not is_edge(r):
            by_field.setdefault(str(r.get("path") or ""), []).append(r)
    warnings, excluded = [], []
    for path, frows in by_field.items():
        reasons = sorted({w for r in frows for w in _warnings_of(r)})
        n_unf = sum(_is_unfamiliar(r.get("unfamiliar"), threshold_u) for r in frows)
        if n_unf and n_unf / len(frows) > warn:
            reasons.append(f"unfamiliar images: {n_unf}/{len(frows)} cells look unlike the training data "
                           f"(> {warn:.0%}); adapt the model with edge-adapt")
        if reasons:
            excluded.append(path)
            warnings.append(f"{path or 'slide'}: " + "; ".join(reasons))
    return warnings, excluded


def estimate(result: SlideResult, good: Sequence[Mapping], rates: SourceRates,
             reviewed: Optional[Collection[Hashable]], draws: int) -> None:
    """Fill the parasitemia, its interval, parasites/µL and the false-flag p-value of a slide with cells: before
    review from the flagged count (Rogan-Gladen), after review from the confirmed cells."""
    n = len(good)
    if reviewed is None:
        est, ci = corrected_parasitemia(result.flagged, n, (rates.sensitivity_k, rates.sensitivity_n), rates, draws)
    else:
        confirmed_keys = set(reviewed)
        result.confirmed = sum(cell_key(r) in confirmed_keys for r in good)
        est, ci = corrected_parasitemia(result.confirmed, n, (rates.candidate_sensitivity_k, rates.sensitivity_n),
                                        None, draws)
    result.parasitemia, result.parasitemia_ci = est, ci
    result.parasites_per_ul = est * result.rbc_per_ul
    result.p_value = false_flag_p_value(result.flagged, n, *rates.false_flag_beta())


def call_slide(result: SlideResult, rule: SlideRule, rates: SourceRates, fields: int) -> None:
    """Set the call and its reason (the rules in the module docstring); ``fields``: how many fields were read."""
    n, cands, excluded = result.cells, result.candidates, result.excluded_fields
    left_out = result.left_out_candidates
    if n < rule.min_cells:
        left = f" after leaving out {len(excluded)} of {fields} fields" if excluded else ""
        shown = f"; {left_out} candidates of those fields shown for review" if left_out else ""
        result.reason = f"too few usable cells ({n} < {rule.min_cells}){left}{shown}"
        if not result.cells_total:
            result.reason = "no readable cells" + (f" ({result.failed} failed)" if result.failed else "")
        if result.reviewed and result.confirmed_left_out:
            result.reason += (f"; the microscopist confirmed {result.confirmed_left_out} in fields left out: "
                              "parasites seen, the slide not read")
        return
    dl = f"{result.detection_limit:.2%}"
    if result.reviewed:
        edge, apart = result.confirmed_edge or 0, result.confirmed_left_out or 0
        if result.confirmed + edge + apart >= rule.min_confirmed:
            result.call = FOUND
            result.reason = f"the microscopist confirmed {result.confirmed + edge + apart} of {cands} candidates"
            seen = [text for k, text in ((edge, f"{edge} cut by the image edge"),
                                         (apart, f"{apart} in fields left out")) if k]
            if seen:
                result.reason += f" ({' and '.join(seen)}: seen, not counted in the parasitemia)"
        else:
            result.call = NONE_FOUND
            result.reason = f"none of {cands} candidates confirmed; {n} cells examined, detection limit {dl}"
        return
    expected = rates.false_flag_rate * n
    if result.p_value < rule.alpha:
        result.call = FOUND
        result.reason = (f"{result.flagged} cells flagged where false flags explain about {expected:.1f} "
                         f"(p = {result.p_value:.2g} < {rule.alpha:g})")
    elif cands:
        result.call = REVIEW_NEEDED
        result.reason = (f"{result.flagged} cells flagged, within what false flags explain (about {expected:.1f}, "
                         f"p = {result.p_value:.2g}); look at the {cands} candidates")
        if left_out:
            result.reason += f" ({left_out} of them in fields left out)"
    else:
        result.call, result.reason = NONE_FOUND, f"no candidate among {n} cells; detection limit {dl}"


def assess_slides(rows: Iterable[Mapping], rule: SlideRule, key: str = "group", **kwargs) -> Dict[str, SlideResult]:
    """Group rows by ``key`` (the CLI's --group-by column, or --slide NAME for all) and read each slide."""
    groups: Dict[str, List[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key)), []).append(r)
    return {g: assess_slide(v, rule, name=g, **kwargs) for g, v in sorted(groups.items())}
