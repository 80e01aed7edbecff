"""Real processes: `accelerate launch` of the entry script, and preemption by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT, script_env, step_records, train_argv
from safetensors.torch import load_file

from controlnet_trainer.cli import run


def test_accelerate_launch_trains_and_saves(assets, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", "--cpu",
        str(ROOT / "train_controlnet.py"),
        *train_argv(assets, tmp_path, max_train_steps=3, checkpointing_steps=2, report_to="tensorboard"),
    ]  # fmt: skip
    done = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*")), "TensorBoard wrote nothing"


def test_bad_input_exits_with_one_paragraph(assets, tmp_path):
    command = [sys.executable, str(ROOT / "train_controlnet.py"), *train_argv(assets, tmp_path, resolution=65)]
    done = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: `--resolution` must be divisible by 8")
    assert "Traceback" not in done.stderr


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(step_records(metrics.parent)) >= step:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_sigterm_saves_and_resume_matches_uninterrupted_run(assets, tmp_path):
    flags = dict(max_train_steps=30, lr_scheduler="linear", lr_warmup_steps=3)
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(ROOT / "train_controlnet.py"), *train_argv(assets, interrupted, **flags)]
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(interrupted / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = [p.name for p in interrupted.glob("checkpoint-*")]
    assert len(saved) == 1 and "Stopped by SIGTERM" in stderr and "--resume_from_checkpoint=latest" in stderr
    stopped_at = json.loads((interrupted / saved[0] / "training_state.json").read_text())["global_step"]
    assert 2 <= stopped_at < 30 and not (interrupted / "config.json").exists()

    run(train_argv(assets, interrupted, resume_from_checkpoint="latest", **flags))
    run(train_argv(assets, tmp_path / "straight", **flags))
    resumed = load_file(interrupted / "diffusion_pytorch_model.safetensors")
    straight = load_file(tmp_path / "straight" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
