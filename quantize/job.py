"""The edge-quantize job: a trained Keras model -> fp32 + int8 TFLite bundle with a model card, evaluated on the test
patients through the edge runtime's own code path.

Steps, each a function below: load the trained model -> draw the calibration cells -> write the bundle
(:func:`malaria_edge.export.writer.write_bundle`) -> score val and test cells with every file -> choose the patient
rule and measure -> fit the unfamiliar score -> write the final card.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from malaria_edge.edge_runtime import unfamiliar
from malaria_edge.edge_runtime.card import CARD_SCHEMA
from malaria_edge.edge_runtime.cell_arrays import bundle_probabilities, load_arrays
from malaria_edge.edge_runtime.evaluation import evaluate, format_evaluation
from malaria_edge.edge_runtime.labels import PARASITIZED, UNINFECTED
from malaria_edge.edge_runtime.manifest import (NIH, PROVENANCE, Cell, calibration_cells, load_prepare_report,
                                                read_manifest)
from malaria_edge.edge_runtime.metrics import pct
from malaria_edge.edge_runtime.outputs import parasitized_probability
from malaria_edge.edge_runtime.patients import choose_rule, per_patient_counts
from malaria_edge.export.writer import BundlePaths, load_written, write_bundle, write_card

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainedModel:
    """What edge-train left in a run folder: the Keras model and the run's report and config (either may be
    missing for a model trained elsewhere)."""
    path: Path
    model: object
    report: Dict
    config: Dict

    @property
    def preset(self) -> Dict:
        return self.report.get("preset") or self.config.get("preset") or {}

    @property
    def size(self) -> int:
        return int(self.model.input_shape[1])

    @property
    def stain(self) -> Optional[Dict]:
        return self.preset.get("stain")

    @property
    def keras_head(self) -> str:
        return "softmax2" if self.model.output_shape[-1] == 2 else "logit"

    @property
    def trained_on(self) -> List[str]:
        return self.report.get("sources") or [NIH]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        raw = self.model.predict(pixels.astype(np.float32), batch_size=256, verbose=0)
        return parasitized_probability(raw, self.keras_head)


@dataclass
class Scores:
    """P(parasitized) of the NIH val and test cells by each model (int8, fp32, keras), with labels and patients;
    and the pixels of every split and source scored, for the unfamiliar score."""
    probs: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    labels: Dict[str, np.ndarray] = field(default_factory=dict)
    patients: Dict[str, List[str]] = field(default_factory=dict)
    pixels: Dict = field(default_factory=dict)
    nih_trained_on: bool = True


def load_trained(model_path: Path) -> TrainedModel:
    """The Keras model and the report.json and config.json edge-train wrote beside it."""
    import keras

    folder = Path(model_path).parent

    def side(name: str) -> Dict:
        return json.loads((folder / name).read_text()) if (folder / name).is_file() else {}

    return TrainedModel(Path(model_path), keras.models.load_model(model_path), side("report.json"),
                        side("config.json"))


def describe_model(trained: TrainedModel, data_info: Dict, calibration: List[Cell], name: str,
                   command: str) -> Dict:
    """The card's description of the model before its files exist: labels, input, output, preprocessing,
    threshold, architecture, training and data."""
    stain, size, report = trained.stain, trained.size, trained.report
    return {
        "schema": CARD_SCHEMA,
        "name": name,
        "labels": [PARASITIZED, UNINFECTED],
        "positive_label": PARASITIZED,
        "input": {"size": size, "channels": 3, "layout": "NHWC", "pixels": "RGB, 0-255",
                  "dtype": {"int8": "uint8", "fp32": "float32"},
                  "in_graph": "scaling of the pixels; nothing else follows the resize"
                              + ("" if not stain else " (except stain normalisation, done by the runtime)")},
        "output": {"tensor": "scores", "dtype": {"int8": "uint8 (dequantize with the tensor's scale and zero point)",
                                                 "fp32": "float32"},
                   "meaning": "probabilities in label order [parasitized, uninfected], summing to 1"},
        "preprocessing": {
            "decode": "Pillow; EXIF orientation applied; alpha composited on black; 16-bit and float scaled from "
                      "their own range; palette and grayscale expanded to RGB",
            "resize": f"Pillow bilinear (antialiased) to {size}x{size}",
            "stain": stain,
            "function": "malaria_edge.edge_runtime.images.prepare_cell",
        },
        "threshold": float(report.get("threshold", 0.5)),
        "architecture": {"family": "pre-activation bottleneck ResNet (PyImageSearch malaria tutorial)",
                         "preset": trained.preset, "parameters": int(trained.model.count_params()),
                         "macs_per_cell": report.get("macs_per_cell")},
        "training": {k: report.get(k) for k in ("epochs_run", "best_epoch", "training_wall_seconds",
                                                  "training_cpu_seconds", "machine", "tensorflow", "keras", "seed")},
        "data": {"manifest_sha256": data_info["manifest_sha256"], "counts": data_info["counts"],
                 "sources": {k: v.get("counts") for k, v in data_info.get("sources", {}).items()},
                 "trained_on": list(trained.trained_on),
                 "split_seed": data_info.get("seed"), "patients": data_info.get("patients"),
                 "calibration": {"cells": len(calibration), "split": "train",
                                 "patients": len({c.patient for c in calibration})}},
        "commands": [c for c in (trained.config.get("commands") or []) if c] + ([command] if command else []),
        "provenance": {source: PROVENANCE[source] for source in trained.trained_on if source in PROVENANCE},
    }


def convert_to_bundle(trained: TrainedModel, cells: List[Cell], manifest: Path, paths: BundlePaths,
                      calibration_size: int, command: str, log: Log, warn: Log) -> Dict:
    """Draw the calibration cells from the training split and write the bundle; returns its first card."""
    calibration = calibration_cells(cells, calibration_size)
    cal_x, _ = load_arrays(calibration, trained.size, trained.stain, None)
    started = time.time()
    description = describe_model(trained, load_prepare_report(manifest), calibration, paths.name, command)
    card = write_bundle(trained.model, cal_x, paths, description, keras_source=trained.path)
    if trained.stain:
        warn("warning: this model was trained with per-cell stain normalisation, which edge_runtime does in numpy "
             "and a phone's standard client cannot do, so MediaPipe would see cells the model was not trained on; "
             "retrain with edge-train --no-stain-norm for a phone-ready bundle")
    fp32, int8 = paths.fp32, paths.int8
    log(f"converted in {time.time() - started:.0f}s: {fp32.name} {fp32.stat().st_size / 1024:.0f} KiB, "
        f"{int8.name} {int8.stat().st_size / 1024:.0f} KiB; calibrated on {len(calibration)} training cells "
        f"from {len({c.patient for c in calibration})} training patients")
    return card


def require_nih_patients(all_cells: List[Cell], manifest: Path) -> None:
    """The card's test block and patient rule are measured on NIH val and test patients, whether or not the model
    was trained on NIH (a model trained without it is then measured on a lab it never saw): refuse, in one line and
    before converting anything, a manifest that holds none."""
    missing = [split for split in ("val", "test") if not any(c.source == NIH and c.split == split for c in all_cells)]
    if missing:
        raise ValueError(f"{manifest}: no NIH {' or '.join(missing)} patients; edge-quantize measures the card's "
                         "test figures and patient rule on them, even for a model trained without NIH: give a "
                         "manifest from edge-prepare --data <NIH cell_images> (with --fields for the IML cells)")


def score_splits(trained: TrainedModel, cells: List[Cell], bundles: Dict, cache: Path) -> Scores:
    """Every file and the Keras model on the NIH val and test cells (of every cell in the manifest: a model
    trained without NIH is scored on NIH as a lab it never saw)."""
    scores = Scores(nih_trained_on=NIH in trained.trained_on)
    for split in ("val", "test"):
        group = [c for c in cells if c.split == split and c.source == NIH]
        x, y = load_arrays(group, trained.size, trained.stain, cache)
        scores.probs[split] = {kind: bundle_probabilities(b, x) for kind, b in bundles.items()}
        scores.probs[split]["keras"] = trained.probabilities(x)
        scores.labels[split], scores.patients[split] = y, [c.patient for c in group]
        scores.pixels[(split, NIH)] = x
    return scores


def read_patient_counts(path: Path, all_cells: List[Cell]) -> Dict:
    """Out-of-fold per-patient counts (tools/patient_rule_cv.py counts): checked so that no NIH validation or test
    patient of the manifest (``all_cells``) is among them and every entry has what the rule needs; the message
    names the file and what to do."""
    try:
        data = json.loads(Path(path).read_text())
        patients = data["patients"]
        counts = [{"patient": str(p["patient"]), "cells": int(p["cells"]), "parasitized": int(p["parasitized"]),
                   "infected": bool(p["infected"])} for p in patients]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a patient-counts file ({exc}); make it with tools/patient_rule_cv.py counts")
    held_apart = {c.patient for c in all_cells if c.source == NIH and c.split in ("val", "test")}
    overlap = sorted({p["patient"] for p in counts} & held_apart, key=len)
    if overlap:
        raise ValueError(f"{path}: holds validation or test patients of this manifest ({', '.join(overlap[:5])}); "
                         "out-of-fold counts must come from its training patients only")
    if not counts or any(p["cells"] <= 0 or not 0 <= p["parasitized"] <= p["cells"] for p in counts):
        raise ValueError(f"{path}: empty, or a patient with no cells or more flagged cells than cells")
    return {"how": str(data.get("how", "out-of-fold predictions")), "counts": counts}


def measure_test(card: Dict, scores: Scores, out_of_fold: Optional[Dict] = None,
                 min_specificity: Optional[float] = None) -> Dict:
    """The patient rule chosen on the int8 val scores (and, when given, out-of-fold counts of the training
    patients), and the test block: every model's evaluation and how far int8, fp32 and Keras agree."""
    threshold = card["threshold"]
    counts = per_patient_counts(scores.probs["val"]["int8"], scores.labels["val"], scores.patients["val"], threshold)
    chosen_on = "validation split"
    if out_of_fold:
        chosen_on = (f"{len(counts)} validation patients (this model, int8) and {len(out_of_fold['counts'])} "
                     f"training patients out of fold ({out_of_fold['how']})")
        counts = counts + out_of_fold["counts"]
    card["patient_rule"] = rule = choose_rule(counts, chosen_on=chosen_on, min_specificity=min_specificity)
    y, patients, probs = scores.labels["test"], scores.patients["test"], scores.probs["test"]
    test = {"split": "test", "trained_on": scores.nih_trained_on, "patients": len(set(patients)),
            "cells": int(len(y)),
            "cells_parasitized": int(y.sum()), "cells_uninfected": int(len(y) - y.sum())}
    for kind in ("int8", "fp32", "keras"):
        test[kind] = evaluate("test", y, probs[kind], patients, threshold, rule)
    p8, p32, pk = probs["int8"], probs["fp32"], probs["keras"]
    test["agreement_int8_fp32"] = float(np.mean((p8 >= threshold) == (p32 >= threshold)))
    test["max_abs_prob_diff_int8_fp32"] = float(np.max(np.abs(p8 - p32)))
    test["max_abs_prob_diff_fp32_keras"] = float(np.max(np.abs(p32 - pk)))
    test["int8_accuracy_drop_points"] = 100 * (test["fp32"]["metrics"]["accuracy"] -
                                               test["int8"]["metrics"]["accuracy"])
    test["int8_majority_class_share"] = float(max(np.mean(p8 >= threshold), np.mean(p8 < threshold)))
    return test


