"""The op registry (onnxmod.ops) and `onnxmod ops`: one place that says how each op is handled."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxmod import cost, frontend, graphio, ops
from onnxmod.channels import analyze
from onnxmod.cli.main import main

REPO = Path(__file__).resolve().parent.parent
GRAPHS = sorted((REPO / "sample_graphs").glob("*.onnx")) + sorted((REPO / "sample_graphs" / "zoo").glob("*.onnx"))


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_table_rows_are_complete_and_ops_unique():
    rows = ops.table()
    assert len({r["op"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"op", "family", "channels", "shrink", "macs", "sensitivity", "fit", "pins"}
        assert all(isinstance(v, str) and v for v in r.values()), r
    assert {"Conv", "Gemm", "MatMul", "Concat", "Pad", "Slice", "BatchNormalization", "Add", "Flatten"} <= \
        {r["op"] for r in rows}
    assert rows[-1]["op"] == "*"  # the pinning fallback comes last


def test_cost_counts_the_ops_the_registry_says():
    assert set(cost.MAC_OPS) == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    assert set(cost.MAC_OPS) == {r["op"] for r in ops.table() if r["macs"] not in ("0", "0 (not counted)")}


def test_custom_domain_and_unknown_ops_fall_back_to_pinning():
    assert ops.family_for("Relu", "com.vendor") is ops.OTHER
    assert ops.family_for("NoSuchOp") is ops.OTHER
    assert ops.rule(None) is ops.BARRIER and ops.rule("barrier") is ops.BARRIER


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.name)
def test_every_tagged_node_has_a_registry_rule(path):
    """Every node of the sample and zoo graphs is tagged with a rule the registry defines, and the
    nodes with MACs are exactly the ones onnxmod.cost counts."""
    model, _ = frontend.canonical_input(onnx.load(path), path.name, data_size=(48, 192))
    a = analyze(graphio.canonicalize(model), canonical=True)
    assert set(a.node_rule.values()) <= set(ops.RULES)
    with_macs = {n.name for n in a.graph.nodes if ops.rule(a.node_rule.get(n.name)).mac_term(a, n) is not None}
    assert with_macs == {n.name for n in a.graph.nodes if n.op in cost.MAC_OPS and a.node_rule[n.name] != "barrier"}


def test_ops_command(capsys):
    code, out, _ = _cli(["ops"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["op", "family"] and len(lines) == len(ops.table()) + 1
    assert any(line.startswith("Conv ") and "depthwise" in line for line in lines)
    code, out, _ = _cli(["ops", "--json"], capsys)
    assert code == 0 and json.loads(out)["ops"] == ops.table()
    code, out, _ = _cli(["ops", "--all-columns"], capsys)
    assert code == 0 and "least squares" in out
