"""Train a ControlNet for Stable Diffusion XL: a drop-in for diffusers' train_controlnet_sdxl.py.

    accelerate launch train_controlnet_sdxl.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
      --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
      --dataset_name=fusing/fill50k --output_dir=out-sdxl --mixed_precision=fp16 \
      --resolution=1024 --learning_rate=1e-5 --train_batch_size=1 --gradient_accumulation_steps=4 \
      --validation_image c1.png --validation_prompt "red circle with blue background"

`python train_controlnet_sdxl.py --help` lists every flag by group.
"""

from controlnet_trainer.cli import main

if __name__ == "__main__":
    main("sdxl")
