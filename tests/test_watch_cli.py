"""``edge-classify --watch`` as a field device runs it: a camera drops images into slide subfolders (some written
slowly in chunks, some as ``x.part`` renamed, some copied in one go) while the command runs; SIGTERM stops it with
exit 0; kill -9 and a restart with the same command lose nothing and repeat nothing. Every check is against a
one-shot ``edge-classify`` of the same files: the same rows (predictions, boxes, probabilities), each once."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import BIN, REPO, SAMPLES, cli
from test_watch import _writer

FIELDS = REPO / "edge_runtime" / "sample_fields"
IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax" / "images"
SOURCES = sorted(FIELDS.glob("*.jpg")) + sorted(SAMPLES.glob("*/*.webp"))
SLIDES = ("slide-a", "slide-b", "slide-c")
SAME = ("path", "cell", "x", "y", "w", "h", "prediction", "prob_parasitized", "true_label", "unfamiliar", "error")
TIMEOUT = 120


def _rows(path: Path):
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _plan(inbox: Path, sources):
    """(how, source, target): fields and cells spread over the slide folders, each written one of the camera's
    ways (test_watch.py's writers: slowly in chunks through one open file or reopened, as .part renamed, copied)."""
    ways = ("slow-open", "rename", "copy", "slow-reopen")
    return [(ways[i % len(ways)], src, inbox / SLIDES[i % len(SLIDES)] / src.name) for i, src in enumerate(sources)]


def _drop(inbox: Path, plan) -> threading.Thread:
    """The camera, in a thread: the plan written over a few seconds, plus names that must never come out (a .part
    never renamed, hidden files and folders, an editor's lock file)."""
    thread = threading.Thread(target=_writer, args=(inbox, plan, threading.Event()), daemon=True)
    thread.start()
    return thread


class Watch:
    """``edge-classify --watch`` as a subprocess, its stderr in a file (a pipe could fill and stall it)."""

    def __init__(self, args, log: Path):
        self.log = log
        with open(log, "a") as err:
            self.proc = subprocess.Popen([str(BIN / "edge-classify"), *map(str, args)], stderr=err,
                                         stdout=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        self.wait_for(lambda: "watching " in log.read_text(), "the watch never started")

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert self.proc.poll() is None, f"edge-classify --watch exited {self.proc.returncode}:\n" \
                                             f"{self.log.read_text()}"
            assert time.monotonic() < deadline, f"{what}:\n{self.log.read_text()}"
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def _watch_args(inbox, tmp_path, *extra):
    return ["--watch", inbox, "--output", tmp_path / "out.csv", "--group-by", "folder", "--summary-json",
            tmp_path / "summary.json", *extra]


def _wait_all_written(watch: Watch, out: Path, plan, writer: threading.Thread) -> None:
    expected = {str(target) for _, _, target in plan}
    watch.wait_for(lambda: not writer.is_alive() and expected <= {r["path"] for r in _rows(out)},
                   "not every image reached the output")
    time.sleep(3)          # longer than the settle time: room for a wrong second pass to show up


def _check_against_one_shot(inbox: Path, tmp_path: Path, plan) -> list:
    """The watch's rows are the one-shot run's rows over the same slide folders, each exactly once."""
    reference = tmp_path / "one_shot.csv"
    cli("edge-classify", *[inbox / s for s in SLIDES if (inbox / s).is_dir()], "--output", reference, check=True)
    got, want = _rows(tmp_path / "out.csv"), _rows(reference)
    assert Counter(r["path"] for r in got) == Counter(r["path"] for r in want), "rows per image differ"
    assert {r["path"] for r in got} == {str(target) for _, _, target in plan}
    key = lambda r: tuple(r[k] for k in SAME)                                       # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, want)), "the watch's predictions differ from a one-shot run"
    return got


def _check_summary(tmp_path: Path, rows, plan) -> None:
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == len(plan) and summary["failed"] == 0
    assert summary["classified"] == len(rows)
    groups = summary["groups"]
    assert set(groups) == {str(target.parent) for _, _, target in plan}
    counted = [r for r in rows if not r.get("at_edge")]     # cells cut by the image edge are shown, never counted
    assert sum(g["cells"] for g in groups.values()) == len(counted)


def test_watch_classifies_each_arriving_image_once_and_stops_cleanly_on_sigterm(tmp_path):
    pytest.importorskip("cv2", reason="the dropped images include whole fields (OpenCV: the [fields] extra)")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plan = _plan(inbox, SOURCES)
    overlays = inbox / "overlays"                       # written inside the watched folder: never fed back in
    watch = Watch(_watch_args(inbox, tmp_path, "--overlays", overlays), tmp_path / "watch.log")
    writer = _drop(inbox, plan)
    second = cli("edge-classify", *_watch_args(inbox, tmp_path))
    assert second.returncode == 1 and "in use by pid" in second.stderr, second.stderr
    _wait_all_written(watch, tmp_path / "out.csv", plan, writer)
    assert watch.stop() == 0, watch.log.read_text()
    log = watch.log.read_text()
    assert "Traceback" not in log and "classifying" not in log, log    # no progress bar in watch mode
    assert "   images:" in log                                           # the final summary
    assert any(overlays.glob("*_overlay.png"))
    assert not (tmp_path / "out.csv.lock").exists()
    rows = _check_against_one_shot(inbox, tmp_path, plan)
    _check_summary(tmp_path, rows, plan)


def test_watch_killed_and_restarted_loses_nothing_and_repeats_nothing(tmp_path):
    pytest.importorskip("cv2", reason="the dropped images include whole fields (OpenCV: the [fields] extra)")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plan = _plan(inbox, SOURCES)
    args = _watch_args(inbox, tmp_path)
    first = Watch(args, tmp_path / "first.log")
    writer = _drop(inbox, plan)
    first.wait_for(lambda: len({r["path"] for r in _rows(tmp_path / "out.csv")}) >= len(plan) // 3,
                   "the first third never reached the output")
    first.stop(signal.SIGKILL)
    time.sleep(1)                                       # the camera goes on while the service is down
    second = Watch(args, tmp_path / "second.log")
    _wait_all_written(second, tmp_path / "out.csv", plan, writer)
    assert second.stop() == 0, second.log.read_text()
    rows = _check_against_one_shot(inbox, tmp_path, plan)
    _check_summary(tmp_path, rows, plan)


@pytest.mark.skipif(not IML.is_dir(), reason="../shared/data/fields/iml_vivax is absent (IML fields live outside "
                                             "the repo)")
def test_watch_on_iml_fields_matches_a_one_shot_run(tmp_path):
    pytest.importorskip("cv2", reason="the dropped images include whole fields (OpenCV: the [fields] extra)")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plan = _plan(inbox, sorted(IML.glob("*.JPG"))[:6])
    watch = Watch(_watch_args(inbox, tmp_path), tmp_path / "watch.log")
    writer = _drop(inbox, plan)
    _wait_all_written(watch, tmp_path / "out.csv", plan, writer)
    assert watch.stop(signal.SIGINT) == 0, watch.log.read_text()
    rows = _check_against_one_shot(inbox, tmp_path, plan)
    _check_summary(tmp_path, rows, plan)


@pytest.mark.parametrize("args, says", [
    (["--watch", "{inbox}"], "--watch needs --output"),
    (["--watch", "{inbox}", "{inbox}", "-o", "{out}"], "takes no PATHS"),
    (["--watch", "{inbox}", "-o", "{out}", "--overwrite"], "always continues"),
    (["--watch", "{inbox}/missing", "-o", "{out}"], "does not exist"),
    ([], "give PATHS"),
    (["--watch", "{inbox}", "-o", "{out}", "--group-by", "folder", "--report", "{out}.html"],
     "does not write --review or --report"),
])
def test_watch_usage_errors_exit_2(tmp_path, args, says):
    (tmp_path / "inbox").mkdir()
    done = cli("edge-classify", *[a.format(inbox=tmp_path / "inbox", out=tmp_path / "o.csv") for a in args])
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_watch_refuses_to_continue_an_output_made_with_other_settings(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copyfile(SOURCES[-1], inbox / SOURCES[-1].name)
    out = tmp_path / "out.csv"
    cli("edge-classify", inbox, "--output", out, check=True)
    done = cli("edge-classify", "--watch", inbox, "--output", out, "--threshold", "0.3")
    assert done.returncode == 2 and "other settings" in done.stderr, done.stderr


def test_the_example_service_command_runs_and_stops_with_exit_0(tmp_path):
    """The unit's ExecStart, with /srv/malaria-edge moved under tmp_path: every flag exists, the watch starts,
    classifies what arrives, and systemd's stop (SIGTERM) ends it with exit 0 and the per-slide files written."""
    unit = (REPO / "edge_runtime" / "service" / "malaria-edge-watch.service").read_text()
    command = next(line for line in unit.splitlines() if line.startswith("ExecStart=")).split("=", 1)[1].split()
    assert command[0] == "/srv/malaria-edge/venv/bin/edge-classify"
    args = [a.replace("/srv/malaria-edge", str(tmp_path)) for a in command[1:]]
    (tmp_path / "inbox").mkdir()
    (tmp_path / "results").mkdir()
    watch = Watch(args, tmp_path / "service.log")
    (tmp_path / "inbox" / "slide1").mkdir()
    shutil.copyfile(SOURCES[0], tmp_path / "inbox" / "slide1" / SOURCES[0].name)
    watch.wait_for(lambda: _rows(tmp_path / "results" / "slides.csv"), "the slide's row was never written")
    assert watch.stop() == 0, watch.log.read_text()
    assert _rows(tmp_path / "results" / "slides.csv")[0]["group"] == str(tmp_path / "inbox" / "slide1")
    assert json.loads((tmp_path / "results" / "slides.json").read_text())["images"] == 1
