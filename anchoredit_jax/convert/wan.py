"""Wan2.1 transformer weights -> CausalDiT parameters, loaded straight into sharded arrays.

Two public layouts are read:
  * diffusers (`WanTransformer3DModel`): `condition_embedder.time_proj`, `blocks.N.attn1.to_q`, ...,
    a `config.json` beside the (possibly sharded, indexed) `diffusion_pytorch_model*.safetensors`;
  * Wan's own (`blocks.N.self_attn.q`, `time_projection.1`, `head.head`, ...), which causal-video
    repos ship too, sometimes under a `model.diffusion_model.` prefix.
Every CausalDiT parameter must come from exactly one checkpoint key and every checkpoint key must be
used: anything missing, left over or of the wrong shape is one ValueError, never a warning.

Each parameter becomes a global array with `jax.make_array_from_callback`; the callback slices the
memory-mapped tensor (`convert/tensors.py`), so a process reads only the blocks its devices hold.

Conversions: torch Linear weights [out, in] -> kernels [in, out]; the patch Conv3d [d, c, 1, p, p]
-> a kernel over (p q c) tokens; per-layer tensors stack on the leading `layers` axis. diffusers
swaps Wan's norm names (its `norm2` is the affine cross-attention norm that Wan and we call norm3).
An editing model that also takes the previous turn (`concat_prev`) gets zero kernels for those
extra input channels, so at load it computes exactly what the video model computes.
"""
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.convert.tensors import open_checkpoint
from anchoredit_jax.models.dit import CausalDiT, pad_patch_kernel
from anchoredit_jax.models.model import abstract_split, config_kwargs, latent_channels
from anchoredit_jax.models.umt5 import _config_kwargs, load_umt5
from anchoredit_jax.models.wan_vae import WanVAEConfig, load_wan_vae, read_config

PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.")
IGNORED = ("norm_added_q",)  # an unused parameter of some diffusers Wan checkpoints


def _linear(ours, diffusers, wan):
  return {f"{ours}/kernel": (f"{diffusers}.weight", f"{wan}.weight", "T"),
          f"{ours}/bias": (f"{diffusers}.bias", f"{wan}.bias", "id")}


def _table() -> dict:
  """Our parameter path -> (diffusers key, Wan key, transform); '{i}' marks a per-layer key."""
  t = {"patch_embed/kernel": ("patch_embedding.weight", "patch_embedding.weight", "conv"),
       "patch_embed/bias": ("patch_embedding.bias", "patch_embedding.bias", "id"),
       "head_modulation": ("scale_shift_table", "head.modulation", "id"),
       "blocks/modulation": ("blocks.{i}.scale_shift_table", "blocks.{i}.modulation", "id"),
       "blocks/norm3/scale": ("blocks.{i}.norm2.weight", "blocks.{i}.norm3.weight", "id"),
       "blocks/norm3/bias": ("blocks.{i}.norm2.bias", "blocks.{i}.norm3.bias", "id")}
  t |= _linear("text_embed/fc1", "condition_embedder.text_embedder.linear_1", "text_embedding.0")
  t |= _linear("text_embed/fc2", "condition_embedder.text_embedder.linear_2", "text_embedding.2")
  t |= _linear("time_in", "condition_embedder.time_embedder.linear_1", "time_embedding.0")
  t |= _linear("time_out", "condition_embedder.time_embedder.linear_2", "time_embedding.2")
  t |= _linear("time_proj", "condition_embedder.time_proj", "time_projection.1")
  t |= _linear("head", "proj_out", "head.head")
  t |= _linear("blocks/ffn/fc1", "blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0")
  t |= _linear("blocks/ffn/fc2", "blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2")
  for ours, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for p in "qkvo":
      d_name = "to_out.0" if p == "o" else f"to_{p}"
      t |= _linear(f"blocks/{ours}/{p}", f"blocks.{{i}}.{diffusers}.{d_name}", f"blocks.{{i}}.{ours}.{p}")
    for p in ("norm_q", "norm_k"):
      t[f"blocks/{ours}/{p}/scale"] = (f"blocks.{{i}}.{diffusers}.{p}.weight",
                                       f"blocks.{{i}}.{ours}.{p}.weight", "id")
  return t


TABLE = _table()


def _layout(tensors):
  """(key prefix, column of TABLE: 0 diffusers / 1 Wan) of a checkpoint, or a ValueError."""
  for prefix in PREFIXES:
    if prefix + "condition_embedder.time_proj.weight" in tensors:
      return prefix, 0
    if prefix + "time_projection.1.weight" in tensors:
      return prefix, 1
  some = ", ".join(sorted(tensors.keys())[:3])
  raise ValueError(f"not a Wan2.1 transformer checkpoint (no time_projection / condition_embedder "
                   f"keys; it has e.g. {some}); pass the transformer's weights")


def transformer_dir(path) -> Path:
  """A full diffusers pipeline directory keeps the DiT under transformer/."""
  path = Path(path)
  return path / "transformer" if (path / "transformer").is_dir() else path


