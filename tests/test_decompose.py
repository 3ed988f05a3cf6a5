"""`onnxmod decompose`: modules, manifest, exactness at full keep, errors without partial output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_oracles import QUICK_REPAIR, run
from onnxmod import modelio
from onnxmod.cli.main import main
from onnxmod.data import open_dataset
from onnxmod.decompose import DecomposeSettings, decompose
from onnxmod.modulespec import ModuleSpec

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_graphs" / "resnet8_cifar10.onnx"
CALIB = REPO / "sample_graphs" / "cifar10_calib.npz"
TEST = REPO / "sample_graphs" / "cifar10_test.npz"


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _test_images(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    return next(open_dataset(TEST).iter_batches(n))


@pytest.fixture(scope="module")
def default_modules(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dec") / "r8.modules"
    manifest = decompose(SAMPLE, CALIB, out, settings=DecomposeSettings(samples_per_class=40, refit_images=200, **QUICK_REPAIR),
                         quiet=True)
    return out, manifest


def test_manifest_and_module_contract(default_modules):
    out, manifest = default_modules
    on_disk = json.loads((out / "manifest.json").read_text())
    assert set(on_disk) >= {"source", "modules", "settings", "timings"}
    assert set(on_disk["source"]) >= {"name", "sha256", "params", "macs", "classes"}
    assert set(on_disk["timings"]) >= {"calibration_s", "total_s"}
    assert on_disk["source"]["sha256"] == modelio.file_sha256(SAMPLE)
    assert len(on_disk["modules"]) == 10
    x, _ = _test_images(8)
    for entry in on_disk["modules"]:
        assert set(entry) >= {"file", "class_index", "class_name", "params", "macs", "param_fraction", "mac_fraction"}
        model = onnx.load(out / entry["file"])
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == ["input"]
        assert [o.name for o in model.graph.output] == ["score", "logit"]
        spec = ModuleSpec.from_model(model)
        assert spec.class_index == entry["class_index"] and spec.class_name == entry["class_name"]
        assert spec.source.sha256 == on_disk["source"]["sha256"]
        assert 0 < spec.kept["flop_fraction"] < 1 and spec.calibration.temperature > 0
        score, logit = run(model, x)
        assert score.shape == logit.shape == (8, 1)
        a, b = spec.calibration.a, spec.calibration.b
        np.testing.assert_allclose(score, 1 / (1 + np.exp(-(a * logit + b))), atol=1e-6)
    # default size target holds (granularity of channel rounding allows a little slack)
    assert np.mean([m["mac_fraction"] for m in on_disk["modules"]]) <= DecomposeSettings().target_macs + 0.02


def test_modules_are_physically_smaller(default_modules):
    out, manifest = default_modules
    src_bytes = SAMPLE.stat().st_size
    for entry in manifest["modules"]:
        assert entry["params"] < manifest["source"]["params"]
        assert (out / entry["file"]).stat().st_size < src_bytes


def test_keep_everything_reproduces_source_logit(tmp_path):
    out = tmp_path / "full"
    decompose(SAMPLE, CALIB, out, classes=["cat", "7"], quiet=True,
              settings=DecomposeSettings(target_macs=1.0, samples_per_class=10))
    files = sorted(p.name for p in out.glob("*.onnx"))
    assert files == ["module_003_cat.onnx", "module_007_horse.onnx"]
    x, _ = _test_images(64)
    ref = run(onnx.load(SAMPLE), x)[0]
    for f, k in zip(files, (3, 7)):
        logit = run(onnx.load(out / f), x)[1]
        np.testing.assert_allclose(logit[:, 0], ref[:, k], atol=1e-5, rtol=0)


def test_third_party_source_with_mean_std(tmp_path):
    """A source without metadata and without in-graph normalisation: --mean/--std bake it in."""
    m = onnx.load(SAMPLE)
    sub, div = m.graph.node[0], m.graph.node[1]
    assert (sub.op_type, div.op_type) == ("Sub", "Div")
    for n in m.graph.node[2:]:
        n.input[:] = ["raw" if i == div.output[0] else i for i in n.input]
    del m.graph.node[:2]
    m.graph.input[0].name = "raw"
    del m.metadata_props[:]
    third = tmp_path / "third_party.onnx"
    onnx.save(m, third)
    out = tmp_path / "tp.modules"
    code, stdout, _ = _cli(["decompose", str(third), "--calib", str(CALIB), "-o", str(out), "--classes", "ship",
                            "--samples-per-class", "10", "--target-macs", "1", "--json", "-q",
                            "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"], capsys=_Capsys.get())
    assert code == 0, stdout
    x, _ = _test_images(32)
    module = onnx.load(out / "module_008_ship.onnx")
    np.testing.assert_allclose(run(module, x)[1][:, 0], run(onnx.load(SAMPLE), x)[0][:, 8], atol=1e-4)
    assert json.loads(stdout)["source"]["classes"][8] == "ship"  # class names taken from the data


class _Capsys:
    """capsys for helpers called outside a test's signature (set by the autouse fixture)."""

    current = None

    @classmethod
    def get(cls):
        return cls.current


