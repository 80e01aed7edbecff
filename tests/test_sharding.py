"""sharding: the plain ControlNet that FSDP runs save and evaluate, rebuilt from gathered weights.

test_fsdp.py runs the whole trainer under FSDP; here the gathering itself is checked against
an unsharded reference: two gloo processes shard a tiny ControlNet with FSDP2's fully_shard the
way the README's configuration does, take an optimizer step on their shards, and gather. Also: the copy that the gathered weights become,
and the unsharded path, which must not copy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from accelerate import Accelerator
from conftest import script_env
from diffusers import ControlNetModel

from controlnet_trainer.sharding import controlnet_to_save, full_controlnet, is_sharded, plain_copy


def test_plain_copy_computes_what_the_original_does(assets):
    original = ControlNetModel.from_pretrained(assets["controlnet"]).eval()
    gathered = {name: tensor.clone() for name, tensor in original.state_dict().items()}  # as FSDP's gather gives
    copy = plain_copy(original, gathered).eval()
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
    assert controlnet_to_save(accelerator, model) is accelerator.unwrap_model(model)


# Each rank: shard the ControlNet by blocks, one AdamW step on the same batch (the averaged
# gradient is then the batch's own, exactly), gather, and compare with the same step unsharded.
SHARDED_STEP = """\
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from diffusers import ControlNetModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from controlnet_trainer.sharding import gather_weights, plain_copy

def outputs(model, inputs):
    down, mid = model(*inputs[:2], encoder_hidden_states=inputs[2], controlnet_cond=inputs[3], return_dict=False)
    return [*down, mid]

def step(model, inputs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(o.pow(2).mean() for o in outputs(model, inputs)).backward()
    optimizer.step()

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
generator = torch.Generator().manual_seed(0)
plain = ControlNetModel.from_pretrained(sys.argv[1])
inputs = (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
          torch.randn(2, 4, plain.config.cross_attention_dim, generator=generator),
          torch.randn(2, 3, 64, 64, generator=generator))
sharded = ControlNetModel.from_pretrained(sys.argv[1])
for module in sharded.modules():
    if isinstance(module, (ResnetBlock2D, Transformer2DModel)):
        fully_shard(module, mesh=mesh)
fully_shard(sharded, mesh=mesh)
step(plain, inputs)
step(sharded, inputs)
expected = plain.state_dict()
local = sum(p.to_local().numel() for p in sharded.parameters())
everywhere = gather_weights(sharded, every_rank=True)
on_main = gather_weights(sharded, every_rank=False)
copy = plain_copy(plain, everywhere).eval()
with torch.no_grad():
    same_outputs = all(torch.equal(a, b) for a, b in zip(outputs(copy, inputs), outputs(plain.eval(), inputs)))
result = {
    "local_share": local / sum(p.numel() for p in plain.parameters()),
    "every_rank_equal": sorted(everywhere) == sorted(expected) and all(torch.equal(everywhere[k], expected[k]) for k in expected),
    "on_main": None if on_main is None else all(torch.equal(on_main[k], expected[k]) for k in expected),
    "copy_same_outputs": same_outputs,
}
with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json"), "w") as handle:
    json.dump(result, handle)
dist.destroy_process_group()
"""


def test_gathering_real_fsdp2_shards_of_two_processes_gives_the_trained_weights(assets, tmp_path):
    script = tmp_path / "sharded_step.py"
    script.write_text(SHARDED_STEP)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(script),
        str(assets["controlnet"]),
    ]
    done = subprocess.run(
        command, env=script_env(OUT_DIR=str(tmp_path)), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(ranks):
        assert result["local_share"] < 0.75, "the weights were not sharded"
        assert result["every_rank_equal"], f"rank {rank} gathered other weights than the unsharded step gives"
        assert result["copy_same_outputs"], f"rank {rank}'s copy computes something else"
    assert ranks[0]["on_main"] is True and ranks[1]["on_main"] is None  # rank 0 only, in host memory
