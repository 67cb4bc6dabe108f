"""Soak check of ``edge-classify --watch`` (not in CI: about 3 minutes on two cores): COUNT whole fields dropped into
slide folders over about a minute, as a camera would (a third written slowly in chunks, a third as ``x.part``
renamed, a third copied in one go), then an idle period, then SIGTERM. Reports, as JSON on stdout:

- ``count``: fields dropped; ``with_rows``: fields that reached the output; ``missing``; ``duplicates`` (fields
  with more rows than a one-shot ``edge-classify`` of the same files gives); ``partials`` (fields whose rows differ
  from that one-shot run, or that have an error row: what classifying a half-written file would give);
- ``lag_s``: from a file being complete to its first row in the output (median, p95, max);
- ``idle_cpu_percent``: the watching process's CPU time over ``--idle`` seconds with nothing arriving, as a percent
  of one core, read from /proc/<pid>/stat (no psutil); ``peak_rss_mib`` from /proc/<pid>/status;
- ``exit_status`` after SIGTERM, and the stop time; ``one_shot_s``: how long the one-shot run of the same fields
  took (the watch cannot be faster than that; a lag beyond the settle time is a backlog, not the watch).

Sources: the IML vivax fields (../shared/data/fields/iml_vivax/images) when present, else edge_runtime's sample
fields; each is copied under a new name (``field_NNN.jpg``), so fewer sources than COUNT is fine.

    .venv/bin/python tools/watch_soak.py --count 200 --seconds 60 --idle 30
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_watch import _write_slowly, _write_then_rename  # noqa: E402  the camera writers the tests use

IML = REPO.parent / "shared" / "data" / "fields" / "iml_vivax" / "images"
SAMPLE_FIELDS = REPO / "edge_runtime" / "sample_fields"
EDGE_CLASSIFY = Path(sys.executable).parent / "edge-classify"
SAME = ("cell", "x", "y", "w", "h", "prediction", "prob_parasitized", "unfamiliar", "error")


def make_plan(inbox: Path, count: int, slides: int):
    """(how, source, target) for COUNT fields over SLIDES folders."""
    sources = sorted(IML.glob("*.JPG")) if IML.is_dir() else sorted(SAMPLE_FIELDS.glob("*.jpg"))
    ways = ("slow", "rename", "copy")
    return [(ways[i % 3], sources[i % len(sources)], inbox / f"slide-{i % slides:02d}" / f"field_{i:03d}.jpg")
            for i in range(count)]


def drop(plan, seconds: float, complete: dict) -> threading.Thread:
    """Write the plan evenly over ``seconds`` in a thread; ``complete[path]`` = when the file was whole."""
    def one(how, source, target):
        if how == "copy":
            shutil.copyfile(source, target)
        elif how == "rename":
            _write_then_rename(source, target)
        else:
            _write_slowly(source, target, False)
        complete[str(target)] = time.monotonic()

    def run():
        workers = []
        for how, source, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            workers.append(threading.Thread(target=one, args=(how, source, target)))
            workers[-1].start()
            time.sleep(seconds / len(plan))
        for w in workers:
            w.join()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Tail:
    """The output CSV read as it grows (only the new complete lines): rows per path, and when each path first
    showed up."""

    def __init__(self, path: Path):
        self.path, self.offset, self.header = path, 0, None
        self.rows: Counter = Counter()
        self.first_seen: dict = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        now = time.monotonic()
        for record in csv.reader(complete.decode("utf-8", "surrogateescape").splitlines()):
            if self.header is None:
                self.header = record
                continue
            path = record[0]
            self.rows[path] += 1
            self.first_seen.setdefault(path, now)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15, in clock ticks)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def compare_with_one_shot(inbox: Path, out: Path, work: Path, plan) -> dict:
    """Duplicates, missing and partial fields against a one-shot edge-classify of the same slide folders."""
    reference = work / "one_shot.csv"
    slides = sorted({str(target.parent) for _, _, target in plan})
    started = time.monotonic()
    subprocess.run([str(EDGE_CLASSIFY), *slides, "--output", str(reference), "-q"], check=True)
    one_shot_s = round(time.monotonic() - started, 1)

    def by_path(path: Path) -> dict:
        table: dict = {}
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                table.setdefault(row["path"], []).append(tuple(row[k] for k in SAME))
        return table
    got, want = by_path(out), by_path(reference)
    expected = [str(target) for _, _, target in plan]
    return {"with_rows": sum(p in got for p in expected),
            "missing": sum(p not in got for p in expected),
            "duplicates": sum(len(got.get(p, [])) > len(want[p]) for p in expected),
            "partials": sum(p in got and (sorted(set(got[p])) != sorted(want[p]) or any(r[-1] for r in got[p]))
                            for p in expected),
            "unexpected_paths": sorted(set(got) - set(expected)),
            "cells": sum(len(v) for v in want.values()), "one_shot_s": one_shot_s}


def wait_until(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"watch_soak: {what} (exit status {proc.poll()})")
        time.sleep(0.5)


def soak(args, work: Path) -> dict:
    inbox, out = work / "inbox", work / "cells.csv"
    inbox.mkdir(parents=True)
    plan = make_plan(inbox, args.count, args.slides)
    log = open(work / "watch.log", "w")
    proc = subprocess.Popen([str(EDGE_CLASSIFY), "--watch", str(inbox), "--output", str(out), "--group-by",
                             "folder", "--summary-json", str(work / "summary.json"), "--groups-output",
                             str(work / "groups.csv")], stderr=log, stdout=subprocess.DEVNULL)
    wait_until(lambda: "watching " in (work / "watch.log").read_text(), 120, proc, "the watch never started")
    complete, tail = {}, Tail(out)
    started = time.monotonic()
    writer = drop(plan, args.seconds, complete)

    def all_in():
        tail.poll()
        return not writer.is_alive() and all(str(t) in tail.first_seen for _, _, t in plan)
    wait_until(all_in, args.seconds + 600, proc, "not every field reached the output")
    finished = time.monotonic()
    lags = sorted(tail.first_seen[p] - complete[p] for p in complete)
    time.sleep(3)                                      # past the settle time: the idle period starts
    before = cpu_seconds(proc.pid)
    time.sleep(args.idle)
    idle_cpu = cpu_seconds(proc.pid) - before
    rss = peak_rss_mib(proc.pid)
    stop_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=120)
    report = {"source": str(IML if IML.is_dir() else SAMPLE_FIELDS), "count": len(plan),
              "dropped_over_s": round(max(complete.values()) - started, 1),
              "last_row_after_start_s": round(finished - started, 1),
              "lag_s": {"median": round(statistics.median(lags), 2), "p95": round(lags[int(0.95 * len(lags))], 2),
                        "max": round(lags[-1], 2)},
              "idle_s": args.idle, "idle_cpu_s": round(idle_cpu, 3),
              "idle_cpu_percent": round(100 * idle_cpu / args.idle, 3), "peak_rss_mib": round(rss, 1),
              "exit_status": status, "stop_s": round(time.monotonic() - stop_at, 2),
              "lock_released": not (work / "cells.csv.lock").exists()}
    report.update(compare_with_one_shot(inbox, out, work, plan))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="fields to drop (default 200)")
    parser.add_argument("--seconds", type=float, default=60.0, help="spread the drops over this long (default 60)")
    parser.add_argument("--slides", type=int, default=10, help="slide folders (default 10)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle period measured (default 30 s)")
    parser.add_argument("--workdir", type=Path, help="where to work (default: a new temporary folder, kept)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="watch_soak_"))
    report = soak(args, work)
    report["workdir"] = str(work)
    print(json.dumps(report, indent=2))
    ok = (report["exit_status"] == 0 and report["with_rows"] == report["count"] and not report["duplicates"]
          and not report["partials"] and not report["unexpected_paths"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
