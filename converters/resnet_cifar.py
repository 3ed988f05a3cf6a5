"""CIFAR ResNets (He et al. 2016, CIFAR variant) with option-A shortcuts.

The architecture and parameter names follow akamaster/pytorch_resnet_cifar10, so its
checkpoints (and the fine-tuned ones in ``shared/data/pretrained``) load unchanged:

    conv1 (3->w, 3x3) - bn1 - relu
    layer1: n BasicBlocks, w planes
    layer2: n BasicBlocks, 2w planes, stride 2 in the first block
    layer3: n BasicBlocks, 4w planes, stride 2 in the first block
    global average pool - flatten - linear (4w -> num_classes)

with ``n = (depth - 2) / 6`` and ``w = 16`` for the published models. A block whose
shape changes uses the parameter-free option-A shortcut: subsample ``x[:, :, ::2, ::2]``
and zero-pad the channels on both sides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from onnxmod.errors import OnnxmodError
from onnxmod.modelio import check_class_names, require_file

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

DEPTHS = (20, 32, 44, 56, 110)


class ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero channel padding (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_lo = (planes - in_planes) // 2
        self.pad_hi = planes - in_planes - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # for the published models pad_lo == pad_hi == planes // 4
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10, width: int = 16, in_channels: int = 3):
        super().__init__()
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if width < 1:
            raise ValueError("width must be >= 1")
        self.depth = 6 * num_blocks + 2
        self.width = width
        self.num_classes = num_classes
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks, 1)
        self.layer2 = self._make_layer(2 * width, num_blocks, 2)
        self.layer3 = self._make_layer(4 * width, num_blocks, 2)
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # global average pool over the whole map (akamaster: avg_pool2d(out, out.size(3)))
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def resnet_cifar(depth: int, num_classes: int = 10, width: int = 16) -> ResNetCifar:
    """A CIFAR ResNet of any depth ``6n + 2`` (8, 14, 20, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise OnnxmodError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, ...), got {depth}")
    return ResNetCifar((depth - 2) // 6, num_classes=num_classes, width=width)


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(20, num_classes)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(32, num_classes)


def resnet44(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(44, num_classes)


def resnet56(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(56, num_classes)


def resnet110(num_classes: int = 10) -> ResNetCifar:
    return resnet_cifar(110, num_classes)


@dataclass
class Checkpoint:
    """A checkpoint's tensors and what a training script may have recorded beside them
    (bench/train_source.py writes ``classes``, ``mean`` and ``std``)."""

    state_dict: dict[str, torch.Tensor]
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def num_classes(self) -> int | None:
        """The classifier's output count (``linear.weight`` is ``[K, features]``), if it has one."""
        w = self.state_dict.get("linear.weight")
        return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A ``{'state_dict': ...}`` (optionally with ``classes``, ``mean``, ``std``) or plain state_dict checkpoint.
    ``module.`` prefixes (DataParallel) are stripped; only tensors and plain values are unpickled."""
    p = Path(path)
    require_file(p, "a checkpoint file")
    _check_checkpoint_format(p)
    try:
        obj: Any = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" in str(e).lower() and "load failed" in str(e).lower():
            raise OnnxmodError(
                f"{p}: checkpoint holds Python objects other than tensors and is not unpickled for safety; "
                "re-save it as torch.save({'state_dict': model.state_dict()})"
            ) from None
        raise OnnxmodError(f"{p}: not a PyTorch checkpoint (cannot unpickle: {type(e).__name__})") from None
    extra: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extra, obj = obj, obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise OnnxmodError(f"{p}: not a state_dict checkpoint (expected {{'state_dict': ...}} or a plain state_dict)")
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}
    return Checkpoint(sd, _recorded_classes(extra.get("classes"), p),
                      _recorded_floats(extra.get("mean"), "mean", p), _recorded_floats(extra.get("std"), "std", p))


def _recorded_classes(value: Any, p: Path) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise OnnxmodError(f"{p}: the checkpoint's 'classes' is not a list of class names")
    return check_class_names(list(value), f"{p}: the checkpoint's 'classes'")


def _recorded_floats(value: Any, key: str, p: Path) -> tuple[float, ...] | None:
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok or (key == "std" and any(v == 0 for v in value)):
        raise OnnxmodError(f"{p}: the checkpoint's '{key}' is not 3 finite numbers{' (non-zero)' if key == 'std' else ''}")
    return tuple(float(v) for v in value)


def _check_checkpoint_format(p: Path) -> None:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle); say plainly what else it is."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise OnnxmodError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    if not head:
        raise OnnxmodError(f"{p}: empty file, not a PyTorch checkpoint")
    try:
        import onnx

        is_onnx = len(onnx.load(str(p), load_external_data=False).graph.node) > 0
    except Exception:
        is_onnx = False
    if is_onnx:
        raise OnnxmodError(f"{p}: is an ONNX model, not a PyTorch checkpoint (--weights takes a .th/.pt file "
                           "saved with torch.save)")
    raise OnnxmodError(f"{p}: not a PyTorch checkpoint (torch.save writes a zip archive or a pickle)")


def _first(items: list[str], n: int = 5) -> str:
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a ``{'state_dict': ...}`` or plain state_dict checkpoint into ``model``.

    ``module.`` prefixes (DataParallel) are stripped. ``num_batches_tracked`` buffers
    missing from old checkpoints are tolerated. Any other mismatch raises
    :class:`OnnxmodError` naming the first missing/unexpected keys and shape mismatches.
    Returns ``model`` in eval mode.
    """
    return load_state(model, read_checkpoint(path).state_dict, path)


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike) -> nn.Module:
    """:func:`load_checkpoint` of a state_dict already read from ``path`` (named in errors)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_first(shapes, 3)}")
        raise OnnxmodError(f"{Path(path)}: checkpoint does not fit the model; " + "; ".join(parts))
    sd = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(sd, strict=False)
    model.eval()
    return model
