"""EditModel: text encoder + autoencoder + CausalDiT behind one params pytree.

Used functionally: `graphdef, params = nnx.split(build(cfg, rngs))` once, then every jitted
function takes `params` and calls `nnx.merge(graphdef, params)` inside.
"""
import jax.numpy as jnp
import ml_collections
from flax import nnx

from anchoredit_jax.memory import AnchorMemory
from anchoredit_jax.models.autoencoder import PixelAutoencoder
from anchoredit_jax.models.dit import CausalDiT
from anchoredit_jax.models.text import ByteTextEncoder


def make_autoencoder(cfg):
  if cfg.autoencoder == "pixel":
    return PixelAutoencoder(cfg.ae_factor)
  raise NotImplementedError(f"autoencoder {cfg.autoencoder!r} is not available yet (use 'pixel')")


def latent_channels(cfg) -> int:
  return 3 * cfg.ae_factor ** 2 if cfg.autoencoder == "pixel" else cfg.latent_channels


class EditModel(nnx.Module):

  def __init__(self, cfg, *, rngs):
    cfg = ml_collections.FrozenConfigDict(cfg)  # hashable, so the graphdef can be a jit static arg
    self.cfg = cfg
    if cfg.text_encoder != "bytes":
      raise NotImplementedError(f"text encoder {cfg.text_encoder!r} is not available yet (use 'bytes')")
    self.text = ByteTextEncoder(dim=cfg.text_dim, layers=cfg.text_layers, heads=cfg.text_heads,
                                max_len=cfg.text_len, rngs=rngs)
    self.dit = CausalDiT(cfg, latent_channels=latent_channels(cfg), rngs=rngs)

  @property
  def autoencoder(self):
    return make_autoencoder(self.cfg)

  def __call__(self, x, t, tokens, turn_pos, *, cond=None, context=None, causal=True):
    """Velocity for T turns: x [b,T,H,W,C], t [b,T], tokens [b,T,l] -> (v, kv per layer).
    `tokens` may also be the text encoder's output (embeddings, mask) for them, so a sampler
    encodes a turn's instruction once rather than at each of its steps."""
    text, text_mask = tokens if isinstance(tokens, tuple) else self.text(tokens)
    return self.dit(x, t, text, text_mask, turn_pos, cond=cond, context=context, causal=causal)


def build(cfg, rngs) -> EditModel:
  return EditModel(cfg, rngs=rngs)


def abstract_split(cfg):
  """(graphdef, abstract params) without allocating: for shardings and full-size shape checks."""
  return nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))


def init_memory(cfg, batch: int, res: int, window: int, use_anchor: bool = True):
  """An empty AnchorMemory sized for this model and resolution."""
  h, w, c = make_autoencoder(cfg).latent_shape(res)
  p = cfg.patch
  return AnchorMemory.init(layers=cfg.layers, batch=batch, window=window, grid=(h // p, w // p),
                           heads=cfg.heads, head_dim=cfg.dim // cfg.heads, latent_shape=(h, w, c),
                           use_anchor=use_anchor)


def prev_cond(latents):
  """Channel-concat condition for a sequence of clean turns [b,T,H,W,C] -> [b,T,H,W,C+1]:
  turn i gets turn i-1 with flag 1; turn 0 gets zeros with flag 0 (matches AnchorMemory.cond)."""
  prev = jnp.concatenate([jnp.zeros_like(latents[:, :1]), latents[:, :-1]], axis=1)
  flag = jnp.ones(latents.shape[:-1] + (1,), latents.dtype).at[:, 0].set(0.0)
  return jnp.concatenate([prev, flag], axis=-1)
