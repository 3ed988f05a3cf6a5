"""The hand attack of issue 24 (bench/attack.py) in its --smoke form: ~20 hostile CLI cases, 0 failures.

The full attack (hundreds of cases, ~10 minutes) is `python bench/attack.py`; its summary is
bench/results/attack.json. This keeps the harness itself working and a sample of its cases clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_attack_smoke(tmp_path: Path):
    out = tmp_path / "attack.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "attack.py"), "--smoke", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.exists(), r.stdout + r.stderr
    result = json.loads(out.read_text())
    failed = [row for row in result["rows"] if row["verdict"] != "pass"]
    assert result["cases"] >= 15, r.stdout
    assert result["failed"] == 0 and not failed, json.dumps(failed, indent=1)[:4000]
    assert result["markers"] == []  # no pickle payload ran
    assert r.returncode == 0, r.stdout + r.stderr