# Wan's own config.json (WanModel, as in the Wan2.1 release) -> diffusers' names for the same fields
WAN_KEYS = {"num_layers": "num_layers", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "eps": "eps",
            "text_dim": "text_dim", "in_dim": "in_channels", "out_dim": "out_channels",
            "patch_size": "patch_size", "cross_attn_norm": "cross_attn_norm"}


def _from_wan_layout(c: dict) -> dict:
  if c.get("model_type", "t2v") != "t2v":
    raise ValueError(f"this is a Wan {c['model_type']} model; load a text-to-video one (Wan2.1-T2V-*)")
  heads = c.get("num_heads", 12)
  out = {WAN_KEYS[k]: v for k, v in c.items() if k in WAN_KEYS}
  out.update(num_attention_heads=heads, attention_head_dim=c.get("dim", 1536) // heads,
             qk_norm="rms_norm_across_heads" if c.get("qk_norm", True) else None)
  return out


def model_fields(config: dict) -> dict:
  """Our model-config fields for a Wan2.1 transformer's config.json: diffusers'
  WanTransformer3DModel layout, or Wan's own (WanModel: dim, num_heads, in_dim, qk_norm true)."""
  c = _from_wan_layout(config) if "num_heads" in config or "in_dim" in config else config
  if c.get("image_dim") or c.get("added_kv_proj_dim"):
    raise ValueError("this is an image-conditioned Wan (I2V/FLF2V) transformer; load a "
                     "text-to-video one (Wan2.1-T2V-*)")
  if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not c.get("cross_attn_norm", True):
    raise ValueError("this Wan transformer uses another q/k or cross-attention norm than Wan2.1's")
  if c.get("eps", 1e-6) != 1e-6:  # our norms are built with Wan2.1's 1e-6
    raise ValueError(f"this Wan transformer's norms use eps {c['eps']}; this implementation uses "
                     "Wan2.1's 1e-6 and would compute something else")
  pt, ph, pw = c.get("patch_size", (1, 2, 2))
  if pt != 1 or ph != pw:
    raise ValueError(f"patch_size {c.get('patch_size')} is not (1, p, p); only per-frame patches load")
  heads = c.get("num_attention_heads", 40)
  return dict(dim=heads * c.get("attention_head_dim", 128), heads=heads,
              layers=c.get("num_layers", 40), ffn_dim=c.get("ffn_dim", 13824),
              freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096), patch=ph,
              latent_channels=c.get("out_channels") or c.get("in_channels", 16))


def _check_config(path: Path, cfg, latent_channels: int):
  config = path / "config.json"
  if not config.is_file():
    return  # Wan's own layout has no config; the shape checks below still catch a wrong size
  fields = model_fields(json.loads(config.read_text()))
  ours = lambda k: latent_channels if k == "latent_channels" else cfg[k]
  wrong = [f"{k}: checkpoint {v} vs config {ours(k)}" for k, v in fields.items() if ours(k) != v]
  if wrong:
    raise ValueError(f"{config} is another model size than this config ({'; '.join(wrong)}); "
                     f"use the matching preset or --config.model.* fields")


def _source_shape(transform, target, latent_channels, p):
  """The checkpoint shape one layer of `target` must come from."""
  if transform == "T":
    return tuple(reversed(target))
  if transform == "conv":  # the video model's input channels only; concat_prev ones are added
    return (target[1], latent_channels, 1, p, p)
  return tuple(target)


def _view(array, transform, in_ch):
  """Checkpoint tensor -> our layout, as a lazy view where it can be one."""
  if transform == "T":
    return array.T
  if transform == "conv":  # [d, c, 1, p, q] -> [(p q c_in), d], zeros for the concat channels
    d, c, _, p, q = array.shape
    kernel = np.transpose(np.asarray(array[:, :, 0], np.float32), (2, 3, 1, 0)).reshape(p * q * c, d)
    return pad_patch_kernel(kernel, p, in_ch)
  return array


def read_block(array, transform, in_ch, index):
  """One device's block of one parameter layer (the only place checkpoint bytes are read)."""
  return np.asarray(_view(array, transform, in_ch)[index])


