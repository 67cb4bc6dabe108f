"""malaria-edge device runtime: classify red blood cell images offline with a TFLite model.

Imports only numpy, pillow, click and a TFLite interpreter; never TensorFlow at import time.

    >>> from malaria_edge import Classifier
    >>> clf = Classifier.load()                      # the bundled int8 model
    >>> [r.prediction for r in clf.predict(["cell.png"])]
"""
from .bundle import ModelBundle, ModelError
from .classifier import Classifier, Prediction
from .images import ImageError, prepare_cell

from .version import __version__
__all__ = ["Classifier", "Prediction", "ModelBundle", "ModelError", "ImageError", "prepare_cell", "__version__"]
