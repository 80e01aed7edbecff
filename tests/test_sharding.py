"""sharding: the plain ControlNet that FSDP runs save and evaluate, rebuilt from gathered weights.

FSDP itself needs GPUs (accelerate never shards on CPU); the GPU check is in the README. Here:
the copy that the gathered weights become, and the unsharded path, which must not copy.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from diffusers import ControlNetModel

from controlnet_trainer.sharding import full_controlnet, is_sharded, plain_copy


def test_plain_copy_computes_what_the_original_does(assets):
    original = ControlNetModel.from_pretrained(assets["controlnet"]).eval()
    gathered = {name: tensor.clone() for name, tensor in original.state_dict().items()}  # as FSDP's gather gives
    copy = plain_copy(original.config, gathered, torch.device("cpu")).eval()
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, original.config.in_channels, 8, 8, generator=generator)
    image = torch.randn(2, 3, 64, 64, generator=generator)
    text = torch.randn(2, 4, original.config.cross_attention_dim, generator=generator)
    inputs = {"encoder_hidden_states": text, "controlnet_cond": image, "return_dict": False}
    with torch.no_grad():
        expected = original(latents, torch.tensor([10, 500]), **inputs)
        got = copy(latents, torch.tensor([10, 500]), **inputs)
    for want, have in zip([*expected[0], expected[1]], [*got[0], got[1]], strict=True):
        assert torch.equal(want, have)


def test_unsharded_runs_use_the_module_itself(assets):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(ControlNetModel.from_pretrained(assets["controlnet"]))
    assert not is_sharded(accelerator)
    assert full_controlnet(accelerator, model, every_rank=False) is accelerator.unwrap_model(model)
