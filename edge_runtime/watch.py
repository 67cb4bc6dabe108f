"""Watch a folder for new images and hand each over once it is complete: the library under ``edge-classify --watch``.

A camera program (or a person with a file manager, or rsync over the clinic's network) drops images into an inbox
folder, one subfolder per slide. This module turns that folder into an iterator of finished image files::

    stop = threading.Event()
    restore = install_stop_handlers(stop)          # SIGINT/SIGTERM set the event: the current image is finished
    try:
        for path in watch_images("/srv/malaria-edge/inbox", stop):
            ...classify path, write its rows...
    finally:
        restore()

The rules:

- every image file under the folder (subfolders too, at any depth) is yielded exactly once in the life of the
  iterator, keyed by its path; files already there at the start are yielded too (a caller that resumes skips those
  already in its output);
- a file is yielded only when complete: its size and mtime unchanged for ``settle_seconds`` as this process saw
  them, or at once when it was renamed into place (inotify's IN_MOVED_TO: a writer that writes ``x.part`` and
  renames it to ``x.jpg`` has finished);
- temporary names are never yielded: ``*.part``, ``*.tmp``, ``*.partial``, ``*.crdownload``, ``*.swp``, ``.~*``,
  ``~$*``, and every dotfile and dot-folder (rsync writes ``.name.XXXXXX`` and renames; a trash folder is
  ``.Trash-1000``); only names with an image suffix the runtime reads are considered;
- Linux: inotify through libc (ctypes; no new dependency), which wakes only on changes (and every
  ``stop_check_seconds`` to look at the stop event); elsewhere, or when inotify is unavailable or out of watches,
  polling: a stat of each folder every ``poll_seconds``, a folder listed again only when its mtime moved (or is
  recent, for file systems with coarse timestamps such as FAT), and a full scan every ``rescan_seconds``;
- the iterator ends within about ``stop_check_seconds`` (polling: at once) of ``stop_event`` being set; it raises
  :class:`WatchError` when the watched folder itself disappears.

Library code: no prints; ``log`` receives one line per notable event (backend chosen, fallback, queue overflow).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import os
import select
import signal
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from .errors import MalariaEdgeError
from .images import is_image_path

TEMPORARY_PATTERNS = ("*.part", "*.tmp", "*.partial", "*.crdownload", "*.swp", ".~*", "~$*", ".*")
DEFAULT_SETTLE_SECONDS = 2.0
DEFAULT_POLL_SECONDS = 1.0
DEFAULT_STOP_CHECK_SECONDS = 0.5
DEFAULT_RESCAN_SECONDS = 60.0
# A folder whose mtime is this recent is listed again on each poll: FAT and exFAT keep mtimes in 2 s steps, so a
# file created in the same step as the last listing would otherwise leave the mtime unchanged.
RECENT_FOLDER_SECONDS = 3.0
BACKENDS = ("auto", "inotify", "poll")

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]


class WatchError(MalariaEdgeError):
    """The watched folder is missing, not a folder, or disappeared while watched."""


def is_temporary_name(name: str) -> bool:
    """True for names a writer uses while a file is not finished (and for hidden files and folders)."""
    return any(fnmatch.fnmatchcase(name, p) for p in TEMPORARY_PATTERNS)


def is_candidate(name: str) -> bool:
    """True for a file name this watcher may yield: an image suffix the runtime reads, not a temporary name."""
    return not is_temporary_name(name) and is_image_path(name)


def install_stop_handlers(stop_event: threading.Event,
                          signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Callable[[], None]:
    """Make SIGINT and SIGTERM set ``stop_event`` (the image in hand is finished, rows are synced, the command
    exits 0); a second signal while stopping raises KeyboardInterrupt, for a user who cannot wait. Call from the main
    thread; returns a function that puts the previous handlers back."""
    previous = {}

    def handler(signum, frame):
        if stop_event.is_set():
            raise KeyboardInterrupt
        stop_event.set()

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore


# ----------------------------------------------------------------------------------------------------- settling

Signature = Tuple[int, int]  # (size, mtime_ns)


def _signature(path: str) -> Optional[Signature]:
    """(size, mtime_ns) of a regular file; None when it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns


