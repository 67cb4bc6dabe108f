"""Where edge-classify's inputs come from and where its rows go, so that nothing is lost and nothing is mixed.

A field run may be interrupted (dead battery, Ctrl-C, kill -9) and resumed, may be pointed at the wrong file, and may
be started twice on the same output. This module owns every rule that keeps the output trustworthy:

- inputs: files, folders and globs, de-duplicated by resolved path, symlink loops never followed, unreadable folders
  reported;
- outputs: which files may be written (never an input, never twice the same file, never an existing file without
  ``--overwrite``), one run at a time on an output (a lock file naming the holder);
- resume: only onto a file this tool wrote (our CSV header or our JSONL keys), only with the settings that made its
  rows (a ``.settings.json`` beside it), a torn last record dropped, done images keyed by resolved path;
- durability: every row is flushed (kill -9 loses nothing), and fsynced in groups (power loss loses a bounded tail).
"""
from __future__ import annotations

import csv
import errno
import fcntl
import glob
import io
import json
import os
import re
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .errors import EXIT_FAILED, EXIT_USAGE, MalariaEdgeError
from .images import is_image_path, plugin_hint, safe_file_name
from .labels import CLASSES

CELL_COLUMNS = ["path", "cell", "x", "y", "w", "h", "at_edge", "prediction", "prob_parasitized", "latency_ms",
               "true_label", "unfamiliar", "warnings", "error"]
# The cell columns before ``at_edge`` (cells cut by the image edge, shown for review) was added: an output written
# with them is recognised, so --resume says why it cannot continue it instead of calling it foreign.
EARLIER_CELL_COLUMNS = [c for c in CELL_COLUMNS if c != "at_edge"]
REFERENCE_COLUMNS = ["ref_prediction", "ref_prob_parasitized", "ref_latency_ms"]
GROUP_COLUMNS = ["group", "call", "cells", "parasitized", "review", "failed", "unfamiliar", "parasitized_fraction", "fraction_low",
                "fraction_high", "true_status", "reason"]

# Group commit: rows are flushed one by one (a killed process loses nothing: the kernel has them) and fsynced when
# this many rows are waiting or when a row is written this long after the last fsync, and always at the end and on
# Ctrl-C / SIGTERM. Only a power cut can lose rows that were flushed but not yet fsynced; see README for the numbers.
FSYNC_EVERY_ROWS = 100
FSYNC_EVERY_SECONDS = 1.0

# The settings that decide what a row says; a resume with any of them different would mix two runs in one file.
SETTINGS_THAT_DECIDE_A_ROW = ("model_sha256", "threshold", "min_confidence", "format", "input_kind",
                              "compare_sha256")

# Labels files are small (one short line per image); this refuses a runaway field instead of csv's cryptic error.
LABELS_MAX_FIELD = 4096

TEXT_OPTIONS = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


class OutputError(MalariaEdgeError):
    """A problem with the outputs or inputs that stops the run before any row is written; ``exit_code`` is the exit
    status (2, the default: the command line must change; 1: try again later, e.g. another run holds the output)."""

    exit_code = EXIT_USAGE


# ---------------------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """The images to classify, in order, each once; what was wrong with the arguments; duplicates dropped."""
    images: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    duplicates: int = 0
    resolved: Dict[str, str] = field(default_factory=dict, repr=False)
    folders: List[str] = field(default_factory=list)

    def output_names(self) -> Dict[str, str]:
        """Each image's name for the files made from it (overlay, crops): its path relative to the folder that
        holds every input, one name per path (``s1/field1.jpg`` -> ``s1__field1.jpg``), safe on Windows
        (:func:`safe_file_name`). Two fields called ``field1`` in two slides, or ``field1.jpg`` and
        ``field1.png``, never share a name; a name that still repeats (``a__b.jpg`` beside ``a/b.jpg``) gets
        ``~2``. Made from every input found, so a --resume gives each image the name the first run gave it."""
        absolute = [os.path.abspath(p) for p in self.images]
        try:
            root = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
        except ValueError:  # Windows: inputs on two drives
            root = ""
        names: Dict[str, str] = {}
        taken: Set[str] = set()
        for path, full in zip(self.images, absolute):
            rel = os.path.relpath(full, root) if root else full.lstrip("/\\")
            name = safe_file_name(rel.replace(os.sep, "__").replace("/", "__"))
            unique, n = name, 1
            while unique in taken:
                n += 1
                unique = f"{name}~{n}"
            taken.add(unique)
            names[path] = unique
        return names

    def real(self, path: str) -> str:
        """The resolved path of ``path``, from the de-duplication's own realpath call when it made one (resolving
        is a system call per folder level: twice for thousands of cells is measurable)."""
        hit = self.resolved.get(path)
        return os.path.realpath(path) if hit is None else hit


