"""The one exception type user-facing code raises for bad input.

The CLI turns an :class:`OnnxmodError` into a one-line message on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""


class OnnxmodError(Exception):
    """Bad input (file, graph, data, option) explained in one line."""


class UnsupportedOpError(OnnxmodError):
    """A graph contains an op the channel analysis cannot handle where it matters."""

    def __init__(self, node_name: str, op_type: str, why: str):
        self.node_name = node_name
        self.op_type = op_type
        super().__init__(f"unsupported op {op_type} at node '{node_name}': {why}")
