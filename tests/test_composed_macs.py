"""decompose --composed-macs (a budget on the model composed from all modules written) and the default cap that
keeps many-class decompositions cheap to compose (issues 22, 23): the budget is met by the real composition."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxmod import budget, modelio, runtime
from onnxmod.cli.main import main
from onnxmod.compose import module_files
from onnxmod.cost import count_macs
from onnxmod.data import write_npz
from onnxmod.decompose import DecomposeSettings
from onnxmod.errors import OnnxmodError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_graphs"
R8, CALIB = SAMPLES / "resnet8_cifar10.onnx", SAMPLES / "cifar10_calib.npz"
FAST = ["--no-repair", "--samples-per-class", "20", "--quiet"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def _decompose(capsys, source: Path, calib: Path, out: Path, *flags: str) -> dict:
    code, stdout, err = _cli(capsys, "decompose", source, "--calib", calib, "-o", out, "--json", *FAST, *flags)
    assert code == 0, err
    return json.loads(stdout)


def _compose(capsys, modules: Path, out: Path) -> onnx.ModelProto:
    code, _, err = _cli(capsys, "compose", modules, "-o", out, "--quiet")
    assert code == 0, err
    return onnx.load(out)


@pytest.mark.parametrize("fraction", [0.5, 1.0, 1.5])
def test_composed_macs_is_met_by_the_composition(capsys, tmp_path, fraction):
    manifest = _decompose(capsys, R8, CALIB, tmp_path / "m", "--composed-macs", str(fraction))
    composed = _compose(capsys, tmp_path / "m", tmp_path / "c.onnx")
    achieved = count_macs(composed) / manifest["source"]["macs"]
    assert abs(achieved - fraction) <= budget.TOLERANCE
    comp = json.loads((tmp_path / "m" / "manifest.json").read_text())["composition"]
    assert comp == manifest["composition"]
    assert comp["budget"] == fraction and comp["cap"] is None
    assert comp["fraction"] == pytest.approx(achieved, abs=1e-9)
    assert comp["predicted_fraction"] == pytest.approx(achieved, abs=1e-9)  # the prediction is the composition
    assert manifest["settings"]["composed_macs"] == fraction


def test_ten_classes_at_default_flags_are_not_capped(capsys, tmp_path):
    manifest = _decompose(capsys, R8, CALIB, tmp_path / "m")
    comp = manifest["composition"]
    assert comp["cap"] is None and comp["budget"] is None and comp["note"] == ""
    assert comp["shared_depth"] == DecomposeSettings().shared_depth
    assert {m["target_macs"] for m in manifest["modules"]} == {DecomposeSettings().target_macs}
    composed = _compose(capsys, tmp_path / "m", tmp_path / "c.onnx")
    assert comp["fraction"] == pytest.approx(count_macs(composed) / manifest["source"]["macs"], abs=1e-9)


def test_composed_macs_with_target_macs_is_an_error(capsys, tmp_path):
    code, out, err = _cli(capsys, "decompose", R8, "--calib", CALIB, "-o", tmp_path / "m", *FAST,
                          "--composed-macs", "0.5", "--target-macs", "0.5")
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("onnxmod: error:") and "--target-macs" in err
    assert not (tmp_path / "m").exists()
    with pytest.raises(OnnxmodError, match="--class-target"):
        DecomposeSettings(composed_macs=0.5, class_targets={"cat": 0.6}).validate()


def test_unreachable_composed_macs_names_the_range(capsys, tmp_path):
    code, _, err = _cli(capsys, "decompose", R8, "--calib", CALIB, "-o", tmp_path / "m", *FAST,
                        "--composed-macs", "0.1")
    assert code == 2 and "Traceback" not in err and not (tmp_path / "m").exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("onnxmod:")]
    assert len(lines) == 1 and lines[0].startswith("onnxmod: error: --composed-macs 0.1")
    low, high = map(float, re.search(r"(\d+\.\d+)x to (\d+\.\d+)x", lines[0]).groups())
    assert 0.1 < low < high


def test_a_budget_below_whole_residual_streams_prunes_them(capsys, tmp_path):
    """Two of the sample ResNet8's modules with whole residual streams cannot compose within 0.03 of 0.2x (0.3
    they can); pruning the streams too meets 0.2, and the manifest says it did."""
    whole = _decompose(capsys, R8, CALIB, tmp_path / "w", "--classes", "cat,dog", "--composed-macs", "0.3")
    assert whole["composition"]["residual_streams_pruned"] is False
    manifest = _decompose(capsys, R8, CALIB, tmp_path / "m", "--classes", "cat,dog", "--composed-macs", "0.2")
    assert manifest["composition"]["residual_streams_pruned"] is True
    composed = _compose(capsys, tmp_path / "m", tmp_path / "c.onnx")
    onnx.checker.check_model(composed, full_check=True)
    assert abs(count_macs(composed) / manifest["source"]["macs"] - 0.2) <= budget.TOLERANCE
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    probs, = runtime.run(runtime.make_session(composed, device="cpu"), x, ["probs"])
    assert probs.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def hundred(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 100-class CIFAR ResNet (random weights, 16x16 inputs) and random labelled calibration images."""
    torch = pytest.importorskip("torch")
    from converters.export import export
    from converters.resnet_cifar import resnet_cifar

    d = tmp_path_factory.mktemp("c100")
    torch.manual_seed(0)
    net = resnet_cifar(8, num_classes=100, width=16)
    for m in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    names = [f"class{i:03d}" for i in range(100)]
    export(net, d / "c100.onnx", input_shape=(3, 16, 16), classes=names, mean=[0.5] * 3, std=[0.25] * 3)
    rng = np.random.default_rng(0)
    write_npz(d / "calib.npz", rng.integers(0, 256, (600, 16, 16, 3), dtype=np.uint8), np.arange(600) % 100, names)
    return d / "c100.onnx", d / "calib.npz"


