"""Open Inference Protocol (KServe v2) infer requests and responses, as ``tritonclient.http`` speaks them.

Pure functions over bytes and numpy arrays, so every rule is testable without a server.

Binary tensor data extension: a request whose header ``Inference-Header-Content-Length: L``
is set carries its JSON in the first ``L`` bytes of the body and the raw little-endian,
row-major tensor bytes after it, in input order; an input with binary data says so with
``parameters.binary_data_size``. An output is returned binary when it asks for it
(``outputs[i].parameters.binary_data``) or, with no explicit outputs, when the request sets
``parameters.binary_data_output``; the response then has the same header and layout.
Classification extension: ``outputs[i].parameters.classification = k`` returns, per row,
the top ``k`` entries as BYTES strings ``"<value>:<index>:<class name>"``.

Validation, before anything is allocated from what a request declares: JSON nested more than
``MAX_JSON_DEPTH`` levels (outside a tensor's ``data``, whose nesting must be its rank), an
integer literal of more than ``MAX_INT_DIGITS`` digits, a shape whose element count the body
cannot hold (counted exactly, never in int64), and tensor values that are not finite (NaN,
``Infinity``, ``1e999``, or beyond FP32) are all 400. A response never carries a bare ``NaN``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from onnxmod.serve.model import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"

V2_TO_NUMPY = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16,
    "INT64": np.int64, "INT32": np.int32, "INT16": np.int16, "INT8": np.int8,
    "UINT64": np.uint64, "UINT32": np.uint32, "UINT16": np.uint16, "UINT8": np.uint8, "BOOL": np.bool_,
}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and the protocol's ``{"error": message}`` body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> ApiError:
    return ApiError(400, message)


MAX_JSON_DEPTH = 32  # a v2 request needs 4 levels, plus a tensor's rank inside its 'data'
MAX_INT_DIGITS = 20  # every int64 and uint64 fits


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise bad(f"request JSON holds an integer of {len(text.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_constant(text: str) -> float:
    raise bad(f"request JSON holds {text}; values must be finite numbers")


def _check_depth(obj: Any) -> None:
    """At most MAX_JSON_DEPTH levels of arrays/objects; a tensor's 'data' is left to its shape check."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"request JSON is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for k, v in node.items()
                         if isinstance(v, (list, dict)) and not (k == "data" and isinstance(v, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (list, dict)))


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-k strings instead of the tensor when > 0


@dataclass
class InferRequest:
    x: np.ndarray  # float32 [n, C, H, W]
    outputs: list[RequestedOutput]
    id: str | None = None


