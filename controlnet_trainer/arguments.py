"""Command-line flags: diffusers' names, defaults and meanings, grouped for ``--help``.

The parser is built from shared groups plus an SDXL-only group, so the two entry points
cannot drift apart. ``check_args`` holds every cross-flag rule as a pure function that
raises one clear message naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from .errors import ArgumentError
from .families import ModelFamily
from .settings import Settings

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


TRAINED_CONTROLNET_HELP = (
    "ControlNet to start from: a diffusers folder or Hub id, or one .safetensors file in the "
    "original (A1111 / ComfyUI) layout, configured from the base model's UNet. If absent, the "
    "ControlNet is built from the UNet's weights."
)


def _model_group(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser.add_argument_group("model"), controlnet_help=TRAINED_CONTROLNET_HELP)


def add_model_flags(group, *, controlnet_help: str) -> None:
    """The base model and ControlNet flags; the fidelity command shares them."""
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local path of the base Stable Diffusion pipeline (diffusers format).",
    )
    group.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help=controlnet_help,
    )
    group.add_argument("--revision", type=str, default=None, help="Revision of the base model to load.")
    group.add_argument("--variant", type=str, default=None, help="Variant of the model files to load, e.g. fp16.")
    group.add_argument(
        "--tokenizer_name",
        type=str,
        default=None,
        help="Tokenizer to use instead of the base model's (for SDXL: a repo with tokenizer/ and "
        "tokenizer_2/ subfolders).",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")


def _output_group(parser: argparse.ArgumentParser, family: ModelFamily) -> None:
    group = parser.add_argument_group("output and logging")
    group.add_argument(
        "--output_dir",
        type=str,
        default="controlnet-model",
        help="Where checkpoints, logs, validation images and the final model are written.",
    )
    group.add_argument(
        "--logging_dir",
        type=str,
        default="logs",
        help="TensorBoard log directory, relative to --output_dir.",
    )
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Trackers: "tensorboard" (default), "wandb", "comet_ml" or "all". The metrics .jsonl '
        "in --output_dir is always written.",
    )
    group.add_argument(
        "--tracker_project_name",
        type=str,
        default=family.defaults.tracker_project_name,
        help="Project name passed to the trackers.",
    )
    group.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    group.add_argument(
        "--logging_steps",
        type=int,
        default=1,
        help="Read the loss back from the accelerator and log it every this many steps (each read "
        "waits for the GPU; the logged loss is the mean since the last log).",
    )
    if family.save_single_file is not None:
        group.add_argument(
            "--save_single_file",
            action="store_true",
            help="Also save the final ControlNet as one controlnet.safetensors in the original layout "
            "that AUTOMATIC1111 and ComfyUI load.",
        )
    group.add_argument(
        "--dry_run",
        action="store_true",
        help="Load the dataset, print the resolved training plan and exit without training.",
    )


def _schedule_group(parser: argparse.ArgumentParser, resolution: int) -> None:
    group = parser.add_argument_group("training schedule and optimizer")
    group.add_argument(
        "--resolution",
        type=int,
        default=resolution,
        help="Train images are resized and centre-cropped to this size (divisible by 8).",
    )
    group.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimizer steps. If given, overrides --num_train_epochs.",
    )
    group.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches to accumulate before each optimizer step.",
    )
    group.add_argument("--learning_rate", type=float, default=5e-6, help="Initial learning rate.")
    group.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by GPUs, accumulation steps and batch size.",
    )
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the schedule.")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    group.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the ControlNet (diffusers' EMAModel); it is "
        "checkpointed, used for validation and the fidelity measure, and is what gets saved. "
        "Not under FSDP, where it would hold a full copy on every GPU.",
    )
    group.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (with --use_ema).")


def _checkpoint_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint-<step>/ every this many optimizer steps.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep only the newest N checkpoints (older ones are removed after a new one is complete).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint: its name in --output_dir, a path, or "latest". Checkpoints '
        "written by diffusers' scripts resume too.",
    )
    group.add_argument(
        "--stop_at_step",
        type=int,
        default=None,
        help="Save a checkpoint and exit once this optimizer step is done, keeping the schedule of "
        "--max_train_steps (for time-boxed jobs); continue with --resume_from_checkpoint=latest.",
    )


def _speed_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory and speed")
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW.")
    group.add_argument(
        "--fused_backward_pass",
        action="store_true",
        help="Step the optimizer for each parameter as soon as the backward pass has its gradient, "
        "then free that gradient: the ControlNet's gradients never all exist at once (they are as "
        "large as its fp32 weights). One process, no gradient accumulation, no fp16; --max_grad_norm "
        "then clips each parameter's gradient on its own.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; defaults to the accelerate config. Frozen models are stored in it.",
    )
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention (PyTorch SDPA is the default and usually as fast).",
    )
    group.add_argument(
        "--set_grads_to_none",
        action="store_true",
        help="Set gradients to None instead of zero after each step (saves memory).",
    )
    group.add_argument(
        "--torch_compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="Compile the frozen UNet and the ControlNet with torch.compile for training (backend: "
        "inductor, or the one named); validation and the fidelity probe run them uncompiled. The first "
        "steps wait while kernels are built (minutes for SD 1.5), so it pays for long runs; "
        "benchmarks/README.md gives the measured speed-up.",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image with the VAE once before training (posterior mean and std; a fresh "
        "sample is still drawn every step) and keep the VAE off the accelerator until validation.",
    )
    group.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="Encode every distinct caption (and the empty prompt used by prompt dropout) once before "
        "training and keep the text encoders off the accelerator until validation.",
    )
    group.add_argument(
        "--embeddings_cache_dir",
        type=str,
        default=None,
        help="Where cached embeddings live (default: <--cache_dir or $HF_HOME, ~/.cache/huggingface "
        "unless set>/controlnet_trainer). Reused by later runs with the same models, data and resolution.",
    )


def _data_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    add_dataset_flags(group)
    group.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N samples only.")
    _add_stream_flags(group)


def add_dataset_flags(group) -> None:
    """Where the rows are and which columns hold what; the fidelity command shares them."""
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id or local dataset directory (parquet, arrow, imagefolder).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A local folder with the training data: a dataset folder (parquet, arrow, csv, json), "
        "a save_to_disk folder, or images with a metadata.jsonl/metadata.csv naming the image, the "
        "conditioning image and the caption of each row. With --dataset_name, as in diffusers: the "
        "folder of that dataset to load (load_dataset's data_dir), e.g. a subfolder of a local dataset, "
        "or the data folder of --dataset_name=imagefolder.",
    )
    group.add_argument("--image_column", type=str, default="image")
    group.add_argument("--conditioning_image_column", type=str, default="conditioning_image")
    group.add_argument("--caption_column", type=str, default="text")


def _add_stream_flags(group) -> None:
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Read the training rows as a stream (datasets' IterableDataset) instead of loading the "
        "dataset first: for data larger than the disk or memory, and for WebDataset tar shards. "
        "Needs --max_train_steps or --max_train_samples (a stream's length is not known), cannot be "
        "combined with --cache_latents/--cache_text_embeddings, and resumes at its exact position.",
    )
    group.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="With --streaming: rows held in the shuffle buffer (per data-loader worker). Larger "
        "mixes better and costs memory; the shard order is shuffled too, every epoch.",
    )
    group.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Train each image at the shape closest to its own instead of centre-cropping it to a "
        "square: --resolution becomes the target area (resolution x resolution pixels), buckets have "
        "sides that are multiples of 64 and aspect ratios up to 2:1, and every batch comes from one "
        "bucket. SDXL's time ids describe the bucket and the crop made.",
    )
    group.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="Leave out rows whose image or conditioning image cannot be read (every image is opened "
        "once before training; without this flag the first bad file stops the run).",
    )
    group.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0,
        help="Fraction of captions replaced by the empty prompt, drawn afresh for every sample at every step.",
    )


def _validation_group(parser: argparse.ArgumentParser, family: ModelFamily) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        nargs="+",
        help="Prompts evaluated every --validation_steps; one prompt pairs with every image.",
    )
    group.add_argument(
        "--validation_image",
        type=str,
        default=None,
        nargs="+",
        help="Conditioning image paths; one image pairs with every prompt.",
    )
    group.add_argument(
        "--num_validation_images",
        type=int,
        default=family.defaults.num_validation_images,
        help="Images generated per validation prompt and image pair.",
    )
    group.add_argument("--validation_steps", type=int, default=100)
    group.add_argument(
        "--fidelity_samples",
        type=int,
        default=0,
        help="Hold out this many training rows (or take them from --fidelity_dataset) to measure the "
        "control gap: how much better the denoising loss is with the matching conditioning image "
        "than with another sample's. 0 (default) turns the measure off; 32 is a good start.",
    )
    group.add_argument(
        "--fidelity_dataset",
        type=str,
        default=None,
        help="Dataset (hub id or local path) whose first --fidelity_samples rows form the held-out "
        "set, instead of splitting them off the training data.",
    )
    group.add_argument(
        "--fidelity_steps",
        type=int,
        default=None,
        help="Measure the control gap every this many steps (default: at every validation round).",
    )
    group.add_argument(
        "--fidelity_timesteps",
        type=int,
        default=4,
        help="Fixed timesteps per held-out sample, spread over the noise schedule.",
    )


def _hub_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_model_id", type=str, default=None)


def _processes_group(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes")
    group.add_argument(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="Seconds a process waits for the others at a collective before the run fails (as in "
        "transformers' Trainer; NCCL's own default is 600). Raise it when the main process must "
        "first download or prepare a large dataset.",
    )


def build_parser(family: ModelFamily) -> argparse.ArgumentParser:
    """The one parser: the shared groups with the family's defaults, plus the family's own group."""
    parser = argparse.ArgumentParser(description=family.description)
    _model_group(parser)
    _output_group(parser, family)
    _schedule_group(parser, family.defaults.resolution)
    _checkpoint_group(parser)
    _speed_group(parser)
    _processes_group(parser)
    _data_group(parser)
    _validation_group(parser, family)
    _hub_group(parser)
    if family.add_flags is not None:
        family.add_flags(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ArgumentError for flags that cannot work together; never modifies ``args``."""
    _check_data_source(args)
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise ArgumentError(
            f"`--proportion_empty_prompts` must be in the range [0, 1], got {args.proportion_empty_prompts}."
        )
    _check_validation_pairs(args.validation_prompt, args.validation_image)
    if args.resolution % 8 != 0:
        raise ArgumentError(
            f"`--resolution` must be divisible by 8 for consistently sized encoded images between "
            f"the VAE and the controlnet encoder; got {args.resolution}, try "
            f"{max(8, args.resolution // 8 * 8)}."
        )
    _check_positive(args)
    _check_optimizer(args)
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise ArgumentError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of "
            "exposing your token. Log in with `hf auth login` instead of passing --hub_token."
        )
    if args.fidelity_dataset is not None and args.fidelity_samples < 2:
        raise ArgumentError(
            "`--fidelity_dataset` needs `--fidelity_samples` of at least 2 (the number of its rows to "
            "measure on); 32 is a good start."
        )
    if args.fidelity_samples == 1 or args.fidelity_samples < 0:
        raise ArgumentError(
            f"`--fidelity_samples` must be 0 (off) or at least 2, got {args.fidelity_samples}: the control "
            "gap compares each sample with another sample's conditioning image."
        )
    _check_streaming(args)
    _check_buckets(args)
    _check_fused_backward_pass(args)
    _check_folders(args)
    # Last: it imports accelerate (and torch), which the checks above answer without.
    _check_tracker(args.report_to)