def _walk(root: str, problems: List[str]) -> Iterable[Tuple[str, List[str]]]:
    """(folder, file names) for every folder under ``root``, sorted. Symlinked folders are followed once each (a
    clinic may link a memory card's folder in) but a folder already visited, by any route, is never entered again,
    so a symlink loop cannot multiply files or recurse forever. A folder that cannot be read is a problem."""
    visited: Set[str] = set()

    def report(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot read folder ({exc.strerror}); its images were not classified")

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=report):
        real = os.path.realpath(folder)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in visited)
        yield folder, sorted(files)


def _glob_regex(pattern: str) -> "re.Pattern":
    """A glob pattern (``*``, ``?``, ``[...]``, ``**`` for any number of folders) as a regex over '/'-paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append(r"(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _glob_root(pattern: str) -> Tuple[str, int]:
    """The folder a glob starts from (its parts before the first wildcard) and how many parts that is."""
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "."), fixed


def _recursive_glob(pattern: str, problems: List[str]) -> List[str]:
    """``**`` globs by walking the tree once (loops never followed) instead of glob's unbounded recursion."""
    parts = pattern.split("/")
    root, fixed = _glob_root(pattern)
    regex = _glob_regex("/".join(parts[fixed:]))
    matches = []
    for folder, files in _walk(root, problems):
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            if regex.match(rel) and not name.startswith("."):
                matches.append(os.path.join(folder, name) if root != "." or pattern.startswith("./")
                               else rel)
    return sorted(matches)


def _folder_images(folder: str, problems: List[str]) -> List[str]:
    """The images under ``folder``; a phone format Pillow cannot read here (HEIC without pillow-heif) is named in
    ``problems`` with what to install, never skipped silently."""
    found = []
    for parent, files in _walk(folder, problems):
        for name in files:
            path = os.path.join(parent, name)
            if is_image_path(name):
                found.append(path)
            elif plugin_hint(name) and not name.startswith("."):
                problems.append(f"skipped {path}: {plugin_hint(name)}")
    return found


def expand_inputs(paths: Sequence[str]) -> Inputs:
    """Files, folders (recursive, sorted) and globs -> :class:`Inputs`. The same image reached twice (a folder and
    a glob, a relative and an absolute path, a symlink) is classified once: it would otherwise count twice in a
    patient's call."""
    result = Inputs()
    seen: Set[str] = set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real in seen:
            result.duplicates += 1
            return
        seen.add(real)
        result.images.append(path)
        result.resolved[path] = real

    for item in paths:
        if os.path.lexists(item):
            matches = [item]
        elif glob.has_magic(item):
            matches = _recursive_glob(item, result.problems) if "**" in item else sorted(glob.glob(item))
            if "**" in item:
                result.folders.append(os.path.realpath(_glob_root(item)[0]))
        else:
            matches = []
        if not matches:
            result.problems.append(f"{item}: no such file, folder or glob match")
        for match in matches:
            if os.path.isdir(match):
                result.folders.append(os.path.realpath(match))
                found = _folder_images(match, result.problems)
                if not found:
                    result.problems.append(f"{match}: folder holds no images (png, jpg, webp, tif, bmp, gif)")
                for path in found:
                    add(path)
            elif os.path.exists(match):
                add(match)
            else:
                result.problems.append(f"{match}: broken link or vanished file")
    return result


# ---------------------------------------------------------------------------------------------------------- labels

