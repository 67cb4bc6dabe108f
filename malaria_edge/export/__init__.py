"""Writing a model bundle from a Keras model: TFLite conversion, TFLite metadata and the checked card.

Shared by ``edge-quantize`` (``malaria_edge.quantize``) and ``edge-adapt`` (``malaria_edge.train``), which import
it and never each other. Needs the ``[train]`` extra (TensorFlow, MediaPipe's metadata writer), imported only inside
the functions that use them; the device runtime never imports this package.
"""
