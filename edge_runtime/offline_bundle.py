"""``edge-bundle OUT``: everything a field device needs to install malaria-edge with no network, in one folder.

A field device (a Raspberry Pi in a clinic) has no internet. This command, run once on a machine that has, writes::

    OUT/
      wheels/          our wheel (the default model bundle and the sample images ship inside it) and the wheel of
                       every dependency, [fields] extra included, for the device's CPU, Python and glibc
      install.sh       ./install.sh [DIR]: checks SHA256SUMS, makes a venv (default OUT/venv), installs from
                       wheels/ only (pip --no-index), classifies the bundled samples as a self-check
      README.txt       the three commands, and what the bundle was made for
      bundle.json      the same, for a program: target, versions, each wheel's SHA-256, the model's SHA-256
      malaria-edge-watch.service   an example systemd unit (watch an inbox folder, from boot)
      SHA256SUMS       of every other file; install.sh checks it before anything else
    OUT.tar.gz         the same folder, one file to copy

Named ``offline_bundle`` because ``bundle`` is the model bundle (a .tflite and its card).

The wheels come from PyPI (``--index-url``) through ``pip download --isolated --only-binary=:all: --platform ...
--python-version ... --implementation cp``: isolated, so this machine's pip configuration (a local find-links, a
constraints file, a mirror) never shapes what a device gets. pip evaluates environment markers (``python_version <
"3.11"``) for the machine it runs on, not for ``--python-version``; so pip runs here with the target's marker
values, and the bundle is then checked to be closed: every requirement of every wheel, evaluated for the target,
has a wheel in ``wheels/``.

This module imports no TensorFlow and no interpreter: it only shells out to pip (and git, when present).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click

from .bundle import sha256_file
from .console import Console, common_options
from .errors import EXIT_USAGE, MalariaEdgeError
from .version import __version__

DISTRIBUTION = "malaria-edge"
PYPI = "https://pypi.org/simple"
MACHINES = ("aarch64", "x86_64")
PYTHONS = ("3.9", "3.10", "3.11", "3.12")
# 64-bit Raspberry Pi OS bookworm: aarch64, Python 3.11, glibc 2.36.
DEFAULT_MACHINE, DEFAULT_PYTHON, DEFAULT_GLIBC = "aarch64", "3.11", "2.36"
DEFAULT_EXTRAS = ("fields",)
OLDEST_MANYLINUX_MINOR = 17  # manylinux2014 == manylinux_2_17: the oldest tag the wheels we need still ship
BUNDLE_MARKER = "bundle.json"

Log = Callable[[str], None]


class BundleError(MalariaEdgeError):
    """The bundle cannot be made: no wheel for the target, no network to PyPI, no source to build our wheel."""


# ---------------------------------------------------------------------------------------------------------- target

@dataclass(frozen=True)
class Target:
    """The device: its CPU, its Python (major.minor) and its glibc (major.minor, ``ldd --version`` on it)."""
    machine: str = DEFAULT_MACHINE
    python: str = DEFAULT_PYTHON
    glibc: str = DEFAULT_GLIBC

    def __post_init__(self):
        if self.machine not in MACHINES:
            raise BundleError(f"--platform {self.machine}: one of {', '.join(MACHINES)} (32-bit ARM, armv7l, has no "
                              "wheels of numpy, pillow, opencv or a TFLite interpreter for Python 3.11 on PyPI; see "
                              "docs/field_device.md)", exit_code=EXIT_USAGE)
        if not re.fullmatch(r"3\.\d+", self.python):
            raise BundleError(f"--python {self.python}: give major.minor, e.g. 3.11", exit_code=EXIT_USAGE)
        if not re.fullmatch(r"2\.\d+", self.glibc) or int(self.glibc.split(".")[1]) < OLDEST_MANYLINUX_MINOR:
            raise BundleError(f"--glibc {self.glibc}: give major.minor, 2.{OLDEST_MANYLINUX_MINOR} or newer "
                              "(bookworm 2.36, bullseye 2.31)", exit_code=EXIT_USAGE)

    def platform_tags(self) -> List[str]:
        """Every manylinux tag a pip on the device accepts, oldest first."""
        minor = int(self.glibc.split(".")[1])
        return [f"manylinux2014_{self.machine}"] + [f"manylinux_2_{n}_{self.machine}"
                                                     for n in range(OLDEST_MANYLINUX_MINOR, minor + 1)]

    def marker_environment(self) -> Dict[str, str]:
        """PEP 508 marker values of the device (the ones a requirement of ours or our dependencies can test)."""
        return {"python_version": self.python, "python_full_version": f"{self.python}.0",
                "platform_machine": self.machine, "platform_system": "Linux", "sys_platform": "linux",
                "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "implementation_version": f"{self.python}.0"}

    @property
    def label(self) -> str:
        return f"linux {self.machine}, CPython {self.python}, glibc >= {self.glibc}"


# ------------------------------------------------------------------------------------------------------ our wheel

def source_root() -> Optional[Path]:
    """The source checkout the running package was installed from (an editable install), or None (a wheel)."""
    here = Path(__file__).resolve().parent          # edge_runtime/ in a checkout, .../malaria_edge/edge_runtime in a wheel
    root = here.parent
    setup_cfg = root / "setup.cfg"
    try:
        text = setup_cfg.read_text(encoding="utf-8")
    except OSError:
        return None
    if re.search(rf"^name\s*=\s*{re.escape(DISTRIBUTION)}\s*$", text, re.M) and (root / "edge_runtime").is_dir():
        return root
    return None


# Package data that is built, not tracked: the phone page's npm runtime (`make webapp`), so a Pi installed from the
# bundle can serve the page (edge-serve).
BUILT_PACKAGE_DATA = ("edge_runtime/webapp/vendor",)


def _source_files(root: Path) -> List[str]:
    """The files a wheel is built from: what git knows (tracked, or untracked and not ignored) plus the built
    package data (BUILT_PACKAGE_DATA), so nothing of a developer's venvs, runs or build folders leaks in; without
    git, the tree minus the usual generated folders."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        known = [n for n in out.decode("utf-8", "surrogateescape").split("\0") if n and (root / n).is_file()]
        built = [p.relative_to(root).as_posix() for folder in BUILT_PACKAGE_DATA
                 for p in sorted((root / folder).rglob("*")) if p.is_file()]
        return known + [n for n in built if n not in set(known)]
    except (OSError, subprocess.CalledProcessError):
        skip = re.compile(r"(^|/)(\.git|\.venv[^/]*|venv|build|dist|runs|__pycache__|\.pytest_cache|[^/]*\.egg-info)(/|$)")
        names = []
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            dirs[:] = [d for d in dirs if not skip.search(os.path.normpath(os.path.join(rel, d)))]
            names += [os.path.normpath(os.path.join(rel, f)) for f in files]
        return sorted(names)


