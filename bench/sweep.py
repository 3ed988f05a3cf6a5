"""Held-out sweeps: compare decompose settings without looking at the test set.

The training split is cut in two with a fixed seed: ``--held-out-per-class`` images of each
class are held out, the rest becomes the calibration data every setting decomposes on. Each
setting (a JSON object of ``DecomposeSettings`` fields) is decomposed, composed from all its
modules and scored on the held-out images against the source on the same images (paired
standard error as in bench/README.md); every setting after the first is also compared with the first
on the same images (``vs_first_setting``). One JSON line per setting goes to stdout (and ``--out``).
With ``--classes``, only those classes are decomposed, and the composed model is scored on their
held-out images against the source restricted to their logits (as bench/subset does).

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

from bench.common import balanced_indices, class_view, eval_restricted, paired  # noqa: E402


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


def held_out_view(model: Path, held: Path, classes: list[str] | None, device: str) -> tuple[Any, dict[str, Any]]:
    """The held-out images to score on and the source's score there: all of them against the source, or
    (a subset) those of ``classes`` against the source restricted to their logits, as bench/subset does."""
    import onnx

    from onnxmod.data import open_dataset
    from onnxmod.evaluate import evaluate_source

    images, source = open_dataset(held), onnx.load(str(model))
    if classes:
        images = class_view(images, classes, "held-out images")
        return images, eval_restricted(source, classes, images, device)
    return images, evaluate_source(source, images, device=device, quiet=True, hits=True)


def score(model: Path, changes: dict[str, Any], calib: Path, held: Any, source_eval: dict[str, Any],
          work: Path, device: str, classes: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One setting's JSON row, and its held-out evaluation (per-image hits, for paired comparisons)."""
    from onnxmod.compose import compose
    from onnxmod.cost import count_macs
    from onnxmod.decompose import DecomposeSettings, decompose
    from onnxmod.evaluate import evaluate_composed

    t = time.perf_counter()
    man = decompose(model, calib, work, classes=classes, settings=DecomposeSettings(**changes), device=device,
                    force=True, quiet=True)
    seconds = time.perf_counter() - t
    composed = compose([work / m["file"] for m in man["modules"]])
    ev = evaluate_composed(composed, held, device=device, quiet=True, hits=True)
    row = {"settings": changes, "classes": classes, "composed_top1": ev["top1"], "source_top1": source_eval["top1"],
           "vs_source": paired(ev, source_eval), "held_out_images": ev["n"],
           "mean_module_macs": float(np.mean([m["mac_fraction"] for m in man["modules"]])),
           "composed_macs_over_source": count_macs(composed) / man["source"]["macs"],
           "calibration_images": man["settings"]["calibration_images"], "repair": man.get("repair"),
           "decompose_s": seconds}
    return row, ev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="source ONNX model")
    ap.add_argument("settings", nargs="+", help="JSON objects of DecomposeSettings fields, one per setting")
    ap.add_argument("--data", type=Path, required=True, help="labelled data with a training split")
    ap.add_argument("--held-out-per-class", type=int, default=400)
    ap.add_argument("--classes", default=None,
                    help="decompose only these classes (comma-separated); score on their held-out images "
                         "against the source restricted to their logits")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    classes = args.classes.split(",") if args.classes else None
    changes = [json.loads(s) for s in args.settings]
    with tempfile.TemporaryDirectory(prefix="onnxmod-sweep-") as tmp:
        calib, held = split_calibration(args.data, args.held_out_per_class, Path(tmp))
        images, source_eval = held_out_view(args.model, held, classes, args.device)
        first: dict[str, Any] | None = None
        for i, c in enumerate(changes):
            scored, ev = score(args.model, c, calib, images, source_eval, Path(tmp) / f"m{i}", args.device, classes)
            if first is None:
                first = ev
            else:  # settings differ by less than either differs from the source: compare them on the same images
                scored["vs_first_setting"] = paired(ev, first)
            row = json.dumps(scored)
            print(row, flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
