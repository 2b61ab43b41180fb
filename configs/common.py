"""Shared config pieces: model presets, mesh, sharding rules, argument parsing, and reading a
config file with its overrides outside a command's own flags (`load_configs`).

Presets are chosen with `--config=configs/<stage>.py:<preset>[,key=value...]`, single fields with
`--config.field=value` (ml_collections), e.g.
  python -m anchoredit_jax.train --config=configs/pretrain.py:smoke --config.train.steps=20
"""
import ast
import os

import ml_collections
from absl import flags
from ml_collections import config_flags

from anchoredit_jax import sharding
from anchoredit_jax.convert.wan import model_config_from_dir

PRESETS = ("smoke", "toy", "small", "wan1.3b", "wan14b")
WAN_PRESETS = ("wan1.3b", "wan14b")


def parse_arg(arg, **defaults):
  """'toy,steps=3' -> ConfigDict(preset='toy', steps=3) over `defaults` (big_vision style)."""
  out = ml_collections.ConfigDict(defaults)
  parts = [p for p in (arg or "").split(",") if p]
  if parts and "=" not in parts[0]:
    out.preset = parts.pop(0)
  for p in parts:
    k, v = p.split("=", 1)
    out[k] = type(out[k])(v) if k in out else v
  if out.get("preset") not in PRESETS:
    raise ValueError(f"unknown preset {out.get('preset')!r}; choose one of {PRESETS}")
  return out


