"""Fuzzing the bad-input contract (issue 24): tampered metadata and numbers from flags.

Hypothesis mutates each ``onnxmod.*`` metadata key of a source, a module and a composed model
(wrong type, NaN, huge, missing, unicode, nested deep inside a record or inside a composed model's
member metadata) and runs a command on the file in-process; and it feeds every numeric flag of every
command odd numbers. The contract in each case: exit 0, or exit 2 with exactly one ``onnxmod: error:``
line and nothing left behind; never a traceback; inputs unchanged. Values that break the schema must
end in exit 2 naming the key. Examples are derandomized (the same on every run, CI included) and few,
so the file runs in seconds; a failure prints the falsifying example (and a blob to reproduce it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from onnxmod import modelio
from onnxmod.cli.common import FiniteFloat
from onnxmod.cli.main import main
from onnxmod.compose import compose
from onnxmod.data import write_npz
from onnxmod.decompose import DecomposeSettings, decompose

SAMPLES = Path(__file__).resolve().parent.parent / "sample_graphs"
# ONNXMOD_FUZZ_EXAMPLES=500 ONNXMOD_FUZZ_RANDOM=1: a longer, new hunt by hand (CI: 25 derandomized examples)
FUZZ = settings(max_examples=int(os.environ.get("ONNXMOD_FUZZ_EXAMPLES", 25)),
                derandomize=not os.environ.get("ONNXMOD_FUZZ_RANDOM"), deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> Path:
    """A source (the sample ResNet8), its cat and dog modules, them composed, 30 labelled images, one PNG."""
    d = tmp_path_factory.mktemp("fuzz_inputs")
    shutil.copy(SAMPLES / "resnet8_cifar10.onnx", d / "source.onnx")
    z = np.load(SAMPLES / "cifar10_calib.npz")
    pick = np.concatenate([np.flatnonzero(z["y"] == k)[:3] for k in range(10)])
    write_npz(d / "data.npz", z["x"][pick], z["y"][pick], [str(c) for c in z["classes"]])
    decompose(d / "source.onnx", SAMPLES / "cifar10_calib.npz", d / "mods", classes=["cat", "dog"],
              settings=DecomposeSettings(samples_per_class=10, refit_images=0, repair=False), quiet=True, device="cpu")
    shutil.copy(d / "mods" / "module_003_cat.onnx", d / "module.onnx")
    shutil.copy(d / "mods" / "module_005_dog.onnx", d / "dog.onnx")
    shutil.rmtree(d / "mods")
    modelio.save_model(compose([d / "module.onnx", d / "dog.onnx"]), d / "composed.onnx")
    from PIL import Image

    Image.fromarray(z["x"][0]).save(d / "image.png")
    return d


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh empty current directory for one example (hypothesis reuses the test's fixtures)."""
    old = os.getcwd()
    d = Path(tempfile.mkdtemp(prefix="onnxmod_fuzz_"))
    os.chdir(d)
    try:
        yield d
    finally:
        os.chdir(old)
        shutil.rmtree(d, ignore_errors=True)


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_contract(code: int, out: str, err: str, cwd: Path, must_fail: str | None) -> None:
    """Exit 0, or exit 2 with one error line and nothing written; ``must_fail``: exit 2 naming this."""
    assert "Traceback" not in err, err
    if must_fail is not None:
        assert code == 2, f"expected a refusal naming {must_fail!r}, got exit {code}: {err}"
    assert code in (0, 2), err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxmod: error: "), err
        assert out == "" and list(cwd.iterdir()) == [], "a refused command left something behind"
        if must_fail is not None:
            assert must_fail in lines[0], lines[0]


# --------------------------------------------------------------------------- metadata mutations
BAD_JSON = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "[" * 3000 + "]" * 3000, '"x"', "42",
            "-1", "null", "true", "[]", "{}", '"a\\nb"', '"\\u2028"', '"\\ud800"', '""', "[1, [2, [3]]]", '"' + "x" * 300 + '"',
            '{"name": 1}', '[{"name": null}]', "{not json"]
BAD_LEAVES: list[Any] = [float("nan"), float("inf"), -1, 0, 10 ** 30, 1e300, "", "a\nb", "tab\there", "\u2028", "日本語 🐱",
                         None, True, [], {}, [[[]]], {"deep": {"er": [1, {"x": "y"}]}}, "1e400", "NaN", "x" * 300, 2.5]
