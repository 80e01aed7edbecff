"""Shared offline fixtures: tiny models and fill data, built once per test session."""

from __future__ import annotations

import gc

# Collection waits until every test module, and the training stack they import, has loaded: see
# pytest_collection_finish.
gc.disable()

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from controlnet_trainer import fixtures

RESOLUTION = 64
ROOT = Path(__file__).resolve().parents[1]
ENGINES_ON_CPU = Path(__file__).with_name("engines_on_cpu.py")


def script_env(**extra) -> dict:
    """The environment of a training script run as a child process: offline, importing this
    checkout, and free of the caller's accelerate settings (a config file, forced CPU)."""
    # This checkout first, then whatever the caller's path adds (packages installed beside it).
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("ACCELERATE_CONFIG_FILE", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    return env | extra


def use_environment(monkeypatch, env: dict[str, str]) -> None:
    """This process's environment becomes ``env`` until the test ends."""
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def free_port() -> int:
    """A port nobody listens on now: launches that run side by side (pytest -n) never share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_accelerate_launch(
    launch_flags: list[str], argv: list[str], *, engine_on_cpu: bool = False
) -> subprocess.Popen:
    """train_controlnet.py under `accelerate launch` with ``launch_flags``, started. With
    ``engine_on_cpu``, the FSDP or DeepSpeed run the configuration asks for spans CPU processes:
    accelerate's CPU mode, and engines_on_cpu.py to lift accelerate's GPU-only check."""
    command = [sys.executable, "-m", "accelerate.commands.launch", f"--main_process_port={free_port()}", *launch_flags]
    command += [str(ENGINES_ON_CPU)] if engine_on_cpu else []
    return subprocess.Popen(
        [*command, str(ROOT / "train_controlnet.py"), *argv],
        env=script_env(**({"ACCELERATE_USE_CPU": "true"} if engine_on_cpu else {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen, timeout: int = 900) -> subprocess.CompletedProcess:
    """A started launch, once it has ended."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def accelerate_launch(
    launch_flags: list[str], argv: list[str], *, engine_on_cpu: bool = False, timeout: int = 900
) -> subprocess.CompletedProcess:
    """train_controlnet.py under `accelerate launch` with ``launch_flags``, to its end (see
    start_accelerate_launch)."""
    return finished(start_accelerate_launch(launch_flags, argv, engine_on_cpu=engine_on_cpu), timeout)


# The files that take longest, slowest first: under the README's `pytest -n 2 --dist loadfile`
# each worker takes the next file when it finishes one, so starting these first leaves no long
# file running alone at the end. The other files keep their order.
SLOWEST_FILES = (
    "test_distributed.py",
    "test_fidelity_training.py",
    "test_deepspeed.py",
    "test_fsdp.py",
    "test_flux.py",
    "test_sd3.py",
    "test_training.py",
    "test_faults.py",
    "test_cache.py",
    "test_launch.py",
)


