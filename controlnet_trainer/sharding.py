"""The ControlNet's full weights when an engine shards them or keeps them elsewhere.

Checkpoints, the final save, validation and the fidelity measure need every weight. Under DDP
or DeepSpeed ZeRO-1/2 each rank already holds them all; under FSDP each rank holds a shard, and
running the sharded module on one rank only would wait forever for the others. So these callers
get a plain ControlNet built from the gathered weights instead: a collective every rank joins.

Saves also need the weights at the precision they train in. DeepSpeed with bf16 or fp16 turns
the module itself to that precision and keeps the fp32 weights the optimizer updates in its own
partitions, so a save of the module would round every weight (and the small updates of a
fine-tune with them); a save gathers the fp32 partitions instead.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def full_controlnet(accelerator: Accelerator, controlnet: torch.nn.Module, *, every_rank: bool):
    """The ControlNet with all its weights on this rank; every rank must call this.

    Unsharded, the bare module itself (no copy). Under FSDP, a plain copy: on the accelerator of
    every rank, or with ``every_rank=False`` in the main process's host memory (the other ranks
    get None), which is all a save needs; validation's pipeline moves it to the accelerator.
    """
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(controlnet)
    weights = gather_weights(controlnet, every_rank=every_rank)
    if weights is None:
        return None
    return plain_copy(accelerator.unwrap_model(controlnet), weights)


def controlnet_to_save(accelerator: Accelerator, controlnet: torch.nn.Module) -> torch.nn.Module | None:
    """The ControlNet as checkpoints and the final save write it: whole, in fp32 where it trains
    in fp32 weights, on the main process (other ranks get None, or the bare module where that is
    no copy). Every rank must call this."""
    if is_sharded(accelerator):
        return full_controlnet(accelerator, controlnet, every_rank=False)
    module = accelerator.unwrap_model(controlnet)
    if accelerator.distributed_type != DistributedType.DEEPSPEED or all(
        p.dtype == torch.float32 for p in module.parameters()
    ):
        return module
    weights = deepspeed_fp32_weights(module, on_main=accelerator.is_main_process)
    return None if weights is None else plain_copy(module, weights)


def deepspeed_fp32_weights(module: torch.nn.Module, *, on_main: bool) -> dict[str, torch.Tensor] | None:
    """The fp32 weights DeepSpeed's optimizer holds for a bf16/fp16 module, in host memory on the
    main process (None elsewhere). Each weight is assembled from every rank's partition: a
    collective per weight, so every rank must call this."""
    from deepspeed.utils import safe_get_full_fp32_param  # only reached when DeepSpeed runs

    weights = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None for a weight outside the optimizer
        if on_main:
            weights[name] = (param if full is None else full).detach().to("cpu", torch.float32)
    return weights if on_main else None


def gather_weights(model: torch.nn.Module, *, every_rank: bool) -> dict[str, torch.Tensor] | None:
    """All the weights of a model sharded by FSDP (1 or 2), as plain tensors; a collective.

    On every rank, or with ``every_rank=False`` in host memory on rank 0 only, which keeps the
    copy off the other ranks' GPUs; they get None.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    weights = get_model_state_dict(model, options=options)
    return weights if every_rank or torch.distributed.get_rank() == 0 else None


def controlnet_class(module: torch.nn.Module) -> type:
    """The diffusers class of a ControlNet (ControlNetModel, SD3ControlNetModel), which the type of
    a module FSDP has sharded hides behind a subclass of its own."""
    return next(cls for cls in type(module).__mro__ if cls.__module__.startswith("diffusers."))


def plain_copy(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A ControlNet of ``module``'s class and config holding ``weights`` where they lie, built
    without initialising weights it would replace."""
    with torch.device("meta"):
        copy = controlnet_class(module).from_config(module.config)
    copy.load_state_dict(weights, assign=True)  # strict: a missing or extra key is an error
    return copy