RAW_KEYS = {modelio.KIND, modelio.CLASS_NAME, modelio.FORMAT_VERSION}  # plain strings, not JSON
BAD_RAW = ["", "weird", "cat\ndog", "\u2028", "x" * 300, "2", "module ", "日本語", "\x00"]


def _nodes(v: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every value inside a JSON value (the value itself first)."""
    out = [path]
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        out.extend(_nodes(x, path + (k,)))
    return out


def _replace(v: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    v = json.loads(json.dumps(v))  # a copy
    parent = v
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = new
    return v


@st.composite
def mutation(draw, model: onnx.ModelProto) -> tuple[str, str | None, str]:
    """(key, new raw value or None for removed, how) for one onnxmod.* key of ``model``."""
    meta = {p.key: p.value for p in model.metadata_props if p.key.startswith("onnxmod.")}
    key = draw(st.sampled_from(sorted(meta)))
    raw = meta[key]
    how = draw(st.sampled_from(["missing", "whole", "nested"] if key not in RAW_KEYS else ["missing", "whole"]))
    if how == "missing":
        return key, None, how
    if key in RAW_KEYS:
        return key, draw(st.one_of(st.sampled_from(BAD_RAW), st.text(max_size=12))), how
    if how == "whole":
        return key, draw(st.one_of(st.sampled_from(BAD_JSON), st.text(max_size=12))), how
    value = json.loads(raw)
    if key == "onnxmod.members" and draw(st.booleans()):  # one key of a member's own module metadata
        j = draw(st.integers(0, len(value) - 1))
        inner = draw(st.sampled_from(sorted(value[j]["metadata"])))
        new = draw(st.sampled_from(BAD_RAW if inner in RAW_KEYS else BAD_JSON))
        return key, json.dumps(_replace(value, (j, "metadata", inner), new)), "member"
    path = draw(st.sampled_from(_nodes(value)))
    return key, json.dumps(_replace(value, path, draw(st.sampled_from(BAD_LEAVES)))), how


def _retagged(model: onnx.ModelProto, key: str, raw: str | None) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kept = [p for p in m.metadata_props if p.key != key]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    if raw is not None:
        m.metadata_props.add(key=key, value=raw)
    return m


# what each kind of file is given to: (name, argv builder (tampered file, inputs dir))
Argv = Callable[[Path, Path], list]
COMMON: list[tuple[str, Argv]] = [
    ("info", lambda f, i: ["info", f, "--json"]),
    ("eval", lambda f, i: ["eval", f, "--data", i / "data.npz", "-q", "--device", "cpu"]),
    ("predict", lambda f, i: ["predict", f, i / "image.png", "-q", "--device", "cpu"]),
    ("export-triton", lambda f, i: ["export-triton", f, "-o", "repo", "-q"]),
]
COMMANDS: dict[str, list[tuple[str, Argv]]] = {
    "source": COMMON + [("decompose", lambda f, i: ["decompose", f, "--calib", i / "data.npz", "-o", "out.modules",
                                                     "--classes", "cat", "--samples-per-class", "3", "--refit-images",
                                                     "0", "--no-repair", "-q", "--device", "cpu"])],
    "module": COMMON + [("compose", lambda f, i: ["compose", f, i / "dog.onnx", "-o", "c.onnx", "-q"]),
                        ("replace", lambda f, i: ["replace", i / "composed.onnx", "--class", "cat", "--with", f,
                                                  "-o", "r.onnx", "-q"])],
    "composed": COMMON + [("replace", lambda f, i: ["replace", f, "--class", "cat", "--with", i / "module.onnx",
                                                    "-o", "r.onnx", "-q"])],
}


def _schema_breaking(key: str, raw: str | None, model: onnx.ModelProto) -> bool:
    """Values the schema must refuse whatever the command: non-finite, too deep, not JSON, a broken name,
    wrong at the top, a key a module or composed model cannot lack."""
    kind = modelio.model_kind(model)
    if raw is None:
        return key in {"module": (modelio.CLASS_NAME, modelio.CLASS_INDEX, modelio.SOURCE, modelio.CALIBRATION),
                       "composed": (modelio.CLASSES,)}.get(kind, ())
    if key in RAW_KEYS:
        return key == modelio.KIND and raw not in modelio.KINDS or key == modelio.FORMAT_VERSION and raw != "1" or \
            key == modelio.CLASS_NAME and modelio.class_name_problem(raw) is not None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return True
    leaves = [value]
    while leaves:
        v = leaves.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return True
        leaves.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
    expected = {modelio.CLASS_INDEX: int, modelio.CLASSES: list, modelio.FRONTEND: list, "onnxmod.members": list}
    return not isinstance(value, expected.get(key, dict)) or isinstance(value, bool)


@pytest.mark.parametrize("kind", ["source", "module", "composed"])
def test_tampered_metadata(kind: str, inp: Path, capsys):
    base = modelio.load_model(inp / {"source": "source.onnx", "module": "module.onnx", "composed": "composed.onnx"}[kind])
    before = snapshot(inp)

    @FUZZ
    @given(data=st.data())
    def check(data):
        key, raw, how = data.draw(mutation(base), label="mutation")
        name, argv = data.draw(st.sampled_from(COMMANDS[kind]), label="command")
        note(f"{kind} {key} {how} -> {raw if raw is None else raw[:80]!r}; {name}")
        tampered = inp / f"tampered_{kind}.onnx"
        onnx.save(_retagged(base, key, raw), str(tampered))
        sha = hashlib.sha256(tampered.read_bytes()).hexdigest()
        must = key if _schema_breaking(key, raw, base) else None
        with workdir() as cwd:
            code, out, err = run_cli(capsys, argv(tampered, inp))
            assert_contract(code, out, err, cwd, must)
        assert hashlib.sha256(tampered.read_bytes()).hexdigest() == sha  # the input is never modified
        tampered.unlink()

    check()
    assert snapshot(inp) == before


# --------------------------------------------------------------------------- numbers from flags
def numeric_options() -> list[tuple[str, click.Option]]:
    from onnxmod.cli.main import _register, cli

    _register()
    return [(name, p) for name, cmd in sorted(cli.commands.items()) for p in cmd.params
            if isinstance(p, click.Option) and isinstance(p.type, (click.types.FloatParamType, click.types.IntParamType))]


# counts clipped to what exists (images evaluated, probabilities shown): no upper bound needed
UNBOUNDED = {("eval", "--limit"), ("predict", "--top")}


def test_every_numeric_flag_is_finite_and_bounded():
    opts = numeric_options()
    assert len(opts) >= 20
    for cmd, p in opts:
        if isinstance(p.type, click.types.FloatParamType):
            assert isinstance(p.type, FiniteFloat), f"{cmd} {p.opts[0]}: a float flag must be a FiniteFloat"
        assert isinstance(p.type, click.IntRange | click.FloatRange), f"{cmd} {p.opts[0]} has no range"
        assert p.type.min is not None and (p.type.max is not None or (cmd, p.opts[0]) in UNBOUNDED), \
            f"{cmd} {p.opts[0]}: unbounded"


# the command line a flag is tried on: its model file is missing, so a valid value ends in "no such file"
MISSING = {"decompose": ["nope.onnx", "--calib", "nope.npz"], "eval": ["nope.onnx", "--data", "nope.npz"],
           "predict": ["nope.onnx", "x.png"], "serve": ["nope.onnx"], "export-triton": ["nope.onnx", "-o", "repo"]}


def _admitted(text: str, t: click.ParamType) -> bool:
    """What the flag's declared type must admit: a number of its kind, finite, within its bounds."""
    try:
        v = int(text) if isinstance(t, click.types.IntParamType) else float(text)
    except ValueError:
        return False
    lo_ok = t.min is None or (v > t.min if t.min_open else v >= t.min)
    hi_ok = t.max is None or (v < t.max if t.max_open else v <= t.max)
    return math.isfinite(v) and lo_ok and hi_ok


NUMBERS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "", "abc", "1_000", " 5", "0x10",
                     "\u00b2", "\u0663", "5.0", "-0", "0", "1", "-1", "1e12", str(2 ** 70), "2.5e-320"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-2 ** 70, 2 ** 70).map(str),
)


@FUZZ
@given(data=st.data())
def test_numeric_flags(data, capsys):
    cmd, p = data.draw(st.sampled_from(numeric_options()), label="flag")
    value = data.draw(NUMBERS, label="value")
    if cmd not in MISSING:
        pytest.skip(f"{cmd} has no numeric flag to try")  # a new command: add its MISSING line
    with workdir() as cwd:
        code, out, err = run_cli(capsys, [cmd, *MISSING[cmd], p.opts[0], value])
        expect = "nope.onnx: no such file" if _admitted(value, p.type) else f"'{p.opts[0]}'"
        assert_contract(code, out, err, cwd, expect)
