#!/usr/bin/env python
"""A hand attack on the onnxmod CLI (issue 24): hundreds of hostile command lines, each run as a subprocess.

The script builds its own inputs in a temp dir from ``sample_graphs/`` (the sample ResNet8, a small
decomposition made with ``--no-repair --samples-per-class 5 --refit-images 0``, composed models, and many
tampered copies: metadata of every ``onnxmod.*`` key set to wrong JSON types / NaN / huge / nested /
missing, truncated and bit-flipped files, external data pointing outside the folder or at a 2 GiB sparse
file, cycles, missing inputs; npz files with pickled objects, wrong dtypes, NaN / huge labels, lying
headers; CIFAR pickles whose reduce payloads would create a marker file; image folders with broken,
zero-byte and huge-dimension headers), then runs every case as ``python -m onnxmod.cli.main ...`` in its
own empty working dir, with a timeout and ``RLIMIT_AS`` (4 GiB by default), and records:

- the exit code; whether stdout/stderr hold a Python traceback (or "Exception ignored", a fatal error);
- with exit 2: whether stderr is exactly one ``onnxmod: error:`` line (progress stage lines and
  ``onnxmod: warning:`` lines aside);
- whether any input changed (sha256 of every file of the inputs dir, before/after; the user's own files a
  case puts in its working dir count as inputs too, unless the case writes them with ``--force``);
- whether anything unexpected is left: new files in the inputs dir, in the working dir (beyond what a
  successful run may write), hidden temps ``.*.tmp`` / ``.*.old-*`` anywhere, files in the case's TMPDIR;
- whether a pickle payload's marker file appeared (code ran from a data file).

A case passes when (exit 0 and its output is valid: strict JSON on stdout with ``--json``, every written
``.onnx`` passes ``onnx.checker.check_model(full_check=True)``, manifests are JSON, Triton labels one line
per class) or (exit 2 with one error line) or (exit 130 for a signal case, one error line), and there is no
traceback, no modified input, no leftover and no marker. Serve cases that start listening are stopped with
SIGTERM and must exit 0 or 130 without a traceback. Cases that fail stay in the list: they show as failures.

    python bench/attack.py                       # full attack -> bench/results/attack.json (exit 1 on failures)
    python bench/attack.py --smoke --out /tmp/a.json
    python bench/attack.py --only 'meta-module' --keep -v
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
DEFAULT_OUT = REPO / "bench" / "results" / "attack.json"

# Placeholders in argv (NUL cannot occur in a real argument): the inputs dir, the case's working dir, the root.
I, W, R = "\0I/", "\0W/", "\0R/"
# progress lines commands print off a terminal (onnxmod.progress.stage), and repair's expected duration
STAGE_LINE = re.compile(r".+: started|.+: done in [0-9.]+ s|repair: \d+ steps of .+")
NOISE = ("Traceback (most recent call last)", "Exception ignored", "Fatal Python error", "Segmentation fault",
         "core dumped")
TEMP_NAME = re.compile(r"^\..+(\.tmp|\.old-\d+)$")
CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def P(rel: str) -> str:
    """A path inside the inputs dir."""
    return I + rel


# ============================================================================ cases
@dataclass
class Case:
    id: str
    argv: list
    group: str = "misc"
    setup: Callable[["Ctx", Path], None] | None = None  # prepares the working dir (its files are the user's)
    outputs: tuple = ()  # names in the working dir a successful run may create or (with --force) replace
    must_refuse: bool = False  # exit 0 is a failure too
    timeout: float = 90.0
    mode: str = "normal"  # normal | serve | signal
    signals: tuple = ()  # signal mode: (trigger, delay_s, (sig, ...), gap_s); trigger: stage text or ".tmp"
    env: dict = field(default_factory=dict)
    fsize: int | None = None  # RLIMIT_FSIZE (a full disk), SIGXFSZ ignored
    stdout: str = "file"  # file | closed (a reader that went away) | full (/dev/full)


CASES: list[Case] = []


def add(id: str, argv: list, **kw) -> None:
    CASES.append(Case(id, list(argv), **kw))


# Fast decompose settings (a valid run takes ~1 s)
DQ = ["--classes", "cat", "--samples-per-class", "5", "--refit-images", "0", "--no-repair", "--device", "cpu", "-q"]
DEC = ["decompose", P("r8.onnx"), "--calib", P("calib.npz"), "-o", "out.modules"]
CAT, DOG, SHIP = P("mods/module_003_cat.onnx"), P("mods/module_005_dog.onnx"), P("mods/module_008_ship.onnx")
EVAL = lambda model, data: ["eval", model, "--data", data, "-q", "--device", "cpu"]  # noqa: E731
PRED = lambda model, *imgs: ["predict", model, *imgs, "-q", "--device", "cpu"]  # noqa: E731


# ---------------------------------------------------------------------------- setups (the user's files in cwd)
def s_file(name: str, text: str = "precious\n"):
    def setup(ctx, cwd):
        p = cwd / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return setup


def s_dir(name: str):
    def setup(ctx, cwd):
        (cwd / name).mkdir(parents=True)
        (cwd / name / "notes.txt").write_text("the user's\n")
    return setup


def s_emptydir(name: str):
    return lambda ctx, cwd: (cwd / name).mkdir()


def s_mods(name: str):
    return lambda ctx, cwd: shutil.copytree(ctx.inp / "mods", cwd / name, symlinks=True)


def s_link(name: str, target: str):
    """A symbolic link in cwd; target may use the I placeholder."""
    def setup(ctx, cwd):
        os.symlink(ctx.sub(target), cwd / name)
    return setup


def s_fifo(name: str):
    return lambda ctx, cwd: os.mkfifo(cwd / name)


def s_socket(name: str):
    def setup(ctx, cwd):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(cwd / name))
        s.close()
    return setup


def s_chardev(name: str):
    def setup(ctx, cwd):
        try:
            os.mknod(cwd / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
        except OSError:
            s_socket(name)(ctx, cwd)
    return setup


def s_readonly(name: str):
    def setup(ctx, cwd):
        (cwd / name).mkdir()
        os.chmod(cwd / name, 0o555)
    return setup


def s_manifest_escape(name: str):
    """An onnxmod-looking output dir whose manifest claims a file outside it (the user's victim.txt)."""
    def setup(ctx, cwd):
        shutil.copytree(ctx.inp / "mods", cwd / name)
        m = json.loads((cwd / name / "manifest.json").read_text())
        m["modules"][0]["file"] = "../victim.txt"
        m["files"] = ["../victim.txt", "/etc/hostname"]
        (cwd / name / "manifest.json").write_text(json.dumps(m))
        (cwd / "victim.txt").write_text("the user's\n")
    return setup


def s_triton_escape(ctx, cwd):
    """repo/catdog/ looks like an export-triton entry, but its manifest also lists the user's victim.txt (relative to
    the entry, to the working dir, and absolute): --force may replace the entry, never victim.txt."""
    e = cwd / "repo" / "catdog"
    (e / "1").mkdir(parents=True)
    (e / "1" / "model.onnx").write_bytes(b"old")
    (e / "manifest.json").write_text(json.dumps({"files": ["../../victim.txt", "victim.txt", str(cwd / "victim.txt"),
                                                           "repo/catdog/1/model.onnx"]}))
    (cwd / "victim.txt").write_text("the user's\n")


def s_many(*setups):
    def setup(ctx, cwd):
        for s in setups:
            s(ctx, cwd)
    return setup


# ============================================================================ input files
def png_header(w: int, h: int, extra: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def jpeg_header(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def gif_header(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00\x3b"


def bmp_header(w: int, h: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 16, 0, 0, 0, 0)
            + b"\0" * 16)


class Reduce:
    """Unpickling this calls f(*args)."""

    def __init__(self, f, args):
        self.f, self.args = f, args

    def __reduce__(self):
        return (self.f, self.args)


def payloads(marker: Path, npy_target: Path) -> dict[str, bytes]:
    """Pickles that create ``marker-<tag>`` if they are ever unpickled (numpy_load: via an object array in npy_target)."""
    m = lambda tag: str(marker.parent / f"{marker.name}-{tag}")  # noqa: E731
    out = {
        "os_system_p2": pickle.dumps(Reduce(os.system, (f"touch {m('os_system_p2')}",)), protocol=2),
        "os_system_p0": pickle.dumps(Reduce(os.system, (f"touch {m('os_system_p0')}",)), protocol=0),
        "os_system_p5": pickle.dumps(Reduce(os.system, (f"touch {m('os_system_p5')}",)), protocol=5),
        "subprocess_call": pickle.dumps(Reduce(subprocess.call, (["touch", m("subprocess_call")],)), protocol=2),
        "builtins_eval": pickle.dumps(Reduce(eval, (f"__import__('os').system('touch {m('builtins_eval')}')",)), protocol=2),
        "builtins_exec": pickle.dumps(Reduce(exec, (f"open({m('builtins_exec')!r}, 'w').close()",)), protocol=4),
        "builtins_open": pickle.dumps(Reduce(open, (m("builtins_open"), "w")), protocol=2),
        "getattr_import": (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch "
                           + m("getattr_import").encode() + b"'\ntR."),
        "numpy_load": (b"cnumpy\nload\n(S'" + str(npy_target).encode() + b"'\nNI01\ntR."),
        "object_array": pickle.dumps(np.array([Reduce(os.system, (f"touch {m('object_array')}",))], dtype=object),
                                     protocol=2),
        "nested_in_dict": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
                                        b"x": [Reduce(os.system, (f"touch {m('nested_in_dict')}",))]}, protocol=2),
    }
    return out


def retag(src: Path, dst: Path, changes: dict) -> None:
    m = onnx.load(str(src))
    kept = [p for p in m.metadata_props if p.key not in changes]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    for k, v in changes.items():
        if v is not None:
            m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(dst))


