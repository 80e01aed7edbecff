"""In-process training runs on the tiny fixtures: output tree, checkpoints, resume, validation."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import step_records, train_argv
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file

from controlnet_trainer.checkpointing import CheckpointError, TrainingProgress
from controlnet_trainer.cli import run


def checkpoints(output_dir: Path) -> set[str]:
    return {p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint")}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "diffusion_pytorch_model.safetensors")


def logged_losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in step_records(output_dir)]


def test_total_limit_keeps_newest_two(assets, tmp_path):
    # diffusers' test_controlnet_checkpointing_checkpoints_total_limit
    run(train_argv(assets, tmp_path, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2))
    assert checkpoints(tmp_path) == {"checkpoint-4", "checkpoint-6"}


def test_resume_with_limit_removes_multiple(assets, tmp_path):
    # diffusers' test_controlnet_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints
    run(train_argv(assets, tmp_path, max_train_steps=6, checkpointing_steps=2))
    assert checkpoints(tmp_path) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    result = run(
        train_argv(
            assets,
            tmp_path,
            max_train_steps=8,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
            resume_from_checkpoint="checkpoint-6",
        )
    )
    assert result.global_step == 8
    assert checkpoints(tmp_path) == {"checkpoint-6", "checkpoint-8"}


def test_output_tree_and_final_model_generates(assets, tmp_path):
    run(
        train_argv(
            assets,
            tmp_path,
            max_train_steps=2,
            validation_prompt="red circle with blue background",
            validation_image=assets["validation"][0],
            num_validation_images=2,
            validation_steps=1,
            hub_token="hf_secret_value",
            save_single_file=True,
        )
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "metrics.jsonl"} <= names
    assert {"controlnet.safetensors", "training_curves.png"} <= names
    single = load_file(tmp_path / "controlnet.safetensors")
    assert "control_model.input_hint_block.0.weight" in single and len(single) == len(final_weights(tmp_path))
    assert {"training_options.json", "validation"} <= names
    # Validation ran at step 1 and at the last step; each grid is conditioning + 2 images wide.
    grids = sorted((tmp_path / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    assert Image.open(grids[-1]).size == (3 * 64, 64)
    # The token never reaches the saved options or the card.
    for name in ("training_options.json", "README.md"):
        assert "hf_secret_value" not in (tmp_path / name).read_text()
    options = json.loads((tmp_path / "training_options.json").read_text())
    assert options["plan"]["max_train_steps"] == 2 and options["arguments"]["hub_token"] == "***"
    metrics = step_records(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)

    controlnet = ControlNetModel.from_pretrained(tmp_path)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        assets["sd"], controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    image = pipeline(
        "red circle with blue background",
        image=Image.open(assets["validation"][0]),
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_bf16_on_cpu_trains_validates_and_saves_fp32_weights(assets, tmp_path):
    # The validation pipeline once crashed here: the prepared ControlNet returned fp32 residuals
    # into the bf16 UNet, and CPU GroupNorm refuses fp32 input with bf16 weights.
    validation = {"validation_prompt": "red circle", "validation_image": assets["validation"][0]}
    run(train_argv(assets, tmp_path, mixed_precision="bf16", max_train_steps=1, validation_steps=1, **validation))
    assert [g.name for g in (tmp_path / "validation").glob("*.png")] == ["step-000001.png"]
    assert {tensor.dtype for tensor in final_weights(tmp_path).values()} == {torch.float32}


def test_training_changes_weights_and_starts_from_given_controlnet(assets, tmp_path):
    run(train_argv(assets, tmp_path, controlnet_model_name_or_path=assets["controlnet"], max_train_steps=3))
    before = load_file(assets["controlnet"] / "diffusion_pytorch_model.safetensors")
    after = final_weights(tmp_path)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "stop_at, flags",
    [
        (3, {"gradient_accumulation_steps": 1}),  # mid-epoch (24 rows / batch 4 = 6 batches)
        (4, {"gradient_accumulation_steps": 2, "proportion_empty_prompts": 0.5}),  # across an epoch end
    ],
)
def test_resume_is_exact(assets, tmp_path, stop_at, flags):
    """Stop-and-resume ends bit-identical to the uninterrupted run."""
    common = dict(max_train_steps=7, lr_scheduler="cosine", lr_warmup_steps=2, **flags)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(train_argv(assets, straight, **common))
    stopped = run(train_argv(assets, interrupted, stop_at_step=stop_at, **common))
    assert stopped.stopped_early and stopped.global_step == stop_at
    assert checkpoints(interrupted) == {f"checkpoint-{stop_at}"} and not (interrupted / "config.json").exists()
    run(train_argv(assets, interrupted, resume_from_checkpoint="latest", **common))
    expected, resumed = final_weights(straight), final_weights(interrupted)
    mismatched = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    assert logged_losses(straight) == logged_losses(interrupted)


def test_resume_with_another_batch_size_warns_that_its_epoch_is_not_exact(assets, tmp_path, caplog):
    # The position in the epoch counts micro-batches of the saved size.
    run(train_argv(assets, tmp_path, max_train_steps=2, checkpointing_steps=1))
    with caplog.at_level(logging.WARNING, logger="controlnet_trainer.training"):
        run(train_argv(assets, tmp_path, max_train_steps=3, checkpointing_steps=1, resume_from_checkpoint="latest"))
        assert "the saved run had used" not in caplog.text
        resumed = train_argv(assets, tmp_path, max_train_steps=4, resume_from_checkpoint="latest", train_batch_size=2)
        run(resumed)
    # 3 micro-batches into epoch 0: 12 samples at batch 4, but 3 batches of 2 are skipped.
    assert "resumes after its first 6 samples, while the saved run had used 12" in caplog.text


@pytest.mark.parametrize(("saved", "now", "warned"), [([4, 1], [2, 2], False), ([4, 1], [4, 2], True)])
def test_only_a_resume_that_changes_the_global_batch_warns(caplog, saved, now, warned):
    # 2 processes of 2 after 1 of 4 skip the same 8 samples (measured: the resumed run ends
    # 1.2e-7 from the straight one); 2 processes of 4 would skip 16.
    from accelerate import PartialState

    from controlnet_trainer.training import warn_if_layout_changed

    PartialState()  # accelerate's logger asks for it
    with caplog.at_level(logging.WARNING, logger="controlnet_trainer.training"):
        warn_if_layout_changed(TrainingProgress(global_step=2, batch_in_epoch=2, batch_layout=saved), now)
    assert ("the saved run had used 8" in caplog.text) == warned


def test_a_resume_with_no_step_left_saves_the_checkpoint_from_another_folder(assets, tmp_path, caplog):
    # The new folder has no metrics yet: the run once failed at plotting them, after saving.
    run(train_argv(assets, tmp_path / "first", max_train_steps=2, checkpointing_steps=2))
    checkpoint = tmp_path / "first" / "checkpoint-2"
    with caplog.at_level(logging.WARNING, logger="controlnet_trainer.training"):
        run(train_argv(assets, tmp_path / "again", max_train_steps=2, resume_from_checkpoint=checkpoint))
    assert "nothing is left to train" in caplog.text
    first, again = final_weights(tmp_path / "first"), final_weights(tmp_path / "again")
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert "training_curves.png" in (tmp_path / "first" / "README.md").read_text()
    assert "training_curves.png" not in (tmp_path / "again" / "README.md").read_text()  # no broken link


def test_resume_latest_without_checkpoints_starts_fresh(assets, tmp_path):
    result = run(train_argv(assets, tmp_path, max_train_steps=1, resume_from_checkpoint="latest"))
    assert result.global_step == 1 and (tmp_path / "config.json").exists()


def test_resume_from_missing_checkpoint_is_an_error(assets, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint-99.*no such checkpoint"):
        run(train_argv(assets, tmp_path, resume_from_checkpoint="checkpoint-99"))


def test_output_dir_with_another_runs_checkpoints_is_refused(assets, tmp_path):
    run(train_argv(assets, tmp_path, max_train_steps=2, checkpointing_steps=2))
    with pytest.raises(CheckpointError, match="already holds checkpoints.*resume_from_checkpoint=latest"):
        run(train_argv(assets, tmp_path, max_train_steps=2))
    assert checkpoints(tmp_path) == {"checkpoint-2"}


def test_dry_run_prints_plan_and_trains_nothing(assets, tmp_path, capsys):
    run(train_argv(assets, tmp_path, dry_run=True, gradient_accumulation_steps=2, max_train_steps=None))
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["batches_per_epoch"] == 6 and plan["steps_per_epoch"] == 3 and plan["max_train_steps"] == 3
    assert not (tmp_path / "config.json").exists()


def test_stdout_holds_only_the_plan_when_a_library_prints_there(assets, tmp_path, capsys, monkeypatch):
    """DeepSpeed, for one, logs to stdout once imported; `--dry_run | jq` must still work."""
    from controlnet_trainer import training

    real = training.make_accelerator

    def noisy(*args, **kwargs):
        print("[WARNING] a library talking on stdout")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "make_accelerator", noisy)
    run(train_argv(assets, tmp_path, dry_run=True))
    captured = capsys.readouterr()
    assert json.loads(captured.out)["family"] == "sd"
    assert "a library talking on stdout" in captured.err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    from controlnet_trainer.training import TrainingError

    flags = dict(max_train_steps=10, checkpointing_steps=1, learning_rate=1e12, max_grad_norm=1e30, adam_epsilon=1e-30)
    with pytest.raises(TrainingError, match=r"loss became nan at step (\d+).*last good checkpoint is .*checkpoint-"):
        run(train_argv(assets, tmp_path, **flags))
    assert not (tmp_path / "config.json").exists()
    kept = checkpoints(tmp_path)
    assert kept and all(not name.startswith(".") for name in kept)


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB filesystem: room for one checkpoint of the tiny ControlNet (12 MB), not two."""
    import subprocess

    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=False)  # detach even if a handle lingers


