"""Small shared pieces for tests."""
import functools
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.models.model import build
from configs import common, pretrain


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cli(workdir, *extra, config="configs/pretrain.py:smoke"):
  """`python -m anchoredit_jax.train` in a subprocess on one CPU device; the CompletedProcess."""
  cmd = [sys.executable, "-m", "anchoredit_jax.train", f"--config={config}", f"--workdir={workdir}", *extra]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tiny_model(**overrides) -> ml_collections.ConfigDict:
  m = common.model_config("smoke")
  m.update(dim=32, layers=2, heads=2, ffn_dim=64, freq_dim=32, text_dim=32, text_heads=2,
           text_len=32)
  m.update(overrides)
  return m


def smoke_config(**train):
  cfg = pretrain.get_config("smoke")
  cfg.train.update(train)
  return cfg


def one_device_mesh():
  return sh.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def random_model(cfg, seed=0):
  """A model with every parameter perturbed (the output head starts at zero, which would make
  any equality test pass trivially) and a jitted functional apply(params, ...)."""
  graphdef, params = nnx.split(build(cfg, nnx.Rngs(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])

  @functools.partial(jax.jit, static_argnames=("causal",))
  def apply(params, x, t, toks, pos, cond=None, context=None, causal=True):
    return nnx.merge(graphdef, params)(x, t, toks, pos, cond=cond, context=context, causal=causal)

  return params, apply


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def word_tokenizer(texts, path):
  """A tiny T5-style Hugging Face tokenizer (pad 0, eos 1, unk 2) learnt from `texts`, saved to
  `path` the way checkpoints ship theirs; nothing is downloaded."""
  import transformers
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(path)
  return str(path)


def tiny_wan_folder(root, channels=4, text_dim=32):
  """A tiny random Wan2.1 diffusers folder (transformer, vae, text_encoder, tokenizer) written by
  diffusers / transformers themselves, every weight moved off its initial value; `root`."""
  import diffusers
  import torch
  import transformers
  from anchoredit_jax.data import shapes

  def perturb(model):
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model

  torch.manual_seed(0)
  C = channels
  perturb(diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=C,
      out_channels=C, text_dim=text_dim, freq_dim=32, ffn_dim=64, num_layers=2)
  ).save_pretrained(root / "transformer")
  perturb(diffusers.AutoencoderKLWan(
      base_dim=8, z_dim=C, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
      temperal_downsample=[False, True, True], latents_mean=[0.1] * C, latents_std=[1.5] * C)
  ).save_pretrained(root / "vae")
  perturb(transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=128, d_model=text_dim, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
      relative_attention_num_buckets=8, relative_attention_max_distance=16))
  ).save_pretrained(root / "text_encoder")
  texts = [t for s in range(40) for t in shapes.make_sequence(s, 3, 32, "train")["instructions"]]
  word_tokenizer(texts, root / "tokenizer")
  return root