class _Settler:
    """Files seen but not yet yielded, each with the signature last seen and when it last changed."""

    def __init__(self, settle_seconds: float):
        self.settle = settle_seconds
        self.pending: Dict[str, Tuple[Optional[Signature], float]] = {}
        self.done: Set[str] = set()

    def touch(self, path: str, now: float) -> None:
        """``path`` was created or changed (or just found): it must be quiet for ``settle`` from now."""
        if path not in self.done:
            self.pending[path] = (_signature(path), now)

    def forget(self, path: str) -> None:
        self.pending.pop(path, None)

    def forget_under(self, folder: str) -> None:
        prefix = folder.rstrip(os.sep) + os.sep
        for p in [p for p in self.pending if p.startswith(prefix)]:
            del self.pending[p]

    def complete(self, path: str) -> bool:
        """``path`` was renamed into place: complete now. True when it is to be yielded."""
        if path in self.done or _signature(path) is None:
            return False
        self.pending.pop(path, None)
        self.done.add(path)
        return True

    def ripe(self, now: float) -> List[str]:
        """The pending files quiet for ``settle`` seconds with an unchanged signature; they move to ``done``."""
        out = []
        for path, (sig, since) in list(self.pending.items()):
            if now - since < self.settle:
                continue
            current = _signature(path)
            if current is None:
                del self.pending[path]
            elif current != sig:
                self.pending[path] = (current, now)
            else:
                del self.pending[path]
                self.done.add(path)
                out.append(path)
        return sorted(out)

    def next_deadline(self) -> Optional[float]:
        return min((since + self.settle for _, since in self.pending.values()), default=None)


