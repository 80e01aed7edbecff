"""Train a ControlNet for FLUX.1: a drop-in for diffusers' train_controlnet_flux.py. On one 24 GB GPU:

    accelerate launch train_controlnet_flux.py \
      --pretrained_model_name_or_path=black-forest-labs/FLUX.1-dev \
      --dataset_name=fusing/fill50k --output_dir=out-flux --mixed_precision=bf16 \
      --resolution=512 --learning_rate=1e-5 --train_batch_size=1 \
      --quantize_base=nf4 --cache_text_embeddings --gradient_checkpointing \
      --use_8bit_adam --fused_backward_pass \
      --validation_image c1.png --validation_prompt "red circle with blue background"

`python train_controlnet_flux.py --help` lists every flag by group.
"""

from controlnet_trainer.cli import main

if __name__ == "__main__":
    main("flux")
