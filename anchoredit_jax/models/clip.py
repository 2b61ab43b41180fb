"""CLIP (vision and text towers with their projections) in Flax NNX, loaded from a Hugging Face
folder, for the CLIP-I and CLIP-T editing metrics (eval/similarity.py).

Weights: a folder saved by transformers' CLIPModel.save_pretrained (config.json +
model.safetensors), e.g. openai/clip-vit-large-patch14 downloaded by the user with
`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR` and passed by a flag.
Nothing is fetched at run time and pickles (.bin/.pt) are refused.

Letters: b batch, l tokens, d width, p projection width, H/W image height/width.

Vision: patch conv (no bias), a class token in front, learned positions, a LayerNorm before the
blocks (pre_layrnorm), pre-norm blocks (attention, then fc1 -> hidden_act -> fc2), the class
token's output through post_layernorm, then visual_projection. Text: token + position embeddings,
causal pre-norm blocks, final_layer_norm, pooled at the first EOS token (or, for configs with
eos_token_id 2, written before transformers fixed it, at the largest token id), then
text_projection. `CLIP.image_features` / `text_features` equal transformers'
get_image_features / get_text_features.
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.models import vit
from anchoredit_jax.models.layers import Dense, LayerNorm, param

EXAMPLE = "openai/clip-vit-large-patch14"
# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config omits
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                       num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                       image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LEGACY_EOS = 2  # eos_token_id of configs from before transformers PR #24773


class _Block(nnx.Module):
  """CLIPEncoderLayer: x + attn(norm1(x)), then x + fc2(act(fc1(norm2(x))))."""

  def __init__(self, dim, heads, ffn, act, eps, *, rngs):
    self.act = act
    self.norm1 = LayerNorm(dim, rngs=rngs, eps=eps)
    self.attn = vit.Attention(dim, heads, rngs=rngs)
    self.norm2 = LayerNorm(dim, rngs=rngs, eps=eps)
    self.fc1 = Dense(dim, ffn, (sh.EMBED, sh.MLP_), rngs=rngs)
    self.fc2 = Dense(ffn, dim, (sh.MLP_, sh.EMBED), rngs=rngs)

  def __call__(self, x, mask=None):
    """x [b,l,d]; mask [b,l,l] or None -> [b,l,d]."""
    x = x + self.attn(self.norm1(x), mask)
    return x + self.fc2(vit.ACTIVATIONS[self.act](self.fc1(self.norm2(x))))


def _blocks(c, rngs):
  return nnx.List([_Block(c["hidden_size"], c["num_attention_heads"], c["intermediate_size"],
                          c["hidden_act"], c["layer_norm_eps"], rngs=rngs)
                   for _ in range(c["num_hidden_layers"])])


class Vision(nnx.Module):
  """pixels [b,H,W,3] (normalised, H = W = image_size) -> pooled class token [b,d]."""

  def __init__(self, c, *, rngs):
    d, self.image_size, patch = c["hidden_size"], c["image_size"], c["patch_size"]
    self.patches = vit.Patches(patch, c["num_channels"], d, rngs=rngs, use_bias=False)
    self.class_embedding = param(rngs, nnx.initializers.normal(0.02), (d,), (sh.EMBED,))
    self.positions = param(rngs, nnx.initializers.normal(0.02),
                           ((self.image_size // patch) ** 2 + 1, d), (None, sh.EMBED))
    self.pre_norm = LayerNorm(d, rngs=rngs, eps=c["layer_norm_eps"])
    self.blocks = _blocks(c, rngs)
    self.post_norm = LayerNorm(d, rngs=rngs, eps=c["layer_norm_eps"])

  def __call__(self, pixels):
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"CLIP takes {self.image_size}x{self.image_size} pixels, got "
                       f"{pixels.shape[1]}x{pixels.shape[2]}; preprocess with the folder's "
                       "preprocessor_config.json")
    x, _ = self.patches(pixels)  # [b,l-1,d]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
    x = jnp.concatenate([cls, x], axis=1) + self.positions[...].astype(x.dtype)
    x = self.pre_norm(x)
    for block in self.blocks:
      x = block(x)
    return self.post_norm(x[:, 0])


class Text(nnx.Module):
  """tokens [b,l] int32 (l <= max_position_embeddings), mask [b,l] or None -> pooled [b,d]."""

  def __init__(self, c, *, rngs):
    d, self.eos_token_id = c["hidden_size"], c["eos_token_id"]
    self.tokens = param(rngs, nnx.initializers.normal(0.02), (c["vocab_size"], d),
                        (sh.VOCAB, sh.EMBED))
    self.positions = param(rngs, nnx.initializers.normal(0.02),
                           (c["max_position_embeddings"], d), (None, sh.EMBED))
    self.blocks = _blocks(c, rngs)
    self.final_norm = LayerNorm(d, rngs=rngs, eps=c["layer_norm_eps"])

  def __call__(self, tokens, mask=None):
    b, l = tokens.shape
    if l > self.positions.shape[0]:
      raise ValueError(f"CLIP's text tower takes at most {self.positions.shape[0]} tokens, got {l}")
    x = jnp.take(self.tokens[...], tokens, axis=0) + self.positions[:l]  # [b,l,d]
    causal = jnp.tril(jnp.ones((l, l), bool))
    keys = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
    attend = causal[None] & keys[:, None, :]  # [b,l,l]
    for block in self.blocks:
      x = block(x, attend)
    if self.eos_token_id == LEGACY_EOS:  # such configs predate the fix: the EOS is the largest id
      at = jnp.argmax(tokens, axis=-1)
    else:  # the first EOS (padding may be EOS too)
      at = jnp.argmax(tokens == self.eos_token_id, axis=-1)
    return self.final_norm(jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0])


class CLIP(nnx.Module):
  """The two towers and their projections into the shared p-wide space (unnormalised)."""

  def __init__(self, config, *, rngs):
    v, t, p = config["vision_config"], config["text_config"], config["projection_dim"]
    self.vision = Vision(v, rngs=rngs)
    self.text = Text(t, rngs=rngs)
    self.visual_projection = Dense(v["hidden_size"], p, (sh.EMBED, None), rngs=rngs,
                                   use_bias=False)
    self.text_projection = Dense(t["hidden_size"], p, (sh.EMBED, None), rngs=rngs, use_bias=False)
    self.logit_scale = param(rngs, nnx.initializers.zeros, (), ())  # log of the logits' scale

  def image_features(self, pixels):
    """pixels [b,H,W,3] -> [b,p], transformers' get_image_features."""
    return self.visual_projection(self.vision(pixels))

  def text_features(self, tokens, mask=None):
    """tokens [b,l], mask [b,l] (the tokenizer's attention_mask) or None -> [b,p],
    transformers' get_text_features. With padding on the right the mask changes nothing: the
    attention is causal and pooling happens at the EOS, before any padding."""
    return self.text_projection(self.text(tokens, mask))


