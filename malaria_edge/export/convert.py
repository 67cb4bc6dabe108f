"""Keras -> float32 TFLite (the "full model") and full-integer int8 TFLite, calibrated on cells the
caller draws (training patients for edge-quantize, the clinic's fine-tuning cells for edge-adapt).

Both files are built for a phone's standard client as much as for our runtime: the Keras model is first wrapped so it
returns class scores ``[parasitized, uninfected]`` (a one-logit model gets ``[sigmoid(z), 1 - sigmoid(z)]``; a 2-way
softmax model is already so), and all preprocessing after the resize is inside the graph (the model's first layer
rescales 0..255 pixels). The int8 file takes uint8 RGB pixels and returns uint8 scores, so it is integer end to end
and MediaPipe Tasks' ImageClassifier accepts it; the fp32 file takes float32 pixels 0..255 (its metadata says so).

The path that works with Keras 3 on TF 2.21: ``model.export(dir)`` writes a SavedModel, then
``tf.lite.TFLiteConverter.from_saved_model(dir)`` converts it. int8: weights per channel, activations int8.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

# What the TFLite files return, whatever the Keras model's own head: probabilities in label order.
OUTPUT_HEAD = "softmax2"


def with_class_scores(model):
    """The model a classifier client expects: pixels 0..255 in, ``[P(parasitized), P(uninfected)]`` out.

    A one-logit model gets sigmoid and its complement appended (both are plain int8 TFLite ops: LOGISTIC, then
    MUL/ADD, then CONCATENATION); a model that already ends in a 2-way softmax is returned as it is."""
    import keras

    width = int(model.output_shape[-1])
    if width == 2:
        return model
    if width != 1:
        raise ValueError(f"the model has {width} outputs; expected one logit or a 2-way softmax")
    pixels = keras.Input(shape=model.input_shape[1:], name="pixels")
    parasitized = keras.layers.Activation("sigmoid", name="p_parasitized")(model(pixels))
    uninfected = keras.layers.Rescaling(-1.0, offset=1.0, name="p_uninfected")(parasitized)
    scores = keras.layers.Concatenate(name="scores")([parasitized, uninfected])
    return keras.Model(pixels, scores, name=f"{model.name}_scores")


def with_full_pixel_range(calibration: np.ndarray) -> np.ndarray:
    """The calibration cells plus one copy of the first with a pixel at 0 and one at 255.

    The int8 file's uint8 input takes its scale from the smallest and largest calibration pixel. NIH cells sit on
    black but rarely reach 255 (e.g. 250 at the brightest), which would give scale 250/255: our runtime rescales
    pixels to match, but a client that hands over raw pixels, as MediaPipe does, would feed values ~2% off. One pixel
    at each end makes the scale 1 and the zero point 0, so a raw pixel is the input value, and moves no other range
    measurably."""
    if not len(calibration):
        return calibration
    extra = calibration[:1].copy()
    extra[0, 0, 0, :] = 0
    extra[0, -1, -1, :] = 255
    return np.concatenate([calibration, extra])


def _export(model, folder: Path) -> Path:
    model.export(str(folder), verbose=False)
    return folder


def convert(model, calibration: np.ndarray, fp32_path: Path, int8_path: Path) -> None:
    """Write the float32 and the full-integer int8 TFLite files of a Keras model, both returning class scores
    ``[parasitized, uninfected]``, without metadata (see :mod:`malaria_edge.export.metadata`).

    ``calibration``: uint8 cells [N, size, size, 3], resized exactly as the runtime does.
    """
    import tensorflow as tf

    scored = with_class_scores(model)
    with tempfile.TemporaryDirectory() as tmp:
        saved = _export(scored, Path(tmp) / "saved_model")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        fp32_path.write_bytes(converter.convert())

        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative():
            for cell in with_full_pixel_range(calibration):
                yield [cell[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
        int8_path.write_bytes(converter.convert())
