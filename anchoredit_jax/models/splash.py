"""Splash attention: jax's Pallas TPU kernel, fed our dynamic [b,s,m] masks.

On TPU the kernel skips every (query block, key block) tile that the mask hides entirely, so
block-causal turns and invalid memory keys cost nothing. For any other platform (the active
mesh's devices, else the default backend) the same kernel runs in Pallas interpret mode: that is
for tests only (slow, many times the xla kernel's time).

Letters as in attention.py: b batch, s queries, m keys, h heads, k head_dim.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib

from anchoredit_jax import sharding as sh

# The kernel needs key tiles in multiples of the TPU's 128 lanes; queries use the same tile.
BLOCK = 128
BLOCK_SIZES = splash_lib.BlockSizes(
    block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
    block_q_dkv=BLOCK, block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK,
    block_q_dq=BLOCK, block_kv_dq=BLOCK)


def splash_attention(q, k, v, mask):
  """q [b,s,h,k], k/v [b,m,h,k], mask [b,s,m] bool (True = may attend) -> [b,s,h,k].

  Same result as jax.nn.dot_product_attention(q, k, v, mask=mask[:, None]), including a query
  row that sees no key: there xla softmaxes equal logits, i.e. returns the mean of all values.
  """
  (b, s, h, dim), m = q.shape, k.shape[1]
  sees_nothing = ~mask.any(-1)  # [b,s]
  s_pad, m_pad = _round_up(s, BLOCK), _round_up(m, BLOCK)
  # Padded keys stay masked out. A row with no visible key would divide 0 by 0 in the kernel
  # (NaN), so such rows -- padded queries and empty real rows -- see key 0 only (finite; one
  # extra tile at most); padded rows are sliced off and empty rows replaced below.
  kernel_mask = jnp.zeros((b, s_pad, m_pad), bool).at[:, :s, :m].set(mask)
  needs_key0 = jnp.pad(sees_nothing, ((0, 0), (0, s_pad - s)), constant_values=True)
  kernel_mask = kernel_mask.at[:, :, 0].set(kernel_mask[:, :, 0] | needs_key0)
  # The kernel does not scale logits; dot_product_attention scales by 1/sqrt(head_dim).
  q = (q * (1 / math.sqrt(dim))).astype(q.dtype)
  # The kernel takes one example; masks differ per example, so map over the batch.
  out = jax.vmap(_one_example)(_heads_first(q, s_pad), _heads_first(k, m_pad),
                               _heads_first(v, m_pad), kernel_mask)
  out = out.transpose(0, 2, 1, 3)[:, :s]
  mean_v = v.mean(1, keepdims=True, dtype=jnp.float32).astype(out.dtype)
  return jnp.where(sees_nothing[:, :, None, None], mean_v, out)


def _one_example(q, k, v, mask):
  """q [h,s,k], k/v [h,m,k], mask [s,m] -> [h,s,k]; s and m multiples of BLOCK."""
  # A leading mask axis of 1 is shared by all heads: one copy instead of h.
  kernel = splash_lib.make_splash_mha_single_device(
      mask[None], block_sizes=BLOCK_SIZES, interpret=sh.platform() != "tpu")
  # Under jit, the maker turns the Python flag is_dynamic_mask into a traced array, and calling
  # the kernel then branches on it in Python; restore the plain bool it means.
  mark = lambda info: None if info is None else info._replace(is_dynamic_mask=True)
  kernel = splash_lib.SplashAttentionKernel(
      mark(kernel.fwd_mask_info), mark(kernel.dq_mask_info), mark(kernel.dkv_mask_info),
      **kernel.kwargs)
  return kernel(q, k, v)


def _heads_first(x, length):
  """[b,n,h,k] zero-padded to `length` tokens -> [b,h,length,k], the kernel's layout."""
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _round_up(n, multiple):
  return -(-n // multiple) * multiple