def measure_other_sources(card: Dict, trained: TrainedModel, all_cells: List[Cell], bundles: Dict,
                          scores: Scores, cache: Path) -> Dict:
    """Every file on each non-NIH source's test cells, counted by field; their pixels join ``scores`` for the
    unfamiliar score."""
    results = {}
    for source in sorted({c.source for c in all_cells} - {NIH}):
        group = [c for c in all_cells if c.split == "test" and c.source == source]
        x, y = load_arrays(group, trained.size, trained.stain, cache)
        scores.pixels[("test", source)] = x
        results[source] = {
            "trained_on": source in trained.trained_on,
            **{kind: evaluate("test", y, bundle_probabilities(b, x), [c.patient for c in group], card["threshold"],
                              unit="fields", source=source) for kind, b in bundles.items()}}
    return results


def finish_card(card: Dict, paths: BundlePaths, keras_bytes: int, max_drop_points: float) -> None:
    """Sizes, each file's test metrics and how it was quantized: what the card says once everything is measured."""
    fp32_bytes, int8_bytes = paths.fp32.stat().st_size, paths.int8.stat().st_size
    card["sizes"] = {"keras_bytes": keras_bytes, "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                     "int8_compression_vs_keras": keras_bytes / int8_bytes,
                     "fp32_compression_vs_keras": keras_bytes / fp32_bytes}
    for kind in ("int8", "fp32"):
        ev = card["test"][kind]
        card["files"][paths.tflite(kind).name]["test_metrics"] = {
            **{k: ev["metrics"][k] for k in ("accuracy", "sensitivity", "specificity", "f1", "mcc", "roc_auc",
                                             "confusion_matrix")},
            "ci95": ev["ci95"], "patient_level": ev["patient_level"]["metrics"]}
    card["quantization"] = {"method": "post-training full-integer (int8 weights per channel, int8 activations)",
                            "input": "uint8 raw pixels", "output": "uint8 class scores [parasitized, uninfected]",
                            "max_drop_points": max_drop_points,
                            "metadata": "TFLite metadata in both files (MediaPipe metadata writer): labels, RGB image "
                                        "input, normalisation mean 0 std 1 on the fp32 file's float input",
                            "phone_ready": not card["preprocessing"]["stain"]}


