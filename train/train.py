"""Training: build the preset's ResNet, fit it on the training patients, keep the best checkpoint by validation
loss, and write history, plot and the test-split report."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from malaria_edge.edge_runtime.cell_arrays import load_arrays
from malaria_edge.edge_runtime.evaluation import evaluate, format_evaluation
from malaria_edge.edge_runtime.labels import PARASITIZED
from malaria_edge.edge_runtime.machine import machine_info
from malaria_edge.edge_runtime.manifest import NIH, Cell, load_prepare_report, read_manifest
from malaria_edge.edge_runtime.outputs import parasitized_probability
from malaria_edge.edge_runtime.patients import choose_rule
from malaria_edge.train.model import PRESETS, Preset, build_resnet, count_macs
from malaria_edge.train.report import plot_history, write_json

BEST = "model.keras"
LAST = "checkpoint_last.keras"
STATE = "train_state.json"
SPLITS = ("train", "val", "test")
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainOptions:
    """What edge-train is asked for: a preset and the overrides of it (None keeps the preset's), the seed, and how
    to run. ``resume`` continues the run in ``out`` with its own saved preset and seed."""
    preset: str = "edge"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    input_size: Optional[int] = None
    learning_rate: Optional[float] = None
    augment: Optional[str] = None         # see train.pipeline.AUGMENTATIONS
    no_stain: bool = False
    seed: int = 42
    resume: bool = False
    strategy: Optional[str] = None        # tf.distribute: None/"none", "mirrored" or "multiworker"
    cache_dir: Optional[Path] = None      # decoded cells; default <manifest folder>/cache
    hold_out: Optional[str] = None        # a source (lab) never trained on: all its cells test the unseen-lab case


@dataclass
class Splits:
    """The manifest's cells by split, decoded (pixels, labels) at the preset's size. With a held-out source, its
    cells are in none of the splits but under ``held_out`` (every split of that source: the model never sees it)."""
    cells: List[Cell]
    by_split: Dict[str, List[Cell]]
    arrays: Dict[str, Tuple[np.ndarray, np.ndarray]]
    data_info: Dict
    held_out: List[Cell] = field(default_factory=list)

    @property
    def sources(self) -> List[str]:
        return sorted({c.source for c in self.cells})

    @property
    def primary(self) -> str:
        """The source the threshold and patient rule are judged on: NIH (patients) when trained on, else the first."""
        return NIH if NIH in self.sources else self.sources[0]


def unit_of(source: str) -> str:
    """What a group of cells is in ``source``: NIH groups are patients, field sources' groups are fields."""
    return "patients" if source == NIH else "fields"


def split_off_source(cells: List[Cell], source: str, manifest: Path) -> Tuple[List[Cell], List[Cell]]:
    """(cells of ``source``, the rest): leave one lab out of training to measure how the recipe does on a lab it
    never saw. The source is matched without regard to case; an unknown one, or the only one, is refused."""
    sources = sorted({c.source for c in cells})
    match = [s for s in sources if s.lower() == source.lower()]
    if not match:
        raise ValueError(f"{manifest}: no cells of source {source!r} to hold out; its sources: {', '.join(sources)}")
    if len(sources) == 1:
        raise ValueError(f"{manifest}: {match[0]} is its only source; holding it out leaves nothing to train on")
    return [c for c in cells if c.source == match[0]], [c for c in cells if c.source != match[0]]


@dataclass
class Fitted:
    """How the fit went: epochs' history, whether Ctrl-C stopped it, and its wall and CPU seconds."""
    history: Dict
    interrupted: bool
    wall: float
    cpu: float


def make_strategy(name: Optional[str]):
    """tf.distribute strategy: None (default device), "mirrored" (all local GPUs, or CPUs when none), or
    "multiworker" (machines listed in TF_CONFIG)."""
    import tensorflow as tf
    if not name or name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}")


