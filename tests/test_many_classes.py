"""Many classes: a source with hundreds of outputs decomposed for a few of them costs in
proportion to those (calibration images, per-class statistics, module runs), and streams
batches whose memory is bounded. The timing and peak-RSS bars are in bench/ (manyclasses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine_oracles import run
from graphgen import random_cnn
from onnxmod import calibrate, channels, runtime
from onnxmod.cost import count_macs
from onnxmod.data import open_dataset, write_npz
from onnxmod.decompose import (OTHERS_PER_WANTED, DecomposeSettings, calibration_indices, decompose, module_outputs,
                               prepare_source)
from onnxmod.select import Selector, prunable_groups

K = 300
WANTED = [0, 1, 2]
PER_WANTED, PER_OTHER = 10, 2


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("many")
    onnx.save(random_cnn(3, num_classes=K), d / "source.onnx")
    y = np.r_[np.repeat(WANTED, PER_WANTED), np.repeat(np.arange(len(WANTED), K), PER_OTHER)]
    x = np.random.default_rng(0).integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
    write_npz(d / "data.npz", x, y, [f"k{i}" for i in range(K)])
    return d


def _old_draw(labels: np.ndarray, label_map: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """calibration_indices before --classes bounded the others (the all-class draw must not change)."""
    rng = np.random.default_rng(seed)
    mapped = label_map[labels]
    idx = [rng.permutation(np.nonzero(mapped == k)[0])[:per_class] for k in range(int(label_map.max()) + 1)]
    return np.sort(np.concatenate(idx))


def test_calibration_draw_is_the_wanted_images_plus_a_bounded_sample(many):
    ds = open_dataset(many / "data.npz")
    label_map = np.arange(K)
    for per_class in (1000, 1, 7):
        everything = calibration_indices(ds, label_map, per_class, 0)
        np.testing.assert_array_equal(everything, _old_draw(ds.labels, label_map, per_class, 0))
        np.testing.assert_array_equal(calibration_indices(ds, label_map, per_class, 0, list(range(K))), everything)
    idx = calibration_indices(ds, label_map, 1000, 0, WANTED)
    mine = np.isin(ds.labels[idx], WANTED)
    assert mine.sum() == len(WANTED) * PER_WANTED  # every image of the wanted classes
    assert (~mine).sum() == OTHERS_PER_WANTED * mine.sum() < (K - len(WANTED)) * PER_OTHER
    assert set(idx[~mine]) <= set(calibration_indices(ds, label_map, 1000, 0))
    np.testing.assert_array_equal(idx, calibration_indices(ds, label_map, 1000, 0, WANTED))  # fixed seed


def test_per_class_statistics_of_a_few_classes_equal_those_of_all(many):
    src = prepare_source(many / "source.onnx", data_classes=[f"k{i}" for i in range(K)])
    analysis = channels.analyze(src.model, canonical=True)
    ds = open_dataset(many / "data.npz")
    idx = calibration_indices(ds, np.arange(K), 1000, 0, WANTED)
    groups = prunable_groups(analysis, "uniform")
    full = calibrate.collect_stats(analysis, ds, np.arange(K), idx, (8, 8), "cpu", 64, True, 64, groups)
    few = calibrate.collect_stats(analysis, ds, np.arange(K), idx, (8, 8), "cpu", 64, True, 64, groups, WANTED)
    assert few.classes == WANTED and full.classes == list(range(K))
    for t in full.var:
        c = full.mean_all[t].size
        assert few.mean[t].shape == few.var[t].shape == (len(WANTED), c)
        assert full.var[t].shape == (K, c) and full.cov[t].shape == (c, c)  # never K x C x C
        np.testing.assert_allclose(few.mean[t], full.mean[t][WANTED], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(few.var[t], full.var[t][WANTED], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(few.cov[t], full.cov[t])
    np.testing.assert_array_equal(few.count, full.count[WANTED])
    a, b = Selector(analysis, full), Selector(analysis, few)
    for k in WANTED:
        for gid, v in a.importance(k).items():
            np.testing.assert_allclose(b.importance(k)[gid], v, rtol=1e-12, atol=1e-15)


def test_decompose_a_few_classes_of_many(many, tmp_path):
    settings = DecomposeSettings(repair=False, target_macs=1.0)
    man = decompose(many / "source.onnx", many / "data.npz", tmp_path / "all", classes=["k0", "k1", "k2"],
                    settings=settings, quiet=True, device="cpu")
    wanted_images = len(WANTED) * PER_WANTED
    assert man["settings"]["calibration_images"] == wanted_images * (1 + OTHERS_PER_WANTED)
    # keep-all modules reproduce their rows of the source's logits
    src = prepare_source(many / "source.onnx", data_classes=[f"k{i}" for i in range(K)])
    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    (logits,) = run(src.model, x)
    for entry in man["modules"]:
        module = onnx.load(tmp_path / "all" / entry["file"])
        at = [o.name for o in module.graph.output].index("logit")
        np.testing.assert_allclose(run(module, x)[at][:, 0], logits[:, entry["class_index"]], atol=1e-4)


def test_modules_run_together_equal_the_modules_run_one_by_one(many, tmp_path):
    settings = DecomposeSettings(repair=False, target_macs=0.5)
    man = decompose(many / "source.onnx", many / "data.npz", tmp_path / "m", classes=["k0", "k1", "k2"],
                    settings=settings, quiet=True, device="cpu")
    modules = [onnx.load(tmp_path / "m" / e["file"]) for e in man["modules"]]
    x = np.random.default_rng(2).random((70, 3, 8, 8), dtype=np.float32)
    together = module_outputs(modules, [["logit", "score"]] * len(modules), x, "cpu", batch_size=32)
    for module, (logit, score) in zip(modules, together):
        names = [o.name for o in module.graph.output]
        alone = run(module, x)
        np.testing.assert_allclose(logit, alone[names.index("logit")], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(score, alone[names.index("score")], rtol=1e-5, atol=1e-6)
    from onnxmod.compose import merged

    model, _ = merged(modules, [["logit"]] * len(modules))
    assert count_macs(model) < sum(count_macs(m) for m in modules)  # what they share runs once


def test_stream_batches_are_bounded_by_their_largest_activation():
    sample = onnx.load(Path(__file__).resolve().parent.parent / "sample_graphs" / "resnet8_cifar10.onnx")
    assert runtime.stream_batch_size(sample, 256) == 256  # CIFAR nets keep the requested batch
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 3, 3, 3], np.zeros(64 * 27, np.float32))
    g = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"], pads=[1, 1, 1, 1])], "big",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 224, 224])], [w])
    big = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    per_image = 4 * 64 * 224 * 224
    assert runtime.stream_batch_size(big, 256) == int(runtime.STREAM_MEMORY_BYTES // per_image) < 256
    assert runtime.stream_batch_size(big, 2) == 2
