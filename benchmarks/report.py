"""What every ``edge-bench`` mode shares in its results: the error a measurement stops with, and the one way a report
reaches disk (with the tool's version and the machine it ran on)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from malaria_edge.edge_runtime.errors import MalariaEdgeError
from malaria_edge.edge_runtime.machine import machine_info
from malaria_edge.edge_runtime.results_io import atomic_write_text
from malaria_edge.edge_runtime.version import __version__


class BenchError(MalariaEdgeError):
    """A measurement that cannot run (no readable images, a worker that failed); one line for the user."""


def write_report(path: Path, report: Dict) -> Dict:
    """Write ``report`` as JSON (atomically), led by ``tool_version`` and, unless it has one, ``machine``; returns
    what was written."""
    out = {"tool_version": __version__, **({} if "machine" in report else {"machine": machine_info()}), **report}
    atomic_write_text(Path(path), json.dumps(out, indent=2))
    return out
