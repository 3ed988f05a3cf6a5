"""The one place ONNX Runtime sessions are created.

``--device auto`` uses CUDA only when the CUDA execution provider really loads
(``onnxruntime-gpu`` lists it as available even on machines without CUDA
libraries, and then prints errors for every session that asks for it). We probe
once per process with a tiny graph, with ORT logging silenced, and cache the
answer. All sessions run with ORT log severity 3 (errors only) so warnings such
as "some nodes were not assigned to the preferred provider" stay quiet.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxmod import graphio
from onnxmod.errors import OnnxmodError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
LOG_SEVERITY = 3  # 0 verbose .. 3 error .. 4 fatal
STREAM_MEMORY_BYTES = 128e6  # largest activation of one streamed batch (stream_batch_size)
# CUDA sessions: full fp32 (ORT's default TF32 convolutions moved ResNet logits by ~1e-2 against the CPU on an H200
# and changed 2 of 10k top-1 answers; bench/README.md section 9 has the fp32 numbers), and cuDNN's heuristic choice of
# algorithm rather than ORT's default timed search of every algorithm (a one-off H200 diagnostic: a new input shape
# cost a composed ResNet-56 ~0.44 s with the heuristic, 0.35-0.93 s with the search; see pad_rows for keeping shapes)
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}

_cuda_loads_cache: bool | None = None


def _quiet_logging() -> None:
    ort.set_default_logger_severity(LOG_SEVERITY)


@contextlib.contextmanager
def _silenced_stderr_fd() -> Iterator[None]:
    """Send OS-level fd 2 to /dev/null (native libraries print there directly)."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no fd 2
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tiny_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "onnxmod_cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def probe_cuda(refresh: bool = False) -> bool:
    """True when a session asking for CUDA really gets CUDAExecutionProvider (probed once, cached)."""
    global _cuda_loads_cache
    if _cuda_loads_cache is not None and not refresh:
        return _cuda_loads_cache
    ok = False
    if CUDA in ort.get_available_providers():
        so = ort.SessionOptions()
        so.log_severity_level = 4
        try:
            ort.set_default_logger_severity(4)
            with _silenced_stderr_fd():
                sess = ort.InferenceSession(_tiny_model().SerializeToString(), so, providers=[CUDA, CPU])
                ok = CUDA in sess.get_providers()
                if ok:  # loading is not enough if the first run fails (no device, driver mismatch)
                    sess.run(None, {"x": np.zeros(1, np.float32)})
        except Exception:
            ok = False
        finally:
            _quiet_logging()
    _cuda_loads_cache = ok
    return ok


def choose_providers(device: str = "auto", available: Sequence[str] | None = None, cuda_loads: bool | None = None) -> list[str]:
    """Execution providers for ``device`` (pure when ``available`` and ``cuda_loads`` are given).

    ``auto``: CUDA then CPU when CUDA is available and loads, else CPU only.
    ``cpu``: CPU only. ``cuda``: CUDA then CPU, or OnnxmodError when CUDA does not load.
    """
    if device not in DEVICES:
        raise OnnxmodError(f"unknown device '{device}' (expected one of {', '.join(DEVICES)})")
    if device == "cpu":
        return [CPU]
    if available is None:
        available = ort.get_available_providers()
    has_cuda = CUDA in available
    if has_cuda and cuda_loads is None:
        cuda_loads = probe_cuda()
    usable = bool(has_cuda and cuda_loads)
    if usable:
        return [CUDA, CPU]
    if device == "cuda":
        why = ("this onnxruntime build has no CUDA execution provider" if not has_cuda
               else "the CUDA execution provider does not load (CUDA/cuDNN libraries missing or no GPU)")
        raise OnnxmodError(f"--device cuda: {why}; use --device cpu or auto")
    return [CPU]


def with_options(names: Sequence[str]) -> list[str | tuple[str, dict[str, str]]]:
    """``names`` as ORT's ``providers`` argument: CUDA with :data:`CUDA_OPTIONS`, the others as they are."""
    return [(n, dict(CUDA_OPTIONS)) if n == CUDA else n for n in names]