def meta(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def save_model(m: onnx.ModelProto, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(m.SerializeToString())


def npy_bytes_with_header(shape: tuple, dtype: str = "|u1", payload: bytes = b"\0" * 64, pad: int = 0) -> bytes:
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, shape)
    header += " " * pad
    header = header.ljust((len(header) + 10) // 64 * 64 + 63 - 10) + "\n"
    if len(header) > 65535:  # format 2.0: a 4-byte header length
        return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode("latin1") + payload
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload


def zip_members(dst: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for k, v in members.items():
            z.writestr(k, v)


# Metadata variants: name -> JSON text (None: the key removed)
VARIANTS = {
    "missing": None, "empty": "", "null": "null", "int": "42", "neg": "-1", "nan": "NaN", "e400": "1e400",
    "bigint": "9" * 5000, "str": '"x"', "list": '[1, [2, {}]]', "obj": '{"a": {"b": []}}', "bool": "true",
    "badjson": '{"a": ', "deep": "[" * 100000 + "]" * 100000, "unicode": '"\u202e\u2028\u732b\u001b[2J"',
}


class Ctx:
    def __init__(self, root: Path, mem_gb: float):
        self.root = root
        self.inp = root / "inp"
        self.work = root / "work"
        self.logs = root / "logs"
        self.markers = root / "markers"
        self.mem = int(mem_gb * (1 << 30))
        self.special: list[str] = []
        for d in (self.inp, self.work, self.logs, self.markers):
            d.mkdir(parents=True)
        self.env = dict(os.environ)
        self.env.update(PYTHONPATH=str(REPO) + os.pathsep + self.env.get("PYTHONPATH", ""), PYTHONDONTWRITEBYTECODE="1",
                        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="100")
        self.env.pop("PYTHONWARNINGS", None)
        # what importing onnxruntime itself leaves in TMPDIR (a fixed-name `.ses` file, reused by every later
        # process; not onnxmod's doing): ignored
        base = root / "logs" / "baseline.tmpdir"
        base.mkdir()
        subprocess.run([sys.executable, "-c", "import onnxruntime"], env=dict(self.env, TMPDIR=str(base)), timeout=120)
        self.tmp_baseline = set(os.listdir(base))
        shutil.rmtree(base)

    def sub(self, a):
        if isinstance(a, bytes):
            return (a.replace(b"\0I/", os.fsencode(self.inp) + b"/").replace(b"\0R/", os.fsencode(self.root) + b"/"))
        return str(a).replace(I, str(self.inp) + "/").replace(R, str(self.root) + "/")


def cli(ctx: Ctx, argv: list, cwd: Path | None = None) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxmod.cli.main", *map(str, argv)], cwd=cwd or ctx.root,
                       capture_output=True, text=True, env=ctx.env, timeout=600)
    if r.returncode != 0:
        sys.exit(f"attack: building the inputs failed: onnxmod {' '.join(map(str, argv))}\n{r.stderr}")


def build_inputs(ctx: Ctx) -> None:
    from PIL import Image

    d = ctx.inp
    shutil.copy(SAMPLES / "resnet8_cifar10.onnx", d / "r8.onnx")
    shutil.copy(SAMPLES / "resnet8_cifar10.th", d / "r8.th")
    shutil.copy(SAMPLES / "cifar10_calib.npz", d / "calib.npz")
    shutil.copy(SAMPLES / "cifar10_test.npz", d / "test.npz")
    cli(ctx, ["decompose", d / "r8.onnx", "--calib", d / "calib.npz", "-o", d / "mods", "--classes", "cat,dog,ship",
              "--no-repair", "--samples-per-class", "5", "--refit-images", "0", "--device", "cpu", "-q"])
    cli(ctx, ["compose", d / "mods", "-o", d / "composed.onnx", "-q", "--device", "cpu"])
    cli(ctx, ["compose", d / "mods" / "module_003_cat.onnx", d / "mods" / "module_005_dog.onnx", "-o",
              d / "catdog.onnx", "-q", "--device", "cpu"])
    cli(ctx, ["compose", d / "r8.onnx", "-o", d / "srcmember.onnx", "-q", "--device", "cpu"])
    # a second "source" (another sha256): composing it with the first's modules needs --calib for its temperature
    retag(d / "r8.onnx", d / "r8b.onnx", {"attack.note": "another source"})
    # a source with dynamic H, W (ResNet8 ends in a global pool), for --input-size
    m = onnx.load(str(d / "r8.onnx"))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    save_model(m, d / "dynamic.onnx")
    unicode_names = ["\u732b", "\u72ac", "\u00e9l\u00e8ve", "\u0434\u043e\u043c", "\U0001f600", "b6", "b7", "b8", "b9", "b10"]
    retag(d / "r8.onnx", d / "unicode_classes.onnx", {"onnxmod.classes": json.dumps(unicode_names, ensure_ascii=False)})
    shutil.copy(d / "r8.onnx", d / "\u540d\u524d.onnx")
    shutil.copy(d / "r8.onnx", os.fsencode(d) + b"/\xff\xfe.onnx")

    # ---- tampered metadata: every onnxmod.* key of a module, a composed model and a source
    md = d / "meta"
    md.mkdir()
    cat = d / "mods" / "module_003_cat.onnx"
    for key in ["kind", "class_name", "class_index", "source", "kept", "calibration", "preprocess", "format_version",
                "frontend"]:
        for v, text in VARIANTS.items():
            retag(cat, md / f"module_{key}_{v}.onnx", {f"onnxmod.{key}": text})
    for key in ["kind", "classes", "preprocess", "compose", "members", "format_version"]:
        for v, text in VARIANTS.items():
            retag(d / "catdog.onnx", md / f"composed_{key}_{v}.onnx", {f"onnxmod.{key}": text})
    for key in ["kind", "classes", "preprocess"]:
        for v, text in VARIANTS.items():
            retag(d / "r8.onnx", md / f"source_{key}_{v}.onnx", {f"onnxmod.{key}": text})
    # well-formed JSON, wrong values
    mm = meta(cat)
    src, cal, kept = json.loads(mm["onnxmod.source"]), json.loads(mm["onnxmod.calibration"]), json.loads(mm["onnxmod.kept"])
    pre = json.loads(mm["onnxmod.preprocess"])
    special = {
        "module_index_eq_numclasses": {"onnxmod.class_index": "10"},
        "module_index_float": {"onnxmod.class_index": "3.0"},
        "module_index_string": {"onnxmod.class_index": '"3"'},
        "module_index_huge": {"onnxmod.class_index": str(2 ** 70)},
        "module_numclasses_0": {"onnxmod.source": json.dumps({**src, "num_classes": 0})},
        "module_numclasses_huge": {"onnxmod.source": json.dumps({**src, "num_classes": 10 ** 12})},
        "module_numclasses_str": {"onnxmod.source": json.dumps({**src, "num_classes": "10"})},
        "module_sha_int": {"onnxmod.source": json.dumps({**src, "sha256": 5})},
        "module_srcname_newline": {"onnxmod.source": json.dumps({**src, "name": "r8\nevil"})},
        "module_temperature_0": {"onnxmod.calibration": json.dumps({**cal, "temperature": 0})},
        "module_temperature_neg": {"onnxmod.calibration": json.dumps({**cal, "temperature": -1})},
        "module_temperature_denormal": {"onnxmod.calibration": json.dumps({**cal, "temperature": 5e-324})},
        "module_platt_a_huge": {"onnxmod.calibration": json.dumps({**cal, "a": 1e308, "b": -1e308})},
        "module_platt_a_str": {"onnxmod.calibration": json.dumps({**cal, "a": "0.7"})},
        "module_calibration_method": {"onnxmod.calibration": json.dumps({**cal, "method": "\u0000evil"})},
        "module_kept_fraction_2": {"onnxmod.kept": json.dumps({**kept, "param_fraction": 2.0, "flop_fraction": -1})},
        "module_kept_channels_str": {"onnxmod.kept": json.dumps({**kept, "channels": "all"})},
        "module_name_empty": {"onnxmod.class_name": ""},
        "module_name_long": {"onnxmod.class_name": "c" * 100000},
        "module_name_tab": {"onnxmod.class_name": "ca\tt"},
        "module_name_rtl": {"onnxmod.class_name": "\u202ecat"},
        "module_kind_source": {"onnxmod.kind": "source"},
        "module_kind_composed": {"onnxmod.kind": "composed"},
        "module_pre_scale_0": {"onnxmod.preprocess": json.dumps({**pre, "scale": 0})},
        "module_pre_std_nan_str": {"onnxmod.preprocess": '{"mean": [0, 0, 0], "std": [NaN, 1, 1], "scale": 1}'},
        "module_pre_mean_100": {"onnxmod.preprocess": json.dumps({**pre, "mean": [0.5] * 100})},
        "module_pre_size_huge": {"onnxmod.preprocess": json.dumps({**pre, "input_size": [99999, 99999]})},
        "module_pre_size_zero": {"onnxmod.preprocess": json.dumps({**pre, "input_size": [0, 0]})},
        "module_frontend_bad": {"onnxmod.frontend": '[{"text": 5}, 3, null]'},
        "module_frontend_many": {"onnxmod.frontend": json.dumps([{"kind": "x", "text": "t" * 100}] * 20000)},
    }
    for name, changes in special.items():
        retag(cat, md / f"{name}.onnx", changes)
    cm = meta(d / "catdog.onnx")
    classes, members = json.loads(cm["onnxmod.classes"]), json.loads(cm["onnxmod.members"])
    comp = json.loads(cm["onnxmod.compose"])

    def mem_with(i, **kv):
        ms = json.loads(json.dumps(members))
        ms[i]["metadata"].update(kv)
        return json.dumps(ms)

    cspecial = {
        "composed_classes_one": {"onnxmod.classes": json.dumps(classes[:1])},
        "composed_classes_three": {"onnxmod.classes": json.dumps(classes + classes[:1])},
        "composed_classes_dup": {"onnxmod.classes": json.dumps([classes[0], classes[0]])},
        "composed_classes_name_int": {"onnxmod.classes": json.dumps([{**classes[0], "name": 3}, classes[1]])},
        "composed_classes_name_empty": {"onnxmod.classes": json.dumps([{**classes[0], "name": ""}, classes[1]])},
        "composed_classes_name_u2028": {"onnxmod.classes": json.dumps([{**classes[0], "name": "a\u2028b"}, classes[1]])},
        "composed_classes_strings": {"onnxmod.classes": '["cat", "dog"]'},
        "composed_classes_index_str": {"onnxmod.classes": json.dumps([{**classes[0], "class_index": "x"}, classes[1]])},
        "composed_members_empty": {"onnxmod.members": "[]"},
        "composed_members_one": {"onnxmod.members": json.dumps(members[:1])},
        "composed_members_not_dict": {"onnxmod.members": "[1, 2]"},
        "composed_member_no_name": {"onnxmod.members": mem_with(0, **{"onnxmod.class_name": None})},
        "composed_member_kind_composed": {"onnxmod.members": mem_with(0, **{"onnxmod.kind": "composed",
                                                                           "onnxmod.members": cm["onnxmod.members"]})},
        "composed_member_deep": {"onnxmod.members": mem_with(1, **{"onnxmod.source": "[" * 5000 + "]" * 5000})},
        "composed_member_name_newline": {"onnxmod.members": mem_with(1, **{"onnxmod.class_name": "dog\ncat"})},
        "composed_temperatures_nan": {"onnxmod.compose": json.dumps({**comp, "temperatures": ["NaN", 1.0]})},
        "composed_temperatures_short": {"onnxmod.compose": json.dumps({**comp, "temperatures": []})},
    }
    for name, changes in cspecial.items():
        retag(d / "catdog.onnx", md / f"{name}.onnx", changes)
    sspecial = {
        "source_classes_9": {"onnxmod.classes": json.dumps(CLASSES10[:9])},
        "source_classes_11": {"onnxmod.classes": json.dumps(CLASSES10 + ["extra"])},
        "source_classes_dup": {"onnxmod.classes": json.dumps(["cat"] * 10)},
        "source_classes_ints": {"onnxmod.classes": json.dumps(list(range(10)))},
        "source_classes_newline": {"onnxmod.classes": json.dumps(CLASSES10[:9] + ["tru\nck"])},
        "source_classes_huge_list": {"onnxmod.classes": json.dumps([f"c{i}" for i in range(200000)])},
        "source_kind_module": {"onnxmod.kind": "module"},
        "source_kind_composed": {"onnxmod.kind": "composed"},
        "source_pre_in_graph_false": {"onnxmod.preprocess": json.dumps({**pre, "in_graph": False})},
        "source_pre_size_huge": {"onnxmod.preprocess": json.dumps({**pre, "input_size": [99999, 99999]})},
        "source_pre_size_neg": {"onnxmod.preprocess": json.dumps({**pre, "input_size": [-1, 32]})},
        "source_pre_scale_neg": {"onnxmod.preprocess": json.dumps({**pre, "scale": -255})},
        "source_pre_mean_4": {"onnxmod.preprocess": json.dumps({**pre, "mean": [0, 0, 0, 0], "std": [1, 1, 1, 1]})},
        "source_pre_std_tiny": {"onnxmod.preprocess": json.dumps({**pre, "std": [1e-320, 1, 1]})},
    }
    for name, changes in sspecial.items():
        retag(d / "r8.onnx", md / f"{name}.onnx", changes)
    ctx.special = sorted([*special, *cspecial, *sspecial])

    # ---- graphs
    gd = d / "graph"
    gd.mkdir()
    base = onnx.load(str(d / "r8.onnx"))

    def variant(name: str, f: Callable[[onnx.ModelProto], None], src: onnx.ModelProto = base) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(src)
        f(m)
        save_model(m, gd / f"{name}.onnx")

    def convs(m):
        return [n for n in m.graph.node if n.op_type == "Conv"]

    def self_loop(m):
        n = convs(m)[1]
        n.input[0] = n.output[0]

    def cycle_long(m):
        convs(m)[1].input[0] = [n for n in m.graph.node if n.op_type == "Relu"][-1].output[0]

    def dup_producer(m):
        n = helper.make_node("Identity", [m.graph.input[0].name], [convs(m)[0].output[0]], name="dup")
        m.graph.node.insert(0, n)

    def no_input(m):
        del m.graph.input[:]

    def two_inputs(m):
        m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 3, 32, 32]))

    def int_input(m):
        m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64

    def rank2_input(m):
        dims = m.graph.input[0].type.tensor_type.shape
        del dims.dim[2:]

    def zero_dim(m):
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0

    def neg_dim(m):
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -5

    def huge_dim(m):
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2 ** 40
        m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 2 ** 40

    def no_outputs(m):
        del m.graph.output[:]

    def output_int(m):
        m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64

    def opset(v):
        def f(m):
            m.opset_import[0].version = v
        return f

    def ir(v):
        def f(m):
            m.ir_version = v
        return f

    def custom_domain(m):
        convs(m)[2].domain = "evil.domain"
        m.opset_import.append(helper.make_opsetid("evil.domain", 1))

    def empty_op(m):
        m.graph.node[3].op_type = ""

    def bad_raw(m):
        t = next(t for t in m.graph.initializer if len(t.dims) == 4)
        t.raw_data = t.raw_data[:-4]

    def huge_init_dims(m):
        t = next(t for t in m.graph.initializer if len(t.dims) == 4)
        t.dims[0] = 2 ** 40

    def neg_init_dims(m):
        t = next(t for t in m.graph.initializer if len(t.dims) == 4)
        t.dims[0] = -16

    def no_nodes(m):
        del m.graph.node[:]
        m.graph.output[0].name = m.graph.input[0].name

    def subgraph_if(m):
        cond = numpy_helper.from_array(np.array(True), "cond_c")
        m.graph.initializer.append(cond)
        then = helper.make_graph([helper.make_node("Identity", [m.graph.output[0].name], ["t_out"])], "then", [],
                                 [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
        m.graph.node.append(helper.make_node("If", ["cond_c"], ["if_out"], then_branch=then, else_branch=then))
        m.graph.output[0].name = "if_out"

    def node_name_newline(m):
        for n in m.graph.node:
            n.name = n.name + "\n\x1b[31mevil"

    for name, f in [("self_loop", self_loop), ("cycle_long", cycle_long), ("dup_producer", dup_producer),
                    ("no_input", no_input), ("two_inputs", two_inputs), ("int_input", int_input),
                    ("rank2_input", rank2_input), ("zero_dim", zero_dim), ("neg_dim", neg_dim), ("huge_dim", huge_dim),
                    ("no_outputs", no_outputs), ("output_int", output_int), ("opset_1", opset(1)),
                    ("opset_999", opset(999)), ("ir_999", ir(999)), ("ir_0", ir(0)), ("custom_domain", custom_domain),
                    ("empty_op", empty_op), ("bad_raw", bad_raw), ("huge_init_dims", huge_init_dims),
                    ("neg_init_dims", neg_init_dims), ("no_nodes", no_nodes), ("subgraph_if", subgraph_if),
                    ("node_name_newline", node_name_newline)]:
        variant(name, f)
    mod = onnx.load(str(cat))
    variant("module_self_loop", self_loop, mod)
    variant("module_two_inputs", two_inputs, mod)
    raw = (d / "r8.onnx").read_bytes()
    for frac in (1, 10, 500, len(raw) // 2, len(raw) - 1):
        (gd / f"trunc_{frac}.onnx").write_bytes(raw[:frac])
    for name, p in [("module", cat), ("composed", d / "catdog.onnx")]:
        b = p.read_bytes()
        (gd / f"trunc_{name}.onnx").write_bytes(b[: len(b) * 3 // 4])
    rng = np.random.default_rng(1234)
    for seed in range(4):
        b = bytearray(raw)
        for pos in rng.integers(0, 400, 6):
            b[pos] ^= 0xFF
        (gd / f"flip_{seed}.onnx").write_bytes(bytes(b))
    (gd / "zeros.onnx").write_bytes(b"\0" * 4096)
    (gd / "npz_as_onnx.onnx").write_bytes((d / "calib.npz").read_bytes()[:100000])
    (gd / "json_as_onnx.onnx").write_text('{"graph": {}}')
    (gd / "dir.onnx").mkdir()

    # ---- external data (each in its own folder)
    ed = d / "ext"

    def external(name: str, location: str, data: Callable[[Path], None] | None = None, **kv) -> None:
        folder = ed / name
        folder.mkdir(parents=True)
        m = onnx.load(str(d / "r8.onnx"))
        t = next(t for t in m.graph.initializer if len(t.dims) == 4)
        raw_t = t.raw_data
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        for k, v in kv.items():
            t.external_data.add(key=k, value=str(v))
        save_model(m, folder / "model.onnx")
        if data:
            data(folder, raw_t) if data.__code__.co_argcount == 2 else data(folder)

    def sparse(size):
        def f(folder):
            with open(folder / "w.bin", "wb") as fh:
                fh.truncate(size)
        return f

    def good_bin(folder, raw_t):
        (folder / "w.bin").write_bytes(raw_t)

    external("escape", "../../../../etc/passwd")
    external("absolute", "/etc/passwd")
    external("missing", "w.bin")
    external("sparse_2g", "w.bin", sparse(2 << 30))
    external("sparse_2g_length", "w.bin", sparse(2 << 30), offset=0, length=2 << 30)
    external("offset_beyond", "w.bin", good_bin, offset=10 ** 9)
    external("length_huge", "w.bin", good_bin, length=10 ** 15)
    external("offset_neg", "w.bin", good_bin, offset=-5)
    external("offset_text", "w.bin", good_bin, offset="abc")
    external("good", "w.bin", good_bin)
    external("dotdot_inside", "sub/../w.bin", lambda f, r: ((f / "sub").mkdir(), (f / "w.bin").write_bytes(r)))
    external("to_dir", "sub", lambda f: (f / "sub").mkdir())
    external("symlink_out", "w.bin", lambda f: os.symlink("/etc/passwd", f / "w.bin"))
    external("symlink_dev_zero", "w.bin", lambda f: os.symlink("/dev/zero", f / "w.bin"))
    external("fifo", "w.bin", lambda f: os.mkfifo(f / "w.bin"))
    external("newline_name", "w\n.bin", lambda f, r: (f / "w\n.bin").write_bytes(r))
    external("empty_location", "")

    # ---- images
    rng = np.random.default_rng(0)
    im = d / "img"
    im.mkdir()
    pix = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pix).save(im / "good.png")
    Image.fromarray(rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)).save(im / "big.png")
    Image.fromarray(pix[:1, :1]).save(im / "tiny_1x1.png")
    Image.fromarray(pix[:, :, 0]).save(im / "gray.png")
    Image.fromarray(np.dstack([pix, pix[:, :, :1]])).save(im / "rgba.png")
    Image.fromarray(pix).convert("P").save(im / "palette.png")
    Image.fromarray((pix[:, :, 0].astype(np.uint16) * 257)).save(im / "i16.png")
    Image.fromarray(pix).convert("CMYK").save(im / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (2, 4000, 3), dtype=np.uint8)).save(im / "wide_4000x2.png")
    frames = [Image.fromarray(pix), Image.fromarray(255 - pix)]
    frames[0].save(im / "anim.gif", save_all=True, append_images=frames[1:])
    (im / "bomb_20000.png").write_bytes(png_header(20000, 20000))
    (im / "under_bomb_9000.png").write_bytes(png_header(9000, 9000))
    (im / "width0.png").write_bytes(png_header(0, 32))
    (im / "hdr_100000x1.png").write_bytes(png_header(100000, 1))
    (im / "hdr_2pow31.png").write_bytes(png_header(2 ** 31 - 1, 2 ** 31 - 1))
    (im / "huge.jpg").write_bytes(jpeg_header(65500, 65500))
    (im / "huge.gif").write_bytes(gif_header(65535, 65535))
    (im / "huge.bmp").write_bytes(bmp_header(40000, 40000))
    (im / "neg.bmp").write_bytes(bmp_header(-32, -32))
    ztxt = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 50_000_000, 9))
    good = (im / "good.png").read_bytes()
    (im / "text_bomb.png").write_bytes(good[:33] + ztxt + good[33:])
    (im / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (im / "zero.png").write_bytes(b"")
    (im / "text.png").write_text("not an image\n")
    (im / "trunc.png").write_bytes(good[: len(good) // 2])
    (im / "badcrc.png").write_bytes(good[:29] + b"\0\0\0\0" + good[33:])
    (im / "chunk_len_huge.png").write_bytes(good[:33] + struct.pack(">I", 0xFFFFFFF0) + b"tEXt" + b"x" * 10)
    (im / "png_as.jpg").write_bytes(good)
    os.symlink("/dev/zero", im / "dev_zero.png")
    os.symlink("/dev/urandom", im / "dev_urandom.png")
    os.symlink("/nonexistent/x.png", im / "dangling.png")
    os.mkfifo(im / "fifo.png")
    (im / "dir.png").mkdir()

    # image folders
    fd = d / "folders"

    def folder(name: str, files: dict) -> None:
        for rel, content in files.items():
            p = fd / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(p)
            elif content is None:
                p.mkdir(exist_ok=True)
            else:
                p.write_bytes(content)

    small = (im / "good.png").read_bytes()
    folder("ok", {"cat/a.png": small, "cat/b.png": small, "dog/a.png": small, "dog/b.png": small})
    folder("zero_byte", {"cat/a.png": small, "cat/z.png": b"", "dog/a.png": small})
    folder("broken", {"cat/a.png": small, "dog/b.png": b"\x89PNG\r\n\x1a\n broken"})
    folder("bomb", {"cat/a.png": small, "dog/b.png": png_header(20000, 20000)})
    folder("under_bomb", {"cat/a.png": small, "dog/b.png": png_header(9000, 9000)})
    folder("huge_jpeg", {"cat/a.png": small, "dog/b.jpg": jpeg_header(65500, 65500)})
    folder("text_bomb", {"cat/a.png": small, "dog/b.png": (im / "text_bomb.png").read_bytes()})
    folder("fifo", {"cat/a.png": small, "dog/b.png": lambda p: os.mkfifo(p)})
    folder("dev_zero", {"cat/a.png": small, "dog/b.png": lambda p: os.symlink("/dev/zero", p)})
    folder("loop", {"cat/a.png": small, "dog/a.png": small, "dog/loop": lambda p: os.symlink("..", p)})
    folder("ctrl_class", {"ca\nt/a.png": small, "dog/a.png": small})
    folder("esc_class", {"\x1b[2Jcat/a.png": small, "dog/a.png": small})
    folder("long_class", {("c" * 250) + "/a.png": small, "dog/a.png": small})
    folder("unicode_class", {"\u732b/a.png": small, "dog/a.png": small})
    folder("nested_only", {"cat/sub/a.png": small, "dog/sub/a.png": small})
    folder("hidden_only", {"cat/.a.png": small, "dog/.a.png": small})
    folder("upper_ext", {"cat/A.PNG": small, "dog/B.JPG": (im / "cmyk.jpg").read_bytes()})
    folder("stray_file", {"cat/a.png": small, "dog/a.png": small, "README": b"hello"})
    folder("empty_classes", {"cat": None, "dog": None})
    folder("one_pixel", {"cat/a.png": (im / "tiny_1x1.png").read_bytes(), "dog/a.png": (im / "tiny_1x1.png").read_bytes()})
    folder("flat_broken", {"a.png": b"", "b.png": b"junk"})
    folder("many_classes", {f"k{i:03d}/a.png": (im / "tiny_1x1.png").read_bytes() for i in range(300)})
    folder("dangling", {"cat/a.png": small, "dog/b.png": lambda p: os.symlink("/nonexistent", p)})

    # ---- npz
    nd = d / "npz"
    nd.mkdir()
    t = np.load(d / "test.npz")
    x, y, cls = t["x"][:40], t["y"][:40], t["classes"]
    np.savez(d / "big.npz", x=np.tile(t["x"], (5, 1, 1, 1)), y=np.tile(t["y"], 5), classes=cls)  # 3000 images
    xf = x.transpose(0, 3, 1, 2).astype(np.float32) / 255

    def npz(name: str, **arrays) -> None:
        np.savez(nd / f"{name}.npz", **arrays)

    ev = payloads(ctx.markers / "pwned", nd / "evil_object.npy")
    np.save(str(nd / "evil_object.npy"), np.array([Reduce(os.system, (f"touch {ctx.markers}/pwned-numpy_load",))],
                                                   dtype=object), allow_pickle=True)  # numpy_load's target
    (ctx.markers / ".keep").write_text("")
    npz("x_object_evil", x=np.array([Reduce(os.system, (f"touch {ctx.markers}/pwned-npz_x",))], dtype=object), y=y[:1])
    npz("y_object_evil", x=x, y=np.array([Reduce(os.system, (f"touch {ctx.markers}/pwned-npz_y",))] * 40, dtype=object))
    npz("classes_object_evil", x=x, y=y, classes=np.array([Reduce(os.system, (f"touch {ctx.markers}/pwned-npz_c",))],
                                                            dtype=object))
    npz("x_float64", x=xf.astype(np.float64), y=y, classes=cls)
    npz("x_nan", x=np.where(xf > 0.5, np.nan, xf).astype(np.float32), y=y, classes=cls)
    npz("x_inf", x=np.full_like(xf, np.inf), y=y, classes=cls)
    npz("x_1e30", x=xf * 1e30, y=y, classes=cls)
    npz("x_negative", x=-xf, y=y, classes=cls)
    npz("x_int64", x=x.astype(np.int64) * 10 ** 15, y=y, classes=cls)
    npz("x_bool", x=x > 128, y=y, classes=cls)
    npz("x_complex", x=xf.astype(np.complex64), y=y, classes=cls)
    npz("x_str", x=np.array(["a"] * 40), y=y, classes=cls)
    npz("x_float16", x=xf.astype(np.float16), y=y, classes=cls)
    npz("x_empty", x=x[:0], y=y[:0], classes=cls)
    npz("x_scalar", x=np.array(3), y=y[:1], classes=cls)
    npz("x_5d", x=x[None], y=y, classes=cls)
    npz("x_channels4", x=np.concatenate([x, x[..., :1]], axis=3), y=y, classes=cls)
    npz("x_channels1", x=x[..., :1], y=y, classes=cls)
    npz("x_1x1", x=x[:, :1, :1], y=y, classes=cls)
    npz("x_nchw_255", x=xf * 255, y=y, classes=cls)
    npz("len_mismatch", x=x, y=y[:10], classes=cls)
    npz("y_negative", x=x, y=np.full(40, -1), classes=cls)
    npz("y_int64_max", x=x, y=np.full(40, np.iinfo(np.int64).max), classes=cls)
    npz("y_uint64_max", x=x, y=np.full(40, np.iinfo(np.uint64).max, dtype=np.uint64))
    npz("y_2d", x=x, y=y[:, None], classes=cls)
    npz("y_str", x=x, y=np.array(["cat"] * 40), classes=cls)
    npz("y_bool", x=x, y=np.ones(40, bool), classes=cls)
    npz("y_half", x=x, y=np.full(40, 0.5), classes=cls)
    npz("y_whole_float", x=x, y=y.astype(np.float64), classes=cls)
    npz("y_1e300", x=x, y=np.full(40, 1e300))
    npz("y_complex", x=x, y=y.astype(np.complex64), classes=cls)
    npz("y_99999_no_classes", x=x, y=np.full(40, 99999))
    npz("classes_int", x=x, y=y, classes=np.arange(10))
    npz("classes_empty", x=x, y=y, classes=np.array([], dtype="<U1"))
    npz("classes_dup", x=x, y=y, classes=np.array(["cat"] * 10))
    npz("classes_long", x=x, y=y, classes=np.array(["n" * 300] + list(cls[1:])))
    npz("classes_esc", x=x, y=y, classes=np.array(["\x1b[2J"] + list(cls[1:])))
    npz("classes_2d", x=x, y=y, classes=cls.reshape(2, 5))
    npz("classes_scalar", x=x, y=y, classes=np.array("cat"))
    npz("no_x", y=y, classes=cls)
    npz("extra_keys", x=x, y=y, classes=cls, junk=np.zeros(3), **{"../../evil": np.zeros(1)})
    npz("unicode_classes", x=x, y=y, classes=np.array(["\u732b", "\u72ac"] + [f"c{i}" for i in range(8)]))
    zip_members(nd / "header_lie_1tb.npz", {"x.npy": npy_bytes_with_header((2 ** 40,)), "y.npy": npy_bytes_with_header(
        (40,), "<i8", b"\0" * 320)})
    zip_members(nd / "header_lie_6gb.npz", {"x.npy": npy_bytes_with_header((20000, 3, 160, 160), "<f4"),
                                            "y.npy": npy_bytes_with_header((20000,), "<i8", b"\0" * 160000)})
    zip_members(nd / "header_big.npz", {"x.npy": npy_bytes_with_header((40, 32, 32, 3), pad=200000,
                                                                       payload=x.tobytes()),
                                        "y.npy": npy_bytes_with_header((40,), "<i8", y.astype("<i8").tobytes())})
    zip_members(nd / "header_garbage.npz", {"x.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': __import__('os')}\n",
                                            "y.npy": b"junk"})
    np.save(str(nd / "plain_npy.npz"), x)  # np.save adds .npy
    os.rename(nd / "plain_npy.npz.npy", nd / "plain_npy.npz")
    (nd / "pickle.npz").write_bytes(ev["os_system_p2"])
    (nd / "empty.npz").write_bytes(b"")
    (nd / "not_zip.npz").write_text("x,y\n1,2\n")
    (nd / "dir.npz").mkdir()

    # ---- CIFAR batches
    cd = d / "cifar"
    good_meta = pickle.dumps({b"label_names": [c.encode() for c in CLASSES10]}, protocol=2)
    flat = x.transpose(0, 3, 1, 2).reshape(40, 3072)
    good_batch = pickle.dumps({b"data": flat, b"labels": [int(v) for v in y]}, protocol=2)

    def cifar(name: str, meta_b=good_meta, batch_b=good_batch, train_b=None) -> None:
        p = cd / name
        p.mkdir(parents=True)
        for fname, content in (("batches.meta", meta_b), ("test_batch", batch_b), ("data_batch_1", train_b)):
            if content is None:
                continue
            if callable(content):
                content(p / fname)
            else:
                (p / fname).write_bytes(content)

    cifar("ok")
    for tag, b in ev.items():
        cifar(f"evil_batch_{tag}", batch_b=b)
    cifar("evil_meta", meta_b=ev["os_system_p2"])
    cifar("evil_train", train_b=ev["builtins_open"])
    dump = lambda o: pickle.dumps(o, protocol=2)  # noqa: E731
    cifar("names_ints", meta_b=dump({b"label_names": list(range(10))}))
    cifar("names_empty", meta_b=dump({b"label_names": []}))
    cifar("names_dup", meta_b=dump({b"label_names": [b"cat"] * 10}))
    cifar("names_ctrl", meta_b=dump({b"label_names": [b"ca\nt"] + [c.encode() for c in CLASSES10[1:]]}))
    cifar("names_dict", meta_b=dump({b"label_names": {b"a": 1}}))
    cifar("names_missing", meta_b=dump({b"other": 1}))
    cifar("meta_list", meta_b=dump([1, 2, 3]))
    cifar("meta_none", meta_b=dump(None))
    cifar("data_3071", batch_b=dump({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}))
    cifar("data_float", batch_b=dump({b"data": np.full((2, 3072), np.nan), b"labels": [0, 1]}))
    cifar("data_1d", batch_b=dump({b"data": np.zeros(3072, np.uint8), b"labels": [0]}))
    cifar("data_missing", batch_b=dump({b"labels": [0, 1]}))
    cifar("labels_out_of_range", batch_b=dump({b"data": flat[:2], b"labels": [0, 10 ** 9]}))
    cifar("labels_negative", batch_b=dump({b"data": flat[:2], b"labels": [0, -1]}))
    cifar("labels_mismatch", batch_b=dump({b"data": flat[:4], b"labels": [0]}))
    cifar("labels_str", batch_b=dump({b"data": flat[:2], b"labels": ["a", "b"]}))
    cifar("labels_float_nan", batch_b=dump({b"data": flat[:2], b"labels": [0.0, float("nan")]}))
    cifar("batch_list", batch_b=dump([1, 2]))
    cifar("batch_empty_file", batch_b=b"")
    cifar("batch_truncated", batch_b=good_batch[:-50])
    cifar("batch_is_dir", batch_b=lambda p: p.mkdir())
    cifar("batch_fifo", batch_b=lambda p: os.mkfifo(p))
    cifar("batch_dev_zero", batch_b=lambda p: os.symlink("/dev/zero", p))
    cifar("no_test_batch", batch_b=None)
    (cd / "parent" / "inner").mkdir(parents=True)
    shutil.copytree(cd / "ok", cd / "parent" / "inner" / "cifar-10-batches-py")
    (cd / "cifar100_bad").mkdir()
    (cd / "cifar100_bad" / "meta").write_bytes(dump({b"fine_label_names": [b"a", b"b"]}))
    (cd / "cifar100_bad" / "test").write_bytes(dump({b"data": flat[:2], b"coarse_labels": [0, 1]}))

    # ---- weights (export) and classes files
    wd = d / "weights"
    wd.mkdir()
    for tag in ("os_system_p2", "builtins_open", "getattr_import", "numpy_load"):
        (wd / f"legacy_{tag}.th").write_bytes(ev[tag])
        zip_members(wd / f"zip_{tag}.th", {"archive/data.pkl": ev[tag], "archive/version": b"3\n",
                                           "archive/byteorder": b"little"})
    (wd / "npz.th").write_bytes((d / "calib.npz").read_bytes())
    (wd / "trunc.th").write_bytes((d / "r8.th").read_bytes()[:5000])
    (wd / "dir.th").mkdir()
    kd = d / "classes"
    kd.mkdir()
    for name, text in {"empty": b"", "one": b"cat\n", "eleven": ("\n".join(CLASSES10 + ["x"]) + "\n").encode(),
                       "dup": ("\n".join(["cat"] * 10) + "\n").encode(),
                       "esc": ("\x1b[2J\n" + "\n".join(CLASSES10[1:]) + "\n").encode(),
                       "long": ("n" * 300 + "\n" + "\n".join(CLASSES10[1:]) + "\n").encode(),
                       "crlf": ("\r\n".join(CLASSES10) + "\r\n").encode(),
                       "binary": bytes(range(256)) * 4,
                       "utf16": "\n".join(CLASSES10).encode("utf-16"),
                       "blank_lines": ("\n\n".join(CLASSES10) + "\n").encode(),
                       "huge_line": b"a" * 5_000_000,
                       "ten_unicode": ("\n".join(["\u732b"] + CLASSES10[1:]) + "\n").encode()}.items():
        (kd / f"{name}.txt").write_bytes(text)
    os.mkfifo(kd / "fifo.txt")

    # ---- module dirs with broken manifests
    dd = d / "mdirs"
    for name, manifest in {
        "escape": lambda m: m["modules"][0].update(file="../../r8.onnx"),
        "absolute": lambda m: m["modules"][0].update(file="/etc/passwd"),
        "file_int": lambda m: m["modules"][0].update(file=5),
        "no_modules": lambda m: m.pop("modules"),
        "modules_dict": lambda m: m.update(modules={"a": 1}),
        "nan": lambda m: m.update(settings=float("nan")),
        "deep": None,
        "null": "null",
        "missing_module_file": lambda m: m["modules"][0].update(file="module_999_x.onnx"),
        "huge_manifest": lambda m: m.update(junk=["x" * 100] * 200000),
    }.items():
        shutil.copytree(d / "mods", dd / name)
        p = dd / name / "manifest.json"
        if manifest is None:
            p.write_text("[" * 100000 + "]" * 100000)
        elif isinstance(manifest, str):
            p.write_text(manifest)
        else:
            m = json.loads(p.read_text())
            manifest(m)
            p.write_text(json.dumps(m))
    shutil.copytree(d / "mods", dd / "no_manifest")
    (dd / "no_manifest" / "manifest.json").unlink()
    shutil.copytree(d / "mods", dd / "with_tampered")
    shutil.copy(md / "module_class_index_e400.onnx", dd / "with_tampered" / "module_001_x.onnx")
    os.symlink(d / "mods", d / "mods_link")


# ============================================================================ the case list
def rot(values: list, n: int, k: int) -> list:
    """n of values, starting at k (cyclically): each key or flag gets a different few, all get used."""
    return [values[(k * n + j) % len(values)] for j in range(min(n, len(values)))]


def define_cases(ctx: "Ctx") -> None:
    # ---------------------------------------------------------------- metadata of every key, every command
    mod_cmds = [
        lambda f: ["info", f, "--json"],
        lambda f: EVAL(f, P("test.npz")),
        lambda f: PRED(f, P("img/good.png"), "--json"),
        lambda f: ["compose", f, DOG, "-o", "out.onnx", "-q", "--device", "cpu"],
        lambda f: ["replace", P("composed.onnx"), "--class", "cat", "--with", f, "-o", "out.onnx", "-q", "--device", "cpu"],
        lambda f: ["export-triton", f, "-o", "repo", "-q"],
    ]
    comp_cmds = [
        lambda f: ["info", f, "--json"],
        lambda f: EVAL(f, P("test.npz")),
        lambda f: PRED(f, P("img/good.png"), "--json"),
        lambda f: ["replace", f, "--class", "cat", "--with", CAT, "-o", "out.onnx", "-q", "--device", "cpu"],
        lambda f: ["compose", f, SHIP, "-o", "out.onnx", "-q", "--device", "cpu"],
        lambda f: ["export-triton", f, "-o", "repo", "-q"],
    ]
    src_cmds = [
        lambda f: ["info", f, "--json"],
        lambda f: ["decompose", f, "--calib", P("calib.npz"), "-o", "out.modules", *DQ],
        lambda f: EVAL(f, P("test.npz")),
        lambda f: PRED(f, P("img/good.png")),
        lambda f: ["compose", f, "-o", "out.onnx", "-q", "--device", "cpu"],
        lambda f: ["replace", f, "--class", "cat", "--with", CAT, "-o", "out.onnx", "-q", "--device", "cpu"],
        lambda f: ["export-triton", f, "-o", "repo", "-q"],
    ]
    outs = ("out.onnx", "out.modules", "repo")
    k = 0
    for kind, keys, cmds in [
        ("module", ["kind", "class_name", "class_index", "source", "kept", "calibration", "preprocess", "format_version",
                    "frontend"], mod_cmds),
        ("composed", ["kind", "classes", "preprocess", "compose", "members", "format_version"], comp_cmds),
        ("source", ["kind", "classes", "preprocess"], src_cmds),
    ]:
        for ki, key in enumerate(keys):
            for v in rot(list(VARIANTS), 6, ki + len(kind)):
                f = P(f"meta/{kind}_{key}_{v}.onnx")
                cmd = cmds[k % len(cmds)]
                k += 1
                add(f"meta-{kind}-{key}-{v}-{cmd(f)[0]}", cmd(f), group="metadata", outputs=outs)
    for name in ctx.special:
        f = P(f"meta/{name}.onnx")
        cmds = mod_cmds if name.startswith("module") else comp_cmds if name.startswith("composed") else src_cmds
        cmd = cmds[k % len(cmds)]
        k += 1
        add(f"meta-{name}-{cmd(f)[0]}", cmd(f), group="metadata", outputs=outs)
    add("meta-member-composed-info-plain", ["info", P("meta/composed_member_kind_composed.onnx")], group="metadata")
    add("meta-source-huge-classes-decompose", ["decompose", P("meta/source_classes_huge_list.onnx"), "--calib",
                                               P("calib.npz"), "-o", "out.modules", *DQ], group="metadata",
        outputs=("out.modules",))
    add("meta-source-size-huge-decompose", ["decompose", P("meta/source_pre_size_huge.onnx"), "--calib", P("calib.npz"),
                                            "-o", "out.modules", *DQ], group="metadata", outputs=("out.modules",))
    add("meta-module-size-huge-predict", PRED(P("meta/module_pre_size_huge.onnx"), P("img/good.png")), group="metadata")
    add("meta-unicode-classes-info", ["info", P("unicode_classes.onnx"), "--json"], group="metadata")
    add("meta-unicode-classes-triton", ["export-triton", P("unicode_classes.onnx"), "-o", "repo", "-q"],
        group="metadata", outputs=("repo",))

    # ---------------------------------------------------------------- graphs
    gcmds = [lambda f: ["info", f, "--json"],
             lambda f: ["decompose", f, "--calib", P("calib.npz"), "-o", "out.modules", *DQ],
             lambda f: EVAL(f, P("test.npz")),
             lambda f: PRED(f, P("img/good.png")),
             lambda f: ["compose", f, "-o", "out.onnx", "-q", "--device", "cpu"],
             lambda f: ["serve", f, "--port", "0", "--json", "-q"]]
    graphs = ["self_loop", "cycle_long", "dup_producer", "no_input", "two_inputs", "int_input", "rank2_input", "zero_dim",
              "neg_dim", "huge_dim", "no_outputs", "output_int", "opset_1", "opset_999", "ir_999", "ir_0", "custom_domain",
              "empty_op", "bad_raw", "huge_init_dims", "neg_init_dims", "no_nodes", "subgraph_if", "node_name_newline",
              "trunc_1", "trunc_10", "trunc_500", "flip_0", "flip_1", "flip_2", "flip_3", "zeros", "npz_as_onnx",
              "json_as_onnx", "dir", "trunc_module", "trunc_composed"]
    for j, g in enumerate(graphs):
        f = P(f"graph/{g}.onnx")
        for c in ({0, 1 + j % (len(gcmds) - 1)} if j < 6 else {j % len(gcmds)}):
            argv = gcmds[c](f)
            add(f"graph-{g}-{argv[0]}", argv, group="graph", outputs=outs, mode="serve" if argv[0] == "serve" else "normal")
    add("graph-module-self-loop-compose", ["compose", P("graph/module_self_loop.onnx"), DOG, "-o", "out.onnx", "-q"],
        group="graph", outputs=("out.onnx",))
    add("graph-module-two-inputs-replace", ["replace", P("composed.onnx"), "--class", "cat", "--with",
                                            P("graph/module_two_inputs.onnx"), "-o", "out.onnx", "-q"], group="graph",
        outputs=("out.onnx",))
    raw_len = (SAMPLES / "resnet8_cifar10.onnx").stat().st_size
    for frac in (raw_len // 2, raw_len - 1):
        add(f"graph-trunc_{frac}-decompose", ["decompose", P(f"graph/trunc_{frac}.onnx"), "--calib", P("calib.npz"),
                                              "-o", "out.modules", *DQ], group="graph", outputs=("out.modules",))
    for e in ["escape", "absolute", "missing", "sparse_2g", "sparse_2g_length", "offset_beyond", "length_huge",
              "offset_neg", "offset_text", "good", "dotdot_inside", "to_dir", "symlink_out", "symlink_dev_zero", "fifo",
              "newline_name", "empty_location"]:
        f = P(f"ext/{e}/model.onnx")
        add(f"ext-{e}-info", ["info", f], group="external-data", timeout=60)
        if e in ("sparse_2g", "sparse_2g_length", "symlink_dev_zero", "fifo", "good", "escape", "length_huge"):
            add(f"ext-{e}-eval", EVAL(f, P("test.npz")), group="external-data", timeout=60)
            add(f"ext-{e}-decompose", ["decompose", f, "--calib", P("calib.npz"), "-o", "out.modules", *DQ],
                group="external-data", outputs=("out.modules",), timeout=60)
    add("ext-sparse-compose", ["compose", P("ext/sparse_2g/model.onnx"), "-o", "out.onnx", "-q"], group="external-data",
        outputs=("out.onnx",))
    add("ext-sparse-serve", ["serve", P("ext/sparse_2g/model.onnx"), "--port", "0", "--json", "-q"], group="external-data",
        mode="serve")

    # ---------------------------------------------------------------- data: npz
    npzs = ["x_object_evil", "y_object_evil", "classes_object_evil", "x_float64", "x_nan", "x_inf", "x_1e30", "x_negative",
            "x_int64", "x_bool", "x_complex", "x_str", "x_float16", "x_empty", "x_scalar", "x_5d", "x_channels4",
            "x_channels1", "x_1x1", "x_nchw_255", "len_mismatch", "y_negative", "y_int64_max", "y_uint64_max", "y_2d",
            "y_str", "y_bool", "y_half", "y_whole_float", "y_1e300", "y_complex", "y_99999_no_classes", "classes_int",
            "classes_empty", "classes_dup", "classes_long", "classes_esc", "classes_2d", "classes_scalar", "no_x",
            "extra_keys", "unicode_classes", "header_lie_1tb", "header_lie_6gb", "header_big", "header_garbage",
            "plain_npy", "pickle", "empty", "not_zip", "dir"]
    for j, n in enumerate(npzs):
        f = P(f"npz/{n}.npz")
        add(f"npz-{n}-eval", EVAL(P("r8.onnx"), f), group="data-npz")
        if j % 4 == 0 or n.startswith(("header", "x_object", "y_object", "classes_object")):
            add(f"npz-{n}-decompose", ["decompose", P("r8.onnx"), "--calib", f, "-o", "out.modules", *DQ],
                group="data-npz", outputs=("out.modules",))
        if j % 10 == 0:
            add(f"npz-{n}-eval-composed", EVAL(P("catdog.onnx"), f), group="data-npz")
        if j % 10 == 5:
            add(f"npz-{n}-compose-calib", ["compose", P("r8b.onnx"), CAT, "--rename", "--calib", f, "-o", "out.onnx",
                                           "-q", "--device", "cpu"], group="data-npz", outputs=("out.onnx",))
    add("npz-ok-compose-calib", ["compose", P("r8b.onnx"), CAT, "--rename", "--calib", P("test.npz"), "-o", "out.onnx",
                                 "-q", "--device", "cpu"], group="data-npz", outputs=("out.onnx",))
    add("npz-ok-replace-calib", ["replace", P("r8b.onnx"), "--class", "cat", "--with", CAT, "--calib", P("npz/x_nan.npz"),
                                 "-o", "out.onnx", "-q", "--device", "cpu"], group="data-npz", outputs=("out.onnx",))

    # ---------------------------------------------------------------- data: CIFAR batches (pickles)
    ev_tags = ["os_system_p2", "os_system_p0", "os_system_p5", "subprocess_call", "builtins_eval", "builtins_exec",
               "builtins_open", "getattr_import", "numpy_load", "object_array", "nested_in_dict"]
    for j, tag in enumerate(ev_tags):
        f = P(f"cifar/evil_batch_{tag}")
        add(f"cifar-evil-{tag}-eval", EVAL(P("r8.onnx"), f), group="data-pickle")
        if j % 3 == 0:
            add(f"cifar-evil-{tag}-decompose", ["decompose", P("r8.onnx"), "--calib", f, "--split", "test", "-o",
                                                "out.modules", *DQ], group="data-pickle", outputs=("out.modules",))
        if j % 4 == 1:
            add(f"cifar-evil-{tag}-compose-calib", ["compose", P("r8b.onnx"), CAT, "--rename", "--calib", f, "-q", "-o",
                                                    "out.onnx"], group="data-pickle", outputs=("out.onnx",))
    add("cifar-evil-meta-eval", EVAL(P("r8.onnx"), P("cifar/evil_meta")), group="data-pickle")
    add("cifar-evil-train-decompose", ["decompose", P("r8.onnx"), "--calib", P("cifar/evil_train"), "-o", "out.modules",
                                       *DQ], group="data-pickle", outputs=("out.modules",))
    add("cifar-evil-parent-eval", EVAL(P("r8.onnx"), P("cifar")), group="data-pickle")
    for n in ["ok", "names_ints", "names_empty", "names_dup", "names_ctrl", "names_dict", "names_missing", "meta_list",
              "meta_none", "data_3071", "data_float", "data_1d", "data_missing", "labels_out_of_range", "labels_negative",
              "labels_mismatch", "labels_str", "labels_float_nan", "batch_list", "batch_empty_file", "batch_truncated",
              "batch_is_dir", "batch_fifo", "batch_dev_zero", "no_test_batch", "parent", "cifar100_bad"]:
        add(f"cifar-{n}-eval", EVAL(P("r8.onnx"), P(f"cifar/{n}")), group="data-cifar", timeout=60)
    for n in ["names_ctrl", "labels_out_of_range", "batch_fifo", "data_3071"]:
        add(f"cifar-{n}-decompose", ["decompose", P("r8.onnx"), "--calib", P(f"cifar/{n}"), "--split", "test", "-o",
                                     "out.modules", *DQ], group="data-cifar", outputs=("out.modules",), timeout=60)

    # ---------------------------------------------------------------- images: predict and image folders
    for n in ["good", "big", "tiny_1x1", "gray", "rgba", "palette", "i16", "wide_4000x2", "bomb_20000", "under_bomb_9000",
              "width0", "hdr_100000x1", "hdr_2pow31", "text_bomb", "corrupt", "zero", "text", "trunc", "badcrc",
              "chunk_len_huge", "dev_zero", "dev_urandom", "dangling", "fifo", "dir"]:
        add(f"img-{n}-predict", PRED(P("catdog.onnx"), P(f"img/{n}.png")), group="images", timeout=60)
    for n in ["cmyk.jpg", "huge.jpg", "png_as.jpg", "anim.gif", "huge.gif", "huge.bmp", "neg.bmp"]:
        add(f"img-{n}-predict", PRED(P("r8.onnx"), P(f"img/{n}"), "--json"), group="images", timeout=60)
    add("img-many-args-predict", PRED(P("catdog.onnx"), *[P("img/good.png")] * 400, "--json"), group="images")
    add("img-good-then-bomb-predict", PRED(P("catdog.onnx"), P("img/good.png"), P("img/under_bomb_9000.png")),
        group="images")
    add("img-module-predict-1x1", PRED(CAT, P("img/tiny_1x1.png"), "--json"), group="images")
    add("img-under-bomb-dynamic-source", PRED(P("dynamic.onnx"), P("img/wide_4000x2.png")), group="images")
    for j, n in enumerate(["ok", "zero_byte", "broken", "bomb", "under_bomb", "huge_jpeg", "text_bomb", "fifo", "dev_zero",
                           "loop", "ctrl_class", "esc_class", "long_class", "unicode_class", "nested_only", "hidden_only",
                           "upper_ext", "stray_file", "empty_classes", "one_pixel", "flat_broken", "many_classes",
                           "dangling"]):
        f = P(f"folders/{n}")
        add(f"folder-{n}-eval", EVAL(P("catdog.onnx"), f), group="image-folders", timeout=60)
        if j % 3 == 0 or n in ("fifo", "dev_zero", "under_bomb", "ctrl_class"):
            add(f"folder-{n}-decompose", ["decompose", P("r8.onnx"), "--calib", f, "-o", "out.modules", *DQ[2:]],
                group="image-folders", outputs=("out.modules",), timeout=60)

    # ---------------------------------------------------------------- numeric flags of every command
    FLOATS = ["nan", "-inf", "-0", "1e400", "1e-400", "", "0x10", "\x1b[2J", "1,5", "9" * 5000]
    INTS = ["-1", str(2 ** 64), "-0", "1.5", "", "\u0661\u0662", "9" * 5000, "1e3", "nan", " 7 "]
    dec_fast = [*DEC, *DQ]
    flag_sets = [
        ("decompose", dec_fast, ["--scale", "--target-macs", "--depth-slope", "--shared-depth", "--repair-epochs"],
         ["--samples-per-class", "--channel-multiple", "--refit-images", "--repair-batch-size", "--batch-size", "--seed"],
         ("out.modules",), "normal"),
        ("eval", EVAL(P("catdog.onnx"), P("test.npz")), [], ["--limit", "--batch-size"], (), "normal"),
        ("predict", PRED(P("catdog.onnx"), P("img/good.png")), [], ["--top"], (), "normal"),
        ("export-triton", ["export-triton", P("catdog.onnx"), "-o", "repo", "-q"], ["--max-delay-ms"], ["--max-batch"],
         ("repo",), "normal"),
        ("serve", ["serve", P("catdog.onnx"), "--json", "-q"], ["--max-delay-ms", "--max-body-mb"],
         ["--port", "--max-batch", "--instances", "--threads"], (), "serve"),
    ]
    fk = 0
    for cmd, base, floats, ints, o, mode in flag_sets:
        for flag in floats + ints:
            values = FLOATS if flag in floats else INTS
            fk += 1
            for v in rot(values, 3 if mode == "serve" else 4, fk):
                extra = [] if flag == "--port" or mode != "serve" else ["--port", "0"]
                add(f"flag-{cmd}{flag}={_short(v)}", [*base, *extra, flag, v], group="flags", outputs=o, mode=mode,
                    timeout=60)
    # the repair flags with repair on (invalid values only: a valid one would train)
    for flag, v in [("--repair-epochs", "nan"), ("--repair-epochs", "-0"), ("--repair-epochs", "1e400"),
                    ("--repair-batch-size", "0"), ("--repair-batch-size", str(2 ** 63))]:
        add(f"flag-decompose-repair{flag}={v}", [*DEC, "--classes", "cat", "--samples-per-class", "5", "-q", flag, v],
            group="flags", outputs=("out.modules",))
    add("flag-eval-limit-1e18", [*EVAL(P("catdog.onnx"), P("test.npz")), "--limit", str(10 ** 18)], group="flags")
    add("flag-eval-batch-65536", [*EVAL(P("catdog.onnx"), P("test.npz")), "--batch-size", "65536"], group="flags")
    add("flag-predict-top-huge", [*PRED(P("catdog.onnx"), P("img/good.png")), "--top", str(10 ** 30)], group="flags")
    add("flag-decompose-channel-multiple-4096", [*dec_fast, "--channel-multiple", "4096"], group="flags",
        outputs=("out.modules",))
    add("flag-decompose-samples-1e6", [*dec_fast, "--samples-per-class", "1000000"], group="flags",
        outputs=("out.modules",))
    add("flag-decompose-batch-1", [*dec_fast, "--batch-size", "1"], group="flags", outputs=("out.modules",))

    # ---------------------------------------------------------------- choice and text flags
    for flag, cmd_base, vals, o in [
        ("--split", EVAL(P("r8.onnx"), P("cifar/ok")), ["", "TEST", "test\n", "train", "val"], ()),
        ("--layout", dec_fast, ["", "NHWC", "nchw ", "nchwc"], ("out.modules",)),
        ("--strategy", dec_fast, ["", "GLOBAL", "random"], ("out.modules",)),
        ("--fill", dec_fast, ["", "MEAN", "nan"], ("out.modules",)),
        ("--device", EVAL(P("catdog.onnx"), P("test.npz")), ["", "CUDA", "cuda", "gpu", "cpu;rm -rf /", "cpu\n"], ()),
        ("--device", dec_fast, ["cuda", "tpu"], ("out.modules",)),
        ("--classes", dec_fast, ["", ",", "cat,cat", "99", "-1", "\u732b", "cat\n", "c" * 100000, "3.0", str(2 ** 64),
                                 "0,1,2,3,4,5,6,7,8,9," * 100], ("out.modules",)),
        ("--mean", dec_fast, ["", "nan,0,0", "1e400,0,0", "1,2,3,4", "0x1,0,0", "inf,1,1", "0.5", ",,"], ("out.modules",)),
        ("--std", dec_fast, ["-0,-0,-0", "1e-400,1,1", "1e308,1,1", "-1,-1,-1", "\u0661,1,1"], ("out.modules",)),
        ("--input-size", dec_fast, ["0,0", "-1,32", "32", "32,32,32", "1e400,32", "nan,32", "32,32", "\uff13\uff12,32"],
         ("out.modules",)),
        ("--class-target", dec_fast, ["=0.5", "cat=", "cat=0.5=1", "unicorn=0.5", "cat=1e-400", "\n=0.5", "cat=inf",
                                      "cat=0.9", "dog=0.5"], ("out.modules",)),
    ]:
        for v in vals:
            add(f"text-{cmd_base[0]}{flag}={_short(v)}", [*cmd_base, flag, v], group="text-flags", outputs=o)
    dyn = ["decompose", P("dynamic.onnx"), "--calib", P("calib.npz"), "-o", "out.modules", *DQ]
    for v in ["99999,99999", "1,1", "0,32", "46341,46341", "32,32", "3,200000"]:
        add(f"text-decompose-dynamic--input-size={v}", [*dyn, "--input-size", v], group="text-flags",
            outputs=("out.modules",), timeout=90)
    add("text-decompose-class-target-twice", [*dec_fast, "--class-target", "cat=0.5", "--class-target", "cat=0.7"],
        group="text-flags", outputs=("out.modules",))
    rep = ["replace", P("composed.onnx"), "--with", CAT, "-o", "out.onnx", "-q", "--device", "cpu"]
    for v in ["nan", "-1", "1e400", str(2 ** 64), "", "\u732b", "cat\n", " cat", "0", "-0", "3.0"]:
        add(f"text-replace--class={_short(v)}", [*rep, "--class", v], group="text-flags", outputs=("out.onnx",))
    for w_ in [P("mods"), P("r8.onnx"), P("composed.onnx"), P("img/good.png"), P("npz/empty.npz"), P("nope.onnx"), ""]:
        add(f"text-replace--with={_short(w_)}", ["replace", P("composed.onnx"), "--class", "cat", "--with", w_, "-o",
                                                 "out.onnx", "-q"], group="text-flags", outputs=("out.onnx",))
    tri = ["export-triton", P("catdog.onnx"), "-o", "repo", "-q"]
    for v in ["", ".", "..", "../escape", "a/b", "/", R + "escape_abs", "\u732b", "name\n", "n" * 300, "-", ".hidden"]:
        add(f"text-export-triton--name={_short(v)}", [*tri, "--name", v], group="text-flags", outputs=("repo",))
    srv = ["serve", P("catdog.onnx"), "--json", "-q"]
    for v in ["", "../x", "a/b", "name\n", "\u732b", "v2"]:
        add(f"text-serve--name={_short(v)}", [*srv, "--port", "0", "--name", v], group="text-flags", mode="serve",
            timeout=60)
    add("text-serve--name-too-many", [*srv, "--port", "0", "--name", "a", "--name", "b"], group="text-flags",
        mode="serve", timeout=60)
    add("text-serve--name-dup-models", ["serve", P("catdog.onnx"), P("catdog.onnx"), "--port", "0", "--json", "-q"],
        group="text-flags", mode="serve", timeout=60)
    for v in ["999.1.1.1", "", "localhost\n", "::1", "h" * 300, "example.invalid", "0.0.0.0"]:
        add(f"text-serve--host={_short(v)}", [*srv, "--port", "0", "--host", v], group="text-flags", mode="serve",
            timeout=60)
    for n in ["empty", "eleven", "dup", "esc", "crlf", "binary", "utf16", "huge_line", "ten_unicode", "fifo"]:
        add(f"text-compose--classes-file={n}", ["compose", P("r8.onnx"), "--classes-file", P(f"classes/{n}.txt"), "-o",
                                                "out.onnx", "-q"], group="text-flags", outputs=("out.onnx",))
    add("text-compose--classes-file-unused", ["compose", CAT, "--classes-file", P("classes/one.txt"), "-o", "out.onnx",
                                              "-q"], group="text-flags", outputs=("out.onnx",))
    for c in [P("npz/empty.npz"), P("nope"), P("folders/fifo"), "", P("img/good.png")]:
        add(f"text-compose--calib={_short(c)}", ["compose", P("r8b.onnx"), CAT, "--rename", "--calib", c, "-o",
                                                 "out.onnx", "-q"], group="text-flags", outputs=("out.onnx",))

    # ---------------------------------------------------------------- compose/replace inputs
    for name, argv in [
        ("dir-escape-manifest", ["compose", P("mdirs/escape"), "-o", "out.onnx", "-q"]),
        ("dir-absolute-manifest", ["compose", P("mdirs/absolute"), "-o", "out.onnx", "-q"]),
        ("dir-file-int", ["compose", P("mdirs/file_int"), "-o", "out.onnx", "-q"]),
        ("dir-no-modules", ["compose", P("mdirs/no_modules"), "-o", "out.onnx", "-q"]),
        ("dir-modules-dict", ["compose", P("mdirs/modules_dict"), "-o", "out.onnx", "-q"]),
        ("dir-nan", ["compose", P("mdirs/nan"), "-o", "out.onnx", "-q"]),
        ("dir-deep", ["compose", P("mdirs/deep"), "-o", "out.onnx", "-q"]),
        ("dir-null", ["compose", P("mdirs/null"), "-o", "out.onnx", "-q"]),
        ("dir-missing-module-file", ["compose", P("mdirs/missing_module_file"), "-o", "out.onnx", "-q"]),
        ("dir-huge-manifest", ["compose", P("mdirs/huge_manifest"), "-o", "out.onnx", "-q"]),
        ("dir-no-manifest", ["compose", P("mdirs/no_manifest"), "-o", "out.onnx", "-q"]),
        ("dir-with-tampered", ["compose", P("mdirs/with_tampered"), "-o", "out.onnx", "-q"]),
        ("replace-base-escape-manifest", ["replace", P("mdirs/escape"), "--class", "cat", "--with", CAT, "-o", "out.onnx",
                                          "-q"]),
        ("replace-base-deep-manifest", ["replace", P("mdirs/deep"), "--class", "cat", "--with", CAT, "-o", "out.onnx",
                                        "-q"]),
        ("dir-and-its-module", ["compose", P("mods"), CAT, "-o", "out.onnx", "-q"]),
        ("dir-and-symlinked-dir", ["compose", P("mods"), P("mods_link"), "-o", "out.onnx", "-q"]),
        ("same-module-other-path", ["compose", CAT, P("mods/../mods/module_003_cat.onnx"), "-o", "out.onnx", "-q"]),
        ("module-200-times", ["compose", *[CAT] * 200, "-o", "out.onnx", "-q"]),
        ("composed-of-composed", ["compose", P("composed.onnx"), P("catdog.onnx"), "-o", "out.onnx", "-q"]),
        ("composed-and-source", ["compose", P("srcmember.onnx"), P("r8.onnx"), "-o", "out.onnx", "-q"]),
        ("source-twice", ["compose", P("r8.onnx"), P("r8.onnx"), "--rename", "-o", "out.onnx", "-q"]),
        ("two-sources-no-calib", ["compose", P("r8.onnx"), P("r8b.onnx"), "--rename", "-o", "out.onnx", "-q"]),
        ("dash-file", ["compose", "--", "-o", "-o", "out.onnx"]),
        ("image-as-member", ["compose", P("img/good.png"), "-o", "out.onnx", "-q"]),
        ("npz-as-member", ["compose", P("calib.npz"), "-o", "out.onnx", "-q"]),
        ("fifo-as-member", ["compose", P("img/fifo.png"), "-o", "out.onnx", "-q"]),
        ("no-inputs", ["compose", "-o", "out.onnx"]),
        ("replace-srcmember", ["replace", P("srcmember.onnx"), "--class", "cat", "--with", CAT, "-o", "out.onnx", "-q"]),
        ("replace-class-index-on-source", ["replace", P("r8.onnx"), "--class", "3", "--with", CAT, "-o", "out.onnx",
                                           "-q"]),
        ("replace-with-composed", ["replace", P("composed.onnx"), "--class", "cat", "--with", P("catdog.onnx"), "-o",
                                   "out.onnx", "-q"]),
    ]:
        add(f"members-{name}", argv, group="members", outputs=("out.onnx",))

    # ---------------------------------------------------------------- output paths
    writers = {
        "compose": (["compose", CAT, DOG, "-q"], "file"),
        "replace": (["replace", P("composed.onnx"), "--class", "cat", "--with", CAT, "-q"], "file"),
        "export": (["export", "resnet8", "-w", P("r8.th"), "-q"], "file"),
        "decompose": ([*DEC[:-2], *DQ], "dir"),
        "export-triton": (["export-triton", P("catdog.onnx"), "-q"], "repo"),
    }
    # (name, -o value, extra flags, setup, may write these names, must be refused) per kind of output
    ALL = ("file", "dir", "repo")
    table = [
        ("root", "/", [], None, (), True, ALL),
        ("empty", "", [], None, ("catdog",), False, ALL),
        ("empty-force", "", ["--force"], None, ("catdog",), False, ALL),
        ("dot-force", ".", ["--force"], None, ("catdog",), False, ALL),
        ("dotdot-force", "..", ["--force"], None, (), True, ("file", "dir")),
        ("name-too-long", "x" * 300, [], None, (), False, ALL),
        ("path-too-long", "d/" * 2100 + "x", [], None, ("d",), False, ALL),
        ("proc", "/proc/self/attack.out", [], None, (), True, ALL),
        ("sys", "/sys/attack.out", [], None, (), True, ALL),
        ("existing-user-file", "mine.txt", [], s_file("mine.txt"), (), True, ALL),
        ("existing-user-file-force", "mine.txt", ["--force"], s_file("mine.txt"), ("mine.txt",), False, ("file",)),
        ("existing-user-file-force", "mine.txt", ["--force"], s_file("mine.txt"), (), True, ("dir", "repo")),
        ("existing-user-dir-force", "mine", ["--force"], s_dir("mine"), (), True, ("file", "dir")),
        ("existing-user-dir-force", "mine", ["--force"], s_dir("mine"), ("mine",), False, ("repo",)),
        ("existing-empty-dir-force", "emptyd", ["--force"], s_emptydir("emptyd"), (), True, ("file", "dir")),
        ("existing-empty-dir-force", "emptyd", ["--force"], s_emptydir("emptyd"), ("emptyd",), False, ("repo",)),
        ("fifo-force", "pipe", ["--force"], s_fifo("pipe"), (), True, ALL),
        ("socket-force", "sock", ["--force"], s_socket("sock"), (), True, ALL),
        ("chardev-force", "null", ["--force"], s_chardev("null"), (), True, ALL),
        ("under-user-file", "mine.txt/out", [], s_file("mine.txt"), (), True, ALL),
        ("input-via-dir-link", "inlink/module_003_cat.onnx", ["--force"], s_link("inlink", I + "mods"), (), True,
         ("compose", "replace", "dir", "repo")),
        ("inputs-dir-force", P(""), ["--force"], None, (), True, ("file", "dir")),
        ("fsize-64k", "fs.out", [], None, ("fs.out",), False, ALL),
        ("space", " ", [], None, (" ",), False, ("light",)),
        ("newline-name", "new\nline", [], None, ("new\nline",), False, ("light",)),
        ("escape-name", "\x1b[2J", [], None, ("\x1b[2J",), False, ("light",)),
        ("dash", "-", [], None, ("-",), False, ("light",)),
        ("missing-parents", "a/b/c/out", [], None, ("a",), False, ("light",)),
        ("readonly-dir", "ro/out", [], s_readonly("ro"), ("ro",), False, ("light",)),
        ("dangling-link-force", "dl", ["--force"], s_link("dl", R + "dangling_target"), ("dl",), False, ("light",)),
        ("link-to-input-force", "ln", ["--force"], s_link("ln", I + "catdog.onnx"), ("ln",), False, ("light",)),
        ("trailing-slash", "out.onnx/", [], None, ("out.onnx",), False, ("compose", "replace")),
        ("manifest-escape-force", "out.modules", ["--force"], s_manifest_escape("out.modules"), ("out.modules",), False,
         ("dir",)),
        ("own-output-force", "old.modules", ["--force"], s_mods("old.modules"), ("old.modules",), False, ("dir",)),
    ]
    for wname, (base, kind) in writers.items():
        heavy = wname == "export"  # a valid export takes seconds: only refusals for it, and one --force
        tags = {kind, wname} | (set() if heavy else {"light"})
        for cname, o, extra, setup, allowed, refuse, applies in table:
            if not tags & set(applies):
                continue
            add(f"out-{wname}-{cname}", [*base, "-o", o, *extra], group="outputs", setup=setup, outputs=allowed,
                must_refuse=refuse, fsize=65536 if cname == "fsize-64k" else None, timeout=120 if heavy else 90)
    add("out-export-triton-manifest-escape", ["export-triton", P("catdog.onnx"), "-o", "repo", "--force", "-q"],
        group="outputs", setup=s_triton_escape, outputs=("repo",))
    add("out-export-triton-repo-is-file", ["export-triton", P("catdog.onnx"), "-o", "mine.txt", "-q"], group="outputs",
        setup=s_file("mine.txt"), must_refuse=True)
    add("out-export-triton-name-is-input", ["export-triton", P("catdog.onnx"), "-o", P(""), "--name", "catdog.onnx",
                                            "--force", "-q"], group="outputs", must_refuse=True)
    add("out-replace-output-is-with", ["replace", P("composed.onnx"), "--class", "cat", "--with", CAT, "-o", CAT,
                                       "--force", "-q"], group="outputs", must_refuse=True)
    add("out-decompose-output-is-calib-force", [*DEC[:-1], P("calib.npz"), *DQ, "--force"], group="outputs",
        must_refuse=True)
    add("out-compose-into-input-dir-link", ["compose", CAT, DOG, "-o", P("mods_link/module_005_dog.onnx"), "--force",
                                            "-q"], group="outputs", must_refuse=True)

    # ---------------------------------------------------------------- export (weights, classes, arch)
    exp = ["export", "resnet8", "-o", "out.onnx", "-q"]
    for tag in ("os_system_p2", "builtins_open", "getattr_import", "numpy_load"):
        add(f"export-weights-legacy-{tag}", [*exp, "-w", P(f"weights/legacy_{tag}.th")], group="export",
            outputs=("out.onnx",), timeout=120)
        add(f"export-weights-zip-{tag}", [*exp, "-w", P(f"weights/zip_{tag}.th")], group="export",
            outputs=("out.onnx",), timeout=120)
    for n in ["npz", "trunc", "dir"]:
        add(f"export-weights-{n}", [*exp, "-w", P(f"weights/{n}.th")], group="export", outputs=("out.onnx",),
            timeout=120)
    add("export-weights-fifo", [*exp, "-w", P("img/fifo.png")], group="export", timeout=60)
    add("export-weights-dev-zero", [*exp, "-w", P("img/dev_zero.png")], group="export", timeout=60)
    for n in ["empty", "eleven", "dup", "esc", "binary", "huge_line", "fifo"]:
        add(f"export-classes-{n}", [*exp, "-w", P("r8.th"), "--classes", P(f"classes/{n}.txt")], group="export",
            outputs=("out.onnx",), timeout=120)
    add("export-classes-unicode", [*exp, "-w", P("r8.th"), "--classes", P("classes/ten_unicode.txt")], group="export",
        outputs=("out.onnx",), timeout=120)
    for a in ["", "RESNET8", "resnet8\n", "resnet" + "9" * 5000]:
        add(f"export-arch={_short(a)}", ["export", a, "-w", P("r8.th"), "-o", "out.onnx", "-q"], group="export",
            outputs=("out.onnx",), timeout=120)
    for flag, v in [("--mean", ""), ("--mean", "1e400,0,0"), ("--std", "-0,1,1"), ("--std", "1,1"),
                    ("--exporter", "torchscript"), ("--exporter", "")]:
        add(f"export{flag}={_short(v)}", [*exp, "-w", P("r8.th"), flag, v], group="export", outputs=("out.onnx",),
            timeout=120)

    # ---------------------------------------------------------------- misc command-line shapes
    for name, argv in [
        ("unknown-command", ["explode"]),
        ("unknown-option", ["info", P("r8.onnx"), "--bogus"]),
        ("option-missing-value", ["eval", P("r8.onnx"), "--data"]),
        ("predict-no-images", ["predict", P("r8.onnx")]),
        ("info-two-files", ["info", P("r8.onnx"), P("catdog.onnx")]),
        ("info-dashdash-json", ["info", "--", "--json"]),
        ("info-unicode-name", ["info", P("\u540d\u524d.onnx")]),
        ("info-bytes-name", ["info", b"\0I/\xff\xfe.onnx"]),
        ("info-bytes-missing", ["info", b"\0I/\xff\x80missing.onnx"]),
        ("info-long-missing", ["info", "m" * 100000]),
        ("info-escape-missing", ["info", "\x1b]0;pwned\x07.onnx"]),
        ("eval-limit-twice", [*EVAL(P("catdog.onnx"), P("test.npz")), "--limit", "5", "--limit", "6", "--json"]),
        ("ops-all-json", ["ops", "--all-columns", "--json"]),
        ("ops-extra-arg", ["ops", "extra"]),
        ("version", ["--version"]),
        ("help-decompose", ["decompose", "--help"]),
        ("json-and-quiet", ["info", P("composed.onnx"), "--json", "-q"]),
        ("eval-module-json", [*EVAL(CAT, P("test.npz")), "--json"]),
        ("eval-srcmember", EVAL(P("srcmember.onnx"), P("test.npz"))),
        ("predict-source-member-json", PRED(P("srcmember.onnx"), P("img/big.png"), "--json", "--top", "10")),
    ]:
        add(f"misc-{name}", argv, group="misc")
    add("env-ascii-stdout-unicode-json", ["info", P("unicode_classes.onnx"), "--json"], group="environment",
        env={"PYTHONIOENCODING": "ascii"})
    add("env-ascii-stdout-unicode-text", ["info", P("unicode_classes.onnx")], group="environment",
        env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    add("env-tmpdir-missing-compose", ["compose", CAT, DOG, "-o", "out.onnx", "-q"], group="environment",
        env={"TMPDIR": "/nonexistent/tmp"}, outputs=("out.onnx",))
    add("env-tmpdir-missing-decompose", dec_fast, group="environment", env={"TMPDIR": "/nonexistent/tmp"},
        outputs=("out.modules",))
    add("env-omp-garbage", EVAL(P("catdog.onnx"), P("test.npz")), group="environment", env={"OMP_NUM_THREADS": "abc"})
    add("env-columns-garbage", ["decompose", "--help"], group="environment", env={"COLUMNS": "-5"})
    add("stdout-closed-ops", ["ops"], group="environment", stdout="closed")
    add("stdout-closed-info-json", ["info", P("composed.onnx"), "--json"], group="environment", stdout="closed")
    add("stdout-full-eval-json", [*EVAL(P("catdog.onnx"), P("test.npz")), "--json"], group="environment", stdout="full")
    add("stdout-full-decompose-json", [*dec_fast, "--json"], group="environment", stdout="full", outputs=("out.modules",))

    # ---------------------------------------------------------------- serve: models and a clean start/stop
    for name, models in [("composed", [P("catdog.onnx")]), ("module", [CAT]), ("source", [P("r8.onnx")]),
                         ("tampered-module", [P("meta/module_calibration_nan.onnx")]),
                         ("cycle", [P("graph/self_loop.onnx")]), ("image", [P("img/good.png")]),
                         ("dir", [P("mods")]), ("fifo", [P("img/fifo.png")]),
                         ("good-and-bad", [P("catdog.onnx"), P("graph/trunc_500.onnx")])]:
        add(f"serve-{name}", ["serve", *models, "--port", "0", "--json", "-q"], group="serve", mode="serve", timeout=60)

    # ---------------------------------------------------------------- signals to running commands
    long_dec = ["decompose", P("r8.onnx"), "--calib", P("calib.npz"), "-o", "out.modules", "--reconstruct",
                "--no-repair", "--device", "cpu"]
    SIGINT, SIGTERM, SIGHUP = signal.SIGINT, signal.SIGTERM, signal.SIGHUP
    for sname, sig in (("SIGINT", SIGINT), ("SIGTERM", SIGTERM), ("SIGHUP", SIGHUP)):
        add(f"signal-decompose-{sname}-writing", long_dec, group="signals", mode="signal",
            signals=("writing", 0.0, (sig,), 0), outputs=("out.modules",))
        add(f"signal-decompose-{sname}-calibration", long_dec, group="signals", mode="signal",
            signals=("calibration statistics", 0.05, (sig,), 0), outputs=("out.modules",))
        add(f"signal-decompose-{sname}-startup", long_dec, group="signals", mode="signal",
            signals=(None, 0.35, (sig,), 0), outputs=("out.modules",))
    add("signal-decompose-SIGTERM-twice", long_dec, group="signals", mode="signal",
        signals=("layer-wise reconstruction", 0.2, (SIGTERM, SIGTERM), 0.01), outputs=("out.modules",))
    add("signal-decompose-SIGINT-then-SIGHUP-writing", long_dec, group="signals", mode="signal",
        signals=("writing", 0.0, (SIGINT, SIGHUP), 0.005), outputs=("out.modules",))
    add("signal-decompose-SIGHUP-force-keeps-old", [*long_dec, "--force"], group="signals", mode="signal",
        signals=("writing", 0.0, (SIGHUP,), 0), setup=s_mods("out.modules"))
    add("signal-decompose-SIGINT-repair", ["decompose", P("r8.onnx"), "--calib", P("calib.npz"), "-o", "out.modules",
                                           "--classes", "cat,dog", "--samples-per-class", "20", "--refit-images", "0",
                                           "--repair-epochs", "1", "--device", "cpu"], group="signals", mode="signal",
        signals=("repair of", 1.0, (SIGINT,), 0), outputs=("out.modules",), timeout=120)
    slow_eval = ["eval", P("srcmember.onnx"), "--data", P("big.npz"), "--batch-size", "1", "--device", "cpu"]
    for sname, sig in (("SIGINT", SIGINT), ("SIGTERM", SIGTERM), ("SIGHUP", SIGHUP)):
        add(f"signal-eval-{sname}", slow_eval, group="signals", mode="signal", signals=(None, 1.5, (sig,), 0))


def _short(v) -> str:
    s = v.decode("latin1") if isinstance(v, bytes) else str(v)
    s = s.replace(I, "$IN/").replace(R, "$ROOT/")
    s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= 40 else f"{s[:30]}...({len(s)} chars)"


# ============================================================================ running and judging
_HASHES: dict[tuple, str] = {}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (hidden ones too, symlinks not followed) -> (type, mode, content hash)."""
    out: dict[str, tuple] = {}

    def walk(d: str, rel: str) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            r = rel + e.name
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", os.readlink(e.path))
            elif stat.S_ISDIR(st.st_mode):
                out[r + "/"] = ("dir", stat.S_IMODE(st.st_mode))
                walk(e.path, r + "/")
            elif stat.S_ISREG(st.st_mode):
                key = (e.path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                h = _HASHES.get(key)
                if h is None:
                    if st.st_size > (64 << 20):  # a sparse 2 GiB file: size and times (it is never rewritten in place)
                        h = f"size={st.st_size}"
                    else:
                        with open(e.path, "rb") as f:
                            h = hashlib.sha256(f.read()).hexdigest()
                    _HASHES[key] = h
                out[r] = ("file", stat.S_IMODE(st.st_mode), h)
            else:
                out[r] = ("other", stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))

    walk(str(root), "")
    return out


def _noise(text: str) -> bool:
    return any(n in text for n in NOISE)


def _strict_json(text: str):
    def bad(c):
        raise ValueError(f"bare {c} in JSON")
    return json.loads(text, parse_constant=bad)


def _class_count(model_path: Path) -> int | None:
    md = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    try:
        if md.get("onnxmod.kind") in ("composed", "source") and "onnxmod.classes" in md:
            return len(json.loads(md["onnxmod.classes"]))
    except ValueError:
        return None
    return None


WRITERS = {"compose": "file", "replace": "file", "export": "file", "decompose": "dir", "export-triton": "repo"}


def validate_outputs(case: Case, cwd: Path, stdout: str) -> list[str]:
    """Problems with what a successful run wrote (empty: valid)."""
    problems = []
    argv = [a if isinstance(a, str) else "" for a in case.argv]
    cmd = argv[0] if argv else ""
    if "--help" in argv or "--version" in argv:
        return [] if stdout.strip() else ["exit 0 with nothing on stdout"]
    if "--json" in argv and case.mode == "normal" and case.stdout == "file":
        try:
            _strict_json(stdout)
        except ValueError as e:
            problems.append(f"--json stdout is not strict JSON: {e}")
    written = [cwd / o for o in case.outputs if os.path.lexists(cwd / o)]
    if cmd in WRITERS:
        if case.mode == "normal" and not written:
            problems.append("exit 0 but none of the expected outputs was written")
    elif case.mode == "normal" and case.stdout == "file" and not stdout.strip():
        problems.append("exit 0 with nothing on stdout")
    for p in written:
        if p.is_symlink():
            continue  # written through a link: the target is an input (checked) or outside (watched)
        files = [p] if not p.is_dir() else sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink())
        for f in files:
            rel = f.relative_to(cwd)
            try:
                if f.suffix == ".onnx" or (f == p and WRITERS.get(cmd) == "file"):
                    onnx.checker.check_model(str(f), full_check=True)
                elif f.suffix == ".json":
                    _strict_json(f.read_text())
                elif f.name == "labels.txt":
                    text = f.read_text(encoding="utf-8")
                    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
                    if any(not ln or any(ord(ch) < 32 or ch in "\u2028\u2029\x7f\x85" for ch in ln) for ln in lines):
                        problems.append(f"{rel}: an empty line or a control character")
                    model = f.parent / "1" / "model.onnx"
                    k = _class_count(model) if model.exists() else None
                    if k is not None and k != len(lines):
                        problems.append(f"{rel}: {len(lines)} lines for {k} classes")
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                problems.append(f"{rel}: invalid ({type(e).__name__}: {str(e)[:200]})")
    return problems


def _wait_trigger(proc, cwd: Path, err_path: Path, trigger, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if trigger is None:
            return True
        if trigger == ".tmp":
            try:
                if any(n.startswith(".") and ".tmp" in n for n in os.listdir(cwd)):
                    return True
            except OSError:
                pass
        else:
            try:
                if any(trigger in ln and ln.endswith("started") for ln in err_path.read_text(errors="replace").splitlines()):
                    return True
            except OSError:
                pass
        time.sleep(0.002)
    return False


def run_case(ctx: Ctx, case: Case, idx: int) -> dict:
    cwd = ctx.work / f"{idx:03d}"
    tmpdir = ctx.logs / f"{idx:03d}.tmpdir"
    tmpdir.mkdir()
    out_path, err_path = ctx.logs / f"{idx:03d}.out", ctx.logs / f"{idx:03d}.err"
    notes: list[str] = []
    if case.setup:
        case.setup(ctx, cwd)
    argv = [ctx.sub(a) for a in case.argv]
    inp_before, cwd_before = snapshot(ctx.inp), snapshot(cwd)
    markers_before = set(os.listdir(ctx.markers))
    env = dict(ctx.env, TMPDIR=str(tmpdir))
    env.update(case.env)
    mem, fsize = ctx.mem, case.fsize

    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)

    rfd = None
    with open(err_path, "wb") as ferr, open(out_path, "wb") as fout:
        if case.stdout == "closed":
            rfd, wfd = os.pipe()
            os.close(rfd)
            stdout_target = wfd
        elif case.stdout == "full":
            stdout_target = open("/dev/full", "wb")
        else:
            stdout_target = fout
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "onnxmod.cli.main", *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=stdout_target, stderr=ferr, env=env, preexec_fn=preexec, start_new_session=True)
        if case.stdout == "closed":
            os.close(stdout_target)
        elif case.stdout == "full":
            stdout_target.close()
        deadline = t0 + case.timeout
        started = False
        try:
            if case.mode == "serve":
                while time.monotonic() < deadline and proc.poll() is None:
                    if out_path.stat().st_size and out_path.read_text(errors="replace").strip().startswith("{"):
                        started = True
                        break
                    time.sleep(0.05)
                if started:
                    time.sleep(0.2)
                    proc.send_signal(signal.SIGTERM)
            elif case.mode == "signal":
                trigger, delay, sigs, gap = case.signals
                if _wait_trigger(proc, cwd, err_path, trigger, deadline):
                    time.sleep(delay)
                    for k, s in enumerate(sigs):
                        if proc.poll() is None:
                            proc.send_signal(s)
                            started = True
                        if k + 1 < len(sigs):
                            time.sleep(gap)
                if not started:
                    notes.append("the command ended before the signal was sent")
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
        secs = time.monotonic() - t0
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")

    kinds: list[str] = []
    if _noise(stdout) or _noise(stderr):
        kinds.append("traceback")
    lines = [ln for ln in stderr.strip().splitlines()
             if not STAGE_LINE.fullmatch(ln) and not ln.startswith("onnxmod: warning:")]
    one_line = len(lines) == 1 and lines[0].startswith("onnxmod: error: ")
    if rc is None:
        kinds.append("timeout")
    elif case.mode == "signal" and started:
        if rc == 130:
            if not one_line:
                kinds.append("error_lines")
        elif rc != 0:
            kinds.append("bad_exit")
    elif case.mode == "serve" and started:
        if rc not in (0, 130):
            kinds.append("bad_exit")
    elif case.stdout == "closed":  # the reader went away (`| head`): a quiet end, no traceback
        if rc not in (0, 1, 2, 141):
            kinds.append("bad_exit")
        elif rc == 2 and not one_line:
            kinds.append("error_lines")
    elif case.stdout == "full":
        if rc not in (0, 2):
            kinds.append("bad_exit")
        elif rc == 2 and not one_line:
            kinds.append("error_lines")
    elif rc == 2:
        if not one_line:
            kinds.append("error_lines")
    elif rc != 0:
        kinds.append("bad_exit")
    success = rc == 0 or (rc == 130 and case.mode == "signal")

    # inputs and the user's files
    inp_after, cwd_after = snapshot(ctx.inp), snapshot(cwd)
    changed_inp = sorted(k for k in inp_before if inp_after.get(k) != inp_before[k])
    added_inp = sorted(k for k in inp_after if k not in inp_before)
    # stdout on /dev/full: the report is printed after the output is in place, so exit 2 ("No space left on device")
    # may come with a complete output (validated below like a successful run's); a half-written one still fails
    full_after_write = case.stdout == "full" and rc == 2 and "No space left on device" in stderr
    allowed = set(case.outputs) if rc == 0 or full_after_write else set()

    def top(k: str) -> str:
        return k.split("/", 1)[0]

    changed_cwd = sorted(k for k in cwd_before if cwd_after.get(k) != cwd_before[k] and top(k) not in allowed)
    added_cwd = sorted(k for k in cwd_after if k not in cwd_before and top(k) not in allowed)
    temps = sorted(k for k in cwd_after if k not in cwd_before and TEMP_NAME.match(k.rstrip("/").rsplit("/", 1)[-1]))
    left_tmp = sorted(set(os.listdir(tmpdir)) - ctx.tmp_baseline)
    problems = []
    if changed_inp or changed_cwd:
        kinds.append("modified_input")
        problems.append("changed: " + ", ".join((["$IN/" + k for k in changed_inp] + changed_cwd)[:5]))
    if added_inp or added_cwd or temps or left_tmp:
        kinds.append("leftover")
        problems.append("left: " + ", ".join((["$IN/" + k for k in added_inp] + added_cwd + temps
                                             + ["$TMPDIR/" + n for n in left_tmp])[:5]))
    root_extra = sorted(set(os.listdir(ctx.root)) - {"inp", "work", "logs", "markers"})
    root_extra += sorted("work/" + n for n in os.listdir(ctx.work) if not re.fullmatch(r"\d{3}", n))
    if root_extra:
        kinds.append("leftover")
        problems.append("outside its dir: " + ", ".join(root_extra[:5]))
        for n in root_extra:
            p = ctx.root / n
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    new_markers = sorted(set(os.listdir(ctx.markers)) - markers_before)
    if new_markers:
        kinds.append("code_ran")
        problems.append("payload ran: " + ", ".join(new_markers))
    if full_after_write and any((cwd / o).exists() for o in case.outputs):
        bad = [b for b in validate_outputs(case, cwd, "") if "stdout" not in b and "JSON" not in b]
        if bad:
            kinds.append("invalid_output")
            problems.extend(bad)
    if success and rc == 0:
        bad = validate_outputs(case, cwd, stdout)
        if bad:
            kinds.append("invalid_output")
            problems.extend(bad)
        if case.must_refuse and case.mode == "normal":
            kinds.append("accepted")
            problems.append("exit 0 where the contract requires a refusal")
    kinds = sorted(set(kinds))
    first = next((ln for ln in stderr.splitlines() if ln.strip() and not STAGE_LINE.fullmatch(ln)), "")
    row = {"id": case.id, "group": case.group, "argv": " ".join(_short(a) for a in case.argv), "exit": rc,
           "verdict": "pass" if not kinds else "fail", "kinds": kinds, "stderr_first": first[:400],
           "seconds": round(secs, 2)}
    if case.mode != "normal":
        row["mode"] = case.mode
    if notes:
        row["notes"] = notes
    if kinds:
        row["problems"] = problems
        row["stderr_tail"] = stderr.strip().splitlines()[-8:]
    # clean up the case dir (read-only dirs included) so the disk stays small
    _rmtree(cwd)
    shutil.rmtree(tmpdir, ignore_errors=True)
    cwd.mkdir()  # keep the work/ listing stable
    return row


def _rmtree(path: Path) -> None:
    """Remove a tree, read-only dirs included (symbolic links are never followed)."""
    for dp, dns, _ in os.walk(path):
        for dn in dns:
            q = os.path.join(dp, dn)
            if not os.path.islink(q):
                try:
                    os.chmod(q, 0o755)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


SMOKE = [  # ids (prefixes) of the --smoke cases: one or two of each group, all quick refusals
    "meta-module-class_index-", "meta-composed-classes-", "meta-source_classes_newline-",
    "graph-self_loop-info", "ext-sparse_2g-info", "ext-escape-info", "npz-y_object_evil-eval", "npz-header_lie_1tb-eval",
    "cifar-evil-builtins_open-eval", "cifar-evil-getattr_import-eval", "img-under_bomb_9000-predict",
    "folder-fifo-eval", "flag-decompose--target-macs=", "text-export-triton--name=..", "out-compose-existing-user-file",
    "out-export-triton-root", "out-compose-chardev-force", "members-dir-escape-manifest", "misc-unknown-command",
    "text-replace--class=1e400", "export-weights-legacy-os_system_p2",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="about 20 quick cases")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    ap.add_argument("--only", help="run the cases whose id matches this regular expression")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (signal cases always alone)")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="RLIMIT_AS of each case")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (inputs, logs)")
    ap.add_argument("--list", action="store_true", help="build the inputs, list the cases, run nothing")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="onnxmod-attack-"))
    ctx = Ctx(root, args.mem_gb)
    try:
        build_inputs(ctx)
        CASES.clear()
        define_cases(ctx)
        ids = [c.id for c in CASES]
        dup = {i for i in ids if ids.count(i) > 1}
        assert not dup, f"duplicate case ids: {sorted(dup)[:5]}"
        cases = CASES
        if args.smoke:
            cases = [c for c in CASES if any(c.id.startswith(s) for s in SMOKE)]
            seen: set[str] = set()
            picked = []
            for s in SMOKE:  # one case per smoke prefix
                c = next((c for c in cases if c.id.startswith(s) and c.id not in seen), None)
                if c:
                    seen.add(c.id)
                    picked.append(c)
            cases = picked
        if args.only:
            cases = [c for c in cases if re.search(args.only, c.id)]
        if args.list:
            groups: dict[str, int] = {}
            for c in cases:
                print(f"{c.group:14s} {c.id}")
                groups[c.group] = groups.get(c.group, 0) + 1
            print(f"attack: {len(cases)} cases {groups}")
            return 0
        for k in range(len(cases)):
            (ctx.work / f"{k:03d}").mkdir()
        t_built = time.monotonic()
        print(f"attack: {len(cases)} cases (inputs built in {t_built - t_start:.1f} s in {root})", flush=True)
        rows: list[dict | None] = [None] * len(cases)
        lock = threading.Lock()
        done = [0]

        def one(k: int) -> None:
            row = run_case(ctx, cases[k], k)
            rows[k] = row
            with lock:
                done[0] += 1
                if row["verdict"] != "pass":
                    print(f"  FAIL {row['id']}: exit {row['exit']} {row['kinds']} {row.get('problems', '')} | "
                          f"{(row.get('stderr_tail') or [''])[-1][:200]}", flush=True)
                elif args.verbose:
                    print(f"  ok   {row['id']}: exit {row['exit']} {row['stderr_first'][:120]}", flush=True)
                if done[0] % 50 == 0:
                    print(f"  ... {done[0]}/{len(cases)} ({time.monotonic() - t_built:.0f} s)", flush=True)

        parallel = [k for k, c in enumerate(cases) if c.mode != "signal"]
        serial = [k for k, c in enumerate(cases) if c.mode == "signal"]
        with ThreadPoolExecutor(max(1, min(args.jobs, 2))) as pool:
            list(pool.map(one, parallel))
        for k in serial:
            one(k)
        rows_done = [r for r in rows if r is not None]
        failed = [r for r in rows_done if r["verdict"] != "pass"]
        by_kind: dict[str, int] = {}
        for r in failed:
            for kk in r["kinds"]:
                by_kind[kk] = by_kind.get(kk, 0) + 1
        by_group: dict[str, dict] = {}
        exits: dict[str, int] = {}
        for r in rows_done:
            g = by_group.setdefault(r["group"], {"cases": 0, "failed": 0})
            g["cases"] += 1
            g["failed"] += r["verdict"] != "pass"
            exits[str(r["exit"])] = exits.get(str(r["exit"]), 0) + 1
        leftover_markers = sorted(set(os.listdir(ctx.markers)) - {".keep"})
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
        summary = {
            "cases": len(rows_done), "passed": len(rows_done) - len(failed), "failed": len(failed),
            "failed_by_kind": dict(sorted(by_kind.items())), "exit_codes": dict(sorted(exits.items())),
            "by_group": by_group, "markers": leftover_markers, "smoke": args.smoke, "only": args.only,
            "mem_limit_gb": args.mem_gb, "jobs": args.jobs, "runtime_s": round(time.monotonic() - t_start, 1),
            "commit": commit, "python": sys.version.split()[0], "uid": os.getuid(),
            "ignored_in_tmpdir": sorted(ctx.tmp_baseline),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**summary, "rows": rows_done}, indent=1, ensure_ascii=True) + "\n")
        print(f"attack: {summary['cases']} cases, {summary['passed']} passed, {summary['failed']} failed "
              f"{summary['failed_by_kind'] or ''}; exit codes {summary['exit_codes']}; {summary['runtime_s']} s")
        for g, v in by_group.items():
            print(f"  {g:16s} {v['cases']:4d} cases  {v['failed']:3d} failed")
        if os.getuid() == 0:
            print("  (run as root: read-only directories do not stop writes, so those cases only check the result)")
        print(f"attack: wrote {args.out}")
        return 1 if failed or leftover_markers else 0
    finally:
        if args.keep:
            print(f"attack: kept {root}")
        else:
            _rmtree(root)


if __name__ == "__main__":
    sys.exit(main())
