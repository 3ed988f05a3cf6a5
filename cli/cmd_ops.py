"""`onnxmod ops`: the op registry as a table (what each supported op does to channels)."""

from __future__ import annotations

import click

from onnxmod.cli.common import emit, json_option, quiet_option
from onnxmod.cli.main import cli

COLUMNS = ("op", "family", "channels", "pins")


@cli.command("ops")
@click.option("--all-columns", is_flag=True, help="Also show how each op is shrunk, its MACs, sensitivity and fit.")
@json_option
@quiet_option
def ops_cmd(all_columns, as_json, quiet):
    """Print the ops decompose understands and what each does to channels.

    Ops not listed (and custom-domain ops) pin every channel they touch: they are
    never pruned through, and decompose names the one that pins the class rows.

    \b
    Example:
      onnxmod ops                 # op, family, effect on channels, when it pins
      onnxmod ops --json | jq '.ops[] | select(.op == "Conv")'
    """
    from onnxmod import ops

    rows = ops.table()
    columns = tuple(rows[0]) if all_columns else COLUMNS

    def human(result: dict) -> str:
        lines = []
        for r in result["ops"]:
            lines.append(f"{r['op']:<22}{r['family']:<15}" + " | ".join(r[c] for c in columns[2:]))
        return "\n".join([f"{'op':<22}{'family':<15}" + " | ".join(columns[2:]), *lines])

    emit({"ops": rows}, as_json, human)
