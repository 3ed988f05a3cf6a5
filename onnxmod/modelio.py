"""Loading, validating and atomically writing ONNX models, and onnxmod metadata.

All reads and writes of model files and of ``metadata_props`` go through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import onnx

from onnxmod import outputs
from onnxmod.errors import OnnxmodError

# metadata keys (docs/DESIGN.md)
KIND = "onnxmod.kind"
CLASSES = "onnxmod.classes"
PREPROCESS = "onnxmod.preprocess"
CLASS_NAME = "onnxmod.class_name"
CLASS_INDEX = "onnxmod.class_index"
SOURCE = "onnxmod.source"
KEPT = "onnxmod.kept"
CALIBRATION = "onnxmod.calibration"
FORMAT_VERSION = "onnxmod.format_version"
FRONTEND = "onnxmod.frontend"  # list of the front-end rewrites decompose made to read the source
FORMAT = "1"


def require_file(p: Path, what: str = "a file") -> None:
    """A readable input must be a regular file: not missing, a directory, or a FIFO/device that blocks reads."""
    if not p.exists():
        raise OnnxmodError(f"{p}: no such file")
    if p.is_dir():
        raise OnnxmodError(f"{p}: is a directory, expected {what}")
    if not p.is_file():
        raise OnnxmodError(f"{p}: is not a regular file (a pipe or device?), expected {what}")


def load_model(path: str | os.PathLike, check: bool = False) -> onnx.ModelProto:
    """Read an ONNX file; raise OnnxmodError (not a traceback) when it is missing or not ONNX.

    ``check``: also run the full ONNX checker, so a broken graph is blamed on the file
    before anything runs it.
    """
    p = Path(path)
    require_file(p, "an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise OnnxmodError(f"{p}: not an ONNX model ({type(e).__name__})") from None
    if len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise OnnxmodError(f"{p}: not an ONNX model (empty graph)")
    _load_external_data(model, p)
    if check:
        check_input(model, str(p))
    return model


def _load_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Pull tensors stored beside the model into it; only files inside the model's own directory."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    base = p.resolve().parent
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for t in external:
        loc = ExternalDataInfo(t).location
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise OnnxmodError(f"{p}: tensor '{t.name}' keeps its data in '{loc}', outside the model's "
                               "directory; refused")
        if not target.is_file():
            raise OnnxmodError(f"{p}: tensor '{t.name}' keeps its data in '{loc}', which is missing")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as e:
            raise OnnxmodError(f"{p}: cannot read its external data ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def check_input(model: onnx.ModelProto, where: str) -> None:
    """Full ONNX checker on a model the user gave: a broken file is the file's fault, named with the checker's reason."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise OnnxmodError(f"{where}: invalid ONNX model ({_first_line(e)})") from None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def get_meta(model: onnx.ModelProto, key: str, default: Any = None, as_json: bool = True) -> Any:
    """Value of ``metadata_props[key]`` (JSON-decoded unless ``as_json=False``)."""
    for p in model.metadata_props:
        if p.key == key:
            if not as_json:
                return p.value
            try:
                return json.loads(p.value)
            except json.JSONDecodeError:
                return p.value
    return default


def set_meta(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Set metadata keys in place; non-strings are JSON-encoded."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        s = v if isinstance(v, str) else json.dumps(v)
        if k in existing:
            existing[k].value = s
        else:
            model.metadata_props.add(key=k, value=s)


def drop_meta(model: onnx.ModelProto, key: str) -> None:
    """Remove ``key`` from ``metadata_props`` (in place) if present."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def model_kind(model: onnx.ModelProto) -> str:
    """``source``/``module``/``composed`` from metadata; ``source`` for third-party models."""
    return get_meta(model, KIND, "source", as_json=False)


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """Full ONNX checker; an internal error if onnxmod itself produced an invalid graph."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise RuntimeError(f"onnxmod produced an invalid {what}: {e}") from e


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file beside ``path``; it replaces ``path`` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves nothing behind.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=outputs.temp_prefix(p), suffix=".tmp", dir=str(p.parent))
    except OSError as e:
        raise OnnxmodError(f"{p}: cannot write in {p.parent} ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike, check: bool = True) -> Path:
    """Check, then write atomically (temp file in the same dir + rename)."""
    p = Path(path)
    if check:
        check_model(model, p.name)
    with atomic_path(p) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
