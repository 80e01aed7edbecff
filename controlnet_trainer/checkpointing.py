"""Resumable checkpoints: written whole or not at all, rotated only after the new one exists.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding Accelerate's state (optimizer,
scheduler, random states), the ControlNet in ``save_pretrained`` form under ``controlnet/``
(``flux_controlnet/`` for Flux, as diffusers names it) and ``training_state.json``, the named progress that resuming reads.

diffusers' training scripts write the same folders without ``training_state.json``; those resume
too, with the progress derived from the step in the folder's name. A run never writes over or
deletes a ``checkpoint-<step>`` folder that this trainer did not write.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from . import sharding
from .errors import InputError

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What diffusers' ControlNet scripts leave in a complete checkpoint: Accelerate's optimizer and
# scheduler states and the ControlNet their save hook writes, in one of CONTROLNET_FOLDERS (its
# config and weights are checked apart, since weights are stored as safetensors or as a .bin).
DIFFUSERS_FILES = ("optimizer.bin", "scheduler.bin")
CONTROLNET_FOLDERS = ("controlnet", "flux_controlnet")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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


def register_model_hooks(accelerator: Accelerator, ema: EMAModel | None = None, *, folder: str = "controlnet") -> None:
    """Save the ControlNet (and its EMA) as diffusers models in checkpoints (the ControlNet in
    ``folder``, the family's name for it), load them back."""

    def save_hook(models, weights, output_dir):
        for model in models:  # every rank: gathering shards or fp32 partitions is a collective
            full = sharding.controlnet_to_save(accelerator, model)
            if accelerator.is_main_process:
                full.save_pretrained(Path(output_dir) / folder)
        if ema is not None and accelerator.is_main_process:
            ema.save_pretrained(Path(output_dir) / "controlnet_ema")
        # Accelerate would also pickle the weights; the diffusers copy above is enough.
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        controlnet = None
        while models:
            controlnet = accelerator.unwrap_model(models.pop())
            model_class = sharding.controlnet_class(controlnet)
            loaded = model_class.from_pretrained(input_dir, subfolder=folder)
            controlnet.register_to_config(**loaded.config)
            controlnet.load_state_dict(loaded.state_dict())
            del loaded
        if ema is None:
            return
        if (Path(input_dir) / "controlnet_ema").is_dir():
            model_class = sharding.controlnet_class(controlnet)
            saved = EMAModel.from_pretrained(Path(input_dir) / "controlnet_ema", model_cls=model_class)
            ema.load_state_dict(saved.state_dict())
            del saved
        else:  # saved without --use_ema, by this trainer or by diffusers' script
            logger.warning("%s holds no EMA weights; --use_ema averages from its weights on.", input_dir)
            ema.load_state_dict({"shadow_params": [parameter.detach() for parameter in controlnet.parameters()]})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder, whoever wrote it, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if (match := _CHECKPOINT.match(path.name)) and path.is_dir()
    ]
    return sorted(found)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of this trainer, oldest first. Partial ones never carry the final name."""
    return [path for _, path in checkpoint_folders(output_dir) if is_ours(path)]


def is_ours(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def is_diffusers_checkpoint(path: Path) -> bool:
    """A complete checkpoint of one of diffusers' ControlNet training scripts."""
    if is_ours(path) or not all((path / name).is_file() for name in DIFFUSERS_FILES):
        return False
    return any(
        (path / folder / "config.json").is_file() and any((path / folder / name).is_file() for name in WEIGHT_FILES)
        for folder in CONTROLNET_FOLDERS
    )


