"""SIGTERM / SIGINT: finish the optimizer step, save a checkpoint, exit cleanly."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import torch
from accelerate import Accelerator

from . import ranks

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by a signal handler; read between optimizer steps, agreed on by every rank."""

    def __init__(self, host_group=None) -> None:
        self.signal_name: str | None = None
        self.host_group = host_group  # ranks.host_group(): None in one process

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.warning("Received %s: stopping after this optimizer step", self.signal_name)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank once any rank was signalled, so all of them save together."""
        signalled = self.signal_name is not None
        if self.host_group is None and accelerator.num_processes > 1:  # no torch.distributed (XLA)
            flag = torch.tensor([signalled], device=accelerator.device, dtype=torch.int32)
            return bool(accelerator.reduce(flag, reduction="sum").item())
        return ranks.any_rank(signalled, self.host_group)


@contextlib.contextmanager
def stop_on_signals(host_group=None) -> Iterator[StopRequest]:
    """Install SIGTERM/SIGINT handlers for the duration of training; restore them after."""
    request = StopRequest(host_group)
    previous = {sig: signal.signal(sig, request._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
