"""Front-end canonicalisation (onnxmod.frontend): each rewrite on a tiny ONNX-text graph, compared
with the original in onnxruntime, then the full checker; the failures that must name their cause."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from engine_oracles import run
from onnxmod import frontend, modelio
from onnxmod.decompose import DecomposeSettings, decompose, prepare_source
from onnxmod.data import write_npz
from onnxmod.errors import OnnxmodError, UnsupportedOpError

RNG = np.random.default_rng(0)
# weights every test graph may use, by name
WEIGHTS = {
    "W": RNG.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),  # Conv 3 -> 4
    "B": RNG.normal(0, 0.1, 4).astype(np.float32),
    "FC": RNG.normal(0, 0.5, (4, 5)).astype(np.float32),  # [F, K] after global pooling
    "FCB": RNG.normal(0, 0.1, 5).astype(np.float32),
    "FC64": RNG.normal(0, 0.2, (64, 5)).astype(np.float32),  # [4*4*4, K] after a flatten of [4, 4, 4]
    "HW3": RNG.normal(0, 0.5, (3, 5)).astype(np.float32),  # [C, K] after a spatial mean
    "SHAPE": np.array([1, 64], dtype=np.int64),  # an old exporter's batch-bound flatten
}


def _model(text: str) -> onnx.ModelProto:
    """Parse ONNX text; weights named in WEIGHTS become initializers."""
    m = onnx.parser.parse_model(text)
    used = {i for n in m.graph.node for i in n.input}
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in WEIGHTS.items() if k in used)
    if m.ir_version < 4:  # IR 3: every initializer is a graph input too
        m.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in m.graph.initializer)
    onnx.checker.check_model(m, full_check=True)
    return m


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _checked(m: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(m, full_check=True)
    return m


NCHW_HEAD = """
    c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten <axis = 1> (p)
