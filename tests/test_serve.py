"""`onnxmod serve`: a real server on a free loopback port, spoken to with the real `tritonclient.http`.

Oracles: a direct onnxruntime run of the same file (atol 1e-5), `onnxmod predict --json` on the
same image files, the server's own batch statistics, and protocol error bodies.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from onnxmod import modelio
from onnxmod.cli.main import main
from onnxmod.data import open_dataset
from onnxmod.serve.batching import Batcher
from onnxmod.serve.server import (ServeSettings, bind, http_stack, load_models, make_server, run_in_thread,
                                  serve_in_thread)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
RESNET8 = SAMPLES / "resnet8_cifar10.onnx"
MAX_BATCH = 8
MAX_DELAY_MS = 25.0  # long enough that 16 simultaneous requests meet in one gathering window
MAX_BODY = 2 << 20  # above the 19-image JSON request below (~1.2 MB)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images() -> np.ndarray:
    x, _ = next(open_dataset(SAMPLES / "cifar10_test.npz").iter_batches(batch_size=32))
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def module_file(r8_dir) -> Path:
    return sorted(r8_dir.glob("module_*.onnx"))[3]


@pytest.fixture(scope="module")
def server(r8_composed, module_file) -> str:
    """host:port of a server for the composed model (``r8``), the source (``src``) and one module (``cat``)."""
    models = load_models([r8_composed, RESNET8, module_file], ["r8", "src", "cat"], device="cpu")
    settings = ServeSettings(port=0, device="cpu", max_batch=MAX_BATCH, max_delay_ms=MAX_DELAY_MS,
                             max_body_mb=MAX_BODY / (1 << 20))
    with serve_in_thread(models, settings) as url:
        yield url.removeprefix("http://")


@pytest.fixture()
def client(server) -> triton.InferenceServerClient:
    c = triton.InferenceServerClient(server)
    yield c
    c.close()


def _direct(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))


def _infer(client, name: str, x: np.ndarray, outputs: list[str], binary: bool) -> triton.InferResult:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return client.infer(name, [inp], outputs=[triton.InferRequestedOutput(o, binary_data=binary) for o in outputs])


def _stats(client, name: str) -> dict:
    (s,) = client.get_inference_statistics(name)["model_stats"]
    return s


# --------------------------------------------------------------------------- metadata
def test_server_metadata_and_health(client):
    meta = client.get_server_metadata()
    assert meta["name"] == "onnxmod"
    assert {"binary_tensor_data", "classification", "statistics"} <= set(meta["extensions"])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("r8") and client.is_model_ready("r8", "1")
    assert not client.is_model_ready("nope")
    index = client.get_model_repository_index()
    assert sorted(e["name"] for e in index) == ["cat", "r8", "src"]


def test_model_metadata_names_the_real_io_and_classes(client, r8_composed, module_file):
    composed = modelio.load_model(r8_composed)
    classes = [c["name"] for c in modelio.get_meta(composed, modelio.CLASSES)]
    meta = client.get_model_metadata("r8")
    assert meta["name"] == "r8" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, len(classes)]},
                               {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert meta["parameters"]["classes"] == classes and meta["parameters"]["kind"] == "composed"
    assert meta["parameters"]["max_batch"] == MAX_BATCH

    src = client.get_model_metadata("src")
    assert [o["name"] for o in src["outputs"]] == ["logits"] and src["parameters"]["kind"] == "source"
    mod = client.get_model_metadata("cat", model_version="1")
    assert {o["name"]: o["shape"] for o in mod["outputs"]} == {"score": [-1, 1], "logit": [-1, 1]}
    assert mod["parameters"]["classes"] == [modelio.get_meta(modelio.load_model(module_file), modelio.CLASS_NAME)]


# --------------------------------------------------------------------------- infer
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("n", [1, 5, 19], ids=["n1", "n5", "n19_split"])
def test_infer_equals_direct_onnxruntime(client, r8_composed, images, binary, n):
    x = images[:n]
    ref = _direct(r8_composed, x)
    r = _infer(client, "r8", x, ["probs", "label"], binary)
    assert r.as_numpy("probs").dtype == np.float32 and r.as_numpy("label").dtype == np.int64
    np.testing.assert_allclose(r.as_numpy("probs"), ref["probs"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(r.as_numpy("label"), ref["label"])
    if n > MAX_BATCH:  # split into runs of at most MAX_BATCH images
        assert max(b["batch_size"] for b in _stats(client, "r8")["batch_stats"]) <= MAX_BATCH


def test_infer_source_and_module_outputs(client, module_file, images):
    x = images[:4]
    r = client.infer("src", [_input(x)])  # no outputs asked: all of them, binary
    np.testing.assert_allclose(r.as_numpy("logits"), _direct(RESNET8, x)["logits"], atol=1e-5, rtol=0)
    ref = _direct(module_file, x)
    r = _infer(client, "cat", x, ["score", "logit"], binary=False)
    for name in ("score", "logit"):
        np.testing.assert_allclose(r.as_numpy(name), ref[name], atol=1e-5, rtol=0)


def _input(x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_extension_ranks_probs(client, r8_composed, images, binary):
    x = images[:3]
    probs = _direct(r8_composed, x)["probs"]
    classes = client.get_model_metadata("r8")["parameters"]["classes"]
    r = client.infer("r8", [_input(x)], outputs=[triton.InferRequestedOutput("probs", binary_data=binary,
                                                                             class_count=3)])
    got = r.as_numpy("probs")
    assert got.shape == (3, 3)
    for row, p in zip(got, probs):
        parts = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in row]
        assert [int(q[1]) for q in parts] == list(np.argsort(-p, kind="stable")[:3])
        assert [q[2] for q in parts] == [classes[int(q[1])] for q in parts]
        np.testing.assert_allclose([float(q[0]) for q in parts], np.sort(p)[::-1][:3], atol=1e-6)


def test_gzip_compressed_request(client, r8_composed, images):
    x = images[:2]
    r = client.infer("r8", [_input(x)], request_compression_algorithm="gzip")
    np.testing.assert_allclose(r.as_numpy("probs"), _direct(r8_composed, x)["probs"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- classify
def _multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{fname}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
             for field, fname, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _request(server: str, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(server, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("model", ["r8", "cat"])
def test_classify_equals_predict(server, tmp_path, images, r8_composed, module_file, model, capsys):
    files = []
    for i in range(3):
        img = Image.fromarray((images[i].transpose(1, 2, 0) * 255).round().astype(np.uint8))
        if i == 2:  # a different size and format: both paths resize and decode the same way
            img, name = img.resize((45, 40)), f"img{i}.jpg"
        else:
            name = f"img{i}.png"
        img.save(tmp_path / name)
        files.append(tmp_path / name)
    body, ctype = _multipart([("image", f.name, f.read_bytes()) for f in files])
    status, _, raw = _request(server, "POST", f"/v2/models/{model}/classify?top=4", body, {"Content-Type": ctype})
    assert status == 200, raw
    got = json.loads(raw)["predictions"]

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["predict", str(r8_composed if model == "r8" else module_file), *map(str, files),
              "--top", "4", "--json", "--device", "cpu"])
    assert e.value.code == 0
    want = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["image"] for p in got] == [f.name for f in files]
    for g, w in zip(got, want):
        assert g["label"] == w["label"]
        assert [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]]
        np.testing.assert_allclose([t["prob"] for t in g["top"]], [t["prob"] for t in w["top"]], atol=1e-6)


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_share_runs_and_get_their_own_rows(server, r8_composed, images):
    n_clients = 16
    ref = _direct(r8_composed, images[:n_clients])
    before = {b["batch_size"]: b["compute_infer"]["count"]
              for b in _stats(triton.InferenceServerClient(server), "r8")["batch_stats"]}
    start = threading.Barrier(n_clients)
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        c = triton.InferenceServerClient(server)
        try:
            start.wait(10)
            r = _infer(c, "r8", images[i:i + 1], ["probs", "label"], binary=True)
            results[i] = (r.as_numpy("probs"), r.as_numpy("label"))
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == n_clients
    for i, (probs, label) in results.items():  # each caller got its own image's row
        np.testing.assert_allclose(probs, ref["probs"][i:i + 1], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(label, ref["label"][i:i + 1])
    after = _stats(triton.InferenceServerClient(server), "r8")["batch_stats"]
    new_runs = {b["batch_size"]: b["compute_infer"]["count"] - before.get(b["batch_size"], 0) for b in after}
    assert max(size for size, runs in new_runs.items() if runs > 0) > 1, new_runs
    assert all(size <= MAX_BATCH for size in new_runs)
    assert sum(size * runs for size, runs in new_runs.items()) == n_clients


def test_batcher_gathers_and_splits():
    """Unit level: concurrent callers share runs of at most max_batch; each gets exactly its rows."""
    sizes: list[int] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        sizes.append(len(x))
        time.sleep(0.01)
        return [x * 2, x[:, 0]]

    async def scenario():
        b = Batcher(run, max_batch=4, max_delay_s=0.05)
        b.start()
        try:
            xs = [np.full((n, 2), i, np.float32) for i, n in enumerate([1, 2, 1, 3, 6, 1])]
            outs = await asyncio.gather(*(b.infer(x) for x in xs))
        finally:
            await b.stop()
        return xs, outs

    xs, outs = asyncio.run(scenario())
    for x, (doubled, first) in zip(xs, outs):
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_array_equal(first, x[:, 0])
    # whole jobs in arrival order, at most 4 images a run: [1+2+1] [3] [4 of the 6] [2 of the 6 + 1]
    assert sizes == [4, 3, 4, 3]


def test_batcher_fixed_shape_pads_every_run_and_hands_back_only_real_rows():
    """fixed_shape (CUDA): every run sees max_batch rows, zero-padded at the end; callers get exactly their rows."""
    seen: list[np.ndarray] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        seen.append(x.copy())
        return [x * 2]

    async def scenario():
        b = Batcher(run, max_batch=4, max_delay_s=0.05, fixed_shape=True)
        b.start()
        try:
            xs = [np.full((n, 2), i + 1, np.float32) for i, n in enumerate([1, 2, 3, 6])]
            return xs, await asyncio.gather(*(b.infer(x) for x in xs)), b.stats.to_json("m", "1")
        finally:
            await b.stop()

    xs, outs, stats = asyncio.run(scenario())
    for x, (doubled,) in zip(xs, outs):
        np.testing.assert_array_equal(doubled, x * 2)
    assert [len(x) for x in seen] == [4] * len(seen) and len(seen) == 4  # [1+2] [3] [4 of 6] [2 of 6]
    real = [3, 3, 4, 2]
    for x, n in zip(seen, real):
        assert (x[:n] > 0).all() and not x[n:].any()
    assert stats["inference_count"] == sum(real)  # statistics count callers' images, not padding


def test_cuda_models_are_served_in_runs_of_one_shape(r8_composed, images):
    """A model on CUDA (here a CPU session marked so) is warmed up and run at max_batch rows every time: on CUDA
    each new input shape costs a cuDNN set-up of every convolution (bench/results/cuda.json)."""
    (m,) = load_models([r8_composed], ["r8"], device="cpu")
    m.device = "cuda"
    shapes: list[int] = []
    plain_run = m.run
    m.run = lambda x: shapes.append(len(x)) or plain_run(x)
    with serve_in_thread([m], ServeSettings(port=0, device="cpu", max_batch=8)) as url:
        c = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            x = images[:3]
            r = _infer(c, "r8", x, ["probs", "label"], binary=True)
        finally:
            c.close()
    assert shapes and set(shapes) == {8}  # the warm-up run and the request's run
    direct = _direct(r8_composed, x)
    np.testing.assert_allclose(r.as_numpy("probs"), direct["probs"], atol=1e-5)
    np.testing.assert_array_equal(r.as_numpy("label"), direct["label"])


def test_batcher_runs_instances_at_once():
    """instances=2: two runs are in flight together (each waits for the other at a barrier)."""
    both_in = threading.Barrier(2)

    def run(x: np.ndarray) -> list[np.ndarray]:
        both_in.wait(timeout=10)  # BrokenBarrierError if the second run never starts meanwhile
        return [x + 1]

    async def scenario():
        b = Batcher(run, max_batch=1, max_delay_s=0.0, instances=2)
        b.start()
        try:
            return await asyncio.gather(b.infer(np.zeros((1, 1))), b.infer(np.ones((1, 1)))), b.stats.execution_count
        finally:
            await b.stop()

    (a, c), runs = asyncio.run(scenario())
    assert a[0].item() == 1 and c[0].item() == 2 and runs == 2


def test_batcher_spreads_the_queue_over_idle_instances():
    """8 queued one-image requests and 2 idle workers: two runs of 4 side by side, not 8 on one worker."""
    sizes: list[int] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        sizes.append(len(x))
        return [x]

    async def scenario():
        b = Batcher(run, max_batch=64, max_delay_s=0.05, instances=2)
        b.start()
        try:
            xs = [np.full((1, 1), i, np.float32) for i in range(8)]
            return xs, await asyncio.gather(*(b.infer(x) for x in xs))
        finally:
            await b.stop()

    xs, outs = asyncio.run(scenario())
    assert sorted(sizes) == [4, 4]
    for x, (y,) in zip(xs, outs):
        np.testing.assert_array_equal(x, y)


def test_batcher_failure_reaches_only_its_callers():
    calls = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        return [x]

    async def scenario():
        b = Batcher(run, max_batch=1, max_delay_s=0.0)
        b.start()
        try:
            bad, good = await asyncio.gather(b.infer(-np.ones((1, 1))), b.infer(np.ones((1, 1))),
                                             return_exceptions=True)
            return bad, good, b.stats.fail[0], b.stats.execution_count
        finally:
            await b.stop()

    bad, good, failed, runs = asyncio.run(scenario())
    assert isinstance(bad, ValueError) and np.array_equal(good[0], np.ones((1, 1)))
    assert failed == 1 and runs == 1


# --------------------------------------------------------------------------- bad requests
def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def _tensor(**over) -> dict:
    t = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * 3072}
    t.update(over)
    return t


BINARY = np.zeros((1, 3, 32, 32), np.float32).tobytes()
_BIN_HEAD = _json({"inputs": [_tensor(data=None, parameters={"binary_data_size": len(BINARY)})]}).replace(
    b'"data": null, ', b"")
_ZEROS_GZ = gzip.compress(b"\0" * (2 * MAX_BODY))  # a small body that inflates past the limit
# issue 24: what a request declares is checked before anything is allocated from it
_DEEP = b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # RecursionError in json (500 before)
_DEEP_PARAMS = _json({"inputs": [_tensor(parameters={"a": [[[[[[[[[[1]]]]]]]]]]})]}).replace(
    b"[[[[[[[[[[1]]]]]]]]]]", b"[" * 40 + b"1" + b"]" * 40)  # under the interpreter's limit, over 32 levels
_INT_5000 = _json({"inputs": [_tensor()]}).replace(b'"shape": [1,', b'"shape": [' + b"9" * 5000 + b",")
_HUGE_N = 2 ** 54 + 1  # [2**54 + 1, 3, 32, 32] holds 2**64 + 3072 values: int64 overflows to a small product
_HUGE_SHAPE_BIN = _json({"inputs": [{"name": "input", "datatype": "FP32", "shape": [_HUGE_N, 3, 32, 32],
                                     "parameters": {"binary_data_size": len(BINARY)}}]})
_NAN_DATA = _json({"inputs": [_tensor(data=[float("nan")] * 3072)]})  # json.dumps writes bare NaN
_INF_TEXT = _json({"inputs": [_tensor()]}).replace(b"0.5", b"1e999", 1)  # a finite-looking literal, inf as a float
_FP32_OVER = _json({"inputs": [_tensor(data=[0.5] * 3071 + [1e39])]})  # finite in JSON, infinity in FP32
_NAN_BIN = np.full((1, 3, 32, 32), np.nan, np.float32).tobytes()


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (read before anything is decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


# three images at the per-image limit (5000 x 5000 = 25M pixels each): 75M pixels in one request
_BIG_THREE = _multipart([("image", f"big{i}.png", _png_header(5000, 5000)) for i in range(3)])
_PNG_JUNK = _multipart([("image", "junk.png", b"\x89PNG\r\n\x1a\nnot really")])
_NO_FILES = _multipart([])
INFER = "/v2/models/r8/infer"
CASES = [
    # id, method, path, headers, body, status, words in the error
    ("unknown-model", "POST", "/v2/models/nope/infer", {}, _json({"inputs": [_tensor()]}), 404, "unknown model 'nope'"),
    ("unknown-model-meta", "GET", "/v2/models/nope", {}, None, 404, "unknown model"),
    ("path-traversal-name", "GET", "/v2/models/..%2F..%2Fetc%2Fpasswd", {}, None, 404, "no route"),
    ("dot-dot-name", "POST", "/v2/models/../infer", {}, _json({"inputs": [_tensor()]}), 404, "unknown model '..'"),
    ("bad-version", "GET", "/v2/models/r8/versions/2", {}, None, 404, "no version '2'"),
    ("no-route", "GET", "/v2/nothing/here", {}, None, 404, "no route"),
    ("wrong-method", "GET", INFER, {}, None, 405, "not allowed"),
    ("malformed-json", "POST", INFER, {}, b'{"inputs": [', 400, "does not parse"),
    ("not-utf8", "POST", INFER, {}, b"\xff\xfe\x00", 400, "does not parse"),
    ("json-not-object", "POST", INFER, {}, b"[1, 2]", 400, "must be an object"),
    ("no-inputs", "POST", INFER, {}, _json({}), 400, "'inputs'"),
    ("two-inputs", "POST", INFER, {}, _json({"inputs": [_tensor(), _tensor()]}), 400, "exactly one"),
    ("unknown-input", "POST", INFER, {}, _json({"inputs": [_tensor(name="x")]}), 400, "unknown input 'x'"),
    ("wrong-dtype", "POST", INFER, {}, _json({"inputs": [_tensor(datatype="INT64")]}), 400, "expected FP32"),
    ("wrong-shape", "POST", INFER, {}, _json({"inputs": [_tensor(shape=[1, 3, 28, 28], data=[0.5] * 2352)]}), 400,
     "does not match"),
    ("zero-batch", "POST", INFER, {}, _json({"inputs": [_tensor(shape=[0, 3, 32, 32], data=[])]}), 400, "n >= 1"),
    ("shape-not-ints", "POST", INFER, {}, _json({"inputs": [_tensor(shape=["1", 3, 32, 32])]}), 400, "integers"),
    ("wrong-size", "POST", INFER, {}, _json({"inputs": [_tensor(data=[0.5] * 3071)]}), 400, "3071 values"),
    ("ragged-data", "POST", INFER, {}, _json({"inputs": [_tensor(data=[[0.5] * 3071, [0.5]])]}), 400, "ragged"),
    ("string-data", "POST", INFER, {}, _json({"inputs": [_tensor(data=["0.5"] * 3072)]}), 400, "expected FP32"),
    ("no-data", "POST", INFER, {}, _json({"inputs": [_tensor(data=None)]}).replace(b'"data": null', b'"x": 1'),
     400, "no 'data'"),
    ("unknown-output", "POST", INFER, {}, _json({"inputs": [_tensor()], "outputs": [{"name": "logits"}]}), 400,
     "unknown output 'logits'"),
    ("bad-classification", "POST", INFER, {}, _json({"inputs": [_tensor()], "outputs": [
        {"name": "label", "parameters": {"classification": 2}}]}), 400, "classification"),
    ("header-length-nan", "POST", INFER, {"Inference-Header-Content-Length": "abc"}, _BIN_HEAD + BINARY, 400,
     "not an integer"),
    ("header-length-past-body", "POST", INFER, {"Inference-Header-Content-Length": str(10 ** 6)},
     _BIN_HEAD + BINARY, 400, "outside the body"),
    ("binary-too-short", "POST", INFER, {"Inference-Header-Content-Length": str(len(_BIN_HEAD))},
     _BIN_HEAD + BINARY[:-4], 400, "only 12284 sent"),
    ("binary-left-over", "POST", INFER, {"Inference-Header-Content-Length": str(len(_BIN_HEAD))},
     _BIN_HEAD + BINARY + b"\0" * 8, 400, "8 bytes of binary data after"),
    ("body-too-large", "POST", INFER, {}, b" " * (MAX_BODY + 1), 413, "over the server's limit"),
    ("gzip-bomb", "POST", INFER, {"Content-Encoding": "gzip"}, _ZEROS_GZ, 413, "over the server's limit"),
    ("bad-gzip", "POST", INFER, {"Content-Encoding": "gzip"}, b"not gzip at all", 400, "does not decompress"),
    ("unknown-encoding", "POST", INFER, {"Content-Encoding": "br"}, b"{}", 415, "Content-Encoding"),
    ("classify-not-multipart", "POST", "/v2/models/r8/classify", {"Content-Type": "application/json"}, b"{}", 415,
     "multipart"),
    ("classify-no-files", "POST", "/v2/models/r8/classify", {"Content-Type": _NO_FILES[1]}, _NO_FILES[0], 400,
     "no image files"),
    ("classify-undecodable", "POST", "/v2/models/r8/classify", {"Content-Type": _PNG_JUNK[1]}, _PNG_JUNK[0], 400,
     "junk.png: cannot read image"),
    ("classify-bad-top", "POST", "/v2/models/r8/classify?top=0", {"Content-Type": _PNG_JUNK[1]}, _PNG_JUNK[0], 400,
     "top="),
    # ---- issue 24
    ("json-nested-200000-deep", "POST", INFER, {}, _DEEP, 400, "nested more than 32 levels deep"),
    ("json-nested-40-deep", "POST", INFER, {}, _DEEP_PARAMS, 400, "nested more than 32 levels deep"),
    ("json-int-5000-digits", "POST", INFER, {}, _INT_5000, 400, "an integer of 5,000 digits (at most 20)"),
    ("shape-overflows-int64-json", "POST", INFER, {}, _json({"inputs": [_tensor(shape=[_HUGE_N, 3, 32, 32])]}), 400,
     f"declares {_HUGE_N * 3072:,} values, more than a body of"),
    ("shape-overflows-int64-binary", "POST", INFER, {"Inference-Header-Content-Length": str(len(_HUGE_SHAPE_BIN))},
     _HUGE_SHAPE_BIN + BINARY, 400, f"declares {_HUGE_N * 3072:,} values"),
    ("shape-too-big-for-body", "POST", INFER, {}, _json({"inputs": [_tensor(shape=[10 ** 6, 3, 32, 32])]}), 400,
     "more than a body of"),
    ("data-nan", "POST", INFER, {}, _NAN_DATA, 400, "request JSON holds NaN; values must be finite"),
    ("data-1e999", "POST", INFER, {}, _INF_TEXT, 400, "1 of its 3,072 values are not finite"),
    ("data-beyond-fp32", "POST", INFER, {}, _FP32_OVER, 400, "1 of its 3,072 values are not finite"),
    ("binary-nan", "POST", INFER, {"Inference-Header-Content-Length": str(len(_BIN_HEAD))}, _BIN_HEAD + _NAN_BIN, 400,
     "3,072 of its 3,072 values are not finite"),
    ("data-nested-too-deep", "POST", INFER, {}, _json({"inputs": [_tensor(data=[[[[[[0.5] * 3072]]]]])]}), 400,
     "'data' is nested 6 deep"),
    ("classify-top-5000-digits", "POST", "/v2/models/r8/classify?top=" + "9" * 5000, {"Content-Type": _PNG_JUNK[1]},
     _PNG_JUNK[0], 400, "top="),
    ("classify-too-many-pixels", "POST", "/v2/models/r8/classify", {"Content-Type": _BIG_THREE[1]}, _BIG_THREE[0],
     413, "3 images of 75,000,000 pixels in all (the largest 'big0.png', 25,000,000): more than the 50,000,000"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_status_and_error_body(server, case):
    _, method, path, headers, body, status, words = case
    got, resp_headers, raw = _request(server, method, path, body, headers)
    assert got == status, raw
    err = json.loads(raw)
    assert set(err) == {"error"} and words in err["error"], err


def test_server_still_serves_after_bad_requests(server, client, r8_composed, images):
    assert len(CASES) >= 15
    for case in CASES:  # all of them again, back to back, then a good request
        _request(server, case[1], case[2], case[4], case[3])
    assert client.is_server_live() and client.is_model_ready("r8")
    r = _infer(client, "r8", images[:2], ["probs"], binary=True)
    np.testing.assert_allclose(r.as_numpy("probs"), _direct(r8_composed, images[:2])["probs"], atol=1e-5, rtol=0)


def test_response_never_carries_bare_nan():
    """An output that is not finite for a (finite) input: 400 for JSON, which cannot carry it; binary carries it."""
    from onnxmod.serve.protocol import ApiError, InferRequest, RequestedOutput, encode_infer

    probs = np.array([[np.nan, 0.5]], np.float32)
    req = InferRequest(np.zeros((1, 3, 2, 2), np.float32), [RequestedOutput("probs", False)])
    with pytest.raises(ApiError, match="output 'probs' is not finite") as e:
        encode_infer("m", "1", req, {"probs": probs}, {"probs": "FP32"}, ["a", "b"])
    assert e.value.status == 400
    body, headers = encode_infer("m", "1", InferRequest(req.x, [RequestedOutput("probs", True)]), {"probs": probs},
                                 {"probs": "FP32"}, ["a", "b"])
    head = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.isnan(np.frombuffer(body[-8:], "<f4")[0])


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), 1e9, -1.0])
def test_batcher_refuses_an_unbounded_wait(delay):
    """--max-delay-ms is refused at the flag; the batcher refuses it too (nan once killed its loop, inf left a
    request smaller than --max-batch unanswered forever)."""
    with pytest.raises(ValueError, match="max_delay_s must be a finite number"):
        Batcher(lambda x: [x], 4, delay)


def _raw_connection(host: str) -> "socket.socket":
    import socket

    h, port = host.rsplit(":", 1)
    return socket.create_connection((h, int(port)), timeout=10)


def _read_all(sock) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_read_timeout_closes_half_sent_requests(r8_composed, images):
    """Half a request head, or a head with half its body: 408 with an error body, and the connection closed, after
    --read-timeout; the server keeps answering throughout."""
    models = load_models([r8_composed], ["r8"], device="cpu")
    settings = ServeSettings(port=0, device="cpu", max_batch=MAX_BATCH, max_delay_ms=1.0, read_timeout_s=1.0)
    with serve_in_thread(models, settings) as url:
        host = url.removeprefix("http://")
        half_head = [_raw_connection(host) for _ in range(20)]
        for c in half_head:
            c.sendall(b"POST /v2/models/r8/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
        half_body = _raw_connection(host)
        half_body.sendall(b"POST /v2/models/r8/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
        silent = _raw_connection(host)
        t0 = time.monotonic()
        status, _, raw = _request(host, "GET", "/v2/health/live")  # answered while the others hang
        assert status == 200, raw
        for c in [*half_head, half_body, silent]:
            reply = _read_all(c)  # returns when the server closes the connection
            c.close()
            assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {
                "error": "request not received in full within the server's read timeout (--read-timeout)"}
        assert 0.9 < time.monotonic() - t0 < 8
        c = triton.InferenceServerClient(host)
        r = _infer(c, "r8", images[:2], ["label"], binary=False)  # a request read in time is not timed out
        np.testing.assert_array_equal(r.as_numpy("label"), _direct(r8_composed, images[:2])["label"])
        c.close()


def test_tritonclient_sees_protocol_errors(client):
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")
    bad = triton.InferInput("input", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="does not match"):
        client.infer("r8", [bad])


# --------------------------------------------------------------------------- CLI
def _fail(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxmod: error: ") and "Traceback" not in err
    return err


def test_serve_refuses_bad_models_and_names(tmp_path, r8_composed, capsys):
    assert "no such file" in _fail(["serve", str(tmp_path / "missing.onnx")], capsys)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert "not an ONNX model" in _fail(["serve", str(tmp_path / "junk.onnx")], capsys)
    assert "already taken" in _fail(["serve", str(r8_composed), str(r8_composed)], capsys)
    assert "not usable in a URL" in _fail(["serve", str(r8_composed), "--name", "../x"], capsys)
    assert "--name values" in _fail(["serve", str(r8_composed), "--name", "a", "--name", "b"], capsys)
    fixed = onnx.load(str(RESNET8))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    assert "fixed batch of 1" in _fail(["serve", str(tmp_path / "fixed.onnx")], capsys)
    flat = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["input"], ["y"])], "flat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]),
        opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(flat, str(tmp_path / "flat.onnx"))
    assert "must be 4-D" in _fail(["serve", str(tmp_path / "flat.onnx")], capsys)


def test_serve_refuses_a_port_in_use(r8_composed, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "cannot listen on 127.0.0.1" in _fail(["serve", str(r8_composed), "--port", str(port)], capsys)


def test_serve_help_has_example_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Example:" in out and "onnxmod serve" in out and "default: 127.0.0.1" in out and "default: 8000" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_serve_command_answers_then_stops_cleanly(r8_composed, images, sig):
    """The real command in a subprocess: port 0, a tritonclient round trip, then a clean stop (exit 0)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "onnxmod.cli.main", "serve", str(r8_composed), "--port", "0",
                             "--device", "cpu", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        host = None
        deadline = time.monotonic() + 60
        lines = []
        while host is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "listening on http://" in line:
                host = line.split("listening on http://")[1].split()[0]
        assert host, "".join(lines)
        started = json.loads(proc.stdout.readline())  # --json: one line, once listening
        assert started["url"] == f"http://{host}" and started["models"][0]["name"] == r8_composed.stem
        stack = http_stack()
        assert started["http_stack"] == stack and f"{stack['loop']} + {stack['http']}" in "".join(lines)
        c = triton.InferenceServerClient(host)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if c.is_server_ready():
                    break
            except Exception:
                time.sleep(0.1)
        r = _infer(c, r8_composed.stem, images[:2], ["label"], binary=False)
        np.testing.assert_array_equal(r.as_numpy("label"), _direct(r8_composed, images[:2])["label"])
        c.close()
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_runs_on_the_stack_it_reports(r8_composed):
    """The connection that answers is served by the HTTP parser and event loop that http_stack() names (the C
    pair when uvloop and httptools are installed, else h11 on asyncio)."""
    stack = http_stack()
    server = make_server(load_models([r8_composed], [], device="cpu"), ServeSettings(port=0, device="cpu"))
    with run_in_thread(server, bind("127.0.0.1", 0)) as base:
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
        try:
            conn.request("GET", "/v2/health/live")
            assert conn.getresponse().read() == b'{"live":true}'
            (protocol,) = server.server_state.connections  # the keep-alive connection above
            assert type(protocol).__name__ == {"httptools": "HttpToolsProtocol", "h11": "H11Protocol"}[stack["http"]]
            assert type(protocol.loop).__module__.split(".")[0] == stack["loop"]  # uvloop.Loop or asyncio's
        finally:
            conn.close()


def test_listening_socket_says_tcp():
    """asyncio sets TCP_NODELAY only on accepted sockets whose proto is TCP; without it every response body
    waits for a delayed ACK (~40 ms per request on loopback)."""
    import socket

    from onnxmod.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.close()
