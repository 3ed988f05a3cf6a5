"""Loading, validating and atomically writing ONNX models, and onnxmod metadata.

All reads and writes of model files and of ``metadata_props`` go through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator

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
    check_metadata(model, str(p))  # before anything reads it: no command sees raw, unchecked metadata
    check_graph(model, str(p))
    _minus_one_as_unknown(model)
    _load_external_data(model, p)
    if check:
        check_input(model, str(p))
    return model


def _minus_one_as_unknown(model: onnx.ModelProto) -> None:
    """A dim of -1 (Paddle's and some converters' 'unknown') becomes an unknown dim in the loaded copy:
    onnxruntime aborts the process on a negative dim instead of raising."""
    g = model.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value == -1:
                    d.Clear()


def _load_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Pull tensors stored beside the model into it; only files inside the model's own directory."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    base = p.resolve().parent
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for t in external:
        try:  # its offset and length must be non-negative integers (onnx raises ValueError on "abc" or -5)
            info = ExternalDataInfo(t)
            int(info.length or 0)
        except ValueError as e:
            raise OnnxmodError(f"{p}: tensor '{t.name}': bad external data entry ({_first_line(e)}); refused") from None
        if int(info.length or 0) < 0:
            raise OnnxmodError(f"{p}: tensor '{t.name}': external data length {info.length} is negative; refused")
        loc = info.location
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise OnnxmodError(f"{p}: tensor '{t.name}' keeps its data in '{loc}', outside the model's "
                               "directory; refused")
        if not target.is_file():
            raise OnnxmodError(f"{p}: tensor '{t.name}' keeps its data in '{loc}', which is missing")
        _check_external_size(t, ExternalDataInfo(t), target, p)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as e:
            raise OnnxmodError(f"{p}: cannot read its external data ({type(e).__name__}: {_first_line(e)})") from None


def _check_external_size(t: onnx.TensorProto, info: Any, target: Path, p: Path) -> None:
    """A tensor reads exactly the bytes its shape needs: a small model pointing at a huge file (no length, or a
    length that disagrees with the dims) would otherwise be read whole into memory."""
    fixed = t.data_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)  # strings: no fixed size
    need = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if fixed else None
    offset = int(info.offset or 0)
    length = int(info.length) if info.length else target.stat().st_size - offset
    if need is not None and length != need:
        raise OnnxmodError(f"{p}: tensor '{t.name}' of shape {list(t.dims)} needs {need:,} bytes but would read "
                           f"{length:,} from '{info.location}'; refused")
    if offset < 0 or offset + length > target.stat().st_size:
        raise OnnxmodError(f"{p}: tensor '{t.name}' reads past the end of '{info.location}'; refused")


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def check_input(model: onnx.ModelProto, where: str) -> None:
    """Full ONNX checker on a model the user gave: a broken file is the file's fault, named with the checker's reason."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise OnnxmodError(f"{where}: invalid ONNX model ({_first_line(e)})") from None


# --------------------------------------------------------------------------- graph structure
def _node_label(n: onnx.NodeProto, i: int) -> str:
    return f"'{n.name}' ({n.op_type})" if n.name else f"#{i} ({n.op_type})"


MAX_INPUT_VALUES = 1 << 30  # values of one input row (C*H*W): 4 GiB of float32 an image


def _check_dims(model: onnx.ModelProto, where: str) -> None:
    """Graph input dims at least -1 (the 'unknown' some exporters write, as Paddle does; the frontend reads it as
    unknown) and one row (all but the batch dim) at most MAX_INPUT_VALUES values (a -5 dim
    aborted onnxruntime, 2**40 sides made numpy refuse the image buffer); an initializer's dims non-negative and
    matching the bytes it holds (dims of 2**40 over 48 bytes failed deep in onnx-graphsurgeon)."""
    for i in model.graph.input:
        if not i.type.HasField("tensor_type") or not i.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        if any(d is not None and d < -1 for d in dims):
            raise OnnxmodError(f"{where}: graph input '{i.name}' has a negative dimension {dims}")
        row = math.prod(d for d in dims[1:] if d and d > 0)
        if row > MAX_INPUT_VALUES:
            raise OnnxmodError(f"{where}: graph input '{i.name}' of shape {dims} holds {row:,} values an image, more "
                               f"than {MAX_INPUT_VALUES:,}; refused")
    inits = list(model.graph.initializer)
    inits += [n_attr.t for n in model.graph.node for n_attr in n.attribute if n_attr.HasField("t")]
    for t in inits:
        if any(d < 0 for d in t.dims):
            raise OnnxmodError(f"{where}: tensor '{t.name}' has a negative dimension {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.raw_data:
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:  # noqa: BLE001 - undefined, string or packed 4-bit types: no fixed byte size
            continue
        if t.data_type in _PACKED or t.data_type == onnx.TensorProto.STRING:
            continue
        need = math.prod(t.dims) * itemsize
        if need != len(t.raw_data):
            raise OnnxmodError(f"{where}: tensor '{t.name}' of shape {list(t.dims)} needs {need:,} bytes but holds "
                               f"{len(t.raw_data):,}")


_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
           if hasattr(onnx.TensorProto, n)}


