"""Attention: one kernel switch, self-attention with optional memory keys, cross-attention.

Letters: b batch, s query tokens, m memory tokens, h heads, k head_dim, d model dim, l text length.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.models import rope
from anchoredit_jax.models.layers import Dense, RMSNorm, softmax

KERNELS = ("xla", "cudnn", "splash")


def attend(q, k, v, mask, kernel: str = "xla"):
  """q [b,s,h,k], k/v [b,m,h,k], mask [b,s,m] bool (True = may attend) -> [b,s,h,k]."""
  if kernel not in KERNELS:
    raise ValueError(f"attention kernel {kernel!r} unknown; choose one of {KERNELS}")
  if kernel == "xla":
    if sh.platform() == "cpu":
      return attend_cpu(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
  if kernel == "splash":
    from anchoredit_jax.models import splash  # Pallas loads only when this kernel is chosen
    q_names, kv_names = (sh.BATCH, sh.LENGTH, sh.HEADS, sh.KV), (sh.BATCH, None, sh.HEADS, sh.KV)
    run = sh.per_shard(splash.splash_attention, (q_names, kv_names, kv_names,
                                                 (sh.BATCH, sh.LENGTH, None)), q_names)
    return run(q, k, v, mask)
  s = q.shape[1]
  q, k, v, mask = pad_even(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")[:, :s]


def attend_cpu(q, k, v, mask):
  """What jax.nn.dot_product_attention computes (float32 logits and softmax, the same mask value),
  with the softmax's backward pass written for XLA:CPU (layers.softmax)."""
  logits = jnp.einsum("bshk,bmhk->bhsm", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  logits = jnp.where(mask[:, None], logits, -0.7 * jnp.finfo(jnp.float32).max)
  return jnp.einsum("bhsm,bmhk->bshk", softmax(logits).astype(v.dtype), v)


def pad_even(q, k, v, mask):
  """Query and key counts padded to even: cuDNN's fused attention refuses odd ones with a mask
  in training (1521 tokens a Wan turn at 624x624). Extra keys are masked out; extra queries see
  every key (finite rows, sliced off by the caller)."""
  ps, pm = q.shape[1] % 2, k.shape[1] % 2
  if not (ps or pm):
    return q, k, v, mask
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pm)))  # padded keys: False
  mask = jnp.pad(mask, ((0, 0), (0, ps), (0, 0)), constant_values=True)
  return pad(q, ps), pad(k, pm), pad(v, pm), mask


class _Attention(nnx.Module):
  """q/k/v/o projections with RMSNorm on q and k across all heads, as in Wan2.1."""

  def __init__(self, dim, heads, *, rngs, kernel="xla"):
    self.heads, self.head_dim, self.kernel = heads, dim // heads, kernel
    self.q = Dense(dim, dim, (sh.EMBED, sh.HEADS), rngs=rngs)
    self.k = Dense(dim, dim, (sh.EMBED, sh.HEADS), rngs=rngs)
    self.v = Dense(dim, dim, (sh.EMBED, sh.HEADS), rngs=rngs)
    self.o = Dense(dim, dim, (sh.HEADS, sh.EMBED), rngs=rngs)
    self.norm_q = RMSNorm(dim, rngs=rngs, names=(sh.HEADS,))
    self.norm_k = RMSNorm(dim, rngs=rngs, names=(sh.HEADS,))


class SelfAttention(_Attention):
  """Multi-head self-attention with 3D RoPE; earlier turns may come in as memory keys."""

  def __call__(self, x, rot, mask, context=None):
    """x [b,s,d]; rot: RoPE (cos, sin) [b,s,k/2] each (rope.rotation); mask [b,s,s].

    context: optional extra keys (k [b,m,h,k] stored before RoPE, v [b,m,h,k], rot [b,m,k/2] x 2,
    valid [b,m]) that every query may see -- the AnchorMemory.
    Returns (out [b,s,d], (k, v) of x before RoPE, for writing into memory).
    """
    b, s, _ = x.shape
    split = lambda y: sh.constrain(y.reshape(b, s, self.heads, self.head_dim),
                                   (sh.BATCH, sh.LENGTH, sh.HEADS, sh.KV))
    q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(x))), split(self.v(x))
    kv = (k, v)
    q, k = rope.apply(q, rot), rope.apply(k, rot)
    if context is not None:
      k_m, v_m, rot_m, valid_m = context
      k = jnp.concatenate([rope.apply(k_m.astype(k.dtype), rot_m), k], axis=1)
      v = jnp.concatenate([v_m.astype(v.dtype), v], axis=1)
      mask = jnp.concatenate([jnp.broadcast_to(valid_m[:, None, :], (b, s, valid_m.shape[1])), mask], -1)
    out = attend(q, k, v, mask, self.kernel)
    return self.o(out.reshape(b, s, -1)), kv


class CrossAttention(_Attention):
  """Each query attends to its own instruction tokens (text already projected to `dim`)."""

  def __call__(self, x, text, text_mask):
    """x [b,s,d], text [b,l,d], text_mask [b,l] -> [b,s,d]."""
    (b, s, _), l = x.shape, text.shape[1]
    q = self.norm_q(self.q(x)).reshape(b, s, self.heads, self.head_dim)
    k = self.norm_k(self.k(text)).reshape(b, l, self.heads, self.head_dim)
    v = self.v(text).reshape(b, l, self.heads, self.head_dim)
    mask = jnp.broadcast_to(text_mask[:, None, :], (b, s, l))
    return self.o(attend(q, k, v, mask, self.kernel).reshape(b, s, -1))