def build_own_wheel(root: Path, dest: Path, log: Log = lambda m: None) -> Path:
    """Build our wheel from the source checkout ``root`` into ``dest`` (a copy of its files is built, so the
    checkout gets no build/ or egg-info)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-bundle-src-") as tmp:
        src = Path(tmp) / "src"
        for name in _source_files(root):
            target = src / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target)
        base = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "wheel", "-q", "--no-deps",
                "-w", str(dest)]
        # Without build isolation when this Python has the build backend (fast, and no network); else pip fetches it.
        try:
            import setuptools  # noqa: F401
            import wheel  # noqa: F401
            attempts = [base + ["--no-build-isolation", "--no-index", str(src)], base + [str(src)]]
        except ImportError:
            attempts = [base + [str(src)]]
        log(f"building our wheel from {root}")
        for command in attempts:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise BundleError(f"building our wheel failed: {_tail(done)}")
    wheels = sorted(dest.glob("malaria_edge-*.whl"))
    if not wheels:
        raise BundleError(f"pip wheel wrote no malaria_edge wheel into {dest}")
    return wheels[-1]


@dataclass
class OwnWheel:
    path: Path
    version: str
    models: List[str]            # the model bundle's files inside the wheel
    model_sha256: str            # of the default int8 .tflite
    samples: int                 # sample images inside the wheel (the self-check classifies them)


def inspect_own_wheel(path: Path) -> OwnWheel:
    """Check that ``path`` is our wheel and carries the default model bundle (tflite + card) and the samples."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            meta = [n for n in names if n.endswith(".dist-info/METADATA")]
            if not meta:
                raise BundleError(f"{path}: not a wheel (no METADATA)", exit_code=EXIT_USAGE)
            info = Parser().parsestr(z.read(meta[0]).decode("utf-8"))
            if _canonical(info["Name"]) != _canonical(DISTRIBUTION):
                raise BundleError(f"{path}: a wheel of {info['Name']}, not {DISTRIBUTION}", exit_code=EXIT_USAGE)
            models = sorted(n for n in names if "/edge_runtime/models/" in n)
            default = "malaria_edge/edge_runtime/models/malaria_int8.tflite"
            card = default[:-len("_int8.tflite")] + ".json"
            if default not in names or card not in names:
                raise BundleError(f"{path} lacks the default model bundle ({default} and its card); it cannot "
                                  "classify after an offline install", exit_code=EXIT_USAGE)
            sha = hashlib.sha256(z.read(default)).hexdigest()
            samples = sum(1 for n in names if "/edge_runtime/sample" in n and n.endswith((".webp", ".jpg", ".png")))
    except zipfile.BadZipFile:
        raise BundleError(f"{path}: not a wheel (not a zip file)", exit_code=EXIT_USAGE) from None
    return OwnWheel(path, info["Version"], models, sha, samples)


