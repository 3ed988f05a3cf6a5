"""Labelled image datasets for ``--calib`` / ``--data``.

Formats (docs/DESIGN.md "Data"):

* CIFAR python batches: a dir with ``batches.meta`` + ``data_batch_*`` / ``test_batch``
  (CIFAR-10), or ``meta`` + ``train`` / ``test`` (CIFAR-100, fine labels), or a parent
  dir holding exactly one such dir.
* Image folder: ``DIR/<class>/*.png|jpg|jpeg`` (classes sorted by name); when
  ``DIR/<split>/`` exists it is used.
* ``.npz``: ``x`` (``N,H,W,C`` uint8 or ``N,C,H,W`` float in [0, 1]), ``y`` (``N``),
  optional ``classes``.

Every dataset streams ``(x float32 NCHW in [0, 1], y int64)`` batches with
:meth:`Dataset.iter_batches`; the whole set is never converted to float32 at once.
Bad data raises :class:`OnnxmodError` with a one-line message naming the path.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxmod.errors import OnnxmodError
from onnxmod.prefetch import prefetched
from onnxmod.modelio import MAX_CLASSES, MAX_SIDE, atomic_path, check_class_names, require_file

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")

Batch = tuple[np.ndarray, np.ndarray]


# a decoded image's pixel bound: 25M pixels (5000 x 5000) is ~300 MB as float32; Pillow's own bomb limit (89M)
# let one 9000 x 9000 PNG of 236 KB take 2.3 GB in predict
MAX_IMAGE_PIXELS = 25_000_000
MAX_IMAGE_FILE_READ = 64 << 20  # image files up to this size are read into memory whole before decoding
READ_AHEAD_BATCHES = 2  # batches an image folder decodes ahead of their consumer

# --------------------------------------------------------------------------- base


class Dataset:
    """An image set, labelled or not. Subclasses fill ``path``, ``classes``, ``labels``,
    ``image_size`` (H, W), ``channels`` and implement :meth:`_load`."""

    path: Path
    classes: list[str]  # [] when unlabelled
    labels: np.ndarray  # int64 [N]; -1 everywhere when unlabelled
    labelled: bool = True
    image_size: tuple[int, int]
    channels: int
    format: str = "?"
    decodes_files: bool = False  # reading decodes one image file per image (slow enough to read ahead)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def with_labels(self, labels: np.ndarray, classes: list[str]) -> "Dataset":
        """A copy labelled with ``labels`` (e.g. a model's own predictions) over ``classes``."""
        out = copy.copy(self)
        out.labels, out.classes, out.labelled = np.asarray(labels, dtype=np.int64), list(classes), True
        return out

    def require_labels(self, why: str) -> None:
        if not self.labelled:
            raise OnnxmodError(f"{self.path}: images without labels ({why} needs a class per image and finds "
                               f"no labels: give <class>/ sub-folders, or 'y' in the .npz)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path} n={len(self)} classes={self.num_classes} "
                f"size={self.image_size} channels={self.channels}>")

    # subclasses: images at sorted-or-not indices -> float32 NCHW in [0, 1] at native size, or at
    # ``size`` when a subclass can resize while reading (iter_batches resizes whatever differs)
    def _load(self, idx: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def select(self, limit: int | None = None, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The image indices :meth:`iter_batches` visits, in order."""
        if indices is None:
            idx = np.arange(len(self), dtype=np.int64)
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
                raise OnnxmodError(f"{self.path}: index out of range 0..{len(self) - 1}")
        if limit is not None:
            if limit < 0:
                raise OnnxmodError(f"--limit must be >= 0, got {limit}")
            idx = idx[:limit]
        return idx

    def num_batches(self, batch_size: int = 256, limit: int | None = None, indices=None) -> int:
        return math.ceil(len(self.select(limit, indices)) / max(1, batch_size))

    def iter_batches(
        self,
        batch_size: int = 256,
        size: tuple[int, int] | None = None,
        limit: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> Iterator[Batch]:
        """Yield ``(x, y)``: x float32 ``[B, C, H, W]`` in [0, 1] (resized bilinearly to
        ``size`` = (H, W) when given and different), y int64 ``[B]``.

        ``indices``: visit only these images, in this order; ``limit``: at most this many.
        """
        if batch_size < 1:
            raise OnnxmodError(f"batch size must be >= 1, got {batch_size}")
        idx = self.select(limit, indices)
        target = tuple(int(s) for s in size) if size is not None else None

        def batches() -> Iterator[Batch]:
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                x = self._load(chunk, target)
                if target is not None and tuple(x.shape[2:]) != target:
                    x = resize_batch(x, target)
                yield np.ascontiguousarray(x, dtype=np.float32), self.labels[chunk]

        # decoding image files overlaps the consumer's work (inference releases the GIL)
        yield from (prefetched(batches(), READ_AHEAD_BATCHES) if self.decodes_files else batches())


def resize_batch(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (Pillow) resize of a float NCHW batch to ``size`` = (H, W)."""
    n, c = x.shape[:2]
    h, w = size
    out = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        for j in range(c):
            img = Image.fromarray(np.ascontiguousarray(x[i, j], dtype=np.float32), mode="F")
            out[i, j] = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _check_labels(labels: np.ndarray, num_classes: int | None, where: Path | str) -> np.ndarray:
    """Labels as int64 class indices: integers (a float label must be whole and finite) in 0..num_classes-1.

    ``num_classes`` None (an npz without 'classes'): the labels make the classes, at most MAX_CLASSES of
    them, so a label of 1e9 is an error rather than a billion class names.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise OnnxmodError(f"{where}: labels must be 1-D, got shape {list(labels.shape)}")
    if labels.dtype.kind not in "iubf":
        raise OnnxmodError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if not labels.size:
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise OnnxmodError(f"{where}: labels must be integers, got {labels[bad][0].item()} (label #{int(np.argmax(bad))})")
    lo, hi = labels.min().item(), labels.max().item()
    limit = MAX_CLASSES if num_classes is None else num_classes
    if lo < 0 or hi >= limit:
        bad = int(lo if lo < 0 else hi)
        if num_classes is None and lo >= 0:
            raise OnnxmodError(f"{where}: label {bad} would make {bad + 1} classes; at most {MAX_CLASSES} "
                               "without a 'classes' array naming them")
        raise OnnxmodError(f"{where}: label {bad} out of range 0..{limit - 1}")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR pickles


def _get(d: dict, key: str):
    if key in d:
        return d[key]
    return d.get(key.encode())


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR batch never holds."""


def _plain_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise _Refused(f"an array of Python objects (dtype {dt})")
    return dt


def _ndarray_only(subtype, *args):
    if subtype is not np.ndarray:
        raise _Refused(f"an array subclass {subtype!r}")
    return _np_multiarray._reconstruct(subtype, *args)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # how Python 3 writes bytes into a protocol-2 pickle: _codecs.encode(text, "latin1")
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    # how protocol 2 writes b"" (an empty array's buffer): bytes(); bytes(n) would allocate n bytes
    if args:
        raise _Refused(f"bytes{args!r}")
    return b""


def _np_frombuffer(buf, dtype, shape, order):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused(f"an array of dtype {dtype!r}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


_np_multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 name, numpy 1 fallback
# what a CIFAR python batch is made of (numpy 1 and 2 module names): plain arrays and dtypes
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_only,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_only,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and plain numpy arrays; nothing that can run code."""

    def find_class(self, module: str, name: str):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise OnnxmodError(f"{path}: refused to unpickle: it asks for {e}, which a CIFAR batch never holds "
                           "(data files may not run code)") from None
    except Exception as e:
        raise OnnxmodError(f"{path}: cannot read CIFAR batch ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise OnnxmodError(f"{path}: not a CIFAR batch (pickle holds {type(d).__name__}, expected dict)")
    return d


def _names(v, path: Path) -> list[str]:
    if v is None:
        raise OnnxmodError(f"{path}: no label names")
    if not isinstance(v, (list, tuple)) and not (isinstance(v, np.ndarray) and v.ndim == 1):
        raise OnnxmodError(f"{path}: label names must be a list of strings, got {type(v).__name__}")
    try:
        names = [x.decode() if isinstance(x, bytes) else x for x in v]
    except UnicodeDecodeError:
        raise OnnxmodError(f"{path}: label names must be UTF-8 text") from None
    return check_class_names([str(x) if isinstance(x, np.str_) else x for x in names], f"{path}: label names")


def _cifar_kind(d: Path) -> str | None:
    """``cifar10`` / ``cifar100`` when ``d`` is a CIFAR python-batches dir."""
    if (d / "batches.meta").is_file():
        return "cifar10"
    if (d / "meta").is_file() and ((d / "train").is_file() or (d / "test").is_file()):
        return "cifar100"
    return None


class CifarDataset(Dataset):
    format = "cifar"

    def __init__(self, path: Path, kind: str, split: str = "test"):
        self.path = path
        self.kind = kind
        if split not in SPLITS:
            raise OnnxmodError(f"{path}: unknown split '{split}' (expected train or test)")
        if kind == "cifar10":
            meta = _unpickle(path / "batches.meta")
            self.classes = _names(_get(meta, "label_names"), path / "batches.meta")
            files = sorted(path.glob("data_batch_*")) if split == "train" else [path / "test_batch"]
            files = [f for f in files if f.is_file()]
            label_key = "labels"
        else:
            meta = _unpickle(path / "meta")
            self.classes = _names(_get(meta, "fine_label_names"), path / "meta")
            files = [path / split] if (path / split).is_file() else []
            label_key = "fine_labels"
        if not files:
            raise OnnxmodError(f"{path}: no {split} split in this CIFAR directory")
        parts, labels = [], []
        side = None
        for f in files:
            d = _unpickle(f)
            data = _get(d, "data")
            lab = _get(d, label_key)
            if lab is None and kind == "cifar10":
                lab = _get(d, "fine_labels")
            if data is None:
                raise OnnxmodError(f"{f}: CIFAR batch without 'data'")
            if lab is None:
                raise OnnxmodError(f"{f}: CIFAR batch without labels ('{label_key}')")
            try:
                data, lab = np.asarray(data), np.asarray(lab)
            except (ValueError, TypeError):  # ragged lists
                raise OnnxmodError(f"{f}: 'data' and labels must be arrays") from None
            if data.dtype != np.uint8 or data.ndim not in (2, 4):
                raise OnnxmodError(f"{f}: 'data' must be uint8 [N, 3*H*W], got {data.dtype} {list(data.shape)}")
            if data.ndim == 2:
                per = data.shape[1] // 3
                s = math.isqrt(per)
                if data.shape[1] % 3 or s * s != per or not 0 < s <= MAX_SIDE:
                    raise OnnxmodError(f"{f}: 'data' rows of {data.shape[1]} values are not 3 square planes")
                data = data.reshape(-1, 3, s, s)
            elif data.shape[1] != 3 or not (0 < data.shape[2] <= MAX_SIDE and 0 < data.shape[3] <= MAX_SIDE):
                raise OnnxmodError(f"{f}: 'data' must be [N, 3, H, W], got {list(data.shape)}")
            if side is not None and data.shape[2:] != side:
                raise OnnxmodError(f"{f}: image size {data.shape[2:]} differs from the other batches {side}")
            side = data.shape[2:]
            if lab.shape[0:1] != data.shape[0:1]:
                raise OnnxmodError(f"{f}: {data.shape[0]} images but {lab.shape[0] if lab.ndim else 0} labels")
            parts.append(data)
            labels.append(_check_labels(lab, len(self.classes), f))
        self._data = parts[0] if len(parts) == 1 else np.concatenate(parts)  # uint8 NCHW
        if not len(self._data):
            raise OnnxmodError(f"{path}: no images in the {split} split")
        self.labels = np.concatenate(labels).astype(np.int64)
        self.image_size = (int(self._data.shape[2]), int(self._data.shape[3]))
        self.channels = 3

    def _load(self, idx: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        return self._data[idx].astype(np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------- image folder


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _subdirs(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def read_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """One image file -> float32 ``[C, H, W]`` in [0, 1] at its own size (RGB, or L for 1 channel).

    Every command reads images through here or :func:`decode_image` (and resizes with
    :func:`fit_image`), so ``eval`` on an image folder, ``predict`` and ``serve`` see the same
    numbers for the same file.
    """
    p = Path(path)
    require_file(p, "an image file")
    # Pillow parses a file in dozens of small reads; from memory a 32x32 JPEG decodes 1.8x faster
    if p.stat().st_size <= MAX_IMAGE_FILE_READ:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise OnnxmodError(f"{p}: cannot read image ({e.strerror or type(e).__name__})") from None
        return decode_image(io.BytesIO(data), str(p), channels)
    return decode_image(p, str(p), channels)


def decode_image(src: str | os.PathLike | BinaryIO, label: str, channels: int = 3) -> np.ndarray:
    """An image (a path or an open binary file; ``label`` names it in errors) -> float32 ``[C, H, W]``.

    Images so large that decoding them could exhaust memory (more than MAX_IMAGE_PIXELS, or
    Pillow's decompression-bomb limit) are refused.
    """
    if channels not in (1, 3):
        raise OnnxmodError(f"{label}: models taking {channels} channels cannot be fed images (1 or 3 only)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:  # from the header, before anything is decoded
                    raise OnnxmodError(f"{label}: refused: {img.width}x{img.height} pixels, more than the "
                                       f"{MAX_IMAGE_PIXELS:,} a decoded image may have")
                img.load()
                if img.mode == "P" and "transparency" in img.info:  # Pillow warns converting these straight to RGB
                    img = img.convert("RGBA")
                img = img.convert("L" if channels == 1 else "RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise OnnxmodError(f"{label}: refused: {str(e).split(',')[0]} (a possible decompression bomb)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise OnnxmodError(f"{label}: cannot read image ({type(e).__name__})") from None
    a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()


def fit_image(chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[C, H, W]`` resized to ``size`` = (H, W) when it differs (the one resize of every command)."""
    return resize_batch(chw[None], size)[0] if chw.shape[1:] != tuple(int(s) for s in size) else chw


def load_images(paths: Sequence[str | os.PathLike], channels: int, size: tuple[int, int]) -> np.ndarray:
    """Image files -> float32 ``[N, C, H, W]`` in [0, 1], each resized to ``size`` = (H, W) when it differs."""
    out = np.empty((len(paths), channels, int(size[0]), int(size[1])), np.float32)
    for i, p in enumerate(paths):
        out[i] = fit_image(read_image(p, channels), size)
    return out


class FolderDataset(Dataset):
    """``DIR/<class>/*.png|jpg``; or, unlabelled, ``DIR/*.png|jpg``."""

    format = "folder"
    decodes_files = True

    def __init__(self, path: Path, labelled: bool = True):
        self.path = path
        classes, files, labels = [], [], []
        for sub in _subdirs(path) if labelled else [path]:
            imgs = _list_images(sub)
            classes.append(sub.name)
            files.extend(imgs)
            labels.extend([len(classes) - 1] * len(imgs))
        if not files:
            raise OnnxmodError(f"{path}: no images found (expected {path}/<class>/*.png|jpg)")
        if labelled:
            check_class_names(classes, f"{path}: class folders")
        self.labelled = labelled
        self.classes = classes if labelled else []
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64) if labelled else np.full(len(files), -1, dtype=np.int64)
        first = read_image(files[0])
        self.image_size = (int(first.shape[1]), int(first.shape[2]))
        self.channels = 3

    def _load(self, idx: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        # each file is resized once, straight to the wanted size, exactly as `predict` does
        return load_images([self.files[int(i)] for i in idx], self.channels, size or self.image_size)


# --------------------------------------------------------------------------- npz


class NpzDataset(Dataset):
    format = "npz"

    def __init__(self, path: Path):
        self.path = path
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:
            raise OnnxmodError(f"{path}: cannot read .npz ({type(e).__name__})") from None
        if not hasattr(z, "files"):
            raise OnnxmodError(f"{path}: not an .npz archive (a single array); expected keys x, y")
        try:
            if "x" not in z.files:
                raise OnnxmodError(f"{path}: no 'x' array (keys: {', '.join(z.files) or 'none'})")
            x = z["x"]
            y = z["y"] if "y" in z.files else None  # unlabelled
            classes = None
            if "classes" in z.files:
                c = z["classes"]
                classes = [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(c).reshape(-1)]
                check_class_names(classes, f"{path}: 'classes'")
        except OnnxmodError:
            raise
        except Exception as e:
            raise OnnxmodError(f"{path}: cannot read .npz ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            z.close()
        if x.ndim != 4:
            raise OnnxmodError(f"{path}: 'x' must be 4-D (N,H,W,C uint8 or N,C,H,W float), got shape {list(x.shape)}")
        if x.dtype == np.uint8:
            if x.shape[3] not in (1, 3):
                raise OnnxmodError(f"{path}: uint8 'x' must be N,H,W,C with C 1 or 3, got shape {list(x.shape)}")
            self._nhwc = True
            self.channels = int(x.shape[3])
            self.image_size = (int(x.shape[1]), int(x.shape[2]))
        elif x.dtype.kind == "f":
            if x.shape[1] not in (1, 3):
                raise OnnxmodError(f"{path}: float 'x' must be N,C,H,W with C 1 or 3, got shape {list(x.shape)}")
            if x.size:
                lo, hi = float(np.min(x)), float(np.max(x))
                if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
                    raise OnnxmodError(f"{path}: float 'x' must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
            self._nhwc = False
            self.channels = int(x.shape[1])
            self.image_size = (int(x.shape[2]), int(x.shape[3]))
        else:
            raise OnnxmodError(f"{path}: 'x' must be uint8 (N,H,W,C) or float (N,C,H,W), got dtype {x.dtype}")
        if not (0 < self.image_size[0] <= MAX_SIDE and 0 < self.image_size[1] <= MAX_SIDE):
            raise OnnxmodError(f"{path}: images of {self.image_size[0]}x{self.image_size[1]} pixels "
                               f"(height and width must be 1..{MAX_SIDE})")
        self._x = x
        if y is None:
            if not x.shape[0]:
                raise OnnxmodError(f"{path}: no images")
            self.labelled = False
            self.labels = np.full(x.shape[0], -1, dtype=np.int64)
            self.classes = classes or []
            return
        y = np.asarray(y)
        if y.ndim != 1:
            raise OnnxmodError(f"{path}: 'y' must be 1-D [N], got shape {list(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise OnnxmodError(f"{path}: 'x' has {x.shape[0]} images but 'y' has {y.shape[0]} labels")
        if classes is None:  # the labels make the classes
            labels = _check_labels(y, None, path)
            classes = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
        else:
            labels = _check_labels(y, len(classes), path)
        if not labels.size:
            raise OnnxmodError(f"{path}: no images")
        self.labels = labels
        self.classes = classes

    def _load(self, idx: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        x = self._x[idx]
        if self._nhwc:
            return x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return np.clip(x.astype(np.float32), 0.0, 1.0)


def write_npz(path: str | os.PathLike, x_uint8_nhwc: np.ndarray, y: np.ndarray, classes: Sequence[str] | None = None) -> Path:
    """Write a dataset in the ``.npz`` format (atomically)."""
    x = np.asarray(x_uint8_nhwc)
    y = np.asarray(y, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"x must be uint8 N,H,W,C, got {x.dtype} {list(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape [{x.shape[0]}], got {list(y.shape)}")
    arrays = {"x": x, "y": y}
    if classes is not None:
        arrays["classes"] = np.asarray([str(c) for c in classes], dtype=str)
    p = Path(path)
    with atomic_path(p) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return p


# --------------------------------------------------------------------------- dispatch


def open_dataset(path: str | os.PathLike, split: str = "test") -> Dataset:
    """Open a dataset in any supported format; ``split`` is train|test (ignored for .npz)."""
    p = Path(path)
    if split not in SPLITS:
        raise OnnxmodError(f"unknown split '{split}' (expected train or test)")
    if not p.exists():
        raise OnnxmodError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return NpzDataset(p)
        raise OnnxmodError(f"{p}: unknown data format (expected a .npz file, a CIFAR batches dir or an image folder)")
    if not p.is_dir():
        raise OnnxmodError(f"{p}: is not a regular file or a directory (a pipe or device?)")
    kind = _cifar_kind(p)
    if kind:
        return CifarDataset(p, kind, split)
    try:
        subs = _subdirs(p)
        entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    except OSError as e:
        raise OnnxmodError(f"{p}: cannot list directory ({type(e).__name__})") from None
    if not entries:
        raise OnnxmodError(f"{p}: empty folder")
    cifar_subs = [(s, _cifar_kind(s)) for s in subs if _cifar_kind(s)]
    if len(cifar_subs) == 1:
        return CifarDataset(cifar_subs[0][0], cifar_subs[0][1], split)
    if len(cifar_subs) > 1:
        names = ", ".join(s.name for s, _ in cifar_subs)
        raise OnnxmodError(f"{p}: holds several CIFAR directories ({names}); point at one of them")
    split_dirs = {s.name: s for s in subs if s.name in SPLITS}
    if split_dirs:
        if split not in split_dirs:
            raise OnnxmodError(f"{p}: no '{split}' split (found {', '.join(sorted(split_dirs))})")
        return _open_folder(split_dirs[split])
    return _open_folder(p)


def _open_folder(p: Path) -> Dataset:
    subs = _subdirs(p)
    if not subs:
        if any(e.is_file() and e.suffix.lower() in IMAGE_EXTS for e in p.iterdir()):
            return FolderDataset(p, labelled=False)
        if not any(not e.name.startswith(".") for e in p.iterdir()):
            raise OnnxmodError(f"{p}: empty folder")
        raise OnnxmodError(f"{p}: unknown data layout (expected CIFAR batches, {p}/<class>/*.png|jpg, or a .npz)")
    if not any(_list_images(s) for s in subs):
        raise OnnxmodError(f"{p}: no images found (expected {p}/<class>/*.png|jpg)")
    return FolderDataset(p)