"""

IR3 = """<ir_version: 3, opset_import: ["" : 8]>
g (float[1, 3, 8, 8] x) => (float[1, 5] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, W, B)
    r = Relu (c)
    s = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    f = Reshape (s, SHAPE)
    m = MatMul (f, FC64)
    y = Add (m, FCB)
}"""

NHWC_SOFTMAX = f"""<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 8, 3] x_nhwc) => (float[N, 5] probs) {{
    x = Transpose <perm = [0, 3, 1, 2]> (x_nhwc)
    {NCHW_HEAD}
    m = MatMul (f, FC)
    z = Add (m, FCB)
    sm = Softmax <axis = -1> (z)
    probs = Identity (sm)
}}"""

DYNAMIC_HW = f"""<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, H, W] x) => (float[N, 5] z) {{
    {NCHW_HEAD}
    z = Gemm (f, FC, FCB)
}}"""

NHWC_NO_TRANSPOSE = """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 8, 3] x) => (float[N, 5] z) {
    s = ReduceMean <axes = [1, 2], keepdims = 0> (x)
    z = MatMul (s, HW3)
}"""


def test_upgrade_and_dynamic_batch_of_old_static_graph():
    original = _model(IR3)
    m, steps = frontend.canonical_input(original, "ir3")
    _checked(m)
    assert [s["step"] for s in steps] == ["upgrade", "dynamic_batch"]
    assert steps[0]["from"] == {"ir_version": 3, "opset": 8} and steps[0]["to"]["opset"] == frontend.UPGRADE_OPSET
    assert steps[1]["was"] == 1 and len(steps[1]["reshapes"]) == 1
    assert not ({i.name for i in m.graph.input} & {t.name for t in m.graph.initializer})
    x = RNG.random((3, 3, 8, 8), dtype=np.float32)
    ref = np.concatenate([run(original, x[i:i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(run(m, x)[0], ref, atol=1e-5)


def test_nhwc_input_and_softmax_head():
    original = _model(NHWC_SOFTMAX)
    m, steps = frontend.canonical_input(original, "keras-like")
    _checked(m)
    assert [s["step"] for s in steps] == ["nhwc_input", "strip_softmax"]
    assert "leading Transpose" in steps[0]["detected_from"] and not steps[0]["kept_transpose"]
    assert steps[1]["op"] == "Softmax" and [r.split()[0] for r in steps[1]["also_removed"]] == ["Identity"]
    assert "Transpose" not in {n.op_type for n in m.graph.node}  # the exporter's Transpose cancelled
    dims = [d.dim_value or d.dim_param for d in frontend.image_input(m).type.tensor_type.shape.dim]
    assert dims == ["N", 3, 8, 8]
    x = RNG.random((4, 3, 8, 8), dtype=np.float32)
    probs = run(original, x.transpose(0, 2, 3, 1).copy())[0]
    logits = run(m, x)[0]
    np.testing.assert_allclose(_softmax(logits), probs, atol=1e-6)
    assert not np.allclose(logits.sum(axis=1), 1.0)  # really logits now


def test_log_softmax_and_positive_scale_are_stripped_but_not_other_heads():
    text = NHWC_SOFTMAX.replace("Softmax <axis = -1> (z)", "LogSoftmax <axis = 1> (z)")
    m, steps = frontend.canonical_input(_model(text), "log")
    assert steps[-1]["op"] == "LogSoftmax"
    scaled = NHWC_SOFTMAX.replace("probs = Identity (sm)", "two = Constant <value = float {2.0}> ()\n"
                                  "    probs = Mul (sm, two)")
    m, steps = frontend.canonical_input(_model(scaled), "paddle-scale")
    assert steps[-1]["step"] == "strip_softmax" and steps[-1]["also_removed"][0].startswith("Mul")
    negative = scaled.replace("{2.0}", "{-2.0}")  # not argmax-preserving: left alone
    m, steps = frontend.canonical_input(_model(negative), "neg-scale")
    assert "strip_softmax" not in [s["step"] for s in steps]
    assert "Softmax" in {n.op_type for n in m.graph.node}


def test_forced_nhwc_layout_keeps_a_transpose():
    original = _model(NHWC_NO_TRANSPOSE)
    with pytest.raises(OnnxmodError, match="looks NHWC.*--layout"):
        frontend.canonical_input(original, "ambiguous")
    m, steps = frontend.canonical_input(original, "forced", layout="nhwc")
    _checked(m)
    assert steps == [{"step": "nhwc_input", "detected_from": "--layout nhwc", "kept_transpose": True}]
    x = RNG.random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run(m, x)[0], run(original, x.transpose(0, 2, 3, 1).copy())[0], atol=1e-6)
    m, steps = frontend.canonical_input(original, "as-is", layout="nchw")  # the user says so: read as NCHW
    assert steps == []


def test_dynamic_height_width_fixed_from_size_or_refused():
    original = _model(DYNAMIC_HW)
    with pytest.raises(OnnxmodError, match="dynamic height/width: pass --input-size"):
        frontend.canonical_input(original, "dyn")
    m, steps = frontend.canonical_input(original, "dyn", input_size=(12, 10), data_size=(32, 32))
    _checked(m)
    assert steps == [{"step": "input_size", "size": [12, 10], "from": "--input-size"}]
    assert [d.dim_value for d in frontend.image_input(m).type.tensor_type.shape.dim[1:]] == [3, 12, 10]
    m, steps = frontend.canonical_input(original, "dyn", data_size=(32, 32))
    assert steps[0]["from"] == "calibration data"
    x = RNG.random((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(run(m, x)[0], run(original, x)[0], atol=1e-6)
    with pytest.raises(OnnxmodError, match="is 8x8 but --input-size says 9x9"):
        frontend.canonical_input(_model(IR3), "static", input_size=(9, 9))


def test_canonical_graph_is_left_alone():
    m = onnx.load(Path(__file__).resolve().parent.parent / "sample_graphs" / "tiny_residual.onnx")
    out, steps = frontend.canonical_input(m, "tiny")
    assert steps == [] and out.graph == m.graph


def _write(tmp_path: Path, model: onnx.ModelProto, name: str) -> Path:
    p = tmp_path / name
    onnx.save(model, p)
    return p


def test_decompose_records_the_rewrites_and_keeps_everything_exactly(tmp_path):
    src = _write(tmp_path, _model(NHWC_SOFTMAX), "keras_like.onnx")
    rng = np.random.default_rng(1)
    x = (rng.random((60, 8, 8, 3)) * 255).astype(np.uint8)
    calib = write_npz(tmp_path / "calib.npz", x, np.arange(60) % 5, [f"c{i}" for i in range(5)])
    out = tmp_path / "mods"
    manifest = decompose(src, calib, out, settings=DecomposeSettings(target_macs=1.0, samples_per_class=12),
                         quiet=True)
    assert [s["step"] for s in manifest["source"]["frontend"]] == ["nhwc_input", "strip_softmax"]
    xf = x.astype(np.float32).transpose(0, 3, 1, 2) / 255
    probs = run(onnx.load(src), x.astype(np.float32) / 255)[0]
    logits = []
    for entry in manifest["modules"]:
        module = _checked(onnx.load(out / entry["file"]))
        assert modelio.get_meta(module, modelio.FRONTEND) == manifest["source"]["frontend"]
        logits.append(run(module, xf)[1][:, 0])
    np.testing.assert_allclose(_softmax(np.stack(logits, axis=1)), probs, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["source"]["frontend"] == manifest["source"]["frontend"]


def test_custom_domain_op_mid_graph_is_named(tmp_path):
    text = f"""<ir_version: 8, opset_import: ["" : 13, "com.vendor" : 1]>
