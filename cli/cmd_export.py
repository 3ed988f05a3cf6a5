"""`onnxmod export ARCH --weights W -o OUT.onnx`: a PyTorch CIFAR ResNet checkpoint -> source model."""

from __future__ import annotations

from pathlib import Path

import click

from onnxmod import modelio, outputs
from onnxmod.modelio import require_file
from onnxmod.cli.common import emit, float_list, force_option, json_option, quiet_option, say
from onnxmod.cli.main import cli
from onnxmod.errors import OnnxmodError

# SOURCES.md: the pretrained CIFAR ResNets take RGB in [0, 1] normalised like ImageNet
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
ARCHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def _read_classes(path: str) -> list[str]:
    p = Path(path)
    require_file(p, "a text file of class names")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OnnxmodError(f"{p}: cannot read class names ({type(e).__name__})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise OnnxmodError(f"{p}: no class names (expected one name per line)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OnnxmodError(f"{p}: duplicate class names: {', '.join(dup[:5])}")
    return modelio.check_class_names(names, str(p))  # a tab, a control character, 300 characters


def _checkpoint_classes(checkpoint, weights: str) -> list[str]:
    """The class names a checkpoint records, else the CIFAR-10 names for a 10-output classifier."""
    from onnxmod.converters.resnet_cifar import CIFAR10_CLASSES

    if checkpoint.classes is not None:
        return checkpoint.classes
    if checkpoint.num_classes in (None, len(CIFAR10_CLASSES)):
        return list(CIFAR10_CLASSES)
    raise OnnxmodError(f"{weights}: the checkpoint's classifier has {checkpoint.num_classes} outputs and it records "
                       "no class names; give them with --classes names.txt (one per line)")


@cli.command("export")
@click.argument("arch", type=click.Choice(sorted(ARCHS, key=ARCHS.get)), metavar="ARCH")
@click.option("--weights", "-w", required=True, type=click.Path(dir_okay=False), help="PyTorch checkpoint (.th/.pt).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Where to write the .onnx file.")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False),
              show_default="the checkpoint's own (bench/train_source.py records them), else the CIFAR-10 names",
              help="Class names, one per line.")
@click.option("--exporter", type=click.Choice(["legacy", "dynamo"]), default="legacy", show_default=True)
@click.option("--mean", default=None, show_default="the checkpoint's own, else ImageNet: 0.485,0.456,0.406",
              help="Per-channel mean.")
@click.option("--std", default=None, show_default="the checkpoint's own, else ImageNet: 0.229,0.224,0.225",
              help="Per-channel std.")
@force_option
@json_option
@quiet_option
def export_cmd(arch, weights, output, classes_file, exporter, mean, std, force, as_json, quiet):
    """Export a CIFAR ResNet checkpoint (ARCH: resnet20|32|44|56|110, or resnet8) to ONNX.

    The written model takes `input` float32 [N,3,32,32] in [0,1] (normalisation
    inside the graph) and outputs `logits` [N,K].

    \b
    Example:
      onnxmod export resnet20 --weights resnet20.th -o resnet20.onnx
      onnxmod export resnet8 -w r8.th -o r8.onnx --classes names.txt --exporter dynamo
    """
    outputs.check_output(output, inputs=[weights, classes_file], force=force)
    try:
        import torch  # noqa: F401

        from onnxmod.converters.export import count_params, export
        from onnxmod.converters.resnet_cifar import load_state, read_checkpoint, resnet_cifar
    except ImportError as e:
        raise OnnxmodError(f"export needs PyTorch ({e.name or e}): pip install onnxmod[torch]") from None

    checkpoint = read_checkpoint(weights)
    classes = _read_classes(classes_file) if classes_file else _checkpoint_classes(checkpoint, weights)
    mean_v = tuple(float_list(mean, "--mean", 3) or checkpoint.mean or DEFAULT_MEAN)
    std_v = tuple(float_list(std, "--std", 3) or checkpoint.std or DEFAULT_STD)
    if any(s == 0 for s in std_v):
        raise OnnxmodError("--std: values must be non-zero")
    if checkpoint.num_classes is not None and checkpoint.num_classes != len(classes):
        raise OnnxmodError(f"{weights}: the checkpoint's classifier has {checkpoint.num_classes} outputs but "
                           f"{len(classes)} class names were given ({classes_file or 'the CIFAR-10 names'})")

    model = resnet_cifar(ARCHS[arch], num_classes=len(classes))
    load_state(model, checkpoint.state_dict, weights)
    say(f"exporting {arch} from {weights} ({exporter} exporter)", quiet)
    out = export(model, output, classes=classes, mean=mean_v, std=std_v, exporter=exporter)
    result = {
        "output": str(out),
        "arch": arch,
        "exporter": exporter,
        "params": count_params(model),
        "classes": classes,
    }
    emit(
        result,
        as_json,
        lambda r: f"wrote {r['output']} ({r['arch']}, {r['params']} params, {len(r['classes'])} classes, {r['exporter']} exporter)",
    )
