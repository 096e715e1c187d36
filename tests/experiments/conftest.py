"""Run the console entry point as a user would: ``python -m pcfast …`` in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pcfast_cli():
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pcfast", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    return run
