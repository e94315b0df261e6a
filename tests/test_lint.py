"""The repository's own lint: every .py file within 110 characters a line, no unused or undefined names
(ruff, configured in pyproject.toml; a test dependency in requirements.txt)."""

import subprocess
import sys

import pytest

from conftest import REPO


def test_every_file_passes_ruff():
    pytest.importorskip("ruff", reason="ruff is a test dependency: pip install -r requirements.txt")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
