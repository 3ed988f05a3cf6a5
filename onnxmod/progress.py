"""Progress bars (tqdm, on stderr) that disappear with --quiet."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr; ``quiet`` disables it, and so does a stderr that is not a terminal (logs).

    Use as iterator wrapper or context manager.
    """
    return tqdm(it, total=total, desc=desc, disable=quiet or None, unit=unit, leave=False, dynamic_ncols=True)
