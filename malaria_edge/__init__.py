"""malaria-edge: tell parasitized from uninfected red blood cells, offline, on a Raspberry Pi or a phone.

One import namespace. The device side needs only numpy, pillow, click and a TFLite interpreter:

    >>> from malaria_edge import Classifier
    >>> clf = Classifier.load()                      # the bundled int8 model
    >>> [r.prediction for r in clf.predict(["cell.png"])]

Subpackages: ``malaria_edge.edge_runtime`` (device), ``malaria_edge.train`` and ``malaria_edge.quantize``
(need the ``[train]`` extra: TensorFlow), ``malaria_edge.benchmarks`` (``edge-bench``).
"""
from .edge_runtime import (Classifier, ImageError, ModelBundle, ModelError, Prediction, __version__,
                           prepare_cell)

__all__ = ["Classifier", "Prediction", "ModelBundle", "ModelError", "ImageError", "prepare_cell", "__version__"]
