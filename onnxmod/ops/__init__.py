"""The op registry: one module per op family, and the tables built from them.

Each family module (``elementwise``, ``pool``, ``reshape``, ``conv``, ``linear``,
``pad``, ``slicing``, ``gather``, ``concat``, ``barrier``) exports ``FAMILIES`` (what the channel
analysis does with an op, plus the human description ``onnxmod ops`` prints) and
``RULES`` (how surgery, selection and MAC accounting treat the nodes the analysis
tagged). Adding an op family = one new module here, listed in ``_MODULES``, plus its
test. See :mod:`onnxmod.ops.base` for the contract.
"""

from __future__ import annotations

from onnxmod.ops import barrier, concat, conv, elementwise, gather, linear, pad, pool, reshape, slicing
from onnxmod.ops.base import Family, Rule

_MODULES = (elementwise, pool, reshape, conv, linear, pad, slicing, gather, concat, barrier)

FAMILIES: tuple[Family, ...] = tuple(f for m in _MODULES for f in m.FAMILIES)
RULES: dict[str, Rule] = {r.name: r for m in _MODULES for r in m.RULES}
_BY_OP: dict[str, Family] = {op: f for f in FAMILIES for op in f.ops if op != "*"}
OTHER = barrier.OTHER
BARRIER = barrier.BARRIER


def family_for(op: str, domain: str | None = "") -> Family:
    """The family that analyses ``op`` (custom domains and unknown ops: the pinning fallback)."""
    if domain not in (None, "", "ai.onnx"):
        return OTHER
    return _BY_OP.get(op, OTHER)


def rule(name: str | None) -> Rule:
    """The rule a node was tagged with (untagged nodes behave as barriers)."""
    return RULES.get(name or "barrier", BARRIER)


def mac_ops() -> tuple[str, ...]:
    """Op types whose multiply-accumulates :mod:`onnxmod.cost` counts."""
    return tuple(op for f in FAMILIES if f.counts_macs for op in f.ops)


def table() -> list[dict[str, str]]:
    """One row per supported op (plus the fallback), in registry order."""
    return [f.row(op) for f in FAMILIES for op in f.ops]


__all__ = ["FAMILIES", "RULES", "Family", "Rule", "family_for", "mac_ops", "rule", "table"]
