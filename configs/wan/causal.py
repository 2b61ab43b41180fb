"""Stage 2 from Wan2.1 weights: causal AR-forcing with self-rollout, from the stage-1 run.

The model (DiT, umT5, VAE sizes and the tokenizer) is read from a Wan2.1 diffusers folder
(transformer/, text_encoder/, vae/, tokenizer/); umT5 and the VAE stay frozen. On a pod:
  python -m anchoredit_jax.train \\
    --config=configs/wan/causal.py:wan1.3b,dir=/data/Wan2.1-T2V-1.3B-Diffusers --workdir=runs/wan1.3b/causal
Use :wan14b with a Wan2.1-T2V-14B-Diffusers folder for the large model.
"""
from configs import causal, common


def get_config(arg=None):
  return common.wan_stage(causal.get_config, arg)
