"""Repair: a short knowledge distillation of pruned modules against their source.

Training-free pruning leaves each module either small or faithful (bench/). Repair
closes the gap: the module graphs run in torch (:mod:`onnxmod.torchgraph`) with their
weights and biases as parameters, and are trained so that, on the calibration images
(random crops and flips), their logits reproduce the source's:

    loss = T^2 * KL(softmax(t / T) || softmax(z / T)) + mean((z - t)^2)

``z`` are the modules' logits, side by side, and ``t`` the source's logits for the same
classes. The KL term is what the composed model's softmax sees; the squared error keeps
every module on the source's absolute logit scale, which compose relies on when it mixes
sources. All modules train jointly: computation that is identical across them (shared
layers) is computed once and holds one parameter, so it stays byte-identical. The
trained values go back into the same graphs: node structure, names and metadata are
unchanged. Labels are not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxmod.errors import OnnxmodError
from onnxmod.progress import progress
from onnxmod.torchgraph import ParameterStore, TorchGraph, trainable_initializers


@dataclass
class RepairSettings:
    """The distillation recipe. The schedule (the first four) has no defaults here: decompose passes its own
    (``DecomposeSettings.repair_*``), so each default is written once."""

    epochs: float  # passes over the repair images (fractions allowed)
    min_steps: int  # small calibration sets still get this many optimiser steps
    batch_size: int
    lr: float  # Adam; cosine decay to 0 after a short warm-up
    temperature: float = 4.0  # KD softmax temperature
    # weight of the squared logit error next to the KL term (it anchors the logit scale); 1.0 over 0.25 on held-out
    # training images (bench/sweep.py): ResNet20 88.43% vs 88.00% (4.0: 88.40, 16: 88.08), ResNet56 91.78 vs 90.90
    mse_weight: float = 1.0
    clip: float = 2.0  # gradient-norm clip (BN-folded graphs diverge without it)
    augment: bool = True  # random crop (padding H/8) + horizontal flip
    seed: int = 0


def default_batch_size(device: str) -> int:
    """On CUDA these small graphs are launch-bound, so a step of 256 images costs little more than one of 128
    (half the steps per epoch, about 2 GB of activations for ten ResNet-56 modules); on a CPU the cost grows
    with the batch and 128 keeps memory low. (512 with the same learning rate was less faithful on ResNet-56
    at 8 epochs.)"""
    return 256 if torch_device(device).type == "cuda" else 128


def torch_device(device: str) -> torch.device:
    """``--device`` for torch: auto = CUDA when torch sees one, else CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise OnnxmodError("--device cuda: torch sees no CUDA device (repair trains in torch)")
    return torch.device("cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


class JointModules(torch.nn.Module):
    """Several single-logit module graphs as one network with output ``[N, len(graphs)]``."""

    def __init__(self, graphs: Sequence[onnx.ModelProto]) -> None:
        super().__init__()
        self.store = ParameterStore()
        self.graphs = torch.nn.ModuleList(
            TorchGraph(g, trainable_initializers(g), self.store, where=f"module {j}") for j, g in enumerate(graphs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache: dict[str, Any] = {}  # digest -> outputs: shared layers run once per batch
        return torch.cat([g(x, cache)[0].reshape(x.shape[0], -1)[:, :1] for g in self.graphs], dim=1)

    def to_onnx(self) -> list[onnx.ModelProto]:
        return [g.to_onnx() for g in self.graphs]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the zero-padded image (padding H/8, W/8) and a random horizontal flip."""
    n, _, h, w = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(x, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [n, w]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None].to(x.device), cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def distill_loss(z: torch.Tensor, t: torch.Tensor, temperature: float, mse_weight: float = 1.0) -> torch.Tensor:
    mse = F.mse_loss(z, t)
    if z.shape[1] < 2:
        return mse
    kl = F.kl_div(F.log_softmax(z / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    return temperature ** 2 * kl + mse_weight * mse


def repair(
    modules: Sequence[onnx.ModelProto],
    source: onnx.ModelProto,
    class_indices: Sequence[int],
    images: np.ndarray,
    settings: RepairSettings,
    device: str = "auto",
    quiet: bool = False,
) -> tuple[list[onnx.ModelProto], dict[str, Any]]:
    """Distil ``modules`` (single-logit graphs of classes ``class_indices`` of ``source``) on
    ``images`` (float32 ``[N, C, H, W]`` in [0, 1]). Returns the repaired graphs and a report."""
    t0 = time.perf_counter()
    dev = torch_device(device)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    student = JointModules(modules).to(dev)
    teacher = TorchGraph(source, where="source").to(dev).eval()
    cls = torch.as_tensor(list(class_indices), dtype=torch.long, device=dev)
    # on CUDA the images live on the GPU (no copy per step) and the loss stays there (no sync per step)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(dev)
    n = len(x_all)
    steps_per_epoch = max(1, -(-n // settings.batch_size))
    total = max(settings.min_steps, int(round(settings.epochs * steps_per_epoch)), 1)
    params = list(student.store.parameters())
    if not params:
        raise OnnxmodError("repair: the modules have no trainable weights")
    opt = torch.optim.Adam(params, lr=settings.lr)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / total))))

    def batches() -> Iterator[torch.Tensor]:
        """Endless passes over the images, each in a new random order."""
        while True:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, settings.batch_size):
                yield x_all[order[start:start + settings.batch_size]]

    def step(batch: torch.Tensor) -> torch.Tensor:
        if settings.augment:
            batch = augment(batch, gen)
        with torch.no_grad():
            t = teacher(batch)[0].index_select(1, cls)
        loss = distill_loss(student(batch), t, settings.temperature, settings.mse_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        opt.step()
        sched.step()
        return loss.detach()

    bar = progress(range(total), total=total, desc="repair (distillation)", quiet=quiet, unit="step")
    try:
        losses = [step(batch) for _, batch in zip(bar, batches())]
    except (torch.OutOfMemoryError, MemoryError) as e:  # an actionable message, not a traceback
        raise OnnxmodError(f"repair ran out of {dev.type.upper()} memory at {settings.batch_size} images per step "
                           f"({len(modules)} modules): pass a smaller --repair-batch-size") from e
    loss_curve = torch.stack(losses).cpu().numpy()
    report = {
        "images": int(n), "epochs": settings.epochs, "steps": total, "batch_size": settings.batch_size,
        "lr": settings.lr, "temperature": settings.temperature, "mse_weight": settings.mse_weight,
        "clip": settings.clip, "augment": settings.augment,
        "device": str(dev), "parameters": int(sum(p.numel() for p in params)),
        "loss_first": float(np.mean(loss_curve[:max(1, total // 20)])),
        "loss_last": float(np.mean(loss_curve[-max(1, total // 20):])),
        "seconds": time.perf_counter() - t0,
    }
    student.cpu()
    return student.to_onnx(), report
