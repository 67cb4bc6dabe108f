"""Know when the model doesn't know: an "unfamiliar" score per cell, from the cell's colour statistics.

A model trained on one lab's cells answers another lab's cells with confidence (measured: IML cells called
parasitized at > 0.9 by an NIH-only model). What differs first between labs is the stain and the light, which a
handful of colour statistics of the cell capture: the mean and spread of each channel over the cell (the
foreground of the masked crop) and the share of the crop the cell fills. The score is the squared Mahalanobis
distance of those statistics to the nearest training source (one Gaussian per source: a lab's cells form a
cluster of their own), computed on the exact uint8 input the model sees, in numpy, in microseconds. The threshold
and the per-source means and inverse covariances are fitted on training data and stored in the model card.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

from .images import FOREGROUND_MIN_SUM

METHOD = "colour-mahalanobis"
FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "fill", "mean_saturation", "std_saturation",
            "mean_r_minus_g", "std_r_minus_g", "mean_g_minus_b", "std_g_minus_b")
COVARIANCE_RIDGE = 1e-3          # relative ridge keeps a near-singular source covariance invertible


def colour_features(cells: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 model inputs -> [N, 13] statistics over the cell's pixels: per-channel mean and spread,
    the share of the crop the cell fills, and the mean and spread of saturation and of two chroma differences
    (red - green, green - blue), which carry the stain's hue. A crop with no foreground gets crop-wide figures."""
    cells = np.asarray(cells)
    if cells.ndim == 3:
        cells = cells[None]
    n, pixels = len(cells), cells.shape[1] * cells.shape[2]
    # Six planes per cell [N, 6, pixels], each row contiguous and written in place: red, green, blue (cast to
    # float32 and moved off the pixel axis in one copy), saturation and the two chroma differences.
    planes = np.empty((n, 6, pixels), np.float32)
    planes[:, :3] = cells.reshape(n, pixels, 3).transpose(0, 2, 1)
    red, green, blue, saturation = planes[:, 0], planes[:, 1], planes[:, 2], planes[:, 3]
    foreground = (red + green + blue) > FOREGROUND_MIN_SUM
    count = np.count_nonzero(foreground, axis=1).astype(np.float32)
    empty = count < 1
    foreground[empty] = True
    count[empty] = pixels
    brightest = np.maximum(np.maximum(red, green), blue)
    np.subtract(brightest, np.minimum(np.minimum(red, green), blue), out=saturation)
    np.maximum(brightest, np.float32(1e-6), out=brightest)
    saturation /= brightest  # 0 where the pixel is black (brightest 0, so the difference is 0)
    saturation *= np.float32(255.0)
    np.subtract(red, green, out=planes[:, 4])
    np.subtract(green, blue, out=planes[:, 5])
    # Their foreground mean and spread by two batched matrix products.
    weights = foreground.astype(np.float32)[:, :, None]
    mean = (planes @ weights)[:, :, 0] / count[:, None]
    planes -= mean[:, :, None]
    planes *= planes
    std = np.sqrt((planes @ weights)[:, :, 0] / count[:, None])
    fill = count / pixels * 100.0
    return np.concatenate([mean[:, :3], std[:, :3], fill[:, None],
                           np.stack([mean[:, 3], std[:, 3], mean[:, 4], std[:, 4], mean[:, 5], std[:, 5]], axis=1)],
                          axis=1)


def fit_components(features_by_source: Mapping[str, np.ndarray]) -> List[Dict]:
    """One Gaussian per training source: its mean and inverse covariance (ridge-regularised)."""
    components = []
    for name, feats in sorted(features_by_source.items()):
        feats = np.asarray(feats, dtype=np.float64)
        mean = feats.mean(axis=0)
        cov = np.cov(feats, rowvar=False)
        cov += np.eye(len(mean)) * COVARIANCE_RIDGE * np.trace(cov) / len(mean)
        components.append({"source": name, "cells": int(len(feats)), "mean": mean.tolist(),
                           "inverse_covariance": np.linalg.inv(cov).tolist()})
    return components


def scores(features: np.ndarray, components: Sequence[Mapping]) -> np.ndarray:
    """Squared Mahalanobis distance of each row to the nearest component."""
    features = np.asarray(features, dtype=np.float64)
    best = np.full(len(features), np.inf)
    for comp in components:
        diff = features - np.asarray(comp["mean"])
        dist = np.einsum("ij,jk,ik->i", diff, np.asarray(comp["inverse_covariance"]), diff)
        best = np.minimum(best, dist)
    return best


def cell_scores(cells: np.ndarray, statistics: Mapping) -> np.ndarray:
    """Unfamiliar scores of model-input cells under a card's ``unfamiliar.statistics``."""
    return scores(colour_features(cells), statistics["components"])


def choose_unfamiliar_threshold(validation_scores: np.ndarray, quantile: float = 0.995) -> float:
    """The score above which a cell is unfamiliar: the given quantile of in-distribution validation cells, so about
    0.5% of validation cells are flagged by construction. Validation holds few patients and staining varies by
    patient, so unseen patients of the same lab run about twice that; 0.5% keeps them under the 2% we allow."""
    return float(np.quantile(np.asarray(validation_scores, dtype=np.float64), quantile))
