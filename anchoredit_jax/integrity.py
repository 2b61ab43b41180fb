"""Checksums that catch a damaged checkpoint before it is trained on or exported.

A run's checkpoint stores, beside its arrays, two 32-bit sums of every array's raw bits
(`tree_checksums`): the plain sum of its words and a sum weighted by position, both computed on
the devices where the array lives (sharded arrays included, so a pod never reads a checkpoint back
to hash it). A flipped bit changes the plain sum; words swapped or changed so that the plain sums
cancel change the weighted one. A reference checkpoint carries the SHA-256 of its safetensors file.
"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _sums(x):
  """[sum of words, sum of word x (2 * flat index + 1)] of x's bits, mod 2**32."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  w = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.zeros(w.shape, jnp.uint32)
  for d, n in enumerate(w.shape):  # the flat index, built per axis so a sharded array stays put
    index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _tree_sums(tree):
  return jax.tree.map(_sums, tree)


def key(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_checksums(tree) -> dict:
  """{'params/dit/...': [s1, s2]} for every array leaf of `tree` (JSON-ready ints)."""
  sums = jax.device_get(_tree_sums(tree))
  return {key(p): [int(v) for v in np.asarray(s)] for p, s in jax.tree_util.tree_flatten_with_path(sums)[0]}


def mismatches(tree, saved: dict) -> list:
  """The leaves of `tree` whose checksums differ from `saved` (leaves absent from it are skipped:
  a partial restore checks what it read)."""
  now = tree_checksums(tree)
  return [k for k, v in now.items() if k in saved and list(saved[k]) != v]


@jax.jit
def _any_nonfinite(leaves):
  return [~jnp.isfinite(a).all() for a in leaves]


def nonfinite(tree) -> list:
  """The floating-point leaves of `tree` that hold a NaN or an Inf."""
  floats = [(key(p), a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(a.dtype, jnp.floating)]
  bad = jax.device_get(_any_nonfinite([a for _, a in floats]))
  return [name for (name, _), b in zip(floats, bad) if b]


def file_sha256(path, chunk=1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()
