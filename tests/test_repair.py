"""Repair by distillation (onnxmod.repair): the graphs keep their structure, shared layers stay
byte-identical, the modules get closer to the source, and decompose wires it in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from engine_oracles import run
from onnxmod import channels, decompose as dec, repair, surgery
from onnxmod.compose import compose, compose_info
from onnxmod.data import open_dataset
from onnxmod.decompose import DecomposeSettings, decompose, prepare_source
from onnxmod.errors import OnnxmodError

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_graphs" / "resnet8_cifar10.onnx"
CALIB = REPO / "sample_graphs" / "cifar10_calib.npz"
TEST = REPO / "sample_graphs" / "cifar10_test.npz"
CLASSES = [2, 3, 5]  # bird, cat, dog


def _images(path: Path, n: int) -> np.ndarray:
    return next(open_dataset(path).iter_batches(n))[0]


def _random_prune(model: onnx.ModelProto, frac: float, seed: int) -> list[onnx.ModelProto]:
    """Single-logit modules for CLASSES: the same random half of every prunable group (shared
    layers) except the deepest group, which each class prunes its own way."""
    a = channels.analyze(model, canonical=True)
    rng = np.random.default_rng(seed)
    groups = [g for g in a.groups if g.removable and not g.is_output and len(g.producers) == 1]
    shared = {g.id: rng.permutation(g.size)[: max(1, int(g.size * frac))] for g in groups}
    out = []
    for k in CLASSES:
        keep = a.full_keep()
        keep[a.output_group().id][:] = False
        keep[a.output_group().id][k] = True
        for j, g in enumerate(groups):
            idx = shared[g.id] if j < len(groups) - 1 else rng.permutation(g.size)[: max(1, int(g.size * frac))]
            keep[g.id][:] = False
            keep[g.id][idx] = True
        out.append(surgery.remove_channels(a, a.close(keep), {}))
    return out


@pytest.fixture(scope="module")
def repaired():
    src = prepare_source(SAMPLE)
    before = _random_prune(src.model, 0.5, seed=0)
    x = _images(CALIB, 600)
    settings = repair.RepairSettings(epochs=1, min_steps=60, batch_size=64, lr=1e-3, seed=0)
    after, report = repair.repair(before, src.model, CLASSES, x, settings, device="cpu", quiet=True)
    return src, before, after, report


def test_structure_names_and_metadata_unchanged(repaired):
    _, before, after, _ = repaired
    for b, a in zip(before, after):
        assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
        assert [i.SerializeToString() for i in a.graph.input] == [i.SerializeToString() for i in b.graph.input]
        assert [o.SerializeToString() for o in a.graph.output] == [o.SerializeToString() for o in b.graph.output]
        assert [(i.name, tuple(i.dims), i.data_type) for i in a.graph.initializer] == \
               [(i.name, tuple(i.dims), i.data_type) for i in b.graph.initializer]
        assert list(a.metadata_props) == list(b.metadata_props)
        onnx.checker.check_model(a, full_check=True)
        changed = [i.name for i, j in zip(a.graph.initializer, b.graph.initializer)
                   if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))]
        assert changed, "repair trained nothing"


def test_shared_layers_stay_byte_identical(repaired):
    """Convs whose computation was identical in every module before repair are still identical after."""
    from onnxmod.graphio import computation_digests

    _, before, after, _ = repaired
    digests = [computation_digests(m) for m in before]

    def conv_weights(before_m: onnx.ModelProto, after_m: onnx.ModelProto, d: dict) -> dict[str, list]:
        inits = {i.name: numpy_helper.to_array(i) for i in after_m.graph.initializer}
        return {d[n.output[0]]: [inits[i] for i in n.input if i in inits]
                for n in after_m.graph.node if n.op_type == "Conv"}

    per_module = [conv_weights(b, a, d) for b, a, d in zip(before, after, digests)]
    common = set.intersection(*(set(w) for w in per_module))
    assert len(common) >= 3  # the shared trunk's Convs
    for key in common:
        for w in per_module[1:]:
            assert all(np.array_equal(x, y) for x, y in zip(w[key], per_module[0][key]))
    # the trunk did train (it is not simply frozen)
    trunk_before = conv_weights(before[0], before[0], digests[0])
    assert any(not np.array_equal(trunk_before[k][0], per_module[0][k][0]) for k in common)


def test_repair_brings_modules_closer_to_the_source(repaired):
    """Held-out images: the modules' logits move towards the source's (mean squared error)."""
    src, before, after, report = repaired
    x = _images(TEST, 300)
    want = run(src.model, x)[0][:, CLASSES]
    err_before = np.mean([(run(m, x)[0][:, 0] - want[:, j]) ** 2 for j, m in enumerate(before)])
    err_after = np.mean([(run(m, x)[0][:, 0] - want[:, j]) ** 2 for j, m in enumerate(after)])
    assert report["loss_last"] < report["loss_first"]
    # measured 0.15x-0.3x on this sample; half is a loose bound that any real repair meets
    assert err_after < 0.5 * err_before


def test_torch_and_onnxruntime_agree_on_repaired_modules(repaired):
    from onnxmod import torchgraph

    _, _, after, _ = repaired
    x = _images(TEST, 16)
    for m in after:
        np.testing.assert_allclose(torchgraph.run_numpy(m, x)[0], run(m, x)[0], atol=1e-4)


def test_unsupported_op_is_named_before_training():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Hardmax", ["input"], ["logit"], name="head")], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
                          [helper.make_tensor_value_info("logit", TensorProto.FLOAT, [None, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(OnnxmodError, match="Hardmax.*'head'.*--no-repair"):
        repair.repair([m], m, [0], np.zeros((4, 3), np.float32),
                      repair.RepairSettings(epochs=1, min_steps=1, batch_size=4, lr=1e-3), "cpu", True)


# --------------------------------------------------------------------------- through decompose
def test_decompose_repairs_and_fits_platt_on_the_modules_own_logit(tmp_path, monkeypatch):
    """The score calibration is fitted on what the (repaired) module outputs, not the source's logit:
    each fit's logits are the written module's own `logit` on images the modules were run on."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real_fit, real_outputs = dec.scoring.fit_platt, dec.module_outputs
    images: list[np.ndarray] = []

    def spy_outputs(smalls, names, x, *a, **k):
        images.append(x)
        return real_outputs(smalls, names, x, *a, **k)

    def spy_fit(logit, positive, *a, **k):
        seen.append((np.asarray(logit), np.asarray(positive)))
        return real_fit(logit, positive, *a, **k)

    monkeypatch.setattr(dec, "module_outputs", spy_outputs)
    monkeypatch.setattr(dec.scoring, "fit_platt", spy_fit)
    settings = DecomposeSettings(samples_per_class=30, repair_epochs=2, repair_min_steps=20)
    man = decompose(SAMPLE, CALIB, tmp_path / "m", classes=["cat", "dog"], settings=settings, quiet=True,
                    device="cpu")
    assert man["repair"]["steps"] >= 20 and man["timings"]["repair_s"] > 0
    assert len(seen) == 2 and len(images) == 1  # both modules in one run
    source_logits = run(onnx.load(SAMPLE), images[0])[0]
    for entry, (logit, positive) in zip(man["modules"], seen):
        model = onnx.load(tmp_path / "m" / entry["file"])
        at = [o.name for o in model.graph.output].index("logit")
        own = run(model, images[0])[at][:, 0]  # the module's `logit` on every image of the run
        assert positive.sum() > 0 and (~positive).sum() > 0
        gap = np.abs(logit[:, None] - own[None, :]).min(axis=1)  # each fitted logit is one of the module's
        assert gap.max() < 1e-5
        assert np.abs(logit[:, None] - source_logits[:, entry["class_index"]][None, :]).min(axis=1).max() > 1e-3
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["onnxmod.kept"])["repaired"] is True
        cal = json.loads(meta["onnxmod.calibration"])
        a, b, _, _ = real_fit(logit, positive)
        assert (cal["a"], cal["b"]) == pytest.approx((a, b))


