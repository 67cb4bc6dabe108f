"""The Python API of the device side: ``Classifier.load().predict(images)``."""
from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .bundle import DEFAULT_MODEL, ModelBundle
from .images import ImageError, ImageInput, load_image, plain_webp_pixels, prepare_cell, prepare_single_cell
from .labels import PARASITIZED, REVIEW, UNINFECTED, label_from_folder, patient_id
from .outputs import parasitized_probability
from .patients import summarize_groups
from .slide import SlideRule
from .unfamiliar import cell_scores

# More interpreter threads than any phone, Pi or laptop has cores only slows inference down, and the interpreter's
# thread pool crashes at exit when asked for tens of thousands.
MAX_THREADS = 64
# A batch is held in memory as uint8 cells; 1024 cells of 128x128 is 50 MB, and larger batches gain no speed.
MAX_BATCH = 1024


@dataclass
class Prediction:
    """One cell's result. ``latency_ms`` is the interpreter's time for this cell (its batch's time divided by the
    batch size); decoding is not included. ``error`` is set, and the rest empty, when the image failed.
    ``unfamiliar_score`` is the cell's distance from the training data when the card carries the statistics (see
    :meth:`Classifier.is_unfamiliar`); rows and dicts carry it under the column name ``unfamiliar``."""
    source: str
    prediction: Optional[str] = None
    prob_parasitized: Optional[float] = None
    latency_ms: Optional[float] = None
    true_label: Optional[str] = None
    error: Optional[str] = None
    unfamiliar_score: Optional[float] = None

    def to_dict(self) -> Dict:
        """All the fields, the score under its column name ``unfamiliar`` (the key external readers know)."""
        out = asdict(self)
        out["unfamiliar"] = out.pop("unfamiliar_score")
        return out

    def to_row(self, true_label: Optional[str] = None, reference: Optional["Prediction"] = None) -> Dict:
        """The output row of a single-cell image (CELL_COLUMNS, rounded as written): ``true_label`` (e.g. from
        --labels) wins over the folder's; ``reference`` adds the full model's REFERENCE_COLUMNS."""
        row = {"path": self.source, "prediction": self.prediction, "prob_parasitized": round(self.prob_parasitized, 6),
               "latency_ms": round(self.latency_ms, 4), "true_label": true_label or self.true_label,
               "unfamiliar": None if self.unfamiliar_score is None else round(self.unfamiliar_score, 3)}
        if reference is not None:
            row.update(reference.reference_columns())
        return row

    def reference_columns(self) -> Dict:
        """This result as the full model's columns beside another model's row (``--compare``)."""
        return {"ref_prediction": self.prediction, "ref_prob_parasitized": round(self.prob_parasitized, 6),
                "ref_latency_ms": round(self.latency_ms, 4)}


def _is_single_image(item) -> bool:
    """One image (a path, a PIL image, an HxW or HxWxC array) as opposed to a collection of them."""
    if isinstance(item, (str, os.PathLike, Image.Image)):
        return True
    return isinstance(item, np.ndarray) and item.ndim in (2, 3)


