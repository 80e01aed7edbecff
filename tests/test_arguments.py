"""Flags: diffusers' names and defaults, the SDXL additions, and every cross-flag check."""

from __future__ import annotations

import argparse
import shlex

import pytest
from accelerate.tracking import get_available_trackers
from conftest import family_named, parsed, settings_of

from controlnet_trainer.arguments import ArgumentError, build_parser, check_args, parse_args, resolve
from controlnet_trainer.datasources import source_of
from controlnet_trainer.plan import make_plan
from controlnet_trainer.settings import OptimizerSettings

# diffusers examples/controlnet/train_controlnet.py: flag -> default.
DIFFUSERS_SD_DEFAULTS = {
    "pretrained_model_name_or_path": None,
    "controlnet_model_name_or_path": None,
    "revision": None,
    "variant": None,
    "tokenizer_name": None,
    "output_dir": "controlnet-model",
    "cache_dir": None,
    "seed": None,
    "resolution": 512,
    "train_batch_size": 4,
    "num_train_epochs": 1,
    "max_train_steps": None,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "resume_from_checkpoint": None,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "learning_rate": 5e-6,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "lr_num_cycles": 1,
    "lr_power": 1.0,
    "use_8bit_adam": False,
    "dataloader_num_workers": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-08,
    "max_grad_norm": 1.0,
    "push_to_hub": False,
    "hub_token": None,
    "hub_model_id": None,
    "logging_dir": "logs",
    "allow_tf32": False,
    "report_to": "tensorboard",
    "mixed_precision": None,
    "enable_xformers_memory_efficient_attention": False,
    "set_grads_to_none": False,
    "dataset_name": None,
    "dataset_config_name": None,
    "train_data_dir": None,
    "image_column": "image",
    "conditioning_image_column": "conditioning_image",
    "caption_column": "text",
    "max_train_samples": None,
    "proportion_empty_prompts": 0,
    "validation_prompt": None,
    "validation_image": None,
    "num_validation_images": 4,
    "validation_steps": 100,
    "tracker_project_name": "train_controlnet",
}
# What diffusers' train_controlnet_sdxl.py adds or changes.
DIFFUSERS_SDXL_ONLY = {
    "pretrained_vae_model_name_or_path",
    "crops_coords_top_left_h",
    "crops_coords_top_left_w",
    "image_interpolation_mode",
    "enable_npu_flash_attention",
}


def defaults(sdxl: bool = False) -> dict:
    parser = build_parser(family_named(sdxl))
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def test_sd_flags_keep_diffusers_names_and_defaults():
    ours = defaults()
    for name, value in DIFFUSERS_SD_DEFAULTS.items():
        assert name in ours, f"--{name} is missing"
        assert ours[name] == value, f"--{name} default {ours[name]!r}, diffusers {value!r}"


def test_sdxl_script_adds_only_its_own_flags():
    """Drift test: both entry points share every common flag; SDXL adds only its group."""
    sd, sdxl = defaults(), defaults(sdxl=True)
    assert set(sdxl) - set(sd) == DIFFUSERS_SDXL_ONLY
    assert set(sd) <= set(sdxl)
    differing = {name for name in sd if sd[name] != sdxl[name]}
    assert differing == {"resolution", "tracker_project_name"}
    assert sdxl["resolution"] == 1024 and sdxl["image_interpolation_mode"] == "lanczos"
    assert sdxl["tracker_project_name"] == "sd_xl_train_controlnet"


def test_help_has_sections():
    text = build_parser(family_named(sdxl=True)).format_help()
    for section in ("model:", "data:", "checkpoints:", "validation:", "memory and speed:", "SDXL:"):
        assert section in text


