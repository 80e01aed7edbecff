"""Checkpoints written by diffusers' training scripts resume here, and no run writes over or deletes a
checkpoint folder it did not write."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from conftest import step_records, train_argv
from diffusers import ControlNetModel
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from controlnet_trainer import checkpointing
from controlnet_trainer.checkpointing import CheckpointError, TrainingProgress
from controlnet_trainer.cli import run

LEARNING_RATE = 1e-3
MAX_STEPS = 4  # the schedule's length, in the diffusers run and in the run that continues it


def write_diffusers_checkpoint(controlnet_dir: Path, output_dir: Path, step: int) -> Path:
    """``checkpoint-<step>`` as diffusers' train_controlnet.py leaves it: Accelerate's state of a
    prepared ControlNet, torch AdamW and linear LR schedule after ``step`` optimizer steps, with a
    save hook that writes the ControlNet under ``controlnet/`` in place of Accelerate's weights."""
    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir=str(output_dir)))
    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=LEARNING_RATE)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=MAX_STEPS)

    def save_controlnet(models, weights, folder):
        for model in models:
            accelerator.unwrap_model(model).save_pretrained(Path(folder) / "controlnet")
            weights.pop()

    accelerator.register_save_state_pre_hook(save_controlnet)
    controlnet, optimizer, scheduler = accelerator.prepare(controlnet, optimizer, scheduler)
    generator = torch.Generator().manual_seed(step)
    for _ in range(step):  # gradients of any loss give the optimizer a real state
        for parameter in controlnet.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    path = output_dir / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return path


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def optimizer_steps(checkpoint: Path) -> set[float]:
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return {float(entry["step"]) for entry in state.values()}


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_a_diffusers_checkpoint_resumes_with_its_weights_optimizer_schedule_and_step(
    sdxl_assets, tmp_path, caplog, sdxl
):
    assets = sdxl_assets
    output_dir = tmp_path / "out"
    theirs = write_diffusers_checkpoint(assets["controlnet_sdxl" if sdxl else "controlnet"], output_dir, step=2)
    before = fingerprint(theirs)
    flags = dict(
        sdxl=sdxl,
        learning_rate=LEARNING_RATE,
        lr_scheduler="linear",
        max_train_steps=MAX_STEPS,
        resume_from_checkpoint="latest",
        checkpoints_total_limit=1,
    )
    with caplog.at_level(logging.WARNING, logger="controlnet_trainer.checkpointing"):
        result = run(train_argv(assets, output_dir, stop_at_step=3, use_ema=True, **flags), family="sdxl" if sdxl else "sd")
    assert result.global_step == 3 and result.stopped_early
    assert "written by diffusers' training script" in caplog.text
    assert "continues epoch 0 after the first 2 batches" in caplog.text
    assert "holds no EMA weights" in caplog.text

    ours = output_dir / "checkpoint-3"
    assert optimizer_steps(theirs) == {2.0} and optimizer_steps(ours) == {3.0}  # AdamW's state went on
    assert torch.load(ours / "scheduler.bin", weights_only=True)["last_epoch"] == 3
    # The linear schedule after 3 of 4 steps, not after 1 (a restarted schedule would log 7.5e-4).
    assert [(r["step"], r["lr"]) for r in step_records(output_dir)] == [(3, pytest.approx(LEARNING_RATE / 4))]
    progress = TrainingProgress.load(ours)
    assert (progress.global_step, progress.epoch, progress.batch_in_epoch) == (3, 0, 3)  # 6 batches an epoch
    # --checkpoints_total_limit=1 rotates only this trainer's checkpoints; theirs is untouched.
    assert fingerprint(theirs) == before

    if sdxl:
        return
    # With no step left, the final model is the diffusers checkpoint's ControlNet, weight for weight.
    again = tmp_path / "again"
    run(train_argv(assets, again, max_train_steps=2, resume_from_checkpoint=theirs))
    saved = load_file(theirs / "controlnet" / "diffusion_pytorch_model.safetensors")
    final = load_file(again / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[name], final[name]) for name in saved)


