"""bench/ helpers whose numbers the bench README reports: the restricted-source baseline,
the kept-channel overlap and the paired difference of two models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import kept_overlap, paired, restricted_source, subset_view  # noqa: E402
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


def test_serve_http_client_processes_send_every_request_once(r8_composed):
    """bench/serve_http.py's load split over 2 client processes: every client's images sent exactly once, each
    answer checked against a direct onnxruntime run (a wrong label would count as an error)."""
    from bench.serve_http import _images_of, client_groups, load_test
    from onnxmod.serve.server import ServeSettings, load_models, serve_in_thread

    groups = client_groups(5, 2)
    assert groups == [[0, 2, 4], [1, 3]]
    x = np.arange(10, dtype=np.float32)
    gx, _, local = _images_of(x, x, [range(4, 6), range(0, 2)])
    assert [gx[r].tolist() for r in local] == [[4, 5], [0, 1]]

    ds = open_dataset(SAMPLE / "cifar10_test.npz")
    images = np.concatenate([b for b, _ in ds.iter_batches(64)])[:5 * 4 + 5 * 1]
    expect = runtime.run(runtime.make_session(r8_composed, device="cpu"), images, ["label"])[0]
    models = load_models([r8_composed], ["m"], device="cpu")
    with serve_in_thread(models, ServeSettings(port=0, device="cpu", max_batch=8, max_delay_ms=1)) as base:
        r = load_test(base.removeprefix("http://"), images, expect, clients=5, requests=4, timeout_s=60, warmup=1,
                      server_pid=os.getpid(), procs=2)
    assert r["client_processes"] == 2 and r["requests"] == r["completed"] == 20
    assert r["errors"] == 0 and r["unanswered"] == 0, r["error_examples"]
    assert r["throughput_rps"] > 0 and r["latency_ms"]["p50"] > 0


def test_evaluate_hits_are_the_per_image_top1():
    ds = open_dataset(SAMPLE / "cifar10_test.npz")
    r = evaluate_source(SAMPLE / "resnet8_cifar10.onnx", ds, device="cpu", quiet=True, hits=True, limit=300)
    assert r["hits"].dtype == bool and len(r["hits"]) == r["n"] == 300
    np.testing.assert_array_equal(r["indices"], np.arange(300))
    assert r["hits"].mean() == pytest.approx(r["top1"])
    assert "hits" not in evaluate_source(SAMPLE / "resnet8_cifar10.onnx", ds, device="cpu", quiet=True, limit=10)


def test_paired_difference_and_standard_error():
    def ev(name, hits, idx=None):
        hits = np.array(hits, dtype=bool)
        return {"model": name, "hits": hits, "indices": np.arange(len(hits)) if idx is None else np.array(idx)}

    a, b, c = ev("a", [1, 1, 0, 0]), ev("b", [1, 0, 1, 0]), ev("c", [0, 0, 0, 0])
    # per image a - b = [0, 1, -1, 0]: mean 0, sd sqrt(2/3), se sd / 2
    r = paired(a, b)
    assert r["delta_pt"] == 0 and r["se_pt"] == pytest.approx(100 * np.sqrt(2 / 3) / 2)
    assert r["discordant_images"] == 2 and r["images"] == 4
    # against the mean of two baselines: a - (b + c) / 2 = [0.5, 1, -0.5, 0]
    m = paired(a, b, c)
    assert m["delta_pt"] == pytest.approx(25.0) and m["se_pt"] == pytest.approx(100 * np.std([0.5, 1, -0.5, 0], ddof=1) / 2)
    assert paired(a, a) == {"delta_pt": 0.0, "se_pt": 0.0, "discordant_images": 0, "images": 4}
    with pytest.raises(ValueError, match="different images"):
        paired(a, ev("d", [1, 1, 0, 0], idx=[0, 1, 2, 5]))


def test_held_out_sweep_never_scores_on_calibration_images(tmp_path, capsys):
    """bench/sweep.py: calibration and held-out images partition the training data; each setting
    gets one JSON line scored on the held-out images against the source on the same images."""
    import json

    from bench import sweep

    data = SAMPLE / "cifar10_calib.npz"
    calib, held = sweep.split_calibration(data, 10, tmp_path)
    n_all, c, h = (len(np.load(p)["y"]) for p in (data, calib, held))
    assert c + h == n_all and np.bincount(np.load(held)["y"], minlength=10).tolist() == [10] * 10
    x_all = np.load(data)["x"].reshape(n_all, -1)
    held_rows = {r.tobytes() for r in np.load(held)["x"].reshape(h, -1)}
    assert not held_rows & {r.tobytes() for r in np.load(calib)["x"].reshape(c, -1)}
    assert held_rows <= {r.tobytes() for r in x_all}  # 8-bit round trip is exact
    out = tmp_path / "rows.jsonl"
    assert sweep.main([str(SAMPLE / "resnet8_cifar10.onnx"), "--data", str(data), "--held-out-per-class", "10",
                       "--device", "cpu", "--out", str(out), '{"samples_per_class": 20, "repair": false}',
                       '{"samples_per_class": 20, "repair_epochs": 1, "repair_min_steps": 5}']) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()] and len(rows) == 2
    for r in rows:
        assert r["held_out_images"] == 100 and r["calibration_images"] <= c
        assert r["vs_source"]["delta_pt"] == pytest.approx(100 * (r["composed_top1"] - r["source_top1"]))
    assert rows[0]["repair"] is None and rows[1]["repair"]["steps"] == 5
    assert "vs_first_setting" not in rows[0]
    assert rows[1]["vs_first_setting"]["delta_pt"] == pytest.approx(
        100 * (rows[1]["composed_top1"] - rows[0]["composed_top1"]))


def test_held_out_sweep_of_a_subset_scores_those_classes_against_the_restricted_source(tmp_path, capsys):
    """bench/sweep.py --classes: only those classes are decomposed, and the composed 2-class model is scored on
    their held-out images next to the source restricted to their two logits (as bench/subset does)."""
    import json

    import onnx

    from bench import sweep
    from bench.common import restricted_source
    from onnxmod.evaluate import evaluate_source

    data, model = SAMPLE / "cifar10_calib.npz", SAMPLE / "resnet8_cifar10.onnx"
    assert sweep.main([str(model), "--data", str(data), "--held-out-per-class", "10", "--device", "cpu",
                       "--classes", "cat,dog", '{"samples_per_class": 20, "repair": false}']) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["classes"] == ["cat", "dog"] and row["held_out_images"] == 20
    held = np.load(sweep.split_calibration(data, 10, tmp_path)[1])  # the same fixed-seed split
    classes = held["classes"].tolist()
    mine = np.isin(held["y"], [classes.index("cat"), classes.index("dog")])
    np.savez(tmp_path / "cat_dog.npz", x=held["x"][mine], y=held["y"][mine], classes=held["classes"])
    direct = evaluate_source(restricted_source(onnx.load(str(model)), ["cat", "dog"]), tmp_path / "cat_dog.npz",
                             device="cpu", quiet=True)
    assert mine.sum() == 20 and row["source_top1"] == direct["top1"]
    assert 0 < row["composed_macs_over_source"] < 2 * row["mean_module_macs"]


def test_cuda_section_compares_two_devices_output_by_output(tmp_path):
    """bench/sections/cuda.py run with CPU in both places (its CUDA run needs a GPU): the same device gives the
    same outputs everywhere, torch's execution matches onnxruntime, and the composed model equals its modules run
    one by one; where CUDA is missing the real section records why instead of measuring."""
    from dataclasses import replace as dc_replace

    from bench.common import Bench, smoke_config
    from bench.sections import cuda

    cfg = smoke_config(tmp_path, "test")
    cfg = dc_replace(cfg, models=cfg.models[:1])
    b = Bench(cfg)
    res = cuda.run(b, devices=("cpu", "cpu"))
    row = res["models"]["r8legacy"]
    for kind in ("source", "composed"):
        ev = row["eval"][kind]
        assert ev["images"] == len(b.test) and ev["images_scored_differently"] == 0 and ev["cpu"]["images_per_s"] > 0
    out = row["outputs"]
    assert out["source_logits_max_abs"] == 0 and out["composed_probs_max_abs"] == 0
    assert out["composed_on_cpu_vs_modules_one_by_one_on_cpu_max_abs"] < 1e-5
    rep = row["repair"]
    assert rep["cpu"]["max_abs_logit_diff_vs_onnxruntime_cpu"] < 1e-4 and rep["cpu"]["seconds_per_step"] > 0
    assert len(rep["cpu"]["per_graph_max_abs"]) == 1 + rep["modules"] == 11
    assert row["serve"]["labels_differing"] == 0 and row["serve"]["max_abs_probs_diff_vs_cpu"] < 1e-5
    if cuda.why_no_cuda():
        skipped = cuda.run(b)
        assert skipped["skipped"] == cuda.why_no_cuda() and skipped["models"] == {}


def test_a_skipped_section_keeps_the_measured_results():
    """bench/run.py merge: per-model results combine by model; a run that skipped (no CUDA here) replaces nothing."""
    from bench.common import SCHEMA
    from bench.run import merge

    measured = {"schema": SCHEMA, "section": "cuda", "models": {"resnet20": {"x": 1}}}
    assert merge(measured, {"schema": SCHEMA, "section": "cuda", "models": {}, "skipped": "no GPU"}) == measured
    newer = {"schema": SCHEMA, "section": "cuda", "models": {"resnet56": {"x": 2}}}
    assert merge(measured, newer)["models"] == {"resnet20": {"x": 1}, "resnet56": {"x": 2}}
    assert merge(None, newer) == newer


def test_report_shows_other_machines_and_changed_settings_apart(tmp_path):
    """A results sub-directory at default settings is another machine's run (section 9); one whose runs record
    settings_overrides is a budget row of section 6, next to the default, with its own loss and time ratio, and a row of
    the README's choosing-settings table."""
    import json

    from bench.common import SCHEMA
    from bench.report import _other_runs, block_budget, block_choosing, load_results

    def write(d: Path, overrides: dict, loss: float, epochs: float, commit: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        run = {"settings_overrides": overrides, "machine": {"git_commit": commit}, "date": "2026-11-26T08:00:00"}
        cost = {"schema": SCHEMA, "section": "cost", "run": run, "models": {"resnet20": {
            "label": "ResNet20", "source_top1": 0.9, "default": {
                "composed_top1": 0.9 - loss / 100, "loss_pt": loss, "repair": {"steps": 7, "batch_size": 128, "seconds": 1.0}}}}}
        time = {"schema": SCHEMA, "section": "time", "run": run, "models": {"resnet20": {
            "label": "ResNet20", "calibration_images": 160, "decompose_over_epoch": epochs}}}
        (d / "cost.json").write_text(json.dumps(cost))
        (d / "time.json").write_text(json.dumps(time))

    write(tmp_path, {}, 3.0, 8.5, "aaaaaaa1")
    write(tmp_path / "gpu", {}, 4.0, 6.0, "bbbbbbb2")
    write(tmp_path / "repair_epochs_10", {"repair_epochs": 10.0}, 2.25, 17.0, "ccccccc3")
    results = load_results(tmp_path)
    assert [k for k, _ in _other_runs(results, changed_settings=False)] == ["gpu"]
    assert [k for k, _ in _other_runs(results, changed_settings=True)] == ["repair_epochs_10"]
    rows = [r for r in block_budget(results).splitlines() if r.startswith("| ResNet20")]
    assert len(rows) == 2
    assert "default flags (`aaaaaaa`)" in rows[0] and "**3.00 pt**" in rows[0] and "**8.50**" in rows[0]
    assert "`--repair-epochs 10` (`ccccccc`" in rows[1] and "**2.25 pt**" in rows[1] and "**17.00**" in rows[1]
    assert "4.00 pt" not in block_budget(results)  # the other machine's run is not a budget row
    choosing = [r for r in block_choosing(results).splitlines() if "`--repair-epochs 10`" in r]
    assert len(choosing) == 1 and "2.25 pt" in choosing[0] and "17.00x" in choosing[0]
    (tmp_path / "repair_epochs_10" / "cost.json").unlink()
    (tmp_path / "repair_epochs_10" / "time.json").unlink()
    assert "No run with changed decompose settings" in block_budget(load_results(tmp_path))
