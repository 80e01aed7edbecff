"""Embedding cache: same training as without it, reused across runs, invalidated by changes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT, script_env, step_records, straight_and_resumed, train_argv
from safetensors.torch import load_file

from controlnet_trainer.cli import run
from controlnet_trainer.data import Columns, ControlNetDataset, PairedTransform

CACHE_FLAGS = {"cache_latents": True, "cache_text_embeddings": True}


def losses(output_dir) -> list[float]:
    return [record["loss"] for record in step_records(output_dir)]


def cache_dirs(root) -> set[str]:
    return {p.name for p in root.iterdir() if (p / "complete.json").exists()}


def test_cached_training_matches_uncached(assets, tmp_path):
    flags = dict(max_train_steps=8, proportion_empty_prompts=0.4, gradient_accumulation_steps=2)
    run(train_argv(assets, tmp_path / "plain", **flags))
    run(train_argv(assets, tmp_path / "cached", embeddings_cache_dir=tmp_path / "cache", **flags, **CACHE_FLAGS))
    # Same draws in the same order: only float rounding of batched VAE encoding may differ.
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    plain = load_file(tmp_path / "plain" / "diffusion_pytorch_model.safetensors")
    cached = load_file(tmp_path / "cached" / "diffusion_pytorch_model.safetensors")
    # Adam turns rounding-level gradient differences into updates of a fraction of the learning
    # rate (1e-3); a wrong latent or embedding would move weights by whole steps.
    worst = max((plain[k] - cached[k]).abs().max().item() for k in plain)
    assert worst < 2e-4


def test_cache_is_reused_and_invalidated(assets, tmp_path):
    cache_root = tmp_path / "cache"
    common = dict(max_train_steps=1, embeddings_cache_dir=cache_root, **CACHE_FLAGS)
    run(train_argv(assets, tmp_path / "a", **common))
    (first,) = cache_dirs(cache_root)
    stamp = (cache_root / first / "latent_mean_0.npy").stat().st_mtime_ns
    run(train_argv(assets, tmp_path / "b", **common))
    assert cache_dirs(cache_root) == {first}
    assert (cache_root / first / "latent_mean_0.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    run(train_argv(assets, tmp_path / "c", resolution=32, **common))
    run(train_argv(assets, tmp_path / "d", max_train_samples=12, **common))
    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision needs a new state
    run(train_argv(assets, tmp_path / "e", mixed_precision="bf16", **common))
    assert len(cache_dirs(cache_root)) == 4  # resolution, data and the encoders' dtype key their own
    mean = np.load(cache_root / first / "latent_mean_0.npy")
    assert mean.shape == (24, 4, 8, 8)


def test_cached_runs_resume_exactly(assets, tmp_path):
    common = dict(
        max_train_steps=5, embeddings_cache_dir=tmp_path / "cache", proportion_empty_prompts=0.5, **CACHE_FLAGS
    )
    a, b = straight_and_resumed(assets, tmp_path, 2, **common)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_dataset_skips_the_target_image(assets):
    import datasets

    rows = datasets.load_dataset(str(assets["fill"]))["train"]
    columns = Columns("image", "conditioning_image", "text")
    light = ControlNetDataset(rows, columns, PairedTransform(64), with_image=False)[3]
    full = ControlNetDataset(rows, columns, PairedTransform(64))[3]
    assert "pixel_values" not in light
    assert torch.equal(light["conditioning_pixel_values"], full["conditioning_pixel_values"])
    assert light["original_size"] == full["original_size"] and light["crop_top_left"] == full["crop_top_left"]


def test_cache_encodes_one_training_batch_at_a_time(assets, tmp_path, monkeypatch):
    """The cache build needs no more VAE memory than an uncached step (SDXL at 1024 px: ~80 GiB
    for a fixed batch of 32)."""
    from diffusers import AutoencoderKL

    batch_sizes = []
    real_encode = AutoencoderKL.encode

    def recording_encode(self, pixels, *args, **kwargs):
        batch_sizes.append(pixels.shape[0])
        return real_encode(self, pixels, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", recording_encode)
    flags = dict(max_train_steps=1, train_batch_size=5, cache_latents=True, embeddings_cache_dir=tmp_path / "cache")
    run(train_argv(assets, tmp_path / "out", **flags))
    assert sum(batch_sizes) == 24  # every row once
    assert max(batch_sizes) == 5


def start_training(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:  # a file, not a pipe: a paused reader must not stall the run
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train_controlnet.py"), *argv], env=script_env(), stdout=subprocess.DEVNULL, stderr=stderr
        )  # fmt: skip


def test_two_runs_building_one_cache_at_once_both_train(assets, tmp_path):
    """Run A is paused in the middle of its cache build while run B builds the same cache and
    trains; then A goes on. Each builds in a folder of its own and the first to finish is kept:
    both runs train and one complete cache remains. (With one shared build folder, B deleted
    A's half-written files and A crashed.)"""
    cache_root = tmp_path / "cache"

    def argv(name: str) -> list[str]:
        flags = dict(max_train_steps=2, train_batch_size=1, embeddings_cache_dir=cache_root, **CACHE_FLAGS)
        return train_argv(assets, tmp_path / name, **flags)

    first = start_training(argv("a"), tmp_path / "a.log")
    deadline = time.monotonic() + 300
    while not any(".partial" in p.name for p in cache_root.glob("*")):
        assert first.poll() is None and time.monotonic() < deadline, "run A ended before its cache build began"
        time.sleep(0.001)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert not cache_dirs(cache_root), "run A finished its cache build before it could be paused"
        second = start_training(argv("b"), tmp_path / "b.log")
        assert second.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert "first; using its copy" in (tmp_path / "a.log").read_text()
    (kept,) = cache_dirs(cache_root)
    assert [p.name for p in cache_root.iterdir()] == [kept]  # no build folder left behind
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_damaged_cache_is_rebuilt_and_abandoned_builds_are_removed(assets, tmp_path):
    cache_root = tmp_path / "cache"
    common = dict(max_train_steps=1, embeddings_cache_dir=cache_root, **CACHE_FLAGS)
    run(train_argv(assets, tmp_path / "a", **common))
    (key,) = cache_dirs(cache_root)
    (cache_root / key / "latent_std_0.npy").unlink()  # damage: the folder says complete, a file is gone
    prefix = f"{key}.partial-{socket.gethostname()}-"
    abandoned = cache_root / f"{prefix}{2**22 + 1}"  # above Linux's largest pid: no such process
    running = cache_root / f"{prefix}{os.getppid()}"  # a live process: a build in progress
    abandoned.mkdir()
    running.mkdir()
    run(train_argv(assets, tmp_path / "b", **common))
    assert (cache_root / key / "latent_std_0.npy").exists()
    assert not abandoned.exists() and running.exists()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_cache_size_is_estimated_before_building_and_a_full_disk_stops_the_run_first(assets, tmp_path, monkeypatch):
    """The estimate matches what a build writes; with less room than that, the run stops with
    the sizes and the fixes before encoding anything, and a finished cache is still reused."""
    from controlnet_trainer import cache

    estimates = []
    real_estimate = cache.cache_bytes
    monkeypatch.setattr(cache, "cache_bytes", lambda *a: estimates.append(real_estimate(*a)) or estimates[-1])
    cache_root = tmp_path / "cache"
    common = dict(max_train_steps=1, embeddings_cache_dir=cache_root, **CACHE_FLAGS)
    run(train_argv(assets, tmp_path / "a", **common))
    (key,) = cache_dirs(cache_root)
    written = {p.name: p.stat().st_size for p in (cache_root / key).iterdir()}
    latents = sum(size for name, size in written.items() if name.startswith(("latent_mean", "latent_std")))
    texts = written["text_hidden.npy"]
    (estimate,) = estimates
    # The files add a 128-byte .npy header each.
    assert estimate == (latents - 256, texts - 128)

    full_disk = shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full_disk)
    with pytest.raises(
        cache.CacheError, match=r"needs about .* GiB in .*--embeddings_cache_dir.*--cache_text_embeddings"
    ):
        run(train_argv(assets, tmp_path / "b", **(common | {"resolution": 32})))
    assert cache_dirs(cache_root) == {key} and len(list(cache_root.iterdir())) == 1  # nothing written
    run(train_argv(assets, tmp_path / "c", **common))  # reused: nothing to write


