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
unchanged. Labels, where decompose passes them (a ``--classes`` sub-task of labelled data,
or any decomposition with ``repair_labels`` "all"), add their cross-entropy over the
modules' logits (``label_weight``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxmod.errors import OnnxmodError
from onnxmod.prefetch import prefetched
from onnxmod.progress import progress
from onnxmod.torchgraph import ParameterStore, TorchGraph, trainable_initializers

MIN_STEP_PASSES = 20  # the minimum step count never asks for more passes over the images than this
NORM_BATCHES = 8  # batches that set the training-only BatchNorms' statistics (before and after training)
ETA_AFTER_STEPS = 10  # the expected duration is said after timing this many steps


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
    # train every pruned Conv with a BatchNorm on batch statistics, folded back afterwards; off: on held-out
    # ResNet20 images (bench/sweep.py, 5 epochs) 1.6 pt below plain at lr 1e-3, 2.2 pt at 3e-3
    batchnorm: bool = False
    # weight of the cross-entropy over the modules' logits for labelled images (RepairImages.labels: decompose
    # gives them to a --classes sub-task on labelled data). ResNet56 cat+dog at --composed-macs 0.25, held-out
    # training images (bench/sweep_results/subtask_resnet56_catdog.jsonl): 1.0 vs 0 +0.30 +- 0.56 pt
    label_weight: float = 1.0
    # decay of an exponential moving average of the weights, written instead of the last step's (0: off); warmed
    # up as min(ema, (1 + t) / (10 + t)) at step t, so the pruned starting weights do not linger in what is written.
    # Off: 0.998 on held-out ResNet20 images, 1,250 steps, -0.05 +- 0.07 pt (bench/sweep_results/repair_ema_*)
    ema: float = 0.0
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

    def __init__(self, graphs: Sequence[onnx.ModelProto], norm_convs: bool = False) -> None:
        super().__init__()
        self.store = ParameterStore()
        self.graphs = torch.nn.ModuleList(
            TorchGraph(g, trainable_initializers(g), self.store, where=f"module {j}", norm_convs=norm_convs)
            for j, g in enumerate(graphs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache: dict[str, Any] = {}  # digest -> outputs: shared layers run once per batch
        return torch.cat([g(x, cache)[0].reshape(x.shape[0], -1)[:, :1] for g in self.graphs], dim=1)

    @torch.no_grad()
    def record_norms(self, batches: Iterable[torch.Tensor], identity: bool) -> None:
        """Set the training-only BatchNorms' statistics on ``batches`` (see ConvNorm.adopt_moments): before
        training in eval mode (``identity``: the modules compute what they did), after it in train mode (the
        population statistics of what training normalised by batch)."""
        was_training = self.training
        self.train(not identity)
        device = next(self.store.parameters()).device
        for norm in self.store.norms.values():
            norm.record()
        for batch in batches:
            self(batch.to(device))
        for norm in self.store.norms.values():
            norm.adopt_moments(identity)
        self.train(was_training)

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


@dataclass
class RepairImages:
    """The images repair trains on, read when needed: ``load(positions)`` gives float32 ``[B, C, H, W]`` in
    [0, 1] for positions in ``0..count-1``. Batches are read ahead on a thread (:func:`prefetched`), so memory
    does not grow with ``count`` and images of any resolution are all used."""

    count: int
    load: Callable[[np.ndarray], np.ndarray]
    # per position: the column (module) of the image's labelled class, -1 when none (a sub-task's other classes)
    labels: np.ndarray | None = None

    @classmethod
    def of_array(cls, x: np.ndarray, labels: np.ndarray | None = None) -> "RepairImages":
        return cls(len(x), lambda pos: x[pos], labels)


def step_plan(count: int, settings: RepairSettings) -> tuple[int, int]:
    """(images per step, optimiser steps). At least ``min_steps`` steps, but never more than MIN_STEP_PASSES
    passes over the images for the minimum's sake: 200 steps of 128 over 200 images would be 128 passes."""
    batch = max(1, min(settings.batch_size, count))
    per_epoch = -(-count // batch)
    minimum = min(settings.min_steps, MIN_STEP_PASSES * per_epoch)
    return batch, max(minimum, int(round(settings.epochs * per_epoch)), 1)


def repair(
    modules: Sequence[onnx.ModelProto],
    source: onnx.ModelProto,
    class_indices: Sequence[int],
    images: RepairImages | np.ndarray,
    settings: RepairSettings,
    device: str = "auto",
    quiet: bool = False,
    say: Callable[[str], None] | None = None,
) -> tuple[list[onnx.ModelProto], dict[str, Any]]:
    """Distil ``modules`` (single-logit graphs of classes ``class_indices`` of ``source``) on ``images``
    (:class:`RepairImages`, or float32 ``[N, C, H, W]`` in [0, 1]). Returns the repaired graphs and a report.
    ``say`` gets one line with the expected duration once the first steps are timed."""
    t0 = time.perf_counter()
    images = images if isinstance(images, RepairImages) else RepairImages.of_array(images)
    dev = torch_device(device)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)  # augmentation, on the training thread
    order_rng = np.random.default_rng(settings.seed)  # batch order, on the prefetch thread
    student = JointModules(modules, norm_convs=settings.batchnorm).to(dev)
    teacher = TorchGraph(source, where="source").to(dev).eval()
    cls = torch.as_tensor(list(class_indices), dtype=torch.long, device=dev)
    n = images.count
    if n < 1:
        raise OnnxmodError("repair: no images to train on")
    batch_size, total = step_plan(n, settings)
    params = list(student.store.parameters())
    if not student.store.params:
        raise OnnxmodError("repair: the modules have no trainable weights")
    opt = torch.optim.Adam(params, lr=settings.lr)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / total))))

    def orders() -> Iterator[np.ndarray]:
        """Endless passes over the images, each in a new random order, a batch of positions at a time."""
        while True:
            order = order_rng.permutation(n)
            for start in range(0, n, batch_size):
                yield np.sort(order[start:start + batch_size])  # sorted: cheaper reads; the batch is a set

    labelled = images.labels is not None and settings.label_weight > 0
    averaged = [p.detach().clone() for p in params] if settings.ema > 0 else []
    labels = torch.as_tensor(images.labels if labelled else np.zeros(0), dtype=torch.long)

    def read(positions: Iterator[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return prefetched((torch.from_numpy(np.ascontiguousarray(images.load(p), dtype=np.float32)),
                           labels[torch.from_numpy(p)] if labelled else labels) for p in positions)

    def images_only(steps: int) -> Iterator[torch.Tensor]:
        return (x for x, _ in read(itertools.islice(orders(), steps)))

    def step(batch: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = batch.to(dev, non_blocking=True)
        if settings.augment:
            batch = augment(batch, gen)
        with torch.no_grad():
            t = teacher(batch)[0].index_select(1, cls)
        z = student(batch)
        loss = distill_loss(z, t, settings.temperature, settings.mse_weight)
        if labelled and (y >= 0).any():  # the sub-task's own cross-entropy, on its labelled images
            y = y.to(dev)
            loss = loss + settings.label_weight * F.cross_entropy(z[y >= 0], y[y >= 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        opt.step()
        sched.step()
        decay = min(settings.ema, (1 + sched.last_epoch) / (10 + sched.last_epoch))  # last_epoch: steps taken
        for a, p in zip(averaged, params):
            a.lerp_(p.detach(), 1.0 - decay)
        return loss.detach()

    try:
        if student.store.norms:
            student.record_norms(images_only(NORM_BATCHES), identity=True)
        losses: list[torch.Tensor] = []
        t_steps = time.perf_counter()
        for i, (batch, y) in enumerate(progress(read(itertools.islice(orders(), total)), total=total,
                                                desc="repair (distillation)", quiet=quiet, unit="step")):
            losses.append(step(batch, y))
            if i + 1 == min(ETA_AFTER_STEPS, total) and say is not None:
                per = (time.perf_counter() - t_steps) / (i + 1)
                say(f"repair: {total} steps of {batch_size} images over {n} images, about "
                    f"{_duration(per * total)} (from the first {i + 1} steps)")
        with torch.no_grad():  # the average is what is written (and what the norms below see)
            for p, a in zip(params, averaged):
                p.copy_(a)
        if student.store.norms:  # statistics of the trained network, then into the Conv weights
            student.record_norms(images_only(NORM_BATCHES), identity=False)
            student.store.fold_norms()
    except (torch.OutOfMemoryError, MemoryError) as e:  # an actionable message, not a traceback
        raise OnnxmodError(f"repair ran out of {dev.type.upper()} memory at {batch_size} images per step "
                           f"({len(modules)} modules): pass a smaller --repair-batch-size") from e
    loss_curve = torch.stack(losses).cpu().numpy()
    report = {
        "images": int(n), "epochs": settings.epochs, "steps": total, "batch_size": batch_size,
        "lr": settings.lr, "temperature": settings.temperature, "mse_weight": settings.mse_weight,
        "clip": settings.clip, "augment": settings.augment, "batchnorm": settings.batchnorm, "ema": settings.ema,
        "label_weight": settings.label_weight if labelled else 0.0,
        "labelled_images": int((images.labels >= 0).sum()) if labelled else 0,
        "device": str(dev), "parameters": int(sum(p.numel() for p in student.store.params.parameters())),
        "loss_first": float(np.mean(loss_curve[:max(1, total // 20)])),
        "loss_last": float(np.mean(loss_curve[-max(1, total // 20):])),
        "seconds": time.perf_counter() - t0,
    }
    student.cpu()
    return student.to_onnx(), report


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
