"""Framework -> ONNX converters (installed as ``onnxmod.converters``).

Needs PyTorch: ``pip install onnxmod[torch]``.
"""

from onnxmod.converters.export import export
from onnxmod.converters.resnet_cifar import CIFAR10_CLASSES, load_checkpoint, resnet_cifar

__all__ = ["export", "resnet_cifar", "load_checkpoint", "CIFAR10_CLASSES"]