def _compile(model, preset: Preset, steps_total: int):
    import keras
    if preset.optimizer == "sgd_poly":
        schedule = keras.optimizers.schedules.PolynomialDecay(preset.learning_rate, steps_total, 0.0, power=1.0)
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    else:
        warmup = max(1, steps_total // 30)
        schedule = keras.optimizers.schedules.CosineDecay(preset.learning_rate / 10, steps_total - warmup,
                                                          warmup_target=preset.learning_rate, warmup_steps=warmup)
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)
    if preset.head == "softmax2":
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=preset.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    else:
        loss = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=preset.label_smoothing)
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


class EpochLog:
    """Keras callback: one line per epoch through ``log``; history.json and the resumable checkpoint after each epoch."""

    def __init__(self, out: Path, history: Dict, started: float, start_cpu: float, epochs: int, log: Log = _stderr):
        import keras

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):
                cb.epoch_started = time.time()

            def on_epoch_end(cb, epoch, logs=None):
                logs = logs or {}
                for key, value in logs.items():
                    if key != "learning_rate":
                        history.setdefault(key, []).append(float(value))
                history.setdefault("epoch_seconds", []).append(time.time() - cb.epoch_started)
                cb.model.save(out / LAST)
                best = min(history.get("val_loss", [math.inf]))
                write_json(out / "history.json", history)
                write_json(out / STATE, {"epoch": epoch + 1, "best_val_loss": best,
                                         "wall_seconds": time.time() - started + history.get("_resumed_wall", 0),
                                         "cpu_seconds": _cpu_seconds() - start_cpu + history.get("_resumed_cpu", 0)})
                log(f"epoch {epoch + 1}/{epochs}  loss {logs.get('loss', float('nan')):.4f}  "
                    f"acc {logs.get('accuracy', float('nan')):.4f}  val_loss {logs.get('val_loss', float('nan')):.4f}"
                    f"  val_acc {logs.get('val_accuracy', float('nan')):.4f}  "
                    f"{history['epoch_seconds'][-1]:.0f}s")

        self.callback = _Callback()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def balance_sources(cells, x: np.ndarray, y: np.ndarray, log) -> tuple:
    """Repeat the rare cells of a second source so it is learned, not drowned: field sources have a few hundred
    parasites among tens of thousands of red cells. Parasitized cells of each non-NIH source are repeated until
    they are about 15% of that source's cells (at most 10x). NIH (balanced by design) is left as it is."""
    repeats = np.ones(len(cells), dtype=np.int64)
    for source in sorted({c.source for c in cells} - {NIH}):
        positive = np.array([c.source == source and c.label == PARASITIZED for c in cells])
        negative = np.array([c.source == source and c.label != PARASITIZED for c in cells])
        if positive.any():
            factor = int(min(10, max(1, round(0.15 * negative.sum() / (0.85 * positive.sum())))))
            repeats[positive] = factor
            log(f"balance: {source} parasitized cells x{factor} ({positive.sum()} -> {factor * positive.sum()}; "
                f"{negative.sum()} uninfected)")
    if (repeats == 1).all():
        return x, y
    return np.repeat(x, repeats, axis=0), np.repeat(y, repeats, axis=0)




def resolve_preset(out: Path, options: TrainOptions) -> Tuple[Preset, int]:
    """The preset and seed to train with: the saved ones when resuming, else the named preset with the overrides."""
    if options.resume:
        if not (out / LAST).is_file() or not (out / STATE).is_file():
            raise FileNotFoundError(f"{out}: nothing to resume (no {LAST}); start without --resume")
        saved = json.loads((out / "config.json").read_text())
        preset = Preset(**{**saved["preset"], "stages": tuple(saved["preset"]["stages"]),
                           "filters": tuple(saved["preset"]["filters"])})
        return preset, saved["seed"]
    overrides = {k: getattr(options, k) for k in ("epochs", "batch_size", "input_size", "learning_rate", "augment")
                 if getattr(options, k) is not None}
    if options.no_stain:
        overrides["stain"] = None
    return replace(PRESETS[options.preset], **overrides), options.seed


