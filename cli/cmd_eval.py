"""`onnxmod eval` (placeholder until its issue lands)."""