@pytest.fixture(autouse=True)
def _remember_capsys(capsys):
    _Capsys.current = capsys
    yield
    _Capsys.current = None


def _assert_clean_failure(code: int, err: str, out_dir: Path, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxmod: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out_dir.exists()
    assert not any(p.name.startswith(f".{out_dir.name}.") for p in out_dir.parent.iterdir()), "partial output left"


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"this is not a protobuf at all")
    out = tmp_path / "o"
    code, _, err = _cli(["decompose", str(bad), "--calib", str(CALIB), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "junk.onnx", "not an ONNX model")


def test_class_not_in_model(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _cli(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(out), "--classes", "unicorn"],
                        capsys)
    _assert_clean_failure(code, err, out, "unicorn")


def test_class_missing_from_data(tmp_path, capsys):
    ds = open_dataset(CALIB)
    x = np.stack([np.zeros((32, 32, 3), np.uint8)] * 4)
    npz = tmp_path / "two_classes.npz"
    np.savez(npz, x=x, y=np.array([0, 0, 1, 1]), classes=np.array(ds.classes[:2]))
    out = tmp_path / "o"
    code, _, err = _cli(["decompose", str(SAMPLE), "--calib", str(npz), "-o", str(out), "--classes", "ship"], capsys)
    _assert_clean_failure(code, err, out, "ship")


def test_unsupported_op_before_output(tmp_path, capsys):
    """An op the engine does not know between the classifier and the output: reported by name."""
    m = onnx.load(SAMPLE)
    last = m.graph.node[-1]
    out_name = last.output[0]
    last.output[0] = "pre_lrn"
    m.graph.node.append(onnx.helper.make_node("Hardmax", ["pre_lrn"], [out_name], name="weird_head", axis=1))
    src = tmp_path / "weird.onnx"
    onnx.save(m, src)
    out = tmp_path / "o"
    code, _, err = _cli(["decompose", str(src), "--calib", str(CALIB), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "Hardmax", "weird_head")


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _cli(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(out)], capsys)
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_input_file_is_not_modified(tmp_path, capsys):
    before = modelio.file_sha256(SAMPLE)
    code, _, _ = _cli(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(tmp_path / "m"), "-q",
                       "--classes", "0", "--samples-per-class", "5", "--refit-images", "0", "--no-repair"], capsys)
    assert code == 0
    assert modelio.file_sha256(SAMPLE) == before


