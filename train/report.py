"""The training plot and report files. The evaluation itself is assembled in edge_runtime.evaluation, shared with
the model card."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from malaria_edge.edge_runtime.card import write_json_atomic


def plot_history(history: Dict[str, List[float]], path: Path, title: str) -> None:
    """Training and validation loss and accuracy per epoch on one figure, as the tutorial's plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("loss", "-"), ("val_loss", "-"), ("accuracy", "--"), ("val_accuracy", "--")):
        if history.get(key):
            ax.plot(epochs, history[key], style, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss / accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: Dict) -> None:
    """Reports, histories and configs are written atomically, like cards."""
    write_json_atomic(path, data)