g (float[N, 3, 8, 8] x) => (float[N, 5] z) {{
    {NCHW_HEAD.replace("r = Relu (c)", "r = com.vendor.FancyAct (c)")}
    z = Gemm (f, FC, FCB)
}}"""
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend(numpy_helper.from_array(WEIGHTS[k], k) for k in ("W", "B", "FC", "FCB"))
    with pytest.raises(UnsupportedOpError, match=r"com\.vendor::FancyAct at node"):
        prepare_source(_write(tmp_path, m, "custom.onnx"), data_classes=[str(i) for i in range(5)])


def test_unsupported_op_reported_is_the_one_pinning_the_output(tmp_path):
    """The first not-understood node (a Transpose swapping H and W) is harmless; the error
    must name the LpNormalization at the end that pins the class rows."""
    text = f"""<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x0) => (float[N, 5] z) {{
    x = Transpose <perm = [0, 1, 3, 2]> (x0)
    {NCHW_HEAD}
    y = Gemm (f, FC, FCB)
    z = LpNormalization <axis = 1> (y)
}}"""
    src = _write(tmp_path, _model(text), "pinned.onnx")
    x = (np.random.default_rng(2).random((20, 8, 8, 3)) * 255).astype(np.uint8)
    calib = write_npz(tmp_path / "calib.npz", x, np.arange(20) % 5, [f"c{i}" for i in range(5)])
    with pytest.raises(UnsupportedOpError, match="LpNormalization at node") as e:
        decompose(src, calib, tmp_path / "out", quiet=True, settings=DecomposeSettings(samples_per_class=4))
    assert "Transpose" not in str(e.value)


def test_cli_layout_flag_and_clean_refusal(tmp_path, capsys):
    from onnxmod.cli.main import main

    src = _write(tmp_path, _model(NHWC_NO_TRANSPOSE), "nhwc.onnx")
    x = (np.random.default_rng(3).random((30, 8, 8, 3)) * 255).astype(np.uint8)
    calib = write_npz(tmp_path / "calib.npz", x, np.arange(30) % 5, [f"c{i}" for i in range(5)])
    args = ["decompose", str(src), "--calib", str(calib), "-o", str(tmp_path / "out"), "--samples-per-class", "6",
            "--no-repair", "--quiet"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("onnxmod: error:") and "--layout" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        main(args + ["--layout", "nhwc", "--input-size", "8,8", "--json"])
    assert e.value.code == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["frontend"][0]["detected_from"] == "--layout nhwc"
    with pytest.raises(SystemExit) as e:
        main(args + ["--input-size", "8x"])
    assert e.value.code == 2 and "--input-size" in capsys.readouterr().err


def test_every_front_end_record_reads_in_words():
    """`onnxmod info` shows the onnxmod.frontend records through frontend.describe: each kind of
    record the front-end writes has its own sentence (no key-value fallback)."""
    records = [
        {"step": "upgrade", "from": {"ir_version": 3, "opset": 8}, "to": {"ir_version": 7, "opset": 13}},
        {"step": "nhwc_input", "detected_from": "--layout nhwc", "kept_transpose": True},
        {"step": "input_size", "size": [48, 192], "from": "calibration data"},
        {"step": "dynamic_batch", "was": 1, "reshapes": ["r1", "r2", "r3", "r4"]},
        {"step": "static_reshapes", "nodes": ["Reshape@18"]},
        {"step": "split_to_slices", "splits": ["split"]},
        {"step": "channel_shuffle", "shuffles": [{"reshape": "r", "transpose": "t", "groups": 2}]},
        {"step": "transpose_flatten", "rewrites": [{"transpose": "t", "flatten": "f", "weights": "w"}]},
        {"step": "strip_softmax", "node": "sm", "op": "LogSoftmax", "also_removed": ["Identity 'id'"]},
    ]
    steps = {m.group(1) for m in re.finditer(r'"step": "(\w+)"', Path(frontend.__file__).read_text())}
    assert steps == {r["step"] for r in records}  # every kind frontend.py records is covered here
    texts = [frontend.describe(r) for r in records]
    assert texts[0] == "upgraded from IR 3, opset 8 to IR 7, opset 13"
    assert texts[1].startswith("NHWC input turned into the NCHW input (from --layout nhwc)")
    assert texts[2] == "dynamic height/width fixed to 48x192 (from the calibration data)"
    assert texts[3] == "fixed batch 1 made dynamic; batch-bound Reshape constants rewritten in 'r1', 'r2', 'r3' and 1 more"
    assert "LogSoftmax 'sm' stripped" in texts[8] and "Identity 'id'" in texts[8]
    assert not any(t.startswith("step ") for t in texts)
    assert frontend.describe({"step": "future_rewrite", "n": 2}) == "step future_rewrite, n 2"


def test_minus_one_dims_read_as_unknown_from_file_to_modules(tmp_path):
    """Paddle writes -1 for unknown dims; onnxruntime aborts on them, so loading reads them as unknown, and the
    input_size record the frontend then writes ('from': 'calibration data') passes the metadata check on reload."""
    m = _model(DYNAMIC_HW)
    for vi in (m.graph.input[0], m.graph.output[0]):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
                d.dim_value = -1
    src = _write(tmp_path, m, "paddle_like.onnx")
    loaded = modelio.load_model(src)
    assert [d.HasField("dim_value") for d in loaded.graph.input[0].type.tensor_type.shape.dim] == [False, True, False, False]
    x = RNG.random((4, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run(loaded, x)[0], run(_model(DYNAMIC_HW), x)[0], atol=1e-6)
    rng = np.random.default_rng(2)
    calib = write_npz(tmp_path / "calib.npz", (rng.random((30, 8, 8, 3)) * 255).astype(np.uint8), np.arange(30) % 5,
                      [f"c{i}" for i in range(5)])
    manifest = decompose(src, calib, tmp_path / "mods", settings=DecomposeSettings(target_macs=1.0, samples_per_class=6),
                         quiet=True)
    assert manifest["source"]["frontend"][0] == {"step": "input_size", "size": [8, 8], "from": "calibration data"}
    for entry in manifest["modules"]:
        _checked(modelio.load_model(tmp_path / "mods" / entry["file"]))
    bad = _write(tmp_path, _model(DYNAMIC_HW), "minus_five.onnx")
    m5 = onnx.load(bad)
    m5.graph.input[0].type.tensor_type.shape.dim[2].Clear()
    m5.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -5
    onnx.save(m5, bad)
    with pytest.raises(OnnxmodError, match="negative dimension"):
        modelio.load_model(bad)
