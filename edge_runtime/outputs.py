"""Turn a model's raw output into the probability that a cell is parasitized, whatever the head."""
from __future__ import annotations

import numpy as np

HEADS = ("logit", "softmax2")


def parasitized_probability(raw: np.ndarray, head: str) -> np.ndarray:
    """``logit``: one logit for parasitized (sigmoid). ``softmax2``: probabilities [parasitized, uninfected]."""
    raw = np.asarray(raw, dtype=np.float64)
    if head == "logit":
        return 1.0 / (1.0 + np.exp(-np.clip(raw.reshape(len(raw), -1)[:, 0], -60, 60)))
    if head == "softmax2":
        return raw.reshape(len(raw), -1)[:, 0]
    raise ValueError(f"unknown model head {head!r}; expected one of {HEADS}")
