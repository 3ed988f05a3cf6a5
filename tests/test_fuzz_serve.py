"""Fuzzing serve's request validator (issue 24): hostile infer requests against a live server.

Hypothesis builds v2 infer requests with hostile parts (shapes with huge, negative or non-integer dims,
data with NaN / infinities / values beyond FP32, JSON nested deep, integers of thousands of digits, wrong
types, binary tails that disagree with their header) and sends each to a real server for the sample ResNet8.
The contract: 200 with strict JSON, or 400/413 with exactly ``{"error": ...}``; never a 500; the server live
after every example. Derandomized and few examples, so the file runs in seconds; a failure prints the
falsifying example and a blob to reproduce it (ONNXMOD_FUZZ_RANDOM=1 ONNXMOD_FUZZ_EXAMPLES=500: a new hunt).
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from onnxmod.serve.server import ServeSettings, load_models, serve_in_thread

RESNET8 = Path(__file__).resolve().parent.parent / "sample_graphs" / "resnet8_cifar10.onnx"
FUZZ = settings(max_examples=int(os.environ.get("ONNXMOD_FUZZ_EXAMPLES", 60)),
                derandomize=not os.environ.get("ONNXMOD_FUZZ_RANDOM"), deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def host() -> str:
    models = load_models([RESNET8], ["m"], device="cpu")
    with serve_in_thread(models, ServeSettings(port=0, device="cpu", max_batch=4, max_delay_ms=1.0,
                                               max_body_mb=MAX_BODY / (1 << 20), read_timeout_s=5.0)) as url:
        yield url.removeprefix("http://")


def _post(host: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request("POST", "/v2/models/m/infer", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _alive(host: str) -> bool:
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    finally:
        conn.close()


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 70, 2 ** 70),
                    st.sampled_from([1e39, -1e39, 0.5, 0.0]), st.text(max_size=3), st.none(), st.booleans())
dims = st.one_of(st.integers(-5, 40), st.sampled_from([2 ** 54 + 1, 2 ** 63, 2 ** 64 + 1, 10 ** 19]),
                 st.floats(allow_nan=True), st.text(max_size=2))
shapes = st.one_of(st.just([1, 3, 32, 32]), st.lists(dims, max_size=6),
                   st.tuples(st.sampled_from([1, 2, 2 ** 54 + 1, 2 ** 62, 0, -1]), st.just(3), st.just(32), st.just(32))
                   .map(list))


@st.composite
def requests(draw) -> tuple[bytes, dict, str]:
    shape = draw(shapes)
    kind = draw(st.sampled_from(["json", "binary", "deep", "bigint", "raw"]))
    tensor = {"name": draw(st.sampled_from(["input", "x", 5])), "datatype": draw(st.sampled_from(["FP32", "INT64"])),
              "shape": shape}
    if kind == "json":
        fill = draw(numbers)
        n = draw(st.sampled_from([3072, 3071, 6144, 0, 1]))
        tensor["data"] = [0.5] * (n - 1) + [fill] if n else []
        return json.dumps({"inputs": [tensor]}).encode(), {}, kind
    if kind == "binary":
        tail = b"\0" * draw(st.sampled_from([12288, 12284, 0, 24576, 7]))
        tensor["parameters"] = {"binary_data_size": draw(st.sampled_from([len(tail), 12288, -1, 2 ** 66, "a"]))}
        if draw(st.booleans()):
            tail = (b"\0\0\xc0\x7f" * (len(tail) // 4))  # NaN
        head = json.dumps({"inputs": [tensor]}).encode()
        length = draw(st.sampled_from([str(len(head)), "0", str(len(head) + len(tail) + 1), "9" * 5000, "x"]))
        return head + tail, {"Inference-Header-Content-Length": length}, kind
    if kind == "deep":
        depth = draw(st.sampled_from([33, 100, 999, 5000, 200_000]))
        return b'{"inputs": [{"parameters": ' + b"[" * depth + b"]" * depth + b"}]}", {}, kind
    if kind == "bigint":
        digits = draw(st.integers(21, 6000))
        return b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [' + b"9" * digits + b', 3, 32, 32], ' \
               b'"data": [0.5]}]}', {}, kind
    raw = json.dumps({"inputs": [{**tensor, "data": [0.5] * 8}]}).encode()
    cut = draw(st.integers(0, len(raw)))
    return raw[:cut] + draw(st.binary(max_size=16)) + raw[cut:], {}, kind


@FUZZ
@given(req=requests())
def test_hostile_requests_get_400_or_413_and_the_server_lives(host, req):
    body, headers, kind = req
    note(f"{kind}: {body[:200]!r}... ({len(body)} bytes), headers {str(headers)[:100]}")
    status, raw = _post(host, body, headers)
    assert status in (200, 400, 404, 413), (status, raw[:300])
    if status == 200:
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"bare {c} in the response"))
    else:
        err = json.loads(raw)
        assert set(err) == {"error"} and isinstance(err["error"], str) and err["error"], err
    assert _alive(host)
