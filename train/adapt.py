"""Adaptation: a clinic makes a model bundle its own with a few hundred of its own labelled cells, on a laptop CPU.

No model trained on one lab is right for every stain, camera and parasite species. ``edge-adapt`` starts from a
bundle's Keras weights, fine-tunes them on the clinic's sorted crops (``Parasitized/`` and ``Uninfected/``) mixed
with replayed training cells of the old lab (so it is not forgotten), re-chooses the decision threshold and the
patient rule on clinic cells the fine-tuned model did not see (out-of-fold scores of every cell by default, or one
held-out part), re-quantizes through the one bundle writer (``malaria_edge.export``) and writes a complete bundle
(int8 + fp32 + card + Keras weights) whose card records where it came from and what it gained.

The bundle is written into a temporary folder beside ``out`` and renamed at the very end, so an interrupted run
(Ctrl-C, a dead battery) leaves no half-written bundle.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from malaria_edge.edge_runtime.bundle import DEFAULT_MODEL, ModelBundle, ModelError, find_card, sha256_file
from malaria_edge.edge_runtime.card import CardError, parse_card
from malaria_edge.edge_runtime.cell_arrays import bundle_probabilities, load_arrays
from malaria_edge.edge_runtime.errors import EXIT_FAILED, EXIT_USAGE, MalariaEdgeError
from malaria_edge.edge_runtime.evaluation import evaluate
from malaria_edge.edge_runtime.images import ImageError, is_image_path, prepare_cell
from malaria_edge.edge_runtime.labels import PARASITIZED, UNINFECTED, patient_id
from malaria_edge.edge_runtime.machine import machine_info
from malaria_edge.edge_runtime.manifest import (NIH, DatasetError, calibration_cells, load_prepare_report,
                                                read_manifest)
from malaria_edge.edge_runtime.metrics import pct, wilson_interval
from malaria_edge.edge_runtime.outputs import parasitized_probability
from malaria_edge.edge_runtime.patients import DEFAULT_RULE, choose_rule, per_patient_counts
from malaria_edge.edge_runtime.slide import SlideRule, SlideRuleError
from malaria_edge.export.writer import BundlePaths, load_written, write_bundle, write_card
from malaria_edge.train.dataset import find_cell_folders

# The held-out cells must estimate sensitivity and specificity: 30 cells a class with 30% held out leaves 9 a class
# there (one missed parasitized cell moves sensitivity by 11 points), 5 folds leave 6 a class per fold; fewer cannot
# tell a good model from a bad one.
MIN_CELLS_PER_CLASS = 30
HOLDOUT_FRACTION = 0.3
STRATEGIES = ("head", "last", "all")
Log = Callable[[str], None]


class AdaptError(MalariaEdgeError, ValueError):
    """A request edge-adapt cannot honour; the message is one line saying what is wrong and what to do.
    ``exit_code`` follows the project's one rule (``edge_runtime.errors``): 2 when the command was called wrong
    (a missing --cells/--model/--replay path, a --cells folder without Parasitized/ or Uninfected/, a --model that is
    not a bundle, a non-empty --out, a refused option); 1 when what it names could not be used (too few distinct
    cells, the same cell in both classes, a damaged bundle or one without Keras weights, a file that is not a
    manifest)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message, exit_code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a service or session stop), raised where Ctrl-C raises KeyboardInterrupt, so the
    unfinished bundle is removed the same way; the command then exits 143."""


def terminate_like_ctrl_c() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (the default would kill the process and
    leave the temporary bundle folder behind)."""
    def raise_terminated(signum, frame):
        raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


@dataclass
class Recipe:
    """How the Keras model is fine-tuned. The defaults were chosen by measurement on the IML fields as a new lab
    (docs/experiments.md, "Adapting to a new lab")."""
    strategy: str = "all"            # head: the dense head only; last: the last stage + head; all: every layer
    epochs: int = 6
    learning_rate: float = 1e-3
    repeats: int = 5                 # each clinic cell is seen this many times per epoch (with augmentation)
    replay_cells: int = 2000         # old-lab training cells mixed into every epoch (balanced by class and patient)
    batch_size: int = 64
    seed: int = 0
    folds: int = 5                   # >= 2: threshold from k-fold out-of-fold scores, final model on every cell;
                                     # 0: one stratified hold-out part chooses the threshold and is never trained on
    min_sensitivity: Optional[float] = 0.95   # the most specific threshold keeping at least this sensitivity (a
                                              # screening tool should miss few); None: best Youden's J

    def to_dict(self) -> Dict:
        return dict(self.__dict__)


@dataclass
class ClinicCells:
    """The clinic's readable cells (preprocessed exactly as the runtime does) and the files that failed."""
    paths: List[str]
    labels: np.ndarray                  # 1 = parasitized
    pixels: np.ndarray                  # uint8 [N, size, size, 3]
    failed: List[Tuple[str, str]] = field(default_factory=list)
    list_sha256: str = ""
    duplicates: List[Tuple[str, str, str]] = field(default_factory=list)  # (label, copy dropped, file it repeats)

    def count(self, label: int) -> int:
        return int((self.labels == label).sum())


@dataclass
class AdaptResult:
    """What :func:`adapt` wrote and measured."""
    out: Path
    int8_path: Path
    fp32_path: Path
    card_path: Path
    keras_path: Path
    card: Dict
    failed: List[Tuple[str, str]]
    threshold_cells: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (labels, P(parasitized)) the threshold was
                                                                     # chosen on: held-out int8 or out-of-fold

    @property
    def adaptation(self) -> Dict:
        return self.card["adaptation"]

    @property
    def recommended(self) -> bool:
        """False when the adapted model ranked the clinic's measured cells worse than the base model did: the
        bundle is written for inspection, and ``adaptation["not_recommended_because"]`` says why not to use it."""
        return bool(self.adaptation.get("recommended", True))


@dataclass
class BaseModel:
    """The bundle adaptation starts from: its card, its int8 file (for the "before" figures) and Keras weights."""
    card: Dict
    card_path: Path
    int8_path: Path
    keras_path: Path


