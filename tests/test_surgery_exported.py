"""Engine oracles on real exports: CIFAR ResNet20/56 from both PyTorch exporters, and the sample graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_oracles import run, zero_channels
from onnxmod import channels, surgery
from onnxmod.cost import count_params

torch = pytest.importorskip("torch")
from onnxmod.converters import CIFAR10_CLASSES, export, resnet_cifar  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_graphs"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _resnet_with_dead_channels(depth: int, seed: int) -> torch.nn.Module:
    """A random CIFAR ResNet where some inner channels and some residual-stream channels are
    exactly zero for every input (BN shifts of -1e4 before the ReLUs)."""
    torch.manual_seed(seed)
    net = resnet_cifar(depth)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
        for name, m in net.named_modules():  # keep residual branches small: logits stay O(1) at depth 56
            if name.endswith("bn2"):
                m.weight.mul_(0.2)
                m.bias.mul_(0.2)
        stream_dead = [1, 5]  # stage-1 stream channels; they flow into the padded stages' streams
        net.bn1.bias[stream_dead] = -1e4
        for name, m in net.named_modules():
            if name.endswith("bn1") and name != "bn1":
                m.bias[torch.randperm(m.num_features, generator=g)[: m.num_features // 3]] = -1e4
            if name.startswith("layer1") and name.endswith("bn2"):
                m.bias[stream_dead] = -1e4
    return net.eval()


@pytest.fixture(scope="module", params=[(20, "legacy"), (20, "dynamo"), (56, "legacy"), (56, "dynamo")],
                ids=lambda p: f"resnet{p[0]}-{p[1]}")
def exported(request, tmp_path_factory) -> onnx.ModelProto:
    depth, exporter = request.param
    path = tmp_path_factory.mktemp("exp") / f"r{depth}_{exporter}.onnx"
    export(_resnet_with_dead_channels(depth, seed=depth), path, classes=CIFAR10_CLASSES, mean=MEAN, std=STD,
           exporter=exporter)
    return onnx.load(path)


def _reducer_params(model: onnx.ModelProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            total += sum(int(np.prod(inits[i].dims)) for i in n.input[1:] if i in inits)
    return total


def _expected_reducer_params(a: channels.ChannelAnalysis, keep: dict[int, np.ndarray]) -> int:
    """Conv/Gemm parameter count implied by the keep-sets alone."""
    keep = a.close({k: v.copy() for k, v in keep.items()})
    total = 0
    for name, rule in a.node_rule.items():
        if rule not in ("conv", "gemm"):
            continue
        node = a.nodes[name]
        w = np.asarray(node.inputs[1].values)
        n_in = a.tensor_keep(keep, node.inputs[0].name).size
        n_out = a.tensor_keep(keep, node.outputs[0].name).size
        taps = int(np.prod(w.shape[2:])) if rule == "conv" else 1
        total += n_out * n_in * taps + (n_out if len(node.inputs) > 2 else 0)
    return total


def test_zero_channels_removed_exactly(exported):
    a = channels.analyze(exported)
    assert not a.unsupported, a.unsupported
    assert len(a.derivations) >= 2  # the two option-A Slice+Pad shortcuts
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    zero = zero_channels(a, x)
    assert sum(int(z.sum()) for z in zero.values()) > 20
    streams = [g for g in a.groups if len(g.producers) > 1 and g.removable]
    assert any(zero[g.id].any() for g in streams), "a residual-stream channel should be removable"
    rng = np.random.default_rng(1)
    keep = a.full_keep()
    for gid, z in zero.items():
        keep[gid] = ~(z & (rng.random(z.size) < 0.7))
    small = surgery.remove_channels(a, keep)
    onnx.checker.check_model(small, full_check=True)
    np.testing.assert_allclose(run(small, x)[0], run(exported, x)[0], atol=1e-5, rtol=0)
    assert _reducer_params(small) == _expected_reducer_params(a, keep) < _reducer_params(exported)
    assert count_params(small) < count_params(exported)
    assert small.ir_version == exported.ir_version
    assert [(o.domain, o.version) for o in small.opset_import] == [(o.domain, o.version) for o in exported.opset_import]


def test_keep_all_bit_exact_and_output_rows(exported):
    a = channels.analyze(exported)
    x = np.random.default_rng(2).random((3, 3, 32, 32), dtype=np.float32)
    ref = run(exported, x)[0]
    assert np.array_equal(run(surgery.remove_channels(a, a.full_keep()), x)[0], ref)
    keep = a.full_keep()
    out = a.output_group()
    keep[out.id][:] = False
    keep[out.id][[2, 7]] = True
    two = surgery.remove_channels(a, keep)
    np.testing.assert_allclose(run(two, x)[0], ref[:, [2, 7]], atol=1e-5)


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.onnx")), ids=lambda p: p.stem)
def test_sample_graphs(path):
    model = onnx.load(path)
    a = channels.analyze(model)
    assert not a.unsupported, a.unsupported
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(3).random(shape, dtype=np.float32)
    ref = run(model, x)[0]
    assert np.array_equal(run(surgery.remove_channels(a, a.full_keep()), x)[0], ref)
    zero = zero_channels(a, x[:1])
    keep = a.full_keep()
    for gid, z in zero.items():
        keep[gid] = ~z
    small = surgery.remove_channels(a, keep)
    onnx.checker.check_model(small, full_check=True)
    np.testing.assert_allclose(run(small, x[:1])[0], ref[:1], atol=1e-5, rtol=0)


@pytest.mark.shared
def test_pretrained_resnet20_zero_channels(shared_data, tmp_path):
    """Real weights: channels that happen to be all-zero for one image are removed exactly."""
    from onnxmod.converters import load_checkpoint

    net = resnet_cifar(20)
    load_checkpoint(net, shared_data / "pretrained" / "resnet20-cifar10jpeg.th")
    path = tmp_path / "r20.onnx"
    export(net, path, classes=CIFAR10_CLASSES, mean=MEAN, std=STD)
    model = onnx.load(path)
    a = channels.analyze(model)
    from onnxmod.data import open_dataset

    x = next(open_dataset(shared_data / "cifar10").iter_batches(1))[0]
    zero = zero_channels(a, x)
    assert sum(int(z.sum()) for z in zero.values()) > 0
    keep = a.full_keep()
    for gid, z in zero.items():
        keep[gid] = ~z
    small = surgery.remove_channels(a, keep)
    np.testing.assert_allclose(run(small, x)[0], run(model, x)[0], atol=1e-5, rtol=0)