def _check_data_source(args: argparse.Namespace) -> None:
    jsonl = vars(args).get("jsonl_for_train")  # Flux's script has the flag
    if args.dataset_name is None and args.train_data_dir is None and jsonl is None:
        raise ArgumentError(
            "No training data: specify either `--dataset_name` (a hub id or a local dataset "
            "directory) or `--train_data_dir` (a local folder)"
            + (" or `--jsonl_for_train` (a JSON-lines file of rows)." if "jsonl_for_train" in vars(args) else ".")
        )
    if jsonl is not None and (args.dataset_name is not None or args.train_data_dir is not None):
        raise ArgumentError(
            "`--jsonl_for_train` is the training data by itself; drop `--dataset_name`/`--train_data_dir` "
            "or the JSON-lines file."
        )


def _check_streaming(args: argparse.Namespace) -> None:
    if not args.streaming:
        return
    cached = [flag for flag in ("cache_latents", "cache_text_embeddings") if getattr(args, flag)]
    if cached:
        raise ArgumentError(
            f"A streaming dataset cannot be cached: `--streaming` reads each row as it trains, while "
            f"`--{cached[0]}` encodes every row before training. Drop `--streaming` to cache (the data "
            "must then fit on disk), or drop the cache flags."
        )
    if args.max_train_steps is None and args.max_train_samples is None:
        raise ArgumentError(
            "`--streaming` cannot count the rows before training, so --num_train_epochs has nothing to "
            "multiply; pass `--max_train_steps` (or `--max_train_samples`, the number of rows to stream "
            "per epoch)."
        )


