"""Build ``torch_<arch>_<exporter>.onnx``: small equivalents of torchvision's architectures.

    python sample_graphs/zoo/make_torch_zoo.py [--out DIR] [--only ARCH,...]

torchvision's wheel for torch 2.13 here is a CUDA build that does not load on CPU, so
each pattern is written out small (input 3x32x32, 5 classes, fixed-seed weights,
randomised BatchNorm statistics) and exported with ``onnxmod.converters.export`` through
BOTH exporters (legacy TorchScript, opset 17; dynamo, opset 18):

| arch | pattern (torchvision model it stands for) |
|---|---|
| ``bottleneck`` | 1x1-3x3-1x1 bottlenecks, projection shortcut (ResNet-50) |
| ``mobilenet`` | inverted residuals: expand, depthwise 3x3, project, ReLU6 (MobileNetV2) |
| ``se`` | MBConv + squeeze-excitation gate, SiLU (EfficientNet) |
| ``grouped`` | bottleneck with a grouped 3x3 conv, groups of 8 channels (RegNet / ResNeXt) |
| ``shuffle`` | channel split, branch, Concat, channel shuffle (ShuffleNetV2) |
| ``dense`` | dense blocks: every layer Concats its input (DenseNet) |
| ``fire`` | fire modules: squeeze 1x1, expand 1x1 + 3x3 Concat (SqueezeNet) |
| ``vgg_head`` | conv stack, Flatten, Linear-ReLU-Dropout-Linear-ReLU-Linear head (VGG) |
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from onnxmod.converters import export

HERE = Path(__file__).resolve().parent
CLASSES = [f"c{i}" for i in range(5)]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EXPORTERS = ("legacy", "dynamo")


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act())


class Head(nn.Sequential):
    def __init__(self, c: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, len(CLASSES)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.f = nn.Sequential(cbr(cin, mid, 1), cbr(mid, mid, 3, stride, groups),
                               nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.f(x) + self.short(x))


def bottleneck_net(groups: int = 1) -> nn.Module:
    w = 8 * groups if groups > 1 else 16
    return nn.Sequential(cbr(3, 16), Bottleneck(16, w, 32, groups=groups), Bottleneck(32, w, 32, groups=groups),
                         Bottleneck(32, 2 * w, 64, 2, groups=groups), Head(64))


class Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4, se: bool = False):
        super().__init__()
        act = nn.SiLU if se else nn.ReLU6
        mid = cin * expand
        self.expand = cbr(cin, mid, 1, act=act)
        self.dw = cbr(mid, mid, 3, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid, max(4, cin // 2)) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


def inverted_net(se: bool) -> nn.Module:
    act = nn.SiLU if se else nn.ReLU6
    return nn.Sequential(cbr(3, 16, 3, 2, act=act), Inverted(16, 16, 1, se=se), Inverted(16, 24, 2, se=se),
                         Inverted(24, 24, 1, se=se), cbr(24, 64, 1, act=act), Head(64))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.left = nn.Sequential(cbr(cin, cin, 3, 2, groups=cin, act=nn.Identity), cbr(cin, half, 1))
        b_in = cin if stride == 2 else half
        self.right = nn.Sequential(cbr(b_in, half, 1), cbr(half, half, 3, stride, groups=half, act=nn.Identity),
                                   cbr(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.right(b)), dim=1)
        else:
            out = torch.cat((self.left(x), self.right(x)), dim=1)
        return channel_shuffle(out, 2)


def shuffle_net() -> nn.Module:
    return nn.Sequential(cbr(3, 16), ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1), ShuffleUnit(32, 32, 1),
                         cbr(32, 64, 1), Head(64))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
                               nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat((x, self.f(x)), dim=1)


def dense_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), DenseLayer(16, 8), DenseLayer(24, 8),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 24, 1, bias=False), nn.AvgPool2d(2),
                         DenseLayer(24, 8), DenseLayer(32, 8), nn.BatchNorm2d(40), nn.ReLU(), Head(40))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, 1, 1), nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat((self.e1(s), self.e3(s)), dim=1)


def fire_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), Fire(32, 8, 16), Fire(32, 8, 16),
                         nn.MaxPool2d(2, ceil_mode=True), Fire(32, 16, 32),
                         nn.Dropout(0.5), nn.Conv2d(64, len(CLASSES), 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def vgg_head_net() -> nn.Module:
    return nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2), cbr(32, 32), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 48),
                         nn.ReLU(), nn.Dropout(0.5), nn.Linear(48, len(CLASSES)))


ARCHS = {
    "bottleneck": lambda: bottleneck_net(),
    "mobilenet": lambda: inverted_net(se=False),
    "se": lambda: inverted_net(se=True),
    "grouped": lambda: bottleneck_net(groups=4),
    "shuffle": shuffle_net,
    "dense": dense_net,
    "fire": fire_net,
    "vgg_head": vgg_head_net,
}


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    spec = importlib.util.spec_from_file_location("onnxmod_make_tiny", HERE.parent / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.randomise_bn(model, seed)


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(ARCHS[arch](), seed)


def write(arch: str, exporter: str, out: Path) -> Path:
    path = out / f"torch_{arch}_{exporter}.onnx"
    export(build(arch), path, classes=CLASSES, mean=MEAN, std=STD, exporter=exporter)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", default=None, help="comma-separated archs")
    args = ap.parse_args()
    for arch in (args.only.split(",") if args.only else ARCHS):
        for exporter in EXPORTERS:
            p = write(arch, exporter, args.out)
            print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