def find_base(model: Optional[os.PathLike]) -> BaseModel:
    """Resolve ``--model``: a bundle folder, a bundle's ``.tflite`` or card, or the bundled default model.
    The Keras file must be in the bundle and match the SHA-256 its card records."""
    path = Path(model) if model else DEFAULT_MODEL
    how = "re-create the bundle with edge-quantize (it writes <name>.keras beside the .tflite files)"
    if not path.exists():
        raise AdaptError(f"{path}: no such bundle; pass a folder written by edge-quantize or edge-adapt", EXIT_USAGE)
    if path.is_dir():
        cards = [p for p in sorted(path.glob("*.json")) if _is_card(p)]
        if len(cards) != 1:
            raise AdaptError(f"{path}: not a model bundle ({len(cards)} model cards in it, expected 1); pass a folder "
                             "written by edge-quantize or edge-adapt, or its _int8.tflite file", EXIT_USAGE)
        card_path = cards[0]
    elif path.suffix == ".json":
        card_path = path
    else:
        try:
            card_path = find_card(path)
        except ModelError as exc:
            raise AdaptError(str(exc), EXIT_USAGE) from None
    if not _is_card(card_path):
        raise AdaptError(f"{card_path}: not a model card (no malaria-edge schema); pass a bundle written by "
                         "edge-quantize or edge-adapt", EXIT_USAGE)
    card = json.loads(card_path.read_text())
    try:
        parse_card(card)
    except CardError as exc:
        raise AdaptError(f"{card_path}: {exc}") from None
    int8 = [name for name, info in card.get("files", {}).items() if info.get("kind") == "int8"]
    if not int8:
        raise AdaptError(f"{card_path}: the card describes no int8 model; pass a bundle written by edge-quantize")
    keras_info = card.get("keras_model") or {}
    keras_path = card_path.parent / str(keras_info.get("file", ""))
    if not keras_info.get("file") or not keras_path.is_file() or keras_path.suffix != ".keras":
        raise AdaptError(f"{card_path.parent}: the bundle has no Keras weights ({keras_info.get('file') or '<name>.keras'}"
                         f" missing), and adaptation fine-tunes them; {how}")
    if keras_info.get("sha256") and sha256_file(keras_path) != keras_info["sha256"]:
        raise AdaptError(f"{keras_path}: SHA-256 does not match its card; the file is damaged or not the one the card "
                         "describes: copy the bundle again")
    return BaseModel(card, card_path, card_path.parent / int8[0], keras_path)


def _is_card(path: Path) -> bool:
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and str(card.get("schema", "")).startswith("malaria-edge/model-card")


def clinic_class_folders(cells_dir: Path) -> Dict[str, List[Path]]:
    """``Parasitized/`` and ``Uninfected/`` (any case) directly inside ``cells_dir``, or those of each of its slide
    folders merged (an ``edge-classify --review`` folder), or a one-line refusal."""
    if not cells_dir.is_dir():
        raise AdaptError(f"{cells_dir}: no such folder; --cells takes a folder holding Parasitized/ and Uninfected/",
                         EXIT_USAGE)
    found = find_cell_folders(cells_dir)
    missing = [name for name, label in (("Parasitized", PARASITIZED), ("Uninfected", UNINFECTED)) if label not in found]
    if missing:
        raise AdaptError(f"{cells_dir}: no {' or '.join(m + '/' for m in missing)} folder; put the clinic's sorted "
                         "crops in Parasitized/ and Uninfected/ (edge-classify --save-crops writes them)", EXIT_USAGE)
    return found


def read_clinic_cells(cells_dir: Path, size: int, stain: Optional[Dict]) -> ClinicCells:
    """Decode every image under the class folders through the runtime's own ``prepare_cell``; unreadable files are
    collected with their reason, never fatal. A file with the same content as one before it in its class is a copy,
    not another cell: it is dropped (listed in ``duplicates``) before cells are counted or dealt into folds, where a
    copy on each side would leak. The same content in both classes is refused. The cell list hash covers label,
    relative path and file content."""
    folders = clinic_class_folders(cells_dir)
    files, failed, duplicates = distinct_class_files(folders)
    paths, labels, pixels = [], [], []
    digest = hashlib.sha256()
    for label in (PARASITIZED, UNINFECTED):
        for path, content_sha256 in files[label]:
            try:
                cell = prepare_cell(path, size, stain)
            except ImageError as exc:
                failed.append((str(path), str(exc)))
                continue
            paths.append(str(path))
            labels.append(1 if label == PARASITIZED else 0)
            pixels.append(cell)
            relative = path.relative_to(cells_dir).as_posix()
            digest.update(f"{label},{relative},{content_sha256}\n".encode())
    x = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return ClinicCells(paths, np.array(labels, dtype=np.int64), x, failed, digest.hexdigest(), duplicates)


def distinct_class_files(folders: Dict[str, List[Path]]) -> Tuple[Dict[str, List[Tuple[Path, str]]],
                                                             List[Tuple[str, str]], List[Tuple[str, str, str]]]:
    """{label: [(image file, content SHA-256)]} with each content once per class, the files that could not be read
    or are no image [(path, reason)], and the copies dropped [(label, copy, the file it repeats)]. Raises
    :class:`AdaptError` (exit 1) when the same content is in both classes."""
    files: Dict[str, List[Tuple[Path, str]]] = {}
    failed, duplicates = [], []
    for label in (PARASITIZED, UNINFECTED):
        seen: Dict[str, Path] = {}
        for path in sorted(p for folder in folders[label] for p in folder.rglob("*")
                           if p.is_file() and not p.name.startswith(".")):
            if not is_image_path(path):
                failed.append((str(path), "not an image file (unknown suffix)"))
                continue
            try:
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                failed.append((str(path), f"cannot read file: {exc.strerror or exc}"))
                continue
            if content in seen:
                duplicates.append((label, str(path), str(seen[content])))
            else:
                seen[content] = path
        files[label] = [(path, content) for content, path in seen.items()]
    _refuse_cells_in_both(files, folders)
    return files, failed, duplicates


def _refuse_cells_in_both(files: Dict[str, List[Tuple[Path, str]]], folders: Dict[str, List[Path]]) -> None:
    """One line, exit 1, when a file's content is both a parasitized and an uninfected cell (a copied file, or one
    class folder a link to the other): it would teach the model nothing and make its scores worse than chance."""
    uninfected = {content: path for path, content in files[UNINFECTED]}
    both = [(path, uninfected[content]) for path, content in files[PARASITIZED] if content in uninfected]
    if both:
        n = len(both)
        raise AdaptError(f"{n} file{'s are' if n != 1 else ' is'} in both {folders[PARASITIZED][0].name}/ and "
                         f"{folders[UNINFECTED][0].name}/ (same content), e.g. {both[0][0]} and {both[0][1]}; a cell has "
                         "one label: keep each file only in the folder it belongs in")


