"""Build the tiny hand-made test graphs ``sample_graphs/tiny_*.onnx``.

    python sample_graphs/make_tiny.py [--out DIR]

Each graph is a small torch module with fixed-seed random weights (BatchNorm
statistics randomised too, so no BN is an identity), exported with
``onnxmod.converters.export`` (legacy exporter, opset 17): input ``input``
float32 [N,3,8,8] (N dynamic) in [0,1], output ``logits`` [N,K], metadata
kind=source + classes + preprocess (in_graph true). Tests import this file and use
``build(name)`` to get the same torch module back.

| file                    | exercises                                                  |
|-------------------------|------------------------------------------------------------|
| tiny_bn_kept.onnx       | Conv -> BatchNormalization -> Relu (BN nodes kept)         |
| tiny_bn_folded.onnx     | the same module, BN folded into Conv                       |
| tiny_residual.onnx      | identity residual Add between two conv stages              |
| tiny_shortcut_a.onnx    | stride-2 block with option-A Slice + Pad shortcut          |
| tiny_concat.onnx        | two conv branches Concat'ed on channels                    |
| tiny_flatten_gemm.onnx  | Flatten of a [N,8,4,4] map -> Gemm (128 features)          |
| tiny_matmul_add.onnx    | Flatten -> MatMul + Add instead of Gemm                    |
| tiny_maxpool.onnx       | MaxPool between convs                                      |
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from onnxmod.converters import export

HERE = Path(__file__).resolve().parent
INPUT_SHAPE = (3, 8, 8)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CLASSES = ["cat", "dog", "ship", "frog"]


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ConvBN(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.f = nn.Sequential(_cbr(3, 6), _cbr(6, 8, 2))
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.f(x), 1), 1))


class Residual(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.stem = _cbr(3, 6)
        self.c1 = _cbr(6, 6)
        self.c2 = nn.Sequential(nn.Conv2d(6, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, k)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(self.c2(self.c1(h)) + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ShortcutA(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.stem = _cbr(3, 4)
        self.c1 = _cbr(4, 8, 2)
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        h = self.stem(x)
        sc = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))  # option A: 4 -> 8 channels
        h = F.relu(self.c2(self.c1(h)) + sc)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ConcatNet(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.stem = _cbr(3, 4)
        self.a = _cbr(4, 3)
        self.b = nn.Sequential(nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU())
        self.post = _cbr(8, 8, 2)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([self.a(h), self.b(h)], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.post(h), 1), 1))


class FlattenGemm(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.f = nn.Sequential(_cbr(3, 6), _cbr(6, 8, 2))  # [N, 8, 4, 4]
        self.fc = nn.Linear(8 * 4 * 4, k)

    def forward(self, x):
        return self.fc(torch.flatten(self.f(x), 1))


class MatMulAdd(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.f = nn.Sequential(_cbr(3, 6), _cbr(6, 8, 2))  # [N, 8, 4, 4]
        self.w = nn.Parameter(torch.randn(8 * 4 * 4, k) * 0.1)
        self.b = nn.Parameter(torch.randn(k) * 0.1)

    def forward(self, x):
        return torch.matmul(torch.flatten(self.f(x), 1), self.w) + self.b


class MaxPoolNet(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.c1 = _cbr(3, 6)
        self.pool = nn.MaxPool2d(2)
        self.c2 = _cbr(6, 8)
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        h = self.c2(self.pool(self.c1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


# name -> (module class, export keyword arguments)
TINY: dict[str, tuple[Callable[[int], nn.Module], dict]] = {
    "bn_kept": (ConvBN, {"keep_batchnorm": True}),
    "bn_folded": (ConvBN, {}),
    "residual": (Residual, {}),
    "shortcut_a": (ShortcutA, {}),
    "concat": (ConcatNet, {}),
    "flatten_gemm": (FlattenGemm, {}),
    "matmul_add": (MatMulAdd, {}),
    "maxpool": (MaxPoolNet, {}),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The torch source of ``tiny_<name>.onnx``: same seed, same weights, eval mode."""
    cls, _ = TINY[name]
    torch.manual_seed(seed)
    return randomise_bn(cls(len(CLASSES)), seed + 1)


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics (fixed seed), so folding them is really tested; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                mod.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


def write(name: str, out_dir: Path, seed: int = 0) -> Path:
    _, kwargs = TINY[name]
    return export(
        build(name, seed),
        out_dir / f"tiny_{name}.onnx",
        input_shape=INPUT_SHAPE,
        classes=CLASSES,
        mean=MEAN,
        std=STD,
        exporter="legacy",
        **kwargs,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description="Write sample_graphs/tiny_*.onnx")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    for name in TINY:
        p = write(name, args.out)
        print(f"{p} {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