def quantize(model_path: Path, manifest: Path, out: Path, name: str = "malaria", calibration_size: int = 400,
             max_drop_points: float = 1.0, threads: Optional[int] = None, command: str = "", log: Log = _stderr,
             warn: Optional[Log] = None, patient_counts: Optional[Path] = None,
             min_specificity: Optional[float] = None) -> Dict:
    """Convert, write the card, evaluate both files on the test split, and return the card.

    ``log`` takes the progress lines, ``warn`` the warnings (default: ``log``); ``patient_counts``: out-of-fold
    per-patient counts of the training patients that join the validation patients in choosing the patient rule;
    ``min_specificity``: choose it as the most sensitive rule with at least that specificity (default: Youden's J)."""
    all_cells = read_manifest(manifest)
    require_nih_patients(all_cells, manifest)
    out_of_fold = None
    if patient_counts is not None:
        out_of_fold = read_patient_counts(patient_counts, all_cells)
    trained = load_trained(model_path)
    cells = [c for c in all_cells if c.source in trained.trained_on]
    paths = BundlePaths(Path(out), name)
    card = convert_to_bundle(trained, cells, manifest, paths, calibration_size, command, log, warn or log)
    try:
        bundles = load_written(paths, card, threads)
        cache = Path(manifest).parent / "cache"
        scores = score_splits(trained, all_cells, bundles, cache)
        card["test"] = measure_test(card, scores, out_of_fold, min_specificity)
        card["test_sources"] = measure_other_sources(card, trained, all_cells, bundles, scores, cache)
        card["unfamiliar"] = fit_unfamiliar(trained, cells, scores.pixels, cache, log)
        finish_card(card, paths, trained.path.stat().st_size, max_drop_points)
    except BaseException:
        # The first card (written so the runtime can load the files) has no test figures, patient rule or
        # unfamiliar statistics: without it the folder is not a bundle anyone can run unmeasured.
        paths.card.unlink(missing_ok=True)
        raise
    write_card(paths.card, card)
    return card