@pytest.mark.shared
def test_resnet56_default_decomposition(shared_data, tmp_path):
    """The issue's acceptance run, at reduced calibration size: 10 modules, mean MACs <= 65%."""
    from onnxmod.converters import export, load_checkpoint, resnet_cifar

    net = resnet_cifar(56)
    load_checkpoint(net, shared_data / "pretrained" / "resnet56-cifar10jpeg.th")
    src = tmp_path / "r56.onnx"
    export(net, src, classes=open_dataset(shared_data / "cifar10").classes,
           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = tmp_path / "r56.modules"
    manifest = decompose(src, shared_data / "cifar10", out, quiet=True,
                         settings=DecomposeSettings(samples_per_class=50, refit_images=100, repair=False))
    assert len(manifest["modules"]) == 10
    assert np.mean([m["mac_fraction"] for m in manifest["modules"]]) <= 0.65
    x = next(open_dataset(shared_data / "cifar10").iter_batches(16))[0]
    for entry in manifest["modules"]:
        model = onnx.load(out / entry["file"])
        onnx.checker.check_model(model, full_check=True)
        assert run(model, x)[0].shape == (16, 1)


def test_shared_depth_one_shares_every_layer(tmp_path):
    """--shared-depth 1: every module keeps the same channels, so composing them costs one module."""
    from onnxmod.compose import compose, compose_info

    settings = DecomposeSettings(samples_per_class=30, refit_images=0, shared_depth=1.0, target_macs=0.6, **QUICK_REPAIR)
    man = decompose(SAMPLE, CALIB, tmp_path / "m", settings=settings, classes=["cat", "dog", "ship"], quiet=True)
    info = compose_info(compose([tmp_path / "m"]))
    one = max(m["macs"] for m in man["modules"])
    assert info["macs"] < one * 1.01 < info["module_macs_sum"]


@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_unlabelled_calibration_uses_the_sources_predictions(tmp_path, layout):
    """An npz without `y`, or a folder of images without class sub-folders, calibrates with the
    source's own predictions as labels; eval refuses such data."""
    from PIL import Image

    from onnxmod.compose import compose
    from onnxmod.evaluate import evaluate_source

    z = np.load(CALIB)
    x = z["x"][::3]  # 200 images
    if layout == "npz":
        data = tmp_path / "unlabelled.npz"
        np.savez(data, x=x)
    else:
        data = tmp_path / "photos"
        data.mkdir()
        for i, img in enumerate(x):
            Image.fromarray(img).save(data / f"{i:04d}.png")
    settings = DecomposeSettings(samples_per_class=20, repair_epochs=1, repair_min_steps=5)
    man = decompose(SAMPLE, data, tmp_path / "m", classes=["cat", "ship"], settings=settings, quiet=True, device="cpu")
    assert man["settings"]["calibration_labels"] == "source predictions"
    # the images it calibrated on are the source's predicted cats and ships, 20 of each at most
    src_pred = run(onnx.load(SAMPLE), x.transpose(0, 3, 1, 2).astype(np.float32) / 255)[0].argmax(axis=1)
    assert man["settings"]["calibration_images"] == sum(min(20, int((src_pred == k).sum())) for k in range(10))
    composed = compose([tmp_path / "m"])
    onnx.checker.check_model(composed, full_check=True)
    with pytest.raises(Exception, match="without labels"):
        evaluate_source(SAMPLE, data, quiet=True)


def test_per_class_targets(tmp_path, capsys):
    """--class-target gives one class a different MAC budget; the others keep --target-macs."""
    common = ["--calib", str(CALIB), "--classes", "cat,ship", "--samples-per-class", "20", "--no-repair",
              "--target-macs", "0.4", "--class-target", "cat=0.8", "--json"]
    code, out, err = _cli(["decompose", str(SAMPLE), "-o", str(tmp_path / "m"), "--shared-depth", "0", *common], capsys)
    assert code == 0 and "warning" not in err
    fracs = {m["class_name"]: m["mac_fraction"] for m in json.loads(out)["modules"]}
    assert fracs["cat"] == pytest.approx(0.8, abs=0.05) and fracs["ship"] == pytest.approx(0.4, abs=0.05)
    spec = ModuleSpec.from_model(onnx.load(tmp_path / "m" / "module_003_cat.onnx"))
    assert spec.kept["target_macs"] == 0.8
    # with shared layers (chosen at the mean target, 0.6) the bigger module can only grow its class-specific layers
    code, out, err = _cli(["decompose", str(SAMPLE), "-o", str(tmp_path / "s"), "--shared-depth", "0.75", *common],
                          capsys)
    cat = next(m for m in json.loads(out)["modules"] if m["class_name"] == "cat")
    assert code == 0 and cat["target_macs"] == 0.8 and cat["mac_fraction"] < 0.75
    assert f"module 'cat' has {cat['mac_fraction']:.2f}x the source's MACs, not its target 0.8" in err
    assert "--shared-depth 0.75" in err
    for bad, why in (("unicorn=0.5", "unicorn"), ("cat=1.5", "(0, 1]"), ("cat", "NAME=FRACTION")):
        code, _, err = _cli(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(tmp_path / "n"),
                             "--class-target", bad], capsys)
        assert code == 2 and why in err and not (tmp_path / "n").exists()


