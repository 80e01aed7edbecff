"""SIGTERM / SIGINT: finish the optimizer step, save a checkpoint, exit cleanly."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by a signal handler; read between optimizer steps, agreed on by every rank."""

    def __init__(self, host_group=None) -> None:
        self.signal_name: str | None = None
        self.host_group = host_group  # a gloo group of all ranks, or None in one process

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.warning("Received %s: stopping after this optimizer step", self.signal_name)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank was signalled, so all of them save together."""
        signalled = self.signal_name is not None
        if accelerator.num_processes == 1:
            return signalled
        if self.host_group is None:  # no torch.distributed (XLA): the device collective
            flag = torch.tensor([signalled], device=accelerator.device, dtype=torch.int32)
            return bool(accelerator.reduce(flag, reduction="sum").item())
        # Asked every step, so it goes over the host: reading a flag back from the GPU would make
        # every step wait for the GPU to finish the one before.
        flag = torch.tensor([signalled], dtype=torch.int32)
        torch.distributed.all_reduce(flag, group=self.host_group)
        return bool(flag.item())


@contextlib.contextmanager
def stop_on_signals(num_processes: int = 1) -> Iterator[StopRequest]:
    """Install SIGTERM/SIGINT handlers for the duration of training; restore them after.

    Every rank must enter it together when ``num_processes`` > 1: it creates a process group.
    """
    distributed = num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    request = StopRequest(torch.distributed.new_group(backend="gloo") if distributed else None)
    previous = {sig: signal.signal(sig, request._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if request.host_group is not None:
            torch.distributed.destroy_process_group(request.host_group)
