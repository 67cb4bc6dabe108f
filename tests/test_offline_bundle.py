"""The offline bundle as a field device uses it: built for this machine's CPU and Python (pip downloads from PyPI:
skipped with the reason when PyPI is unreachable), installed by its install.sh into a fresh venv with pip
--no-index and nothing but the bundle (and once more with no network interface at all, where this machine allows a
network namespace), then it classifies the sample cells and fields with rows identical to the normal install's.
About a minute; nothing is cached in the repo."""
from __future__ import annotations

import csv
import os
import platform
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, REPO, cli
from malaria_edge.edge_runtime import offline_bundle as ob

LATENCY_COLUMNS = {"latency_ms", "ref_latency_ms"}
INPUTS = ["edge_runtime/samples", "edge_runtime/sample_fields"]


def _pypi_reachable() -> str:
    """'' when PyPI answers, else why not."""
    cert = ob.default_cert()
    try:
        context = ssl.create_default_context(cafile=cert) if cert else ssl.create_default_context()
        urllib.request.urlopen(urllib.request.Request(f"{ob.PYPI}/click/", method="HEAD"), timeout=15,
                               context=context).close()
        return ""
    except Exception as exc:  # any failure means: no bundle can be built here
        return f"PyPI is unreachable from here ({type(exc).__name__}: {exc}); edge-bundle downloads from it"


def _unshare_prefix() -> list:
    """The command prefix that runs a child with no network interface, or [] when this machine refuses it."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            if subprocess.run(prefix + ["true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return []


pytestmark = [pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                                 reason="the bundle test installs an x86_64 Linux bundle on this machine")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    why = _pypi_reachable()
    if why:
        pytest.skip(why)
    if ob.source_root() is None:
        pytest.skip("edge-bundle builds our wheel from a source checkout; this install is from a wheel (the "
                    "device layer): the source-checkout run of the suite covers it")
    glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[-1]          # e.g. 'glibc 2.36'
    target = ob.Target("x86_64", f"{sys.version_info[0]}.{sys.version_info[1]}", ".".join(glibc.split(".")[:2]))
    out = tmp_path_factory.mktemp("bundle") / "field-bundle"
    result = ob.build_bundle(out, target, cert=ob.default_cert())
    return result


def _clean_env() -> dict:
    """A device's environment: none of this machine's pip settings (index, find-links, constraints)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}


def _install(bundle, venv: Path, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run(list(prefix) + ["sh", str(bundle.folder / "install.sh"), str(venv)], capture_output=True,
                          text=True, env={**_clean_env(), "PYTHON": sys.executable}, timeout=600)


def _rows(edge_classify: Path, out: Path) -> list:
    done = subprocess.run([str(edge_classify), *INPUTS, "--threads", "1", "-o", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in LATENCY_COLUMNS} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def normal_rows(tmp_path_factory):
    """Rows of the install the tests run in (the normal, networked install)."""
    return _rows(BIN / "edge-classify", tmp_path_factory.mktemp("normal") / "rows.csv")


def test_the_bundle_holds_our_wheel_with_its_model_every_dependency_and_the_installer(bundle):
    names = {p.name for p in bundle.folder.iterdir()}
    assert {"install.sh", "README.txt", "SHA256SUMS", "bundle.json", "wheels"} <= names
    assert bundle.archive.is_file() and bundle.archive.name == "field-bundle.tar.gz"
    assert "malaria_edge/edge_runtime/models/malaria_int8.tflite" in bundle.own.models
    wheels = {w.split("-")[0].lower() for w in bundle.wheels}
    assert {"malaria_edge", "numpy", "pillow", "click", "ai_edge_litert", "opencv_python_headless"} <= wheels
    assert not any("tensorflow" in w for w in wheels)
    assert ob.check_closure(bundle.folder / "wheels", ob.DISTRIBUTION, ["fields"], bundle.target) == []


def test_the_bundle_installs_with_no_index_and_classifies_like_the_normal_install(bundle, normal_rows, tmp_path):
    venv = tmp_path / "venv"
    done = _install(bundle, venv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--no-index" in (bundle.folder / "install.sh").read_text()
    assert "self-check:" in done.stderr and "OK: malaria-edge" in done.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import malaria_edge; print(malaria_edge.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert Path(where).resolve().is_relative_to(venv.resolve()), "the bundle's venv imported the repo's code"
    rows = _rows(venv / "bin" / "edge-classify", tmp_path / "rows.csv")
    assert len(rows) == len(normal_rows) > 41
    assert rows == normal_rows


def test_the_bundle_installs_and_classifies_with_no_network_interface(bundle, normal_rows, tmp_path):
    prefix = _unshare_prefix()
    if not prefix:
        pytest.skip("this machine refuses a network namespace (unshare -n and unshare -rn both fail); the --no-index "
                    "install test still shows that nothing is downloaded")
    venv = tmp_path / "venv"
    done = _install(bundle, venv, prefix)
    assert done.returncode == 0, done.stderr[-3000:]
    offline = subprocess.run(prefix + [sys.executable, "-c", "import socket; socket.create_connection(('pypi.org', 443), 3)"],
                             capture_output=True, text=True)
    assert offline.returncode != 0, "the namespace had a network after all"
    rows = _rows(venv / "bin" / "edge-classify", tmp_path / "rows.csv")
    assert rows == normal_rows


def test_a_damaged_bundle_is_refused_before_anything_is_installed(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle.folder, copy, copy_function=os.link)    # hard links: cheap, and the original stays whole
    wheel = next((copy / "wheels").glob("numpy-*.whl"))
    data = wheel.read_bytes()
    wheel.unlink()                                                  # a new file, not the shared inode
    wheel.write_bytes(data[:-100])                                  # a copy cut short
    done = subprocess.run(["sh", str(copy / "install.sh"), str(tmp_path / "venv")], capture_output=True, text=True,
                          env=_clean_env(), timeout=120)
    assert done.returncode != 0 and "damaged or missing" in done.stderr
    assert wheel.name in done.stderr
    assert not (tmp_path / "venv").exists()


def test_a_wheel_set_with_a_hole_is_caught(bundle, tmp_path):
    holed = tmp_path / "wheels"
    holed.mkdir()
    for w in (bundle.folder / "wheels").iterdir():
        if not w.name.startswith("numpy-"):
            os.link(w, holed / w.name)
    missing = ob.check_closure(holed, ob.DISTRIBUTION, ["fields"], bundle.target)
    assert any(m.startswith("numpy") for m in missing)


def test_edge_bundle_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "keep.jpg").write_bytes(b"x")
    done = cli("edge-bundle", mine, "--platform", "x86_64", "--overwrite")
    assert done.returncode == 2 and "not a bundle edge-bundle wrote" in done.stderr
    assert (mine / "keep.jpg").exists()


def test_the_device_targets_a_pi_by_default():
    target = ob.Target()
    assert (target.machine, target.python) == ("aarch64", "3.11")
    assert target.platform_tags()[0] == "manylinux2014_aarch64" and target.platform_tags()[-1] == "manylinux_2_36_aarch64"
    assert target.marker_environment()["python_version"] == "3.11"
    with pytest.raises(ob.BundleError):
        ob.Target("armv7l")
