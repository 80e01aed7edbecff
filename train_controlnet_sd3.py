"""Train a ControlNet for Stable Diffusion 3 and 3.5: a drop-in for diffusers' train_controlnet_sd3.py.

    accelerate launch train_controlnet_sd3.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-3.5-medium \
      --dataset_name=fusing/fill50k --output_dir=out-sd3 --mixed_precision=bf16 \
      --resolution=1024 --learning_rate=1e-5 --train_batch_size=1 --gradient_accumulation_steps=4 \
      --gradient_checkpointing --cache_text_embeddings \
      --validation_image c1.png --validation_prompt "red circle with blue background"

`python train_controlnet_sd3.py --help` lists every flag by group.
"""

from controlnet_trainer.cli import main

if __name__ == "__main__":
    main("sd3")
