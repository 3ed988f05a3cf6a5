"""Loading the models, binding the socket, running uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Iterator, Sequence

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from onnxmod.errors import OnnxmodError
from onnxmod.serve.app import create_app
from onnxmod.serve.model import ServedModel


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_batch: int = 64
    max_delay_ms: float = 2.0
    max_body_mb: float = 64.0
    instances: int = 2
    access_log: bool = False
    read_timeout_s: float = 30.0  # a request (head and body) must arrive within this; else 408 and closed

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def default_threads(instances: int) -> int:
    """Intra-op threads per run so that ``instances`` concurrent runs share the usable cores, not fight over them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // instances)


def http_stack() -> dict[str, str]:
    """The event loop and HTTP parser the server runs on: uvloop and httptools (C) when installed, else asyncio
    and h11 (pure Python). uvicorn's "auto" picks the same; spelled out so that ``serve`` can say what it runs.
    Why it matters: with a model that costs nothing, 16 tritonclient clients, 2 cores, the server took ~0.15 ms
    of CPU per batched request on the C pair against ~0.22 ms on the Python pair, and that event loop is the
    one thread every request goes through."""

    def installed(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    return {"loop": "uvloop" if installed("uvloop") else "asyncio", "http": "httptools" if installed("httptools") else "h11"}


def load_models(paths: Sequence[Path], names: Sequence[str], device: str,
                threads: int | None = None) -> list[ServedModel]:
    """One ServedModel per path; ``names`` name the first ``len(names)`` models, the rest use file stems."""
    if len(names) > len(paths):
        raise OnnxmodError(f"{len(names)} --name values for {len(paths)} model(s)")
    models: list[ServedModel] = []
    for i, p in enumerate(paths):
        m = ServedModel.load(Path(p), names[i] if i < len(names) else None, device=device, threads=threads)
        clash = next((o for o in models if o.name == m.name), None)
        if clash is not None:
            raise OnnxmodError(f"{p}: model name '{m.name}' is already taken by {clash.path}; "
                               "give each model its own --name")
        models.append(m)
    return models


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OnnxmodError when it cannot bind."""
    shown = host if len(host) <= 80 else host[:77] + "..."
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted sockets that say TCP, and
        # without it Nagle holds each response body behind its headers for a delayed ACK (~40 ms)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as e:
        raise OnnxmodError(f"cannot listen on {shown}:{port}: {e.strerror or e}") from None
    except (UnicodeError, ValueError) as e:  # a host name no resolver takes: a label over 63 characters, a NUL
        raise OnnxmodError(f"--host {shown!r}: not a host name or address ({_first_line(e)})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OnnxmodError(f"cannot listen on {shown}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_TIMEOUT_BODY = b'{"error":"request not received in full within the server\'s read timeout (--read-timeout)"}'
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY)


def with_read_timeout(protocol: type, timeout_s: float) -> type:
    """uvicorn's HTTP protocol (httptools or h11) with a read timeout: a request whose head and body have not
    arrived within ``timeout_s`` of the connection opening, or of the previous response, gets a 408 and the
    connection is closed. uvicorn itself only times out idle keep-alive connections, so a client sending half a
    request (or half a body) held its connection, and its buffers, forever. A request fully read is not timed:
    the model's run may take what it takes."""

    class ReadTimeout(protocol):  # type: ignore[misc, valid-type]
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(timeout_s, self._read_timed_out)

        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's clock starts now

        def connection_lost(self, exc):  # type: ignore[no-untyped-def]
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None
            super().connection_lost(exc)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            waiting = cycle is None or cycle.response_complete  # no request yet (or only part of its head)
            if not waiting and not cycle.more_body:
                return  # read in full: the app is answering it (on_response_complete re-arms)
            if waiting or not cycle.response_started:
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    ReadTimeout.__name__ = ReadTimeout.__qualname__ = protocol.__name__  # http_stack's names stay what they are
    return ReadTimeout


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; for ``serve`` that stop is a clean exit.
    SIGHUP stops it the same way."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn listens for SIGINT/SIGTERM; a SIGHUP (terminal closed) stops serve the same graceful way."""
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)


def make_server(models: list[ServedModel], settings: ServeSettings) -> uvicorn.Server:
    app = create_app(models, settings.max_batch, settings.max_delay_ms, settings.max_body_bytes, settings.instances)
    stack = http_stack()
    protocol = import_from_string(HTTP_PROTOCOLS[stack["http"]])
    config = uvicorn.Config(app, lifespan="on", log_level="info" if settings.access_log else "warning",
                            access_log=settings.access_log, timeout_graceful_shutdown=10, loop=stack["loop"],
                            http=with_read_timeout(protocol, settings.read_timeout_s))
    return _Server(config)


def serve(sock: socket.socket, models: list[ServedModel], settings: ServeSettings) -> None:
    """Serve until SIGINT/SIGTERM/SIGHUP: stop accepting, finish in-flight requests, stop the batchers."""
    make_server(models, settings).run(sockets=[sock])


@contextlib.contextmanager
def serve_in_thread(models: list[ServedModel], settings: ServeSettings, timeout_s: float = 30.0) -> Iterator[str]:
    """Run a server on a background thread (for tests and embedding); yields its base URL, stops it on exit."""
    with run_in_thread(make_server(models, settings), bind(settings.host, settings.port), timeout_s) as base:
        yield base


@contextlib.contextmanager
def run_in_thread(server: uvicorn.Server, sock: socket.socket, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``server`` on ``sock`` on a background thread; yields its base URL, stops it and closes ``sock`` on exit."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="onnxmod-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
