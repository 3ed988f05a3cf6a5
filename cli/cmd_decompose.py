"""`onnxmod decompose` (placeholder until its issue lands)."""
