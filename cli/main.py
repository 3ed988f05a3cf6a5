"""Entry point: the click group, and the one place bad input becomes exit code 2."""

from __future__ import annotations

import sys

import click

from onnxmod import __version__
from onnxmod.errors import OnnxmodError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxmod")
def cli() -> None:
    """Cut CNN classifiers (ONNX) into per-class modules; reuse and replace them."""


def _register() -> None:
    # Each command lives in its own module and registers itself on `cli`.
    from onnxmod.cli import (  # noqa: F401
        cmd_compose,
        cmd_decompose,
        cmd_eval,
        cmd_export,
        cmd_export_triton,
        cmd_info,
        cmd_serve,
    )


def main(argv: list[str] | None = None) -> None:
    _register()
    # the commands register on `onnxmod.cli.main.cli`; under `python -m` this file is __main__
    from onnxmod.cli.main import cli as group

    try:
        group.main(args=argv, prog_name="onnxmod", standalone_mode=False)
    except OnnxmodError as e:
        click.echo(f"onnxmod: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("onnxmod: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("onnxmod: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
