"""`onnxmod compose` (placeholder until its issue lands)."""