def test_modules_of_different_targets_still_share_the_early_layers(tmp_path):
    """--class-target with --shared-depth: the shared layers are chosen once (at the mean target), so modules of
    different budgets keep the same channels there and compose computes those layers once; each module's own
    budget is met in its class-specific layers."""
    from onnxmod.compose import compose, compose_info

    settings = DecomposeSettings(samples_per_class=30, refit_images=0, repair=False, shared_depth=0.6, target_macs=0.55,
                                 class_targets={"cat": 0.7, "ship": 0.4})
    man = decompose(SAMPLE, CALIB, tmp_path / "m", settings=settings, classes=["cat", "dog", "ship"], quiet=True)
    mods = {m["class_name"]: m for m in man["modules"]}
    assert mods["cat"]["mac_fraction"] > mods["dog"]["mac_fraction"] > mods["ship"]["mac_fraction"]
    for name, target in (("cat", 0.7), ("dog", 0.55), ("ship", 0.4)):
        assert mods[name]["mac_fraction"] == pytest.approx(target, abs=0.05)
    kept = [m["kept_channels"] for m in man["modules"]]
    same = [g for g in kept[0] if all(k[g] == kept[0][g] for k in kept)]
    differ = [g for g in kept[0] if g not in same]
    assert same and differ  # shared early groups, class-specific late ones
    info = compose_info(compose([tmp_path / "m"]))
    assert info["macs"] < info["module_macs_sum"] * 0.9  # the shared layers are computed once


def test_a_target_below_what_the_channels_allow_is_warned_about(tmp_path, capsys):
    """A module that cannot get within 0.05 of its target (here 5% of the source: every layer keeps at least
    one channel-multiple) is written anyway, and decompose says so on stderr; --quiet silences it."""
    common = ["decompose", str(SAMPLE), "--calib", str(CALIB), "--classes", "cat", "--samples-per-class", "20",
              "--no-repair", "--target-macs", "0.05", "--json"]
    code, out, err = _cli([*common, "-o", str(tmp_path / "m")], capsys)
    (cat,) = json.loads(out)["modules"]
    assert code == 0 and cat["mac_fraction"] > 0.1
    warnings = [line for line in err.splitlines() if line.startswith("onnxmod: ")]  # not the stage lines
    assert warnings == [(f"onnxmod: warning: module 'cat' has {cat['mac_fraction']:.2f}x the source's MACs, not its "
                           "target 0.05: the channel granularity allows no closer size")]
    code, _, err = _cli([*common, "-o", str(tmp_path / "q"), "-q"], capsys)
    assert code == 0 and err == ""


def test_stage_lines_off_a_terminal(tmp_path, capsys):
    """Off a terminal (capsys is not one) no bar shows, so each stage says when it starts and ends, with its
    time, and repair says how long it expects to take; --quiet says nothing."""
    from onnxmod.cli.main import main

    argv = ["decompose", str(SAMPLE), "--calib", str(CALIB), "--classes", "cat", "--samples-per-class", "20",
            "--repair-epochs", "1", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "-o", str(tmp_path / "a")])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 0
    for name in ("calibration statistics", "repair of 1 modules", "writing 1 modules"):
        start = next(i for i, line in enumerate(err) if line.startswith(name) and line.endswith(": started"))
        end = next(i for i, line in enumerate(err) if line.startswith(name) and ": done in " in line)
        assert start < end and re.fullmatch(r".+: done in [0-9]+\.[0-9] s", err[end])
    assert any(re.fullmatch(r"repair: \d+ steps of \d+ images over \d+ images, about .+ \(from the first \d+ steps\)",
                            line) for line in err), err
    with pytest.raises(SystemExit) as e:
        main([*argv, "-o", str(tmp_path / "b"), "-q"])
    assert e.value.code == 0 and capsys.readouterr().err == ""