def test_hundred_classes_compose_within_the_default_cap(capsys, tmp_path, hundred):
    source, calib = hundred
    code, stdout, err = _cli(capsys, "decompose", source, "--calib", calib, "-o", tmp_path / "m", "--json",
                             "--no-repair", "--samples-per-class", "6")
    assert code == 0, err
    manifest = json.loads(stdout)
    comp = manifest["composition"]
    assert len(manifest["modules"]) == 100 and comp["cap"] == budget.DEFAULT_CAP
    assert comp["uncapped_fraction"] > budget.DEFAULT_CAP  # the default sizes would have cost more
    # capped: one trunk of every layer at CAPPED_TARGET, so the composition costs about one module
    assert comp["shared_depth"] == 1.0 and comp["mean_target_macs"] == pytest.approx(budget.CAPPED_TARGET)
    assert comp["fraction"] == pytest.approx(manifest["modules"][0]["mac_fraction"], abs=0.01)
    notes = [ln for ln in err.splitlines() if ln.startswith("onnxmod: note:")]
    assert len(notes) == 1 and "capped at 2x" in notes[0]
    assert comp["note"] in notes[0]
    composed = _compose(capsys, tmp_path / "m", tmp_path / "c.onnx")
    onnx.checker.check_model(composed, full_check=True)
    achieved = count_macs(composed) / manifest["source"]["macs"]
    assert achieved <= budget.DEFAULT_CAP and comp["fraction"] == pytest.approx(achieved, abs=1e-9)

    # the oracle: the composed probabilities are the softmax of the modules' logits, each run on its own
    x = np.random.default_rng(1).random((8, 3, 16, 16), dtype=np.float32)
    probs, label = runtime.run(runtime.make_session(composed, device="cpu"), x, ["probs", "label"])
    files = module_files(tmp_path / "m")
    logits = np.concatenate([runtime.run(runtime.make_session(modelio.load_model(f), device="cpu"), x, ["logit"])[0]
                             for f in files], axis=1).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-5)
    assert (label == logits.argmax(axis=1)).all()


