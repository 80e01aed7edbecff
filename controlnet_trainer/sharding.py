"""The ControlNet's full weights when an engine shards them across processes (FSDP).

Checkpoints, the final save, validation and the fidelity measure need every weight. Under DDP
or DeepSpeed ZeRO-1/2 each rank already holds them all; under FSDP each rank holds a shard, and
running the sharded module on one rank only would wait forever for the others. So these callers
get a plain ControlNet built from the gathered weights instead: a collective every rank joins.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers import ControlNetModel
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
    return plain_copy(accelerator.unwrap_model(controlnet).config, weights)


def gather_weights(model: torch.nn.Module, *, every_rank: bool) -> dict[str, torch.Tensor] | None:
    """All the weights of a model sharded by FSDP (1 or 2), as plain tensors; a collective.

    On every rank, or with ``every_rank=False`` in host memory on rank 0 only, which keeps the
    copy off the other ranks' GPUs; they get None.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    weights = get_model_state_dict(model, options=options)
    return weights if every_rank or torch.distributed.get_rank() == 0 else None


def plain_copy(config, weights: dict[str, torch.Tensor]) -> ControlNetModel:
    """A ControlNetModel holding ``weights`` where they lie, built without initialising weights
    it would replace."""
    with torch.device("meta"):
        copy = ControlNetModel.from_config(config)
    copy.load_state_dict(weights, assign=True)  # strict: a missing or extra key is an error
    return copy
