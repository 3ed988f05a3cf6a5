"""Options and output helpers shared by every command."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable

import click

from onnxmod.errors import OnnxmodError

json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter on stderr.")
force_option = click.option(
    "--force", is_flag=True,
    help="Replace an existing output. Never an input, nor a directory onnxmod did not write.")
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where ONNX Runtime runs graphs: auto uses CUDA only when its provider really loads.",
)


class FiniteFloat(click.FloatRange):
    """A float flag in its range and finite: nan, inf and 1e400 are usage errors (exit 2) at the flag,
    not values a command trips over later (a batcher waiting forever, a config that cannot be written)."""

    name = "float"

    def __init__(self, min: float, max: float, min_open: bool = False, max_open: bool = False):
        super().__init__(min, max, min_open=min_open, max_open=max_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        v = super().convert(value, param, ctx)  # nan passes the range comparisons: refused here
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


def int_range(min: int, max: int) -> click.IntRange:
    """An integer flag with both bounds: a count or size beyond ``max`` would only exhaust memory or time."""
    return click.IntRange(min, max)


BATCH = int_range(1, 65_536)  # images per run; also Triton's max_batch_size
DELAY_MS = FiniteFloat(0, 60_000)  # dynamic batching's longest wait for a fuller batch


def float_list(text: str | None, option: str, count: int | None = None) -> list[float] | None:
    """``'0.485,0.456,0.406'`` (commas or spaces) -> finite floats; None when not given."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise OnnxmodError(f"{option}: expected numbers like 0.485,0.456,0.406, got '{text}'") from None
    if not values or (count is not None and len(values) != count):
        raise OnnxmodError(f"{option}: expected {count or 'some'} numbers, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise OnnxmodError(f"{option}: values must be finite numbers, got '{text}'")
    return values


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str] | str) -> None:
    """Print ``result`` as JSON on stdout, or its human rendering."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=_json_default))
    else:
        click.echo(human(result) if callable(human) else human)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def say(msg: str, quiet: bool) -> None:
    """Chatter for humans, on stderr so --json stdout stays clean."""
    if not quiet:
        click.echo(msg, err=True)


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def is_tty_stderr() -> bool:
    return sys.stderr.isatty()
