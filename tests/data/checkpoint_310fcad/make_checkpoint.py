"""Writes this folder; run at commit 310fcad only (later commits resume what it wrote):

    PYTHONPATH=. python tests/data/checkpoint_310fcad/make_checkpoint.py

base/ is a tiny SD 1.x pipeline and the ControlNet the run starts from; the run is
tests/test_checkpoint_compat.py's command on the session fixture's fill dataset, 4 steps
straight through. Its checkpoint-2, final weights and metrics.jsonl are kept here.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from controlnet_trainer import fixtures
from controlnet_trainer.cli import run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for the command line the test resumes with
from test_checkpoint_compat import command

# Narrower than fixtures.build_tiny_sd's UNet, with a narrow conditioning embedding, so that a
# checkpoint (the ControlNet, its EMA and Adam's two moments) stays under a megabyte.
UNET = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "sample_size": 4,
    "in_channels": fixtures.LATENT_CHANNELS,
    "out_channels": fixtures.LATENT_CHANNELS,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (2, 4),
    "norm_num_groups": 4,
    "cross_attention_dim": fixtures.TEXT_HIDDEN_SIZE,
}
CONDITIONING_CHANNELS = (4, 8, 8, 8)


def build_base(path: Path) -> None:
    fixtures.build_tiny_sd(path, seed=0, vae_channels=(8, 8, 8, 8))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    shutil.rmtree(path / "unet")
    unet.save_pretrained(path / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    # Small weights in place of the zero convolutions, as a ControlNet trained for a while has:
    # every weight then has a gradient from the first step, so every Adam moment is live state.
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for module in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            for weight in module.parameters():
                weight.normal_(std=0.02)
    controlnet.save_pretrained(path / "controlnet")


def main() -> None:
    for folder in ("base", "checkpoint-2"):
        shutil.rmtree(HERE / folder, ignore_errors=True)
    build_base(HERE / "base")
    with tempfile.TemporaryDirectory() as scratch:
        # As tests/conftest.py's session fixture builds it.
        dataset = fixtures.build_fill_dataset(Path(scratch) / "fill", num_rows=24, size=64)
        output_dir = Path(scratch) / "run"
        run(command(dataset, output_dir))
        shutil.copytree(output_dir / "checkpoint-2", HERE / "checkpoint-2")
        for name in ("diffusion_pytorch_model.safetensors", "metrics.jsonl"):
            shutil.copy2(output_dir / name, HERE / name)


if __name__ == "__main__":
    main()
