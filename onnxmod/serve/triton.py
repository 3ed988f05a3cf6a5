"""A Triton Inference Server model repository entry for one onnxmod model.

``REPO/<name>/1/model.onnx`` (the input file's bytes), ``REPO/<name>/config.pbtxt``
(onnxruntime backend, ``max_batch_size``, dynamic batching, named I/O with dims that
exclude the batch) and ``REPO/<name>/labels.txt`` (one class name per line, named by
``label_filename`` on the output that ranks the classes, for Triton's classification
extension). The entry is written into a temporary folder inside REPO and renamed into
place; with ``force`` an existing entry gets these three files replaced one by one
(atomically each) and keeps everything else it holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def _tensor_block(t: TensorSpec, label_file: str | None) -> str:
    dims = list(t.shape[1:])
    lines = [f'    name: "{t.name}"', f"    data_type: {_triton_type(t.datatype)}"]
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


def _check_target(entry: Path, source: Path, force: bool) -> None:
    if entry.exists() and not entry.is_dir():
        raise OnnxmodError(f"{entry}: exists and is not a directory")
    if entry.exists() and not force:
        raise OnnxmodError(f"{entry}: already exists; pass --force to replace its {MODEL_FILE}, {CONFIG} and {LABELS}")
    target = entry / VERSION / MODEL_FILE
    if target.exists() and target.resolve() == source.resolve():
        raise OnnxmodError(f"{source}: is the entry's own {MODEL_FILE}; inputs are never overwritten")


def _write_files(root: Path, model: ServedModel, max_batch: int, max_delay_ms: float) -> list[Path]:
    (root / VERSION).mkdir()
    shutil.copyfile(model.path, root / VERSION / MODEL_FILE)
    (root / CONFIG).write_text(config_pbtxt(model, max_batch, max_delay_ms))
    (root / LABELS).write_text("".join(f"{c}\n" for c in model.classes))
    return [Path(VERSION) / MODEL_FILE, Path(CONFIG), Path(LABELS)]


def _umask_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def export_triton(model_path: Path, repo: Path, name: str | None = None, max_batch: int = 64,
                  max_delay_ms: float = 2.0, force: bool = False) -> TritonEntry:
    """Write ``repo/<name>/`` for the model at ``model_path``; never deletes what it did not create."""
    model = ServedModel.load(model_path, name, device="cpu")  # the same checks as serve
    entry = repo / model.name
    _check_target(entry, model_path, force)
    if repo.exists() and not repo.is_dir():
        raise OnnxmodError(f"{repo}: exists and is not a directory")
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", suffix=".tmp", dir=repo))
    try:
        os.chmod(tmp, _umask_dir_mode())  # mkdtemp makes 0700 dirs
        files = _write_files(tmp, model, max_batch, max_delay_ms)
        if not entry.exists():
            os.rename(tmp, entry)
        else:  # --force: replace our three files in place, keep the rest of the entry
            (entry / VERSION).mkdir(exist_ok=True)
            for f in files:
                os.replace(tmp / f, entry / f)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return TritonEntry(model.name, entry, [entry / f for f in files], max_batch)
