"""bench/ helpers whose numbers the bench README reports: the restricted-source baseline and
the kept-channel overlap."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import kept_overlap, restricted_source, subset_view  # noqa: E402
from onnxmod import runtime  # noqa: E402
from onnxmod.data import open_dataset  # noqa: E402
from onnxmod.evaluate import evaluate_source  # noqa: E402
from onnxmod.modelio import check_model  # noqa: E402

SAMPLE = REPO / "sample_graphs"


def test_restricted_source_is_the_argmax_over_those_columns():
    source = onnx.load(str(SAMPLE / "resnet8_cifar10.onnx"))
    names = ["cat", "dog", "truck"]
    restricted = restricted_source(source, names)
    check_model(restricted, "restricted source")
    ds = open_dataset(SAMPLE / "cifar10_test.npz")
    x, y = next(ds.iter_batches(200, size=(32, 32)))
    full = runtime.run(runtime.make_session(source, device="cpu"), x)[0]
    cols = [ds.classes.index(n) for n in names]
    got = runtime.run(runtime.make_session(restricted, device="cpu"), x)[0]
    np.testing.assert_array_equal(got, full[:, cols])

    # scored by onnxmod.evaluate on those classes' images: the same top-1 as computed by hand
    idx = np.nonzero(np.isin(ds.labels, cols))[0]
    ev = evaluate_source(restricted, subset_view(ds, idx, "3 classes"), device="cpu", quiet=True)
    all_x = np.concatenate([b for b, _ in ds.iter_batches(256, size=(32, 32), indices=idx)])
    by_hand = np.mean(np.array(cols)[runtime.run(runtime.make_session(source, device="cpu"), all_x)[0][:, cols]
                                      .argmax(1)] == ds.labels[idx])
    assert ev["n"] == len(idx) and ev["skipped"] == 0
    assert ev["top1"] == pytest.approx(by_hand)


def _manifest(kept: list[dict[int, list[int]]], specific: list[int]) -> dict:
    return {"modules": [{"kept_channels": {str(g): ix for g, ix in k.items()}} for k in kept],
            "class_specific_groups": specific}


def test_kept_overlap_counts_only_pruned_class_specific_groups():
    sizes = {0: 4, 1: 4, 2: 4}
    # group 0 is shared (not class-specific); group 2 is class-specific but nobody prunes it
    same = _manifest([{0: [0, 1], 1: [0, 1], 2: [0, 1, 2, 3]}] * 3, [1, 2])
    r = kept_overlap(same, sizes)
    assert r["counted_groups"] == 1 and r["mean_jaccard"] == 1.0 and r["module_pairs"] == 3
    disjoint = _manifest([{1: [0, 1], 2: [0, 1, 2, 3]}, {1: [2, 3], 2: [0, 1, 2, 3]}], [1, 2])
    assert kept_overlap(disjoint, sizes)["mean_jaccard"] == 0.0
    half = _manifest([{1: [0, 1]}, {1: [1, 2]}], [1])
    assert kept_overlap(half, sizes)["mean_jaccard"] == pytest.approx(1 / 3)
    none = _manifest([{1: [0, 1, 2, 3]}, {1: [0, 1, 2, 3]}], [1])
    assert kept_overlap(none, sizes)["mean_jaccard"] is None