def model_config(preset: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict(dict(
      dim=64, layers=2, heads=4, ffn_dim=256, freq_dim=64, patch=4, rope_theta=10000.0,
      text_encoder="bytes", text_dim=64, text_layers=1, text_heads=4, text_len=64,
      autoencoder="pixel", ae_factor=1, latent_channels=3,
      concat_prev=True, concat_anchor=False, source_context=False, prediction="velocity", abs_pos=False,
      copy_gate=False,  # an output channel gating between the new turn and the previous one (dit.py)
      gate_from="prev",  # what the gate copies: "prev" (the previous turn) or "anchor" (the source)
      gate_hard=False,  # inference: round the gate to 0/1 (no gradient; not for training)
      rope_stride=1,    # temporal RoPE positions = turn index x stride (the authors use 4)
      # "masked": cross-attention skips padded text tokens; "attend": it attends to them too (zero
      # embeddings), which is how Wan2.1 and the authors' code were trained (no mask is passed)
      text_padding="masked",
      attention_kernel="xla", remat="none",
      dtype="float32"))  # compute dtype of the DiT's blocks (float32 or bfloat16); params stay float32
  if preset == "toy":
    # abs_pos: "add ... at the top left" needs absolute positions; RoPE alone gives relative ones
    # remat "full": on this CPU recomputing the blocks in the backward pass is faster than storing
    # their activations (stage-1 / 2 / 3 steps 10% / 8% / 6% faster; benchmark/RESULTS.md)
    m.update(dim=192, layers=4, heads=6, ffn_dim=768, freq_dim=128, text_dim=128, text_layers=2,
             text_heads=4, abs_pos=True, remat="full")
  elif preset == "small":
    # what one GPU trains in hours: ~110M parameters, 64x64 images at patch 2 (1024 tokens a turn)
    # remat "dots": without it stage 2 (6 turns of 1024 tokens, batch 8) needs about 340 GiB
    # (`python -m anchoredit_jax.aot --config=configs/causal.py:small --topology=h100:1
    # --stages=all`; it ran out of memory on an H200); with it every stage fits one H100
    m.update(dim=768, layers=12, heads=12, ffn_dim=3072, freq_dim=256, patch=2, text_dim=256,
             text_layers=2, text_heads=4, abs_pos=True, dtype="bfloat16", remat="dots")
  elif preset in WAN_PRESETS:
    # Wan2.1-T2V-1.3B / -14B: heads of 128, umT5-XXL text (4096 wide, 512 tokens), patch (1,2,2)
    # over the VAE's 16 channels at stride 8. The DiT loads from Wan weights (convert/wan.py).
    m.update(freq_dim=256, patch=2, text_encoder="umt5", text_dim=4096, text_len=512,
             autoencoder="wan_vae", ae_factor=8, latent_channels=16, remat="full", dtype="bfloat16",
             tokenizer="",  # the checkpoint's tokenizer/ folder: configs/wan/*.py set it
             umt5=dict(vocab=256384, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                       num_buckets=32, max_distance=128),  # umT5-XXL's encoder; d_model = text_dim
             vae=dict())  # WanVAEConfig fields; empty = Wan2.1's VAE
    m.update(dict(dim=1536, layers=30, heads=12, ffn_dim=8960) if preset == "wan1.3b" else
             dict(dim=5120, layers=40, heads=40, ffn_dim=13824))
    # the conventions Wan2.1's weights were trained with, and the authors' temporal RoPE stride
    m.update(text_padding="attend", rope_stride=4)
  return m


def mesh_config(preset: str) -> ml_collections.ConfigDict:
  """Sizes within a slice (one may be -1: the rest) and across slices over the data-centre network
  (dcn_*: TPU slices of a multislice job; on CPU/GPU each process counts as one)."""
  shape = dict(data=1, fsdp=-1, tensor=1) if preset in WAN_PRESETS else dict(data=-1, fsdp=1, tensor=1)
  return ml_collections.ConfigDict(dict(shape, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))


def sharding_rules():
  return [list(r) for r in sharding.DEFAULT_RULES]


def wan_stage(get_config, arg):
  """A stage config for Wan2.1 weights: the preset's training settings (default wan1.3b) and a
  model read from the diffusers folder `dir`, so the same file serves 1.3B, 14B and tiny test
  folders. Stage 1 initialises from the folder itself."""
  a = parse_arg(arg, preset="wan1.3b", dir="")
  if not a.dir:
    raise ValueError("give the Wan2.1 diffusers folder: --config=configs/wan/<stage>.py:wan1.3b,"
                     "dir=/path/to/Wan2.1-T2V-1.3B-Diffusers")
  c = get_config(a.preset)
  c.model.update(model_config_from_dir(a.dir))
  if c.stage == "pretrain":
    c.init_from = a.dir
  for k, v in a.items():
    if k not in ("preset", "dir"):
      c[k] = v
  return c


def config_error(e: Exception) -> str:
  """One line for what absl/ml_collections raise on a bad --config: its file's error (the last
  line of a quoted traceback), or an override naming a field the config lacks (with its
  'Did you mean' hint)."""
  if isinstance(e, (flags.Error, OSError)):
    last = str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
    return last if "command line flag" in last else f"--config: {last}"
  text = str(e)
  try:  # ml_collections wraps the KeyError's message in quotes, twice
    while text[:1] in "'\"" and text:
      text = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    pass
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return f"--config: no field {lines[0] if lines else text} in this config" + "".join(f"; {l}" for l in lines[1:])


def load_configs(config_arg: str, overrides: list, stages: str):
  """The --config and its overrides, read for each stage named in `stages` ('' = its own stage,
  'all' = pretrain,causal,distill) from stage files beside it."""
  path, _, arg = config_arg.partition(":")
  names = ["pretrain", "causal", "distill"] if stages == "all" else [s for s in stages.split(",") if s]
  files = [os.path.join(os.path.dirname(path), f"{s}.py") for s in names] or [path]
  out = []
  for f in files:
    if not os.path.exists(f):
      raise ValueError(f"config file {f} does not exist")
    argv = ["aot", f"--config={f}" + (f":{arg}" if arg else ""), *overrides]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    try:
      fv(argv)
    except (flags.Error, AttributeError, KeyError) as e:
      raise ValueError(config_error(e)) from e
    out.append((f + (f":{arg}" if arg else ""), holder.value))
  return out