def test_disk_full_while_saving_keeps_previous_checkpoint(assets, small_disk):
    output_dir = small_disk / "run"
    with pytest.raises(CheckpointError, match=r"Saving checkpoint-2 failed.*checkpoint-1 is intact"):
        run(train_argv(assets, output_dir, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=1))
    assert {p.name for p in output_dir.iterdir() if "checkpoint" in p.name} == {"checkpoint-1"}
    state = json.loads((output_dir / "checkpoint-1" / "training_state.json").read_text())
    assert state["global_step"] == 1
    assert (output_dir / "checkpoint-1" / "controlnet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0


def test_controlnet_of_another_base_model_is_refused(sdxl_assets, tmp_path):
    from controlnet_trainer.models import ModelError

    with pytest.raises(ModelError, match="does not match the UNet.*cross_attention_dim"):
        run(train_argv(sdxl_assets, tmp_path, controlnet_model_name_or_path=sdxl_assets["controlnet_sdxl"]))


@pytest.mark.parametrize("flag", ["pretrained_model_name_or_path", "controlnet_model_name_or_path", "tokenizer_name"])
def test_nonexistent_model_paths_are_clear_errors(assets, tmp_path, flag):
    from controlnet_trainer.models import ModelError

    with pytest.raises(ModelError, match=f"`--{flag}` points to .*does not exist"):
        run(train_argv(assets, tmp_path, **{flag: tmp_path / "missing" / "model"}))


def test_a_variant_the_model_lacks_is_one_paragraph_naming_the_flag(assets, tmp_path):
    from controlnet_trainer.models import ModelError

    with pytest.raises(
        ModelError, match=r"Could not load the models: .*fp16.*Check --pretrained_model_name_or_path, --variant"
    ):
        run(train_argv(assets, tmp_path, variant="fp16"))


def test_an_output_dir_that_cannot_be_created_is_named(assets, tmp_path):
    from controlnet_trainer.training import TrainingError

    (tmp_path / "a_file").touch()
    with pytest.raises(TrainingError, match=r"--output_dir .*a_file/out cannot be created \(Not a directory\)"):
        run(train_argv(assets, tmp_path / "a_file" / "out"))


def test_xformers_without_xformers_or_cuda_is_a_clear_error(assets, tmp_path):
    from controlnet_trainer.models import ModelError

    with pytest.raises(ModelError, match="xformers"):
        run(train_argv(assets, tmp_path, enable_xformers_memory_efficient_attention=True))


def test_fp16_on_cpu_is_refused_before_any_model_loads(assets, tmp_path, monkeypatch):
    # Accelerate drops fp16 autocast on the CPU silently; unchecked, the first step fails on
    # mixed dtypes, after the models have loaded and the cache has been built.
    from controlnet_trainer import training

    monkeypatch.setattr(training, "load_models", lambda *_: pytest.fail("models loaded before the check"))
    with pytest.raises(training.TrainingError, match=r"fp16 needs a GPU.*--mixed_precision=bf16"):
        run(train_argv(assets, tmp_path, mixed_precision="fp16"))


def test_push_to_hub_without_the_hub_fails_before_training(assets, tmp_path, monkeypatch):
    # The repo is created before training: an offline machine or a missing login must not end a
    # finished run with a network traceback.
    import huggingface_hub.constants

    from controlnet_trainer import hub, training

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never a real upload
    monkeypatch.setattr(training, "load_models", lambda *_: pytest.fail("models loaded before the check"))
    with pytest.raises(hub.HubError, match=r"could not create or reach the Hub repo 'me/net'.*hf upload me/net"):
        run(train_argv(assets, tmp_path, push_to_hub=True, hub_model_id="me/net"))
    # A dry run leaves nothing behind, on the Hub either, so it never asks for the repo.
    assert run(train_argv(assets, tmp_path / "dry", push_to_hub=True, dry_run=True)).plan is not None


def test_a_failed_upload_keeps_the_trained_model_and_says_how_to_upload(assets, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from controlnet_trainer import hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "create_hub_repo", lambda *_: "me/net")  # as if the repo existed
    with pytest.raises(hub.HubError, match=r"saved in .*but the upload to 'me/net' failed.*hf upload me/net"):
        run(train_argv(assets, tmp_path, push_to_hub=True, max_train_steps=1))
    assert final_weights(tmp_path)


def test_skip_bad_images_trains_on_the_rest(assets, tmp_path):
    import datasets

    rows = datasets.load_dataset(str(assets["fill"]))["train"].cast_column("image", datasets.Image(decode=False))
    broken = rows.map(
        lambda row, i: {"image": {"bytes": b"garbage", "path": None} if i == 3 else row["image"]}, with_indices=True
    )
    broken.to_parquet(tmp_path / "data" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(Exception, match="row 3"):
        run(train_argv(assets, tmp_path / "a", dataset_name=tmp_path / "data"))
    run(train_argv(assets, tmp_path / "b", dataset_name=tmp_path / "data", skip_bad_images=True, dry_run=True))


def test_each_start_logs_where_the_wait_before_its_first_step_went(assets, tmp_path):
    """A start-up record per run (a resume adds its own), its parts adding up to its total."""
    flags = dict(max_train_steps=2, cache_latents=True, embeddings_cache_dir=tmp_path / "cache")
    started = time.perf_counter()
    run(train_argv(assets, tmp_path / "out", stop_at_step=1, **flags))
    first_run_seconds = time.perf_counter() - started
    run(train_argv(assets, tmp_path / "out", resume_from_checkpoint="latest", **flags))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    startups = [r for r in records if "startup_seconds" in r]
    assert [r["step"] for r in startups] == [0, 1]
    parts = [{k.removeprefix("startup/"): v for k, v in r.items() if k.startswith("startup/")} for r in startups]
    common = ["accelerator_seconds", "data_seconds", "models_seconds", "embeddings_cache_seconds"]
    assert list(parts[0]) == [*common, "optimizer_and_loader_seconds"]
    assert list(parts[1]) == [*common, "optimizer_loader_and_resume_seconds"]
    for record, laps in zip(startups, parts, strict=True):
        assert all(seconds >= 0 for seconds in laps.values())
        assert sum(laps.values()) == pytest.approx(record["startup_seconds"])
    assert 0 < startups[0]["startup_seconds"] < first_run_seconds
    assert [r["step"] for r in step_records(tmp_path / "out")] == [1, 2]  # one step record each


def test_a_fresh_run_in_a_used_folder_replaces_all_its_records(assets, tmp_path):
    """Step 0's records (fidelity, start-up) of an earlier run without checkpoints are not kept."""
    for _ in range(2):
        run(train_argv(assets, tmp_path, max_train_steps=2, fidelity_samples=4))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    at_step_0 = [sorted(r)[0] for r in records if r["step"] == 0]
    assert at_step_0 == ["fidelity/blank", "startup/accelerator_seconds"]  # one of each
    assert [r["step"] for r in step_records(tmp_path)] == [1, 2]


def test_logging_steps_reads_the_loss_back_every_n_steps(assets, tmp_path):
    run(train_argv(assets, tmp_path, max_train_steps=7, logging_steps=3, checkpointing_steps=5))
    records = step_records(tmp_path)
    # Every 3 steps, before the checkpoint at 5, and at the end.
    assert [r["step"] for r in records] == [3, 5, 6, 7]


def test_ema_is_saved_resumed_exactly_and_is_the_final_model(assets, tmp_path):
    common = dict(max_train_steps=6, use_ema=True, ema_decay=0.5)
    run(train_argv(assets, tmp_path / "straight", **common))
    run(train_argv(assets, tmp_path / "resumed", stop_at_step=3, **common))
    assert (tmp_path / "resumed" / "checkpoint-3" / "controlnet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    run(train_argv(assets, tmp_path / "resumed", resume_from_checkpoint="latest", **common))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The saved model is the average, not the last weights.
    run(train_argv(assets, tmp_path / "raw", max_train_steps=6))
    raw = final_weights(tmp_path / "raw")
    assert any(not torch.equal(raw[k], straight[k]) for k in raw)


def test_ema_weights_are_swapped_in_only_for_evaluations(assets, tmp_path, monkeypatch):
    """Swapping copies every ControlNet weight to the host and back (EMAModel.store), so it is
    done at the steps that evaluate (here 2, 4 and the last, 5), not at every step."""
    from diffusers.training_utils import EMAModel

    stored_at = []
    store = EMAModel.store

    def recording_store(ema, parameters):
        stored_at.append(ema.optimization_step)
        store(ema, parameters)

    monkeypatch.setattr(EMAModel, "store", recording_store)
    evaluation = {"validation_steps": 2, "validation_prompt": "red circle", "validation_image": assets["validation"][0]}
    run(train_argv(assets, tmp_path, max_train_steps=5, use_ema=True, **evaluation))
    assert stored_at == [2, 4, 5]  # the last step evaluates too
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == [
        "step-000002.png",
        "step-000004.png",
        "step-000005.png",
    ]


def test_torch_compile_trains_like_eager_and_saves_plain_names(assets, tmp_path, monkeypatch):
    """aot_eager traces the UNet and ControlNet through dynamo and AOTAutograd as inductor does,
    without inductor's minutes of kernel building on CPU. Validation and the fidelity probe (at
    steps 0 and 2) run eagerly: every graph the backend gets was traced with gradients on, as only
    training runs them."""
    from torch._dynamo.backends import registry

    traced_with_grad = []
    aot_eager = registry.lookup_backend("aot_eager")

    def recording_backend(graph, example_inputs):
        traced_with_grad.append(torch.is_grad_enabled())
        return aot_eager(graph, example_inputs)

    monkeypatch.setitem(registry._BACKENDS, "recording_aot_eager", None)
    monkeypatch.setitem(registry._COMPILER_FNS, "recording_aot_eager", recording_backend)
    torch._dynamo.reset()  # no graph of an earlier test's compiled run is reused
    evaluation = {
        "validation_steps": 2,
        "validation_prompt": "red circle",
        "validation_image": assets["validation"][0],
        "fidelity_samples": 4,
    }
    run(train_argv(assets, tmp_path / "eager", max_train_steps=2, **evaluation))
    run(train_argv(assets, tmp_path / "compiled", max_train_steps=2, torch_compile="recording_aot_eager", **evaluation))
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert compiled.keys() == eager.keys()  # no _orig_mod. prefixes
    assert all(torch.allclose(eager[name], compiled[name], atol=1e-5) for name in eager)
    fresh = final_weights(assets["controlnet"])  # what training started from
    assert not all(torch.equal(eager[name], fresh[name]) for name in eager)
    assert traced_with_grad and all(traced_with_grad)
    # Both evaluations did run in the compiled run, so the check above covers their graphs.
    assert (tmp_path / "compiled" / "validation" / "step-000002.png").is_file()
    records = (json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in records if "fidelity/control_gap" in r] == [0, 2]


def test_step_time_includes_the_wait_at_the_loss_read_back(assets, tmp_path, monkeypatch):
    """On a GPU the read-back is where the host waits for the queued steps: that wait is step time.
    A slow read-back stands in for the wait, which a CPU run never has."""
    from controlnet_trainer import loop

    read_back = loop.mean_loss

    def slow_read_back(accelerator, pending):
        time.sleep(0.5)
        return read_back(accelerator, pending)

    monkeypatch.setattr(loop, "mean_loss", slow_read_back)
    run(train_argv(assets, tmp_path, max_train_steps=4, logging_steps=2))
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["step_seconds"] >= 0.25 for r in records)  # 0.5 s over a window of 2 steps


@pytest.mark.parametrize(
    ("engine", "zero_stage", "use_ema", "refused"),
    [
        (DistributedType.FSDP, None, True, "--use_ema is not supported under FSDP"),
        (DistributedType.FSDP, None, False, None),
        (DistributedType.DEEPSPEED, 3, False, "ZeRO-3.*Use DeepSpeed ZeRO-2"),
        (DistributedType.DEEPSPEED, 2, True, None),
        (DistributedType.MULTI_GPU, None, True, None),
    ],
)
def test_engines_refuse_what_they_cannot_save(engine, zero_stage, use_ema, refused):
    from controlnet_trainer.training import TrainingError, check_engine

    if refused is None:
        check_engine(engine, zero_stage, use_ema)
        return
    with pytest.raises(TrainingError, match=refused):
        check_engine(engine, zero_stage, use_ema)


@pytest.mark.parametrize(("device", "fused"), [("cuda", True), ("cpu", True), ("mps", None)])
def test_adamw_is_fused_for_the_training_device_not_where_weights_start(device, fused):
    from controlnet_trainer.optimization import make_optimizer
    from controlnet_trainer.settings import OptimizerSettings

    weights = [torch.nn.Parameter(torch.zeros(3))]  # on the CPU, as before Accelerate moves them
    optimizer = make_optimizer(OptimizerSettings(), weights, 1e-5, torch.device(device))
    assert optimizer.defaults["fused"] is fused


def test_loader_workers_end_with_the_run(assets, tmp_path):
    """The data loader's worker processes end when training does, not whenever garbage
    collection frees the loader: with pinned memory, PyTorch 2.11 waits 5 s for each
    persistent worker still alive at exit (40 s with 8 workers on an H100). Garbage collection
    is off here so that nothing else ends them."""
    workers = {"dataloader_num_workers": 2}
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        run(train_argv(assets, tmp_path / "out", max_train_steps=3, checkpointing_steps=2, **workers))
        assert set(multiprocessing.active_children()) - before == set()
        # Resumed mid-epoch, the first epoch comes from a loader of its own, with its own workers.
        run(train_argv(assets, tmp_path / "out", max_train_steps=9, resume_from_checkpoint="latest", **workers))
        assert set(multiprocessing.active_children()) - before == set()
    finally:
        gc.enable()
