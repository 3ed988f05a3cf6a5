"""`onnxmod info` (placeholder until its issue lands)."""