def load_wan_dit(path, cfg, latent_channels: int, *, mesh=None, rules=None) -> nnx.State:
  """CausalDiT(cfg) parameters from a Wan2.1 checkpoint, as an nnx.State of global arrays
  sharded over `mesh` by the parameters' logical names (one device when mesh is None)."""
  path = transformer_dir(path)
  if not path.exists():
    raise FileNotFoundError(f"Wan transformer checkpoint {path} not found")
  _check_config(path, cfg, latent_channels)
  tensors = open_checkpoint(path)
  prefix, column = _layout(tensors)
  abstract = nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=latent_channels, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  if mesh is None:
    shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(leaves)
  else:
    shardings = jax.tree.leaves(sh.param_shardings(state, mesh, rules or sh.DEFAULT_RULES))
  in_ch = abstract.patch_embed.kernel.shape[0] // cfg.patch ** 2

  plan, missing, wrong, used = [], [], [], set()
  for (keypath, leaf) in leaves:
    ours = jax.tree_util.keystr(keypath, simple=True, separator="/").removesuffix("/value")
    template, transform = TABLE[ours][column], TABLE[ours][2]
    stacked = ours.startswith("blocks/")
    keys = [prefix + template.format(i=i) for i in range(cfg.layers if stacked else 1)]
    want = _source_shape(transform, leaf.shape[1:] if stacked else leaf.shape, latent_channels,
                         cfg.patch)
    for k in keys:
      if k not in tensors:
        missing.append(k)
      elif tensors.shape(k) != want:
        wrong.append(f"{k} {tensors.shape(k)} (expected {want})")
    used.update(keys)
    plan.append((leaf, keys, transform, stacked))
  unused = [k for k in tensors.keys() if k not in used and not any(s in k for s in IGNORED)]
  for what, names, hint in (
      ("missing from the checkpoint", missing, "is it the size the config says (layers, dim)?"),
      ("of the wrong shape", wrong, "the checkpoint is another model size than the config"),
      ("in the checkpoint but not used by CausalDiT", unused,
       "an I2V/VACE/other-family checkpoint? load a Wan2.1 text-to-video transformer")):
    if names:
      raise ValueError(f"{path}: {len(names)} keys {what}: {', '.join(sorted(names)[:4])}"
                       f"{' ...' if len(names) > 4 else ''}; {hint}")

  def make(leaf, keys, transform, stacked, sharding):
    def callback(index):
      if not stacked:
        return read_block(tensors[keys[0]], transform, in_ch, index).astype(leaf.dtype)
      layers = range(len(keys))[index[0]]
      return np.stack([read_block(tensors[keys[i]], transform, in_ch, index[1:])
                       for i in layers]).astype(leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, sharding, callback)

  arrays = [make(*p, s) for p, s in zip(plan, shardings)]
  return jax.tree_util.tree_unflatten(treedef, arrays)


# ------------------------------------------------------------------ a whole diffusers pipeline

PARTS = ("transformer/config.json", "text_encoder/config.json", "vae/config.json", "tokenizer")


def is_wan_pipeline(path) -> bool:
  return (Path(path) / "transformer" / "config.json").is_file()


def _pipeline_dir(path) -> Path:
  path = Path(path)
  missing = [p for p in PARTS if not (path / p).exists()]
  if missing:
    raise FileNotFoundError(
        f"{path} is not a Wan2.1 diffusers folder (no {', '.join(missing)}); download one, e.g. "
        f"huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}")
  return path


def model_config_from_dir(path) -> dict:
  """Model-config fields (DiT sizes, umT5 and VAE architecture, tokenizer folder) of a Wan2.1
  diffusers folder, so a config follows whatever size of Wan it is pointed at."""
  path = _pipeline_dir(path)
  fields = model_fields(json.loads((path / PARTS[0]).read_text()))
  umt5 = _config_kwargs(json.loads((path / PARTS[1]).read_text()), {}, path / "text_encoder")
  vae = dataclasses.asdict(read_config(path / "vae"))
  if vae["z_dim"] != fields["latent_channels"]:
    raise ValueError(f"{path}: the VAE has {vae['z_dim']} latent channels, the transformer "
                     f"{fields['latent_channels']}; the folder mixes two models")
  return dict(fields, text_encoder="umt5", text_dim=umt5.pop("d_model"), umt5=umt5,
              autoencoder="wan_vae", ae_factor=2 ** (len(vae["dim_mult"]) - 1),
              vae={k: list(v) if isinstance(v, tuple) else v for k, v in vae.items()},
              tokenizer=str(path / "tokenizer"), abs_pos=False, prediction="velocity")


def load_wan_pipeline(path, model_cfg, *, mesh=None, rules=None) -> nnx.State:
  """EditModel parameters from a Wan2.1 diffusers folder: the DiT loaded sharded (see
  load_wan_dit), umT5 and the VAE whole on each process (they stay frozen in training)."""
  path = _pipeline_dir(path)
  if model_cfg.text_encoder != "umt5" or model_cfg.autoencoder != "wan_vae":
    raise ValueError("this model config has no umT5 / Wan VAE; build it from the folder "
                     "(configs/wan/<stage>.py with dir=...)")
  _, params = abstract_split(model_cfg)
  params["dit"] = load_wan_dit(path, model_cfg, latent_channels(model_cfg), mesh=mesh, rules=rules)
  params["text"] = nnx.state(load_umt5(path / "text_encoder", max_len=model_cfg.text_len), nnx.Param)
  vae_cfg = WanVAEConfig(**config_kwargs(model_cfg.vae))
  params["vae"] = nnx.state(load_wan_vae(path / "vae", vae_cfg), nnx.Param)
  return params