BASE = ["--pretrained_model_name_or_path=m", "--dataset_name=d"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pretrained_model_name_or_path=m"], "specify either `--dataset_name`"),
        (BASE + ["--proportion_empty_prompts=1.5"], r"must be in the range \[0, 1\]"),
        (BASE + ["--validation_prompt", "a"], "`--validation_image` must be set"),
        (BASE + ["--validation_image", "a.png"], "`--validation_prompt` must be set"),
        (
            BASE + ["--validation_prompt", "a", "b", "--validation_image", "1.png", "2.png", "3.png"],
            "same number of elements",
        ),
        (BASE + ["--resolution=500"], "divisible by 8.*try 496"),
        (BASE + ["--report_to=wandb", "--hub_token=t"], "both --report_to=wandb and --hub_token"),
        (BASE + ["--train_batch_size=0"], "`--train_batch_size` must be at least 1"),
        (BASE + ["--max_train_steps=0"], "`--max_train_steps` must be at least 1"),
        (BASE + ["--max_train_samples=0"], "`--max_train_samples` must be at least 1"),
        (BASE + ["--snr_gamma=0"], "`--snr_gamma` must be positive"),
        (BASE + ["--learning_rate=-1e-5"], "`--learning_rate` must be positive"),
        (BASE + ["--adam_beta2=1"], r"`--adam_beta2` must be in the range \[0, 1\)"),
        (BASE + ["--ema_decay=1.5"], r"`--ema_decay` must be in the range \[0, 1\)"),
        (BASE + ["--lr_warmup_steps=-1"], "`--lr_warmup_steps` must not be negative"),
    ],
)
def test_bad_arguments_raise_clear_messages(argv, message):
    with pytest.raises(ArgumentError, match=message):
        parsed(argv)


@pytest.mark.parametrize("flag", ["cache_dir", "embeddings_cache_dir", "output_dir"])
def test_a_folder_flag_naming_a_file_is_refused(flag, tmp_path):
    # Otherwise a FileExistsError from datasets or the cache once loading starts.
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ArgumentError, match=f"`--{flag}=.*a_file` is a file; it must name a folder"):
        parsed(BASE + [f"--{flag}={tmp_path / 'a_file'}"])
    parsed(BASE + [f"--{flag}={tmp_path}"])


def test_train_data_dir_beside_dataset_name_is_its_data_dir():
    """As in diffusers: load_dataset(--dataset_name, data_dir=--train_data_dir)."""
    source = source_of(settings_of(BASE + ["--train_data_dir=edges"]).data)
    assert (source.path, source.flag, source.data_dir) == ("d", "--dataset_name", "edges")
    alone = source_of(settings_of(["--pretrained_model_name_or_path=m", "--train_data_dir=folder"]).data)
    assert (alone.path, alone.flag, alone.data_dir) == ("folder", "--train_data_dir", None)


def test_a_tracker_that_is_not_installed_is_refused_before_training():
    # Accelerate only warns, and such a run would log to metrics.jsonl alone.
    available = {tracker.value for tracker in get_available_trackers()}
    missing = next(name for name in ("aim", "dvclive", "swanlab", "clearml", "wandb") if name not in available)
    with pytest.raises(ArgumentError, match=f"needs the {missing} package, which is not installed"):
        parsed(BASE + [f"--report_to={missing}"])
    with pytest.raises(ArgumentError, match="not a tracker Accelerate knows"):
        parsed(BASE + ["--report_to=tensorbord"])
    parsed(BASE + ["--report_to=tensorboard"])  # a project dependency, so always installed


def test_one_prompt_pairs_with_many_images_and_vice_versa():
    parsed(BASE + ["--validation_prompt", "a", "--validation_image", "1.png", "2.png"])
    parsed(BASE + ["--validation_prompt", "a", "b", "--validation_image", "1.png"])
    parsed(BASE + ["--validation_prompt", "a", "b", "--validation_image", "1.png", "2.png"])


def test_check_args_does_not_mutate():
    args = parsed(BASE + ["--max_train_steps=5"])
    before = dict(vars(args))
    check_args(args)
    settings = resolve(args, family_named())
    make_plan(settings.data.train_batch_size, settings.optimizer, num_samples=10, num_processes=2, mixed_precision="bf16", seed=1)
    assert vars(args) == before


