"""Held-out sweeps: compare decompose settings without looking at the test set.

The training split is cut in two with a fixed seed: ``--held-out-per-class`` images of each
class are held out, the rest becomes the calibration data every setting decomposes on. Each
setting (a JSON object of ``DecomposeSettings`` fields) is decomposed, composed from all its
modules and scored on the held-out images against the source on the same images (paired
standard error as in bench/README.md). One JSON line per setting goes to stdout (and ``--out``).

    python bench/sweep.py bench/work/resnet20.onnx --data ../shared/data/cifar10/cifar-10-batches-py \\
        '{}' '{"samples_per_class": 1600, "repair_epochs": 5}'

The source was usually trained on these held-out images too, so it scores higher on them than on
the test set: compare settings with each other, not with the bench's test-set numbers. Images are
written as 8-bit (exact for 8-bit data such as CIFAR).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import balanced_indices, paired  # noqa: E402


def split_calibration(data: Path, per_class: int, out: Path, seed: int = 123) -> tuple[Path, Path]:
    """``data``'s training images as two npz files: calibration and ``per_class`` held out per class."""
    from onnxmod.data import open_dataset

    ds = open_dataset(data, split="train")
    held = balanced_indices(ds.labels, per_class, seed=seed)
    calib = np.setdiff1d(np.arange(len(ds)), held)

    def save(path: Path, idx: np.ndarray) -> Path:
        x = np.concatenate([b for b, _ in ds.iter_batches(1024, indices=idx)])
        np.savez(path, x=np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8), y=ds.labels[idx],
                 classes=np.array(ds.classes))
        return path

    return save(out / "calibration.npz", calib), save(out / "held_out.npz", held)


def score(model: Path, changes: dict[str, Any], calib: Path, held: Path, source_eval: dict[str, Any],
          work: Path, device: str) -> dict[str, Any]:
    from onnxmod.compose import compose
    from onnxmod.decompose import DecomposeSettings, decompose
    from onnxmod.evaluate import evaluate_composed

    t = time.perf_counter()
    man = decompose(model, calib, work, settings=DecomposeSettings(**changes), device=device, force=True, quiet=True)
    seconds = time.perf_counter() - t
    ev = evaluate_composed(compose([work / m["file"] for m in man["modules"]]), held, device=device, quiet=True,
                           hits=True)
    return {"settings": changes, "composed_top1": ev["top1"], "source_top1": source_eval["top1"],
            "vs_source": paired(ev, source_eval), "held_out_images": ev["n"],
            "mean_module_macs": float(np.mean([m["mac_fraction"] for m in man["modules"]])),
            "calibration_images": man["settings"]["calibration_images"], "repair": man.get("repair"),
            "decompose_s": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="source ONNX model")
    ap.add_argument("settings", nargs="+", help="JSON objects of DecomposeSettings fields, one per setting")
    ap.add_argument("--data", type=Path, required=True, help="labelled data with a training split")
    ap.add_argument("--held-out-per-class", type=int, default=400)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    from onnxmod.evaluate import evaluate_source

    changes = [json.loads(s) for s in args.settings]
    with tempfile.TemporaryDirectory(prefix="onnxmod-sweep-") as tmp:
        calib, held = split_calibration(args.data, args.held_out_per_class, Path(tmp))
        source_eval = evaluate_source(args.model, held, device=args.device, quiet=True, hits=True)
        for i, c in enumerate(changes):
            row = json.dumps(score(args.model, c, calib, held, source_eval, Path(tmp) / f"m{i}", args.device))
            print(row, flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
