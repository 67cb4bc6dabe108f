"""The device install: a fresh virtual environment with the base install only (no TensorFlow) classifies real
cells, and TensorFlow is never imported."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_base_install_classifies_without_tensorflow(device_venv, tiny_bundle, samples, tmp_path):
    py = device_venv / "bin" / "python"
    missing = subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True, text=True)
    assert missing.returncode != 0, "the base install must not pull in TensorFlow"
    script = textwrap.dedent(f"""
        import sys
        from malaria_edge.edge_runtime.cli import main
        try:
            main([{str(samples)!r}, "--model", {str(tiny_bundle)!r}, "--compare", "-o", {str(tmp_path / "r.csv")!r}])
        except SystemExit as exit:
            assert not exit.code, exit.code
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
        print("NO_TENSORFLOW_OK")
    """)
    done = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO_TENSORFLOW_OK" in done.stdout
    assert len((tmp_path / "r.csv").read_text().splitlines()) == len(list(samples.rglob("*.webp"))) + 1
    console = subprocess.run([str(device_venv / "bin" / "edge-classify"), str(samples), "--model", str(tiny_bundle)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert console.returncode == 0, console.stderr
