"""The ResNet of the PyImageSearch malaria tutorial (pre-activation bottleneck ResNet) and our compact variant.

Both presets are the same family: a stem convolution, then stages of bottleneck residual modules
(BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 with K/4 inner width; the first module of a stage projects the shortcut),
then BN-ReLU, global pooling and a dense head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple

import keras
from keras import layers, regularizers


@dataclass
class Preset:
    """Everything that defines a trained model: architecture, input, schedule and augmentation."""
    name: str
    input_size: int
    stages: Tuple[int, ...]
    filters: Tuple[int, ...]
    stem_stride: int
    l2: float
    head: str                 # "softmax2" (the tutorial's 2-way softmax) or "logit" (one logit for parasitized)
    optimizer: str            # "sgd_poly" (the tutorial's) or "adamw_cosine"
    learning_rate: float
    epochs: int
    batch_size: int
    augment: str              # "tutorial" (rotation/zoom/shift/shear/flip) or "dihedral_color"
    stain: Dict | None = None  # stain normalisation targets, see edge_runtime.images.normalize_stain
    label_smoothing: float = 0.0
    bn_epsilon: float = 2e-5
    bn_momentum: float = 0.9
    extra: Dict = field(default_factory=dict)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        d["filters"] = list(self.filters)
        return d


# Mean and spread of the foreground (cell) pixels over the training patients of ../shared/data, rounded; every cell
# is mapped to these before it reaches the network (see docs/experiments.md).
STAIN_TARGET = {"mean": [180.0, 141.0, 151.0], "std": [33.0, 27.0, 27.0]}

PRESETS = {
    # The tutorial: ResNet.build(64, 64, 3, 2, (3, 4, 6), (64, 128, 256, 512), reg=0.0005), SGD 1e-1 momentum 0.9
    # with linear decay over 50 epochs, batch 32.
    "seed": Preset("seed", 64, (3, 4, 6), (64, 128, 256, 512), 1, 5e-4, "softmax2", "sgd_poly", 0.1, 50, 32,
                   "tutorial"),
    # Ours: the same family made small enough for a 2-core CPU and a Raspberry Pi, chosen by measurement
    # (docs/experiments.md). No stain normalisation (no measurable gain, and no phone client can reproduce it);
    # augmentation for what differs between labs (stain hue and saturation, white balance, focus, resolution).
    "edge": Preset("edge", 48, (2, 2, 2), (32, 64, 128, 256), 2, 1e-4, "logit", "adamw_cosine", 3e-3, 20, 64,
                   "multilab", label_smoothing=0.05),
    # The first shipped recipe (NIH only): stain-normalised, dihedral/colour jitter, 30 epochs.
    "edge-nih": Preset("edge-nih", 48, (2, 2, 2), (32, 64, 128, 256), 2, 1e-4, "logit", "adamw_cosine", 3e-3, 30,
                       64, "dihedral_color", stain=STAIN_TARGET, label_smoothing=0.05),
    # For tests and smoke runs: trains in seconds, exercises every code path of "edge".
    "tiny": Preset("tiny", 32, (1, 1, 1), (8, 16, 32, 64), 2, 1e-4, "logit", "adamw_cosine", 3e-3, 2, 16,
                   "multilab", label_smoothing=0.05),
}


def _residual_module(x, k: int, stride: int, reduce: bool, reg, eps: float, mom: float):
    shortcut = x
    bn1 = layers.BatchNormalization(epsilon=eps, momentum=mom)(x)
    act1 = layers.Activation("relu")(bn1)
    conv1 = layers.Conv2D(int(k * 0.25), 1, use_bias=False, kernel_regularizer=reg)(act1)
    bn2 = layers.BatchNormalization(epsilon=eps, momentum=mom)(conv1)
    act2 = layers.Activation("relu")(bn2)
    conv2 = layers.Conv2D(int(k * 0.25), 3, strides=stride, padding="same", use_bias=False,
                          kernel_regularizer=reg)(act2)
    bn3 = layers.BatchNormalization(epsilon=eps, momentum=mom)(conv2)
    act3 = layers.Activation("relu")(bn3)
    conv3 = layers.Conv2D(k, 1, use_bias=False, kernel_regularizer=reg)(act3)
    if reduce:
        shortcut = layers.Conv2D(k, 1, strides=stride, use_bias=False, kernel_regularizer=reg)(act1)
    return layers.add([conv3, shortcut])


def build_resnet(preset: Preset) -> keras.Model:
    """Build the Keras model of ``preset``. Input: float32 pixels in [0, 255], shape (size, size, 3)."""
    size, eps, mom = preset.input_size, preset.bn_epsilon, preset.bn_momentum
    reg = regularizers.l2(preset.l2)
    inputs = keras.Input(shape=(size, size, 3), name="pixels")
    if preset.name == "seed":
        # As the tutorial: pixels scaled to [0, 1] by its generator, then a BN on the input.
        x = layers.Rescaling(1.0 / 255)(inputs)
        x = layers.BatchNormalization(epsilon=eps, momentum=mom)(x)
        x = layers.Conv2D(preset.filters[0], 3, use_bias=False, padding="same", kernel_regularizer=reg)(x)
    else:
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
        x = layers.Conv2D(preset.filters[0], 3, strides=preset.stem_stride, use_bias=False, padding="same",
                          kernel_regularizer=reg)(x)
    for i, blocks in enumerate(preset.stages):
        stride = 1 if i == 0 else 2
        x = _residual_module(x, preset.filters[i + 1], stride, True, reg, eps, mom)
        for _ in range(blocks - 1):
            x = _residual_module(x, preset.filters[i + 1], 1, False, reg, eps, mom)
    x = layers.BatchNormalization(epsilon=eps, momentum=mom)(x)
    x = layers.Activation("relu")(x)
    if preset.head == "softmax2":
        # The tutorial pools 8x8 windows and flattens what is left (2x2 at 64 px input).
        x = layers.AveragePooling2D((8, 8))(x)
        x = layers.Flatten()(x)
        x = layers.Dense(2, kernel_regularizer=reg)(x)
        outputs = layers.Activation("softmax", name="probabilities")(x)
    else:
        x = layers.GlobalAveragePooling2D()(x)
        outputs = layers.Dense(1, kernel_regularizer=reg, name="logit")(x)
    return keras.Model(inputs, outputs, name=f"resnet_{preset.name}")


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass through the convolution and dense layers."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += kh * kw * cin * cout * h * w
        elif isinstance(layer, layers.Dense):
            total += int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
    return int(total)
