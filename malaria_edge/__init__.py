"""malaria-edge: tell parasitized from uninfected red blood cells, offline, on a Raspberry Pi or a phone.

One import namespace. The device side needs only numpy, pillow, click and a TFLite interpreter:

    >>> from malaria_edge import Classifier
    >>> clf = Classifier.load()                      # the bundled int8 model
    >>> [r.prediction for r in clf.predict(["cell.png"])]

Subpackages: ``malaria_edge.edge_runtime`` (device), ``malaria_edge.train`` and ``malaria_edge.quantize``
(need the ``[train]`` extra: TensorFlow), ``malaria_edge.benchmarks`` (``edge-bench``).

``malaria_edge.adapt(cells, out, model=...)`` fine-tunes a bundle on a clinic's labelled cells (``edge-adapt``); it
needs the ``[train]`` extra and is imported on first use, so ``import malaria_edge`` never loads TensorFlow.
"""
from .edge_runtime import (Classifier, ImageError, ModelBundle, ModelError, Prediction, __version__,
                           prepare_cell)

__all__ = ["Classifier", "Prediction", "ModelBundle", "ModelError", "ImageError", "prepare_cell", "__version__"]


def __getattr__(name):
    """``malaria_edge.adapt`` is loaded on first use: it needs TensorFlow, the device side must not."""
    if name == "adapt":
        from .train.adapt import adapt
        return adapt
    raise AttributeError(f"module 'malaria_edge' has no attribute {name!r}")