def say_duplicates(clinic: ClinicCells, warn: Log) -> None:
    """One line per class that held copies: how many were dropped, and an example."""
    for label in (PARASITIZED, UNINFECTED):
        pairs = [(copy_path, kept) for of, copy_path, kept in clinic.duplicates if of == label]
        if pairs:
            warn(f"dropped {len(pairs)} duplicate {label} file{'s' if len(pairs) != 1 else ''} (the same content as "
                 f"another file of that class, e.g. {pairs[0][0]} = {Path(pairs[0][1]).name}): each cell counts once")


def holdout_split(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> Tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """Stratified, seeded split: (indices to fine-tune on, indices held out) with ``fraction`` of each class held
    out."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in (1, 0):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(len(idx) * fraction))
        held.extend(idx[:n_held].tolist())
        keep.extend(idx[n_held:].tolist())
    return np.array(sorted(keep), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> List[np.ndarray]:
    """``folds`` disjoint, seeded parts covering every cell, each class dealt round-robin so every part holds its
    share of both classes."""
    rng = np.random.default_rng(seed)
    parts: List[List[int]] = [[] for _ in range(folds)]
    for label in (1, 0):
        for i, cell in enumerate(rng.permutation(np.flatnonzero(labels == label))):
            parts[i % folds].append(int(cell))
    return [np.array(sorted(part), dtype=np.int64) for part in parts]


def check_counts(cells: ClinicCells, minimum: int = MIN_CELLS_PER_CLASS) -> None:
    """Refuse, in one line, a clinic set too small to adapt and to check the adaptation."""
    short = [f"{cells.count(v)} {name}" for name, v in (("parasitized", 1), ("uninfected", 0))
             if cells.count(v) < minimum]
    if short:
        raise AdaptError(f"only {' and '.join(short)} distinct readable cells; edge-adapt needs at least {minimum} per class, "
                         "because the threshold is chosen, and sensitivity and specificity measured, on cells held "
                         f"out of fine-tuning (a fifth per fold, or {HOLDOUT_FRACTION:.0%} with --folds 0), and "
                         "fewer cannot tell a good adaptation from a bad one; "
                         "sort more cells into Parasitized/ and Uninfected/")


def choose_decision_threshold(y: np.ndarray, prob: np.ndarray, min_sensitivity: Optional[float] = None) -> float:
    """The threshold on P(parasitized) chosen on cells the model was not fine-tuned on: by default the best Youden's
    J (sensitivity + specificity - 1); with ``min_sensitivity``, the best specificity among the thresholds that keep
    at least that sensitivity. Taken in the middle of the best range (in logit space) so the margin to either side
    is as wide as the cells allow."""
    scores = np.unique(np.clip(prob, 1e-6, 1 - 1e-6))
    logits = np.log(scores / (1 - scores))
    cuts = np.concatenate([[logits[0] - 1.0], (logits[:-1] + logits[1:]) / 2, [logits[-1] + 1.0]])
    pos, neg = prob[y == 1], prob[y == 0]

    def objective(cut_logit: float) -> float:
        t = 1 / (1 + np.exp(-cut_logit))
        sensitivity, specificity = float(np.mean(pos >= t)), float(np.mean(neg < t))
        if min_sensitivity is None:
            return sensitivity + specificity - 1
        return specificity if sensitivity >= min_sensitivity - 1e-12 else -1.0

    j = np.array([objective(c) for c in cuts])
    best = np.flatnonzero(j >= j.max() - 1e-12)
    # Ties form one or more runs of cuts; take the middle of the widest run of logit space.
    runs, start = [], best[0]
    for a, b in zip(best[:-1], best[1:]):
        if b != a + 1:
            runs.append((start, a))
            start = b
    runs.append((start, best[-1]))
    lo, hi = max(runs, key=lambda r: cuts[r[1]] - cuts[r[0]])
    middle = (cuts[lo] + cuts[hi]) / 2
    # Rounded to 4 places, but never to 0 or 1: a card's threshold lies strictly between them.
    return float(min(max(round(1 / (1 + np.exp(-middle)), 4), 1e-4), 1 - 1e-4))


def clinic_rule(y: np.ndarray, prob: np.ndarray, threshold: float, groups: Optional[Sequence[str]],
                base_rule: Dict, where: str = "held-out") -> Dict:
    """The patient rule for the clinic. With patient ids in the file names (at least two infected and two healthy
    patients held out) it is chosen as training chooses it (:func:`choose_rule`). Otherwise the minimum parasitized
    fraction is the upper 95% bound of the held-out uninfected cells' false-positive rate at the new threshold: a
    healthy patient's cells are then called negative, whatever the clinic's parasitaemia."""
    if groups is not None:
        counts = per_patient_counts(prob, y, list(groups), threshold)
        infected = sum(c["infected"] for c in counts)
        if infected >= 2 and len(counts) - infected >= 2:
            rule = choose_rule(counts, base_rule.get("min_cells", DEFAULT_RULE["min_cells"]),
                               base_rule.get("max_review_fraction", DEFAULT_RULE["max_review_fraction"]))
            rule["chosen_on"] = f"{where} clinic cells of {len(counts)} patients ({rule['chosen_on'].split('(')[-1]}"
            return rule
    negatives = prob[y == 0]
    false_pos = int((negatives >= threshold).sum())
    upper = wilson_interval(false_pos, len(negatives))[1]
    rule = {k: base_rule.get(k, v) for k, v in DEFAULT_RULE.items()}
    rule["min_fraction"] = round(max(upper, 0.005), 4)
    rule["chosen_on"] = (f"{where} clinic cells without patient ids: upper 95% bound of the false-positive rate "
                         f"({false_pos}/{len(negatives)} uninfected cells at threshold {threshold})")
    return rule


def set_trainable(model, strategy: str) -> int:
    """Freeze what ``strategy`` keeps: ``head`` trains the dense head, ``last`` the last stage (from the residual
    module that opens it), the final normalisation and the head, ``all`` every layer. Frozen batch normalisation
    runs in inference mode, keeping the old lab's statistics. Returns the number of trainable weights."""
    import keras
    layers = model.layers
    if strategy == "all":
        first = 0
    elif strategy == "head":
        first = max(i for i, layer in enumerate(layers) if layer.weights)
    elif strategy == "last":
        strided = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Conv2D)
                   and tuple(layer.strides) != (1, 1)]
        adds = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Add)]
        before = [a for a in adds if strided and a < strided[-1]]
        first = before[-1] + 1 if before else 0
    else:
        raise AdaptError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}", EXIT_USAGE)
    for i, layer in enumerate(layers):
        layer.trainable = i >= first
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def compile_for_fine_tuning(model, recipe: Recipe, head: str, steps: int) -> None:
    """AdamW with a cosine decay over the whole fine-tune, and the loss of the model's own head."""
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, steps)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)
    if head == "softmax2":
        loss, metric = keras.losses.CategoricalCrossentropy(), keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        metric = keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
    model.compile(optimizer=optimizer, loss=loss, metrics=[metric])