def _source_name(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"<image {index}>"


class Classifier:
    """A loaded model bundle plus the decision rule: threshold, optional review band, patient-level call."""

    def __init__(self, bundle: ModelBundle, threshold: Optional[float] = None,
                 min_confidence: Optional[float] = None):
        self.bundle = bundle
        self.threshold = bundle.threshold if threshold is None else float(threshold)
        if min_confidence is not None and not 0.5 <= min_confidence <= 1.0:
            raise ValueError("min_confidence must be between 0.5 and 1.0")
        self.min_confidence = min_confidence
        self._array_fields = itertools.count(1)  # a field given as pixels is named field-1, field-2, ...

    @classmethod
    def load(cls, model: Union[str, os.PathLike, None] = None, threads: Optional[int] = None,
             backend: Optional[str] = None, threshold: Optional[float] = None,
             min_confidence: Optional[float] = None) -> "Classifier":
        """Load a bundle (default: the int8 model shipped inside the package), checking its SHA-256."""
        return cls(ModelBundle(model or DEFAULT_MODEL, threads=threads, backend=backend), threshold, min_confidence)

    @property
    def rule(self) -> Optional[Dict]:
        """The card's patient-level rule, or None when the card has none (then no group gets a call)."""
        rule = self.bundle.card.patient_rule
        return rule.as_dict() if rule else None

    @property
    def slide_rule(self) -> Optional[SlideRule]:
        """The card's slide rule (how a slide of cells gets its call, :mod:`slide`), or None when it has none."""
        return self.bundle.card.slide_rule

    def decide(self, prob: float) -> str:
        """parasitized / uninfected, or review when the confidence is below ``min_confidence``."""
        if self.min_confidence is not None and max(prob, 1.0 - prob) < self.min_confidence:
            return REVIEW
        return PARASITIZED if prob >= self.threshold else UNINFECTED

    def preprocess(self, item: ImageInput) -> np.ndarray:
        """A single-cell image as model input: decoded (:meth:`decode`), refused when it cannot be a cell (see
        ``images.check_cell_plausible``), then its central cell cut and masked like a field's cell."""
        return prepare_single_cell(self.decode(item), self.bundle.size, self.bundle.stain)

    def decode(self, item: ImageInput) -> Union[np.ndarray, Image.Image]:
        """The pixels of a single-cell input, upright RGB: a plain WebP file as OpenCV's array (no Pillow image
        in between), anything else as a Pillow image (a large JPEG decoded at a reduced scale)."""
        if isinstance(item, (str, os.PathLike)):
            try:
                pixels = plain_webp_pixels(item)
            except OSError:
                pixels = None  # load_image says why, in its words
            if pixels is not None:
                return pixels
        return load_image(item, draft_to=4 * self.bundle.size)

    def prepare_crop(self, crop: np.ndarray) -> np.ndarray:
        """A cell already cut by ``segment.cut_cell`` as model input."""
        return prepare_cell(crop, self.bundle.size, self.bundle.stain, central=False)

    def classify_field(self, image: ImageInput, source: Optional[str] = None) -> "FieldResult":
        """Find every red cell of a microscope field (path, PIL image or HxWx3 array), classify each, and return
        a :class:`~malaria_edge.edge_runtime.fields.FieldResult` (cells with boxes and calls, counts,
        parasitemia with its interval, ``plot()``, ``save_crops(dir)``). ``source`` names it in rows and file
        names: a path by default, ``field-1``, ``field-2``... for pixels. A float array must hold values in
        [0, 1] (``images.array_to_image``; 0-255 floats are refused, not read as white)."""
        from .fields import classify_field_pixels
        rgb = np.asarray(load_image(image), dtype=np.uint8)
        if source is None:
            source = str(image) if isinstance(image, (str, os.PathLike)) else f"field-{next(self._array_fields)}"
        return classify_field_pixels(self, rgb, source)

    def unfamiliar_scores(self, pixels: np.ndarray) -> Optional[np.ndarray]:
        """How unlike the training data each cell of a uint8 batch looks (None when the card has no statistics)."""
        spec = self.bundle.card.unfamiliar
        return cell_scores(pixels, spec.statistics) if spec else None

    def is_unfamiliar(self, score: Optional[float]) -> bool:
        """True when a cell's score is above the card's threshold: the one place that comparison is made."""
        spec = self.bundle.card.unfamiliar
        return bool(spec and score is not None and score > spec.threshold)

    def probabilities(self, pixels: np.ndarray) -> tuple:
        """Probabilities for a uint8 batch, and the inference seconds of the batch."""
        raw, seconds = self.bundle.run(pixels)
        return parasitized_probability(raw, self.bundle.head), seconds

    def iter_predict(self, images: Iterable[ImageInput], batch_size: int = 1) -> Iterator[Prediction]:
        """Yield one :class:`Prediction` per input, in order, as soon as its batch has run; a bad image yields a
        Prediction with ``error`` set and never stops the run."""
        pending: List[tuple] = []

        def flush():
            if not pending:
                return
            pixels = np.stack([p[1] for p in pending])
            probs, seconds = self.probabilities(pixels)
            scores = self.unfamiliar_scores(pixels)
            per_cell_ms = 1000.0 * seconds / len(pending)
            for i, ((result, _), prob) in enumerate(zip(pending, probs)):
                result.prob_parasitized = float(prob)
                result.prediction = self.decide(float(prob))
                result.latency_ms = per_cell_ms
                if scores is not None:
                    result.unfamiliar_score = float(scores[i])
            done = [p[0] for p in pending]
            pending.clear()
            yield from done

        for index, item in enumerate(images):
            name = _source_name(item, index)
            result = Prediction(name, true_label=label_from_folder(name) if isinstance(item, (str, os.PathLike)) else None)
            try:
                pixels = self.preprocess(item)
            except ImageError as exc:
                result.error = str(exc)
                yield from flush()
                yield result
                continue
            pending.append((result, pixels))
            if len(pending) >= batch_size:
                yield from flush()
        yield from flush()

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], batch_size: int = 1) -> List[Prediction]:
        """Classify paths, PIL images or arrays; one Prediction each, in the order given.

        A single path, PIL image or HxW / HxWxC array is one image; an NxHxWxC array, a list, a tuple or any other
        iterable (a generator too) is a sequence of images."""
        if _is_single_image(images):
            images = [images]
        return list(self.iter_predict(images, batch_size))

    def summarize(self, results: Iterable[Union[Prediction, Dict]],
                  group: Union[str, Callable[[str], str]] = "folder") -> Dict[str, Dict]:
        """Per-slide or per-patient summary with the card's call rule. ``group``: "folder" (parent folder),
        "patient" (NIH file-name patient id) or a function of the source path."""
        keyer = group_key(group)
        rows = []
        for r in results:
            row = r.to_dict() if isinstance(r, Prediction) else dict(r)
            row["group"] = keyer(row.get("source") or row.get("path") or "")
            if row["group"] is not None:  # a cell with no patient id is in no patient's call
                rows.append(row)
        return summarize_groups(rows, self.rule, unfamiliar_limits=self.unfamiliar_limits)

    @property
    def unfamiliar_limits(self) -> Optional[tuple]:
        """(score threshold, share of unfamiliar cells above which results are unreliable), or None."""
        spec = self.bundle.card.unfamiliar
        return (spec.threshold, spec.warn_fraction) if spec else None


def group_key(group: Union[str, Callable[[str], str]]) -> Callable[[str], Optional[str]]:
    """The function that names the group of a source path; None for a cell that belongs to no group (with
    ``"patient"``: a file name that carries no NIH patient id)."""
    if callable(group):
        return group
    if group == "folder":
        return slide_folder
    if group == "patient":
        return patient_id
    raise ValueError(f"unknown grouping {group!r}; use 'folder' or 'patient'")


def slide_folder(path: str) -> str:
    """The slide a cell belongs to: its folder, or the folder above when the folder is a class folder
    (``slide7/Parasitized/x.png`` belongs to ``slide7``)."""
    parent = Path(path).parent
    if label_from_folder(path) is not None:
        parent = parent.parent
    return str(parent)
