"""Build the Keras zoo models through tf2onnx (run ONCE; the .onnx files are committed).

    python3 -m venv /tmp/venv-tf && /tmp/venv-tf/bin/pip install tensorflow-cpu tf2onnx
    /tmp/venv-tf/bin/python sample_graphs/zoo/make_keras_tf2onnx.py [--out DIR]

TensorFlow is NOT a dependency of onnxmod: this script needs a throwaway environment
(made with tensorflow-cpu 2.21.0 and tf2onnx 1.17.0). What tf2onnx writes, as a Keras
user gets it by default:

- input ``input`` float32 ``[N, 32, 32, 3]`` (NHWC), followed by tf2onnx's
  ``Transpose(perm=[0, 3, 1, 2])`` into the NCHW Convs;
- the ``Dense(..., activation="softmax")`` head: output = probabilities (Softmax);
- opset 13, no onnxmod metadata.

| file | head |
|---|---|
| ``keras_gap_softmax.onnx`` | Conv-BN-ReLU x3 (one strided), MaxPool -> GlobalAveragePooling2D -> Dense(6, softmax) |
| ``keras_flatten_softmax.onnx`` | the same trunk -> Flatten (NHWC order: a Transpose before the flatten) -> Dense(6, softmax) |

Weights and BatchNorm statistics: fixed-seed random (no BN is an identity).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = 6


def build(flatten: bool, seed: int = 0):
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3), name="input")
    x = inp
    for i, (ch, stride) in enumerate(((16, 1), (32, 2), (32, 1))):
        x = keras.layers.Conv2D(ch, 3, strides=stride, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        if i == 0:
            x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x) if flatten else keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # random BatchNorm statistics: no BN is an identity
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.normal(0, 0.1, beta.shape).astype("float32"),
                               rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])
    return model, tf


def convert(flatten: bool, path: Path) -> None:
    import tf2onnx

    model, tf = build(flatten)
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)
    fn = tf.function(lambda x: model(x, training=False))
    tf2onnx.convert.from_function(fn, input_signature=spec, opset=13, output_path=str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    convert(False, args.out / "keras_gap_softmax.onnx")
    convert(True, args.out / "keras_flatten_softmax.onnx")


if __name__ == "__main__":
    main()