# -------------------------------------------------------------------------------------------------- dependencies

# pip tests environment markers against the Python it runs on, whatever --python-version says (a requirement like
# `backports.strenum; python_version < "3.11"` would be missed for a 3.9 device). So pip runs with the marker
# values of the device; check_closure() then proves the result independently, should a pip release change this.
_PIP_FOR_TARGET = """
import json, sys
from pip._vendor.packaging import markers
_here = markers.default_environment
_device = json.loads(sys.argv[1])
markers.default_environment = lambda: {**_here(), **_device}
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def default_cert() -> Optional[str]:
    """The CA bundle a user pointed pip or Python at (a network that inspects TLS has its CA there); pip --isolated
    would not read it from the environment itself."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and os.path.isfile(value):
            return value
    return None


def download_wheels(requirements: Sequence[str], target: Target, dest: Path, index_url: str = PYPI,
                    cert: Optional[str] = None, log: Log = lambda m: None) -> None:
    """``pip download`` the wheels of ``requirements`` and all they need, for ``target``, into ``dest``."""
    command = [sys.executable, "-c", _PIP_FOR_TARGET, json.dumps(target.marker_environment()),
               "download", "--isolated", "--disable-pip-version-check", "--quiet",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", target.python,
               "--index-url", index_url, "--retries", "3", "--timeout", "60", "-d", str(dest)]
    for tag in target.platform_tags():
        command += ["--platform", tag]
    if cert:
        command += ["--cert", cert]
    log(f"downloading wheels for {target.label} from {index_url}")
    done = subprocess.run(command + list(requirements), capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"pip download for {target.label} failed: {_tail(done)}")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    """packaging's requirements/markers/versions: the installed one, else the copy every pip carries."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - depends on the build machine
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def wheel_metadata(path: Path) -> Tuple[str, str, List[str]]:
    """(name, version, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        info = Parser().parsestr(z.read(meta).decode("utf-8"))
    return info["Name"], info["Version"], info.get_all("Requires-Dist") or []


def check_closure(wheel_dir: Path, root: str, extras: Sequence[str], target: Target) -> List[str]:
    """Every requirement reachable from ``root[extras]``, its markers evaluated for ``target``, that no wheel in
    ``wheel_dir`` satisfies (empty: pip on the device will resolve with --no-index)."""
    Requirement, Version = _packaging()
    found: Dict[str, Tuple[str, Path, List[str]]] = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        name, version, requires = wheel_metadata(path)
        found[_canonical(name)] = (version, path, requires)
    env = target.marker_environment()
    missing, seen = [], set()
    queue = [(_canonical(root), tuple(extras))]
    while queue:
        name, wanted_extras = queue.pop()
        if (name, wanted_extras) in seen:
            continue
        seen.add((name, wanted_extras))
        for line in found[name][2]:
            req = Requirement(line)
            applies = (not req.marker or req.marker.evaluate({**env, "extra": ""})
                       or any(req.marker.evaluate({**env, "extra": e}) for e in wanted_extras))
            if not applies:
                continue
            dep = _canonical(req.name)
            if dep not in found or not req.specifier.contains(Version(found[dep][0]), prereleases=True):
                missing.append(f"{line} (needed by {name})")
                continue
            queue.append((dep, tuple(sorted(req.extras))))
    return sorted(set(missing))


# ---------------------------------------------------------------------------------------------------- the bundle

@dataclass
class BundleResult:
    folder: Path
    archive: Path
    target: Target
    own: OwnWheel
    wheels: List[str] = field(default_factory=list)
    folder_bytes: int = 0
    archive_bytes: int = 0
    seconds: float = 0.0


def _tail(done: subprocess.CompletedProcess, lines: int = 4) -> str:
    text = (done.stderr or "") + (done.stdout or "")
    kept = [l for l in text.strip().splitlines() if l.strip() and "[notice]" not in l]
    return " | ".join(kept[-lines:]) or f"exit status {done.returncode}"


def _is_our_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / BUNDLE_MARKER).read_text(encoding="utf-8")).get("tool") == "edge-bundle"
    except (OSError, ValueError, AttributeError):
        return False


