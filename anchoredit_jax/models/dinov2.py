"""DINOv2 (with or without register tokens) in Flax NNX, loaded from a Hugging Face folder, for the
DINO image-similarity metric (eval/similarity.py).

Weights: a folder saved by transformers' Dinov2Model (or Dinov2WithRegistersModel)
.save_pretrained (config.json + model.safetensors), e.g. facebook/dinov2-base downloaded by the
user with `huggingface-cli download facebook/dinov2-base --local-dir DIR` and passed by a flag.
Nothing is fetched at run time and pickles (.bin/.pt) are refused.

Letters: b batch, s tokens, d width, f MLP width, r register tokens, g stored position grid side,
i/j patch rows/cols of the input.

Patch conv (with bias), a CLS token in front, learned positions for CLS + a g x g grid resampled
bicubically to the input's i x j grid as transformers does (plain bicubic for DINOv2, the
antialiased one for DINOv2 with registers), register tokens inserted after the CLS token without
positions, pre-norm blocks whose two branches are each scaled by a learned per-channel layer
scale, the MLP fc1 -> hidden_act -> fc2 or SwiGLU (use_swiglu_ffn), and a final LayerNorm. The
embedding is the CLS token after it: transformers' pooler_output.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.models import vit
from anchoredit_jax.models.layers import Dense, LayerNorm, param

EXAMPLE = "facebook/dinov2-base"
KINDS = ("dinov2", "dinov2_with_registers")
# transformers' Dinov2Config defaults; Dinov2WithRegistersConfig differs in the keys below it
DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                num_channels=3, qkv_bias=True, use_swiglu_ffn=False, use_mask_token=True,
                num_register_tokens=0)
REGISTER_DEFAULTS = dict(patch_size=16, num_register_tokens=4, use_mask_token=True)


def swiglu_width(dim, mlp_ratio) -> int:
  """Two thirds of the MLP width, rounded up to a multiple of 8 (Dinov2SwiGLUFFN)."""
  return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class _Block(nnx.Module):
  """Dinov2Layer: x + scale1 * attn(norm1(x)), then x + scale2 * mlp(norm2(x))."""

  def __init__(self, c, *, rngs):
    d, eps = c["hidden_size"], c["layer_norm_eps"]
    self.act, self.swiglu = c["hidden_act"], c["use_swiglu_ffn"]
    self.norm1 = LayerNorm(d, rngs=rngs, eps=eps)
    self.attn = vit.Attention(d, c["num_attention_heads"], rngs=rngs, qkv_bias=c["qkv_bias"])
    self.scale1 = param(rngs, nnx.initializers.ones, (d,), (sh.EMBED,))
    self.norm2 = LayerNorm(d, rngs=rngs, eps=eps)
    if self.swiglu:  # weights_in holds the gate and the up projection, stacked: [2f, d]
      f = swiglu_width(d, c["mlp_ratio"])
      self.fc1 = Dense(d, 2 * f, (sh.EMBED, sh.MLP_), rngs=rngs)
    else:
      f = int(d * c["mlp_ratio"])
      self.fc1 = Dense(d, f, (sh.EMBED, sh.MLP_), rngs=rngs)
    self.fc2 = Dense(f, d, (sh.MLP_, sh.EMBED), rngs=rngs)
    self.scale2 = param(rngs, nnx.initializers.ones, (d,), (sh.EMBED,))

  def __call__(self, x):
    """x [b,s,d] -> [b,s,d]."""
    x = x + self.attn(self.norm1(x)) * self.scale1
    h = self.fc1(self.norm2(x))  # [b,s,f] or [b,s,2f]
    if self.swiglu:
      gate, up = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(gate) * up
    else:
      h = vit.ACTIVATIONS[self.act](h)
    return x + self.fc2(h) * self.scale2


class Dinov2(nnx.Module):
  """pixels [b,H,W,3] (normalised; any size of at least one patch) -> CLS embedding [b,d]."""

  def __init__(self, c, *, rngs):
    d, r = c["hidden_size"], c["num_register_tokens"]
    self.grid = grid = c["image_size"] // c["patch_size"]  # 518 // 14 = 37 for facebook's
    registers = c["model_type"] == "dinov2_with_registers"
    self.antialias = registers  # that port resamples the positions with antialias=True
    self.patches = vit.Patches(c["patch_size"], c["num_channels"], d, rngs=rngs)
    self.cls_token = param(rngs, nnx.initializers.normal(0.02), (d,), (sh.EMBED,))
    # used only by masked-image pretraining; kept so that every checkpoint key has its place
    self.mask_token = (param(rngs, nnx.initializers.zeros, (d,), (sh.EMBED,))
                       if c["use_mask_token"] or registers else None)
    self.registers = (param(rngs, nnx.initializers.zeros, (r, d), (None, sh.EMBED))
                      if registers else None)  # [r,d]
    self.positions = param(rngs, nnx.initializers.normal(0.02), (grid * grid + 1, d),
                           (None, sh.EMBED))  # [1 + g*g, d]
    self.blocks = nnx.List([_Block(c, rngs=rngs) for _ in range(c["num_hidden_layers"])])
    self.norm = LayerNorm(d, rngs=rngs, eps=c["layer_norm_eps"])

  def embed(self, pixels):
    """pixels [b,H,W,3] -> tokens [b, 1 + r + i*j, d] before the blocks."""
    x, (i, j) = self.patches(pixels)  # [b,i*j,d]
    if i == 0 or j == 0:
      raise ValueError(f"DINOv2 needs images of at least one patch ({self.patches.patch} pixels "
                       f"a side), got {pixels.shape[1]}x{pixels.shape[2]}")
    b, _, d = x.shape
    positions = self.positions[...].astype(jnp.float32)  # resampled in float32, as transformers
    g = self.grid
    grid = vit.resample_grid(positions[1:].reshape(g, g, d), (i, j), self.antialias)
    positions = jnp.concatenate([positions[:1], grid.reshape(i * j, d)]).astype(x.dtype)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + positions
    if self.registers is not None:
      regs = jnp.broadcast_to(self.registers[...].astype(x.dtype), (b, *self.registers.shape))
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
    return x

  def __call__(self, pixels):
    x = self.embed(pixels)
    for block in self.blocks:
      x = block(x)
    return self.norm(x[:, 0])


# ---------------------------------------------------------------------------- loading


def resolve_config(config, source) -> dict:
  """config.json of a Dinov2(WithRegisters)Model -> the dict Dinov2 is built from."""
  kind = config["model_type"]
  out = {**DEFAULTS, **(REGISTER_DEFAULTS if kind == "dinov2_with_registers" else {}), **config}
  if kind == "dinov2":
    out["num_register_tokens"] = 0
  vit.check_activation(out["hidden_act"], source)
  if out.get("head_dim", out["hidden_size"] // out["num_attention_heads"]) * out[
      "num_attention_heads"] != out["hidden_size"]:
    raise ValueError(f"{source}: heads times head_dim is not hidden_size; not ported")
  for key in ("patch_size", "image_size"):
    if isinstance(out[key], (list, tuple)):
      if len(set(out[key])) != 1:
        raise ValueError(f"{source}: {key} {out[key]} is not square; not ported")
      out[key] = out[key][0]
  return out


def _names(model: Dinov2) -> dict:
  """{checkpoint key: (Param, layout)} of every parameter (vit.assign's layouts)."""
  d = model.cls_token.shape[0]
  names = {"embeddings.cls_token": (model.cls_token, (1, 1, d)),
           "embeddings.position_embeddings": (model.positions, (1, *model.positions.shape)),
           "embeddings.patch_embeddings.projection.weight": (model.patches.kernel, "conv"),
           "embeddings.patch_embeddings.projection.bias": (model.patches.bias, None)}
  if model.mask_token is not None:
    names["embeddings.mask_token"] = (model.mask_token, (1, d))
  if model.registers is not None:
    names["embeddings.register_tokens"] = (model.registers, (1, *model.registers.shape))
  names |= vit.norm(model.norm, "layernorm")
  for i, block in enumerate(model.blocks):
    at = f"encoder.layer.{i}."
    names |= vit.norm(block.norm1, at + "norm1") | vit.norm(block.norm2, at + "norm2")
    for ours, theirs in (("q", "attention.query"), ("k", "attention.key"),
                         ("v", "attention.value"), ("o", "output.dense")):
      names |= vit.linear(getattr(block.attn, ours), f"{at}attention.{theirs}")
    names[at + "layer_scale1.lambda1"] = (block.scale1, None)
    names[at + "layer_scale2.lambda1"] = (block.scale2, None)
    fc1, fc2 = ("mlp.weights_in", "mlp.weights_out") if block.swiglu else ("mlp.fc1", "mlp.fc2")
    names |= vit.linear(block.fc1, at + fc1) | vit.linear(block.fc2, at + fc2)
  return names


def load_dinov2(path, *, dtype=jnp.float32):
  """(graphdef, params, config) of the Dinov2Model / Dinov2WithRegistersModel in folder `path`.

  config: the resolved config (transformers' defaults filled in). Use it functionally:
  `nnx.merge(graphdef, params)(pixels)` inside a jitted function.
  """
  raw, tensors = vit.read_folder(path, KINDS, "DINOv2", EXAMPLE)
  config = resolve_config(raw, path)
  model = nnx.eval_shape(lambda: Dinov2(config, rngs=nnx.Rngs(0)))
  vit.assign(_names(model), tensors, path, "DINOv2", dtype)
  graphdef, params = nnx.split(model)
  return graphdef, params, config
