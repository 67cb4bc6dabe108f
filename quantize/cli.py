"""``edge-quantize``: Keras model -> fp32 + int8 TFLite bundle with a model card, evaluated on the test patients
through the edge runtime's own code path."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import click
import numpy as np

from malaria_edge.edge_runtime.bundle import ModelBundle, sha256_file
from malaria_edge.train.cli import require_tensorflow
from malaria_edge.edge_runtime import unfamiliar
from malaria_edge.edge_runtime.card import CARD_SCHEMA, write_json_atomic
from malaria_edge.edge_runtime.evaluation import evaluate, format_evaluation
from malaria_edge.edge_runtime.metrics import pct
from malaria_edge.edge_runtime.outputs import parasitized_probability
from malaria_edge.edge_runtime.patients import choose_rule, per_patient_counts

def run_bundle(bundle: ModelBundle, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    """P(parasitized) for uint8 cells through the runtime's interpreter wrapper."""
    out = []
    for start in range(0, len(pixels), batch):
        raw, _ = bundle.run(pixels[start:start + batch])
        out.append(parasitized_probability(raw, bundle.head))
    return np.concatenate(out) if out else np.zeros(0)


def quantize(model_path: Path, manifest: Path, out: Path, name: str = "malaria", calibration_size: int = 400,
             max_drop_points: float = 1.0, threads: Optional[int] = None, command: str = "",
             log=lambda m: print(m, file=sys.stderr, flush=True)) -> Dict:
    """Convert, write the card, evaluate both files on the test split, and return the card."""
    import keras

    from malaria_edge.quantize.convert import OUTPUT_HEAD, calibration_cells, convert
    from malaria_edge.quantize.metadata import write_bundle_metadata
    from malaria_edge.train.dataset import NIH, load_prepare_report, read_manifest
    from malaria_edge.train.pipeline import load_arrays

    out.mkdir(parents=True, exist_ok=True)
    model = keras.models.load_model(model_path)
    train_dir = Path(model_path).parent
    report = json.loads((train_dir / "report.json").read_text()) if (train_dir / "report.json").is_file() else {}
    config = json.loads((train_dir / "config.json").read_text()) if (train_dir / "config.json").is_file() else {}
    preset = report.get("preset") or config.get("preset") or {}
    size = int(model.input_shape[1])
    stain = preset.get("stain")
    keras_head = "softmax2" if model.output_shape[-1] == 2 else "logit"
    head = OUTPUT_HEAD
    labels = ["parasitized", "uninfected"]

    all_cells = read_manifest(manifest)
    data_info = load_prepare_report(manifest)
    cache = Path(manifest).parent / "cache"
    trained_on = report.get("sources") or [NIH]
    cells = [c for c in all_cells if c.source in trained_on]
    calibration = calibration_cells(cells, calibration_size)
    cal_x, _ = load_arrays(calibration, size, stain, None)
    fp32_path, int8_path = out / f"{name}_fp32.tflite", out / f"{name}_int8.tflite"
    started = time.time()
    convert(model, cal_x, fp32_path, int8_path)
    write_bundle_metadata(int8_path, fp32_path, labels, size)
    if stain:
        log("warning: this model was trained with per-cell stain normalisation, which edge_runtime does in numpy "
            "and a phone's standard client cannot do, so MediaPipe would see cells the model was not trained on; "
            "retrain with edge-train --no-stain-norm for a phone-ready bundle")
    log(f"converted in {time.time() - started:.0f}s: {fp32_path.name} {fp32_path.stat().st_size / 1024:.0f} KiB, "
        f"{int8_path.name} {int8_path.stat().st_size / 1024:.0f} KiB; calibrated on {len(calibration)} training cells "
        f"from {len({c.patient for c in calibration})} training patients")

    keras_bytes = Path(model_path).stat().st_size
    # The Keras model travels in the bundle so edge-adapt can fine-tune a clinic's copy from it.
    keras_copy = out / f"{name}.keras"
    shutil.copyfile(model_path, keras_copy)
    card = {
        "schema": CARD_SCHEMA,
        "name": name,
        "labels": labels,
        "positive_label": "parasitized",
        "head": head,
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
        "reference": fp32_path.name,
        "architecture": {"family": "pre-activation bottleneck ResNet (PyImageSearch malaria tutorial)",
                         "preset": preset, "parameters": int(model.count_params()),
                         "macs_per_cell": report.get("macs_per_cell")},
        "training": {k: report.get(k) for k in ("epochs_run", "best_epoch", "training_wall_seconds",
                                                  "training_cpu_seconds", "machine", "tensorflow", "keras", "seed")},
        "data": {"manifest_sha256": data_info["manifest_sha256"], "counts": data_info["counts"],
                 "sources": {k: v.get("counts") for k, v in data_info.get("sources", {}).items()},
                 "trained_on": list(trained_on),
                 "split_seed": data_info.get("seed"), "patients": data_info.get("patients"),
                 "calibration": {"cells": len(calibration), "split": "train",
                                 "patients": len({c.patient for c in calibration})}},
        "keras_model": {"file": keras_copy.name, "bytes": keras_bytes, "sha256": sha256_file(keras_copy)},
        "files": {},
        "commands": [c for c in (config.get("commands") or []) if c] + ([command] if command else []),
    }
    for path, kind in ((int8_path, "int8"), (fp32_path, "fp32")):
        card["files"][path.name] = {"kind": kind, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    card_path = out / f"{name}.json"
    write_json_atomic(card_path, card)

    bundles = {kind: ModelBundle(path, threads=threads) for path, kind in ((int8_path, "int8"), (fp32_path, "fp32"))}
    for kind, b in bundles.items():
        card["files"][b.path.name].update({"input_dtype": b.input_dtype, "output_dtype": b.output_dtype})
    evaluation: Dict = {}
    probs: Dict = {}
    pixels: Dict = {}
    for split in ("val", "test"):
        group = [c for c in cells if c.split == split and c.source == NIH]
        x, y = load_arrays(group, size, stain, cache)
        patients = [c.patient for c in group]
        probs[split] = {kind: run_bundle(b, x) for kind, b in bundles.items()}
        probs[split]["keras"] = parasitized_probability(model.predict(x.astype(np.float32), batch_size=256,
                                                                      verbose=0), keras_head)
        evaluation[split] = (y, patients)
        pixels[(split, NIH)] = x
    threshold = card["threshold"]
    y_val, p_val = evaluation["val"]
    rule = choose_rule(per_patient_counts(probs["val"]["int8"], y_val, p_val, threshold))
    card["patient_rule"] = rule
    y, patients = evaluation["test"]
    test = {"split": "test", "patients": len(set(patients)), "cells": int(len(y)),
            "cells_parasitized": int(y.sum()), "cells_uninfected": int(len(y) - y.sum())}
    for kind in ("int8", "fp32", "keras"):
        test[kind] = evaluate("test", y, probs["test"][kind], patients, threshold, rule)
    p8, p32, pk = probs["test"]["int8"], probs["test"]["fp32"], probs["test"]["keras"]
    test["agreement_int8_fp32"] = float(np.mean((p8 >= threshold) == (p32 >= threshold)))
    test["max_abs_prob_diff_int8_fp32"] = float(np.max(np.abs(p8 - p32)))
    test["max_abs_prob_diff_fp32_keras"] = float(np.max(np.abs(p32 - pk)))
    test["int8_accuracy_drop_points"] = 100 * (test["fp32"]["metrics"]["accuracy"] -
                                               test["int8"]["metrics"]["accuracy"])
    test["int8_majority_class_share"] = float(max(np.mean(p8 >= threshold), np.mean(p8 < threshold)))
    card["test"] = test
    card["test_sources"] = {}
    for source in sorted({c.source for c in all_cells} - {NIH}):
        group = [c for c in all_cells if c.split == "test" and c.source == source]
        x, y = load_arrays(group, size, stain, cache)
        pixels[("test", source)] = x
        card["test_sources"][source] = {
            "trained_on": source in trained_on,
            **{kind: evaluate("test", y, run_bundle(b, x), [c.patient for c in group], threshold, unit="fields",
                              source=source) for kind, b in bundles.items()}}
    card["unfamiliar"] = fit_unfamiliar(model, cells, all_cells, pixels, size, stain, cache, trained_on, log)
    card["sizes"] = {"keras_bytes": keras_bytes, "fp32_bytes": fp32_path.stat().st_size,
                     "int8_bytes": int8_path.stat().st_size,
                     "int8_compression_vs_keras": keras_bytes / int8_path.stat().st_size,
                     "fp32_compression_vs_keras": keras_bytes / fp32_path.stat().st_size}
    for path, kind in ((int8_path, "int8"), (fp32_path, "fp32")):
        ev = test[kind]
        card["files"][path.name]["test_metrics"] = {
            **{k: ev["metrics"][k] for k in ("accuracy", "sensitivity", "specificity", "f1", "mcc", "roc_auc",
                                             "confusion_matrix")},
            "ci95": ev["ci95"], "patient_level": ev["patient_level"]["metrics"]}
    card["quantization"] = {"method": "post-training full-integer (int8 weights per channel, int8 activations)",
                            "input": "uint8 raw pixels", "output": "uint8 class scores [parasitized, uninfected]",
                            "max_drop_points": max_drop_points,
                            "metadata": "TFLite metadata in both files (MediaPipe metadata writer): labels, RGB image "
                                        "input, normalisation mean 0 std 1 on the fp32 file's float input",
                            "phone_ready": not stain}
    write_json_atomic(card_path, card)
    return card


UNFAMILIAR_FIT_CELLS = 4000       # training cells per source the colour statistics are fitted on
UNFAMILIAR_WARN_FRACTION = 0.10   # about 10x the share of familiar cells flagged by construction (1%)


def fit_unfamiliar(model, cells, all_cells, pixels: Dict, size: int, stain, cache: Path, trained_on, log) -> Dict:
    """Fit the unfamiliar score on the training sources (colour statistics per source, threshold at the 99.5th
    percentile of their validation cells) and measure the share flagged on every source's test cells. The same
    is done with the network's own penultimate features for comparison (not shipped: the phone file has one
    output)."""
    import keras

    from malaria_edge.train.pipeline import load_arrays

    rng = np.random.default_rng(0)
    feature_model = keras.Model(model.inputs, model.layers[-2].output)
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
    threshold = unfamiliar.choose_threshold(unfamiliar.scores(np.concatenate(val), components))
    feature_components = unfamiliar.fit_components(fit_feats)
    feature_threshold = unfamiliar.choose_threshold(unfamiliar.scores(np.concatenate(val_feats),
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
    lines = [f"test split: {t['patients']} patients, {t['cells']} cells ({t['cells_parasitized']} parasitized, "
             f"{t['cells_uninfected']} uninfected); runtime code path, threshold {card['threshold']}",
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="model.keras from edge-train.")
@click.option("--manifest", required=True, type=click.Path(exists=True, path_type=Path),
              help="The manifest the model was trained on (calibration: train split; evaluation: test split).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the bundle.")
@click.option("--name", default="malaria", show_default=True, help="File stem of the bundle.")
@click.option("--calibration-size", default=400, show_default=True,
              help="Training cells used to calibrate int8 ranges (balanced by class and patient).")
@click.option("--max-drop", default=1.0, show_default=True,
              help="Fail when int8 accuracy is this many points below fp32.")
@click.option("--threads", type=int, help="Interpreter threads for the evaluation.")
def main(model_path, manifest, out, name, calibration_size, max_drop, threads):
    """Convert a Keras model to a float32 TFLite "full model" and a full-integer int8 TFLite model, with a model card,
    and measure what int8 loses on the test patients.

    \b
    Example:
      edge-quantize --model runs/edge/model.keras --manifest runs/data/manifest.csv --out runs/bundle
    """
    require_tensorflow("edge-quantize")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = "edge-quantize " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        card = quantize(model_path, manifest, out, name, calibration_size, max_drop, threads, command)
    except (OSError, ValueError) as exc:
        click.echo(f"edge-quantize: {exc}", err=True)
        sys.exit(1)
    click.echo(format_card_summary(card))
    click.echo(f"bundle: {out / (name + '_int8.tflite')}, {out / (name + '_fp32.tflite')}, {out / (name + '.json')}, "
               f"{out / (name + '.keras')}")
    problem = check_card(card, max_drop)
    if problem:
        click.echo(f"edge-quantize: FAILED: {problem}", err=True)
        sys.exit(1)
