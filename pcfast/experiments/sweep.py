"""Sweeps: independent trials, executors that map them to results, and a journal that makes any
executor resumable.

A *trial* is one training run, a pure function of its settings: the same settings give the same
numbers on any machine of the same kind, in any process, in any order. An *executor* maps a function
over trials and yields each result as soon as it is known:

* ``SerialExecutor`` runs them one after the other in this process;
* ``RayExecutor`` submits each as a Ray task with per-trial resources (``num_cpus``, fractional
  ``num_gpus``) to a running Ray cluster, or to a local Ray instance it starts, and yields results in
  the order they finish.

The *journal* is a JSON-lines file with one line per finished trial — its settings, the hash of the
sweep settings that determine its result, the result itself and how long it took — appended with
one ``write`` + ``flush`` + ``fsync`` per line, so a crash, Ctrl-C or a lost machine loses at most the
trials in flight and at worst leaves a torn last line, which reading ignores. A sweep's tables and
figures are built from the journal alone; resuming skips the journaled trials and refuses a journal
written with other settings.

Thread counts are part of a trial's settings: the intra-op thread count changes how BLAS splits its
reductions and hence the float rounding, so every trial runs with the same fixed count
(``torch.set_num_threads``), whichever executor runs it. One thread per trial is also what keeps a
sweep fast on a shared machine: with more threads than free cores, threads waiting at OpenMP
barriers for a descheduled sibling make small steps many times slower.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, order=True)
class Trial:
    """One training of a sweep: algorithm variant × parametrization × width × learning rate × seed."""

    variant: str
    parametrization: str
    width: int
    log2_lr: int
    seed: int

    @property
    def label(self) -> str:
        return f"{self.variant} {self.parametrization} width {self.width} lr 2^{self.log2_lr} seed {self.seed}"


class JournalError(ValueError):
    """A journal that cannot be resumed: written with other settings, or corrupt before its last line."""


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``settings``."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Journal:
    """The JSON-lines record of a sweep's finished trials (see the module docstring).

    ``settings`` are the sweep settings that determine every trial's result; each line carries them
    and their hash, so a journal can be checked line by line and a mismatch names the settings that
    differ. A line is ``{"trial": {…}, "hash": …, "settings": {…}, "result": {…}, "seconds": …,
    "host": …}``; ``seconds`` and ``host`` describe the execution, not the result.
    """

    def __init__(self, path: Path | str, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # tuples → lists: as read back from a line
        self.hash = settings_hash(self.settings)

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def read(self) -> dict[Trial, dict[str, Any]]:
        """The journaled entries by trial (the first entry of a trial journaled twice). A torn last
        line — the write a crash interrupted — is ignored; any other unreadable line, or a line
        written with other settings, raises ``JournalError``."""
        if not self.path.exists():
            return {}
        text = self.path.read_text()
        lines = text.split("\n")
        complete, torn = lines[:-1], lines[-1]  # a finished line ends in "\n": a non-empty tail is torn
        entries: dict[Trial, dict[str, Any]] = {}
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                trial = Trial(**entry["trial"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                if number == len(complete) and not torn:
                    break  # the last line, cut short before its newline was written: ignore it
                raise JournalError(f"journal {self.path}: line {number} is not a journal entry ({exc})") from None
            if entry.get("hash") != self.hash:
                raise JournalError(self._mismatch(entry, number))
            entries.setdefault(trial, entry)
        return entries

    def _mismatch(self, entry: dict[str, Any], number: int) -> str:
        theirs = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
        keys = sorted(set(theirs) | set(self.settings))
        differ = [f"{k} {json.dumps(theirs.get(k))} there, {json.dumps(self.settings.get(k))} here"
                  for k in keys if theirs.get(k) != self.settings.get(k)]
        what = "; ".join(differ) if differ else f"settings hash {entry.get('hash')} there, {self.hash} here"
        return (f"journal {self.path} was written by a sweep with other settings (line {number}: {what}); "
                "resume with the options that started it, or write to another --out or --name")

    def truncate_torn_tail(self) -> None:
        """Cut a torn last line off — one without its newline, or one that does not parse — so that
        the next entry starts on a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # a tail without its newline goes
        if keep:
            start = data.rfind(b"\n", 0, keep - 1) + 1
            try:
                json.loads(data[start:keep])
            except ValueError:
                keep = start  # a last line that does not parse goes too
        if keep < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())

    def start(self) -> None:
        """An empty journal (a fresh sweep)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as handle:
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, trial: Trial, result: dict[str, Any], *, seconds: float, host: str) -> dict[str, Any]:
        """Append one finished trial durably (one write of one line, flushed and fsynced) and return
        the entry as it reads back."""
        entry = {"trial": asdict(trial), "hash": self.hash, "result": result, "seconds": round(seconds, 3),
                 "host": host, "settings": self.settings}
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n"
        with self.path.open("a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return json.loads(line)


# ------------------------------------------------------------------------------------------ executors


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all CPUs since boot, from ``/proc/stat``; ``None`` elsewhere."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def free_cores(window: float = 0.5) -> int:
    """Cores that are actually free: the idle share of all CPUs over ``window`` seconds (from
    ``/proc/stat``; elsewhere the 1-minute load average) times the cores this process may use,
    rounded, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    before = _cpu_times()
    if before is not None:
        time.sleep(window)
        after = _cpu_times()
        idle, total = after[0] - before[0], after[1] - before[1]
        if total > 0:
            return max(1, min(cores, round(idle / total * (os.cpu_count() or cores))))
    try:  # pragma: no cover - not Linux
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        busy = 0.0
    return max(1, cores - math.floor(busy + 0.5))