def plan_for(num_samples, num_processes=1, train_batch_size=4, **flags):
    optimizer = OptimizerSettings(**(dict(max_train_steps=None, num_train_epochs=1, learning_rate=1e-5) | flags))
    return make_plan(
        train_batch_size, optimizer, num_samples=num_samples, num_processes=num_processes, mixed_precision=None, seed=0
    )


def test_plan_math_matches_diffusers():
    plan = plan_for(50, num_processes=2, gradient_accumulation_steps=3, num_train_epochs=2)
    assert plan.batches_per_epoch == 7  # ceil(50 / (4 * 2))
    assert plan.steps_per_epoch == 3  # ceil(7 / 3)
    assert plan.max_train_steps == 6 and plan.num_train_epochs == 2
    assert plan.total_batch_size == 24
    assert plan.mixed_precision == "no" and str(plan.weight_dtype) == "torch.float32"


def test_plan_max_steps_overrides_epochs_and_scale_lr():
    plan = plan_for(16, max_train_steps=10, scale_lr=True, gradient_accumulation_steps=2)
    assert plan.steps_per_epoch == 2 and plan.num_train_epochs == 5
    assert plan.learning_rate == pytest.approx(1e-5 * 8)


# Every training command of diffusers' examples/controlnet README.md (train_controlnet.py) and
# README_sdxl.md (train_controlnet_sdxl.py), as written there after `accelerate launch <script>`.
# The Flax commands of README.md run another script (train_controlnet_flax.py) and are not here.
_FILL_VALIDATION = """
 --validation_image "./conditioning_image_1.png" "./conditioning_image_2.png" \\
 --validation_prompt "red circle with blue background" "cyan circle with brown floral background" \\
"""
DIFFUSERS_README_COMMANDS = {
    "sd: training": (
        False,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --resolution=512 \\
 --learning_rate=1e-5 \\"""
        + _FILL_VALIDATION
        + " --train_batch_size=4",
    ),
    "sd: --report_to wandb, as the text after it says": (
        False,
        (
            "--pretrained_model_name_or_path=$MODEL_DIR --output_dir=$OUTPUT_DIR --dataset_name=fusing/fill50k "
            "--report_to wandb"
        ),
    ),
    "sd: gradient accumulation, ~20 GB": (
        False,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --resolution=512 \\
 --learning_rate=1e-5 \\"""
        + _FILL_VALIDATION
        + """ --train_batch_size=1 \\
 --gradient_accumulation_steps=4""",
    ),
    "sd: multiple GPUs": (
        False,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --resolution=512 \\
 --learning_rate=1e-5 \\"""
        + _FILL_VALIDATION
        + """ --train_batch_size=4 \\
 --mixed_precision="fp16" \\
 --tracker_project_name="controlnet-demo" \\
 --report_to=wandb""",
    ),
    "sd: 16 GB": (
        False,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --resolution=512 \\
 --learning_rate=1e-5 \\"""
        + _FILL_VALIDATION
        + """ --train_batch_size=1 \\
 --gradient_accumulation_steps=4 \\
 --gradient_checkpointing \\
 --use_8bit_adam""",
    ),
    "sd: 12 GB": (
        False,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --resolution=512 \\
 --learning_rate=1e-5 \\"""
        + _FILL_VALIDATION
        + """ --train_batch_size=1 \\
 --gradient_accumulation_steps=4 \\
 --gradient_checkpointing \\
 --use_8bit_adam \\
 --enable_xformers_memory_efficient_attention \\
 --set_grads_to_none""",
    ),
    "sd: 8 GB with DeepSpeed": (
        False,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --resolution=512 \\"""
        + _FILL_VALIDATION
        + """ --train_batch_size=1 \\
 --gradient_accumulation_steps=4 \\
 --gradient_checkpointing \\
 --enable_xformers_memory_efficient_attention \\
 --set_grads_to_none \\
 --mixed_precision fp16""",
    ),
    "sdxl: training": (
        True,
        """--pretrained_model_name_or_path=$MODEL_DIR \\
 --output_dir=$OUTPUT_DIR \\
 --dataset_name=fusing/fill50k \\
 --mixed_precision="fp16" \\
 --resolution=1024 \\
 --learning_rate=1e-5 \\
 --max_train_steps=15000 \\"""
        + _FILL_VALIDATION
        + """ --validation_steps=100 \\
 --train_batch_size=1 \\
 --gradient_accumulation_steps=4 \\
 --report_to="wandb" \\
 --seed=42 \\
 --push_to_hub""",
    ),
    "sdxl: 24 GB": (
        True,
        """--pretrained_model_name_or_path=$MODEL_DIR\\
 --dataset_name=fusing/fill50k\\
 --mixed_precision="fp16"\\
 --resolution=512\\
 --learning_rate=1e-5\\
 --max_train_steps=15000\\
 --validation_image "./conditioning_image_1.png" "./conditioning_image_2.png"\\
 --validation_prompt "red circle with blue background" "cyan circle with brown floral background"\\
 --validation_steps=100\\
 --train_batch_size=1\\
 --gradient_accumulation_steps=4\\
 --report_to="wandb"\\
 --seed=1337\\
 --push_to_hub""",
    ),
}