def rechoose_patient_rule(model_path: Path, manifest: Path, out: Path, patient_counts: Path, name: str = "malaria",
                          max_drop_points: float = 1.0, threads: Optional[int] = None, command: str = "",
                          log: Log = _stderr, min_specificity: Optional[float] = None) -> Dict:
    """Keep a bundle in ``out`` as it is (its files, calibration, slide rule, unfamiliar statistics) and choose its
    patient rule again with out-of-fold counts (``patient_counts``) and its validation patients. The test block is
    measured again with the same files, so only the rule and the patient-level figures can change; a converter
    run would not give the same bytes, and every figure measured on the shipped files would be stale."""
    all_cells = read_manifest(manifest)
    require_nih_patients(all_cells, manifest)
    out_of_fold = read_patient_counts(patient_counts, all_cells)
    paths = BundlePaths(Path(out), name)
    if not paths.card.is_file():
        raise ValueError(f"{paths.card}: no bundle card there; --rule-only re-chooses the rule of a bundle "
                         "edge-quantize wrote (give its folder as --out and its stem as --name)")
    card = json.loads(paths.card.read_text())
    trained = load_trained(model_path)
    bundles = load_written(paths, card, threads)
    scores = score_splits(trained, all_cells, bundles, Path(manifest).parent / "cache")
    before = card.get("patient_rule")
    card["test"] = measure_test(card, scores, out_of_fold, min_specificity)
    finish_card(card, paths, trained.path.stat().st_size, max_drop_points)
    card["commands"] = list(card.get("commands") or []) + ([command] if command else [])
    write_card(paths.card, card)
    log(f"patient rule: {before and before.get('min_fraction')} -> {card['patient_rule']['min_fraction']} "
        f"(chosen on {card['patient_rule']['chosen_on']})")
    return card