def test_default_repair_batch_follows_the_torch_device(monkeypatch):
    from onnxmod import repair

    assert repair.default_batch_size("cpu") == 128
    monkeypatch.setattr(repair.torch.cuda, "is_available", lambda: True)
    assert repair.default_batch_size("auto") == 256 and repair.default_batch_size("cpu") == 128


def test_no_repair_keeps_the_training_free_path(tmp_path):
    settings = DecomposeSettings(samples_per_class=20, repair=False)
    man = decompose(SAMPLE, CALIB, tmp_path / "m", classes=["cat"], settings=settings, quiet=True, device="cpu")
    assert man["repair"] is None and man["timings"]["repair_s"] == 0
    assert man["modules"][0]["refit"]["refit"] is True  # the class-row re-fit of the training-free path


def test_repair_recipe_reaches_the_distillation_and_unknown_fields_are_refused(tmp_path):
    """DecomposeSettings.repair_recipe (held-out sweeps of the recipe) sets the other RepairSettings fields; the
    report records them; a misspelt or schedule field is refused before any image is read."""
    settings = DecomposeSettings(samples_per_class=10, repair_epochs=1, repair_min_steps=2,
                                 repair_recipe={"temperature": 2.0, "mse_weight": 3.0})
    man = decompose(SAMPLE, CALIB, tmp_path / "m", classes=["cat"], settings=settings, quiet=True, device="cpu")
    assert (man["repair"]["temperature"], man["repair"]["mse_weight"]) == (2.0, 3.0)
    assert man["settings"]["repair_recipe"] == {"temperature": 2.0, "mse_weight": 3.0}
    for bad in ({"temprature": 2.0}, {"epochs": 3}):
        with pytest.raises(OnnxmodError, match=f"unknown field.*{next(iter(bad))}.*known: .*mse_weight"):
            decompose(SAMPLE, tmp_path / "no-such-data", tmp_path / "n", settings=DecomposeSettings(repair_recipe=bad))


