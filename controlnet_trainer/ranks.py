"""Yes/no agreements between ranks, asked every step, over a gloo group on the host.

A flag on the GPU would have to be read back, and reading anything back from the GPU makes the
host wait for every step queued before it. Over the host the question costs one small message.
"""

from __future__ import annotations

import datetime

import torch


def host_group(num_processes: int, timeout: datetime.timedelta | None = None):
    """A gloo group of all ranks, or None in one process (or without torch.distributed, as on
    XLA). Every rank must call this at the same point: creating a group is collective.
    ``timeout`` is how long a rank waits for the others in it (gloo's default: 30 minutes)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_processes == 1 or not distributed:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=timeout)


def any_rank(flag: bool, group) -> bool:
    """True on every rank if ``flag`` is True on at least one."""
    return _reduce(flag, group, torch.distributed.ReduceOp.MAX)


def every_rank(flag: bool, group) -> bool:
    """True on every rank only if ``flag`` is True on all of them."""
    return _reduce(flag, group, torch.distributed.ReduceOp.MIN)


def _reduce(flag: bool, group, op) -> bool:
    if group is None:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=op, group=group)
    return bool(value.item())