UNFAMILIAR_FIT_CELLS = 4000       # training cells per source the colour statistics are fitted on
UNFAMILIAR_WARN_FRACTION = 0.10   # about 10x the share of familiar cells flagged by construction (1%)


def fit_unfamiliar(trained: TrainedModel, cells: List[Cell], pixels: Dict, cache: Path, log: Log) -> Dict:
    """Fit the unfamiliar score on the training sources (colour statistics per source, threshold at the 99.5th
    percentile of their validation cells) and measure the share flagged on every source's test cells. The same
    is done with the network's own penultimate features for comparison (not shipped: the phone file has one
    output)."""
    import keras

    size, stain, trained_on = trained.size, trained.stain, trained.trained_on
    rng = np.random.default_rng(0)
    feature_model = keras.Model(trained.model.inputs, trained.model.layers[-2].output)
    fit, val = {}, []
    fit_feats, val_feats = {}, []
    for source in trained_on:
        group = [c for c in cells if c.split == "train" and c.source == source]
        group = [group[i] for i in sorted(rng.choice(len(group), min(len(group), UNFAMILIAR_FIT_CELLS),
                                                     replace=False))]
        x, _ = load_arrays(group, size, stain, None)
        fit[source] = unfamiliar.colour_features(x)
        fit_feats[source] = feature_model.predict(x.astype(np.float32), batch_size=256, verbose=0)
        vx, _ = load_arrays([c for c in cells if c.split == "val" and c.source == source], size, stain, cache)
        val.append(unfamiliar.colour_features(vx))
        val_feats.append(feature_model.predict(vx.astype(np.float32), batch_size=256, verbose=0))
    components = unfamiliar.fit_components(fit)
    threshold = unfamiliar.choose_unfamiliar_threshold(unfamiliar.scores(np.concatenate(val), components))
    feature_components = unfamiliar.fit_components(fit_feats)
    feature_threshold = unfamiliar.choose_unfamiliar_threshold(unfamiliar.scores(np.concatenate(val_feats),
                                                                      feature_components))
    flagged = {}
    for (split, source), x in sorted(pixels.items()):
        if split != "test":
            continue
        colour = unfamiliar.scores(unfamiliar.colour_features(x), components)
        feats = feature_model.predict(x.astype(np.float32), batch_size=256, verbose=0)
        learned = unfamiliar.scores(feats, feature_components)
        flagged[source] = {"cells": int(len(x)), "trained_on": source in trained_on,
                           unfamiliar.METHOD: float(np.mean(colour > threshold)),
                           "feature-mahalanobis": float(np.mean(learned > feature_threshold))}
        log(f"unfamiliar on {source} test cells ({len(x)}): colour statistics flag "
            f"{100 * flagged[source][unfamiliar.METHOD]:.1f}%, penultimate features flag "
            f"{100 * flagged[source]['feature-mahalanobis']:.1f}%")
    return {"method": unfamiliar.METHOD, "threshold": threshold, "warn_fraction": UNFAMILIAR_WARN_FRACTION,
            "fitted_on": {"sources": list(trained_on), "cells_per_source": UNFAMILIAR_FIT_CELLS,
                          "threshold": "99.5th percentile of the training sources' validation cells"},
            "statistics": {"features": list(unfamiliar.FEATURES), "components": components},
            "test_flagged": flagged,
            "compared": {"feature-mahalanobis": "squared Mahalanobis distance of the penultimate layer's features "
                                                "to the nearest training source; needs a second model output, "
                                                "so it is measured here, not shipped"}}


