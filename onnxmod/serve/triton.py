"""A Triton Inference Server model repository entry for one onnxmod model.

``REPO/<name>/1/model.onnx`` (the input file's bytes), ``REPO/<name>/config.pbtxt``
(onnxruntime backend, ``max_batch_size``, dynamic batching, named I/O with dims that
exclude the batch) and ``REPO/<name>/labels.txt`` (one class name per line, named by
``label_filename`` on the output that ranks the classes, for Triton's classification
extension), plus ``manifest.json`` listing them: the entry is an onnxmod output like a module
dir, written into a hidden temporary folder beside it and renamed into place, and replaced with
``force`` only when it holds nothing else.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from onnxmod import outputs
from onnxmod.errors import OnnxmodError
from onnxmod.serve.model import PLATFORM, VERSION, ServedModel, TensorSpec

BACKEND = "onnxruntime"
LABELS = "labels.txt"
CONFIG = "config.pbtxt"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class TritonEntry:
    name: str
    directory: Path
    files: list[Path]
    max_batch: int


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _quoted(s: str) -> str:
    """A protobuf text-format string: a graph's tensor names may hold quotes, backslashes or line breaks."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03o}" for b in s.encode()) + '"'


def _tensor_block(t: TensorSpec, label_file: str | None) -> str:
    dims = list(t.shape[1:])
    lines = [f"    name: {_quoted(t.name)}", f"    data_type: {_triton_type(t.datatype)}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:  # a [N] tensor: Triton wants dims [1] reshaped to a scalar per batch row
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(model: ServedModel, max_batch: int, max_delay_ms: float) -> str:
    """Triton model configuration (protobuf text format) for ``model`` served under ``model.name``."""
    labelled = model.prediction_output if model.classes else None
    inputs = ",\n".join([_tensor_block(model.input, None)])
    outputs = ",\n".join(_tensor_block(o, LABELS if o.name == labelled else None) for o in model.outputs)
    return (f'name: "{model.name}"\n'
            f'platform: "{PLATFORM}"\n'
            f'backend: "{BACKEND}"\n'
            f"max_batch_size: {max_batch}\n"
            f"version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}\n"
            f"input [\n{inputs}\n]\n"
            f"output [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(round(max_delay_ms * 1000))}\n}}\n"
            f"# written by onnxmod export-triton from {json.dumps(model.path.name)} ({model.kind}, "
            f"{len(model.classes)} classes)\n")


def _write_files(root: Path, model: ServedModel, max_batch: int, max_delay_ms: float) -> list[Path]:
    (root / VERSION).mkdir()
    shutil.copyfile(model.path, root / VERSION / MODEL_FILE)
    (root / CONFIG).write_text(config_pbtxt(model, max_batch, max_delay_ms), encoding="utf-8")
    # class names hold no line breaks (checked where they enter), so one line per class
    (root / LABELS).write_text("".join(f"{c}\n" for c in model.classes), encoding="utf-8")
    return [Path(VERSION) / MODEL_FILE, Path(CONFIG), Path(LABELS)]


def export_triton(model_path: Path, repo: Path, name: str | None = None, max_batch: int = 64,
                  max_delay_ms: float = 2.0, force: bool = False) -> TritonEntry:
    """Write ``repo/<name>/`` for the model at ``model_path``.

    The entry follows the output rule of every command (:mod:`onnxmod.outputs`): an existing one is replaced
    only with ``force`` and only when onnxmod wrote all of it (its ``manifest.json`` lists the files); REPO
    itself is a folder it adds to, created if missing, never the file system root.
    """
    if not (1 <= max_batch <= 65_536 and math.isfinite(max_delay_ms) and 0 <= max_delay_ms <= 60_000):
        raise OnnxmodError(f"max_batch must be 1..65536 and max_delay_ms a number of 0..60000, "
                           f"got {max_batch} and {max_delay_ms}")
    repo = Path(repo)
    if repo.resolve() == Path(repo.resolve().anchor):
        raise OnnxmodError(f"{repo}: is the file system root; give a model repository folder")
    if repo.exists() and not repo.is_dir():
        raise OnnxmodError(f"{repo}: exists and is not a directory")
    model = ServedModel.load(model_path, name, device="cpu")  # the same checks as serve
    entry = outputs.check_output(repo / model.name, inputs=[model_path], force=force, directory=True)
    made = [d for d in [repo, *repo.parents] if not d.exists()]  # removed again if the write fails
    try:
        with outputs.atomic_dir(entry) as tmp:
            files = _write_files(tmp, model, max_batch, max_delay_ms)
            (tmp / outputs.MANIFEST).write_text(json.dumps(
                {"kind": "triton", "model": model.name, "source": model.path.name, "max_batch": max_batch,
                 "files": [f.as_posix() for f in files]}, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return TritonEntry(model.name, entry, [entry / f for f in files], max_batch)