def readme_argv(command: str, **variables: str) -> list[str]:
    """The arguments a shell passes for ``command`` (line continuations and quotes resolved), its
    $VARIABLES replaced."""
    for name, value in variables.items():
        command = command.replace(f"${name}", value)
    return shlex.split(command.replace("\\\n", " "))


def written_flags(argv: list[str]) -> dict[str, list[str]]:
    """--flag -> the values written after it (`--flag=value` or `--flag value ...`)."""
    flags: dict[str, list[str]] = {}
    for token in argv:
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            flags[name] = [value] if value else []
        else:
            flags[name].append(token)
    return flags


def parse_readme_command(argv: list[str], sdxl: bool) -> argparse.Namespace:
    """The command parsed and checked. The one refusal allowed is a tracker package this machine
    lacks (--report_to=wandb), which is said before training; the rest is then checked with the
    default tracker (the last --report_to wins)."""
    try:
        return parse_args(argv, family_named(sdxl))
    except ArgumentError as error:
        assert "which is not installed" in str(error), str(error)
        return parse_args([*argv, "--report_to=tensorboard"], family_named(sdxl))


@pytest.mark.parametrize("name", DIFFUSERS_README_COMMANDS)
def test_diffusers_readme_commands_are_accepted_as_written(name):
    sdxl, command = DIFFUSERS_README_COMMANDS[name]
    argv = readme_argv(command, MODEL_DIR="model", OUTPUT_DIR="out")
    args = parse_readme_command(argv, sdxl)
    # Every flag means what it says: the parsed value is the written one.
    for flag, values in written_flags(argv).items():
        parsed = getattr(args, flag)
        if flag == "report_to" and parsed != values[0]:
            continue  # replaced above: the tracker is not installed here
        if not values:
            assert parsed is True, flag
        elif isinstance(parsed, list):
            assert parsed == values, flag
        else:
            assert parsed == type(parsed)(values[0]), flag


def test_diffusers_readme_command_dry_runs_on_the_fixtures(assets, tmp_path):
    """The README's first command, its hub ids replaced by the fixtures, resolves a plan."""
    from controlnet_trainer.cli import run

    sdxl, command = DIFFUSERS_README_COMMANDS["sd: training"]
    command = command.replace("fusing/fill50k", str(assets["fill"]))
    command = command.replace("./conditioning_image_1.png", str(assets["validation"][0]))
    command = command.replace("./conditioning_image_2.png", str(assets["validation"][0]))
    argv = readme_argv(command, MODEL_DIR=str(assets["sd"]), OUTPUT_DIR=str(tmp_path / "out"))
    plan = run([*argv, "--report_to=none", "--dry_run"], family=family_named(sdxl)).plan["plan"]
    assert plan["num_samples"] == 24 and plan["total_batch_size"] == 4 and plan["learning_rate"] == 1e-5
    assert not (tmp_path / "out").exists()  # a dry run leaves nothing behind