def _check_fused_backward_pass(args: argparse.Namespace) -> None:
    if not args.fused_backward_pass:
        return
    if args.gradient_accumulation_steps > 1:
        raise ArgumentError(
            "`--fused_backward_pass` steps the optimizer during every backward pass, so gradients cannot "
            f"accumulate over {args.gradient_accumulation_steps} micro-batches. Drop one of the two flags "
            "(raise --train_batch_size instead of accumulating, if memory allows)."
        )
    if args.mixed_precision == "fp16":
        raise ArgumentError(
            "`--fused_backward_pass` cannot unscale fp16 gradients before the step (the loss scaler sees "
            "them only after backward); use --mixed_precision=bf16."
        )


def _check_buckets(args: argparse.Namespace) -> None:
    if not args.aspect_ratio_buckets:
        return
    if args.resolution % 64:
        raise ArgumentError(
            f"`--aspect_ratio_buckets` needs `--resolution` to be a multiple of 64 (bucket sides are), "
            f"got {args.resolution}; use --resolution={max(64, round(args.resolution / 64) * 64)}."
        )
    if args.streaming:
        raise ArgumentError(
            "`--aspect_ratio_buckets` cannot be combined with `--streaming`: bucketing needs every "
            "image's size before training to group them. Drop one of the two."
        )


