"""SIGKILL at random moments, saves included: every resume starts from the newest complete
checkpoint, and the run still ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, script_env, step_records, train_argv
from safetensors.torch import load_file

from controlnet_trainer.checkpointing import list_checkpoints
from controlnet_trainer.cli import run

FLAGS = dict(max_train_steps=14, checkpointing_steps=1, checkpoints_total_limit=2, lr_scheduler="cosine")


def kill_after(argv: list[str], output_dir, steps_done: int, extra_seconds: float, timeout: float = 180) -> bool:
    """Run until ``steps_done`` steps are logged, wait a little longer, SIGKILL; False if it finished."""
    command = [sys.executable, str(ROOT / "train_controlnet.py"), *argv]
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        logged = len(step_records(output_dir))
        if logged >= steps_done:
            time.sleep(extra_seconds)
            break
        time.sleep(0.01)
    if process.poll() is not None:
        assert process.returncode == 0, process.stderr.read().decode()[-3000:]
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def test_sigkill_at_random_moments_then_resume_is_exact(assets, tmp_path):
    output_dir = tmp_path / "killed"
    argv = train_argv(assets, output_dir, resume_from_checkpoint="latest", **FLAGS)
    rng = random.Random(1234)
    kills = 0
    previous_newest = 0
    for _ in range(4):
        # Each attempt resumes, gets at least one step further, then dies at a random moment:
        # between steps, mid-step or mid-save (every step saves a checkpoint here).
        if not kill_after(argv, output_dir, previous_newest + rng.randint(1, 3), rng.uniform(0.0, 0.3)):
            break
        kills += 1
        complete = list_checkpoints(output_dir)
        newest = int(complete[-1].name.split("-")[1]) if complete else 0
        assert newest >= previous_newest, "a complete checkpoint disappeared"
        assert len(complete) <= 2  # rotation never leaves more than the limit
        previous_newest = newest
    assert kills >= 2
    # Finish the run from wherever the last kill left it.
    run(argv)
    run(train_argv(assets, tmp_path / "straight", **FLAGS))
    killed = load_file(output_dir / "diffusion_pytorch_model.safetensors")
    straight = load_file(tmp_path / "straight" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(killed[k], straight[k]) for k in straight)
    steps = [record["step"] for record in step_records(output_dir)]
    assert steps == list(range(1, 15))  # one record per step: the killed runs' extras were dropped
