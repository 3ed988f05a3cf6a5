"""Train a CIFAR ResNet source classifier for any class count, as ``onnxmod export`` reads it.

    python bench/train_source.py resnet20 --data ../shared/data/cifar100 --epochs 40 \\
        -o bench/models/cifar100_resnet20.th

The data is any labelled set onnxmod reads (an image folder with train/ and test/, CIFAR batches, an
.npz); training uses its train split only, and the test split is scored once, after the last epoch
(nothing is chosen on it). Recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4), a one-cycle
learning-rate schedule, random crop (zero padding 4 at 32x32) + horizontal flip, cross-entropy. Inputs
are normalised like the public CIFAR checkpoints (ImageNet mean/std), the normalisation
``onnxmod export`` bakes in by default.

Writes:
- ``OUT`` (``.th``): ``{"state_dict", "classes", "arch", "mean", "std"}``; ``onnxmod export ARCH
  --weights OUT`` takes the class count from the classifier and the names from ``classes``.
- ``OUT`` with ``.json``: how it was trained (epochs, seconds, machine, per-epoch loss, test top-1).
- ``OUT.resume`` after every epoch, removed at the end: run the same command again to continue an
  interrupted run from its last finished epoch (same arguments required).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from onnxmod.converters.resnet_cifar import resnet_cifar  # noqa: E402
from onnxmod.data import Dataset, open_dataset  # noqa: E402
from onnxmod.progress import progress, say  # noqa: E402
from onnxmod.repair import augment  # noqa: E402

MEAN = (0.485, 0.456, 0.406)  # what `onnxmod export` bakes in by default
STD = (0.229, 0.224, 0.225)
ARCHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def read_uint8(ds: Dataset, quiet: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``ds`` as uint8 NCHW (exact for 8-bit images) and its labels."""
    x = np.empty((len(ds), ds.channels, *ds.image_size), np.uint8)
    at = 0
    with progress(total=len(ds), desc=f"reading {ds.path.name}", unit="img", quiet=quiet) as bar:
        for xb, _ in ds.iter_batches(1000):
            x[at:at + len(xb)] = np.round(xb * 255.0).astype(np.uint8)
            at += len(xb)
            bar.update(len(xb))
    return torch.from_numpy(x), torch.from_numpy(ds.labels.copy())


def normalise(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(STD, device=device).view(1, -1, 1, 1)
    return (x_uint8.to(device).float() / 255.0 - mean) / std


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            logits = model(normalise(x[start:start + 1000], device))
            correct += int((logits.argmax(1).cpu() == y[start:start + 1000]).sum())
    return correct / len(x)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=sorted(ARCHS, key=ARCHS.get))
    ap.add_argument("--data", required=True, type=Path, help="labelled data with a train and a test split")
    ap.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write (.th)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quiet", "-q", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    resume_path = out.with_name(out.name + ".resume")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("quiet", "device", "output")}

    train = open_dataset(args.data, split="train")
    test = open_dataset(args.data, split="test")
    train.require_labels("training")
    if test.classes != train.classes:
        raise SystemExit(f"{args.data}: the train and test splits name different classes")
    t_read = time.perf_counter()
    x_train, y_train = read_uint8(train, args.quiet)
    x_test, y_test = read_uint8(test, args.quiet)
    read_s = time.perf_counter() - t_read
    say(f"read {len(x_train)} training and {len(x_test)} test images of {train.num_classes} classes "
        f"in {read_s:.0f} s", args.quiet)

    model = resnet_cifar(ARCHS[args.arch], num_classes=train.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size  # the last partial batch is dropped
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[dict[str, float]] = []
    train_s = 0.0
    if resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=False)  # our own file
        if state["settings"] != settings:
            raise SystemExit(f"{resume_path}: written by a run with other arguments; remove it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history, train_s = state["history"], state["train_s"]
        say(f"resuming after epoch {len(history)} of {args.epochs} ({train_s / 60:.1f} min trained)", args.quiet)

    for epoch in range(len(history), args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                          quiet=args.quiet):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(normalise(x_train[idx], device), gen)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        train_s += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_top1": correct / seen,
                        "seconds": time.perf_counter() - t0})
        say(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.3f}, train top-1 {correct / seen:.4f}, "
            f"{time.perf_counter() - t0:.0f} s", args.quiet)
        atomic_save({"settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "generator": gen.get_state(), "history": history,
                     "train_s": train_s}, resume_path)

    top1 = evaluate(model, x_test, y_test, device)
    atomic_save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "classes": train.classes,
                 "arch": args.arch, "mean": list(MEAN), "std": list(STD)}, out)
    record = {
        "arch": args.arch, "classes": train.num_classes, "data": str(args.data),
        "train_images": len(x_train), "test_images": len(x_test),
        "recipe": {"optimizer": "SGD momentum 0.9 nesterov", "weight_decay": args.weight_decay,
                   "schedule": "one-cycle, 25% warm-up", "peak_lr": args.lr, "batch_size": args.batch_size,
                   "augmentation": "onnxmod.repair.augment (crop + flip)", "mean": list(MEAN), "std": list(STD),
                   "seed": args.seed},
        "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
        "train_seconds": train_s, "read_seconds": read_s,
        "epoch_seconds_median": float(np.median([h["seconds"] for h in history])),
        "machine": machine(device),
        "test_top1": top1,
        "history": history,
        "command": "python bench/train_source.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    resume_path.unlink(missing_ok=True)
    say(f"{out}: test top-1 {top1:.4f} after {args.epochs} epochs ({train_s / 60:.1f} min)", args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