def test_a_bf16_run_stores_its_cache_in_bf16_as_the_encoders_computed_it(assets, tmp_path):
    """The encoders compute in bf16, so the cache keeps their values as they are: half the disk
    of fp32, and nothing rounded. (The losses differ from the uncached run's by about 4e-4, as
    they did with fp32 storage: uncached, the latent is sampled in bf16, cached in fp32.)"""
    from transformers import CLIPTextModel, CLIPTokenizer

    from controlnet_trainer import cache
    from controlnet_trainer.families import Models, sd

    cache_root = tmp_path / "cache"
    flags = {"max_train_steps": 2, "mixed_precision": "bf16", "embeddings_cache_dir": cache_root}
    run(train_argv(assets, tmp_path / "cached", **flags, **CACHE_FLAGS))
    (key,) = cache_dirs(cache_root)
    for name in ("latent_mean_0", "latent_std_0", "text_hidden"):
        assert np.load(cache_root / key / f"{name}.npy").itemsize == 2, name
    encoder = CLIPTextModel.from_pretrained(assets["sd"], subfolder="text_encoder", torch_dtype=torch.bfloat16)
    tokenizer = CLIPTokenizer.from_pretrained(assets["sd"], subfolder="tokenizer")
    with torch.no_grad():
        models = Models((tokenizer,), (encoder,), vae=None, denoiser=None, controlnet=None, noise_scheduler=None)
        expected = sd.encode_prompts(models, [""]).encoder_hidden_states
    # Row 0 with its caption dropped (-1): the empty prompt's stored embedding, handed out in fp32.
    loaded = cache.load(cache_root / key).text([0], [-1], torch.device("cpu")).encoder_hidden_states
    assert loaded.dtype == torch.float32 and torch.equal(loaded, expected.float())
