"""What every malaria-edge command shares on the terminal: ``--version``, ``-q/--quiet`` and ``-v/--verbose``.

Library code never prints; the commands decide what reaches the user through a ``Console`` built from these
options. Warnings and errors are always shown (a field tool never hides a warning); ``-q`` drops the human summary
and progress, ``-v`` adds details.
"""
from __future__ import annotations

import importlib.util
import shlex
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Type

import click

from .errors import EXIT_FAILED, EXIT_USAGE, MalariaEdgeError
from .version import __version__

QUIET, NORMAL, VERBOSE = 0, 1, 2


def version_option(func: Callable) -> Callable:
    """``--version`` / ``-V``: the tool's version, from the same constant a device install without TensorFlow has."""
    return click.version_option(__version__, "--version", "-V", message="%(prog)s (malaria-edge) %(version)s")(func)


def verbosity_options(func: Callable) -> Callable:
    """``-q/--quiet`` and ``-v/--verbose``, passed to the command as ``verbosity`` (QUIET, NORMAL or VERBOSE)."""
    func = click.option("-v", "--verbose", "verbosity", flag_value=VERBOSE,
                        help="Say more: per-step details.")(func)
    func = click.option("-q", "--quiet", "verbosity", flag_value=QUIET,
                        help="Say only warnings and errors (no summary, no progress).")(func)
    return click.option("--verbosity", "verbosity", default=NORMAL, hidden=True, type=int)(func)


def common_options(func: Callable) -> Callable:
    """The options every command has: ``--version``, ``-q``, ``-v``."""
    return version_option(verbosity_options(func))


class Console:
    """Where a command's words go: stderr, filtered by the verbosity the user chose."""

    def __init__(self, prog: str, verbosity: int = NORMAL):
        self.prog = prog
        self.verbosity = NORMAL if verbosity is None else verbosity

    @property
    def quiet(self) -> bool:
        return self.verbosity <= QUIET

    def info(self, text: str) -> None:
        """The human summary and progress lines: hidden by -q."""
        if self.verbosity >= NORMAL:
            click.echo(text, err=True)

    def detail(self, text: str) -> None:
        """Details shown only with -v."""
        if self.verbosity >= VERBOSE:
            click.echo(text, err=True)

    def warn(self, text: str) -> None:
        """Always shown, prefixed with the command's name."""
        click.echo(f"{self.prog}: {text}", err=True)

    error = warn

    @contextmanager
    def exit_on_error(self, *also: Type[BaseException]) -> Iterator[None]:
        """Around a command's job: a domain error (or one of the ``also`` types) becomes its one line on stderr
        and the command's exit status (the error's ``exit_code``; 1 for the others), never a traceback."""
        try:
            yield
        except MalariaEdgeError as exc:
            self.error(str(exc))
            sys.exit(exc.exit_code)
        except also as exc:
            self.error(str(exc))
            sys.exit(EXIT_FAILED)


def command_line(name: str) -> str:
    """The command as typed, for the rebuild recipe a model card or report records."""
    return " ".join([name] + [shlex.quote(a) for a in sys.argv[1:]])


def require_tensorflow(command: str) -> None:
    """Training and quantizing need TensorFlow, which the device install leaves out on purpose: say which extra to
    install, in one line, and exit 2 (a usage problem, not a failed run). Looks the package up without importing
    it, so this module stays free of TensorFlow."""
    try:
        present = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        present = False
    if not present:
        click.echo(f"{command}: needs TensorFlow, which this device install does not have; install the training "
                   "extra: pip install 'malaria-edge[train]'", err=True)
        sys.exit(EXIT_USAGE)
