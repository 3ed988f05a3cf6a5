"""Dynamic batching: concurrent requests for one model gathered into one onnxruntime run.

Each model has one :class:`Batcher` living in the server's event loop. A request's images
are queued as one job (split into jobs of at most ``max_batch`` images when larger); the
batcher's loop takes the oldest job, waits until ``max_batch`` images are queued or the
oldest job has waited ``max_delay`` (Triton's ``max_queue_delay``), concatenates whole jobs
up to ``max_batch`` images, runs them on its own worker thread (ORT releases the GIL, the
event loop keeps accepting requests), and hands each job its own rows. Up to ``instances``
runs are in flight at once (Triton's instance count): with closed-loop clients, one batch's
HTTP work then overlaps another's onnxruntime run instead of alternating with it, and what is
queued is spread over the idle workers rather than taken by the first one. While all
workers are busy, new requests queue up, so under load batches fill without waiting at all.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from onnxmod.runtime import pad_rows

RunFn = Callable[[np.ndarray], list[np.ndarray]]
MAX_DELAY_S = 60.0  # the longest a batcher may wait for a fuller batch (serve --max-delay-ms: at most 60,000)


@dataclass
class _Job:
    x: np.ndarray
    future: asyncio.Future
    queued_ns: int


def _fail(jobs: list[_Job], error: Exception) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(error)


def _duration(count: int = 0, ns: int = 0) -> dict[str, int]:
    return {"count": count, "ns": ns}


@dataclass
class ModelStats:
    """Counters in the shape of Triton's statistics extension (``GET /v2/models/{name}/stats``)."""

    inference_count: int = 0  # images
    execution_count: int = 0  # onnxruntime runs
    last_inference_ms: int = 0
    success: list[int] = field(default_factory=lambda: [0, 0])  # jobs, ns from queueing to result
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute_infer: list[int] = field(default_factory=lambda: [0, 0])
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [runs, ns]

    def record_run(self, jobs: list[_Job], start_ns: int, end_ns: int) -> None:
        n = sum(len(j.x) for j in jobs)
        self.inference_count += n
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_infer[0] += len(jobs)
        self.compute_infer[1] += (end_ns - start_ns) * len(jobs)
        b = self.batches.setdefault(n, [0, 0])
        b[0] += 1
        b[1] += end_ns - start_ns
        for j in jobs:
            self.queue[0] += 1
            self.queue[1] += start_ns - j.queued_ns
            self.success[0] += 1
            self.success[1] += end_ns - j.queued_ns

    def record_failure(self, jobs: list[_Job], end_ns: int) -> None:
        for j in jobs:
            self.fail[0] += 1
            self.fail[1] += end_ns - j.queued_ns

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {"success": _duration(*self.success), "fail": _duration(*self.fail),
                                "queue": _duration(*self.queue), "compute_input": _duration(),
                                "compute_infer": _duration(*self.compute_infer), "compute_output": _duration()},
            "batch_stats": [{"batch_size": b, "compute_input": _duration(), "compute_infer": _duration(*v),
                             "compute_output": _duration()} for b, v in sorted(self.batches.items())],
        }


class Batcher:
    """Gathers jobs into runs of at most ``max_batch`` images, waiting at most ``max_delay_s`` for more."""

    def __init__(self, run: RunFn, max_batch: int, max_delay_s: float, name: str = "model", instances: int = 1,
                 fixed_shape: bool = False):
        """``fixed_shape``: every run gets ``max_batch`` rows, zero-padded (for CUDA: onnxmod.runtime.pad_rows)."""
        if max_batch < 1 or instances < 1:
            raise ValueError("max_batch and instances must be >= 1")
        if not (math.isfinite(max_delay_s) and 0 <= max_delay_s <= MAX_DELAY_S):  # nan would pass `< 0`
            raise ValueError(f"max_delay_s must be a finite number of seconds in [0, {MAX_DELAY_S:g}], "
                             f"got {max_delay_s!r}")
        self._run_fn, self.max_batch, self.max_delay_s, self.instances = run, max_batch, max_delay_s, instances
        self.fixed_shape = fixed_shape
        self.stats = ModelStats()
        self._pending: deque[_Job] = deque()
        self._pending_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._runs: set[asyncio.Task] = set()  # runs in flight
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"ort-{name}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the gathering loop in the running event loop."""
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.instances)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop gathering; queued and in-flight jobs fail, the worker threads finish their runs and exit."""
        for task in [t for t in (self._task, *self._runs) if t is not None]:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        _fail(list(self._pending), RuntimeError("server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    async def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """All outputs for ``x`` (``[n, ...]``), computed in batches shared with concurrent callers."""
        if not self.running:
            raise RuntimeError("batcher is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start:start + self.max_batch]
            futures.append(loop.create_future())
            self._pending.append(_Job(chunk, futures[-1], time.perf_counter_ns()))
            self._pending_images += len(chunk)
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # a free worker first: while all are busy the queue keeps filling, and the wait below is then
            # over at once (the oldest job has waited long enough)
            await self._slots.acquire()
            deadline = self._pending[0].queued_ns / 1e9 + self.max_delay_s
            while self._pending_images < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            # spread what is queued over the idle workers: one worker taking everything would leave the others
            # idle until the next wave of requests (closed-loop clients come back together)
            idle = self.instances - len(self._runs)
            run = loop.create_task(self._run(loop, self._take_batch(-(-self._pending_images // idle))))
            self._runs.add(run)
            run.add_done_callback(self._run_done)

    def _run_done(self, run: asyncio.Task) -> None:
        self._runs.discard(run)
        self._slots.release()

    def _take_batch(self, share: int) -> list[_Job]:
        """Whole jobs in arrival order, up to ``min(share, max_batch)`` images (at least one job)."""
        limit = max(1, min(share, self.max_batch))
        jobs, n = [], 0
        while self._pending and (not jobs or n + len(self._pending[0].x) <= limit):
            job = self._pending.popleft()
            self._pending_images -= len(job.x)
            if job.future.done():  # the caller went away
                continue
            jobs.append(job)
            n += len(job.x)
        return jobs

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        if not jobs:
            return
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        if self.fixed_shape:  # the padding rows come last: each job's rows below are counted from 0
            x = pad_rows(x, self.max_batch)
        start = time.perf_counter_ns()
        try:
            outs = await loop.run_in_executor(self._executor, self._run_fn, x)
        except asyncio.CancelledError:  # stop() during a run
            _fail(jobs, RuntimeError("server is shutting down"))
            raise
        except Exception as e:  # an ORT failure fails this batch's callers, not the server
            self.stats.record_failure(jobs, time.perf_counter_ns())
            _fail(jobs, e)
            return
        self.stats.record_run(jobs, start, time.perf_counter_ns())
        row = 0
        for j in jobs:
            rows = slice(row, row + len(j.x))
            row += len(j.x)
            if not j.future.done():
                j.future.set_result([o[rows] for o in outs])