def load_splits(manifest: Path, preset: Preset, cache_dir: Optional[Path], log: Log,
                hold_out: Optional[str] = None) -> Splits:
    """Every split of the manifest decoded at the preset's size; an empty split is refused. ``hold_out`` names a
    source whose cells are kept out of every split and decoded apart, to be tested on as an unseen lab."""
    cells = read_manifest(manifest)
    data_info = load_prepare_report(manifest)
    held: List[Cell] = []
    if hold_out:
        held, cells = split_off_source(cells, hold_out, manifest)
    by_split = {s: [c for c in cells if c.split == s] for s in SPLITS}
    for split, group in by_split.items():
        if not group:
            raise ValueError(f"{manifest}: the {split} split is empty; prepare a dataset with more patients")
    cache_dir = Path(cache_dir) if cache_dir else Path(manifest).parent / "cache"
    t0 = time.time()
    arrays = {s: load_arrays(group, preset.input_size, preset.stain, cache_dir) for s, group in by_split.items()}
    if held:
        arrays["held_out"] = load_arrays(held, preset.input_size, preset.stain, cache_dir)
        log(f"held out: {held[0].source}, {len(held)} cells of {len({c.patient for c in held})} "
            f"{unit_of(held[0].source)} (every split), never trained on")
    log(f"decoded {len(cells) + len(held)} cells at {preset.input_size}px in {time.time() - t0:.0f}s "
        f"(cached in {cache_dir})")
    return Splits(cells, by_split, arrays, data_info, held)


