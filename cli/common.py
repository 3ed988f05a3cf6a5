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
