"""The two costs behind edge-classify's robustness figures in README ("Bad input and interruptions").

    python -m malaria_edge.benchmarks.durability fsync [FOLDER]   per-row cost of each fsync policy on FOLDER's disk,
                                                                  and on a slow-disk model (each fsync + 10 ms)
    python -m malaria_edge.benchmarks.durability rss IMAGE        peak RSS that decoding one image adds

The slow disk is a model, not a device: the real fsync followed by a sleep (no device-mapper delay target is
needed). Peak RSS is the process's ru_maxrss before and after decoding, so run one image per process.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from malaria_edge.edge_runtime import results_io
from malaria_edge.edge_runtime.images import ImageError, open_image
from malaria_edge.edge_runtime.results_io import CELL_COLUMNS, FSYNC_EVERY_ROWS, FSYNC_EVERY_SECONDS, RowWriter

ROW = {"path": "/data/slide7/Parasitized/C100P61ThinF_IMG_20150918_144104_cell_162.png", "prediction": "parasitized",
       "prob_parasitized": 0.987654, "latency_ms": 0.7581, "true_label": "parasitized"}
SLOW_DISK_EXTRA_SECONDS = 0.010


def row_cost_ms(folder: Path, rows: int, every_rows: int, every_seconds: float, extra_seconds: float) -> float:
    """Milliseconds per row to write ``rows`` rows with this fsync policy (final fsync included)."""
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        if extra_seconds:
            time.sleep(extra_seconds)

    path = folder / "durability_rows.csv"
    results_io.os.fsync = fsync
    try:
        writer = RowWriter(path, "csv", CELL_COLUMNS, append=False, every_rows=every_rows, every_seconds=every_seconds)
        started = time.perf_counter()
        for _ in range(rows):
            writer.write(ROW)
        writer.close()
        return 1000 * (time.perf_counter() - started) / rows
    finally:
        results_io.os.fsync = real_fsync
        path.unlink(missing_ok=True)


def fsync_table(folder: Path) -> None:
    policies = (("flush only (no fsync)", 10 ** 9, 1e9), ("fsync every row", 1, 0.0),
                (f"group commit {FSYNC_EVERY_ROWS} rows / {FSYNC_EVERY_SECONDS:g} s", FSYNC_EVERY_ROWS,
                 FSYNC_EVERY_SECONDS))
    for disk, extra, rows in (("this disk", 0.0, 2000),
                              (f"slow-disk model (fsync + {SLOW_DISK_EXTRA_SECONDS * 1000:g} ms)",
                               SLOW_DISK_EXTRA_SECONDS, 300)):
        for name, every_rows, every_seconds in policies:
            cost = statistics.median(row_cost_ms(folder, rows, every_rows, every_seconds, extra) for _ in range(3))
            print(f"{disk:<34} {name:<30} {cost:8.4f} ms per row (median of 3 runs of {rows} rows)")


def rss_of(image: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        what = f"decoded to {open_image(image).size}"
    except ImageError as exc:
        what = f"refused: {exc}"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{image}: peak RSS {before:.0f} MB before, {after:.0f} MB after, {after - before:.0f} MB added; {what}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "fsync":
        fsync_table(Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.gettempdir()))
    elif len(sys.argv) == 3 and sys.argv[1] == "rss":
        rss_of(sys.argv[2])
    else:
        sys.exit(__doc__)
