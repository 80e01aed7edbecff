"""What every family's models share: loading with one clear error, the base-model check,
and the evaluation contexts (eager modules, autocast)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .errors import InputError

if TYPE_CHECKING:
    from .families import ModelFamily, Models
    from .settings import ModelSettings


class ModelError(InputError):
    """A model path or combination of models that cannot work; the message says the fix."""


def load_models(settings: ModelSettings, family: ModelFamily) -> Models:
    """The family's frozen models and the ControlNet to train, or one paragraph on what failed."""
    check_local_path(settings.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    if settings.tokenizer_name:
        check_local_path(settings.tokenizer_name, "--tokenizer_name")
    # Missing files (a --variant the folder does not hold), a wrong --revision or no network
    # raise OSError; the libraries' own text names the file, given here as one paragraph.
    try:
        return family.load_models(settings)
    except OSError as error:
        raise ModelError(
            f"Could not load the models: {' '.join(str(error).split())} Check {', '.join(settings.named_flags())}; "
            "a hub id needs the network or an earlier download in the cache."
        ) from error


def run_script_instead(owner: ModelFamily) -> str:
    return f"Run {owner.script} with the same flags instead."


def check_base_model(
    settings: ModelSettings, family: ModelFamily, *, fix: Callable[[ModelFamily], str] = run_script_instead
) -> None:
    """A base model of another family (the SD script given an SDXL model, or the reverse) fails
    here with the fix, from the denoiser's config alone, instead of deep in a tokenizer or at the
    first step. ``fix`` says what to do given the family the model belongs to."""
    base = settings.pretrained_model_name_or_path
    check_local_path(base, "--pretrained_model_name_or_path")
    try:
        config = _denoiser_config(settings, family.denoiser_subfolder)
    except OSError as error:
        _check_other_families(settings, family, None, fix)
        raise ModelError(
            f"`--pretrained_model_name_or_path` {base!r} is not a diffusers pipeline that can be read "
            f"({' '.join(str(error).split())}). Point it at a {family.title} pipeline in diffusers "
            f"format (with {family.denoiser_subfolder}/, vae/, text_encoder/, tokenizer/ and scheduler/); a hub "
            "id needs the network or an earlier download in the cache."
        ) from error
    if family.is_own_denoiser(config):
        return
    _check_other_families(settings, family, config, fix)
    raise ModelError(
        f"`--pretrained_model_name_or_path` {base!r} is not a {family.title} model: its "
        f"{family.denoiser_subfolder}/config.json does not describe one. Point it at a {family.title} pipeline."
    )


def _check_other_families(
    settings: ModelSettings, family: ModelFamily, config: dict | None, fix: Callable[[ModelFamily], str]
) -> None:
    """Raise the fix if the base model belongs to another family; ``config`` is the denoiser config
    read from ``family``'s subfolder (None where there is none)."""
    from . import families

    for other in map(families.by_name, families.names()):
        if other is family:
            continue
        other_config = config
        if other.denoiser_subfolder != family.denoiser_subfolder or config is None:
            try:
                other_config = _denoiser_config(settings, other.denoiser_subfolder)
            except OSError:
                continue
        if other.is_own_denoiser(other_config):
            raise ModelError(
                f"`--pretrained_model_name_or_path` {settings.pretrained_model_name_or_path!r} is "
                f"{indefinite_article(other.title)} {other.title} model (read from its {other.denoiser_subfolder}/config.json), "
                f"but it was given to the {family.title} code path. {fix(other)}"
            )


def _denoiser_config(settings: ModelSettings, subfolder: str) -> dict:
    """The config.json of the base model's denoiser; OSError if there is none to read."""
    return _config_reader().load_config(
        settings.pretrained_model_name_or_path,
        subfolder=subfolder,
        revision=settings.revision,
        cache_dir=settings.cache_dir,
    )


@functools.cache
def _config_reader() -> type:
    """A diffusers config loader for any model's config.json (diffusers imports on first use)."""
    from diffusers.configuration_utils import ConfigMixin

    return type("ConfigReader", (ConfigMixin,), {"config_name": "config.json"})


def indefinite_article(title: str) -> str:
    """ "an SD3", "an SDXL" (letters read out), "a Flux" (a word)."""
    if title[:2].isupper():
        return "an" if title[:1] in "AEFHILMNORSX" else "a"
    return "an" if title[:1].lower() in "aeiou" else "a"


def check_local_path(path: str, flag: str) -> None:
    """A value that can only be a local path and does not exist fails before any download.

    Hub ids have the form ``org/name``; anything starting with ``.``, ``/`` or ``~`` or with
    more than one ``/`` is a path.
    """
    if os.path.exists(os.path.expanduser(path)):
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"`{flag}` points to {path!r}, which does not exist. Check the path.")


def eager_evaluation():
    """A context in which modules compiled by --torch_compile run eagerly.

    Validation and the fidelity probe run the UNet and ControlNet without gradients and at other
    batch sizes than training, so each would trace and build graphs of its own: minutes with
    inductor, for work done a few times per run. Dynamo also keeps the graphs of both models under
    one function (diffusers wraps both forwards in the same decorator), so every extra graph
    brings training's closer to the recompile limit, past which new shapes run uncompiled.
    """
    return torch.compiler.set_stance("force_eager")


def check_xformers(device: torch.device) -> None:
    if importlib.util.find_spec("xformers") is None:
        raise ModelError(
            "--enable_xformers_memory_efficient_attention needs xformers, which is not installed. "
            "Install it (`pip install xformers`) or drop the flag: PyTorch SDPA attention is the "
            "default and is as memory-efficient on recent PyTorch."
        )
    if device.type != "cuda":
        raise ModelError(
            f"--enable_xformers_memory_efficient_attention needs a CUDA GPU, but training runs on "
            f"{device.type}. Drop the flag."
        )


def mixed_precision_autocast(device: torch.device, dtype: torch.dtype):
    """Autocast for evaluating the fp32 ControlNet beside half-precision frozen models.

    It is the device's own autocast (CPU bf16 included), never a hard-coded CUDA one.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
