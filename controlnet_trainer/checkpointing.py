"""Resumable checkpoints: written whole or not at all, rotated only after the new one exists.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding Accelerate's state (optimizer,
scheduler, random states), the ControlNet in ``save_pretrained`` form under ``controlnet/``
and ``training_state.json``, the named progress that resuming reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from diffusers import ControlNetModel
from diffusers.training_utils import EMAModel

from . import sharding
from .errors import InputError

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class TrainingProgress:
    """Where training stands: enough to continue exactly where it stopped."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    seed: int = 0
    # [samples per micro-batch, processes]: the size batch_in_epoch counts in (None: older saves)
    batch_layout: list[int] | None = None

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> TrainingProgress:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def register_model_hooks(accelerator: Accelerator, ema: EMAModel | None = None) -> None:
    """Save the ControlNet (and its EMA) as diffusers models in checkpoints, load them back."""

    def save_hook(models, weights, output_dir):
        for model in models:  # every rank: gathering shards or fp32 partitions is a collective
            full = sharding.controlnet_to_save(accelerator, model)
            if accelerator.is_main_process:
                full.save_pretrained(Path(output_dir) / "controlnet")
        if ema is not None and accelerator.is_main_process:
            ema.save_pretrained(Path(output_dir) / "controlnet_ema")
        # Accelerate would also pickle the weights; the diffusers copy above is enough.
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = ControlNetModel.from_pretrained(input_dir, subfolder="controlnet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded
        if ema is not None:
            saved = EMAModel.from_pretrained(Path(input_dir) / "controlnet_ema", model_cls=ControlNetModel)
            ema.load_state_dict(saved.state_dict())
            del saved

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Partial ones never carry the final name."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, progress: TrainingProgress, total_limit: int | None
) -> Path:
    """Write ``checkpoint-<step>`` under a temporary name, rename it into place, then rotate."""
    final = output_dir / f"checkpoint-{progress.global_step}"
    partial = output_dir / f".checkpoint-{progress.global_step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))  # every rank: DeepSpeed and FSDP need it
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress.save(partial)
            _fsync_tree(partial)
    except Exception as error:  # torch.save reports a full disk as RuntimeError, safetensors its own
        shutil.rmtree(partial, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        raise CheckpointError(
            f"Saving {final.name} failed ({getattr(error, 'strerror', None) or error}); nothing of it was kept, and "
            f"{kept[-1] if kept else 'no earlier checkpoint'} is intact. Free disk space (or lower "
            "--checkpoints_total_limit), then rerun with --resume_from_checkpoint=latest."
        ) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(output_dir)
        remove_old_checkpoints(output_dir, total_limit)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


def remove_old_checkpoints(output_dir: Path, total_limit: int | None) -> list[Path]:
    """Keep the newest ``total_limit`` complete checkpoints; called after a save completes."""
    if total_limit is None:
        return []
    stale = list_checkpoints(output_dir)[:-total_limit]
    if stale:
        logger.info("Removing %d old checkpoint(s): %s", len(stale), ", ".join(p.name for p in stale))
    for path in stale:
        shutil.rmtree(path)
    return stale


def _fsync_tree(root: Path) -> None:
    """Flush every file so a power loss after the rename cannot leave empty files behind."""
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from, None to start fresh; a named one must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning(
                "--resume_from_checkpoint=latest: no complete checkpoint in %s; starting a new training run.",
                output_dir,
            )
            return None
        return found[-1]
    path = Path(resume_from)
    if not path.is_dir():
        path = output_dir / resume_from
    if not path.is_dir():
        names = [p.name for p in list_checkpoints(output_dir)] or ["none"]
        raise CheckpointError(
            f"--resume_from_checkpoint={resume_from!r}: no such checkpoint (looked for it as a path "
            f"and in {output_dir}; complete checkpoints there: {', '.join(names)}). Pass one of "
            "them, 'latest', or drop the flag to start fresh."
        )
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint of this trainer (it has no {STATE_FILE}); it may "
            "have been cut off while saving. Resume from an earlier checkpoint or 'latest'."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainingProgress:
    accelerator.load_state(str(path))
    progress = TrainingProgress.load(path)
    logger.info("Resumed from %s at step %d", path, progress.global_step)
    return progress
