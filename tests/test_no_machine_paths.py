"""Nothing we commit names a folder of the machine it was made on: reports, configs and docs name files relative to
the project (or to the throwaway root of the Pi check), so a reader's checkout works and no host leaks."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Home and work folders of development machines (Linux, macOS, Windows), and this project's own checkout.
MACHINE_PATH = re.compile(r"(?<![\w.<>$/-])(/work/|/home/\w|/root/|/Users/\w|[A-Za-z]:\\Users\\)")
BINARY_SUFFIXES = {".tflite", ".keras", ".png", ".jpg", ".jpeg", ".webp", ".npz", ".gz"}


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    for name in names.decode().split("\0"):
        path = ROOT / name
        if name and path.suffix.lower() not in BINARY_SUFFIXES and path.is_file() and path != Path(__file__).resolve():
            yield name, path


def test_no_tracked_file_holds_a_development_machine_path():
    found = []
    for name, path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "absolute paths of a development machine in tracked files:\n" + "\n".join(found)


@pytest.mark.parametrize("line", ["/work/main/runs/manifest.csv", "see /home/alice/x", "C:\\Users\\bob\\m.json",
                                  '"file": "/root/.cache/x"'])
def test_the_path_check_catches_machine_paths(line):
    assert MACHINE_PATH.search(line)


@pytest.mark.parametrize("line", ["runs/data/manifest.csv", "<root>/opt/pi-check/venvs", "HOME=/root LANG=C",
                                  "$HOME/.cache/malaria-edge/pi-root", "../shared/data/fields"])
def test_the_path_check_leaves_relative_paths_alone(line):
    assert not MACHINE_PATH.search(line)