def _num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_card_summary(card: Dict) -> str:
    t = card["test"]
    unseen = "" if t.get("trained_on", True) else " (a lab never seen in training)"
    lines = [f"NIH test split{unseen}: {t['patients']} patients, {t['cells']} cells ({t['cells_parasitized']} "
             f"parasitized, {t['cells_uninfected']} uninfected); runtime code path, threshold {card['threshold']}",
             f"{'model':<8}{'accuracy':>10}{'sensitiv.':>10}{'specific.':>10}{'F1':>8}{'MCC':>8}{'AUC':>8}"
             f"{'size':>11}  patients (call rule)"]
    sizes = {"int8": card["sizes"]["int8_bytes"], "fp32": card["sizes"]["fp32_bytes"],
             "keras": card["sizes"]["keras_bytes"]}
    for kind in ("int8", "fp32", "keras"):
        m = t[kind]["metrics"]
        lines.append(f"{kind:<8}{pct(m['accuracy']):>10}{pct(m['sensitivity']):>10}{pct(m['specificity']):>10}"
                     f"{_num(m['f1']):>8}{_num(m['mcc']):>8}{_num(m['roc_auc']):>8}"
                     f"{sizes[kind] / 1024:>8.0f} KiB  {t[kind]['patient_level']['metrics']['text']}")
    lines += ["", format_evaluation(t["int8"], title="int8 on the "), ""]
    for source, results in card.get("test_sources", {}).items():
        seen = "trained on its other fields" if results["trained_on"] else "never seen in training"
        lines += [format_evaluation(results["int8"], title=f"int8 ({seen}) on the "), ""]
    flagged = card.get("unfamiliar", {}).get("test_flagged", {})
    if flagged:
        lines.append("unfamiliar cells flagged on the test splits (threshold: 99.5th percentile of the training "
                     "sources' validation cells):")
        for source, f in flagged.items():
            lines.append(f"  {source:<6} {f['cells']:>6} cells ({'trained on' if f['trained_on'] else 'unseen'}): "
                         f"colour statistics {pct(f['colour-mahalanobis'])}, penultimate features "
                         f"{pct(f['feature-mahalanobis'])}")
    lines.append(f"int8 vs fp32: agreement {100 * t['agreement_int8_fp32']:.2f}%, accuracy drop "
                 f"{t['int8_accuracy_drop_points']:.2f} points, max |dp| {t['max_abs_prob_diff_int8_fp32']:.4f}; "
                 f"fp32 vs Keras max |dp| {t['max_abs_prob_diff_fp32_keras']:.2e}; int8 is "
                 f"{card['sizes']['int8_compression_vs_keras']:.1f}x smaller than the Keras file")
    return "\n".join(lines)


def check_card(card: Dict, max_drop_points: float) -> Optional[str]:
    """The loud failure of a collapsed or degraded int8 model, or None."""
    t = card["test"]
    if t["int8_majority_class_share"] >= 0.99:
        return (f"int8 model predicts one class for {100 * t['int8_majority_class_share']:.1f}% of test cells "
                "(collapsed); try more calibration cells (--calibration-size), check the model trains above chance, "
                "or keep the fp32 model")
    if t["int8_accuracy_drop_points"] > max_drop_points:
        return (f"int8 accuracy is {t['int8_accuracy_drop_points']:.2f} points below fp32 (limit {max_drop_points}); "
                "try a larger or more varied --calibration-size, or quantization-aware training")
    return None