def providers(device: str = "auto") -> list[str | tuple[str, dict[str, str]]]:
    """Execution providers to give a plain ``onnxruntime.InferenceSession`` (public helper), the
    ones onnxmod's own sessions use.

    ``auto``: ``[("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]`` where the
    CUDA provider really loads and runs, else ``["CPUExecutionProvider"]``; the probe is silent,
    unlike asking ORT for CUDA on a machine without CUDA libraries. ``cpu`` / ``cuda`` as for
    ``--device``. Example::

        sess = onnxruntime.InferenceSession("fixed.onnx", providers=onnxmod.runtime.providers())
    """
    return with_options(choose_providers(device))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return type(e).__name__


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    device: str = "auto",
    threads: int | None = None,
    name: str | None = None,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` on the chosen device; bad models become OnnxmodError.

    ``model``: a ModelProto or a path to an ``.onnx`` file. ``threads``: intra-op threads
    (None: ORT default). ``name``: what error messages call the model. ``config``: ORT
    session config entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``).
    """
    chosen = providers(device)
    _quiet_logging()
    so = ort.SessionOptions()
    so.log_severity_level = LOG_SEVERITY
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if isinstance(model, onnx.ModelProto):
        label = name or (model.graph.name or "<model>")
        payload: str | bytes = model.SerializeToString()
    else:
        p = Path(model)
        label = name or str(p)
        if not p.exists():
            raise OnnxmodError(f"{p}: no such file")
        if p.is_dir():
            raise OnnxmodError(f"{p}: is a directory, expected an .onnx file")
        payload = str(p)
    try:
        session = ort.InferenceSession(payload, so, providers=chosen)
    except Exception as e:
        raise OnnxmodError(f"{label}: onnxruntime cannot load it: {_first_line(e)}") from None
    session.onnxmod_label = label  # what run() errors call the model
    # CUDA: the most images one run has had; run() pads smaller batches up to it (see pad_rows)
    session.onnxmod_rows = 0 if session_device(session) == "cuda" else None
    return session


def session_device(session: ort.InferenceSession) -> str:
    """``cuda`` or ``cpu``: where the session actually runs."""
    return "cuda" if CUDA in session.get_providers() else "cpu"


def input_name(session: ort.InferenceSession) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxmodError(f"expected a model with exactly one input, got {len(inputs)}: {[i.name for i in inputs]}")
    return inputs[0].name


def run(session: ort.InferenceSession, x: np.ndarray, output_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """One run with the single input fed ``x``; ORT run errors (shape mismatch...) become OnnxmodError. On a CUDA
    session from :func:`make_session` a batch smaller than the largest run so far is zero-padded to its size and
    the outputs cut back (:func:`pad_rows`): a loop's last, shorter batch keeps the shape."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # a failing run raises (and becomes one error line); ORT need not log it too
    rows = getattr(session, "onnxmod_rows", None)
    fed = x
    if rows is not None and x.ndim:
        if len(x) < rows:
            fed = pad_rows(x, rows)
        else:
            session.onnxmod_rows = len(x)
    try:
        outs = session.run(list(output_names) if output_names else None, {input_name(session): fed}, options)
    except OnnxmodError:
        raise
    except Exception as e:
        label = getattr(session, "onnxmod_label", None)
        where = f"{label}: " if label else ""
        raise OnnxmodError(f"{where}onnxruntime failed on input of shape {list(x.shape)}: {_first_line(e)}") from None
    if fed is x:
        return outs
    return [o[:len(x)] if o.ndim and o.shape[0] == len(fed) else o for o in outs]  # outputs without the batch: whole


def stream_batch_size(model: onnx.ModelProto, requested: int) -> int:
    """``requested``, or fewer images where one batch's largest activation (float32) would pass
    STREAM_MEMORY_BYTES: ORT's peak memory follows it (ResNet-50 at 224: 39 images a batch, not 256
    with 5 GB resident), and bigger batches of big images run no faster on a CPU. CIFAR nets keep 256."""
    per_image = 4 * graphio.largest_activation(model)
    return max(1, min(int(requested), int(STREAM_MEMORY_BYTES // per_image)))


def run_chunked(session: ort.InferenceSession, x: np.ndarray, output_names: Sequence[str] | None = None,
                batch_size: int = 256) -> list[np.ndarray]:
    """:func:`run` over ``x`` in chunks of ``batch_size`` images, outputs concatenated (memory stays bounded)."""
    parts = [run(session, x[i:i + batch_size], output_names) for i in range(0, max(len(x), 1), batch_size)]
    return [np.concatenate(outs) for outs in zip(*parts)]


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with zero rows appended up to ``rows`` (``x`` itself when it has that many).

    On CUDA every change of input shape costs a cuDNN set-up of every convolution (a one-off H200 diagnostic: about
    0.44 s for a composed ResNet-56, against 7 ms for a run of the previous run's shape; ORT keeps only the last
    shape's set-up, so returning to an earlier shape costs it again; a run of 64 images cost what a run of 1 did),
    so CUDA runs keep one shape and cut the outputs back to the real rows."""
    if len(x) >= rows:
        return x
    out = np.zeros((rows, *x.shape[1:]), dtype=x.dtype)
    out[:len(x)] = x
    return out


def run_batches(
    session: ort.InferenceSession,
    batches: Iterable[np.ndarray],
    output_names: Sequence[str] | None = None,
) -> Iterator[list[np.ndarray]]:
    """Run each batch through the single-input ``session``; yields the output list per batch."""
    for x in batches:
        yield run(session, np.ascontiguousarray(x, dtype=np.float32), output_names)