def check_graph(model: onnx.ModelProto, where: str) -> None:
    """Every node input has a producer and the nodes form no cycle, checked when a file is loaded:
    onnx-graphsurgeon's topological sort and onnxruntime would otherwise fail far from the file's fault."""
    _check_dims(model, where)
    g = model.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o and o in producer:
                raise OnnxmodError(f"{where}: tensor '{o}' is written by two nodes, "
                                   f"{_node_label(g.node[producer[o]], producer[o])} and {_node_label(n, i)}")
            if o:
                producer[o] = i
    for i, n in enumerate(g.node):
        for t in n.input:
            if t and t not in producer and t not in known:
                raise OnnxmodError(f"{where}: node {_node_label(n, i)} reads '{t}', which no node, initializer "
                                   "or graph input produces")
    for o in g.output:
        if o.name not in producer and o.name not in known:
            raise OnnxmodError(f"{where}: graph output '{o.name}' is produced by no node")
    preds = [sorted({producer[t] for t in n.input if t in producer}) for n in g.node]
    succ: list[list[int]] = [[] for _ in g.node]
    waiting = [len(p) for p in preds]
    for i, ps in enumerate(preds):
        for j in ps:
            succ[j].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    while ready:  # Kahn's sort: what is never ready lies on a cycle or after one
        for j in succ[ready.pop()]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    left = {i for i, w in enumerate(waiting) if w > 0}
    if left:
        i, seen = min(left), set()
        while i not in seen:  # back through predecessors still left until one repeats: that node is on the cycle
            seen.add(i)
            i = next(j for j in preds[i] if j in left)
        raise OnnxmodError(f"{where}: the graph has a cycle through node {_node_label(g.node[i], i)}")


# --------------------------------------------------------------------------- metadata schema
# Every onnxmod.* key is checked once, when a file is loaded (load_model), so no command reads a value it
# cannot use: a class_index of "1e400", classes "42", a preprocess list, NaN calibration, a name with a newline.
MAX_CLASSES = 100_000  # class lists (and npz labels without names) beyond this are refused, never allocated
MAX_NAME = 256  # characters of a class name
MAX_SIDE = 8192  # image height/width a flag or metadata value may ask for (8192² RGB floats: 0.8 GB an image)
_MAX_DEPTH = 32  # nesting of a metadata JSON value (onnxmod writes 4 at most)
KINDS = ("source", "module", "composed")
_LINE_BREAKING = ("Cc", "Cs", "Zl", "Zp")  # control characters, lone surrogates, line/paragraph separators


class _Bad(ValueError):
    """What is wrong with one metadata value; check_metadata adds the key and the file."""


def show(value: Any, most: int = 60) -> str:
    """``value`` for a one-line message: its repr (control characters escaped), cut to ``most`` characters."""
    r = repr(value[:most + 1] if isinstance(value, str) else value)
    return r if len(r) <= most else r[:most - 4] + "...'"


def class_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a class name, None when it can. A name becomes one line of Triton's
    labels.txt, part of a file name and a JSON key: a non-empty string, no control characters or line breaks."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    if not name.strip():
        return "is empty"
    if len(name) > MAX_NAME:
        return f"is {len(name)} characters long (at most {MAX_NAME})"
    bad = next((c for c in name if unicodedata.category(c) in _LINE_BREAKING), None)
    return None if bad is None else f"holds the control character {bad!r}"


def class_names_problem(names: list[Any]) -> str | None:
    """Why ``names`` cannot be a model's class list (a bad name, a name twice, too many), None when it can."""
    if len(names) > MAX_CLASSES:
        return f"{len(names)} class names (at most {MAX_CLASSES})"
    seen: set[str] = set()
    for n in names:
        why = class_name_problem(n)
        if why:
            return f"class name {show(n)} {why}"
        if n in seen:
            return f"class name {show(n)} appears twice; class names must be unique"
        seen.add(n)
    return None