def project_relative(path: Path) -> str:
    """A path as the config records it: relative to the folder the command ran in when it lies under it, so a
    committed config names no folder of the machine that trained it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_config(out: Path, preset: Preset, seed: int, manifest: Path, splits: Splits, options: TrainOptions,
                 command: str) -> None:
    """config.json: what --resume and edge-quantize read back, with the commands that built the run."""
    config = {"preset": preset.to_dict(), "seed": seed, "manifest": project_relative(manifest),
              "manifest_sha256": splits.data_info["manifest_sha256"], "strategy": options.strategy or "none",
              "hold_out": options.hold_out,
              "commands": [splits.data_info.get("command", ""), command]}
    if options.resume:
        config["commands"] = json.loads((out / "config.json").read_text()).get("commands", []) + [command]
    write_json(out / "config.json", config)


def make_datasets(splits: Splits, preset: Preset, seed: int, replicas: int):
    """tf.data for training (augmented) and for the validation monitor."""
    from malaria_edge.train.pipeline import make_dataset

    train_ds = make_dataset(*splits.arrays["train"], preset.batch_size, True, preset.augment, preset.head, seed,
                            drop_remainder=replicas > 1)
    # Keras cannot merge unevenly split batches across replicas, so under tf.distribute the validation monitor
    # uses a whole number of cells per replica (at most replicas - 1 cells fewer); the report uses every cell.
    val_x, val_y = splits.arrays["val"]
    keep = len(val_x) - len(val_x) % replicas
    val_ds = make_dataset(val_x[:keep], val_y[:keep], 256 - 256 % replicas, False, head=preset.head,
                          drop_remainder=False)
    return train_ds, val_ds


def build_or_resume(out: Path, preset: Preset, strategy, steps_total: int, resume: bool, log: Log):
    """The model to fit, under the strategy's scope: new and compiled, or the last checkpoint with its history.
    Returns (model, history, first epoch)."""
    import keras

    with strategy.scope():
        if not resume:
            model = build_resnet(preset)
            _compile(model, preset, steps_total)
            return model, {}, 0
        model = keras.models.load_model(out / LAST)
        state = json.loads((out / STATE).read_text())
        history = json.loads((out / "history.json").read_text())
        history["_resumed_wall"] = state["wall_seconds"]
        history["_resumed_cpu"] = state["cpu_seconds"]
        log(f"resuming {out} at epoch {state['epoch'] + 1}/{preset.epochs}")
        return model, history, state["epoch"]


def fit(out: Path, preset: Preset, seed: int, splits: Splits, options: TrainOptions, log: Log) -> Fitted:
    """Fit on the training cells (rare field parasites repeated), keeping the best checkpoint by validation loss
    and a resumable last one; Ctrl-C ends the fit early with what it has."""
    import keras

    from malaria_edge.train.pipeline import steps_per_epoch

    splits.arrays["train"] = balance_sources(splits.by_split["train"], *splits.arrays["train"], log)
    strategy = make_strategy(options.strategy)
    steps = steps_per_epoch(len(splits.arrays["train"][0]), preset.batch_size)
    replicas = strategy.num_replicas_in_sync
    train_ds, val_ds = make_datasets(splits, preset, seed, replicas)
    model, history, initial_epoch = build_or_resume(out, preset, strategy, steps * preset.epochs, options.resume, log)
    log(f"strategy {options.strategy or 'none'}: {replicas} replica(s)")
    log(f"preset {preset.name}: {model.count_params():,} parameters, {count_macs(model) / 1e6:.1f}M MACs per cell, "
        f"{preset.input_size}px, {preset.epochs} epochs, batch {preset.batch_size}; train "
        f"{len(splits.arrays['train'][0])} cells, val {len(splits.arrays['val'][0])} cells")
    started, start_cpu = time.time(), _cpu_seconds()
    logger = EpochLog(out, history, started, start_cpu, preset.epochs, log)
    best_cb = keras.callbacks.ModelCheckpoint(out / BEST, monitor="val_loss", save_best_only=True)
    if options.resume and "val_loss" in history:
        best_cb.best = min(history["val_loss"])
    interrupted = False
    try:
        model.fit(train_ds, validation_data=val_ds, epochs=preset.epochs, initial_epoch=initial_epoch,
                  callbacks=[best_cb, logger.callback], verbose=1 if sys.stdout.isatty() else 0)
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted: the best checkpoint so far is in {out / BEST}; continue with --resume {out}")
    if not (out / BEST).is_file():
        raise RuntimeError("training stopped before the first epoch ended; nothing to report")
    wall = time.time() - started + history.pop("_resumed_wall", 0)
    cpu = _cpu_seconds() - start_cpu + history.pop("_resumed_cpu", 0)
    write_json(out / "history.json", history)
    plot_history(history, out / "plot.png", f"ResNet '{preset.name}' on {' + '.join(splits.sources)} cells "
                                             "(split by patient / field block)")
    return Fitted(history, interrupted, wall, cpu)


def _predict(best, preset: Preset, x: np.ndarray) -> np.ndarray:
    return parasitized_probability(best.predict(x.astype(np.float32), batch_size=256, verbose=0), preset.head)


def evaluate_held_out(best, preset: Preset, splits: Splits, threshold: float) -> Optional[Dict]:
    """The held-out lab's every cell, grouped by its patients or fields: how the recipe does on a lab it never saw."""
    if not splits.held_out:
        return None
    source = splits.held_out[0].source
    x, y = splits.arrays["held_out"]
    return evaluate("all (lab never trained on)", y, _predict(best, preset, x), [c.patient for c in splits.held_out],
                    threshold, unit=unit_of(source), source=source)