@pytest.fixture(scope="module")
def diffusers_checkpoint(assets, tmp_path_factory) -> Path:
    return write_diffusers_checkpoint(assets["controlnet"], tmp_path_factory.mktemp("diffusers"), step=2)


def copy_of(checkpoint: Path, output_dir: Path, name: str | None = None) -> Path:
    target = output_dir / (name or checkpoint.name)
    for path in checkpoint.rglob("*"):
        if path.is_file():
            (target / path.relative_to(checkpoint)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(checkpoint)).write_bytes(path.read_bytes())
    return target


def test_a_new_run_never_starts_over_a_diffusers_checkpoint(assets, diffusers_checkpoint, tmp_path):
    theirs = copy_of(diffusers_checkpoint, tmp_path)
    before = fingerprint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint-2 \(written by diffusers.*--resume_from_checkpoint=latest"):
        run(train_argv(assets, tmp_path, max_train_steps=2, checkpointing_steps=2))
    assert fingerprint(tmp_path) == before and theirs.is_dir()


def test_a_resume_never_runs_into_a_foreign_checkpoint_ahead(assets, diffusers_checkpoint, tmp_path):
    copy_of(diffusers_checkpoint, tmp_path)
    (tmp_path / "checkpoint-4" / "controlnet").mkdir(parents=True)  # cut off while diffusers saved it
    before = fingerprint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 \(not written by this trainer.*could write over"):
        run(train_argv(assets, tmp_path, max_train_steps=6, resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is not a complete checkpoint"):
        run(train_argv(assets, tmp_path, max_train_steps=6, resume_from_checkpoint="checkpoint-4"))
    assert fingerprint(tmp_path) == before


def test_latest_with_only_an_unusable_foreign_checkpoint_is_refused(assets, tmp_path):
    (tmp_path / "checkpoint-2" / "controlnet").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"holds checkpoint-2 \(not written by this trainer"):
        run(train_argv(assets, tmp_path, max_train_steps=2, resume_from_checkpoint="latest"))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_saving_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "checkpoint-1"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("theirs")
    accelerator = Accelerator()
    with pytest.raises(CheckpointError, match="was not written by this trainer"):
        checkpointing.save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=1), total_limit=None)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert (foreign / "notes.txt").read_text() == "theirs"


def steps_of_this_trainer(batches: int, accumulation: int, epochs: int) -> list[TrainingProgress]:
    """The progress after each optimizer step, as the training loop advances it: a step ends every
    ``accumulation`` micro-batches and at the end of each epoch."""
    from controlnet_trainer.loop import advance

    progress, seen = TrainingProgress(), []
    for epoch in range(epochs):
        for done in range(1, batches + 1):
            if done % accumulation == 0 or done == batches:
                progress = advance(progress, epoch, done, batches)
                seen.append(progress)
    return seen


@pytest.mark.parametrize(("batches", "accumulation"), [(6, 1), (5, 2), (7, 3)])
def test_a_diffusers_step_resumes_where_this_trainer_would_stand(batches, accumulation):
    for expected in steps_of_this_trainer(batches, accumulation, epochs=3):
        derived = checkpointing.progress_at_step(
            expected.global_step, seed=0, batches_per_epoch=batches, accumulation=accumulation
        )
        assert (derived.epoch, derived.batch_in_epoch) == (expected.epoch, expected.batch_in_epoch)


def test_a_checkpoint_of_another_base_model_is_refused_with_the_flags_to_check(sdxl_assets, tmp_path):
    write_diffusers_checkpoint(sdxl_assets["controlnet_sdxl"], tmp_path, step=2)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-2 does not fit this run \(Error.*loading state_dict.*\.\.\.\)\. .*--pretrained_model",
    ):
        run(train_argv(sdxl_assets, tmp_path, max_train_steps=3, resume_from_checkpoint="latest"))
