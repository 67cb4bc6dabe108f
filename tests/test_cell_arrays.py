"""The decoded-cell cache that edge-train, edge-quantize and edge-adapt share."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from malaria_edge.edge_runtime import cell_arrays
from malaria_edge.edge_runtime.cell_arrays import load_arrays
from malaria_edge.edge_runtime.manifest import read_manifest


def test_two_writers_of_one_cache_file_both_succeed(sample_manifest, tmp_path, monkeypatch):
    """Two trainings started together decode the same cells into the same cache: neither may lose its file to the
    other's rename (the first leave-one-lab-out runs failed on exactly that). The writers are held between writing
    and renaming until all have written: the interleaving that broke."""
    cells = read_manifest(sample_manifest)
    writers = 3
    all_written = threading.Barrier(writers, timeout=30)
    real_savez = np.savez

    def savez_then_wait(*args, **kwargs):
        real_savez(*args, **kwargs)
        all_written.wait()

    monkeypatch.setattr(cell_arrays.np, "savez", savez_then_wait)
    with ThreadPoolExecutor(writers) as pool:
        results = list(pool.map(lambda _: load_arrays(cells, 32, None, tmp_path / "cache", workers=1),
                                range(writers)))
    monkeypatch.setattr(cell_arrays.np, "savez", real_savez)
    for x, y in results:
        assert np.array_equal(x, results[0][0]) and np.array_equal(y, results[0][1]) and len(x) == len(cells)
    assert [p.name.count(".") for p in (tmp_path / "cache").iterdir()] == [1]
    cached_x, _ = load_arrays(cells, 32, None, tmp_path / "cache")
    assert np.array_equal(cached_x, results[0][0])
