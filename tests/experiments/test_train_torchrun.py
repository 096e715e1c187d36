"""``pcfast train`` under ``torchrun``: the same command, each process training its share of every
batch, gives the single-process run's log.

Oracle: the single-process run of the same command. The optimizers average the shards' gradients
weighted by shard size (``pcfast.distributed``), so the runs agree up to float32 rounding of sums
taken in another order — relative differences near 1e-7 over the few steps here; 1e-5 is two orders
above that and three below what a missing or wrongly weighted reduction gives (1e-3 and more: each
rank would follow its own half of the data).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

ARGS = ["train", "--algo", "bp", "pc", "dtp", "--train-size", "200", "--epochs", "2", "--width", "24",
        "--batch-size", "40", "--inference-steps", "5", "--no-progress"]


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_train_under_torchrun_equals_the_single_process_run(tmp_path):
    single = _run([sys.executable, "-m", "pcfast", *ARGS, "--json", "single.json"], tmp_path)
    assert single.returncode == 0, single.stderr
    # 3 processes: the batches of 40 (and the last of 40) split 14 + 13 + 13 — unequal shards.
    parallel = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                     "-m", "pcfast", *ARGS, "--json", "parallel.json"], tmp_path)
    assert parallel.returncode == 0, parallel.stderr
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "parallel.json").read_text())
    assert [(e["algo"], e["epoch"]) for e in a] == [(e["algo"], e["epoch"]) for e in b]
    assert len(a) == 6
    for one, many in zip(a, b):
        for key, value in one.items():
            if key == "seconds":
                continue
            if isinstance(value, float):
                assert math.isclose(many[key], value, rel_tol=1e-5), (one["algo"], one["epoch"], key, value, many[key])
            else:
                assert many[key] == value, (one["algo"], key)
    # Only the first process speaks: every epoch line appears once.
    assert parallel.stdout.count("bp epoch  1/2") == 1, parallel.stdout


def test_a_batch_smaller_than_the_number_of_ranks_is_a_clear_error(tmp_path):
    # 41 images in batches of 40: the last batch has one row, which 2 ranks cannot share.
    args = [a if a != "200" else "41" for a in ARGS]
    run = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "pcfast", *args], tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "pcfast train: error: batch_size: a batch of 1 rows cannot be shared by 2 ranks" in output
    # torchrun itself reports a failed child with its own traceback; pcfast's processes print none.
    assert not [line for line in output.splitlines() if line.strip().startswith("File") and "pcfast" in line]


class _RecordingOptimizer:
    """Stands in for a pcfast optimizer averaging over a process group: records the rows it gets."""

    process_group = object()

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def zero_grad(self):
        pass

    def step(self, x, y):
        assert torch.equal(x[:, 0].long(), y)  # rows and labels stay paired
        self.rows.append(y.clone())
        return {"loss": 0.0}


@pytest.mark.parametrize("ranks", [2, 3])
def test_train_run_gives_each_rank_its_contiguous_share_of_every_batch(monkeypatch, ranks):
    from pcfast.experiments.common import train_run

    x = torch.arange(23, dtype=torch.float32)[:, None].repeat(1, 3)
    labels = torch.arange(23)
    seen = []
    for rank in range(ranks):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: ranks)
        opt = _RecordingOptimizer()
        train_run(opt, x, labels, epochs=1, batch_size=8, seed=3)
        seen.append(opt.rows)
    batches = [torch.cat([seen[r][b] for r in range(ranks)]) for b in range(len(seen[0]))]
    assert [len(b) for b in batches] == [8, 8, 7]
    assert sorted(torch.cat(batches).tolist()) == list(range(23))  # every row once per epoch
    for b, batch in enumerate(batches):
        for r, share in enumerate(batch.tensor_split(ranks)):
            assert torch.equal(seen[r][b], share)