def build_bundle(out: Path, target: Target = Target(), wheel: Optional[Path] = None, index_url: str = PYPI,
                 cert: Optional[str] = None, extras: Sequence[str] = DEFAULT_EXTRAS, overwrite: bool = False,
                 log: Log = lambda m: None) -> BundleResult:
    """Write the offline install bundle ``out/`` and ``out.tar.gz`` for ``target``; see the module docstring.

    ``wheel``: our wheel, when the running package is not a source checkout. Built in a temporary folder beside
    ``out`` and moved into place at the end, so an interrupted run leaves no half bundle under ``out``."""
    started = time.monotonic()
    out = Path(out).absolute()
    archive = out.with_name(out.name + ".tar.gz")
    _check_bundle_targets(out, archive, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        wheels_dir = work / "wheels"
        wheels_dir.mkdir()
        own_path = _own_wheel(wheel, wheels_dir, log)
        own = inspect_own_wheel(own_path)
        log(f"our wheel {own_path.name}: model bundle inside ({', '.join(Path(m).name for m in own.models)}), "
            f"{own.samples} sample images")
        spec = f"{own_path}[{','.join(extras)}]" if extras else str(own_path)
        download_wheels([spec], target, wheels_dir, index_url, cert, log)
        missing = check_closure(wheels_dir, DISTRIBUTION, extras, target)
        if missing:
            raise BundleError(f"the wheels for {target.label} are incomplete (pip on the device would fail): "
                              + "; ".join(missing))
        wheels = sorted(p.name for p in wheels_dir.glob("*.whl"))
        _write_bundle_files(work, own_path, own, wheels, target, index_url, extras, out.name)
        log(f"writing {archive.name}")
        _move_into_place(work, out, archive)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        Path(str(work) + ".tar.gz").unlink(missing_ok=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BundleResult(out, archive, target, own, wheels, size, archive.stat().st_size, time.monotonic() - started)


def _check_bundle_targets(out: Path, archive: Path, overwrite: bool) -> None:
    """Refuse to replace a folder or archive without --overwrite, and a folder edge-bundle did not write at all."""
    for path in (out, archive):
        if path.exists() and not overwrite:
            raise BundleError(f"{path} exists; pass --overwrite to replace it, or choose another OUT",
                              exit_code=EXIT_USAGE)
    if out.exists() and not _is_our_bundle(out):
        raise BundleError(f"{out} exists and is not a bundle edge-bundle wrote; refusing to replace it",
                          exit_code=EXIT_USAGE)


def _own_wheel(wheel: Optional[Path], wheels_dir: Path, log: Log) -> Path:
    """Our wheel in ``wheels_dir``: the one given, or built from the source checkout this package runs from."""
    if wheel is not None:
        own_path = wheels_dir / Path(wheel).name
        shutil.copy2(wheel, own_path)
        return own_path
    root = source_root()
    if root is None:
        raise BundleError("this malaria-edge is installed from a wheel, not a source checkout, so edge-bundle "
                          "cannot build our wheel: pass --wheel FILE (the malaria_edge-*.whl you installed "
                          "from, or `pip wheel --no-deps -w dist .` in a checkout)", exit_code=EXIT_USAGE)
    return build_own_wheel(root, wheels_dir, log)


def _write_bundle_files(work: Path, own_path: Path, own, wheels: List[str], target: Target, index_url: str,
                        extras: Sequence[str], name: str) -> None:
    """bundle.json, install.sh, README.txt, the service unit and SHA256SUMS beside the wheels; modes a device
    user can read."""
    wheels_dir = work / "wheels"
    install_spec = f"{DISTRIBUTION}[{','.join(extras)}]=={own.version}" if extras else \
        f"{DISTRIBUTION}=={own.version}"
    meta = {"tool": "edge-bundle", "bundle_version": 1, "malaria_edge": own.version,
            "made_with": __version__, "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": {"machine": target.machine, "python": target.python, "glibc": target.glibc,
                       "platform_tags": target.platform_tags()},
            "install": install_spec, "index_url": index_url, "extras": list(extras),
            "model": {"files": [Path(m).name for m in own.models], "default_int8_sha256": own.model_sha256},
            "wheels": {w: sha256_file(wheels_dir / w) for w in wheels}}
    (work / BUNDLE_MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    install = work / "install.sh"
    install.write_text(INSTALL_SH.replace("@SPEC@", install_spec).replace("@PYTHON@", target.python)
                       .replace("@MACHINE@", target.machine).replace("@GLIBC@", target.glibc)
                       .replace("@VERSION@", own.version), encoding="utf-8")
    (work / "README.txt").write_text(README_TXT.format(version=own.version, label=target.label, name=name,
                                                       spec=install_spec, n=len(wheels),
                                                       wheels="\n".join(f"  {w}" for w in wheels)),
                                     encoding="utf-8")
    unit = _service_unit(own_path)
    if unit is not None:
        (work / SERVICE_UNIT).write_bytes(unit)
    files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    (work / "SHA256SUMS").write_text("".join(f"{sha256_file(work / f)}  {f}\n" for f in files), encoding="utf-8")
    for path in work.rglob("*"):
        if path.is_file():
            path.chmod(0o755 if path == install else 0o644)
    work.chmod(0o755)
    wheels_dir.chmod(0o755)


def _move_into_place(work: Path, out: Path, archive: Path) -> None:
    """The archive of the finished folder, then both renamed over ``out`` and ``out.tar.gz``."""
    tmp_archive = work.with_name(work.name + ".tar.gz")
    _write_archive(work, tmp_archive, out.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    os.replace(tmp_archive, archive)


SERVICE_UNIT = "malaria-edge-watch.service"


def _service_unit(wheel: Path) -> Optional[bytes]:
    """The example systemd unit: from our wheel when it ships it, else from the running package (a checkout)."""
    with zipfile.ZipFile(wheel) as z:
        name = f"malaria_edge/edge_runtime/service/{SERVICE_UNIT}"
        if name in z.namelist():
            return z.read(name)
    local = Path(__file__).resolve().parent / "service" / SERVICE_UNIT
    return local.read_bytes() if local.is_file() else None


def _write_archive(folder: Path, archive: Path, top: str) -> None:
    """``folder`` as ``top/...`` in a gzip tar: sorted, owner-neutral (root:root), so it unpacks for any user."""
    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(folder, arcname=top, recursive=False, filter=neutral)
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=f"{top}/{path.relative_to(folder).as_posix()}", recursive=False, filter=neutral)


INSTALL_SH = r"""#!/bin/sh
# Install malaria-edge @VERSION@ from this folder with no network, then classify the bundled samples once.
#   ./install.sh [DIR]     DIR: where the venv goes (default: venv/ beside this script)
#   PYTHON=python3.11 ./install.sh    another Python than python3
# Made for linux @MACHINE@, CPython @PYTHON@, glibc >= @GLIBC@ (64-bit Raspberry Pi OS bookworm: aarch64, 3.11, 2.36).
set -eu
# python -I everywhere: neither the current folder nor PYTHON* variables may put other code in front of the venv's.
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${1:-"$HERE/venv"}
PYTHON=${PYTHON:-python3}
SPEC='@SPEC@'
say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

say "checking the bundle's files against SHA256SUMS"
(cd "$HERE" && sha256sum --quiet --strict -c SHA256SUMS >&2) \
    || die "a file of the bundle is damaged or missing (named above); copy the bundle again"

command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON here; this bundle needs CPython @PYTHON@"
found=$("$PYTHON" -I -c 'import platform, struct, sys; print("%d.%d %s %d" % (sys.version_info[0], sys.version_info[1], platform.machine(), struct.calcsize("P") * 8))')
py=${found%% *}; rest=${found#* }; machine=${rest%% *}; bits=${rest#* }
[ "$bits" = 64 ] || die "$PYTHON is a $bits-bit Python ($machine): this bundle is for 64-bit @MACHINE@ (on a Pi: 64-bit Raspberry Pi OS)"
[ "$machine" = @MACHINE@ ] || die "this machine is $machine; the bundle is for @MACHINE@ (make one with edge-bundle --platform $machine)"
[ "$py" = @PYTHON@ ] || die "$PYTHON is Python $py; the bundle is for Python @PYTHON@ (set PYTHON=python@PYTHON@, or make one with edge-bundle --python $py)"

if [ ! -x "$DIR/bin/python" ]; then
    say "creating a venv in $DIR"
    "$PYTHON" -I -m venv "$DIR" || die "cannot create a venv (Debian: the python3-venv package; Raspberry Pi OS has it)"
fi
say "installing $SPEC from $HERE/wheels (no network)"
"$DIR/bin/python" -I -m pip install --isolated --disable-pip-version-check --no-index --find-links "$HERE/wheels" "$SPEC" \
    || die "pip could not install from the bundle (see above)"

say "self-check: classifying the sample cells and one sample field that ship with the package"
PKG=$("$DIR/bin/python" -I -c 'import os, malaria_edge.edge_runtime as e; print(os.path.dirname(e.__file__))')
CHECK=$(mktemp -d)
trap 'rm -rf "$CHECK"' EXIT
"$DIR/bin/edge-classify" "$PKG/samples" --threads 1 -o "$CHECK/cells.csv" \
    || die "the self-check on the sample cells failed (see above)"
"$DIR/bin/edge-classify" "$PKG/sample_fields/nih_field_sparse.jpg" --threads 1 -o "$CHECK/field.csv" \
    || die "the self-check on a sample field failed (see above)"
"$DIR/bin/python" -I - "$CHECK/cells.csv" "$CHECK/field.csv" <<'PY'
import csv, sys
from malaria_edge.edge_runtime.version import __version__
cells = [r for r in csv.DictReader(open(sys.argv[1], newline="")) if not r["error"]]
agree = sum(r["prediction"] == r["true_label"] for r in cells)
field = [r for r in csv.DictReader(open(sys.argv[2], newline="")) if not r["error"]]
print(f"install.sh: self-check: {agree} of {len(cells)} sample cells called as labelled; "
      f"{len(field)} cells found in the sample field, {sum(r['prediction'] == 'parasitized' for r in field)} "
      f"parasitized", file=sys.stderr)
print(f"install.sh: OK: malaria-edge {__version__} installed in {sys.prefix}", file=sys.stderr)
PY
say "run it:  $DIR/bin/edge-classify IMAGES... --output results.csv"
"""

README_TXT = """malaria-edge {version}: offline install bundle for {label}

On the device, with no network:
  tar xzf {name}.tar.gz        (or copy the folder {name}/ as it is)
  cd {name} && ./install.sh     (makes venv/ here; ./install.sh DIR puts it elsewhere)
  venv/bin/edge-classify IMAGES... --output results.csv

install.sh checks SHA256SUMS, creates the venv, runs
  pip install --no-index --find-links wheels '{spec}'
and classifies the bundled sample cells and one sample field as a self-check.
The default model (int8 TFLite + card) and the sample images are inside the malaria_edge wheel.
bundle.json says what this was made for and each wheel's SHA-256.
malaria-edge-watch.service: an example systemd unit that classifies what lands in an inbox folder
(docs/field_device.md in the source, "Run it on a Raspberry Pi").

{n} wheels:
{wheels}
"""


# ------------------------------------------------------------------------------------------------------- command

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--platform", "machine", type=click.Choice(MACHINES), default=DEFAULT_MACHINE, show_default=True,
              help="The device's CPU: aarch64 for 64-bit Raspberry Pi OS (Pi 3/4/5, Zero 2 W), x86_64 for a PC.")
@click.option("--python", "python", type=click.Choice(PYTHONS), default=DEFAULT_PYTHON, show_default=True,
              help="The device's Python (bookworm: 3.11, bullseye: 3.9).")
@click.option("--glibc", default=DEFAULT_GLIBC, show_default=True,
              help="The device's glibc, `ldd --version` on it (bookworm: 2.36, bullseye: 2.31).")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Our wheel (malaria_edge-*.whl), when this install is not a source checkout to build it from.")
@click.option("--index-url", default=PYPI, show_default=True, help="Where pip downloads the dependencies' wheels.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False),
              help="CA bundle for the index (default: $PIP_CERT, $SSL_CERT_FILE or $REQUESTS_CA_BUNDLE if set).")
@click.option("--overwrite", is_flag=True, help="Replace an OUT (and OUT.tar.gz) that edge-bundle wrote before.")
@common_options
def main(out, machine, python, glibc, wheel, index_url, cert, overwrite, verbosity):
    """Write OUT/ and OUT.tar.gz: everything a device needs to install malaria-edge with no network.

    \b
    Examples:
      edge-bundle pi-bundle                            # 64-bit Raspberry Pi OS bookworm (aarch64, Python 3.11)
      edge-bundle pc-bundle --platform x86_64 --python 3.12
      edge-bundle pi-bundle --wheel dist/malaria_edge-0.2.0-py3-none-any.whl
    \b
    On the device:  tar xzf pi-bundle.tar.gz && pi-bundle/install.sh
    """
    console = Console("edge-bundle", verbosity)
    try:
        target = Target(machine, python, glibc)
        result = build_bundle(out, target, wheel=wheel, index_url=index_url, cert=cert or default_cert(),
                              overwrite=overwrite, log=console.detail)
    except MalariaEdgeError as err:
        console.error(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console.error("interrupted; nothing was written under OUT")
        sys.exit(130)
    mb = 1024 * 1024
    console.info(f"bundle for {result.target.label}: malaria-edge {result.own.version} + {len(result.wheels) - 1} "
                 f"dependency wheels ([{','.join(DEFAULT_EXTRAS)}] included), default model inside the wheel")
    console.info(f"  {result.folder}/  {result.folder_bytes / mb:.1f} MB")
    console.info(f"  {result.archive}  {result.archive_bytes / mb:.1f} MB  ({result.seconds:.0f} s)")
    console.info(f"  on the device: tar xzf {result.archive.name} && {result.folder.name}/install.sh")


if __name__ == "__main__":  # pragma: no cover
    main()