def fit_until_interrupted(model, dataset, recipe: Recipe, log: Log):
    """``model.fit`` with one line per epoch through ``log``. Ctrl-C (or SIGTERM) during fit stops after the
    running batch instead of raising inside TensorFlow's threads (which can crash the process), then raises
    KeyboardInterrupt (:class:`Terminated`) here, where the caller removes the unfinished bundle."""
    import keras

    class EpochLine(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            log(f"epoch {epoch + 1}/{recipe.epochs}  loss {logs.get('loss', float('nan')):.4f}  "
                f"acc {logs.get('accuracy', float('nan')):.4f}  {time.time() - self.started:.0f}s")

    interrupted = []

    def stop(signum, frame):
        interrupted.append(signum)
        model.stop_training = True

    class StopOnInterrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if interrupted:
                self.model.stop_training = True

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        history = model.fit(dataset, epochs=recipe.epochs, callbacks=[EpochLine(), StopOnInterrupt()], verbose=0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        raise Terminated if signal.SIGTERM in interrupted else KeyboardInterrupt
    return history


def fine_tune(model, x: np.ndarray, y: np.ndarray, replay: Optional[Tuple[np.ndarray, np.ndarray]], recipe: Recipe,
              head: str, log: Log) -> Dict:
    """Fine-tune ``model`` in place on the clinic's cells (each repeated ``recipe.repeats`` times per epoch) mixed
    with the replayed old-lab cells, with the training pipeline's augmentation. One line per epoch through ``log``."""
    import keras

    from malaria_edge.train.pipeline import make_dataset, steps_per_epoch

    keras.utils.set_random_seed(recipe.seed)
    trainable = set_trainable(model, recipe.strategy)
    xs, ys = [np.repeat(x, recipe.repeats, axis=0)], [np.repeat(y, recipe.repeats, axis=0)]
    if replay is not None and len(replay[0]):
        xs.append(replay[0])
        ys.append(replay[1])
    train_x, train_y = np.concatenate(xs), np.concatenate(ys)
    dataset = make_dataset(train_x, train_y, recipe.batch_size, True, "dihedral_color", head, recipe.seed)
    compile_for_fine_tuning(model, recipe, head, steps_per_epoch(len(train_x), recipe.batch_size) * recipe.epochs)
    log(f"fine-tuning '{recipe.strategy}' ({trainable:,} weights) for {recipe.epochs} epochs on {len(x)} clinic cells "
        f"x{recipe.repeats} + {len(train_x) - len(x) * recipe.repeats} replayed cells")
    started = time.time()
    history = fit_until_interrupted(model, dataset, recipe, log)
    for layer in model.layers:
        layer.trainable = True
    return {"trainable_weights": trainable, "samples_per_epoch": int(len(train_x)),
            "loss": [float(v) for v in history.history.get("loss", [])], "seconds": time.time() - started}


def keras_probability(model, pixels: np.ndarray, head: str) -> np.ndarray:
    """P(parasitized) of a Keras model for uint8 cells (the float model a fold fine-tunes; never quantized)."""
    if not len(pixels):
        return np.zeros(0)
    return parasitized_probability(model.predict(pixels.astype(np.float32), batch_size=256, verbose=0), head)


def out_of_fold_scores(keras_path: Path, clinic: ClinicCells, replay, recipe: Recipe, head: str,
                       log: Log) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Every clinic cell scored by a model fine-tuned (from the base, same recipe) without it: ``recipe.folds``
    stratified parts, each held out once. Returns the scores and the parts."""
    import keras
    parts = stratified_folds(clinic.labels, recipe.folds, recipe.seed)
    scores = np.zeros(len(clinic.labels))
    for k, held in enumerate(parts, 1):
        fit = np.setdiff1d(np.arange(len(clinic.labels)), held)
        model = keras.models.load_model(keras_path)
        fine_tune(model, clinic.pixels[fit], clinic.labels[fit], replay, recipe, head,
                  lambda m, k=k: log(f"fold {k}/{len(parts)}: {m}"))
        scores[held] = keras_probability(model, clinic.pixels[held], head)
        keras.backend.clear_session()
    return scores, parts


def evaluate_on(split: str, source: str, y: np.ndarray, prob: np.ndarray, threshold: float, groups: Sequence[str],
                unit: str) -> Dict:
    """The project's one evaluation (metrics, 95% bootstrap intervals over ``unit``), without per-group counts."""
    ev = evaluate(split, y, prob, list(groups), threshold, unit=unit, source=source)
    ev.pop("patient_counts", None)
    return ev


def refit_unfamiliar(card: Dict, fit_pixels: np.ndarray, held_pixels: np.ndarray) -> Dict:
    """Refit the unfamiliar score to the clinic: the score is the colour statistics' distance to the nearest
    training source (``edge_runtime.unfamiliar``), so the clinic's fine-tuning cells become one more source beside
    the base's (the replayed old lab stays familiar) and the base's threshold is kept. Returns what was done and the
    share of held-out clinic cells flagged before and after, for the card."""
    from malaria_edge.edge_runtime import unfamiliar
    block = card.get("unfamiliar")
    if not block or block.get("method") != unfamiliar.METHOD:
        card.pop("unfamiliar", None)
        return {"refitted": False, "reason": "the base card carries no colour unfamiliar-score statistics"}
    base_components = [c for c in block["statistics"]["components"] if c.get("source") != "clinic"]
    held = unfamiliar.colour_features(held_pixels)
    before = float(np.mean(unfamiliar.scores(held, base_components) > block["threshold"]))
    clinic = unfamiliar.fit_components({"clinic": unfamiliar.colour_features(fit_pixels)})
    block["statistics"] = {**block["statistics"], "components": base_components + clinic}
    block["fitted_on"] = {**block.get("fitted_on", {}), "clinic_cells": int(len(fit_pixels))}
    block.pop("test_flagged", None)
    after = float(np.mean(unfamiliar.scores(held, block["statistics"]["components"]) > block["threshold"]))
    return {"refitted": True, "method": unfamiliar.METHOD, "threshold": block["threshold"],
            "clinic_cells": int(len(fit_pixels)), "held_out_flagged_before": before, "held_out_flagged_after": after}


def _replay_and_old_test(manifest: Optional[Path], size: int, stain: Optional[Dict], count: int, seed: int):
    """Balanced training cells of the old lab for replay, and its test split for measuring what is forgotten."""
    if manifest is None:
        return None, None, None
    try:
        cells = read_manifest(manifest)
        info = load_prepare_report(manifest)
    except DatasetError as exc:
        raise AdaptError(str(exc), EXIT_FAILED if manifest.is_file() else EXIT_USAGE) from None
    replay_cells = calibration_cells(cells, count, seed) if count else []
    cache = Path(manifest).parent / "cache"
    replay = load_arrays(replay_cells, size, stain, None) if replay_cells else None
    test_cells = [c for c in cells if c.split == "test"]
    test = None
    if test_cells:
        x, y = load_arrays(test_cells, size, stain, cache)
        sources = {c.source for c in test_cells}
        unit = "patients" if sources == {NIH} else "fields" if NIH not in sources else "patients and fields"
        test = (x, y, [c.patient for c in test_cells], unit)
    meta = {"manifest_sha256": info["manifest_sha256"], "cells": len(replay_cells), "split": "train",
            "patients": len({c.patient for c in replay_cells})}
    return replay, test, meta


def _old_lab_block(before: ModelBundle, after: ModelBundle, test, base_threshold: float, threshold: float) -> Dict:
    x, y, patients, unit = test
    out = {"split": "test", "patients": len(set(patients)), "unit": unit, "cells": int(len(y)),
           "cells_parasitized": int(y.sum()), "cells_uninfected": int(len(y) - y.sum())}
    for key, bundle, t in (("before", before, base_threshold), ("after", after, threshold)):
        out[key] = evaluate_on("test", "old lab", y, bundle_probabilities(bundle, x), t, patients, unit)
        out[key]["model"] = bundle.path.name
    return out


def check_out(out: Path) -> None:
    """Refuse an output folder that holds anything: a bundle is never overwritten or mixed with other files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdaptError(f"{out} exists and is not empty; edge-adapt never overwrites a bundle: choose a new --out",
                         EXIT_USAGE)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): what a run costs whatever else shares the machine."""
    t = os.times()
    return t.user + t.system


def _prepare_out(out: Path) -> Path:
    """The temporary folder beside ``out`` that the bundle is written into and renamed from at the end."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


@dataclass
class MeasuredCells:
    """The clinic cells the threshold is chosen and the adaptation measured on: every cell, scored out of fold
    (``folds`` >= 2), or one stratified held-out part that is never trained on."""
    keep: np.ndarray                  # indices the bundle is fine-tuned on
    held: np.ndarray                  # indices measured on
    cross_validated: bool
    labels: np.ndarray
    pixels: np.ndarray
    groups: List[Optional[str]]       # patient ids from the held cells' file names (None where there is none)

    @property
    def where(self) -> str:
        return "out-of-fold" if self.cross_validated else "held-out"

    @property
    def with_patients(self) -> bool:
        return all(self.groups) and len(set(self.groups)) >= 4

    @property
    def unit(self) -> str:
        return "patients" if self.with_patients else "cells"

    @property
    def ci_groups(self) -> List[str]:
        """What the 95% intervals resample: patients when the file names say, cells otherwise."""
        return list(self.groups) if self.with_patients else [str(i) for i in range(len(self.held))]

    def evaluate(self, prob: np.ndarray, threshold: float) -> Dict:
        return evaluate_on(self.where, "clinic", self.labels, prob, threshold, self.ci_groups, self.unit)


@dataclass
class FineTuned:
    """The fine-tuned Keras model, its training record, and (cross-validated) the out-of-fold scores."""
    model: object
    training: Dict
    out_of_fold: Optional[np.ndarray] = None
    folds: Optional[Dict] = None


@dataclass
class Measured:
    """What the adapted bundle was measured to do, for the card and the summary."""
    before: Dict
    after: Dict
    rule_text: str
    prob: np.ndarray
    old_lab: Optional[Dict]
    unfamiliar: Dict


def check_request(recipe: Recipe, holdout: float) -> None:
    """Refuse, as a usage error, a recipe or hold-out share outside what adaptation supports."""
    if recipe.strategy not in STRATEGIES:
        raise AdaptError(f"unknown strategy {recipe.strategy!r}; use one of {', '.join(STRATEGIES)}", EXIT_USAGE)
    if not 0.1 <= holdout <= 0.5:
        raise AdaptError(f"holdout {holdout} is outside 0.1-0.5", EXIT_USAGE)
    if recipe.folds == 1 or not 0 <= recipe.folds <= 10:
        raise AdaptError(f"folds {recipe.folds} is not 0 (one held-out part) or 2-10", EXIT_USAGE)
    if recipe.min_sensitivity is not None and not 0.5 <= recipe.min_sensitivity <= 1:
        raise AdaptError(f"minimum sensitivity {recipe.min_sensitivity} is outside 0.5-1", EXIT_USAGE)


def split_clinic(clinic: ClinicCells, recipe: Recipe, holdout: float, log: Log) -> MeasuredCells:
    """Which cells are fine-tuned on and which measure the adaptation (see :class:`MeasuredCells`)."""
    cross_validated = recipe.folds >= 2
    counts = f"{len(clinic.paths)} clinic cells ({clinic.count(1)} parasitized, {clinic.count(0)} uninfected); "
    if cross_validated:
        keep = held = np.arange(len(clinic.labels))
        log(counts + f"{recipe.folds} folds choose the threshold on out-of-fold scores, then the bundle is fine-tuned "
            f"on all of them (stratified, seed {recipe.seed})")
    else:
        keep, held = holdout_split(clinic.labels, holdout, recipe.seed)
        log(counts + f"fine-tuning on {len(keep)}, holding out {len(held)} (stratified, seed {recipe.seed})")
    return MeasuredCells(keep, held, cross_validated, clinic.labels[held], clinic.pixels[held],
                         [patient_id(clinic.paths[i]) for i in held])


def measure_base(base_bundle: ModelBundle, cells: MeasuredCells, log: Log) -> Dict:
    """The base int8 model on the measured cells at its own threshold: the "before"."""
    before = cells.evaluate(bundle_probabilities(base_bundle, cells.pixels), base_bundle.threshold)
    m = before["metrics"]
    log(f"before: {cells.where} AUC {m['roc_auc']:.4f}, sensitivity {pct(m['sensitivity'])}, "
        f"specificity {pct(m['specificity'])} (base int8, threshold {base_bundle.threshold})")
    return before


def fine_tune_base(base: BaseModel, clinic: ClinicCells, cells: MeasuredCells, replay_xy, recipe: Recipe,
                   log: Log) -> FineTuned:
    """Cross-validated: first one fine-tune per fold for the out-of-fold scores; then the bundle's own fine-tune
    of the base Keras weights on the kept cells."""
    import keras

    keras_model = keras.models.load_model(base.keras_path)
    # The Keras model's own head decides the training labels; the card's head describes the TFLite files, which
    # the bundle writer wraps into two scores for phones.
    head = "softmax2" if keras_model.output_shape[-1] == 2 else "logit"
    out_of_fold = folds = None
    if cells.cross_validated:
        del keras_model
        out_of_fold, parts = out_of_fold_scores(base.keras_path, clinic, replay_xy, recipe, head, log)
        folds = {"folds": recipe.folds, "seed": recipe.seed, "stratified": True,
                 "cells_per_fold": [int(len(part)) for part in parts],
                 "scored_by": "each fold's float Keras model, fine-tuned without that fold"}
        keras_model = keras.models.load_model(base.keras_path)
    training = fine_tune(keras_model, clinic.pixels[cells.keep], clinic.labels[cells.keep], replay_xy, recipe, head,
                         log)
    return FineTuned(keras_model, training, out_of_fold, folds)


def write_adapted_bundle(tuned: FineTuned, base: BaseModel, calibration: np.ndarray, paths: BundlePaths,
                         log: Log) -> Dict:
    """The adapted bundle through the one bundle writer, its card started from the base's (without the base's
    test figures) at a provisional threshold of 0.5 until the clinic's is chosen."""
    card = copy.deepcopy(base.card)
    for stale in ("test", "test_sources", "sizes", "slide_rule"):
        card.pop(stale, None)
    card["name"] = paths.name
    card["threshold"] = 0.5
    started = time.time()
    write_bundle(tuned.model, calibration, paths, card)
    log(f"quantized in {time.time() - started:.0f}s: {paths.int8.name} {paths.int8.stat().st_size / 1024:.0f} KiB")
    return card


def clinic_slide_rule(labels: np.ndarray, prob: np.ndarray, threshold: float, base_rule: Optional[Mapping],
                      where: str) -> Optional[Dict]:
    """The adapted model's slide rule: the base rule's settings with the error rates measured on the clinic's own
    cells at the clinic's threshold (the base's rates describe another model); the review band keeps its width in
    proportion. None when there is no base rule or the clinic's cells cannot support one (no cell of a class, or
    no better than chance), so no slide is called on rates nobody measured."""
    if not base_rule:
        return None
    base = SlideRule.from_dict(base_rule)
    y, prob = np.asarray(labels) == 1, np.asarray(prob, dtype=float)
    candidate = min(threshold, base.candidate_threshold * threshold / base.threshold)
    rates = {"sensitivity_k": int(np.sum(prob[y] >= threshold)), "sensitivity_n": int(np.sum(y)),
             "false_flag_k": int(np.sum(prob[~y] >= threshold)), "false_flag_n": int(np.sum(~y)),
             "candidate_sensitivity_k": int(np.sum(prob[y] >= candidate)),
             "candidate_false_flag_k": int(np.sum(prob[~y] >= candidate)),
             "measured_on": f"the clinic's cells ({where}); crops, so cells that segmentation loses are not counted"}
    try:
        rule = SlideRule(threshold=threshold, candidate_threshold=candidate, sources={"clinic": rates},
                         min_cells=base.min_cells, alpha=base.alpha, max_candidate_share=base.max_candidate_share,
                         min_confirmed=base.min_confirmed, chosen_on=f"base rule's settings; rates: {where}")
    except SlideRuleError:
        return None
    return rule.as_dict()


def choose_clinic_threshold(card: Dict, base: BaseModel, bundles: Dict, cells: MeasuredCells, tuned: FineTuned,
                            recipe: Recipe, log: Log) -> Tuple[Dict, str, np.ndarray]:
    """The clinic's threshold and patient rule, chosen on the measured cells' scores (out-of-fold, or the adapted
    int8 file's on the held-out part) and written into ``card``. Returns (the "after" evaluation, how the threshold
    was chosen, the scores)."""
    prob = tuned.out_of_fold if cells.cross_validated else bundle_probabilities(bundles["int8"], cells.pixels)
    threshold = choose_decision_threshold(cells.labels, prob, recipe.min_sensitivity)
    rule_text = ("best Youden's J" if recipe.min_sensitivity is None else
                 f"most specific keeping sensitivity >= {pct(recipe.min_sensitivity)}")
    after = cells.evaluate(prob, threshold)
    card["threshold"] = threshold
    slide_rule = clinic_slide_rule(cells.labels, prob, threshold, base.card.get("slide_rule"), cells.where)
    if slide_rule is not None:
        card["slide_rule"] = slide_rule
    card["patient_rule"] = clinic_rule(cells.labels, prob, threshold, cells.groups if cells.with_patients else None,
                                       base.card.get("patient_rule") or DEFAULT_RULE, cells.where)
    m = after["metrics"]
    scored = "fold models, float" if cells.cross_validated else "int8"
    log(f"after:  {cells.where} AUC {m['roc_auc']:.4f}, sensitivity {pct(m['sensitivity'])}, "
        f"specificity {pct(m['specificity'])} ({scored}, threshold {threshold}: {rule_text} on these cells)")
    return after, rule_text, prob


def measure_old_lab_and_unfamiliar(card: Dict, base_bundle: ModelBundle, adapted: ModelBundle, old_test,
                                   clinic: ClinicCells, cells: MeasuredCells, log: Log) -> Tuple[Optional[Dict], Dict]:
    """What the old lab's test split lost (when a replay manifest was given), and the unfamiliar score refitted to
    the clinic."""
    old_lab = (_old_lab_block(base_bundle, adapted, old_test, base_bundle.threshold, card["threshold"])
               if old_test is not None else None)
    if old_lab:
        b, a = old_lab["before"]["metrics"], old_lab["after"]["metrics"]
        log(f"old lab test split ({old_lab['patients']} {old_lab['unit']}, {old_lab['cells']} cells): AUC "
            f"{b['roc_auc']:.4f} -> {a['roc_auc']:.4f}, accuracy {pct(b['accuracy'])} -> {pct(a['accuracy'])}")
    unfamiliar = refit_unfamiliar(card, clinic.pixels[cells.keep], cells.pixels)
    if cells.cross_validated:
        unfamiliar["measured_on"] = "the clinic cells it was fitted on (every cell is fine-tuned on)"
    if unfamiliar["refitted"]:
        log(f"unfamiliar score refitted to the clinic: {100 * unfamiliar['held_out_flagged_before']:.1f}% of "
            f"{'clinic' if cells.cross_validated else 'held-out clinic'} cells flagged before, "
            f"{100 * unfamiliar['held_out_flagged_after']:.1f}% after")
    return old_lab, unfamiliar


def cells_record(clinic: ClinicCells, cells: MeasuredCells, tuned: FineTuned, recipe: Recipe,
                 holdout: float) -> Dict:
    """The card's account of the clinic's cells: counts, list hash, and how they were split."""
    y, kept = cells.labels, clinic.labels[cells.keep]
    record = {"parasitized": clinic.count(1), "uninfected": clinic.count(0),
              "list_sha256": clinic.list_sha256, "skipped": len(clinic.failed),
              "duplicates_dropped": len(clinic.duplicates),
              "fine_tuned": {"parasitized": int(kept.sum()), "uninfected": int(len(kept) - kept.sum())}}
    measured = {"parasitized": int(y.sum()), "uninfected": int(len(y) - y.sum())}
    if cells.cross_validated:
        record["out_of_fold"] = {**measured, **tuned.folds}
    else:
        record["held_out"] = {**measured, "fraction": holdout, "seed": recipe.seed, "stratified": True}
    return record


def evaluation_record(measured: Measured, cells: MeasuredCells, bundles: Dict, threshold: float) -> Dict:
    """The card's before/after on the measured cells, with what the figures can and cannot claim."""
    if cells.cross_validated:
        note = ("after: each cell scored by the float fold model that was not fine-tuned on it; the threshold and "
                "patient rule were chosen on these scores, so after-sensitivity/specificity are optimistic; the "
                "bundle itself is fine-tuned on every clinic cell and has no untouched clinic cells to report")
    else:
        note = ("the threshold and patient rule were chosen on these held-out cells, so the after sensitivity and "
                "specificity are optimistic; AUC does not depend on the threshold")
    evaluation = {"unit": cells.unit, "before": measured.before, "after": measured.after,
                  "threshold_rule": measured.rule_text, "note": note}
    if not cells.cross_validated:
        evaluation["after_fp32"] = cells.evaluate(bundle_probabilities(bundles["fp32"], cells.pixels), threshold)
    return evaluation


def record_adaptation(card: Dict, base: BaseModel, base_bundle: ModelBundle, clinic: ClinicCells,
                      cells: MeasuredCells, tuned: FineTuned, measured: Measured, bundles: Dict, recipe: Recipe,
                      holdout: float, replay_meta: Optional[Dict], started: Tuple[float, float]) -> None:
    """Everything the adapted card says about where it came from and what it gained."""
    import keras
    import tensorflow as tf

    evaluation = evaluation_record(measured, cells, bundles, card["threshold"])
    card["adaptation"] = {
        "base_model": {"name": base.card.get("name"), "file": base.int8_path.name,
                       "sha256": sha256_file(base.int8_path), "keras_sha256": sha256_file(base.keras_path),
                       "threshold": base_bundle.threshold},
        "cells": cells_record(clinic, cells, tuned, recipe, holdout),
        "recipe": recipe.to_dict(),
        "training": dict(tuned.training),
        "replay": replay_meta,
        ("out_of_fold" if cells.cross_validated else "held_out"): evaluation,
        "old_lab_test": measured.old_lab,
        "unfamiliar": measured.unfamiliar,
        **recommendation(measured, cells),
        "wall_seconds": time.time() - started[0],
        "cpu_seconds": _cpu_seconds() - started[1],
        "machine": machine_info(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def recommendation(measured: Measured, cells: MeasuredCells) -> Dict:
    """Whether the adapted model may replace the base: not when its AUC on the measured clinic cells (out of fold,
    or held out) is below the base model's on the very same cells. AUC, because it does not depend on either
    model's threshold; a model that ranks the clinic's cells worse than the one it came from gained nothing (a
    wrong label, a folder of copies, a recipe that wrecked the weights)."""
    before, after = measured.before["metrics"]["roc_auc"], measured.after["metrics"]["roc_auc"]
    if before is None or after is None or after >= before:
        return {"recommended": True}
    return {"recommended": False,
            "not_recommended_because": f"its {cells.where} AUC {after:.4f} on the clinic's cells is worse than the "
                                       f"base model's {before:.4f} on the same cells"}


def finish_card(card: Dict, paths: BundlePaths, calibration: np.ndarray, clinic_cells: int, replayed: bool,
                command: str) -> None:
    """The calibration set, file sizes and rebuild command of the adapted bundle."""
    card["data"] = {**card.get("data", {}), "calibration": {
        "cells": int(len(calibration)), "clinic_cells": clinic_cells,
        "replayed_cells": int(len(calibration) - clinic_cells)}}
    card["quantization"] = {**card.get("quantization", {}), "calibrated_on": "clinic fine-tuning cells"
                            + (" + 200 replayed training cells" if replayed else "")}
    card["sizes"] = {"keras_bytes": paths.keras.stat().st_size, "fp32_bytes": paths.fp32.stat().st_size,
                     "int8_bytes": paths.int8.stat().st_size}
    if command:
        card["commands"] = list(card.get("commands", [])) + [command]


def load_replay(replay: Optional[os.PathLike], size: int, stain: Optional[Dict], recipe: Recipe, log: Log):
    """The old lab's replayed training cells, its test split and their record (all None without ``replay``)."""
    loaded = _replay_and_old_test(Path(replay) if replay else None, size, stain, recipe.replay_cells, recipe.seed)
    if replay is None:
        log("no --replay manifest: fine-tuning on the clinic's cells alone; what the old lab loses is not measured")
    return loaded


def open_base_bundle(base: BaseModel) -> ModelBundle:
    """The base's int8 file, checked; a damaged one is a model that could not be used (exit 1)."""
    try:
        return ModelBundle(base.int8_path)
    except ModelError as exc:
        raise AdaptError(str(exc)) from None


def adapt(cells: os.PathLike, out: os.PathLike, model: Optional[os.PathLike] = None,
          replay: Optional[os.PathLike] = None, name: Optional[str] = None, recipe: Optional[Recipe] = None,
          holdout: float = HOLDOUT_FRACTION, min_cells: int = MIN_CELLS_PER_CLASS, command: str = "",
          log: Log = lambda m: print(m, file=sys.stderr, flush=True), warn: Optional[Log] = None) -> AdaptResult:
    """Fine-tune a bundle on a clinic's labelled cells and write a new bundle into ``out``.

    ``cells``: a folder with ``Parasitized/`` and ``Uninfected/`` crops. ``model``: the base bundle (folder, its
    int8 ``.tflite`` or card; default: the bundled model); it must carry its Keras weights. ``replay``: an
    edge-prepare manifest of the old lab; its training cells are replayed during fine-tuning and its test split
    measures what the adapted model forgot (without it, nothing is replayed and forgetting is not measured).
    With ``recipe.folds`` >= 2 the threshold is chosen on out-of-fold scores of every clinic cell and the bundle is
    fine-tuned on all of them; otherwise ``holdout`` of each class is held out to choose it and never trained on.
    Raises :class:`AdaptError` with a one-line reason; unreadable images are skipped, named through ``warn``
    (default: ``log``) and listed in the result.
    """
    started = (time.time(), _cpu_seconds())
    recipe = recipe or Recipe()
    check_request(recipe, holdout)
    out = Path(out)
    check_out(out)
    base = find_base(model)
    size, stain = int(base.card["input"]["size"]), base.card.get("preprocessing", {}).get("stain")
    clinic = read_clinic_cells(Path(cells), size, stain)
    for path, reason in clinic.failed:
        (warn or log)(f"skipped {path}: {reason}")
    say_duplicates(clinic, warn or log)
    check_counts(clinic, min_cells)
    paths = BundlePaths(_prepare_out(out), name or f"{base.card.get('name', 'malaria')}_adapted")
    try:
        base_bundle = open_base_bundle(base)
        measured_cells = split_clinic(clinic, recipe, holdout, log)
        before = measure_base(base_bundle, measured_cells, log)
        replay_xy, old_test, replay_meta = load_replay(replay, size, stain, recipe, log)
        tuned = fine_tune_base(base, clinic, measured_cells, replay_xy, recipe, log)
        calibration = clinic.pixels[measured_cells.keep]
        if replay_xy is not None:
            calibration = np.concatenate([calibration, replay_xy[0][:200]])
        card = write_adapted_bundle(tuned, base, calibration, paths, log)
        bundles = load_written(paths, card)
        after, rule_text, prob = choose_clinic_threshold(card, base, bundles, measured_cells, tuned, recipe, log)
        old_lab, unfamiliar = measure_old_lab_and_unfamiliar(card, base_bundle, bundles["int8"], old_test, clinic,
                                                             measured_cells, log)
        measured = Measured(before, after, rule_text, prob, old_lab, unfamiliar)
        finish_card(card, paths, calibration, len(measured_cells.keep), replay_xy is not None, command)
        record_adaptation(card, base, base_bundle, clinic, measured_cells, tuned, measured, bundles, recipe, holdout,
                          replay_meta, started)
        write_card(paths.card, card)
        ModelBundle(paths.int8)
        if out.is_dir():
            out.rmdir()
        os.replace(paths.folder, out)
    except BaseException:
        shutil.rmtree(paths.folder, ignore_errors=True)
        raise
    final = BundlePaths(out, paths.name)
    return AdaptResult(out, final.int8, final.fp32, final.card, final.keras, card, clinic.failed,
                       (measured_cells.labels, prob))


def format_adaptation(card: Dict) -> str:
    """The human summary: before and after on the clinic's held-out cells with intervals, and the old lab."""
    a = card["adaptation"]
    cross_validated = "out_of_fold" in a
    h = a["out_of_fold" if cross_validated else "held_out"]
    cells = a["cells"]["out_of_fold" if cross_validated else "held_out"]

    def row(label: str, ev: Dict) -> str:
        m, ci = ev["metrics"], ev["ci95"]

        def band(key, fmt):
            return f" ({fmt(ci[key][0])}-{fmt(ci[key][1])})" if ci.get(key) else ""
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        return (f"{label:<22} AUC {auc}{band('roc_auc', lambda v: f'{v:.4f}')}  sensitivity "
                f"{pct(m['sensitivity'])}{band('sensitivity', pct)}  specificity {pct(m['specificity'])}"
                f"{band('specificity', pct)}  threshold {m['threshold']}")

    rule_text = h.get("threshold_rule", "best Youden's J")
    if cross_validated:
        lines = [f"clinic cells, out of fold ({cells['folds']} folds): {cells['parasitized']} parasitized, "
                 f"{cells['uninfected']} uninfected (95% CI: bootstrap over {h['unit']})",
                 row("before (base int8)", h["before"]), row("after (fold models)", h["after"]),
                 f"  (threshold: {rule_text} on these out-of-fold scores, so after-sensitivity/specificity are "
                 "optimistic; the bundle is then fine-tuned on all the cells)"]
    else:
        lines = [f"held-out clinic cells: {cells['parasitized']} parasitized, {cells['uninfected']} uninfected "
                 f"(95% CI: bootstrap over {h['unit']})",
                 row("before (base int8)", h["before"]), row("after (adapted int8)", h["after"]),
                 f"  (threshold: {rule_text} on these same cells, patient rule too: after-sensitivity/specificity are "
                 "optimistic)"]
    old = a.get("old_lab_test")
    if old:
        unit = old.get("unit", "patients")
        lines.append(f"old lab, test split: {old['patients']} {unit}, {old['cells']} cells (95% CI: bootstrap over "
                     f"{unit})")
        lines.append(row("before (base int8)", old["before"]))
        lines.append(row("after (adapted int8)", old["after"]))
    rule = card["patient_rule"]
    lines.append(f"patient rule: positive with >= {rule['min_parasitized']} parasitized cells and >= "
                 f"{100 * rule['min_fraction']:.1f}% of cells ({rule['chosen_on']})")
    lines.append(f"took {a['wall_seconds'] / 60:.1f} min wall, {a['cpu_seconds'] / 60:.1f} min CPU on "
                 f"{a['machine']['cpu']} ({a['machine']['cores']} cores)")
    return "\n".join(lines)
