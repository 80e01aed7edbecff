"""Train a ControlNet for Stable Diffusion 1.x/2.x: a drop-in for diffusers' train_controlnet.py.

    accelerate launch train_controlnet.py \
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --dataset_name=fusing/fill50k --output_dir=out --resolution=512 --learning_rate=1e-5 \
      --validation_image c1.png c2.png \
      --validation_prompt "red circle with blue background" "cyan circle with brown floral background" \
      --train_batch_size=1 --gradient_accumulation_steps=4

`python train_controlnet.py --help` lists every flag by group.
"""

from controlnet_trainer.cli import main

if __name__ == "__main__":
    main("sd")