# --------------------------------------------------------------------------- requests
def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(decoded JSON header, binary tail) of an infer request body."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LENGTH} {header_length[:20]!r} is not an integer") from None
        if not 0 < n <= len(body):
            raise bad(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        json_part, binary = body[:n], memoryview(body)[n:]
    try:
        req = json.loads(json_part, parse_int=_parse_int, parse_constant=_parse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"request JSON does not parse: {e}") from None
    except RecursionError:  # the C scanner stops at the interpreter's recursion limit, long before the C stack
        raise bad(f"request JSON is nested more than {MAX_JSON_DEPTH} levels deep") from None
    _check_depth(req)
    return req, binary


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(shape: Any, spec: TensorSpec) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise bad(f"input '{spec.name}': shape must be a list of integers, got {json.dumps(shape)[:80]}")
    want = list(spec.shape[1:])
    if len(shape) != len(spec.shape) or shape[1:] != want or shape[0] < 1:
        raise bad(f"input '{spec.name}': shape {shape} does not match [n, {', '.join(map(str, want))}] with n >= 1")
    return tuple(shape)


def _json_data(data: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    if not isinstance(data, list):
        raise bad(f"input '{name}': 'data' must be a list of numbers")
    try:
        arr = np.asarray(data)
    except ValueError:  # ragged nesting, or deeper than numpy's dimensions
        raise bad(f"input '{name}': 'data' is ragged") from None
    if arr.size and arr.dtype.kind not in "fiu":  # strings, booleans, objects, nulls
        raise bad(f"input '{name}': 'data' holds {arr.dtype.kind!r}-kind values, expected FP32 numbers")
    if arr.ndim not in (1, len(shape)):
        raise bad(f"input '{name}': 'data' is nested {arr.ndim} deep; flat, or nested as its shape {list(shape)}")
    need = math.prod(shape)
    if arr.size != need:
        raise bad(f"input '{name}': 'data' has {arr.size} values, shape {list(shape)} needs {need}")
    with np.errstate(over="ignore"):  # beyond FP32: infinity, refused by the finite check
        return arr.astype(np.float32).reshape(shape)


def _binary_data(size: Any, binary: memoryview, shape: tuple[int, ...], name: str) -> np.ndarray:
    need = math.prod(shape) * 4
    if not _is_int(size) or size != need:
        raise bad(f"input '{name}': binary_data_size {size} but FP32 shape {list(shape)} needs {need} bytes")
    if need > len(binary):
        raise bad(f"input '{name}': {need} bytes of binary data expected, only {len(binary)} sent")
    return np.frombuffer(binary[:need], dtype="<f4").reshape(shape).astype(np.float32)


def _requested_outputs(req: dict, outputs: Sequence[TensorSpec]) -> list[RequestedOutput]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("'parameters' must be an object")
    asked = req.get("outputs")
    if asked is None:
        binary = params.get("binary_data_output", False)
        if not isinstance(binary, bool):
            raise bad("parameters.binary_data_output must be true or false")
        return [RequestedOutput(o.name, binary) for o in outputs]
    if not isinstance(asked, list) or not asked:
        raise bad("'outputs' must be a non-empty list")
    known = {o.name: o for o in outputs}
    wanted = []
    for o in asked:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise bad("each of 'outputs' must be an object with a 'name'")
        if o["name"] not in known:
            raise bad(f"unknown output '{o['name']}' (the model has {', '.join(known)})")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise bad(f"output '{o['name']}': 'parameters' must be an object")
        binary, k = p.get("binary_data", False), p.get("classification", 0)
        if not isinstance(binary, bool):
            raise bad(f"output '{o['name']}': binary_data must be true or false")
        if not _is_int(k) or k < 0:
            raise bad(f"output '{o['name']}': classification must be a non-negative integer")
        spec = known[o["name"]]
        if k and (len(spec.shape) != 2 or not spec.datatype.startswith("FP")):
            raise bad(f"output '{o['name']}': classification needs a [N, K] float output")
        wanted.append(RequestedOutput(o["name"], binary, k))
    return wanted


def parse_infer(body: bytes, header_length: str | None, inp: TensorSpec,
                outputs: Sequence[TensorSpec]) -> InferRequest:
    """Validate an infer request against the model's input and outputs; ApiError(400) when it is wrong."""
    req, binary = split_body(body, header_length)
    if not isinstance(req, dict):
        raise bad("request JSON must be an object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"'inputs' must be a list of exactly one tensor object, '{inp.name}'")
    t = inputs[0]
    if t.get("name") != inp.name:
        raise bad(f"unknown input '{t.get('name')}' (the model takes '{inp.name}')")
    if t.get("datatype") != inp.datatype:
        raise bad(f"input '{inp.name}': datatype {t.get('datatype')!r}, expected {inp.datatype}")
    shape = _check_shape(t.get("shape"), inp)
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"input '{inp.name}': 'parameters' must be an object")
    if "binary_data_size" in params and "data" in t:
        raise bad(f"input '{inp.name}': both 'data' and binary_data_size given")
    if "binary_data_size" not in params and "data" not in t:
        raise bad(f"input '{inp.name}': no 'data' and no binary_data_size")
    count = math.prod(shape)  # exact: a shape like [2**54 + 1, 3, 32, 32] overflows int64
    if count > len(body):  # a value takes at least one character of JSON, or 4 bytes of binary data
        raise bad(f"input '{inp.name}': shape {list(shape)} declares {count:,} values, more than a body of "
                  f"{len(body):,} bytes can hold")
    if "binary_data_size" in params:
        x = _binary_data(params["binary_data_size"], binary, shape, inp.name)
        used = x.nbytes
    else:
        x = _json_data(t["data"], shape, inp.name)
        used = 0
    if used != len(binary):
        raise bad(f"{len(binary) - used} bytes of binary data after the inputs")
    finite = np.isfinite(x)
    if not finite.all():
        raise bad(f"input '{inp.name}': {int(x.size - np.count_nonzero(finite)):,} of its {x.size:,} values are not "
                  "finite (NaN or infinity, or beyond FP32); pixels must be finite numbers")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad("'id' must be a string")
    return InferRequest(np.ascontiguousarray(x), _requested_outputs(req, outputs), rid)


# --------------------------------------------------------------------------- responses
def serialize_bytes(strings: Sequence[bytes]) -> bytes:
    """BYTES tensor in the binary extension: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(s)) + s for s in strings)


def classification(values: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Top-``k`` per row as ``value:index[:label]`` byte strings, shape ``[N, k]`` (Triton's format)."""
    k = min(k, values.shape[1])
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    named = len(labels) == values.shape[1]
    rows = [[f"{float(v[j])}:{int(j)}{':' + labels[j] if named else ''}".encode() for j in idx]
            for v, idx in zip(values, order)]
    return np.array(rows, dtype=object).reshape(len(values), k)


def encode_infer(model_name: str, version: str, request: InferRequest, results: dict[str, np.ndarray],
                 datatypes: dict[str, str], labels: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """Response body and headers; binary outputs follow the JSON header in request order."""
    outs, tails = [], []
    for o in request.outputs:
        arr, datatype = results[o.name], datatypes[o.name]
        if o.classification:
            arr, datatype = classification(arr, o.classification, labels), "BYTES"
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(arr.shape)}
        if o.binary:
            raw = (serialize_bytes(arr.reshape(-1).tolist()) if datatype == "BYTES"
                   else np.ascontiguousarray(arr, dtype=np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            if datatype != "BYTES" and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise bad(f"output '{o.name}' is not finite for this input (NaN or infinity, which JSON cannot carry; "
                          "ask for it as binary_data)")
            flat = arr.reshape(-1).tolist()
            entry["data"] = [s.decode() for s in flat] if datatype == "BYTES" else flat
        outs.append(entry)
    head: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outs}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, allow_nan=False).encode()
    if not tails:
        return header, {"content-type": "application/json"}
    return header + b"".join(tails), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
