"""The CI rule of tests/conftest.py: with CI set and ../shared/data present, a skipped `shared` test fails pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

TESTS = '''
import pytest

@pytest.mark.shared
def test_real_model():
    pytest.skip("pretend the weights are missing")

def test_plain():
    pass
'''


def _run(repo: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(CONFTEST, repo / "tests" / "conftest.py")
    (repo / "tests" / "test_x.py").write_text(TESTS)
    (repo / "pytest.ini").write_text("[pytest]\nmarkers =\n    shared: needs ../shared/data\n")
    return repo


def test_ci_fails_when_a_shared_test_skips_with_shared_present(fake_repo: Path):
    (fake_repo.parent / "shared" / "data").mkdir(parents=True)
    r = _run(fake_repo, "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "shared test(s) skipped" in r.stdout and "test_real_model" in r.stdout
    assert _run(fake_repo, None).returncode == 0  # outside CI a skip is just a skip


def test_ci_passes_when_shared_is_absent(fake_repo: Path):
    r = _run(fake_repo, "1")
    assert r.returncode == 0, r.stdout + r.stderr
