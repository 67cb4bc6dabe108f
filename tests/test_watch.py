"""The watch folder as a camera program fills it: images written slowly in chunks, written as ``x.part`` and renamed,
copied in one go, in slide subfolders, some there before the watch starts. Each is handed over exactly once and
never while partial; temporary names never; the stop event ends the watch promptly. Both backends."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES
from malaria_edge.edge_runtime.watch import WatchError, inotify_available, is_candidate, watch_images

FIELDS = REPO / "edge_runtime" / "sample_fields"
SOURCES = sorted(SAMPLES.glob("*/*.webp")) + sorted(FIELDS.glob("*.jpg"))
POLL, SETTLE = 0.1, 1.5          # a slow writer pauses 0.25 s: longer than a poll, shorter than the settle time
BACKENDS = [pytest.param("inotify", marks=pytest.mark.skipif(not inotify_available(), reason="no inotify here")),
            "poll"]


def _write_slowly(source: Path, target: Path, reopen: bool) -> None:
    """In 4 chunks with pauses; either one open file, or opened and closed for each chunk (a close is no end)."""
    data = source.read_bytes()
    step = len(data) // 4 + 1
    fh = None if reopen else open(target, "wb")
    for i in range(0, len(data), step):
        if reopen:
            with open(target, "ab") as f:
                f.write(data[i:i + step])
        else:
            fh.write(data[i:i + step])
            fh.flush()
        time.sleep(0.25)
    if fh:
        fh.close()


def _write_then_rename(source: Path, target: Path) -> None:
    part = target.with_name(target.name + ".part")
    with open(part, "wb") as fh:
        data = source.read_bytes()
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(0.3)
        fh.write(data[len(data) // 2:])
    os.rename(part, target)


def _writer(inbox: Path, plan, done: threading.Event) -> None:
    threads = []
    for how, source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        if how == "copy":
            shutil.copyfile(source, target)
        elif how == "rename":
            _write_then_rename(source, target)
        else:  # slow writers run side by side, as several camera uploads would
            t = threading.Thread(target=_write_slowly, args=(source, target, how == "slow-reopen"))
            t.start()
            threads.append(t)
        time.sleep(0.05)
    # temporary names that must never come out: a .part never renamed, hidden files, an editor's lock file
    (inbox / "slide-x").mkdir(exist_ok=True)
    (inbox / "slide-x" / "left.jpg.part").write_bytes(SOURCES[0].read_bytes())
    (inbox / ".hidden.jpg").write_bytes(SOURCES[0].read_bytes())
    (inbox / ".~lock.field.jpg").write_bytes(b"lock")
    (inbox / ".sync").mkdir(exist_ok=True)
    (inbox / ".sync" / "cached.jpg").write_bytes(SOURCES[0].read_bytes())
    for t in threads:
        t.join()
    done.set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_image_comes_out_once_and_whole_while_a_camera_writes(tmp_path, backend):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert len(SOURCES) >= 30
    # Three already there (a resume), the rest dropped while watching, across slide subfolders.
    existing = SOURCES[:3]
    for src in existing:
        shutil.copyfile(src, inbox / src.name)
    ways = ["slow-open", "rename", "copy", "slow-reopen"]
    plan = []
    for i, src in enumerate(SOURCES[3:]):
        slide = inbox / f"slide-{i % 3}" / ("deeper" if i % 7 == 0 else "")
        plan.append((ways[i % len(ways)], src, slide / src.name))
    expected = {str(inbox / s.name): s for s in existing}
    expected.update({str(target): src for _, src, target in plan})

    stop, written = threading.Event(), threading.Event()
    seen, problems = [], []
    writer = threading.Thread(target=_writer, args=(inbox, plan, written), daemon=True)

    def consume():
        for path in watch_images(inbox, stop, settle_seconds=SETTLE, poll_seconds=POLL, backend=backend):
            key = str(path)
            seen.append(key)
            src = expected.get(key)
            if src is None:
                problems.append(f"unexpected {key}")
            elif path.read_bytes() != src.read_bytes():
                problems.append(f"{path.name} yielded before it was complete ({path.stat().st_size} of "
                                f"{src.stat().st_size} bytes)")
            if key == str(inbox / existing[0].name) and not writer.is_alive() and not written.is_set():
                writer.start()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    deadline = time.monotonic() + 60
    while not writer.is_alive() and not written.is_set():    # the writer starts once the watch is running
        assert time.monotonic() < deadline, "the files already there never came out"
        time.sleep(0.02)
    assert written.wait(60)
    while len(set(seen)) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(SETTLE + 3 * POLL)                             # room for a wrong extra yield to show up
    stopped = time.monotonic()
    stop.set()
    consumer.join(5)
    assert not consumer.is_alive()
    assert time.monotonic() - stopped < 2.0, "the stop event did not end the watch promptly"
    assert not problems, problems
    assert len(seen) == len(set(seen)), "an image came out twice"
    assert set(seen) == set(expected), (f"missing {sorted(set(expected) - set(seen))}, "
                                        f"extra {sorted(set(seen) - set(expected))}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_ends_an_idle_watch_within_two_seconds(tmp_path, backend):
    stop = threading.Event()
    out = []
    t = threading.Thread(target=lambda: out.extend(watch_images(tmp_path, stop, settle_seconds=5, poll_seconds=1,
                                                                backend=backend)))
    t.start()
    time.sleep(1.0)
    set_at = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - set_at < 2.0
    assert out == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_renamed_into_place_is_complete(tmp_path, backend):
    """inotify sees the rename and hands it over at once; polling waits for it to settle, which is still short."""
    stop = threading.Event()
    src = SOURCES[0]
    got = []

    def consume():
        for path in watch_images(tmp_path, stop, settle_seconds=30 if backend == "inotify" else 0.5,
                                 poll_seconds=0.1, backend=backend):
            got.append((path, path.read_bytes()))
            stop.set()

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    part = tmp_path / "x.webp.part"
    part.write_bytes(src.read_bytes())
    os.rename(part, tmp_path / "x.webp")
    t.join(10)
    stop.set()
    t.join(2)
    assert got == [(tmp_path / "x.webp", src.read_bytes())]


def test_a_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(WatchError) as err:
        next(watch_images(tmp_path / "nope", threading.Event()))
    assert err.value.exit_code == 2


@pytest.mark.parametrize("name, ok", [("a.jpg", True), ("a.JPG", True), ("a.webp", True), ("a.jpg.part", False),
                                      ("a.tmp", False), (".a.jpg", False), (".~lock.a.jpg#", False),
                                      ("~$a.jpg", False), ("notes.txt", False), ("a.jpg.crdownload", False)])
def test_temporary_and_other_names_are_never_candidates(name, ok):
    assert is_candidate(name) is ok
