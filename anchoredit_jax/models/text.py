"""Instruction encoders. Every encoder maps int32 tokens [..., l] to ([..., l, text_dim], mask).

`ByteTextEncoder` is the first implementation: a small pre-LN transformer over UTF-8 bytes
(`data/tokenize.py`), trained jointly with the DiT. `UMT5Encoder` (`umt5.py`, Wan2.1's encoder,
frozen in training) implements the same interface. A frozen encoder's outputs may instead be
read from a store of precomputed embeddings (`lookup`; built by `data/text_store.py`), passed
explicitly to `EditModel.encode_text`.
"""
from typing import Protocol

import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.data.tokenize import PAD, VOCAB_SIZE
from anchoredit_jax.models.attention import attend
from anchoredit_jax.models.layers import MLP, Dense, LayerNorm, param, sinusoidal


class TextEncoder(Protocol):
  max_len: int
  dim: int

  def __call__(self, tokens): ...


class _EncoderLayer(nnx.Module):

  def __init__(self, dim, heads, *, rngs):
    self.heads = heads
    self.norm1, self.norm2 = LayerNorm(dim, rngs=rngs), LayerNorm(dim, rngs=rngs)
    self.qkv = Dense(dim, 3 * dim, (sh.EMBED, sh.HEADS), rngs=rngs)
    self.o = Dense(dim, dim, (sh.HEADS, sh.EMBED), rngs=rngs)
    self.mlp = MLP(dim, 4 * dim, rngs=rngs)

  def __call__(self, x, mask):
    b, l, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, l, 3, self.heads, -1), 3, axis=2)
    pair = jnp.broadcast_to(mask[:, None, :] & mask[:, :, None], (b, l, l))
    x = x + self.o(attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], pair).reshape(b, l, d))
    return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nnx.Module):
  """tokens [..., l] -> (embeddings [..., l, dim], mask [..., l])."""

  def __init__(self, *, dim, layers, heads, max_len, rngs):
    self.dim, self.max_len = dim, max_len
    # unit-variance bytes: at 0.02 a byte's embedding was ~1/30 of the sin-cos position added to
    # it, and the toy model took most of its hour to learn to read colour and place words
    self.embed = param(rngs, nnx.initializers.normal(1.0), (VOCAB_SIZE, dim), (sh.VOCAB, sh.EMBED))
    self.layers = nnx.List([_EncoderLayer(dim, heads, rngs=rngs) for _ in range(layers)])
    self.norm = LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens):
    lead, l = tokens.shape[:-1], tokens.shape[-1]
    if l != self.max_len:
      raise ValueError(f"tokens have length {l}, the text encoder was built for {self.max_len}")
    tokens = tokens.reshape(-1, l)
    mask = tokens != PAD
    x = jnp.take(self.embed[...], tokens, axis=0) + sinusoidal(jnp.arange(l), self.dim)
    for layer in self.layers:
      x = layer(x, mask)
    x = self.norm(x) * mask[..., None]
    return x.reshape(*lead, l, self.dim), mask.reshape(*lead, l)


def row_hash(tokens, weights, xp=jnp):
  """A uint32 hash of each token row [..., l] (numpy with xp=np: the host computes the same)."""
  t = tokens.astype(xp.uint32) + xp.uint32(1)
  return xp.sum(t * weights.astype(xp.uint32), axis=-1, dtype=xp.uint32)


def lookup(store, tokens):
  """tokens [..., l] -> (embeddings [..., l, d] float32, mask [..., l]), as the encoder gives
  them (to float16 rounding). Rows not in the store get some other row's: check with `missing`."""
  store = {k: jnp.asarray(v) for k, v in store.items()}
  i = jnp.clip(jnp.searchsorted(store["keys"], row_hash(tokens, store["weights"])), 0,
               store["keys"].shape[0] - 1)
  emb, mask = store["emb"][i].astype(jnp.float32), store["mask"][i]
  lead = tokens.shape[:-1]
  tail_e = jnp.broadcast_to(store["tail_emb"].astype(jnp.float32), lead + store["tail_emb"].shape)
  tail_m = jnp.broadcast_to(store["tail_mask"], lead + store["tail_mask"].shape)
  return jnp.concatenate([emb, tail_e], -2), jnp.concatenate([mask, tail_m], -1)
