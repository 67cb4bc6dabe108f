"""The layering rule and the install layout (device layer: these run without TensorFlow).

edge_runtime imports nothing of train, quantize or benchmarks and never TensorFlow; quantize and train import
nothing of each other (what both need lives in edge_runtime or malaria_edge.export); no module imports a command
line module; no job function in train/ or quantize/ runs past a screen; an install puts only malaria_edge into
site-packages; the training commands on a device install say which extra to install; every command says its
version."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, cli

FORBIDDEN = ("tensorflow", "keras", "malaria_edge.train", "malaria_edge.quantize", "malaria_edge.benchmarks")


def _imports(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield "." * node.level + (node.module or "")
            else:
                yield node.module or ""


def test_edge_runtime_imports_nothing_of_the_training_side():
    offenders = []
    for path in sorted((REPO / "edge_runtime").rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN) or name.startswith("..") or name.split(".")[0] in (
                    "train", "quantize", "benchmarks"):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


PACKAGE_FOLDERS = {"malaria_edge": "malaria_edge", "edge_runtime": "malaria_edge.edge_runtime",
                   "train": "malaria_edge.train", "quantize": "malaria_edge.quantize",
                   "benchmarks": "malaria_edge.benchmarks"}


def _absolute_imports(path):
    """The modules ``path`` imports, relative imports resolved against its package."""
    folder = path.relative_to(REPO).parts[0]
    package = PACKAGE_FOLDERS[folder].split(".") + list(path.relative_to(REPO / folder).parent.parts)
    for name in _imports(path):
        level = len(name) - len(name.lstrip("."))
        if level:
            base = package[:len(package) - level + 1]
            yield ".".join(base + ([name[level:]] if name[level:] else []))
        else:
            yield name


def _package_modules(*folders):
    for folder in folders or PACKAGE_FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder,forbidden", [("quantize", "malaria_edge.train"),
                                              ("train", "malaria_edge.quantize")])
def test_quantize_and_train_import_nothing_of_each_other(folder, forbidden):
    offenders = [f"{path.relative_to(REPO)}: {name}" for path in _package_modules(folder)
                 for name in _absolute_imports(path) if name == forbidden or name.startswith(forbidden + ".")]
    assert not offenders, offenders


def test_the_shared_bundle_writer_imports_neither_quantize_nor_train():
    offenders = [f"{path.relative_to(REPO)}: {name}" for path in sorted((REPO / "malaria_edge" / "export").rglob("*.py"))
                 for name in _absolute_imports(path)
                 if name.startswith(("malaria_edge.train", "malaria_edge.quantize", "malaria_edge.benchmarks"))]
    assert not offenders, offenders


def test_no_module_imports_a_command_line_module():
    """Command line modules are the top of the stack: library code lives elsewhere, so nothing imports them."""
    offenders = [f"{path.relative_to(REPO)}: {name}" for path in _package_modules()
                 for name in _absolute_imports(path) if name.split(".")[-1] == "cli"]
    assert not offenders, offenders


def test_no_function_in_train_or_quantize_runs_past_sixty_lines():
    long = []
    for path in _package_modules("train", "quantize"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


@pytest.mark.parametrize("command", ["edge-prepare", "edge-train", "edge-adapt", "edge-quantize"])
def test_every_training_side_command_says_its_version(command):
    from malaria_edge.edge_runtime.version import __version__
    done = cli(command, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{command} (malaria-edge) {__version__}"


def test_classifying_never_imports_tensorflow(samples, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from malaria_edge import Classifier
        from malaria_edge.edge_runtime.cli import main
        try:
            main([{str(samples)!r}, "-o", {str(tmp_path / "rows.csv")!r}])
        except SystemExit as stop:
            assert not stop.code, stop.code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        assert not loaded, loaded
        print("NO_TENSORFLOW_OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NO_TENSORFLOW_OK" in done.stdout
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == len(list(samples.rglob("*.webp"))) + 1


def test_install_puts_only_malaria_edge_in_site_packages():
    """What `pip install .` recorded (its RECORD file) lands under malaria_edge/ and its dist-info only."""
    import malaria_edge
    import malaria_edge.edge_runtime as runtime
    if "site-packages" not in Path(runtime.__file__).resolve().parts:
        pytest.skip("running from the source tree (editable install); make test-device checks a real pip install")
    site = Path(malaria_edge.__file__).resolve().parent.parent
    records = list(site.glob("malaria_edge-*.dist-info/RECORD"))
    assert len(records) == 1, records
    top = {line.split(",")[0].split("/")[0] for line in records[0].read_text().splitlines() if line}
    top = {name for name in top if name != ".."}  # console scripts live in bin/
    assert top == {"malaria_edge", records[0].parent.name}, top
    assert not any((site / name).exists() for name in ("train", "quantize", "benchmarks", "edge_runtime"))


@pytest.mark.parametrize("command,args", [("edge-train", ["--manifest", "m.csv", "--out", "run"]),
                                          ("edge-quantize", ["--model", "m.keras", "--manifest", "m.csv",
                                                             "--out", "bundle"])])
def test_training_commands_without_tensorflow_name_the_extra(tmp_path, command, args):
    """On a device install TensorFlow is absent; where it is installed, it is hidden from the import system."""
    for name in ("m.csv", "m.keras"):
        (tmp_path / name).write_text("x")
    module, func = {"edge-train": ("malaria_edge.train.cli", "train_main"),
                    "edge-quantize": ("malaria_edge.quantize.cli", "main")}[command]
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class HideTensorFlow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "keras"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
        sys.meta_path.insert(0, HideTensorFlow())
        from {module} import {func}
        {func}({args!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'malaria-edge[train]'" in lines[0], done.stderr