def test_cli_flags(tmp_path, capsys):
    from onnxmod.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(tmp_path / "m"), "--classes", "cat,dog",
              "--samples-per-class", "20", "--repair-epochs", "0.5", "--shared-depth", "1", "--repair-batch-size", "32",
              "--json", "-q"])
    assert e.value.code == 0
    man = json.loads(capsys.readouterr().out)
    assert man["settings"]["repair_epochs"] == 0.5 and man["settings"]["repair"] is True
    assert man["repair"]["epochs"] > 0.5  # a sub-task: the same steps as over every image, on its own classes' ones
    assert man["repair"]["batch_size"] == 32
    # --shared-depth 1 + repair: the modules still compose into one trunk
    info = compose_info(compose([tmp_path / "m"]))
    assert info["macs"] < max(m["macs"] for m in man["modules"]) * 1.01
    with pytest.raises(SystemExit) as e:
        main(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(tmp_path / "n"), "--repair-epochs", "0"])
    assert e.value.code == 2 and "--repair-epochs" in capsys.readouterr().err


def test_out_of_memory_names_the_flag(tmp_path, monkeypatch, capsys):
    from onnxmod import repair
    from onnxmod.cli.main import main

    def no_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(repair.JointModules, "forward", no_memory)
    with pytest.raises(SystemExit) as e:
        main(["decompose", str(SAMPLE), "--calib", str(CALIB), "-o", str(tmp_path / "m"), "--classes", "cat",
              "--samples-per-class", "20", "--repair-batch-size", "16", "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "out of CPU memory at 16 images per step" in err and "--repair-batch-size" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()  # nothing half-written


# --------------------------------------------------------------------------- streaming, schedule, BatchNorm
def test_streaming_trains_on_exactly_the_images_asked_for():
    """Repair reads its images through RepairImages: every position 0..N-1 is read, each once per pass, and
    nothing else (a counting loader stands for the dataset)."""
    src = prepare_source(SAMPLE)
    modules = _random_prune(src.model, 0.5, seed=1)
    x = _images(CALIB, 90)
    reads: list[np.ndarray] = []

    def load(positions: np.ndarray) -> np.ndarray:
        reads.append(np.asarray(positions).copy())
        return x[positions]

    settings = repair.RepairSettings(epochs=2, min_steps=1, batch_size=32, lr=1e-3, augment=False)
    _, report = repair.repair(modules, src.model, CLASSES, repair.RepairImages(len(x), load), settings, "cpu", True)
    seen = np.concatenate(reads)
    assert report["images"] == 90 and report["steps"] == 2 * 3  # 3 batches (32, 32, 26) a pass
    assert np.array_equal(np.bincount(seen, minlength=90), np.full(90, 2))
    assert all(len(r) <= 32 for r in reads)


def test_prefetch_raises_the_readers_error_and_stops():
    def failing():
        yield 1
        raise OSError("disk gone")

    it = repair.prefetched(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    # a consumer that stops early leaves no blocked producer behind
    endless = repair.prefetched(iter(range(10**9)), depth=2)
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()


@pytest.mark.parametrize("count, steps", [(200, 40), (600, 100), (20000, 785)])
def test_minimum_steps_never_ask_for_more_than_twenty_passes(count, steps):
    """200 images at 128 a step: the 200-step minimum would be 128 passes; it is capped at 20 passes
    (2 steps a pass); big sets follow the epochs (5 x 157 steps)."""
    settings = repair.RepairSettings(epochs=5, min_steps=200, batch_size=128, lr=1e-3)
    assert repair.step_plan(count, settings) == (128, steps)
    assert repair.step_plan(10, settings)[0] == 10  # never a batch larger than the images


def test_batchnorm_reparameterisation_starts_and_ends_as_the_module(repaired):
    """The training-only BatchNorms: eval mode computes what each module did (atol 1e-5), and folding them
    back gives the same graphs (nodes, initializer names and shapes) computing the same outputs."""
    from onnxmod.torchgraph import ConvNorm

    src, before, _, _ = repaired
    x = torch.from_numpy(_images(TEST, 64))
    joint = repair.JointModules(before, norm_convs=True)
    from onnxmod.graphio import computation_digests

    convs = {computation_digests(m)[n.output[0]] for m in before for n in m.graph.node if n.op_type == "Conv"}
    assert set(joint.store.norms) == convs  # one per distinct Conv: the shared ones once
    with torch.no_grad():
        plain = repair.JointModules(before).eval()(x)
        joint.record_norms([x[:32], x[32:]], identity=True)
        assert all(isinstance(n, ConvNorm) for n in joint.store.norms.values())
        np.testing.assert_allclose(joint.eval()(x), plain, atol=1e-5)
        joint.store.fold_norms()
        np.testing.assert_allclose(joint(x), plain, atol=1e-5)
    for b, a in zip(before, joint.to_onnx()):
        assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
        assert [(i.name, tuple(i.dims)) for i in a.graph.initializer] == [(i.name, tuple(i.dims)) for i in b.graph.initializer]
        np.testing.assert_allclose(run(a, x.numpy())[0], run(b, x.numpy())[0], atol=1e-5)


def test_repair_with_batchnorm_trains_and_writes_the_same_structure(repaired):
    src, before, _, _ = repaired
    x = _images(CALIB, 300)
    settings = repair.RepairSettings(epochs=1, min_steps=30, batch_size=64, lr=1e-3, batchnorm=True)
    after, report = repair.repair(before, src.model, CLASSES, x, settings, "cpu", True)
    assert report["batchnorm"] is True
    held = _images(TEST, 200)
    want = run(src.model, held)[0][:, CLASSES]
    for j, (b, a) in enumerate(zip(before, after)):
        assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
        onnx.checker.check_model(a, full_check=True)
    err = lambda ms: np.mean([(run(m, held)[0][:, 0] - want[:, j]) ** 2 for j, m in enumerate(ms)])  # noqa: E731
    assert err(after) < err(before)  # folded back, the trained modules are closer to the source


def test_a_labelled_subtask_adds_its_cross_entropy(tmp_path):
    """--classes on labelled data: repair gets each image's column among the wanted classes (the other classes'
    images, which repair sees with subtask_repair_images 'all': none), and with label_weight > 0 trains on their
    cross-entropy too; all classes: no labels."""
    recipe: dict = {}  # the default recipe adds it
    assert repair.RepairSettings.__dataclass_fields__["label_weight"].default == 1.0
    settings = DecomposeSettings(samples_per_class=20, repair_epochs=1, repair_min_steps=4, repair_recipe=recipe,
                                 subtask_repair_images="all")
    man = decompose(SAMPLE, CALIB, tmp_path / "m", classes=["cat", "dog"], settings=settings, quiet=True,
                    device="cpu")
    rep = man["repair"]
    assert rep["label_weight"] == 1.0 and rep["labelled_images"] == 40  # 20 cat + 20 dog, not the others
    assert rep["images"] > 40
    everything = decompose(SAMPLE, CALIB, tmp_path / "all", settings=DecomposeSettings(
        samples_per_class=4, repair_epochs=1, repair_min_steps=2, repair_recipe=recipe), quiet=True, device="cpu")
    assert everything["repair"]["labelled_images"] == 0  # not a sub-task: pure distillation
    labelled = decompose(SAMPLE, CALIB, tmp_path / "labelled", settings=DecomposeSettings(
        samples_per_class=4, repair_epochs=1, repair_min_steps=2, repair_labels="all"), quiet=True, device="cpu")
    assert labelled["repair"]["labelled_images"] == labelled["repair"]["images"] > 0  # every image, its own column
    with pytest.raises(OnnxmodError, match="repair_labels"):
        DecomposeSettings(repair_labels="some").validate()


def test_labels_reach_the_loss():
    src = prepare_source(SAMPLE)
    modules = _random_prune(src.model, 0.5, seed=2)
    x = _images(CALIB, 64)
    labels = np.tile([0, 1, 2, -1], 16)
    runs = {}
    for w in (0.0, 5.0):
        settings = repair.RepairSettings(epochs=1, min_steps=1, batch_size=64, lr=1e-3, augment=False, label_weight=w)
        _, runs[w] = repair.repair(modules, src.model, CLASSES, repair.RepairImages.of_array(x, labels), settings,
                                   "cpu", True)
    assert runs[0.0]["labelled_images"] == 0 and runs[5.0]["labelled_images"] == 48
    assert runs[5.0]["loss_first"] > runs[0.0]["loss_first"]  # the same first step, plus 5 x a cross-entropy > 0


def test_ema_writes_the_moving_average_of_the_weights():
    """One step with decay d writes d' x the starting weights + (1 - d') x the weights that step reached, where d' is
    the warmed-up decay of the first step: min(d, 2 / 11)."""
    src = prepare_source(SAMPLE)
    modules = _random_prune(src.model, 0.5, seed=3)
    x = _images(CALIB, 64)
    written = {}
    for decay in (0.0, 0.999):
        settings = repair.RepairSettings(epochs=1, min_steps=1, batch_size=64, lr=1e-2, augment=False, ema=decay)
        written[decay], report = repair.repair(modules, src.model, CLASSES, x, settings, "cpu", True)
        assert report["ema"] == decay
    first = 2 / 11
    for start, stepped, averaged in zip(modules, written[0.0], written[0.999]):
        w0, w1, wa = ({i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
                      for m in (start, stepped, averaged))
        assert any(not np.array_equal(w0[k], w1[k]) for k in w0)  # the step moved some weights
        for k in w0:
            np.testing.assert_allclose(wa[k], first * w0[k] + (1 - first) * w1[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("calib_labels", ["data", "source predictions"])
def test_a_subtask_can_repair_on_its_own_classes_images(tmp_path, calib_labels):
    """subtask_repair_images='wanted': repair trains on the wanted classes' calibration images only (labelled data:
    by label; unlabelled: the source's predictions, which label them) for as many steps as on every image ('all')."""
    calib = CALIB
    if calib_labels == "source predictions":
        calib = tmp_path / "unlabelled.npz"
        np.savez(calib, x=np.load(CALIB)["x"])  # the images without y
    runs = {}
    for which in ("all", "wanted"):
        settings = DecomposeSettings(samples_per_class=20, repair_epochs=1, repair_min_steps=1, repair_batch_size=8,
                                     subtask_repair_images=which)
        runs[which] = decompose(SAMPLE, calib, tmp_path / which, classes=["cat", "dog"], settings=settings,
                                quiet=True, device="cpu")
    assert runs["all"]["settings"]["calibration_labels"] == calib_labels
    wanted_images, all_images = runs["wanted"]["repair"]["images"], runs["all"]["repair"]["images"]
    assert 0 < wanted_images < all_images
    # the same steps (up to rounding each pass to whole batches), so more passes over fewer images
    assert runs["all"]["repair"]["steps"] == -(-all_images // 8)
    assert runs["wanted"]["repair"]["epochs"] == pytest.approx(all_images / wanted_images)
    assert abs(runs["wanted"]["repair"]["steps"] - runs["all"]["repair"]["steps"]) <= all_images / wanted_images
    if calib_labels == "data":
        assert wanted_images == 40  # 20 cat + 20 dog
    with pytest.raises(OnnxmodError, match="subtask_repair_images"):
        DecomposeSettings(subtask_repair_images="some").validate()


def test_one_class_repairs_on_every_image_as_all_classes_do(tmp_path):
    """--classes of one class is a donor for replace, which scores every image: its repair streams every calibration
    image (not only its own class's) and adds no cross-entropy (one logit has none), as a full decomposition does."""
    runs = {}
    for name, classes in (("one", ["cat"]), ("two", ["cat", "dog"])):
        settings = DecomposeSettings(samples_per_class=20, repair_epochs=1, repair_min_steps=1, repair_batch_size=8)
        runs[name] = decompose(SAMPLE, CALIB, tmp_path / name, classes=classes, settings=settings, quiet=True,
                               device="cpu")["repair"]
    assert runs["two"]["images"] == 40 and runs["two"]["labelled_images"] == 40  # the sub-task: its own images
    assert runs["one"]["labelled_images"] == 0 and runs["one"]["epochs"] == 1
    assert runs["one"]["images"] > 20  # cat's 20 and the others' sample
