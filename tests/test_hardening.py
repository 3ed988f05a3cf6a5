"""Issue 12 beyond the bad-input table: safe unpickling, one image path, --help, info in words, README snippet."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from onnxmod import runtime
from onnxmod.cli.main import _register, cli, main
from onnxmod.data import load_images, open_dataset
from onnxmod.errors import OnnxmodError

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
R8 = SAMPLES / "resnet8_cifar10.onnx"


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as ei:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return ei.value.code, out, err


# --------------------------------------------------------------------------- restricted unpickler
def _cifar10_dir(d: Path, batch: bytes) -> Path:
    d.mkdir()
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2))
    (d / "test_batch").write_bytes(batch)
    return d


def _batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3 * 4 * 4), dtype=np.uint8), b"labels": [0, 1, 0][:n]}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_protocol_load(tmp_path, protocol):
    b = _batch()
    ds = open_dataset(_cifar10_dir(tmp_path / "c", pickle.dumps(b, protocol=protocol)), "test")
    x, y = next(ds.iter_batches())
    np.testing.assert_array_equal((x * 255).round().astype(np.uint8).reshape(3, -1), b[b"data"])
    assert y.tolist() == [0, 1, 0]


def test_cifar_batch_written_by_numpy_1_loads(tmp_path):
    """Old pickles (the official CIFAR files) name numpy.core.multiarray, which numpy 2 calls numpy._core."""
    raw = pickle.dumps(_batch(), protocol=2)
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    ds = open_dataset(_cifar10_dir(tmp_path / "c", raw), "test")
    assert len(ds) == 3


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "object array", "eval"])
def test_crafted_cifar_batch_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        obj = {b"data": _Evil(marker), b"labels": [0]}
        expect = "posix.system"
    elif payload == "object array":
        obj = {b"data": np.array([_Evil(marker)], dtype=object), b"labels": [0]}
        expect = "dtype object"
    else:
        class _Eval:
            def __reduce__(self):
                return (eval, (f"open({str(marker)!r}, 'w')",))
        obj = {b"data": _Eval(), b"labels": [0]}
        expect = "eval"  # builtins.eval (__builtin__ in protocol 2)
    d = _cifar10_dir(tmp_path / "c", pickle.dumps(obj, protocol=2))
    with pytest.raises(OnnxmodError, match=f"test_batch: refused to unpickle: it asks for .*{re.escape(expect)}"):
        open_dataset(d, "test")
    assert not marker.exists()


@pytest.mark.shared
def test_real_cifar10_batches_load_with_the_restricted_unpickler(shared_data):
    for split, n in (("train", None), ("test", 10000)):
        ds = open_dataset(shared_data / "cifar10", split)
        assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.image_size == (32, 32)
        assert n is None or len(ds) == n


# --------------------------------------------------------------------------- one image path
def test_eval_and_predict_see_the_same_numbers_for_one_image(tmp_path, capsys):
    """A 45x37 RGBA image: eval's image-folder loader and predict give identical tensors and probabilities."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    img = folder / "cat" / "x.png"
    Image.fromarray(rng.integers(0, 256, (37, 45, 4), dtype=np.uint8), "RGBA").save(img)

    (x_eval, y), = list(open_dataset(folder).iter_batches(size=(32, 32)))
    x_pred = load_images([img], 3, (32, 32))
    np.testing.assert_array_equal(x_eval, x_pred)  # bit-identical, not merely close

    code, out, err = _cli(capsys, "predict", R8, img, "--json", "--top", "10", "--device", "cpu")
    assert code == 0, err
    probs = {t["class"]: t["prob"] for t in json.loads(out)["predictions"][0]["top"]}
    sess = runtime.make_session(R8, device="cpu")
    (logits,) = runtime.run(sess, x_eval)
    z = logits[0].astype(np.float64) - logits[0].max()
    ref = np.exp(z) / np.exp(z).sum()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    np.testing.assert_allclose([probs[n] for n in names], ref, rtol=1e-6)
    code, out, err = _cli(capsys, "eval", R8, "--data", folder, "--json", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert json.loads(out)["top1"] == float(names[int(np.argmax(ref))] == "cat")


# --------------------------------------------------------------------------- --help and info
def _commands():
    _register()
    return sorted(cli.commands.items())


def test_every_command_help_has_an_example_and_every_default():
    from click.testing import CliRunner

    for name, cmd in _commands():
        text = CliRunner().invoke(cli, [name, "--help"]).output
        assert "Example" in text and f"onnxmod {name} " in text, name
        # every option that takes a value (or is an on/off pair) says its default; plain flags are off
        # unless given, required options have none
        with_default = [o for o in cmd.params if o.param_type_name == "option" and not o.required
                        and not (o.is_flag and not o.secondary_opts)]
        for opt in with_default:
            assert opt.default is not None or isinstance(opt.show_default, str), (name, opt.name)
        assert text.count("[default:") == len(with_default), (name, text)


def test_info_speaks_words_and_macs(tmp_path, capsys):
    from onnxmod.decompose import DecomposeSettings, decompose

    decompose(R8, SAMPLES / "cifar10_calib.npz", tmp_path / "m", classes=["cat"],
              settings=DecomposeSettings(samples_per_class=5, refit_images=0, repair=False), quiet=True, device="cpu")
    code, out, err = _cli(capsys, "info", tmp_path / "m" / "module_003_cat.onnx")
    assert code == 0, err
    assert "MACs" in out and "FLOP" not in out
    assert "{'" not in out and "': " not in out  # no Python dict repr
    assert re.search(r"kept +\d+\.\d% of the source's params, \d+\.\d% of its MACs", out), out
    assert re.search(r"score +sigmoid\(", out), out


# --------------------------------------------------------------------------- README serving snippet
def _serving_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("**Plain onnxruntime**"):]  # the in-process snippet of "## Serving"
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_serving_snippet_runs_silently(tmp_path, capsys):
    """On this machine (no CUDA libraries or no GPU) the snippet must print nothing on stderr."""
    code, _, err = _cli(capsys, "decompose", R8, "--calib", SAMPLES / "cifar10_calib.npz", "-o", tmp_path / "m",
                        "--classes", "cat,dog", "--samples-per-class", "5", "--refit-images", "0", "--no-repair",
                        "--quiet")
    assert code == 0, err
    code, _, err = _cli(capsys, "compose", tmp_path / "m", "-o", tmp_path / "fixed.onnx", "--quiet")
    assert code == 0, err
    r = subprocess.run([sys.executable, "-c", _serving_snippet()], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert re.match(r"\[('(cat|dog)', ){3}'(cat|dog)'\] \[", r.stdout), r.stdout


def test_providers_helper_picks_cuda_only_where_it_loads(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(runtime, "_cuda_loads_cache", True)
    # CUDA in full fp32 with cuDNN's heuristic algorithm choice, as onnxmod's own sessions (make_session)
    cuda = (runtime.CUDA, {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"})
    assert runtime.providers("auto") == runtime.providers("cuda") == [cuda, runtime.CPU]
    seen = []
    fake = SimpleNamespace(get_providers=lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(ort, "InferenceSession", lambda payload, so, providers: seen.append(providers) or fake)
    runtime.make_session(runtime._tiny_model(), device="auto")
    assert seen == [[cuda, runtime.CPU]]
    monkeypatch.setattr(runtime, "_cuda_loads_cache", False)
    assert runtime.providers("auto") == [runtime.CPU]
    assert runtime.providers("cpu") == [runtime.CPU]


# --------------------------------------------------------------------------- settings validation (API, not only the CLI)
@pytest.mark.parametrize("knob, value, expect", [
    ("channel_multiple", 0, "--channel-multiple"),
    ("shared_depth", 5.0, "--shared-depth"),
    ("shared_depth", float("nan"), "--shared-depth"),
    ("depth_slope", 2.0, "--depth-slope"),
    ("target_macs", float("nan"), "--target-macs"),
    ("batch_size", 0, "--batch-size"),
    ("seed", -1, "--seed"),
])
def test_decompose_settings_reject_nonsense(knob, value, expect):
    from onnxmod.decompose import DecomposeSettings

    s = DecomposeSettings()
    s.validate()
    setattr(s, knob, value)
    with pytest.raises(OnnxmodError, match=re.escape(expect)):
        s.validate()