# ---------------------------------------------------------------------------- loading


def _sub_config(config, name, defaults):
  """A tower's config with transformers' defaults filled in. Old files (openai's) also carry
  `{name}_dict`, which transformers builds a full config from and lays over `{name}`."""
  merged = {**defaults, **(config.get(name) or {})}
  if config.get(f"{name}_dict"):
    merged.update({**defaults, **config[f"{name}_dict"]})
  return merged


def resolve_config(config, source) -> dict:
  """config.json of a CLIPModel -> the dict CLIP is built from (defaults filled in, checked)."""
  out = {"model_type": "clip", "projection_dim": config.get("projection_dim", 512),
         "logit_scale_init_value": config.get("logit_scale_init_value", 2.6592),
         "text_config": _sub_config(config, "text_config", TEXT_DEFAULTS),
         "vision_config": _sub_config(config, "vision_config", VISION_DEFAULTS)}
  for tower in ("text_config", "vision_config"):
    vit.check_activation(out[tower]["hidden_act"], f"{source} {tower}")
  if not isinstance(out["text_config"]["eos_token_id"], int):
    raise ValueError(f"{source}: text_config.eos_token_id is "
                     f"{out['text_config']['eos_token_id']!r}; CLIP pools at one EOS id")
  size = out["vision_config"]["image_size"]
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise ValueError(f"{source}: vision_config.image_size {size} is not square")
    out["vision_config"]["image_size"] = size[0]
  return out


def _names(model: CLIP) -> dict:
  """{checkpoint key: (Param, layout)} of every parameter (vit.assign's layouts)."""
  names = {"logit_scale": (model.logit_scale, None)}
  names |= vit.linear(model.visual_projection, "visual_projection")
  names |= vit.linear(model.text_projection, "text_projection")
  v, t = model.vision, model.text
  names |= {"vision_model.embeddings.class_embedding": (v.class_embedding, None),
            "vision_model.embeddings.patch_embedding.weight": (v.patches.kernel, "conv"),
            "vision_model.embeddings.position_embedding.weight": (v.positions, None),
            "text_model.embeddings.token_embedding.weight": (t.tokens, None),
            "text_model.embeddings.position_embedding.weight": (t.positions, None)}
  names |= vit.norm(v.pre_norm, "vision_model.pre_layrnorm")
  names |= vit.norm(v.post_norm, "vision_model.post_layernorm")
  names |= vit.norm(t.final_norm, "text_model.final_layer_norm")
  for tower, blocks in (("vision_model", v.blocks), ("text_model", t.blocks)):
    for i, block in enumerate(blocks):
      at = f"{tower}.encoder.layers.{i}."
      names |= vit.norm(block.norm1, at + "layer_norm1") | vit.norm(block.norm2, at + "layer_norm2")
      for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        names |= vit.linear(getattr(block.attn, ours), f"{at}self_attn.{theirs}")
      names |= vit.linear(block.fc1, at + "mlp.fc1") | vit.linear(block.fc2, at + "mlp.fc2")
  return names


def _position_ids(tensors, source) -> set:
  """Checkpoints written before transformers 4.31 (openai's among them) still store the
  position_ids buffers; they must be 0, 1, 2, ... and are then accounted for."""
  found = {k for k in tensors.keys() if k.endswith("embeddings.position_ids")}
  for k in found:
    ids = np.asarray(tensors[k]).reshape(-1)
    if not np.array_equal(ids, np.arange(ids.size)):
      raise ValueError(f"{source}: {k} is not 0, 1, 2, ...; this CLIP checkpoint is not ported")
  return found


def load_clip(path, *, dtype=jnp.float32):
  """(graphdef, params, config) of the CLIPModel saved in folder `path`.

  config: the resolved config (transformers' defaults filled in for omitted keys). Use it
  functionally: `nnx.merge(graphdef, params).image_features(pixels)` inside a jitted function.
  """
  raw, tensors = vit.read_folder(path, ("clip",), "CLIP", EXAMPLE)
  config = resolve_config(raw, path)
  model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
  vit.assign(_names(model), tensors, path, "CLIP", dtype, checked=_position_ids(tensors, path))
  graphdef, params = nnx.split(model)
  return graphdef, params, config
