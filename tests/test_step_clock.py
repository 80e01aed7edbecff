"""benchmarks/step_clock.py: timing any training script's optimizer steps from outside it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, script_env, train_argv

sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark import run_clocked
from step_clock import step_seconds


def test_step_times_leave_out_the_warm_up_steps_as_the_trainers_log_does():
    # Readings after steps 1..5: step 2 took 10 s (warm-up), steps 3..5 took 1, 2 and 1 s.
    readings = [0.0, 10.0, 11.0, 13.0, 14.0]
    assert step_seconds(readings, warmup=2) == 1.0  # steps 3..5
    assert step_seconds(readings, warmup=1) == 1.5  # steps 2..5: the warm-up step counts
    # Step 1 has no reading before it, so it is always left out.
    assert step_seconds(readings, warmup=0) == step_seconds(readings, warmup=1)


def test_too_few_steps_for_the_warm_up_is_an_error():
    with pytest.raises(ValueError, match="3 optimizer steps leave no step time after 3"):
        step_seconds([0.0, 1.0, 2.0], warmup=3)


SCRIPT = """
import sys
import time

import torch

from pace import SECONDS  # a module beside the script: importable as when the script runs itself

weight = torch.nn.Parameter(torch.zeros(2))
optimizer = torch.optim.SGD([weight], lr=0.1)
for _ in range(int(sys.argv[1])):
    time.sleep(SECONDS)
    weight.grad = torch.ones(2)
    optimizer.step()
"""


def test_clocks_every_optimizer_step_of_an_unchanged_script(tmp_path):
    (tmp_path / "pace.py").write_text("SECONDS = 0.05\n")
    (tmp_path / "train.py").write_text(SCRIPT)
    out = tmp_path / "steps.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "step_clock.py"), f"--out={out}", "--"]
    done = subprocess.run(
        [*command, str(tmp_path / "train.py"), "6"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    readings = json.loads(out.read_text())["optimizer_step_ends"]
    assert len(readings) == 6
    assert 0.05 <= step_seconds(readings, warmup=1) < 0.5


def test_clocks_the_trainer_through_accelerates_optimizer_wrapper(assets, tmp_path):
    # accelerate wraps the optimizer; the global hook must still see each real step, once.
    flags = train_argv(assets, tmp_path / "run", max_train_steps=4, gradient_accumulation_steps=2)
    result = run_clocked(ROOT / "train_controlnet.py", flags, script_env())
    assert len(result["optimizer_step_ends"]) == 4
    assert (tmp_path / "run" / "diffusion_pytorch_model.safetensors").exists()