class Labels:
    """True labels from a ``path,label`` CSV. A row matches an image by its path as written (or resolved); the file
    name alone is used only when that name appears once in the labels file, so ``s2/cell_1.webp`` never takes the
    label of ``s1/cell_1.webp``."""

    def __init__(self, by_path: Dict[str, str], by_name: Dict[str, Optional[str]]):
        self.by_path, self.by_name = by_path, by_name

    def __len__(self) -> int:
        return len(self.by_path)

    def get(self, path: str) -> Optional[str]:
        hit = self.by_path.get(path) or self.by_path.get(os.path.realpath(path))
        return hit or self.by_name.get(os.path.basename(path))

    @classmethod
    def read(cls, path: Path) -> "Labels":
        """Read a labels CSV (Excel's UTF-8 BOM accepted); anything malformed is an :class:`OutputError`."""
        if path.is_dir():
            raise OutputError(f"{path}: --labels is a folder; pass a CSV file with columns path,label")
        by_path: Dict[str, str] = {}
        by_name: Dict[str, Optional[str]] = {}
        old_limit = csv.field_size_limit(LABELS_MAX_FIELD)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh)
                header = [h.strip().lower() for h in next(reader, [])]
                if "path" not in header or "label" not in header:
                    raise OutputError(f"{path}: --labels needs a CSV with a header naming columns path,label")
                ip, il = header.index("path"), header.index("label")
                for row in reader:
                    if not row:
                        continue
                    if len(row) <= max(ip, il):
                        raise OutputError(f"{path}: --labels line {reader.line_num} has {len(row)} field(s), "
                                          f"expected {len(header)}; fix that line")
                    label = row[il].strip().lower()
                    if label not in CLASSES:
                        continue
                    by_path[row[ip]] = label
                    by_path.setdefault(os.path.realpath(row[ip]), label)
                    name = os.path.basename(row[ip])
                    by_name[name] = label if name not in by_name else None
        except UnicodeDecodeError:
            raise OutputError(f"{path}: --labels is not UTF-8 text; save it as CSV UTF-8") from None
        except csv.Error as exc:
            raise OutputError(f"{path}: --labels is not a readable CSV ({exc}); fix or re-export it") from None
        except OSError as exc:
            raise OutputError(f"{path}: cannot read --labels ({exc.strerror})") from None
        finally:
            csv.field_size_limit(old_limit)
        return cls(by_path, by_name)


# ---------------------------------------------------------------------------------------------------------- outputs

def side_file(output: Path, suffix: str) -> Path:
    """``rows.csv`` -> ``rows.csv.settings.json`` / ``rows.csv.lock``."""
    return output.with_name(output.name + suffix)


def is_regular_target(path: Path) -> bool:
    """True for an ordinary file (existing or to be created); False for /dev/null, /dev/stdout, pipes, ttys."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _real(path: Path) -> str:
    return os.path.realpath(path)


def check_outputs(targets: Dict[str, Optional[Path]], inputs: Iterable[str], resume: bool, overwrite: bool,
                  own_side_files: Iterable[str] = (), real: Optional[Callable[[str], str]] = None) -> None:
    """Refuse, before any work, an output that is a folder, sits in a missing folder, is also an input or another
    output, or exists without ``--overwrite`` (``--output`` may also be continued with ``--resume``; the summary and
    groups files recorded with it may be replaced by that resume). ``real``: how to resolve an input's path
    (default ``os.path.realpath``; :meth:`Inputs.real` reuses what the de-duplication resolved)."""
    seen: Dict[str, str] = {}
    input_reals = {(real or os.path.realpath)(p) for p in inputs}
    own = set(own_side_files)
    for option, path in targets.items():
        if path is None:
            continue
        if path.is_dir():
            raise OutputError(f"{option} {path} is a folder; give a file name inside it")
        if not path.parent.is_dir():
            raise OutputError(f"{option} {path}: folder {path.parent} does not exist; create it first")
        if not is_regular_target(path):
            continue
        real = _real(path)
        if real in seen:
            raise OutputError(f"{option} and {seen[real]} are the same file ({path}); give each its own file")
        seen[real] = option
        if real in input_reals:
            raise OutputError(f"{option} {path} is one of the inputs; write results to a new file")
        exists = path.exists() and path.stat().st_size > 0
        if not exists or overwrite:
            continue
        if option == "--output" and resume:
            continue
        if resume and real in own:
            continue
        raise OutputError(f"{option} {path} exists; pass --overwrite to replace it"
                          + (" or --resume to continue it" if option == "--output" else "")
                          + ", or choose a new file")


def check_side_folders(folders: Dict[str, Optional[Path]], input_folders: Iterable[str]) -> None:
    """Refuse an ``--overlays`` or ``--save-crops`` folder inside (or equal to) a folder the inputs are read from:
    the next run, or a --resume, would read its pictures back as cells and fields (581 cells became 1,621)."""
    for option, folder in folders.items():
        if folder is None:
            continue
        real = _real(folder)
        for source in input_folders:
            if real == source or real.startswith(source.rstrip(os.sep) + os.sep):
                raise OutputError(f"{option} {folder} is inside the input folder {source}: the next run would read "
                                  "its pictures back as inputs; choose a folder outside it")


def check_side_files(option: str, folder: Optional[Path], names: Iterable[str], pattern: str) -> None:
    """Refuse, before any work, to replace a file already in an ``--overlays`` or ``--save-crops`` folder that
    this run would write. ``pattern``: a regex that one image's file names match, its group ``name`` the image's
    name (:meth:`Inputs.output_names`). The caller skips this with --overwrite, or with --resume (the files are
    then this output's own, and the field cut short is redrawn)."""
    if folder is None or not folder.is_dir():
        return
    regex = re.compile(pattern)
    present: Dict[str, str] = {}
    for entry in os.listdir(folder):
        match = regex.fullmatch(entry)
        if match:
            present.setdefault(match.group("name"), entry)
    clash = next((present[n] for n in names if n in present), None)
    if clash:
        raise OutputError(f"{option} {folder} already holds {clash}; pass --overwrite to replace its files, or "
                          "choose an empty folder")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that a reader sees the old or the new content, never half (power cut included)."""
    if not is_regular_target(path):
        with open(path, "w", **TEXT_OPTIONS) as fh:
            fh.write(text)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", **TEXT_OPTIONS) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive, non-blocking lock on an output and its side files, held through ``<output>.lock``.

    The lock file holds the holder's pid, host and start time so a second run can say who has the output. flock is
    released by the kernel when the holder dies (kill -9 included), so a stale lock file never blocks a resume."""

    def __init__(self, output: Path):
        self.path = side_file(output, ".lock")
        self.fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.path.with_suffix('')} is in use by {holder}; wait for that run to "
                                      "finish or write to another file", exit_code=EXIT_FAILED) from None
                raise OutputError(f"cannot lock {self.path}: {exc.strerror}", exit_code=EXIT_FAILED) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its previous holder removed while we waited for it
                break
            os.close(fd)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------------------- resume

