"""Layer-wise reconstruction (`onnxmod.reconstruct`): patch extraction, exactness when
nothing is pruned, error reduction when channels are, and shared layers staying shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine_oracles import run
from onnxmod import channels, graphio, ops, reconstruct, surgery
from onnxmod.compose import compose, compose_info
from onnxmod.data import open_dataset
from onnxmod.decompose import DecomposeSettings, decompose, prepare_source
from onnxmod.ops.base import FitGeometry
from onnxmod.select import prunable_groups

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_graphs" / "resnet8_cifar10.onnx"
CALIB = REPO / "sample_graphs" / "cifar10_calib.npz"
TEST = REPO / "sample_graphs" / "cifar10_test.npz"


def _images(path: Path, n: int) -> np.ndarray:
    return next(open_dataset(path).iter_batches(n))[0]


@pytest.mark.parametrize("stride,dilation,pads", [(1, 1, (1, 1, 1, 1)), (2, 1, (0, 1, 2, 0)), (1, 2, (2, 2, 2, 2))])
def test_patches_reproduce_the_conv_at_sampled_positions(stride, dilation, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 9, 11)).astype(np.float32)
    w = rng.normal(size=(5, 4, 3, 3)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[stride] * 2, dilations=[dilation] * 2,
                            pads=list(pads), kernel_shape=[3, 3])
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    (y,) = run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), x)
    h, wd = y.shape[2:]
    flat = np.stack([rng.choice(h * wd, 6, replace=False) for _ in range(len(x))])
    geometry = FitGeometry((3, 3), (stride, stride), (dilation, dilation), (pads[0], pads[1], pads[2], pads[3]))
    site = reconstruct.ConvSite("c", "y", geometry, False, flat // wd, flat % wd)
    got = reconstruct.patches(x, site) @ w.reshape(5, -1).T + b
    np.testing.assert_allclose(got, reconstruct.at_positions(y, site.rows, site.cols), atol=1e-4)


@pytest.fixture(scope="module")
def source():
    src = prepare_source(SAMPLE)
    return src, channels.analyze(src.model, canonical=True)


def _logit_error(model: onnx.ModelProto, src_model: onnx.ModelProto, x: np.ndarray) -> float:
    (a,) = run(model, x)
    (b,) = run(src_model, x)
    return float(np.mean((a - b) ** 2))


def test_nothing_pruned_reproduces_the_source(source):
    src, analysis = source
    keep = analysis.full_keep()
    model = surgery.remove_channels(analysis, keep)
    targets = reconstruct.source_targets(analysis, _images(CALIB, 64), 16, seed=0, device="cpu")
    assert any(s.residual for s in targets.sites.values())  # the blocks' second convs match the Add's sum
    (out,) = reconstruct.reconstruct([model], [keep], analysis, targets, device="cpu")
    onnx.checker.check_model(out, full_check=True)
    x = _images(TEST, 100)
    (a,), (b,) = run(out, x), run(src.model, x)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_reconstruction_refits_what_the_op_registry_says(source, monkeypatch):
    """The nodes re-fitted, and which of them match a residual sum, come from the registry rules
    (fit_geometry / sums_branches), not from op types in onnxmod.reconstruct."""
    src, analysis = source
    x = _images(CALIB, 8)
    fits = {name for name, r in analysis.node_rule.items() if ops.rule(r).fit_geometry(analysis.nodes[name])}
    targets = reconstruct.source_targets(analysis, x, 4, seed=0, device="cpu")
    assert fits and set(targets.sites) == fits
    assert all(analysis.nodes[n].op == "Conv" and int(analysis.nodes[n].attrs.get("group", 1)) == 1 for n in fits)
    assert any(s.residual for s in targets.sites.values())
    with monkeypatch.context() as m:
        m.setattr(ops.elementwise.Same, "sums_branches", lambda self, node: False)
        assert not any(s.residual for s in reconstruct.source_targets(analysis, x, 4, 0, "cpu").sites.values())
    monkeypatch.setattr(ops.conv.DenseConv, "fit_geometry", lambda self, node: None)
    assert reconstruct.source_targets(analysis, x, 4, 0, "cpu").sites == {}
    keep = analysis.full_keep()
    model = surgery.remove_channels(analysis, keep)
    targets = reconstruct.source_targets(analysis, x, 4, 0, "cpu")
    (out,) = reconstruct.reconstruct([model], [keep], analysis, targets, device="cpu")
    weights = lambda m: {i.name: numpy_helper.to_array(i).tobytes() for i in m.graph.initializer}  # noqa: E731
    assert weights(out) == weights(model)  # nothing the registry re-fits: nothing re-fitted


def test_reconstruction_reduces_the_drift_of_a_pruned_model(source):
    src, analysis = source
    rng = np.random.default_rng(1)
    keep = analysis.full_keep()
    for gid in prunable_groups(analysis, "uniform"):
        keep[gid][:] = False
        keep[gid][rng.permutation(keep[gid].size)[: keep[gid].size // 2]] = True
    keep = analysis.close(keep)
    pruned = surgery.remove_channels(analysis, keep)
    targets = reconstruct.source_targets(analysis, _images(CALIB, 256), 16, seed=0, device="cpu")
    (fixed,) = reconstruct.reconstruct([pruned], [keep], analysis, targets, device="cpu")
    onnx.checker.check_model(fixed, full_check=True)
    x = _images(TEST, 200)  # held-out images
    before, after = _logit_error(pruned, src.model, x), _logit_error(fixed, src.model, x)
    assert after < 0.7 * before, (before, after)  # measured: about 0.5x


def test_decompose_with_reconstruction_keeps_shared_layers_shared(tmp_path):
    settings = DecomposeSettings(samples_per_class=40, refit_images=200, reconstruct=True, reconstruct_images=100, repair=False,
                                 target_macs=0.6, shared_depth=0.75)
    man = decompose(SAMPLE, CALIB, tmp_path / "rec", settings=settings, classes=["cat", "dog", "ship"], quiet=True,
                    device="cpu")
    assert man["settings"]["reconstruct"] and man["timings"]["reconstruct_s"] > 0
    plain = decompose(SAMPLE, CALIB, tmp_path / "plain",
                      settings=DecomposeSettings(**{**settings.__dict__, "reconstruct": False}),
                      classes=["cat", "dog", "ship"], quiet=True, device="cpu")
    mods = [onnx.load(tmp_path / "rec" / m["file"]) for m in man["modules"]]
    plain_mods = [onnx.load(tmp_path / "plain" / m["file"]) for m in plain["modules"]]
    # the re-fitted weights differ from the plain modules' ...
    conv_w = lambda m: {n.name: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == n.input[1]))  # noqa: E731
                        for n in m.graph.node if n.op_type == "Conv"}
    rec_w, plain_w = [conv_w(m) for m in mods], [conv_w(m) for m in plain_mods]
    assert any(not np.array_equal(rec_w[0][k], plain_w[0][k]) for k in rec_w[0])
    # ... but a Conv computed identically (same upstream) in every plain module is re-fitted once for all
    sigs = [graphio.computation_digests(m) for m in plain_mods]
    outs = {n.name: n.output[0] for n in plain_mods[0].graph.node if n.op_type == "Conv"}
    shared = [k for k, t in outs.items() if len({s.get(t) for s in sigs}) == 1]
    assert shared and len(shared) < len(outs)
    for k in shared:
        assert all(np.array_equal(r[k], rec_w[0][k]) for r in rec_w), k
    # so compose still computes them once: same composed MACs as without reconstruction
    assert compose_info(compose(mods))["macs"] == compose_info(compose(plain_mods))["macs"]


def test_cli_reconstruct_flag(tmp_path, capsys):
    import json

    from onnxmod.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(tmp_path / "m"), "--classes", "cat",
              "--samples-per-class", "30", "--reconstruct", "--no-repair", "--json", "--quiet", "--device", "cpu"])
    assert e.value.code == 0
    man = json.loads(capsys.readouterr().out)
    assert man["settings"]["reconstruct"] is True and man["timings"]["reconstruct_s"] > 0
    onnx.checker.check_model(onnx.load(tmp_path / "m" / man["modules"][0]["file"]), full_check=True)


@pytest.mark.shared
def test_accuracy_preserving_settings_on_pretrained_resnet20(shared_data, tmp_path, capsys):
    """The README's "replace the source" operating point, end to end through the CLI on the
    real data: the composed model stays close to the source (under a point on these 10,000 test
    images) while costing less than it."""
    import json

    from onnxmod.cli.main import main

    weights = shared_data / "pretrained" / "resnet20-cifar10jpeg.th"
    if not weights.is_file():
        pytest.skip(f"{weights} absent")
    data = shared_data / "cifar10"

    def cli(*args: str) -> dict:
        with pytest.raises(SystemExit) as e:
            main([*args, "--quiet"])
        out, err = capsys.readouterr()
        assert e.value.code == 0, err
        return json.loads(out) if "--json" in args else {}

    src, mods, comp = tmp_path / "r20.onnx", tmp_path / "r20.modules", tmp_path / "r20.composed.onnx"
    cli("export", "resnet20", "--weights", str(weights), "-o", str(src))
    cli("decompose", str(src), "--calib", str(data), "-o", str(mods), "--reconstruct", "--no-repair", "--shared-depth", "1",
        "--target-macs", "0.9", "--channel-multiple", "4", "--device", "cpu")
    cli("compose", str(mods), "-o", str(comp))
    source = cli("eval", str(src), "--data", str(data), "--json", "--device", "cpu")
    composed = cli("eval", str(comp), "--data", str(data), "--json", "--device", "cpu")
    assert composed["n"] == source["n"] == 10000
    # measured on the 50,000-image training data (issue 21; at f7de2a0, this CPU): 87.91% -> 87.25%, 0.66 pt; the
    # same settings without --reconstruct: 0.70 pt. (On the earlier 20,000 images: 0.45 and 0.64 pt; the calibration
    # draw changed with the data, not the code.) The bound leaves ~15 images of slack for other CPUs' float rounding
    assert source["top1"] - composed["top1"] < 0.0081, (source["top1"], composed["top1"])
    info = cli("info", str(comp), "--json")
    assert info["macs"] < 0.92 * cli("info", str(src), "--json")["macs"]
