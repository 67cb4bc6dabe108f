#!/usr/bin/env python3
"""The README's demo output, checked against a fresh run of the demo.

`make demo` runs this script with ``--run``, so the demo's commands live here, once: the Makefile, the README's
pasted block and the check all follow this list.

    python scripts/check_readme_demo.py --run     # the demo itself (what `make demo` does after installing)
    python scripts/check_readme_demo.py --print   # run it and print the block to paste into README.md
    python scripts/check_readme_demo.py           # run it and compare with README.md; exit 1 with a diff if stale

The commands are the ``edge-*`` executables beside this Python (the current virtual environment), run from the
repository root. What is compared are the lines that matter: cell and image counts, calls, parasitemia, accuracy,
agreement with the full model, every group row. Timing numbers (latency ms, the speed ratio) are masked, runs of
spaces collapsed, and the other lines (the model line with its path and backend, the "no call" explanation, the
interpreter's INFO chatter) may be trimmed or reworded in README freely; with ``--strict`` they may be left out but not changed.

The README's block is the first fenced block after the line ``<!-- demo-output -->``. In it, lines starting with
``$`` name the command whose output follows, and a line ending in ``[...]`` is a prefix of a longer line.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- demo-output -->"

# The demo: (label, edge-classify arguments). {out} is where result files go: the repository root for `make demo`,
# a throwaway folder for the check. Inputs are relative to the repository root, as a user types them.
DEMO = [
    ("the 41 sample cells against the full model, per patient",
     ["edge_runtime/samples", "--compare", "--group-by", "patient", "--output", "{out}samples_results.csv",
      "--overwrite", "--summary-json", "{out}samples_summary.json"]),
    ("the three sample whole fields, every red cell found and classified",
     ["edge_runtime/sample_fields", "--group-by", "folder", "--output", "{out}fields_results.csv", "--overwrite",
      "--overlays", "{out}demo_overlays"]),
]

# Interpreter and TensorFlow chatter: never part of the demo's story.
NOISE = re.compile(r"^(INFO: |WARNING: All log messages before absl|I0000 |W0000 |E0000 )")
# Lines whose content is the result: counts, calls, accuracy, agreement, group rows.
MATTERS = [
    re.compile(r"\b\d+ cells: \d+ parasitized"),
    re.compile(r"^\s*images: \d+ found"),
    re.compile(r"^\s*kinds: "),
    re.compile(r"^\s*field \S.*: \d+ cells"),
    re.compile(r"against the full model: agreement"),
    re.compile(r"infected patients called positive"),
    re.compile(r"^\s*WARNING: \d+(\.\d+)?% of cells look unlike"),
    re.compile(r"^\s*slide \S.*: .*\d+ cells"),
]
GROUP_HEADER = re.compile(r"^group\s+call\s+cells")
LONG = 118  # a line that does not matter and is longer than this is printed as a prefix ending in " [...]"
ELIDED = " [...]"


def tool(name: str) -> str:
    """The executable of this environment (beside sys.executable), else the first on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found beside {sys.executable} or on PATH: install the package first (make install)")
    return found


def commands(out: str) -> list[tuple[str, list[str]]]:
    prefix = "" if out in ("", ".") else out.rstrip("/") + "/"
    return [(label, [a.replace("{out}", prefix) for a in args]) for label, args in DEMO]


def display_args(args: list[str]) -> str:
    """The command as the README shows it: outputs in the current folder."""
    return " ".join(a.replace("{out}", "") for a in args)


def run_demo(out: str, capture: bool) -> tuple[int, str]:
    """Run every demo command from the repository root; return the worst exit status and, if captured, the display
    form of stderr (a ``$`` line per command, then its output)."""
    worst, text = 0, []
    for (label, args), (_, shown) in zip(commands(out), DEMO):
        line = f"$ edge-classify {display_args(shown)}"
        if not capture:
            print(f"# {label}\n{line}", file=sys.stderr, flush=True)
        proc = subprocess.run([tool("edge-classify"), *args], cwd=ROOT, text=True,
                              stderr=subprocess.PIPE if capture else None,
                              stdout=subprocess.DEVNULL if capture else None)
        worst = max(worst, proc.returncode)
        if capture:
            text.extend([""] if text else [])
            text.append(line)
            text.extend(proc.stderr.splitlines())
    return worst, "\n".join(text)


def relative_models(line: str) -> str:
    """A model's absolute path (editable checkout or site-packages) as the repository-relative one."""
    return re.sub(r"(?:[^\s:]*/)?(?:malaria_edge/)?edge_runtime/models/", "edge_runtime/models/", line)