def run_settings(model_sha256: str, threshold: float, min_confidence: Optional[float], fmt: str,
                 compare_sha256: Optional[str], input_kind: str = "cell", side_files: Iterable[str] = ()) -> Dict:
    """What is recorded beside an output: the settings that decide a row, plus what a resume needs to find its
    way (the folder relative paths were written from, the summary/groups files written with it)."""
    return {"tool": "edge-classify", "model_sha256": model_sha256, "threshold": threshold,
            "min_confidence": min_confidence, "format": fmt, "input_kind": input_kind,
            "compare_sha256": compare_sha256, "cwd": os.getcwd(), "side_files": sorted(side_files)}


def settings_differences(recorded: Dict, current: Dict) -> List[str]:
    """One phrase per setting that differs, e.g. ``threshold 0.5 then, 0.3 now``."""
    names = {"model_sha256": "model (SHA-256)", "compare_sha256": "--compare model (SHA-256)",
             "min_confidence": "--min-confidence", "format": "--format", "threshold": "threshold",
             "input_kind": "input kind"}
    out = []
    for key in SETTINGS_THAT_DECIDE_A_ROW:
        then, now = recorded.get(key), current.get(key)
        if then != now:
            if key.endswith("sha256"):
                then = then[:12] + "..." if then else "none"
                now = now[:12] + "..." if now else "none"
            out.append(f"{names[key]} {then} then, {now} now")
    return out


def _csv_records(text: str) -> Tuple[List[List[str]], List[int], int]:
    """Parse CSV text record by record (a quoted path may hold newlines: a record is not a line); return the
    complete records, the character offset where each one starts, and where the last complete one ends. The last
    record is complete only when it ends with a newline outside quotes (a power cut can tear a row anywhere, even
    inside a quoted path that holds a newline)."""
    lines = re.findall(r"[^\n]*\n|[^\n]+\Z", text)
    consumed = [0]

    def feed():
        for line in lines:
            consumed[0] += len(line)
            yield line

    reader = csv.reader(feed(), strict=True)
    records: List[List[str]] = []
    starts: List[int] = []
    end = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:
            break  # an unterminated quote at the end of the text: a torn last record
        if text[consumed[0] - 1:consumed[0]] != "\n":
            break
        records.append(record)
        starts.append(end)
        end = consumed[0]
    return records, starts, end


def _complete_csv_records(text: str) -> Tuple[List[List[str]], int]:
    """:func:`_csv_records` without the start offsets."""
    records, _, end = _csv_records(text)
    return records, end


