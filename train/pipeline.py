"""Input pipeline: tf.data over the cached uint8 cell arrays (decoded once by
:func:`malaria_edge.edge_runtime.cell_arrays.load_arrays`), with augmentation that runs inside the TensorFlow graph,
one batch at a time.

Decoding 128 px WebP files with Pillow costs about a millisecond per cell; doing it once instead of every epoch is
what keeps the two CPU cores on the arithmetic (the first probe of this project spent most of its step time there).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


AUGMENTATIONS = ("none", "tutorial", "dihedral_color", "multilab", "anylab")


def _dihedral_color(images: tf.Tensor, seed_stream) -> tf.Tensor:
    """Per-cell random element of the 8-element dihedral group (a cell has no up or down), a small shift, and mild
    brightness/contrast/saturation jitter (staining varies between patients). Works on a float batch in [0, 255]."""
    n = tf.shape(images)[0]
    size = tf.shape(images)[1]

    def coin():
        return tf.random.uniform([n, 1, 1, 1]) < 0.5

    images = tf.where(coin(), tf.reverse(images, axis=[2]), images)
    images = tf.where(coin(), tf.reverse(images, axis=[1]), images)
    images = tf.where(coin(), tf.transpose(images, [0, 2, 1, 3]), images)
    pad = size // 16
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.uniform([2], 0, 2 * pad + 1, dtype=tf.int32)
    images = padded[:, offsets[0]:offsets[0] + size, offsets[1]:offsets[1] + size, :]
    foreground = tf.cast(tf.reduce_sum(images, axis=3, keepdims=True) > 30.0, images.dtype)
    mean = tf.reduce_sum(images * foreground, axis=[1, 2], keepdims=True) / (
        tf.reduce_sum(foreground, axis=[1, 2], keepdims=True) + 1.0)
    contrast = tf.random.uniform([n, 1, 1, 1], 0.85, 1.15)
    brightness = tf.random.uniform([n, 1, 1, 1], -12.0, 12.0)
    channel_gain = tf.random.uniform([n, 1, 1, 3], 0.93, 1.07)
    images = ((images - mean) * contrast + mean + brightness) * channel_gain
    images = images * foreground
    return tf.clip_by_value(images, 0.0, 255.0)


def _lab_shift(images: tf.Tensor) -> tf.Tensor:
    """What differs between labs, on top of the dihedral/colour jitter: stain hue and saturation, white balance
    and brightness, focus and camera resolution (blur, or down- and up-sampling: cell diameter in pixels differs by
    camera and magnification). Per cell, on a float batch in [0, 255] of cells masked on black; the background
    stays black."""
    n = tf.shape(images)[0]
    size = tf.shape(images)[1]
    foreground = tf.cast(tf.reduce_sum(images, axis=3, keepdims=True) > 30.0, images.dtype)
    hsv = tf.image.rgb_to_hsv(images / 255.0)
    hue = tf.math.floormod(hsv[..., 0:1] + tf.random.uniform([n, 1, 1, 1], -0.08, 0.08), 1.0)
    saturation = tf.clip_by_value(hsv[..., 1:2] * tf.random.uniform([n, 1, 1, 1], 0.6, 1.5), 0.0, 1.0)
    value = tf.clip_by_value(hsv[..., 2:3] * tf.random.uniform([n, 1, 1, 1], 0.8, 1.2), 0.0, 1.0)
    images = tf.image.hsv_to_rgb(tf.concat([hue, saturation, value], axis=3)) * 255.0
    images = images * tf.random.uniform([n, 1, 1, 3], 0.88, 1.12)
    low = tf.random.uniform([], 0.45, 1.0)
    small = tf.maximum(8, tf.cast(tf.cast(size, tf.float32) * low, tf.int32))
    resampled = tf.image.resize(tf.image.resize(images, [small, small], antialias=True), [size, size])
    images = tf.where(tf.random.uniform([n, 1, 1, 1]) < 0.5, resampled, images)
    return tf.clip_by_value(images * foreground, 0.0, 255.0)


def _stain_jitter(images: tf.Tensor, n) -> tf.Tensor:
    """Giemsa differs between labs in how much dye each part of the cell takes up: scale the optical density
    (Beer-Lambert, OD = -ln(I/256)) of each channel and of the whole cell, per cell. A pale stain is OD x0.6,
    a dark one x1.5; unequal channel factors turn the cell bluish, greyish or pinker."""
    density = -tf.math.log((images + 1.0) / 256.0)
    overall = tf.exp(tf.random.uniform([n, 1, 1, 1], tf.math.log(0.6), tf.math.log(1.5)))
    per_channel = tf.exp(tf.random.uniform([n, 1, 1, 3], tf.math.log(0.8), tf.math.log(1.25)))
    return 256.0 * tf.exp(-density * overall * per_channel) - 1.0


def _blur(images: tf.Tensor, n) -> tf.Tensor:
    """A Gaussian blur of random width (sigma 0.4-1.4 px at the model's input) on about a third of the cells:
    slides out of focus, or a softer lens."""
    sigma = tf.random.uniform([], 0.4, 1.4)
    taps = tf.cast(tf.range(-3, 4), tf.float32)
    kernel_1d = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel_1d /= tf.reduce_sum(kernel_1d)
    kernel = tf.tile((kernel_1d[:, None] * kernel_1d[None, :])[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "SAME")
    return tf.where(tf.random.uniform([n, 1, 1, 1]) < 0.33, blurred, images)


def _jpeg(images: tf.Tensor, n) -> tf.Tensor:
    """JPEG artefacts of a phone or a cheap camera (quality 30-90) on about a quarter of the cells."""
    def one(image):
        return tf.image.random_jpeg_quality(image / 255.0, 30, 90) * 255.0
    compressed = tf.map_fn(one, images, fn_output_signature=tf.float32)
    compressed = tf.ensure_shape(compressed, images.shape)
    return tf.where(tf.random.uniform([n, 1, 1, 1]) < 0.25, compressed, images)


def _zoom(images: tf.Tensor, n, size) -> tf.Tensor:
    """Cell size jitter (x0.85-1.18 about the centre): magnification and the segmentation's crop margin differ.
    What a smaller cell leaves uncovered stays black, like the crops' background."""
    zoom = tf.random.uniform([n], 0.85, 1.18)
    half = 0.5 / zoom
    boxes = tf.stack([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], axis=1)
    return tf.image.crop_and_resize(images, boxes, tf.range(n), [size, size], extrapolation_value=0.0)


def _any_lab(images: tf.Tensor) -> tf.Tensor:
    """For labs no one here has: wider than :func:`_lab_shift`. Stain density per channel and overall, hue, a
    saturation down to nearly grey, gamma, white balance, blur, JPEG, resolution and cell size; per cell, on a
    float batch in [0, 255] of cells masked on black. The background stays black."""
    n = tf.shape(images)[0]
    size = tf.shape(images)[1]
    foreground = tf.cast(tf.reduce_sum(images, axis=3, keepdims=True) > 30.0, images.dtype)
    images = _stain_jitter(tf.clip_by_value(images, 0.0, 255.0), n)
    hsv = tf.image.rgb_to_hsv(tf.clip_by_value(images / 255.0, 0.0, 1.0))
    hue = tf.math.floormod(hsv[..., 0:1] + tf.random.uniform([n, 1, 1, 1], -0.08, 0.08), 1.0)
    saturation = tf.clip_by_value(hsv[..., 1:2] * tf.random.uniform([n, 1, 1, 1], 0.35, 1.4), 0.0, 1.0)
    gamma = tf.exp(tf.random.uniform([n, 1, 1, 1], tf.math.log(0.7), tf.math.log(1.45)))
    value = tf.pow(tf.clip_by_value(hsv[..., 2:3], 1e-4, 1.0), gamma) * tf.random.uniform([n, 1, 1, 1], 0.8, 1.15)
    images = tf.image.hsv_to_rgb(tf.concat([hue, saturation, tf.clip_by_value(value, 0.0, 1.0)], axis=3)) * 255.0
    images = images * tf.random.uniform([n, 1, 1, 3], 0.88, 1.12) * foreground
    images = _blur(images, n)
    low = tf.random.uniform([], 0.45, 1.0)
    small = tf.maximum(8, tf.cast(tf.cast(size, tf.float32) * low, tf.int32))
    resampled = tf.image.resize(tf.image.resize(images, [small, small], antialias=True), [size, size])
    images = tf.where(tf.random.uniform([n, 1, 1, 1]) < 0.4, resampled, images)
    images = _jpeg(tf.clip_by_value(images * foreground, 0.0, 255.0), n)
    images = _zoom(images * foreground, n, size)
    return tf.clip_by_value(images, 0.0, 255.0)


def _tutorial_augmenter(size: int):
    """The tutorial's ImageDataGenerator settings as Keras 3 layers: rotation 20 degrees, zoom, shift and shear 0.05,
    horizontal flip, nearest fill."""
    import keras
    layers = keras.layers
    return keras.Sequential([
        layers.RandomRotation(20 / 360, fill_mode="nearest"),
        layers.RandomZoom(0.05, fill_mode="nearest"),
        layers.RandomTranslation(0.05, 0.05, fill_mode="nearest"),
        layers.RandomShear(x_factor=0.05, y_factor=0.05, fill_mode="nearest"),
        layers.RandomFlip("horizontal"),
    ], name="tutorial_augmentation")


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, training: bool, augment: str = "none",
                 head: str = "logit", seed: int = 0, drop_remainder: bool = False) -> tf.data.Dataset:
    """A tf.data pipeline over cached uint8 arrays. Labels are float 0/1 for a logit head and one-hot
    [parasitized, uninfected] for the tutorial's 2-way softmax."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    augmenter = _tutorial_augmenter(x.shape[1]) if training and augment == "tutorial" else None

    def to_model(images, labels):
        images = tf.cast(images, tf.float32)
        if training and augment in ("dihedral_color", "multilab", "anylab"):
            images = _dihedral_color(images, seed)
        if training and augment == "multilab":
            images = _lab_shift(images)
        elif training and augment == "anylab":
            images = _any_lab(images)
        elif augmenter is not None:
            images = augmenter(images, training=True)
        if head == "softmax2":
            labels = tf.one_hot(1 - labels, 2)
        else:
            labels = tf.cast(labels, tf.float32)[:, None]
        return images, labels

    ds = ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