def _list(folder: str, excluded: Set[str]) -> Optional[Tuple[List[str], List[str]]]:
    """(subfolders, candidate files) directly in ``folder``, skipping dot-folders, excluded folders and symlinked
    folders (no loops); None when it vanished or cannot be read."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not is_temporary_name(entry.name) and entry.path not in excluded:
                            dirs.append(entry.path)
                    elif is_candidate(entry.name) and entry.is_file():
                        files.append(entry.path)
                except OSError:
                    continue
    except OSError:
        return None
    return sorted(dirs), sorted(files)


def _walk(folder: str, excluded: Set[str], before: Callable[[str], None] = lambda f: None
          ) -> Iterator[Tuple[str, List[str]]]:
    """(folder, candidate files) for ``folder`` and every subfolder; ``before(folder)`` runs before each listing
    (inotify adds its watch there, so a file created during the listing is not missed)."""
    stack = [folder]
    while stack:
        current = stack.pop()
        before(current)
        listed = _list(current, excluded)
        if listed is None:
            continue
        dirs, files = listed
        yield current, files
        stack.extend(reversed(dirs))


def _check_root(folder: PathLike) -> str:
    root = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(root):
        raise WatchError(f"{root}: no such folder to watch" if not os.path.exists(root)
                         else f"{root}: not a folder", exit_code=2)
    return root


# ------------------------------------------------------------------------------------------------------ polling

def _poll_images(root: str, stop_event: threading.Event, settler: _Settler, poll_seconds: float,
                 rescan_seconds: float, excluded: Set[str]) -> Iterator[str]:
    folders: Dict[str, int] = {}     # folder -> its mtime_ns when last listed
    known: Set[str] = set()          # candidate files already pending or done (a new listing must not reset them)

    def take(files: List[str], now: float) -> None:
        for path in files:
            if path not in known:
                known.add(path)
                settler.touch(path, now)

    def walk(start: str, now: float) -> None:
        for folder, files in _walk(start, excluded, before=lambda f: _remember(f)):
            take(files, now)

    def _remember(folder: str) -> None:
        try:
            folders[folder] = os.stat(folder).st_mtime_ns
        except OSError:
            pass

    last_full = float("-inf")
    while not stop_event.is_set():
        now = time.monotonic()
        if not os.path.isdir(root):
            raise WatchError(f"{root}: the watched folder disappeared")
        if now - last_full >= rescan_seconds:
            last_full = now
            folders.clear()
            walk(root, now)
        else:
            # A folder's mtime moves when a name in it is created, renamed or deleted: list only those folders
            # (and recent ones, for coarse timestamps), and walk only the subfolders not seen before.
            wall = time.time()
            for folder, mtime in list(folders.items()):
                try:
                    current = os.stat(folder).st_mtime_ns
                except OSError:
                    del folders[folder]
                    continue
                if current == mtime and wall - current / 1e9 >= RECENT_FOLDER_SECONDS:
                    continue
                folders[folder] = current
                listed = _list(folder, excluded)
                if listed is None:
                    continue
                dirs, files = listed
                take(files, now)
                for sub in dirs:
                    if sub not in folders:
                        walk(sub, now)
        known &= set(settler.pending) | settler.done
        for path in settler.ripe(time.monotonic()):
            yield path
            if stop_event.is_set():
                return
        stop_event.wait(poll_seconds)


# ------------------------------------------------------------------------------------------------------ inotify

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_DONT_FOLLOW, IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x02000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
_EVENT = struct.Struct("iIII")


class InotifyUnavailable(OSError):
    """No inotify here (not Linux, no libc symbol, or the system's limit on instances or watches is reached)."""


class _Inotify:
    """inotify through libc: one instance, one watch per folder."""

    def __init__(self):
        if not sys.platform.startswith("linux"):
            raise InotifyUnavailable("inotify is Linux-only")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        try:
            self._add = libc.inotify_add_watch
            self._rm = libc.inotify_rm_watch
            init = libc.inotify_init1
        except AttributeError:
            raise InotifyUnavailable("this libc has no inotify") from None
        self._add.argtypes, self._add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
        self._rm.argtypes, self._rm.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise InotifyUnavailable(e, f"inotify_init1: {os.strerror(e)}")
        self.fd = fd
        self.paths: Dict[int, str] = {}   # watch descriptor -> folder
        self.wds: Dict[str, int] = {}     # folder -> watch descriptor

    def add(self, folder: str) -> bool:
        """Watch ``folder``; False when it vanished or is not a folder. Raises InotifyUnavailable at the limit."""
        wd = self._add(self.fd, os.fsencode(folder), WATCH_MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if e == errno.ENOSPC:
                raise InotifyUnavailable(e, "the inotify watch limit is reached (fs.inotify.max_user_watches)")
            return False
        old = self.paths.get(wd)
        if old is not None and old != folder:
            self.wds.pop(old, None)
        self.paths[wd], self.wds[folder] = folder, wd
        return True

    def remove_under(self, folder: str) -> None:
        """Stop watching ``folder`` and its subfolders (moved away or deleted)."""
        prefix = folder.rstrip(os.sep) + os.sep
        for path in [p for p in self.wds if p == folder or p.startswith(prefix)]:
            wd = self.wds.pop(path)
            self.paths.pop(wd, None)
            self._rm(self.fd, wd)

    def read(self, timeout: float) -> List[Tuple[int, int, str]]:
        """Events as (wd, mask, name), waiting up to ``timeout`` seconds for the first."""
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - Python retries select itself (PEP 475)
            return []
        if not ready:
            return []
        events = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = os.fsdecode(data[offset:offset + length].rstrip(b"\0"))
                offset += length
                events.append((wd, mask, name))
            if len(data) < 32 * 1024:
                break
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _inotify_images(root: str, stop_event: threading.Event, settler: _Settler, stop_check_seconds: float,
                    excluded: Set[str], ino: _Inotify, log: Log) -> Iterator[str]:
    def adopt(folder: str, now: float) -> None:
        """Watch ``folder`` and everything under it, then take its files as pending (watch first: a file created
        between the listing and the watch would otherwise be missed)."""
        for current, files in _walk(folder, excluded, before=ino.add):
            for path in files:
                settler.touch(path, now)

    adopt(root, time.monotonic())
    while not stop_event.is_set():
        now = time.monotonic()
        deadline = settler.next_deadline()
        wait = stop_check_seconds if deadline is None else min(stop_check_seconds, max(0.0, deadline - now) + 0.01)
        events = ino.read(wait)
        now = time.monotonic()
        moved_in: List[str] = []
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                log("watch: inotify queue overflowed; scanning the whole folder again")
                adopt(root, now)
                continue
            folder = ino.paths.get(wd)
            if folder is None:
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED) and not name:
                if folder == root:
                    raise WatchError(f"{root}: the watched folder was removed or moved away")
                ino.remove_under(folder)
                settler.forget_under(folder)
                continue
            path = os.path.join(folder, name)
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    if not is_temporary_name(name) and path not in excluded:
                        adopt(path, now)
                elif mask & (IN_MOVED_FROM | IN_DELETE):
                    ino.remove_under(path)
                    settler.forget_under(path)
                continue
            if not is_candidate(name):
                continue
            if mask & (IN_DELETE | IN_MOVED_FROM):
                settler.forget(path)
            elif mask & IN_MOVED_TO:
                moved_in.append(path)
            else:  # IN_CREATE, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE: not finished until quiet
                settler.touch(path, now)
        for path in sorted(moved_in):
            if settler.complete(path):
                yield path
                if stop_event.is_set():
                    return
        for path in settler.ripe(time.monotonic()):
            yield path
            if stop_event.is_set():
                return


# --------------------------------------------------------------------------------------------------------- entry

def watch_images(folder: PathLike, stop_event: threading.Event, settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                 poll_seconds: float = DEFAULT_POLL_SECONDS, backend: str = "auto",
                 exclude: Iterable[PathLike] = (), stop_check_seconds: float = DEFAULT_STOP_CHECK_SECONDS,
                 rescan_seconds: float = DEFAULT_RESCAN_SECONDS, log: Log = lambda m: None) -> Iterator[Path]:
    """Yield each complete image file under ``folder`` once, existing ones first, until ``stop_event`` is set.

    ``settle_seconds``: how long a file's size and mtime must stay the same before it counts as complete (a file
    renamed into place is complete at once with inotify). ``poll_seconds``: the polling backend's period.
    ``backend``: ``auto`` (inotify on Linux, else polling), ``inotify`` or ``poll``. ``exclude``: folders under
    ``folder`` never to look into (e.g. where overlays or crops are written, so results are not fed back in).
    Paths are yielded as given (``folder`` joined with the relative path), not resolved."""
    if backend not in BACKENDS:
        raise ValueError(f"backend is one of {BACKENDS}, not {backend!r}")
    root = _check_root(folder)
    excluded = {os.path.abspath(os.fspath(p)) for p in exclude}
    settler = _Settler(settle_seconds)
    ino = None
    if backend in ("auto", "inotify"):
        try:
            ino = _Inotify()
        except InotifyUnavailable as exc:
            if backend == "inotify":
                raise
            log(f"watch: {exc}; polling every {poll_seconds:g} s instead")
    try:
        if ino is not None:
            try:
                log(f"watch: {root} with inotify (complete after {settle_seconds:g} s without change, or when "
                    "renamed into place)")
                for path in _inotify_images(root, stop_event, settler, stop_check_seconds, excluded, ino, log):
                    yield Path(path)
                return
            except InotifyUnavailable as exc:
                if backend == "inotify":
                    raise
                log(f"watch: {exc}; polling every {poll_seconds:g} s instead")
                ino.close()
                ino = None
        log(f"watch: {root} by polling every {poll_seconds:g} s (complete after {settle_seconds:g} s without change)")
        for path in _poll_images(root, stop_event, settler, poll_seconds, rescan_seconds, excluded):
            yield Path(path)
    finally:
        if ino is not None:
            ino.close()


def inotify_available() -> bool:
    """True when this machine gives this process an inotify instance."""
    try:
        _Inotify().close()
        return True
    except (InotifyUnavailable, OSError):
        return False
