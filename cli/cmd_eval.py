"""`onnxmod eval MODEL.onnx --data DATA`: top-1/top-5 and per-class recall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from onnxmod.cli.common import BATCH, device_option, emit, json_option, quiet_option
from onnxmod.cli.main import cli
from onnxmod.evaluate import evaluate


def render(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} ({r['kind']}) on {r.get('data', 'data')}: {r['n']} images"]
    if "top1" in r:
        lines.append(f"  top-1  {r['top1']:.2%}")
        lines.append(f"  top-5  {r['top5']:.2%}" if r.get("top5") is not None else "  top-5  n/a (fewer than 5 classes)")
    if "binary_accuracy" in r:
        if r.get("class_name") is not None:
            lines.append(f"  class  {r['class_name']}: {r.get('positives')} positives, {r.get('negatives')} negatives")
        lines.append(f"  binary accuracy  {r['binary_accuracy']:.2%}")
        if r.get("auc") is not None:
            lines.append(f"  AUC              {r['auc']:.4f}")
    if r.get("skipped"):
        lines.append(f"  skipped {r['skipped']} images of classes the model lacks: {', '.join(r.get('skipped_classes', []))}")
    per = r.get("per_class") or {}
    if per:
        counts = r.get("per_class_n", {})
        width = max(5, max(len(n) for n in per))
        lines.append("")
        lines.append(f"  {'class':<{width}}  {'n':>6}  recall")
        for name, rec in per.items():
            lines.append(f"  {name:<{width}}  {counts.get(name, ''):>6}  {rec:.2%}")
    return "\n".join(lines)


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="CIFAR batches dir, image folder or .npz.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, show_default="all",
              help="Evaluate at most N images.")
@click.option("--batch-size", type=BATCH, default=256, show_default=True)
@device_option
@json_option
@quiet_option
def eval_cmd(model: Path, data: Path, split: str, limit: int | None, batch_size: int, device: str,
             as_json: bool, quiet: bool) -> None:
    """Top-1 (and top-5) accuracy and per-class recall of MODEL on labelled data.

    For a module: binary accuracy and AUC of its class. A composed model's classes are
    matched to the data's labels by name. Images are resized to the model's input size.

    \b
    Example:
      onnxmod eval r8_composed.onnx --data sample_graphs/cifar10_test.npz
      onnxmod eval r8.modules/module_003_cat.onnx --data cifar10/ --limit 2000 --json
    """
    # the model is loaded (and checked) before the data is read
    result = evaluate(model, data, split=split, device=device, batch_size=batch_size, limit=limit, quiet=quiet)
    emit(result, as_json, render)
