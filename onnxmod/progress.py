"""Progress on stderr: tqdm bars on a terminal, one line per stage elsewhere (logs); nothing with --quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr; ``quiet`` disables it, and so does a stderr that is not a terminal (logs).

    Use as iterator wrapper or context manager.
    """
    return tqdm(it, total=total, desc=desc, disable=quiet or None, unit=unit, leave=False, dynamic_ncols=True)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def say(line: str, quiet: bool = False) -> None:
    """One line on stderr (above a running bar on a terminal), unless ``quiet``."""
    if not quiet:
        tqdm.write(line, file=sys.stderr)


@contextmanager
def stage(name: str, quiet: bool = False) -> Iterator[None]:
    """Off a terminal, where no bar shows, a line when stage ``name`` starts and one when it ends, with its time."""
    lines = not quiet and not on_terminal()
    if lines:
        say(f"{name}: started")
    t0 = time.perf_counter()
    yield
    if lines:
        say(f"{name}: done in {time.perf_counter() - t0:.1f} s")