def foreign_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` folders this trainer did not write: diffusers' or unknown ones."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if not is_ours(path)]


def describe_foreign(path: Path) -> str:
    if is_diffusers_checkpoint(path):
        return f"{path.name} (written by diffusers' training script)"
    return f"{path.name} (not written by this trainer, and not a complete diffusers checkpoint)"


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
            if not is_ours(final):  # check_output_dir refuses such runs before they start
                shutil.rmtree(partial, ignore_errors=True)
                raise CheckpointError(
                    f"{final} exists and was not written by this trainer; it is kept as it is and this "
                    "state was not saved. Move it away, then resume with --resume_from_checkpoint=latest."
                )
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


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from."""

    path: Path
    step: int
    saved: TrainingProgress | None  # this trainer's progress; None for diffusers' checkpoints


def resume_point(path: Path) -> ResumePoint:
    if is_ours(path):
        saved = TrainingProgress.load(path)
        return ResumePoint(path, saved.global_step, saved)
    match = _CHECKPOINT.match(path.name)
    if match is None:
        raise CheckpointError(
            f"{path} has no {STATE_FILE}, and without one its step is read from a folder name of the "
            "form checkpoint-<step>, which it does not have. Rename it to checkpoint-<step>."
        )
    return ResumePoint(path, int(match.group(1)), saved=None)


def resolve_resume(output_dir: Path, resume_from: str | None) -> ResumePoint | None:
    """The checkpoint to resume from, None to start fresh; a named one must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        folders = [path for _, path in checkpoint_folders(output_dir)]
        usable = [path for path in folders if is_ours(path) or is_diffusers_checkpoint(path)]
        if not usable:
            if folders:  # check_output_dir names them and refuses
                return None
            logger.warning(
                "--resume_from_checkpoint=latest: no complete checkpoint in %s; starting a new training run.",
                output_dir,
            )
            return None
        return resume_point(usable[-1])
    path = Path(resume_from)
    if not path.is_dir():
        path = output_dir / resume_from
    if not path.is_dir():
        names = [p.name for _, p in checkpoint_folders(output_dir)] or ["none"]
        raise CheckpointError(
            f"--resume_from_checkpoint={resume_from!r}: no such checkpoint (looked for it as a path "
            f"and in {output_dir}; checkpoints there: {', '.join(names)}). Pass one of "
            "them, 'latest', or drop the flag to start fresh."
        )
    if not (is_ours(path) or is_diffusers_checkpoint(path)):
        raise CheckpointError(
            f"{path} is not a complete checkpoint: it has neither this trainer's {STATE_FILE} nor all of "
            f"what diffusers' scripts save ({', '.join(DIFFUSERS_FILES)} and the ControlNet's config and "
            f"weights in {' or '.join(f'{folder}/' for folder in CONTROLNET_FOLDERS)}); it "
            "may have been cut off while saving. Resume from an earlier checkpoint or 'latest'."
        )
    return resume_point(path)


def check_output_dir(output_dir: Path, resume: ResumePoint | None) -> None:
    """Refuse a run that could mix with another run's checkpoints or write over a folder it did not write.

    A fresh run refuses any checkpoint folder (rotation would delete this trainer's); a resumed one
    refuses foreign folders past its starting step, since any step it reaches may be saved (a
    preemption stops at whatever step it comes).
    """
    if resume is None and (ours := list_checkpoints(output_dir)):
        raise CheckpointError(
            f"--output_dir {output_dir} already holds checkpoints of another run "
            f"({', '.join(p.name for p in ours)}). To continue that run add "
            "--resume_from_checkpoint=latest; to start a new one choose another --output_dir."
        )
    start = 0 if resume is None else resume.step
    ahead = [path for step, path in foreign_checkpoints(output_dir) if resume is None or step > start]
    if not ahead:
        return
    names = ", ".join(describe_foreign(path) for path in ahead)
    if resume is None:
        fix = (
            "To continue the run that wrote it, add --resume_from_checkpoint=latest (diffusers' checkpoints "
            "resume too); to start a new run, choose another --output_dir."
        )
    else:
        fix = (
            f"Resume from the newest of them instead (--resume_from_checkpoint={ahead[-1].name}) if it is "
            "complete, move them out of the folder, or choose another --output_dir."
        )
    raise CheckpointError(
        f"--output_dir {output_dir} holds {names}, which this run could write over: it never replaces "
        f"a checkpoint folder it did not write. {fix}"
    )


def load_checkpoint(
    accelerator: Accelerator, resume: ResumePoint, seed: int, batches_per_epoch: int | None, accumulation: int
) -> TrainingProgress:
    """Load the state of ``resume`` into the prepared objects; returns the progress to go on from."""
    try:
        accelerator.load_state(str(resume.path))
    # Other shapes (another base model), another optimizer or a missing file of Accelerate's.
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        reason = " ".join(str(error).split())
        if len(reason) > 300:  # a state dict's mismatch lists every tensor
            reason = reason[:300].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(
            f"{resume.path} does not fit this run ({reason}). A checkpoint resumes "
            "with the model and optimizer flags it was saved with (--pretrained_model_name_or_path, "
            "--use_8bit_adam, --mixed_precision); pass those, or start a new run in another --output_dir."
        ) from error
    if resume.saved is not None:
        logger.info("Resumed from %s at step %d", resume.path, resume.step)
        return resume.saved
    progress = progress_at_step(resume.step, seed, batches_per_epoch, accumulation)
    logger.warning(
        "Resumed from %s, written by diffusers' training script: its ControlNet weights, optimizer, "
        "learning-rate schedule and step count (%d) are restored. Its position in the data order is not "
        "saved, so this run continues epoch %d after the first %d batches of its own order, where a run "
        "of this trainer would have been at step %d (diffusers' own resume would start the epoch over). "
        "The seed is %d; checkpoints from here on are this trainer's and resume exactly.",
        resume.path,
        resume.step,
        progress.epoch,
        progress.batch_in_epoch,
        resume.step,
        seed,
    )
    return progress


def progress_at_step(step: int, seed: int, batches_per_epoch: int | None, accumulation: int) -> TrainingProgress:
    """Where this trainer stands after ``step`` optimizer steps from the start of its first epoch.

    An epoch takes ceil(batches / accumulation) steps: its last step may accumulate fewer batches.
    A stream's epoch length is unknown, so its steps all count in its first epoch.
    """
    if batches_per_epoch is None:
        return TrainingProgress(global_step=step, batch_in_epoch=step * accumulation, seed=seed)
    epoch, steps_into_epoch = divmod(step, math.ceil(batches_per_epoch / accumulation))
    return TrainingProgress(global_step=step, epoch=epoch, batch_in_epoch=steps_into_epoch * accumulation, seed=seed)