def read_own_output(path: Path, fmt: str) -> Tuple[List[Dict], int, List[str]]:
    """Rows of an output this tool wrote, the byte length of its complete records, and its columns.

    Raises :class:`OutputError` when the file is not recognisably ours (first CSV line is not our header, first JSONL
    record has not our keys) or is damaged other than by a torn last record."""
    data = path.read_bytes()
    text = data.decode("utf-8", "surrogateescape")
    not_ours = OutputError(f"{path} is not an edge-classify {fmt.upper()} output (its first "
                           f"{'line is not our header' if fmt == 'csv' else 'record has not our keys'}); "
                           "refusing to resume onto it: use a new --output")
    ours = (CELL_COLUMNS, CELL_COLUMNS + REFERENCE_COLUMNS)
    earlier_columns = (EARLIER_CELL_COLUMNS, EARLIER_CELL_COLUMNS + REFERENCE_COLUMNS)
    earlier = OutputError(f"{path} was written by an earlier malaria-edge (its rows have no at_edge column); "
                          "--resume cannot add rows of this version to it: use a new --output")
    if fmt == "csv":
        records, end = _complete_csv_records(text)
        if records and records[0] in earlier_columns:
            raise earlier
        if not records or records[0] not in ours:
            raise not_ours
        columns = records[0]
        rows = []
        for number, record in enumerate(records[1:], start=2):
            if len(record) != len(columns):
                raise OutputError(f"{path}: record {number} has {len(record)} columns, not {len(columns)}; the file "
                                  "was changed by hand: use a new --output")
            rows.append(dict(zip(columns, record)))
    else:
        rows, end, columns = [], 0, []
        for number, line in enumerate(re.findall(r"[^\n]*\n|[^\n]+\Z", text), start=1):
            if not line.endswith("\n"):
                break  # torn last line
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if number == 1:
                if isinstance(row, dict) and sorted(row) in (sorted(f) for f in earlier_columns):
                    raise earlier
                if not isinstance(row, dict) or sorted(row) not in (sorted(f) for f in ours):
                    raise not_ours
                columns = list(row)
            elif not isinstance(row, dict) or sorted(row) != sorted(columns):
                raise OutputError(f"{path}: line {number} is not one of our rows; the file was changed by hand: "
                                  "use a new --output")
            rows.append(row)
            end += len(line)
        if not columns:
            raise not_ours
    for row in rows:
        for key in ("prob_parasitized", "latency_ms", "ref_prob_parasitized", "ref_latency_ms"):
            if row.get(key) not in (None, ""):
                row[key] = float(row[key])
    return rows, len(text[:end].encode("utf-8", "surrogateescape")), columns


def prepare_resume(output: Path, fmt: str, settings: Dict) -> Tuple[List[Dict], Set[str]]:
    """Check that ``output`` may be continued with ``settings``; drop a torn last record; return its rows and the
    resolved paths of the images they cover. Nothing is changed unless every check passes."""
    if not output.exists() or output.stat().st_size == 0:
        return [], set()
    record = side_file(output, ".settings.json")
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{record}: unreadable settings record ({exc}); use a new --output or --overwrite") \
            from None
    differences = settings_differences(recorded, settings) if isinstance(recorded, dict) else []
    if differences:
        raise OutputError(f"{output} was written with other settings ({'; '.join(differences)}); resuming would "
                          "mix two runs in one file: rerun with the same settings, or use a new --output")
    rows, complete_bytes, _ = read_own_output(output, fmt)
    if not isinstance(recorded, dict):
        raise OutputError(f"{output} has no settings record ({record.name}) beside it, so its rows cannot be "
                          "trusted to match this run; use a new --output or --overwrite")
    if complete_bytes < output.stat().st_size:
        with open(output, "r+b") as fh:
            fh.truncate(complete_bytes)
            os.fsync(fh.fileno())
    base = recorded.get("cwd") or os.getcwd()
    rows = [r for r in rows if not r.get("error")]     # images that failed are tried again
    done = {os.path.realpath(os.path.join(base, r["path"])) for r in rows}
    return rows, done


