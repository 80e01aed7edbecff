"""What the run directory says about itself: resolved options, the plan, metrics and start-up time."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from .plan import TrainPlan

OPTIONS_FILE = "training_options.json"
METRICS_FILE = "metrics.jsonl"


def write_options(output_dir: Path, arguments: dict, plan: TrainPlan, family: str) -> Path:
    """The flags as given (secrets masked), the family and the plan, beside the run's outputs."""
    path = output_dir / OPTIONS_FILE
    document = {"family": family, "arguments": arguments, "plan": plan.to_json()}
    path.write_text(json.dumps(document, indent=2, default=str))
    return path


def tracker_config(arguments: dict, plan: TrainPlan) -> dict:
    """Trackers take scalars only (TensorBoard's hparams rejects lists and None)."""
    flat = {}
    for key, value in arguments.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        flat[key] = "" if value is None else value
    flat.update({f"plan/{k}": v for k, v in plan.to_json().items()})
    return flat


class MetricsLog:
    """Logs to Accelerate's trackers and mirrors every record to ``metrics.jsonl``."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE

    def log(self, values: dict, step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            record = {"step": step} | {k: _plain(v) for k, v in values.items()}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """On resume, forget records of steps that the checkpoint does not contain."""
        kept = [r for r in read_metrics(self.path.parent) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class StartupClock:
    """How long each part of the start-up took, the wait before the first step.

    On a GPU a short run can spend most of its time here (loading, the cache build, moving
    models), so the run says where: ``lap`` closes a part, timed from the previous lap.
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = now - self._last
        self._last = now

    def metrics(self) -> dict:
        parts = {f"startup/{part}_seconds": seconds for part, seconds in self.seconds.items()}
        return {"startup_seconds": sum(self.seconds.values())} | parts

    def summary(self) -> str:
        parts = ", ".join(f"{part.replace('_', ' ')} {seconds:.1f} s" for part, seconds in self.seconds.items())
        return f"{sum(self.seconds.values()):.1f} s ({parts})"


def device_memory(device) -> dict:
    """Peak accelerator memory since the process started, in GiB; nothing on the CPU.

    Allocated is what tensors held; reserved is what PyTorch's caching allocator took from the
    card, the figure to compare with its size (plus ~0.5 GiB of CUDA context).
    """
    if device.type != "cuda":
        return {}
    gib = 2**30
    return {
        "peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
    }


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