def is_row(line: str) -> bool:
    """A group row of the summary table: it starts with the group's name (summary notes are indented)."""
    return bool(line.strip()) and not line[0].isspace() and not line.startswith("$ ")


def matters(line: str, in_table: bool) -> bool:
    return in_table or bool(GROUP_HEADER.search(line)) or any(p.search(line) for p in MATTERS)


def display(raw: str) -> list[str]:
    """The block to paste: noise dropped, model paths relative, long lines that do not matter cut to a prefix."""
    lines, in_table = [], False
    for line in raw.splitlines():
        line = relative_models(line.rstrip())
        if NOISE.match(line):
            continue
        in_table = bool(GROUP_HEADER.search(line)) or (in_table and is_row(line))
        if len(line) > LONG and not line.startswith("$ ") and not matters(line, in_table):
            line = line[:LONG].rsplit(" ", 1)[0] + ELIDED
        lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def normal(line: str) -> str:
    """What is compared: timings masked, spaces collapsed."""
    line = relative_models(line)
    line = re.sub(r"\d+(\.\d+)? ms\b", "<ms>", line)
    line = re.sub(r"(speed ratio \([^)]*\)) [\d.]+x", r"\1 <x>", line)
    line = re.sub(r"\bon \S+ \d[\w.]*, threads=", "on <backend>, threads=", line)
    return " ".join(line.split())


def kept(lines: list[str], strict: bool) -> list[str]:
    """The lines a comparison looks at: the commands and the lines that matter (every line with --strict)."""
    result, in_table = [], False
    for line in lines:
        if GROUP_HEADER.search(line):
            in_table = True
        elif not is_row(line):
            in_table = False
        if line.startswith("$ ") or strict and line.strip() or matters(line, in_table):
            result.append(normal(line))
    return result


def readme_block(path: Path = README) -> list[str]:
    text = path.read_text(encoding="utf-8").splitlines()
    try:
        start = text.index(MARKER)
    except ValueError:
        sys.exit(f"{path.name}: no line {MARKER!r} before the demo's output block")
    fence = next(i for i in range(start + 1, len(text)) if text[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(text)) if text[i].startswith("```"))
    return text[fence + 1:end]


def compare(pasted: list[str], fresh: list[str], strict: bool) -> list[str]:
    """A unified diff of what the README shows against the fresh run, over the compared lines; empty when equal.

    The fresh lines that matter (and the ``$`` lines) must all be pasted, in order. With ``strict``, every other
    pasted line must also be a fresh line, in order (README may leave lines out, not change them). A pasted line
    ending in [...] matches a fresh line it is a prefix of."""
    every = kept(fresh, strict=True)
    key = kept(fresh, strict=False)
    theirs = []
    for line in kept(pasted, strict):
        if line.endswith("[...]"):
            stem = line[: -len("[...]")].rstrip()
            line = next((f for f in every if f.startswith(stem)), line)
        theirs.append(line)
    # Walk the fresh lines: the ones that matter are expected; another is expected where README shows it next.
    ours, want, k = [], 0, 0
    for line in every:
        if k < len(key) and line == key[k]:
            ours.append(line)
            k += 1
            if want < len(theirs) and theirs[want] == line:
                want += 1
        elif strict and want < len(theirs) and theirs[want] == line:
            ours.append(line)
            want += 1
    if theirs == ours:
        return []
    return list(difflib.unified_diff(theirs, ours, "README.md (pasted)", "make demo (fresh)", lineterm="", n=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the demo with its output on the terminal")
    mode.add_argument("--print", dest="print_block", action="store_true", help="print the block to paste")
    parser.add_argument("--out", default=".",
                        help="folder for the demo's result files with --run (default: the repository root)")
    parser.add_argument("--strict", action="store_true", help="compare every line, not only the lines that matter")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run:
        os.makedirs(args.out, exist_ok=True)
        return run_demo(args.out, capture=False)[0]
    with tempfile.TemporaryDirectory(prefix="readme-demo-") as tmp:
        status, raw = run_demo(os.path.join(tmp, ""), capture=True)
    fresh = display(raw)
    if status != 0:
        print("\n".join(fresh), file=sys.stderr)
        print(f"the demo failed (exit {status})", file=sys.stderr)
        return 1
    if args.print_block:
        print("\n".join(fresh))
        return 0
    diff = compare(readme_block(args.readme), fresh, args.strict)
    if diff:
        print("README.md's demo output differs from a fresh run (lines that matter; timings masked):",
              file=sys.stderr)
        print("\n".join(diff), file=sys.stderr)
        print("regenerate it: python scripts/check_readme_demo.py --print, and paste it under "
              f"{MARKER} in README.md", file=sys.stderr)
        return 1
    print("README.md's demo output matches a fresh run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
