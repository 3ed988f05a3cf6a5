"""time: what decomposing costs, against running and against training the source.

Per model, in this one process, over the calibration images decompose uses (same indices):
- one plain onnxruntime inference pass of the source (same loader and batch size as
  decompose; median of a few passes, before and after the decompositions);
- ``decompose`` at default flags (repair on) and with ``--no-repair``, each timed as a whole
  (fresh runs: a decomposition cached on disk by another command is not reused here);
- one training epoch of the source as a native torch model (onnxmod.converters.resnet_cifar,
  with BatchNorm), SGD with momentum, batch 128, random crop + flip with
  ``onnxmod.repair.augment``, on the torch device repair trains on, with the images held where
  repair holds them (on the GPU when it trains there); epochs shorter than ``EPOCH_BUDGET_S``
  (a GPU's take 1-4 s, and one varied 1.7x between two runs) are timed up to ``EPOCH_REPEATS``
  times and the median is used.
The issue's bars: decompose with repair <= 10 training epochs; ``--no-repair`` <= 1.5x a plain pass."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from bench.common import MEAN, SOURCE_TRAINING, STD, Bench, log, median

EPOCH_REPEATS, EPOCH_BUDGET_S = 3, 10.0  # more timed epochs only while they add up to under the budget


def calibration_images(b: Bench) -> np.ndarray:
    from onnxmod.decompose import calibration_indices

    identity = np.arange(len(b.train.classes), dtype=np.int64)  # the sources' classes are the data's
    return calibration_indices(b.train, identity, b.default.calibration_per_class(len(identity)), b.default.seed)


def plain_pass(b: Bench, key: str, idx: np.ndarray) -> float:
    from onnxmod import runtime

    sess = runtime.make_session(b.source(key), device=b.cfg.device)
    bs = b.default.batch_size
    runtime.run(sess, next(b.train.iter_batches(bs, size=(32, 32), indices=idx[:bs]))[0])  # warm-up
    t = time.perf_counter()
    for x, _ in b.train.iter_batches(bs, size=(32, 32), indices=idx):
        runtime.run(sess, x, ["logits"])
    return time.perf_counter() - t


def training_epoch(b: Bench, key: str, idx: np.ndarray) -> dict[str, Any]:
    """Seconds for one epoch of SGD over the images at ``idx`` (or ``train_batches`` extrapolated)."""
    import torch
    import torch.nn.functional as F

    from onnxmod.converters import load_checkpoint, resnet_cifar
    from onnxmod.repair import augment, torch_device

    cfg = b.cfg
    dev = torch_device(cfg.device)
    m = cfg.model(key)
    x_all = torch.from_numpy(np.concatenate([x for x, _ in b.train.iter_batches(512, size=(32, 32), indices=idx)])).to(dev)
    y_all = torch.from_numpy(b.train.labels[idx]).to(dev)
    net = load_checkpoint(resnet_cifar(m.depth), m.weights).to(dev).train()
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    bs = cfg.train_batch_size
    per_epoch = math.ceil(len(idx) / bs)

    def step(sel: torch.Tensor) -> None:
        sel = sel.to(dev)
        loss = F.cross_entropy(net((augment(x_all[sel], gen) - mean) / std), y_all[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    order = torch.randperm(len(idx), generator=gen)
    for _ in range(2):  # warm-up (allocator, cuDNN autotuning): not counted
        step(order[:bs])
    sync()
    n_batches = per_epoch if cfg.train_batches is None else min(per_epoch, cfg.train_batches)
    epochs: list[float] = []
    while not epochs or (len(epochs) < EPOCH_REPEATS and sum(epochs) < EPOCH_BUDGET_S):
        t = time.perf_counter()
        for i in range(n_batches):
            step(order[i * bs:(i + 1) * bs])
        sync()
        epochs.append((time.perf_counter() - t) * per_epoch / n_batches)
    return {"device": str(dev), "torch_threads": torch.get_num_threads(), "batch_size": bs,
            "batches_per_epoch": per_epoch, "timed_batches": n_batches, "epochs_s": epochs,
            "epoch_s": median(epochs), "extrapolated": n_batches < per_epoch,
            "optimizer": "SGD lr 0.01 momentum 0.9 weight decay 5e-4", "augmentation": "onnxmod.repair.augment (crop + flip)"}


def run(b: Bench) -> dict[str, Any]:
    cfg = b.cfg
    res: dict[str, Any] = {"section": "time", "bars": {"repair_over_epoch_max": 10.0, "no_repair_over_plain_max": 1.5},
                           "source_training": SOURCE_TRAINING, "models": {}}
    for m in cfg.run_models:
        idx = calibration_images(b)
        log(f"{m.key}: plain ORT pass over the {len(idx)} calibration images")
        plain = [plain_pass(b, m.key, idx)]
        _, man = b.decompose(m.key, b.default, fresh=True)
        _, man_nr = b.decompose(m.key, b.settings(repair=False), fresh=True)
        spent = sum(plain)
        while len(plain) < cfg.plain_repeats and spent < cfg.plain_budget_s:  # interleaved against load drift
            plain.append(plain_pass(b, m.key, idx))
            spent += plain[-1]
        plain_s = median(plain)
        log(f"{m.key}: one training epoch of the source in torch over the same {len(idx)} images")
        epoch = training_epoch(b, m.key, idx)
        dec_s, nr_s = man["bench"]["wall_s"], man_nr["bench"]["wall_s"]
        full_training_s = epoch["epoch_s"] * SOURCE_TRAINING["images"] / len(idx) * SOURCE_TRAINING["epochs"]
        row = {
            "label": m.label, "calibration_images": int(len(idx)), "batch_size": b.default.batch_size,
            "plain_pass_s": plain, "plain_pass_median_s": plain_s, "training_epoch": epoch,
            "decompose_s": dec_s, "decompose_timings": man["timings"], "repair": man.get("repair"),
            "decompose_no_repair_s": nr_s, "decompose_no_repair_timings": man_nr["timings"],
            "decompose_over_plain": dec_s / plain_s, "decompose_over_epoch": dec_s / epoch["epoch_s"],
            "no_repair_over_plain": nr_s / plain_s, "no_repair_over_epoch": nr_s / epoch["epoch_s"],
            "full_training_s_estimated": full_training_s,
            "full_training_over_decompose": full_training_s / dec_s,
        }
        log(f"{m.key}: decompose {dec_s:.1f}s = {row['decompose_over_plain']:.2f}x a plain pass ({plain_s:.2f}s) = "
            f"{row['decompose_over_epoch']:.2f} training epochs ({epoch['epoch_s']:.1f}s); --no-repair {nr_s:.1f}s = "
            f"{row['no_repair_over_plain']:.2f}x a plain pass")
        res["models"][m.key] = row
    return res
