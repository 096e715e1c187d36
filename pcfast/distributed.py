"""Data parallelism over ``torch.distributed``: the process group an optimizer reduces over, and the
collectives of one training step.

Each rank holds a shard of the batch. Every gradient and statistic a pcfast optimizer computes is a
batch mean of per-sample terms (PC relaxes each sample independently; TP/DTP targets and
reconstructions are per sample), so the full-batch value is the shard means weighted by shard size,
``ḡ = Σ_r B_r ḡ_r / Σ_r B_r`` — exact for any split, equal or not. A step's collectives are SUM
all-reduces of one flat buffer each::

    [ B_r · payload_r  |  shard sizes (B_r at position r)  |  status (rank r's at position r) ]

so one call reduces every gradient and statistic together, tells every rank all the shard sizes, and
carries each rank's status: 0, or the kind of error it hit. A rank whose computation fails takes part
in the next collective of the step with its status set, every rank raises (an error of the same
type) at that collective, and every rank abandons the step with nothing changed — nobody is left
waiting in a collective that will never come.
"""
from __future__ import annotations

from typing import NoReturn, Sequence

import torch
from torch import Tensor

from .errors import DivergenceError

AUTO = "auto"

# Status codes in a collective's status segment, and the error the other ranks raise for each.
_OK = 0
_ERRORS: tuple[type[Exception], ...] = (DivergenceError, ValueError, TypeError, RuntimeError)


def _available() -> bool:
    return torch.distributed.is_available()


def resolve_process_group(process_group) -> object | None:
    """The group an optimizer averages over, or None for single-process training.

    ``"auto"``: the default group (``torch.distributed.group.WORLD``) when ``torch.distributed`` is
    initialised with more than one rank, else None. None: single-process training. A
    ``ProcessGroup``: that group (None when it has one rank).
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(f"process_group: expected 'auto', None or a torch.distributed ProcessGroup, "
                             f"got {process_group!r}")
        if not (_available() and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD
    else:
        if not (_available() and isinstance(process_group, torch.distributed.ProcessGroup)):
            raise TypeError(f"process_group: expected 'auto', None or a torch.distributed ProcessGroup, "
                            f"got {type(process_group).__name__}")
        if not torch.distributed.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first")
        group = process_group
    if torch.distributed.get_rank(group) < 0:
        raise ValueError("process_group: this process is not a member of the group")
    return group if torch.distributed.get_world_size(group) > 1 else None


def broadcast_from_first_rank(tensors: Sequence[Tensor], group) -> None:
    """Overwrite ``tensors`` in place with the group's first rank's values (one broadcast per dtype),
    as ``DistributedDataParallel`` does with a model when it is built."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    source = torch.distributed.get_global_rank(group, 0)
    for members in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        torch.distributed.broadcast(flat, src=source, group=group)
        offset = 0
        with torch.no_grad():
            for t in members:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


class StepCollectives:
    """The collectives of one step, run in a fixed order with payload sizes known in advance.

    ``plan``: the payload size (number of elements) of each collective of the step, in order — it
    depends on the model and settings only, so a rank that fails before computing a payload still
    knows the size of the collective the other ranks wait in. ``like``: a tensor of the model's
    dtype and device; buffers are at least float32 so that shard sizes and ``B_r · payload`` stay
    exact enough in float16/bfloat16 models.
    """

    def __init__(self, group, plan: Sequence[int], like: Tensor) -> None:
        self.group = group
        self.plan = list(plan)
        self.rank = torch.distributed.get_rank(group)
        self.world = torch.distributed.get_world_size(group)
        self.dtype = torch.promote_types(like.dtype, torch.float32)
        self.device = like.device
        self.done = 0  # collectives completed in this step
        self.abandoned = False  # a collective reported another rank's failure

    def mean(self, payload: Sequence[Tensor | None], batch: int) -> tuple[list[Tensor | None], list[int]]:
        """Each tensor of ``payload`` averaged over the group's samples, ``Σ_r B_r t_r / Σ_r B_r``
        (None entries stay None), and every rank's shard size ``B_r``, from one all-reduce."""
        present = [t for t in payload if t is not None]
        parts = [t.detach().reshape(-1).to(self.dtype) for t in present]
        flat = torch.cat(parts).mul_(batch) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)
        total, sizes = self._all_reduce(flat, batch, _OK)
        count = sum(sizes)
        result, offset = [], 0
        for t in payload:
            if t is None:
                result.append(None)
                continue
            piece = total[offset:offset + t.numel()].div(count).view(t.shape).to(t.dtype)
            result.append(piece)
            offset += t.numel()
        return result, sizes

    def abandon(self, error: Exception) -> NoReturn:
        """Raise ``error`` after telling the other ranks, in the step's next collective, that this
        rank failed (unless they already know, or the step has no collective left)."""
        if not self.abandoned and self.done < len(self.plan):
            code = next((i + 1 for i, kind in enumerate(_ERRORS) if isinstance(error, kind)), len(_ERRORS))
            empty = torch.zeros(self.plan[self.done], dtype=self.dtype, device=self.device)
            try:
                self._all_reduce(empty, 0, code)
            except Exception:  # the others' failure reports: this rank raises its own error
                pass
        raise error

    def _all_reduce(self, payload: Tensor, batch: int, status: int) -> tuple[Tensor, list[int]]:
        if self.done >= len(self.plan) or payload.numel() != self.plan[self.done]:
            raise RuntimeError(f"pcfast.distributed: collective {self.done} of the step has {payload.numel()} "
                               f"elements, the plan {self.plan} (an internal inconsistency)")
        tail = torch.zeros(2 * self.world, dtype=self.dtype, device=self.device)
        tail[self.rank] = batch
        tail[self.world + self.rank] = status
        buffer = torch.cat([payload, tail])
        torch.distributed.all_reduce(buffer, group=self.group)
        self.done += 1
        tail = [int(v) for v in buffer[-2 * self.world:].tolist()]  # one host sync
        sizes, statuses = tail[:self.world], tail[self.world:]
        failed = [(r, code) for r, code in enumerate(statuses) if code != _OK and r != self.rank]
        if failed:
            self.abandoned = True
            rank, code = failed[0]
            kind = _ERRORS[min(code, len(_ERRORS)) - 1]
            others = "" if len(failed) == 1 else f" (and rank(s) {[r for r, _ in failed[1:]]})"
            raise kind(f"rank {rank}{others} of the process group failed this step with a {kind.__name__} "
                       "(its traceback says why); the step was abandoned on every rank and nothing was changed")
        return buffer[:payload.numel()], sizes