def pytest_configure(config):
    """A pytest-xdist worker shares the machine's cores with the other worker: one intra-op
    thread for its own tensors and for the training processes it starts (with more, the
    workers' thread barriers wait on each other). Launches of several ranks give each rank one
    thread anyway."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    order = {name: position for position, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: a file's tests keep their order


def pytest_collection_finish(session):
    """The test modules are imported: about a million objects (torch, diffusers, transformers)
    that live as long as the session. Frozen, no full collection walks them again; objects the
    tests make are collected as usual (controlnet_trainer.cli.settled_imports does the same for a
    training process)."""
    # The training stack itself, which most modules reach only through cli.run.
    from controlnet_trainer import training  # noqa: F401

    gc.freeze()
    gc.enable()


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD pipeline, its ControlNet, a 24-row fill dataset and validation images."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "sd": fixtures.build_tiny_sd(root / "tiny-sd"),
        "controlnet": fixtures.build_tiny_controlnet(root / "tiny-sd", root / "tiny-controlnet"),
        "fill": fixtures.build_fill_dataset(root / "fill", num_rows=24, size=RESOLUTION),
        "validation": fixtures.write_validation_images(root / "validation", count=1, size=RESOLUTION),
    }


@pytest.fixture(scope="session")
def sdxl_assets(tmp_path_factory, assets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets-sdxl")
    return assets | {
        "sdxl": fixtures.build_tiny_sdxl(root / "tiny-sdxl"),
        "controlnet_sdxl": fixtures.build_tiny_controlnet(root / "tiny-sdxl", root / "tiny-controlnet-sdxl"),
    }


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD3 pipeline and its ControlNet; ``assets | tiny_sd3`` adds the fill data. Built apart
    from ``assets`` so modules that define their own ``assets`` can use it too."""
    root = tmp_path_factory.mktemp("assets-sd3")
    return {
        "sd3": fixtures.build_tiny_sd3(root / "tiny-sd3"),
        "controlnet_sd3": fixtures.build_tiny_sd3_controlnet(root / "tiny-sd3", root / "tiny-controlnet-sd3"),
    }


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> dict[str, Path]:
    """Tiny FLUX.1-dev pipeline and its ControlNet, built apart from ``assets`` like ``tiny_sd3``."""
    root = tmp_path_factory.mktemp("assets-flux")
    return {
        "flux": fixtures.build_tiny_flux(root / "tiny-flux"),
        "controlnet_flux": fixtures.build_tiny_flux_controlnet(root / "tiny-flux", root / "tiny-controlnet-flux"),
    }


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_argv(assets: dict[str, Path], output_dir: Path, *, sdxl: bool = False, **flags) -> list[str]:
    """A small, fast command line on the fixtures; ``flags`` override or add --name=value."""
    base = {
        "pretrained_model_name_or_path": assets["sdxl" if sdxl else "sd"],
        "dataset_name": assets["fill"],
        "output_dir": output_dir,
        "resolution": RESOLUTION,
        "train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "max_train_steps": 4,
        "checkpointing_steps": 100,
        "validation_steps": 100,
        "seed": 0,
        "report_to": "none",
    }
    argv = []
    for name, value in (base | flags).items():
        if value is None:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv.append(f"--{name}={value}")
    return argv


def step_records(output_dir: Path) -> list[dict]:
    """metrics.jsonl's records of training steps (those with a loss): not the start-up record nor
    the fidelity records that share its file."""
    path = output_dir / "metrics.jsonl"
    # Whole lines only: tests poll the file while a run is writing it.
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [record for record in map(json.loads, lines) if "loss" in record]


def straight_and_resumed(assets: dict[str, Path], root: Path, stop_at: int, **flags) -> tuple[dict, dict]:
    """Final weights of a run straight through and of the same run stopped at ``stop_at``
    and resumed from its latest checkpoint (under ``root/straight`` and ``root/resumed``)."""
    from safetensors.torch import load_file

    from controlnet_trainer.cli import run

    run(train_argv(assets, root / "straight", **flags))
    run(train_argv(assets, root / "resumed", stop_at_step=stop_at, **flags))
    run(train_argv(assets, root / "resumed", resume_from_checkpoint="latest", **flags))
    return tuple(load_file(root / name / "diffusion_pytorch_model.safetensors") for name in ("straight", "resumed"))


def family_named(sdxl: bool = False):
    """The SD or SDXL family record."""
    from controlnet_trainer import families

    return families.by_name("sdxl" if sdxl else "sd")


def parsed(argv: list[str], sdxl: bool = False):
    """The flags of a training command line, parsed and checked as the scripts do."""
    from controlnet_trainer.arguments import parse_args

    return parse_args(argv, family_named(sdxl))


def settings_of(argv: list[str], sdxl: bool = False):
    """A training command line resolved into its settings records."""
    from controlnet_trainer.arguments import resolve

    family = family_named(sdxl)
    return resolve(parsed(argv, sdxl), family)