def check_class_names(names: list[Any], where: str) -> list[str]:
    """``names`` when they can be a model's classes (where they enter: data, metadata), else OnnxmodError."""
    why = class_names_problem(names)
    if why:
        raise OnnxmodError(f"{where}: {why}")
    return names


def _parse(raw: str) -> Any:
    def constant(token: str) -> None:
        raise _Bad(f"holds {token}, not a finite number")

    try:
        value = json.loads(raw, parse_constant=constant)
    except _Bad:
        raise
    except RecursionError:
        raise _Bad("is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError; an integer of thousands of digits
        raise _Bad(f"is not valid JSON ({str(e).split(':')[0]})") from None
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Bad("is nested too deeply")
        if isinstance(v, float) and not math.isfinite(v):  # 1e400 parses as inf
            raise _Bad(f"holds {v}, not a finite number")
        if isinstance(v, (dict, list)):
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(ok: bool, what: str, v: Any) -> None:
    if not ok:
        raise _Bad(f"{what}, got {show(v)}")


def _obj(v: Any, what: str = "the value") -> dict[str, Any]:
    _need(isinstance(v, dict), f"{what} must be a JSON object", v)
    return v


def _opt(d: dict[str, Any], key: str, ok: Callable[[Any], bool], what: str, required: bool = False) -> None:
    """``d[key]`` must pass ``ok`` (when present, or always when ``required``)."""
    if key in d or required:
        _need(ok(d.get(key)), f"'{key}' must be {what}", d.get(key))


def _size_ok(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(s, 1, MAX_SIDE) for s in v)


def _strs_ok(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _image_channels(model: onnx.ModelProto) -> set[int]:
    """Channel counts the image input may have (dims 1 and 3 when fixed: NCHW or NHWC), empty when unknown."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return set()
    dims = inputs[0].type.tensor_type.shape.dim
    return {d.dim_value for j, d in enumerate(dims) if j in (1, 3) and d.HasField("dim_value")} if len(dims) == 4 else set()


def _num_outputs(model: onnx.ModelProto) -> int | None:
    """K of a first output [N, K], None when not fixed."""
    if not model.graph.output:
        return None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None


def _check_kind(raw: str, model: onnx.ModelProto) -> None:
    if raw not in KINDS:
        raise _Bad(f"{show(raw)} is not supported ({', '.join(KINDS)})")


def _check_format(raw: str, model: onnx.ModelProto) -> None:
    _need(raw == FORMAT, f"this onnxmod reads format {FORMAT}", raw)


def _check_class_name(raw: str, model: onnx.ModelProto) -> None:
    why = class_name_problem(raw)
    if why:
        raise _Bad(f"class name {show(raw)} {why}")


def _check_class_index(v: Any, model: onnx.ModelProto) -> None:
    _need(_is_int(v, 0, MAX_CLASSES - 1), f"must be an integer in 0..{MAX_CLASSES - 1}", v)


def _check_source(v: Any, model: onnx.ModelProto) -> None:
    d = _obj(v)
    for k in ("name", "sha256"):
        _opt(d, k, lambda x: isinstance(x, str), "a string", required=True)
    _opt(d, "num_classes", lambda x: _is_int(x, 1, MAX_CLASSES), f"an integer in 1..{MAX_CLASSES}", required=True)
    for k in ("params", "flops"):
        _opt(d, k, _is_int, "an integer >= 0", required=True)


def _check_kept(v: Any, model: onnx.ModelProto) -> None:
    d = _obj(v)
    for k in ("param_fraction", "flop_fraction", "target_macs"):
        _opt(d, k, lambda x: _is_num(x) and x >= 0, "a number >= 0")
    if "channels" in d:
        ch = _obj(d["channels"], "'channels'")
        for k in ("kept", "total"):
            _opt(ch, k, _is_int, "an integer >= 0")
    for k in ("strategy", "fill"):
        _opt(d, k, lambda x: isinstance(x, str), "a string")
    for k in ("reconstructed", "repaired"):
        _opt(d, k, lambda x: isinstance(x, bool), "true or false")


def _check_calibration(v: Any, model: onnx.ModelProto) -> None:
    d = _obj(v)
    _opt(d, "method", lambda x: isinstance(x, str), "a string", required=True)
    for k in ("a", "b"):
        _opt(d, k, _is_num, "a number", required=True)
    _opt(d, "temperature", lambda x: _is_num(x) and x > 0, "a number > 0", required=True)
    _opt(d, "samples", _is_int, "an integer >= 0", required=True)
    for k in ("nll_before", "nll_after"):
        _opt(d, k, lambda x: x is None or _is_num(x), "a number or null")
    _opt(d, "temperature_fitted", lambda x: isinstance(x, bool), "true or false")


def _check_preprocess(v: Any, model: onnx.ModelProto) -> None:
    d = _obj(v)
    for k in ("mean", "std"):
        _opt(d, k, lambda x: isinstance(x, list) and 0 < len(x) <= 16 and all(map(_is_num, x)),
             "a list of 1 to 16 numbers")
    _opt(d, "std", lambda x: all(s != 0 for s in x), "non-zero")
    _opt(d, "scale", lambda x: _is_num(x) and x > 0, "a number > 0")
    for k in ("in_graph", "assumed"):
        _opt(d, k, lambda x: isinstance(x, bool), "true or false")
    _opt(d, "input_size", _size_ok, f"[H, W], integers in 1..{MAX_SIDE}")
    if "mean" in d and "std" in d and len(d["mean"]) != len(d["std"]):
        raise _Bad(f"'mean' has {len(d['mean'])} values but 'std' {len(d['std'])}")
    if d.get("in_graph", True) is False:  # decompose puts this normalisation into the graph: it must fit the input
        if not all(k in d for k in ("mean", "std", "scale")):
            raise _Bad("'mean', 'std' and 'scale' are needed when 'in_graph' is false")
        channels = _image_channels(model)
        if channels and len(d["mean"]) not in channels | {1}:
            raise _Bad(f"'mean' has {len(d['mean'])} values but the input has {' or '.join(map(str, sorted(channels)))} "
                       "channels")


def _check_classes(v: Any, model: onnx.ModelProto) -> None:
    composed = get_meta(model, KIND, as_json=False) == "composed"
    form = "{name, ...} objects" if composed else "class names or of {name, ...} objects"
    _need(isinstance(v, list) and 0 < len(v) <= MAX_CLASSES, f"must be a list of {form}", v)
    names = []
    for i, c in enumerate(v):
        if isinstance(c, dict):
            for k in ("class_name", "source_sha256", "source_name", "module_sha256"):
                _opt(c, k, lambda x: isinstance(x, str), f"a string (entry {i})")
            _opt(c, "class_index", lambda x: _is_int(x, 0, MAX_CLASSES - 1), f"an integer >= 0 (entry {i})")
            c = c.get("name")
        else:
            _need(not composed, f"entry {i} must be a {{name, ...}} object", c)
        names.append(c)
    why = class_names_problem(names)
    if why:
        raise _Bad(why)
    k = _num_outputs(model) if model.graph.output and get_meta(model, KIND, "source", as_json=False) != "module" else None
    if k and k != len(names):
        raise _Bad(f"lists {len(names)} classes but output '{model.graph.output[0].name}' has {k}")


def _check_frontend(v: Any, model: onnx.ModelProto) -> None:
    _need(isinstance(v, list), "must be a list of records", v)
    for i, s in enumerate(v):
        d = _obj(s, f"record {i}")
        _opt(d, "step", lambda x: isinstance(x, str), f"a string (record {i})", required=True)
        for k in ("reshapes", "nodes", "splits", "also_removed"):
            _opt(d, k, _strs_ok, f"a list of names (record {i})")
        for k in ("shuffles", "rewrites"):
            _opt(d, k, lambda x: isinstance(x, list) and all(isinstance(e, dict) for e in x),
                 f"a list of objects (record {i})")
        for k in ("from", "to"):  # an upgrade goes from one version record to another; an input size from a flag or data
            if d.get("step") == "input_size":
                _opt(d, k, lambda x: isinstance(x, str), f"a string (record {i})")
            else:
                _opt(d, k, lambda x: isinstance(x, dict), f"an object (record {i})")
        _opt(d, "size", _size_ok, f"[H, W] (record {i})")


def _check_compose(v: Any, model: onnx.ModelProto) -> None:
    d = _obj(v)
    _opt(d, "rule", lambda x: isinstance(x, str), "a string")
    _opt(d, "rename", lambda x: isinstance(x, bool), "true or false")
    for k in ("opset", "module_macs_sum", "params", "module_params_sum", "nodes", "module_nodes_sum"):
        _opt(d, k, _is_int, "an integer >= 0")
    _opt(d, "macs", lambda x: x is None or _is_int(x), "an integer >= 0 or null")
    _opt(d, "temperatures", lambda x: isinstance(x, list) and all(_is_num(t) and t > 0 for t in x),
         "a list of numbers > 0")
    _opt(d, "module_macs", lambda x: isinstance(x, list) and all(map(_is_int, x)), "a list of integers >= 0")
    _opt(d, "resized", _strs_ok, "a list of strings")


def _check_members(v: Any, model: onnx.ModelProto) -> None:
    _need(isinstance(v, list) and len(v) > 0, "must be a list of member records", v)
    for j, m in enumerate(v):
        d = _obj(m, f"member {j}")
        meta = _obj(d.get("metadata"), f"member {j}: 'metadata'")
        _need(all(isinstance(x, str) for x in meta.values()), f"member {j}: 'metadata' values must be strings", meta)
        for k in ("logit", "input"):
            _opt(d, k, lambda x: isinstance(x, str) and x, f"a tensor name (member {j})", required=True)
        _opt(d, "graph_name", lambda x: isinstance(x, str), f"a string (member {j})")
        _opt(d, "input_shape", lambda x: isinstance(x, list) and len(x) == 3 and all(_is_int(s, 1, MAX_SIDE) for s in x),
             f"[C, H, W] (member {j})", required=True)
        _opt(d, "batch", lambda x: (isinstance(x, str) and x) or _is_int(x, 1), f"a dimension name or size (member {j})",
             required=True)
        _opt(d, "opset", _is_int, f"an integer (member {j})")
        # the member's own module metadata, as a module file's (compose extracts modules from it)
        sub = onnx.ModelProto()
        for k, x in meta.items():
            sub.metadata_props.add(key=k, value=x)
        if get_meta(sub, KIND, as_json=False) != "module" or MEMBERS in meta:
            raise _Bad(f"member {j}: 'metadata' must be a module's")
        try:
            _check_props(sub)
        except _Bad as e:
            raise _Bad(f"member {j}: {e}") from None


COMPOSE = "onnxmod.compose"  # composed models: rule, temperatures, sizes (written by onnxmod.compose)
MEMBERS = "onnxmod.members"  # composed models: each member module's metadata and where it sits in the graph
_RAW = {KIND, CLASS_NAME, FORMAT_VERSION}  # plain strings; every other key holds JSON
_CHECKS: dict[str, Callable[[Any, onnx.ModelProto], None]] = {
    KIND: _check_kind, FORMAT_VERSION: _check_format, CLASS_NAME: _check_class_name, CLASS_INDEX: _check_class_index,
    SOURCE: _check_source, KEPT: _check_kept, CALIBRATION: _check_calibration, PREPROCESS: _check_preprocess,
    CLASSES: _check_classes, FRONTEND: _check_frontend, COMPOSE: _check_compose, MEMBERS: _check_members,
}
_REQUIRED = {"module": (CLASS_NAME, CLASS_INDEX, SOURCE, CALIBRATION), "composed": (CLASSES,)}


def _check_props(model: onnx.ModelProto) -> None:
    """Raise _Bad("KEY = VALUE: problem") for the first onnxmod.* key of ``model`` that breaks the schema."""
    seen: dict[str, str] = {}
    for p in model.metadata_props:
        if p.key.startswith("onnxmod.") and p.key in seen:
            raise _Bad(f"{p.key}: appears twice")
        seen[p.key] = p.value
    kind = seen.get(KIND, "source")
    for key, raw in seen.items():
        check = _CHECKS.get(key)
        if check is None:  # a key this version does not know (a newer onnxmod's): nothing reads it
            continue
        try:
            check(raw if key in _RAW else _parse(raw), model)
        except _Bad as e:
            raise _Bad(f"{key} = {show(raw, 40)}: {e}") from None
    for key in _REQUIRED.get(kind, ()):
        if key not in seen:
            raise _Bad(f"{key}: missing (every {kind} model records it)")
    if kind == "module":
        index, n = _parse(seen[CLASS_INDEX]), _parse(seen[SOURCE])["num_classes"]
        if index >= n:
            raise _Bad(f"{CLASS_INDEX} = {index}: out of range for a source of {n} classes")
    if CLASSES in seen and MEMBERS in seen and len(_parse(seen[CLASSES])) != len(_parse(seen[MEMBERS])):
        raise _Bad(f"{MEMBERS}: {len(_parse(seen[MEMBERS]))} members for {len(_parse(seen[CLASSES]))} classes")


def check_metadata(model: onnx.ModelProto, where: str) -> None:
    """The schema of every ``onnxmod.*`` key (docs/DESIGN.md): OnnxmodError naming the key and ``where``."""
    try:
        _check_props(model)
    except _Bad as e:
        raise OnnxmodError(f"{where}: bad metadata {e}") from None


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
