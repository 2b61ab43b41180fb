"""Stage 1 from Wan2.1 weights: single-turn pretraining initialised from a Wan2.1 folder.

The model (DiT, umT5, VAE sizes and the tokenizer) is read from a Wan2.1 diffusers folder
(transformer/, text_encoder/, vae/, tokenizer/); umT5 and the VAE stay frozen. On a pod:
  python -m anchoredit_jax.train \\
    --config=configs/wan/pretrain.py:wan1.3b,dir=/data/Wan2.1-T2V-1.3B-Diffusers --workdir=runs/wan1.3b/pretrain
Use :wan14b with a Wan2.1-T2V-14B-Diffusers folder for the large model.
"""
from configs import pretrain, common


def get_config(arg=None):
  return common.wan_stage(pretrain.get_config, arg)
