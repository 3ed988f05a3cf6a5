"""Extract ``paddle_ppocr_cls.onnx``: PaddleOCR's text-direction classifier (0 / 180 degrees).

    python sample_graphs/zoo/fetch_paddle_cls.py [--out DIR]

The model is the one shipped in the ``rapidocr_onnxruntime`` 1.4.4 wheel
(``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx``, 585,532 bytes,
Apache-2.0, exported by Paddle2ONNX). The wheel is fetched with
``pip download --no-deps`` and only unzipped -- never installed: it depends on the
CPU ``onnxruntime`` package, which must not sit beside ``onnxruntime-gpu``.

What makes it a front-end test: IR 7 / opset 11, input ``x`` ``[-1, 3, ?, ?]`` (dynamic
H/W; PaddleOCR feeds 48x192, BGR, ``(x/255 - 0.5) / 0.5``), a Shape -> Slice -> Concat
-> Reshape flatten, a Softmax head followed by Paddle's ``scale`` (an Identity here),
MobileNetV3-style hard-swish, depthwise convs and squeeze-excitation gates.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "paddle_ppocr_cls.onnx"
WHEEL = "rapidocr_onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"


def fetch(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        data = zipfile.ZipFile(wheel).read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{MEMBER}: sha256 {digest} is not the expected {SHA256}")
    path = out / NAME
    path.write_bytes(data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    path = fetch(ap.parse_args().out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