def _check_folders(args: argparse.Namespace) -> None:
    """Folders the run writes into that already exist as files: the libraries would stop with a
    FileExistsError once the dataset or the models load."""
    for name in ("cache_dir", "embeddings_cache_dir", "output_dir"):
        value = getattr(args, name)
        if value is not None and os.path.isfile(os.path.expanduser(value)):
            raise ArgumentError(f"`--{name}={value}` is a file; it must name a folder. Choose another path.")


def _check_validation_pairs(prompts: Sequence[str] | None, images: Sequence[str] | None) -> None:
    if prompts is not None and images is None:
        raise ArgumentError("`--validation_image` must be set if `--validation_prompt` is set.")
    if prompts is None and images is not None:
        raise ArgumentError("`--validation_prompt` must be set if `--validation_image` is set.")
    if prompts is not None and len(prompts) != 1 and len(images) != 1 and len(prompts) != len(images):
        raise ArgumentError(
            f"`--validation_image` must have either the same number of elements as "
            f"`--validation_prompt` ({len(prompts)}), a single element, or "
            f"`--validation_prompt` must have a single element; got {len(images)} images."
        )


def _check_positive(args: argparse.Namespace) -> None:
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "num_train_epochs",
        "num_validation_images",
        "fidelity_timesteps",
        "logging_steps",
        "shuffle_buffer_size",
        "ddp_timeout",
    ):
        value = getattr(args, name)
        if value < 1:
            raise ArgumentError(f"`--{name}` must be at least 1, got {value}.")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "stop_at_step", "fidelity_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ArgumentError(f"`--{name}` must be at least 1 when given, got {value}.")


def _check_optimizer(args: argparse.Namespace) -> None:
    """Ranges torch and the schedules would otherwise reject (or silently misread) only after the
    models have loaded and the cache is built."""
    if args.learning_rate <= 0:
        raise ArgumentError(f"`--learning_rate` must be positive (1e-5 is typical), got {args.learning_rate}.")
    for name in ("adam_beta1", "adam_beta2", "ema_decay"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            raise ArgumentError(f"`--{name}` must be in the range [0, 1), got {value}.")
    for name in ("adam_epsilon", "adam_weight_decay", "lr_warmup_steps", "dataloader_num_workers"):
        value = getattr(args, name)
        if value < 0:
            raise ArgumentError(f"`--{name}` must not be negative, got {value}.")


def _check_tracker(report_to: str) -> None:
    """Accelerate only warns about a tracker that is not installed, and the run then logs nowhere
    but metrics.jsonl; say so before training instead."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    if report_to in ("none", "", "all"):
        return
    if report_to not in LoggerType.list():
        raise ArgumentError(
            f"`--report_to={report_to}` is not a tracker Accelerate knows; choose one of "
            f"{', '.join(LoggerType.list())} or none."
        )
    available = get_available_trackers()
    if LoggerType(report_to) not in available:
        installed = ", ".join(str(tracker.value) for tracker in available) or "none installed"
        raise ArgumentError(
            f"`--report_to={report_to}` needs the {report_to} package, which is not installed. Install "
            f"it (`pip install {report_to}`), or pick an installed tracker ({installed}) or "
            "`--report_to=none`; metrics.jsonl in --output_dir is written either way."
        )


def parse_args(argv: Sequence[str] | None, family: ModelFamily) -> argparse.Namespace:
    """Parse and check the flags of the family's training script."""
    args = build_parser(family).parse_args(argv)
    check_args(args)
    if family.check_flags is not None:
        family.check_flags(args)
    return args


def resolve(args: argparse.Namespace, family: ModelFamily) -> Settings:
    """The checked flags as settings records; flags the script lacks take the family's defaults."""
    return Settings.from_namespace(
        args, defaults={"image_interpolation_mode": family.defaults.image_interpolation_mode}
    )
