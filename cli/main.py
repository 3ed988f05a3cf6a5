"""Entry point: the click group, and the one place bad input becomes exit code 2."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from onnxmod import __version__
from onnxmod.errors import OnnxmodError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="onnxmod")
def cli() -> None:
    """Cut CNN classifiers (ONNX) into per-class modules; reuse and replace them.

    \b
    Example (the bundled sample):
      onnxmod decompose sample_graphs/resnet8_cifar10.onnx \\
          --calib sample_graphs/cifar10_calib.npz -o r8.modules
      onnxmod compose r8.modules -o r8_composed.onnx
      onnxmod eval r8_composed.onnx --data sample_graphs/cifar10_test.npz

    Run `onnxmod COMMAND --help` for each command's options and an example.
    """


def _register() -> None:
    # Each command lives in its own module and registers itself on `cli`.
    from onnxmod.cli import (  # noqa: F401
        cmd_compose,
        cmd_decompose,
        cmd_eval,
        cmd_export,
        cmd_export_triton,
        cmd_info,
        cmd_ops,
        cmd_serve,
    )


# SIGHUP (the terminal closed, an ssh session dropped) ends a command like SIGTERM: temporary outputs removed
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread so that every ``except BaseException`` cleanup runs.

    Not a KeyboardInterrupt, so click does not turn it into an Abort (which prints a blank line first).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # the stop signal this process got, if any


def _on_signal(signum, frame) -> None:
    # a second signal must not cut the cleanup short
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


class _StderrWarnings(logging.Handler):
    """``onnxmod`` logger warnings (e.g. stale temp outputs) as ``onnxmod: warning: ...`` lines, unless --quiet."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.params.get("quiet"):
            return
        click.echo(f"onnxmod: warning: {record.getMessage()}", err=True)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _fail(message: str, code: int = 2) -> None:
    # one line whatever the message quotes (a file or node name with a newline): control characters escaped
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    click.echo(f"onnxmod: error: {message}", err=True)
    sys.exit(code)


def _interrupted(e: BaseException) -> None:
    from onnxmod import outputs

    outputs.sweep_own_temps()  # also those created a moment before the signal, outside any cleanup block
    signum = getattr(e, "signum", None)
    why = f"terminated ({signal.Signals(signum).name})" if signum not in (None, signal.SIGINT) else "interrupted"
    _fail(f"{why}; temporary outputs removed", 130)


def main(argv: list[str] | None = None) -> None:
    # the handlers first: a signal while the commands' modules import (numpy, onnx, torch: a second or more) ends
    # the command like any other (one line, exit 130), not with a KeyboardInterrupt traceback or a bare kill
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = ({sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
                if in_main_thread else {})
    interrupted = False
    try:
        _register()
        # the commands register on `onnxmod.cli.main.cli`; under `python -m` this file is __main__
        from onnxmod.cli.main import cli as group

        log = logging.getLogger("onnxmod")
        if not any(isinstance(h, _StderrWarnings) for h in log.handlers):
            log.addHandler(_StderrWarnings(logging.WARNING))
            log.propagate = False
        group.main(args=argv, prog_name="onnxmod", standalone_mode=False)
    except OnnxmodError as e:
        _fail(str(e))
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted = True
        _interrupted(e)
    except click.exceptions.Abort as e:  # click turns a KeyboardInterrupt into Abort
        interrupted = True
        _interrupted(e.__cause__ or e)
    except _NO_ARGS_IS_HELP as e:  # bare `onnxmod`: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _fail(f"{e.format_message()}{hint}", 2)
    except click.ClickException as e:
        _fail(e.format_message(), 2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # the environment, not the input: disk full, permission denied...
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}")
    except Exception:
        # a C extension whose import the signal cut short re-raises it as its own error (torch: "ImportError:
        # initialization failed"): still the stop signal, not a fault
        if not _received:
            raise
        interrupted = True
        _interrupted(Interrupted(_received[0]))
    finally:
        # after a stop signal they stay ignored until the process is gone: a second signal during the interpreter's
        # exit would otherwise kill it with that signal instead of exit 130 (SIGTERM twice, SIGINT then SIGHUP)
        # the command is done and the process exits with its status: a stop signal now has nothing left to stop
        # (restoring Python's handler would let a SIGINT during the interpreter's exit kill it silently with
        # that signal); called with argv (a library or a test) the caller's handlers come back
        if argv is None:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
        elif not interrupted:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
