"""Run the console entry point as a user would — ``python -m pcfast …`` in a subprocess — or, for
quick error cases, call the same ``pcfast.cli.main`` in this process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pcfast_cli():
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pcfast", *map(str, args)], check=False, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    return run


@pytest.fixture
def pcfast_main(capsys):
    """``pcfast.cli.main(argv)`` in-process: (exit status, stdout, stderr); argparse exits become statuses."""
    from pcfast.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
