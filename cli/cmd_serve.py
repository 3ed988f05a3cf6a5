"""`onnxmod serve`: models behind the Open Inference Protocol (KServe v2) REST API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from onnxmod.cli.common import BATCH, DELAY_MS, FiniteFloat, device_option, int_range, quiet_option, say
from onnxmod.cli.main import cli


@cli.command("serve", epilog="""\b
Example:
  onnxmod serve r8_composed.onnx --port 8000 --max-batch 64 --max-delay-ms 2
  curl -s localhost:8000/v2/models/r8_composed
  curl -s -F image=@cat.png localhost:8000/v2/models/r8_composed/classify""")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", "names", multiple=True, metavar="NAME", show_default="the file stem",
              help="Model name in URLs (repeatable: names the models in order).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port, printed at start).")
@device_option
@click.option("--max-batch", type=BATCH, default=64, show_default=True,
              help="Most images in one onnxruntime run (larger requests are split).")
@click.option("--max-delay-ms", type=DELAY_MS, default=2.0, show_default=True,
              help="Longest wait for more requests to fill a batch.")
@click.option("--instances", type=int_range(1, 64), default=2, show_default=True,
              help="onnxruntime runs in flight at once per model (one batch's HTTP work overlaps another's run).")
@click.option("--threads", type=int_range(1, 1024), default=None, show_default="usable cores / --instances",
              help="onnxruntime intra-op threads per run.")
@click.option("--max-body-mb", type=FiniteFloat(0, 16_384, min_open=True), default=64.0, show_default=True,
              help="Largest request body accepted (413 above it).")
@click.option("--read-timeout", "read_timeout", type=FiniteFloat(0.1, 3600), default=30.0, show_default=True,
              help="Seconds a request (head and body) may take to arrive; a half-sent one then gets 408 and is closed.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Once listening, print the URL and the models as JSON on stdout (handy with --port 0).")
@quiet_option
def serve_cmd(models: tuple[Path, ...], names: tuple[str, ...], host: str, port: int, device: str, max_batch: int,
              max_delay_ms: float, instances: int, threads: int | None, max_body_mb: float, read_timeout: float,
              access_log: bool, as_json: bool, quiet: bool) -> None:
    """Serve MODELS (composed, source or module .onnx) over HTTP: KServe v2 /v2/... routes with dynamic batching.

    Routes per model NAME: GET /v2/models/NAME (inputs, outputs, classes), POST /v2/models/NAME/infer
    (JSON or binary tensors, as tritonclient.http sends them), POST /v2/models/NAME/classify (image files),
    GET /v2/models/NAME/stats. Stops cleanly on Ctrl-C / SIGTERM / SIGHUP.
    """
    from onnxmod.serve.server import ServeSettings, bind, default_threads, http_stack, load_models, serve, url

    settings = ServeSettings(host=host, port=port, device=device, max_batch=max_batch, max_delay_ms=max_delay_ms,
                             instances=instances, max_body_mb=max_body_mb, access_log=access_log,
                             read_timeout_s=read_timeout)
    threads = threads or default_threads(instances)
    served = load_models(models, names, device, threads)
    stack = http_stack()
    sock = bind(host, port)
    try:
        base = url(sock)
        for m in served:
            say(f"  {base}/v2/models/{m.name}  ({m.kind}, {len(m.classes)} classes, {m.device}; {m.path})", quiet)
        if as_json:
            # one line, so a script can read it as soon as the server listens
            click.echo(json.dumps({"url": base, "max_batch": max_batch, "max_delay_ms": max_delay_ms,
                                   "instances": instances, "threads": threads, "http_stack": stack,
                                   "models": [{"name": m.name, "kind": m.kind, "classes": m.classes,
                                               "device": m.device, "path": str(m.path)} for m in served]}))
            sys.stdout.flush()
        say(f"onnxmod serve: listening on {base} (max batch {max_batch}, max delay {max_delay_ms:g} ms, "
            f"{instances} run(s) in flight x {threads} thread(s); {stack['loop']} + {stack['http']}); "
            "Ctrl-C stops", quiet)
        serve(sock, served, settings)
    finally:
        sock.close()
    say("onnxmod serve: stopped", quiet)

