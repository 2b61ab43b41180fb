"""EditModel: text encoder + autoencoder + CausalDiT behind one params pytree.

Used functionally: `graphdef, params = nnx.split(build(cfg, rngs))` once, then every jitted
function takes `params` and calls `nnx.merge(graphdef, params)` inside.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from anchoredit_jax.memory import AnchorMemory
from anchoredit_jax.models.autoencoder import PixelAutoencoder, WanVAE, WanVAEConfig
from anchoredit_jax.models.dit import CausalDiT
from anchoredit_jax.models.layers import downsampled
from anchoredit_jax.models.text import ByteTextEncoder, lookup
from anchoredit_jax.models.umt5 import UMT5Encoder

AUTOENCODERS, TEXT_ENCODERS = ("pixel", "wan_vae"), ("bytes", "umt5")


def make_autoencoder(cfg):
  """The parameter-free autoencoder of a config (the Wan VAE has weights: use model.autoencoder)."""
  if cfg.autoencoder == "pixel":
    return PixelAutoencoder(cfg.ae_factor)
  raise ValueError(f"autoencoder {cfg.autoencoder!r} has parameters; use EditModel.autoencoder")


def latent_shape(cfg, res) -> tuple[int, int, int]:
  """(h, w, channels) of the latent of a res x res (or (H, W)) image, without building the
  autoencoder."""
  return downsampled(res, cfg.ae_factor) + (latent_channels(cfg),)


def latent_channels(cfg) -> int:
  return 3 * cfg.ae_factor ** 2 if cfg.autoencoder == "pixel" else cfg.latent_channels


def frozen_parts(cfg) -> tuple[str, ...]:
  """Top-level parts of the params that training leaves alone: pretrained encoders (umT5, the Wan
  VAE) stay as loaded, as in Wan's own training; the byte encoder trains with the DiT."""
  return (("text",) if cfg.text_encoder == "umt5" else ()) + (("vae",) if cfg.autoencoder == "wan_vae" else ())


def gives_ema(cfg) -> bool:
  """Whether a run of this (whole) config keeps an EMA of its trainable parts in aux["ema"] as
  the model it gives for editing: stage 3b with dmd.ema_decay > 0. (Stage 3's EMA only makes
  its consistency targets.)"""
  return cfg.get("stage") == "dmd" and cfg.get("dmd", {}).get("ema_decay", 0.0) > 0.0


def config_kwargs(sub) -> dict:
  """A config sub-dict (umt5, vae) as constructor keyword arguments, sequences as tuples."""
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in sub.items()}


class _FrozenAutoencoder:
  """A learned autoencoder seen through stop_gradient, so no loss ever reaches its weights."""

  def __init__(self, ae):
    self.ae, self.channels, self.latent_shape = ae, ae.channels, ae.latent_shape

  def encode(self, images):
    return jax.lax.stop_gradient(self.ae.encode(images))

  def decode(self, latents):
    return self.ae.decode(latents)


class EditModel(nnx.Module):

  def __init__(self, cfg, *, rngs):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable, so the graphdef can be a jit static arg
    self.cfg = cfg
    if cfg.text_encoder not in TEXT_ENCODERS or cfg.autoencoder not in AUTOENCODERS:
      raise ValueError(f"model.text_encoder={cfg.text_encoder!r} / model.autoencoder="
                       f"{cfg.autoencoder!r}: choose from {TEXT_ENCODERS} / {AUTOENCODERS}")
    if cfg.text_encoder == "bytes":
      self.text = ByteTextEncoder(dim=cfg.text_dim, layers=cfg.text_layers, heads=cfg.text_heads,
                                  max_len=cfg.text_len, rngs=rngs)
    else:  # umT5 sizes live in cfg.umt5 (the Wan presets, or read from a Wan directory)
      self.text = UMT5Encoder(**config_kwargs(cfg.umt5), d_model=cfg.text_dim, max_len=cfg.text_len,
                              rngs=rngs)
    self.vae = WanVAE(WanVAEConfig(**config_kwargs(cfg.vae)), rngs=rngs) if cfg.autoencoder == "wan_vae" else None
    self.dit = CausalDiT(cfg, latent_channels=latent_channels(cfg), rngs=rngs)

  @property
  def autoencoder(self):
    return make_autoencoder(self.cfg) if self.vae is None else _FrozenAutoencoder(self.vae)

  def encode_text(self, tokens, store=None):
    """tokens [..., l] -> (embeddings [..., l, text_dim], mask [..., l]); no gradient reaches a
    frozen encoder. With `store` (precomputed embeddings of a frozen encoder, data/text_store.py)
    they are looked up there instead and the encoder is not run. With model.text_padding
    "attend" the padded positions are zero embeddings that the mask lets through."""
    if store is not None:
      text, mask = lookup(store, tokens)
    else:
      text, mask = self.text(tokens)
      text = jax.lax.stop_gradient(text) if "text" in frozen_parts(self.cfg) else text
    if self.cfg.get("text_padding", "masked") == "attend":  # Wan2.1's convention: no text mask
      text, mask = text * mask[..., None].astype(text.dtype), jnp.ones_like(mask)
    return text, mask

  def __call__(self, x, t, tokens, turn_pos, *, cond=None, context=None, causal=True, with_gate=False):
    """Velocity for T turns: x [b,T,H,W,C], t [b,T], tokens [b,T,l] -> (v, kv per layer).
    `tokens` may also be the text encoder's output (embeddings, mask) for them, so a sampler
    encodes a turn's instruction once rather than at each of its steps."""
    text, text_mask = tokens if isinstance(tokens, tuple) else self.encode_text(tokens)
    return self.dit(x, t, text, text_mask, turn_pos, cond=cond, context=context, causal=causal,
                    with_gate=with_gate)


def build(cfg, rngs) -> EditModel:
  return EditModel(cfg, rngs=rngs)


def abstract_split(cfg):
  """(graphdef, abstract params) without allocating: for shardings and full-size shape checks."""
  return nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))


def init_memory(cfg, batch: int, res, window: int, use_anchor: bool = True, dtype=None):
  """An empty AnchorMemory sized for this model and resolution. Keys and values are kept in the
  compute dtype (default): the DiT makes them in it, so a wider cache holds no more information
  (measured on an H200: a float32 cache of the 1.3B model was 1.6 GiB a session)."""
  h, w, c = latent_shape(cfg, res)
  p = cfg.patch
  return AnchorMemory.init(layers=cfg.layers, batch=batch, window=window, grid=(h // p, w // p),
                           heads=cfg.heads, head_dim=cfg.dim // cfg.heads, latent_shape=(h, w, c),
                           use_anchor=use_anchor, dtype=jnp.dtype(dtype or cfg.get("dtype", "float32")))


def prev_cond(latents, anchor: bool = False):
  """Channel-concat condition for a sequence of clean turns [b,T,H,W,C] -> [b,T,H,W,C+1]:
  turn i gets turn i-1 with flag 1; turn 0 gets zeros with flag 0 (matches AnchorMemory.cond).
  With `anchor` (model.concat_anchor) every later turn also gets turn 0 itself: [b,T,H,W,2C+1]."""
  prev = jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)
  flag = jnp.ones(latents.shape[:-1] + (1,), latents.dtype).at[:, 0].set(0.0)
  parts = [prev, flag]
  if anchor:
    parts.append(jnp.broadcast_to(latents[:, :1], latents.shape).at[:, 0].set(0.0))
  return jnp.concatenate(parts, axis=-1)
