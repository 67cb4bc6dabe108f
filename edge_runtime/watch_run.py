"""``edge-classify --watch DIR``: classify each image as it arrives in DIR, until SIGINT or SIGTERM.

The same steps as a one-shot run (:mod:`run`), met one image at a time:

load models -> check outputs -> lock --output (held for the whole watch) -> resume point (the images already in
--output are skipped: a restart loses nothing and repeats nothing) -> for each complete image that
:func:`watch.watch_images` hands over: classify, write its rows, fsync, rewrite --summary-json and
--groups-output atomically -> on SIGINT/SIGTERM: finish the image in hand, close the writer, write the final summary,
release the lock, exit 0.

A watch always continues its --output (as ``--resume`` does: same settings only) and never shows a progress bar;
one line per image goes to stderr (hidden by ``-q``). Folders given to --overlays/--save-crops are never watched, so
results are not fed back in; with --group-by or --slide, overlays are drawn when the watch stops (numbered by slide
rank, as a one-shot run draws them), for the fields classified by this process. --review and --report are refused
for now (they need every field's cells, which a restart no longer has). A second signal while stopping stops at once (exit 130): the rows written are kept and
a field cut short is classified again on the next start.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Set

from .console import Console
from .images import safe_file_name
from .labels import PARASITIZED
from .results_io import Inputs, Labels
from .run import (EXIT_INTERRUPTED, ClassifyOptions, Models, Progress, open_job, resume_rows, summarise,
                  write_results, write_side_files)
from .run_slides import write_slide_outputs
from .watch import WatchError, install_stop_handlers, watch_images


class _NoBar:
    """The classify loop's progress bar, in watch mode: none (images arrive one by one, for hours)."""

    @staticmethod
    def update(n: int) -> None:
        pass


def watch_and_report(options: ClassifyOptions, console: Console, models: Models, labels: Optional[Labels],
                     settings: Dict) -> int:
    """Steps 4-7 for ``--watch``, under the output's lock: resume, then classify each image as it arrives until
    SIGINT/SIGTERM, then the final summary. Returns the exit status: 0 when stopped by a signal (images that
    failed are named on stderr as they fail and counted in the summary), the error's status when the watched
    folder disappears, 130 when a second signal cut the image in hand short."""
    previous, done = resume_rows(options, settings)
    watch = WatchRun(options, console, models, labels, Progress(rows=list(previous), resumed=len(previous)), done)
    stop = threading.Event()
    restore = install_stop_handlers(stop)
    status = 0
    console.info(f"watching {options.watch} (rows to {options.output}, {len(done)} images already there); "
                 "stop with Ctrl-C or SIGTERM")
    try:
        watch.refresh()
        for path in watch_images(options.watch, stop, exclude=watch_exclusions(options), log=console.detail):
            watch.take(path)
    except KeyboardInterrupt:
        console.warn(f"stopped without finishing the image in hand; {watch.progress.written} new rows are written "
                     f"to {options.output}; run the same command to continue")
        return EXIT_INTERRUPTED
    except WatchError as exc:
        console.error(str(exc))
        status = exc.exit_code
    finally:
        watch.close()
        restore()
    write_results(options, console, watch.summary(), watch.found, watch.progress)
    overlays = options.overlays_dir if options.grouping else None     # grouped: numbered by slide rank, at the end
    for path in write_slide_outputs(watch.progress.slides, watch.progress.field_results, models.classifier,
                                    overlays_dir=overlays, names=watch.job.names):
        console.detail(f"wrote {path}")
    return status


def watch_exclusions(options: ClassifyOptions) -> List[Path]:
    """Folders the watch never looks into: where overlays and crops are written (they are images too)."""
    return [p for p in (options.overlays_dir, options.crops_dir) if p is not None]


class WatchRun:
    """One watch's state: the row writer held open, the images met (in :class:`Inputs`, as a one-shot run has
    them), those classified by this process, and the resolved paths already in --output."""

    def __init__(self, options: ClassifyOptions, console: Console, models: Models, labels: Optional[Labels],
                 progress: Progress, done: Set[str]):
        self.options, self.console, self.models, self.progress = options, console, models, progress
        self.job = open_job(options, console, models, labels, progress)
        self.done = done
        self.root = os.path.abspath(options.watch)
        self.found = Inputs()
        self.classified: List[str] = []

    def take(self, path: Path) -> None:
        """One complete image from the watch: skipped when --output has it, else classified, its rows written and
        fsynced, and the per-slide outputs brought up to date."""
        source = self.as_given(path)
        real = os.path.realpath(source)
        self.found.images.append(source)
        self.found.resolved[source] = real
        if real in self.done:
            self.console.detail(f"{source}: already in {self.options.output}")
            return
        self.done.add(real)
        # overlay and crop names as a one-shot run over DIR makes them: the path under DIR (s1/f.jpg -> s1__f.jpg)
        self.job.names[source] = safe_file_name(os.path.relpath(os.fspath(path), self.root).replace(os.sep, "__"))
        start = len(self.progress.rows)
        if self.options.input_kind == "cell":
            self.job.classify_cells([source])
        else:
            self.job.classify_mixed([source], _NoBar())
        self.job.writer.sync()
        self.classified.append(source)
        self.describe(source, self.progress.rows[start:])
        self.refresh()

    def as_given(self, path: Path) -> str:
        """The image's path under DIR as the user wrote DIR (a one-shot ``edge-classify DIR`` writes the same, so
        rows, groups and resume keys agree)."""
        return os.path.join(os.fspath(self.options.watch), os.path.relpath(os.fspath(path), self.root))

    def describe(self, source: str, rows: List[Dict]) -> None:
        """One line per image on stderr (a failure has already said why)."""
        if rows:
            parasitized = sum(r.get("prediction") == PARASITIZED for r in rows)
            self.console.info(f"{source}: {len(rows)} cell{'s' if len(rows) != 1 else ''}, {parasitized} "
                              "parasitized")

    def summary(self) -> Dict:
        """The run's summary as a one-shot run over the images met would give it (resumed rows included)."""
        return summarise(self.options, self.models, self.found, self.classified, self.progress)

    def refresh(self) -> None:
        """After each image: the per-slide results on disk up to date: --summary-json and --groups-output, each
        replaced atomically (a reader never sees half a file).

        Hook: per-slide outputs that --report/--review (being added to run.py by another change) write belong here,
        fed with this same summary, so the report of a slide in progress follows each new field."""
        write_side_files(self.options, self.summary())

    def close(self) -> None:
        """Fsync the rows written and close --output (the lock is released by the caller)."""
        self.job.writer.close()
