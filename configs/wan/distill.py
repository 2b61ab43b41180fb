"""Stage 3 from Wan2.1 weights: 4-step consistency distillation, from the stage-2 run.

The model (DiT, umT5, VAE sizes and the tokenizer) is read from a Wan2.1 diffusers folder
(transformer/, text_encoder/, vae/, tokenizer/); umT5 and the VAE stay frozen. On a pod:
  python -m anchoredit_jax.train \\
    --config=configs/wan/distill.py:wan1.3b,dir=/data/Wan2.1-T2V-1.3B-Diffusers --workdir=runs/wan1.3b/distill
Use :wan14b with a Wan2.1-T2V-14B-Diffusers folder for the large model.
"""
from configs import distill, common


def get_config(arg=None):
  return common.wan_stage(distill.get_config, arg)
