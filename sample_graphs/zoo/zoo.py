"""The zoo's registry: each third-party model, how to feed it, and what the tests expect of it.

Imported by ``tests/test_zoo.py`` and ``bench/zoo.py`` (by file path, like
``make_tiny.py``). Models are random-weight or real third-party classifiers, so their
calibration labels are their own predictions on CIFAR-10 images (:func:`calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
IMAGES = HERE.parent / "cifar10_calib.npz"
TARGET = 0.65  # the MAC target the zoo is held to


@dataclass
class ZooModel:
    file: str
    classes: int
    made_by: str  # the script in this folder that writes the file
    nhwc: bool = False  # the original takes NHWC images
    static_batch: bool = False  # the original only takes batch 1
    softmax: bool = False  # the original outputs probabilities
    input_size: tuple[int, int] | None = None  # --input-size (the original's H/W are dynamic)
    max_pinned: float = 0.0  # pinned fraction of the conv channels (README: why, when > 0)
    mac_range: tuple[float, float] = (TARGET - 0.05, TARGET + 0.05)  # module MAC fraction at TARGET
    folder: Path = HERE  # generated models (the torch zoo) live elsewhere

    @property
    def path(self) -> Path:
        return self.folder / self.file

    def decompose_args(self) -> list[str]:
        return ["--input-size", ",".join(map(str, self.input_size))] if self.input_size else []


MODELS = {
    "ir3_static_batch": ZooModel("ir3_static_batch.onnx", 10, "make_ir3_static.py", static_batch=True),
    "keras_gap_softmax": ZooModel("keras_gap_softmax.onnx", 6, "make_keras_tf2onnx.py", nhwc=True, softmax=True),
    "keras_flatten_softmax": ZooModel("keras_flatten_softmax.onnx", 6, "make_keras_tf2onnx.py", nhwc=True,
                                      softmax=True),
    "paddle_ppocr_cls": ZooModel("paddle_ppocr_cls.onnx", 2, "fetch_paddle_cls.py", softmax=True,
                                 input_size=(48, 192)),
}


TORCH_ARCHS = ("bottleneck", "mobilenet", "se", "grouped", "shuffle", "dense", "fire", "vgg_head")
TORCH_EXPORTERS = ("legacy", "dynamo")


def torch_model(arch: str, exporter: str, out: Path) -> ZooModel:
    """Export the torch zoo's ``arch`` (make_torch_zoo.py) into ``out`` and describe it."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("onnxmod_make_torch_zoo", HERE / "make_torch_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    path = mod.write(arch, exporter, out)
    return ZooModel(path.name, len(mod.CLASSES), "make_torch_zoo.py", folder=out)


def calibration(spec: ZooModel, out: Path, n: int = 300) -> Path:
    """``out``: an .npz of ``n`` CIFAR-10 images labelled by the source itself (argmax of its
    z-scored logits, so every class gets images; a class it never picks gets its 5 most typical)."""
    from onnxmod import runtime
    from onnxmod.data import open_dataset, resize_batch, write_npz
    from onnxmod.decompose import prepare_source

    names = [f"c{i}" for i in range(spec.classes)]
    src = prepare_source(spec.path, data_classes=names, input_size=spec.input_size, data_size=(32, 32))
    x, _ = next(open_dataset(IMAGES).iter_batches(n))
    logits = runtime.run(runtime.make_session(src.model, device="cpu"), resize_batch(x, src.input_chw[1:]))[0]
    z = (logits - logits.mean(0)) / (logits.std(0) + 1e-9)
    y = z.argmax(1)
    for k in range(spec.classes):
        if (y == k).sum() < 5:
            y[np.argsort(-z[:, k])[:5]] = k
    return write_npz(out, (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8), y, names)


def original_outputs(spec: ZooModel, x: np.ndarray) -> np.ndarray:
    """The unmodified file's output on NCHW images ``x`` (transposed / one by one as it needs)."""
    from onnxmod import runtime

    sess = runtime.make_session(onnx.load(spec.path), device="cpu")
    feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if spec.nhwc else x
    if spec.static_batch:
        return np.concatenate([runtime.run(sess, feed[i:i + 1])[0] for i in range(len(feed))])
    return runtime.run(sess, feed)[0]