def test_the_default_cap_repairs_for_fewer_passes_unless_told(capsys, tmp_path, hundred):
    """Under the default cap (one trunk near the source) repair's defaults are CAPPED_REPAIR_EPOCHS passes and
    CAPPED_REPAIR_MIN_STEPS steps at least, not REPAIR_EPOCHS and REPAIR_MIN_STEPS; --repair-epochs still decides
    when given. The manifest's settings say which it ran."""
    from onnxmod.decompose import CAPPED_REPAIR_EPOCHS, CAPPED_REPAIR_MIN_STEPS, REPAIR_EPOCHS, REPAIR_MIN_STEPS

    assert CAPPED_REPAIR_EPOCHS < REPAIR_EPOCHS and CAPPED_REPAIR_MIN_STEPS < REPAIR_MIN_STEPS
    source, calib = hundred
    flags = ("--samples-per-class", "1", "--repair-batch-size", "10", "--quiet", "--json")  # 100 images: 10 steps a pass
    runs = {}
    for epochs in (None, "16"):
        code, stdout, err = _cli(capsys, "decompose", source, "--calib", calib, "-o", tmp_path / f"m{epochs}", *flags,
                                 *(("--repair-epochs", epochs) if epochs else ()))
        assert code == 0, err
        runs[epochs] = json.loads(stdout)
    default, told = runs[None], runs["16"]
    assert default["composition"]["cap"] == told["composition"]["cap"] == budget.DEFAULT_CAP
    assert default["settings"]["repair_epochs"] == default["repair"]["epochs"] == CAPPED_REPAIR_EPOCHS
    assert told["settings"]["repair_epochs"] == told["repair"]["epochs"] == 16.0
    assert told["repair"]["steps"] == 16 * 10 > CAPPED_REPAIR_MIN_STEPS
    # one pass is 10 steps: the capped minimum (under its 20-pass bound) sets the default's steps
    assert CAPPED_REPAIR_MIN_STEPS < 20 * 10
    assert default["settings"]["repair_min_steps"] == default["repair"]["steps"] == CAPPED_REPAIR_MIN_STEPS


def test_many_classes_calibrate_on_fewer_images_each_unless_told(capsys, tmp_path, hundred, monkeypatch):
    """--samples-per-class defaults to SAMPLES_PER_CLASS, fewer where the classes decomposed would make it more than
    CALIBRATION_IMAGES in all; given, it decides. The manifest says what the draw used."""
    from onnxmod.decompose import CALIBRATION_IMAGES, SAMPLES_PER_CLASS

    d = DecomposeSettings()
    assert d.calibration_per_class(10) == SAMPLES_PER_CLASS == CALIBRATION_IMAGES // 10  # CIFAR-10: as before
    assert d.calibration_per_class(100) == CALIBRATION_IMAGES // 100 < SAMPLES_PER_CLASS
    assert d.calibration_per_class(3) == SAMPLES_PER_CLASS  # a few classes of a 1000-class source
    assert d.calibration_per_class(10 * CALIBRATION_IMAGES) == 1
    assert DecomposeSettings(samples_per_class=7).calibration_per_class(100) == 7
    with pytest.raises(OnnxmodError, match="samples-per-class"):
        DecomposeSettings(samples_per_class=0).validate()
    source, calib = hundred  # 6 images a class: a total of 300 makes the rule draw 3 of each
    monkeypatch.setattr("onnxmod.decompose.CALIBRATION_IMAGES", 300)
    for told in (None, "5"):
        code, stdout, err = _cli(capsys, "decompose", source, "--calib", calib, "-o", tmp_path / f"m{told}", "--json",
                                 "--no-repair", *(("--samples-per-class", told) if told else ()))
        assert code == 0, err
        settings = json.loads(stdout)["settings"]
        per_class = 3 if told is None else 5
        assert settings["samples_per_class"] == per_class and settings["calibration_images"] == 100 * per_class


def test_target_macs_turns_the_cap_off(capsys, tmp_path, hundred):
    source, calib = hundred
    code, stdout, err = _cli(capsys, "decompose", source, "--calib", calib, "-o", tmp_path / "m", "--json",
                             "--no-repair", "--samples-per-class", "6", "--target-macs", "0.5")
    assert code == 0, err
    comp = json.loads(stdout)["composition"]
    assert comp["cap"] is None and comp["fraction"] > budget.DEFAULT_CAP and "onnxmod: note:" not in err
