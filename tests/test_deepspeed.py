"""DeepSpeed through accelerate's own configuration, on CPU, in one process.

accelerate runs DeepSpeed across processes only on accelerators (on CPU each rank's state sees a
world of one), so these launches use one process. That still puts the ControlNet and its optimizer
inside a real ZeRO-2 engine: checkpoints hold DeepSpeed's own state, resume goes through it, and
the final weights must equal a plain run's. ZeRO-3 must be refused before any training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, script_env, train_argv
from safetensors.torch import load_file

from controlnet_trainer.cli import run

pytest.importorskip("deepspeed")

WEIGHTS = "diffusion_pytorch_model.safetensors"


def deepspeed_config(path: Path, zero_stage: int) -> Path:
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: DEEPSPEED\n"
        "deepspeed_config:\n"
        f"  zero_stage: {zero_stage}\n"
        "  gradient_accumulation_steps: 1\n"
        "  gradient_clipping: 1.0\n"
        "  offload_optimizer_device: none\n"
        "mixed_precision: 'no'\n"
        "num_machines: 1\n"
        "num_processes: 1\n"
    )
    return path


def launch(config: Path, argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return subprocess.run(
        [*command, str(ROOT / "train_controlnet.py"), *argv],
        env=script_env(),  # DeepSpeed starts only without accelerate's forced CPU
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_zero2_checkpoints_and_resumes_through_the_engine_like_a_plain_run(assets, tmp_path):
    config = deepspeed_config(tmp_path / "zero2.yaml", zero_stage=2)
    common = {"max_train_steps": 4, "checkpointing_steps": 2, "train_batch_size": 2}
    first = launch(config, train_argv(assets, tmp_path / "zero2", stop_at_step=2, **common))
    assert first.returncode == 0, first.stderr[-5000:]
    assert (tmp_path / "zero2" / "checkpoint-2" / "pytorch_model").is_dir()  # the engine's own state
    resumed = launch(config, train_argv(assets, tmp_path / "zero2", resume_from_checkpoint="latest", **common))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    run(train_argv(assets, tmp_path / "plain", **common))

    engine = load_file(tmp_path / "zero2" / WEIGHTS)
    plain = load_file(tmp_path / "plain" / WEIGHTS)
    assert engine.keys() == plain.keys()
    assert max((engine[k] - plain[k]).abs().max().item() for k in plain) < 1e-6


def test_zero3_is_refused_before_training(assets, tmp_path):
    config = deepspeed_config(tmp_path / "zero3.yaml", zero_stage=3)
    done = launch(config, train_argv(assets, tmp_path / "zero3"))
    assert done.returncode != 0
    assert "ZeRO-3" in done.stderr
    assert not (tmp_path / "zero3" / "metrics.jsonl").exists()
