"""`onnxmod export-triton`: a Triton Inference Server model repository entry."""

from __future__ import annotations

from pathlib import Path

import click

from onnxmod.cli.common import BATCH, DELAY_MS, emit, force_option, json_option, quiet_option
from onnxmod.cli.main import cli


@cli.command("export-triton", epilog="""\b
Example:
  onnxmod export-triton r8_composed.onnx -o models/ --max-batch 64
  tritonserver --model-repository models/""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "repo", required=True, type=click.Path(path_type=Path),
              help="Model repository folder (created if missing); the entry is REPO/NAME/.")
@click.option("--name", default=None, show_default="the file stem", help="Model name in Triton.")
@click.option("--max-batch", type=BATCH, default=64, show_default=True, help="max_batch_size.")
@click.option("--max-delay-ms", type=DELAY_MS, default=2.0, show_default=True,
              help="dynamic_batching max_queue_delay.")
@force_option
@json_option
@quiet_option
def export_triton_cmd(model: Path, repo: Path, name: str | None, max_batch: int, max_delay_ms: float, force: bool,
                      as_json: bool, quiet: bool) -> None:
    """Write REPO/NAME/1/model.onnx, config.pbtxt (onnxruntime backend, dynamic batching) and labels.txt for MODEL."""
    from onnxmod.serve.triton import export_triton

    e = export_triton(model, repo, name=name, max_batch=max_batch, max_delay_ms=max_delay_ms, force=force)
    result = {"name": e.name, "entry": str(e.directory), "files": [str(f) for f in e.files], "max_batch": e.max_batch}
    emit(result, as_json, lambda r: f"wrote {r['entry']}: " + ", ".join(Path(f).name for f in r["files"]))