def evaluate_best(best, preset: Preset, splits: Splits) -> Tuple[Dict, Optional[Dict], Dict, Dict]:
    """The best checkpoint on val and test, per source: the patient rule chosen on NIH val at threshold 0.5 (no
    rule when NIH is not trained on). Returns (val evaluation, rule, primary source's test evaluation, other
    sources' test evaluations)."""
    evaluations = {}
    for split in ("val", "test"):
        x, y = splits.arrays[split]
        prob = _predict(best, preset, x)
        for source in splits.sources:
            keep = np.array([c.source == source for c in splits.by_split[split]])
            if keep.any():
                groups = [c.patient for c in splits.by_split[split] if c.source == source]
                evaluations[(split, source)] = (y[keep], prob[keep], groups)
    threshold, primary = 0.5, splits.primary
    val_eval = evaluate("val", *evaluations[("val", primary)], threshold, unit=unit_of(primary), source=primary)
    rule = choose_rule(val_eval["patient_counts"]) if primary == NIH else None
    test_eval = evaluate("test", *evaluations[("test", primary)], threshold, rule=rule, unit=unit_of(primary),
                         source=primary)
    other_sources = {source: evaluate("test", *evaluations[("test", source)], threshold, unit=unit_of(source),
                                      source=source)
                     for source in splits.sources if source != primary and ("test", source) in evaluations}
    return val_eval, rule, test_eval, other_sources


def write_report(out: Path, preset: Preset, seed: int, splits: Splits, fitted: Fitted, log: Log) -> Dict:
    """report.json and report.txt of the best checkpoint: what edge-quantize builds the card from."""
    import keras
    import tensorflow as tf

    best = keras.models.load_model(out / BEST)
    val_eval, rule, test_eval, other_sources = evaluate_best(best, preset, splits)
    held_out = evaluate_held_out(best, preset, splits, 0.5)
    history, data_info = fitted.history, splits.data_info
    report = {
        "model": BEST,
        "preset": preset.to_dict(),
        "parameters": int(best.count_params()),
        "macs_per_cell": count_macs(best),
        "epochs_run": len(history.get("loss", [])),
        "interrupted": fitted.interrupted,
        "best_epoch": int(np.argmin(history["val_loss"]) + 1) if history.get("val_loss") else None,
        "training_wall_seconds": fitted.wall,
        "training_cpu_seconds": fitted.cpu,
        "machine": machine_info(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "seed": seed,
        "data": {"manifest_sha256": data_info["manifest_sha256"], "counts": data_info["counts"],
                 "patients": data_info.get("patients")},
        "threshold": 0.5,
        "patient_rule": rule,
        "validation": {k: v for k, v in val_eval.items() if k != "patient_counts"},
        "test": test_eval,
        "test_other_sources": other_sources,
        "sources": splits.sources,
        "held_out": held_out,
    }
    write_json(out / "report.json", report)
    blocks = [test_eval, *other_sources.values()] + ([held_out] if held_out else [])
    text = ("\n\n".join(format_evaluation(ev) for ev in blocks) + "\n\n" +
            f"trained {report['epochs_run']} epochs in {fitted.wall / 60:.1f} min wall, {fitted.cpu / 60:.1f} min "
            f"CPU on {report['machine']['cpu']} ({report['machine']['cores']} cores); best epoch "
            f"{report['best_epoch']}; {report['parameters']:,} parameters\n")
    (out / "report.txt").write_text(text)
    log(text)
    return report


def train(manifest: Path, out: Path, options: Union[TrainOptions, str, None] = None, *, command: str = "",
          log: Log = _stderr, **changes) -> Dict:
    """Train on the manifest's training patients and write model, history, plot and report to ``out``.

    ``options``: a :class:`TrainOptions`, or just a preset name; keyword ``changes`` replace its fields, so
    ``train(manifest, out, "tiny", epochs=30)`` is ``train(manifest, out, TrainOptions("tiny", epochs=30))``."""
    import keras

    if not isinstance(options, TrainOptions):
        options = TrainOptions(preset=options or TrainOptions.preset)
    options = replace(options, **changes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preset, seed = resolve_preset(out, options)
    if options.resume:
        options = replace(options, hold_out=json.loads((out / "config.json").read_text()).get("hold_out"))
    keras.utils.set_random_seed(seed)
    splits = load_splits(manifest, preset, options.cache_dir, log, options.hold_out)
    write_config(out, preset, seed, manifest, splits, options, command)
    fitted = fit(out, preset, seed, splits, options, log)
    return write_report(out, preset, seed, splits, fitted, log)