@contextlib.contextmanager
def intra_op_threads(count: int):
    """``torch.set_num_threads(count)`` for the duration, the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(fn: Callable[..., dict], trial: Trial, *args: Any) -> tuple[dict, float, str]:
    """``fn(*args, trial)``: (result, seconds, host). The trial function sets its own thread count."""
    began = time.perf_counter()
    result = fn(*args, trial)
    return result, time.perf_counter() - began, socket.gethostname()


class SerialExecutor:
    """Trials one after the other in this process."""

    name = "serial"

    def device_for(self, device: str) -> str:
        """Where trials with the ``device`` setting run: ``auto`` is the GPU when this process sees one."""
        from .common import resolve_device

        return resolve_device(device).type

    def map(self, fn: Callable[..., dict], trials: Iterable[Trial], *args: Any) -> Iterator[tuple[Trial, dict, float, str]]:
        """``(trial, fn(*args, trial), seconds, host)`` for each trial, in order."""
        for trial in trials:
            yield (trial, *_timed(fn, trial, *args))

    def close(self) -> None: ...

    def describe(self) -> str:
        return "serial"


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


# Environment of the Ray workers this module starts: OpenMP threads that sleep rather than spin while
# waiting (a worker shares its cores with others), set before torch loads its OpenMP runtime.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """``ConnectionError`` unless something accepts a TCP connection at ``HOST:PORT`` (``ray://`` too)
    within ``timeout`` seconds: Ray itself waits minutes for a cluster that is not there. ``auto`` and
    addresses without a port are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc})") from None


class RayExecutor:
    """Each trial a Ray task with ``num_cpus=cpus_per_trial`` and ``num_gpus=gpus_per_trial``
    (fractional: 0.25 packs four trials on a GPU); results are yielded as the tasks finish.

    Connects to the cluster at ``address`` (``"auto"``: the one this machine belongs to), uses the
    Ray instance this process has already initialised, or else starts a local instance with
    ``num_cpus`` CPUs (default: ``free_cores()``). The trial function sets its intra-op thread count
    (``pcfast transfer`` gives it ``cpus_per_trial``). A task whose worker dies is retried by Ray (``max_retries``); if the driver stops
    (Ctrl-C, an error), the tasks still queued or running are cancelled.
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, cpus_per_trial: int = 1, gpus_per_trial: float = 0.0,
                 num_cpus: int | None = None, max_retries: int = 3):
        if isinstance(cpus_per_trial, bool) or not isinstance(cpus_per_trial, int) or cpus_per_trial < 1:
            raise ValueError(f"cpus_per_trial: expected a positive integer, got {cpus_per_trial!r}")
        if not (isinstance(gpus_per_trial, (int, float)) and math.isfinite(gpus_per_trial) and gpus_per_trial >= 0):
            raise ValueError(f"gpus_per_trial: expected a finite number >= 0, got {gpus_per_trial!r}")
        if not ray_available():
            raise ImportError("the Ray executor needs ray: pip install 'pcfast[distributed]'")
        import ray

        self.cpus_per_trial, self.gpus_per_trial, self.max_retries = cpus_per_trial, float(gpus_per_trial), max_retries
        self.started = False
        if address is not None:
            _check_reachable(address)
        if not ray.is_initialized():
            import logging

            common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                          runtime_env={"env_vars": dict(WORKER_ENV)})
            if address is not None:
                ray.init(address=address, **common)
            else:
                ray.init(num_cpus=num_cpus if num_cpus is not None else free_cores(), **common)
            self.started = True
        self.cluster_cpus = ray.cluster_resources().get("CPU", 0)
        self.cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if self.cpus_per_trial > self.cluster_cpus:
            self.close()
            raise ValueError(f"cpus_per_trial: {cpus_per_trial} asked for, but the Ray cluster has "
                             f"{self.cluster_cpus:g} CPUs")
        if self.gpus_per_trial > self.cluster_gpus:
            self.close()
            raise ValueError(f"gpus_per_trial: {gpus_per_trial:g} asked for, but the Ray cluster has "
                             f"{self.cluster_gpus:g} GPUs")

    def device_for(self, device: str) -> str:
        """Where trials with the ``device`` setting run: ``auto`` is the GPU when trials get one."""
        if device == "auto":
            return "cuda" if self.gpus_per_trial > 0 else "cpu"
        return "cuda" if device.startswith("cuda") else "cpu"

    def map(self, fn: Callable[..., dict], trials: Iterable[Trial], *args: Any) -> Iterator[tuple[Trial, dict, float, str]]:
        """``(trial, fn(*args, trial), seconds, host)`` for each trial, in the order they finish."""
        import ray

        remote = ray.remote(_timed).options(num_cpus=self.cpus_per_trial, num_gpus=self.gpus_per_trial,
                                            max_retries=self.max_retries)
        shared = [ray.put(a) for a in args]  # stored once in the object store, not once per task
        pending = {remote.remote(fn, trial, *shared): trial for trial in trials}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    trial = pending.pop(ref)
                    try:
                        result, seconds, host = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise exc.as_instanceof_cause() from None
                    yield trial, result, seconds, host
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def describe(self) -> str:
        gpus = f", {self.gpus_per_trial:g} GPU" if self.gpus_per_trial else ""
        return (f"ray, {self.cpus_per_trial} CPU{gpus} per trial on {self.cluster_cpus:g} CPUs"
                + (f" and {self.cluster_gpus:g} GPUs" if self.cluster_gpus else ""))
