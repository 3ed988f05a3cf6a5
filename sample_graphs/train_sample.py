"""Train the small real sample model (CIFAR ResNet-8, width 16) and write the sample data.

    python sample_graphs/train_sample.py --data ../shared/data/cifar10/cifar-10-batches-py

Writes, next to this script:
  resnet8_cifar10.onnx   source model (legacy exporter, normalisation in the graph)
  resnet8_cifar10.th     its checkpoint ({'state_dict': ...}; `onnxmod export resnet8` reads it)
  cifar10_calib.npz      60 images per class from the train split (data_batch_1)
  cifar10_test.npz       60 images per class from test_batch
Each .npz holds x (uint8 N,H,W,C), y (int64 N), classes (str K).

CPU only, 2 threads, fixed seeds; about 4-6 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onnxmod.converters import export, resnet_cifar

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cifar10" / "cifar-10-batches-py"
MEAN = (0.485, 0.456, 0.406)  # shared/data/SOURCES.md
STD = (0.229, 0.224, 0.225)


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N,3,32,32 and int64 N from one CIFAR python batch."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d[b"labels"], dtype=np.int64)
    return x, y


def load_classes(data: Path) -> list[str]:
    with open(data / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    return [n.decode() for n in meta[b"label_names"]]


def per_class(x: np.ndarray, y: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of each class (batches are already shuffled), in data order."""
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:n] for c in range(k)]))
    return x[idx], y[idx]


def save_npz(path: Path, x_nchw: np.ndarray, y: np.ndarray, classes: list[str]) -> None:
    np.savez_compressed(
        path,
        x=np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)),  # N,H,W,C uint8
        y=y.astype(np.int64),
        classes=np.array(classes, dtype=str),
    )


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop from the 4-pixel zero-padded image, and random horizontal flip."""
    n = xb.shape[0]
    padded = F.pad(xb, (4, 4, 4, 4))
    ox = torch.randint(0, 9, (n,), generator=gen).tolist()
    oy = torch.randint(0, 9, (n,), generator=gen).tolist()
    flip = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = torch.empty_like(xb)
    for i in range(n):
        crop = padded[i, :, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def onnx_accuracy(path: Path, x_nchw_u8: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    preds = []
    for i in range(0, len(x_nchw_u8), 500):
        xb = x_nchw_u8[i : i + 500].astype(np.float32) / 255.0
        preds.append(sess.run(None, {"input": xb})[0].argmax(1))
    return float((np.concatenate(preds) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar-10-batches-py directory")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--per-class", type=int, default=60, help="images per class in each .npz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    classes = load_classes(args.data)
    k = len(classes)

    parts = [load_batch(p) for p in sorted(args.data.glob("data_batch_*"))]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = load_batch(args.data / "test_batch")
    print(f"train {len(x_train)} images, test {len(x_test)}, {k} classes", flush=True)

    # sample data first, so it exists even if training is interrupted
    args.out.mkdir(parents=True, exist_ok=True)
    save_npz(args.out / "cifar10_calib.npz", *per_class(parts[0][0], parts[0][1], args.per_class, k), classes)
    xt_s, yt_s = per_class(x_test, y_test, args.per_class, k)
    save_npz(args.out / "cifar10_test.npz", xt_s, yt_s, classes)

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    xt = (torch.from_numpy(x_train).float() / 255.0 - mean) / std
    yt = torch.from_numpy(y_train)

    model = resnet_cifar(8, num_classes=k, width=args.width)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = (len(xt) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        tot_loss, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            xb = augment(xt[idx], gen)
            yb = yt[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {tot_loss / len(xt):.3f} "
            f"train acc {correct / len(xt):.3f}  ({time.time() - t0:.0f} s)",
            flush=True,
        )
    train_s = time.time() - t0
    model.eval()

    onnx_path = args.out / "resnet8_cifar10.onnx"
    export(model, onnx_path, classes=classes, mean=MEAN, std=STD, exporter="legacy")
    torch.save(
        {"state_dict": model.state_dict(), "arch": "resnet8", "note": "sample_graphs/train_sample.py"},
        args.out / "resnet8_cifar10.th",
    )
    result = {
        "train_seconds": round(train_s, 1),
        "epochs": args.epochs,
        "params": sum(p.numel() for p in model.parameters()),
        "acc_test_npz": onnx_accuracy(onnx_path, xt_s, yt_s),
        "acc_test_batch": onnx_accuracy(onnx_path, x_test, y_test),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
