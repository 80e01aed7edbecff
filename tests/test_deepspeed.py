"""DeepSpeed through accelerate's own configuration, on CPU, in one process and in two.

One process is how accelerate runs DeepSpeed on CPU unaided. Across processes it runs DeepSpeed
only on accelerators (on CPU each rank's state sees a world of one), so the two-process launches
go through engines_on_cpu.py, which lifts that single gate; ZeRO-2 then partitions the optimizer
state between two gloo processes. Either way the ControlNet and its optimizer live inside a real
ZeRO-2 engine: checkpoints hold DeepSpeed's own state, resume goes through it, and the final
weights must equal a plain one-process run's with the same global batch. ZeRO-3 must be refused
before any training.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    accelerate_launch,
    finished,
    free_port,
    script_env,
    start_accelerate_launch,
    train_argv,
    use_environment,
)
from safetensors.torch import load_file

from controlnet_trainer.cli import run

pytest.importorskip("deepspeed")

WEIGHTS = "diffusion_pytorch_model.safetensors"


def deepspeed_config(path: Path, zero_stage: int, processes: int = 1, mixed_precision: str = "'no'") -> Path:
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: DEEPSPEED\n"
        "deepspeed_config:\n"
        f"  zero_stage: {zero_stage}\n"
        "  gradient_accumulation_steps: 1\n"
        "  gradient_clipping: 1.0\n"
        "  offload_optimizer_device: none\n"
        f"mixed_precision: {mixed_precision}\n"
        "num_machines: 1\n"
        f"num_processes: {processes}\n"
    )
    return path


def launch(config: Path, argv: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    # One process starts DeepSpeed on CPU unaided, and only without accelerate's forced CPU.
    return accelerate_launch(["--config_file", str(config)], argv, engine_on_cpu=processes > 1, timeout=600)


@pytest.mark.parametrize("processes", [1, 2])
def test_zero2_checkpoints_and_resumes_through_the_engine_like_a_plain_run(assets, tmp_path, processes):
    config = deepspeed_config(tmp_path / "zero2.yaml", zero_stage=2, processes=processes)
    # Adam's eps well above the last bits that two processes' gradient sums differ by, so that
    # no weight with a near-zero gradient steps the other way (see test_fsdp.py's COMMON).
    common = {"max_train_steps": 4, "checkpointing_steps": 2, "train_batch_size": 2, "adam_epsilon": 1e-3}
    argv = train_argv(assets, tmp_path / "zero2", stop_at_step=2, **common)
    started = start_accelerate_launch(["--config_file", str(config)], argv, engine_on_cpu=processes > 1)
    try:  # the plain run trains here meanwhile
        run(train_argv(assets, tmp_path / "plain", **common | {"train_batch_size": 2 * processes}))
    finally:
        first = finished(started, timeout=600)
    assert first.returncode == 0, first.stderr[-5000:]
    engine_state = tmp_path / "zero2" / "checkpoint-2" / "pytorch_model"
    # ZeRO-2: each rank holds and saves its own partition of the optimizer state.
    assert len(list(engine_state.glob("*optim_states.pt"))) == processes
    argv = train_argv(assets, tmp_path / "zero2", resume_from_checkpoint="latest", **common)
    resumed = launch(config, argv, processes)
    assert resumed.returncode == 0, resumed.stderr[-5000:]

    engine = load_file(tmp_path / "zero2" / WEIGHTS)
    plain = load_file(tmp_path / "plain" / WEIGHTS)
    assert engine.keys() == plain.keys()
    assert max((engine[k] - plain[k]).abs().max().item() for k in plain) < 1e-6


def test_zero2_in_bf16_saves_the_optimizers_fp32_weights_not_the_rounded_module(assets, tmp_path):
    # In bf16 DeepSpeed turns the module itself to bf16 and keeps the fp32 weights in the
    # optimizer's partitions. Saving the module rounded every weight to bf16 (and saved bf16).
    config = deepspeed_config(tmp_path / "zero2.yaml", zero_stage=2, processes=2, mixed_precision="bf16")
    argv = train_argv(assets, tmp_path / "bf16", max_train_steps=2, checkpointing_steps=2, train_batch_size=2)
    done = launch(config, argv, processes=2)
    assert done.returncode == 0, done.stderr[-5000:]
    for saved in (tmp_path / "bf16", tmp_path / "bf16" / "checkpoint-2" / "controlnet"):
        weights = load_file(saved / WEIGHTS)
        assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
        # fp32 updates on bf16-rounded starting weights: most no longer fit in bf16.
        kept = sum((tensor != tensor.bfloat16().float()).sum().item() for tensor in weights.values())
        assert kept > 0.5 * sum(tensor.numel() for tensor in weights.values())


def launched_rank_env(config: Path) -> dict[str, str]:
    """The environment of the one rank that `accelerate launch --config_file config` starts: what
    accelerate's own launcher derives from the configuration, and the rank variables its torchrun
    adds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train_controlnet.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    args.main_process_port = free_port()
    _, env = prepare_deepspeed_cmd_env(args)
    rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    return env | rank | {"MASTER_PORT": str(args.main_process_port)}


def test_zero3_is_refused_before_training(assets, tmp_path, monkeypatch):
    """The launched rank's start, in this process: a ZeRO-3 configuration stops the run at the
    accelerator, before any data or model is loaded."""
    from controlnet_trainer.errors import TrainingError

    config = deepspeed_config(tmp_path / "zero3.yaml", zero_stage=3)
    use_environment(monkeypatch, script_env())  # the launcher's, as for a launch
    use_environment(monkeypatch, launched_rank_env(config))
    try:
        with pytest.raises(TrainingError, match="ZeRO-3"):
            run(train_argv(assets, tmp_path / "zero3"))
    finally:
        # The rank's process group, which DeepSpeed started here, ends with the test.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert not (tmp_path / "zero3" / "metrics.jsonl").exists()