def drop_last_field(path: Path, fmt: str) -> Optional[str]:
    """Resume on fields: a field is done only when all its rows are written, and only the last image of the file
    can be cut short, so when that image is a field (its rows have a cell index) its rows are removed and the
    field is classified again. Returns the path of the field dropped, if any.

    Only the tail is cut, in place: ``os.truncate`` at the first byte of that field's rows, then fsync. The file is
    never rewritten, so a kill or a power cut at any moment leaves every earlier row where it was. CSV records are
    parsed with the csv module (a path may hold a newline), JSONL by line."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    rows, starts = _rows_with_starts(text, fmt)
    if not rows or rows[-1].get("cell") in (None, ""):
        return None
    last = rows[-1].get("path")
    keep = len(rows)
    while keep > 0 and rows[keep - 1].get("path") == last:
        keep -= 1
    offset = len(text.encode("utf-8", "surrogateescape")) - len(text[starts[keep]:].encode("utf-8",
                                                                                            "surrogateescape"))
    os.truncate(path, offset)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return last


def _rows_with_starts(text: str, fmt: str) -> Tuple[List[Dict], List[int]]:
    """The complete rows of an output (CSV by its header, or JSONL) and the character offset where each starts;
    a line that does not parse ends the rows."""
    if fmt == "csv":
        records, starts, _ = _csv_records(text)
        if not records:
            return [], []
        return [dict(zip(records[0], r)) for r in records[1:]], starts[1:]
    rows: List[Dict] = []
    starts: List[int] = []
    offset = 0
    for line in re.findall(r"[^\n]*\n", text):
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
        starts.append(offset)
        offset += len(line)
    return rows, starts


def recorded_side_files(output: Optional[Path]) -> List[str]:
    """The summary/groups files a previous run on ``output`` wrote (a resume may replace them)."""
    if output is None:
        return []
    try:
        return list(json.loads(side_file(output, ".settings.json").read_text(encoding="utf-8"))
                    .get("side_files", []))
    except (OSError, ValueError, AttributeError):
        return []


# ---------------------------------------------------------------------------------------------------------- writer

class RowWriter:
    """Write rows as CSV or JSONL to a file or stdout. Each row is flushed (a killed process loses nothing) and
    rows are fsynced in groups (:data:`FSYNC_EVERY_ROWS` / :data:`FSYNC_EVERY_SECONDS`) and on close. Devices
    and pipes (/dev/null, /dev/stdout, ``| head``) are written but never fsynced. File names that are not UTF-8
    are written byte for byte (surrogateescape), so a resume matches them."""

    def __init__(self, path: Optional[Path], fmt: str, columns: List[str], append: bool,
                 every_rows: int = FSYNC_EVERY_ROWS, every_seconds: float = FSYNC_EVERY_SECONDS):
        self.fmt, self.columns = fmt, columns
        self.every_rows, self.every_seconds = every_rows, every_seconds
        self.pending, self.last_sync = 0, time.monotonic()
        if path is None:
            if hasattr(sys.stdout, "reconfigure"):
                sys.stdout.reconfigure(errors="surrogateescape")
            self.fh, self.owned, self.syncable = sys.stdout, False, False
            new = True
        else:
            self.syncable = is_regular_target(path)
            new = not (append and path.exists() and path.stat().st_size > 0)
            self.fh = open(path, "a" if append else "w", **TEXT_OPTIONS)
            self.owned = True
        self.csv = csv.writer(self.fh) if fmt == "csv" else None
        if self.csv and new:
            self.csv.writerow(columns)
            self.fh.flush()

    def write(self, row: Dict) -> None:
        if self.csv:
            self.csv.writerow(["" if row.get(k) is None else row.get(k) for k in self.columns])
        else:
            self.fh.write(json.dumps({k: row.get(k) for k in self.columns}) + "\n")
        self.fh.flush()
        self.pending += 1
        if self.pending >= self.every_rows or time.monotonic() - self.last_sync >= self.every_seconds:
            self.sync()

    def sync(self) -> None:
        """Make every written row durable now."""
        self.fh.flush()
        if self.syncable and self.pending:
            os.fsync(self.fh.fileno())
        self.pending, self.last_sync = 0, time.monotonic()

    def close(self) -> None:
        """Fsync what is written and close the file; safe to call twice."""
        if self.fh is None:
            return
        try:
            self.sync()
        except OSError:
            pass
        if self.owned:
            self.fh.close()
        self.fh = None


def write_rows(path: Path, fmt: str, columns: List[str], rows: Iterable[Dict]) -> None:
    """A whole small table (the per-group rows) written at once, atomically."""
    buffer = io.StringIO(newline="")
    table = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore") if fmt == "csv" else None
    if table:
        table.writeheader()
    for row in rows:
        if table:
            table.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        else:
            buffer.write(json.dumps({k: row.get(k) for k in columns}) + "\n")
    atomic_write_text(path, buffer.getvalue())
