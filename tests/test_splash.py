"""kernel="splash" (Pallas splash attention) against kernel="xla". Off TPU the kernel runs in
Pallas interpret mode, so these small shapes exercise the same kernel code on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anchoredit_jax.models.attention import attend
from anchoredit_jax.models.splash import BLOCK


def _inputs(seed, b, s, turn, n_mem, valid_mem, h, dim):
  """Queries in turns of `turn` tokens, block-causal over turns, after `n_mem` AnchorMemory keys of
  which example i has only the first valid_mem[i] valid -- the mask SelfAttention builds."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  m = n_mem + s
  q = jax.random.normal(k1, (b, s, h, dim))
  k, v = jax.random.normal(k2, (b, m, h, dim)), jax.random.normal(k3, (b, m, h, dim))
  turn_of = jnp.arange(s) // turn
  causal = turn_of[None, :] <= turn_of[:, None]
  valid = jnp.arange(n_mem)[None, :] < jnp.asarray(valid_mem)[:, None]  # [b, n_mem]
  mask = jnp.concatenate([jnp.broadcast_to(valid[:, None], (b, s, n_mem)),
                          jnp.broadcast_to(causal, (b, s, s))], -1)
  return q, k, v, mask


def _both(q, k, v, mask):
  """Outputs and gradients of a weighted sum (so every output entry matters) for both kernels."""
  w = jax.random.normal(jax.random.key(9), q.shape)

  def run(kernel):
    loss = lambda q, k, v: jnp.sum(w * attend(q, k, v, mask, kernel))
    out = jax.jit(lambda q, k, v: attend(q, k, v, mask, kernel))(q, k, v)
    return out, jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

  return run("splash"), run("xla")


def _assert_close(got, want, rtol, what):
  got, want = np.asarray(got), np.asarray(want)
  assert np.all(np.isfinite(got)), what
  # absolute floor relative to the array's scale, so entries near zero don't demand exactness
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("s,turn,n_mem,valid_mem,heads,dim", [
    (100, 50, 60, (40, 10), 2, 64),  # one query tile, keys 160 -> 2 tiles
    (200, 50, 140, (140, 0), 3, 32),  # 2 query tiles x 3 key tiles; example 1's first tile empty
])
def test_splash_matches_xla_forward_and_gradients(s, turn, n_mem, valid_mem, heads, dim):
  assert s % BLOCK and (n_mem + s) % BLOCK  # lengths are padded, not already tile multiples
  q, k, v, mask = _inputs(0, 2, s, turn, n_mem, valid_mem, heads, dim)
  (out, grads), (out_x, grads_x) = _both(q, k, v, mask)
  _assert_close(out, out_x, 1e-5, "forward")
  for name, g, g_x in zip("qkv", grads, grads_x):
    _assert_close(g, g_x, 1e-5, f"d{name}")


def test_splash_row_that_sees_nothing_matches_xla():
  # xla gives such a row equal logits: the mean of all values, and no gradient into q or k;
  # splash must neither divide by zero nor differ. Example 0: one empty row in a tile whose other
  # rows see keys; example 1: nothing to see at all, so the kernel would skip its whole query tile.
  q, k, v, mask = _inputs(1, 2, 60, 30, 20, (20, 5), 2, 32)
  mask = mask.at[0, 7].set(False).at[1].set(False)
  (out, grads), (out_x, grads_x) = _both(q, k, v, mask)
  np.testing.assert_allclose(out_x[0, 7], v[0].mean(0), rtol=1e-5, atol=1e-6)  # what xla defines
  _assert_close(out, out_x, 1e-5, "forward")
  for name, g, g_x in zip("qkv", grads, grads_x):
    _assert_close(g, g_x, 1e-5, f"d{name}")
  assert not np.any(np.asarray(grads[0])[0, 7])  # no gradient into the empty row's query
  # the output above replaces empty rows, which would hide NaNs from the kernel itself; run op by
  # op (no jit) with NaN checks so the kernel's own output must be finite too
  with jax.debug_nans(True):
    jax.grad(lambda q: attend(q, k, v, mask, "splash").sum())(q)


@pytest.mark.parametrize("batch", [4, 2])
def test_splash_on_a_mesh_runs_per_device_block(batch):
  """On a data x fsdp x tensor mesh the Pallas kernel runs on each device's block of examples and
  heads (shard_map); a batch the mesh does not divide stays whole. Same result as xla."""
  from anchoredit_jax import sharding as sh
  mesh = sh.make_mesh(dict(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8])
  q, k, v, mask = _inputs(2, batch, 100, 50, 30, (30, 7, 0, 12)[:batch], 2, 32)
  with sh.use_mesh(mesh, sh.DEFAULT_RULES):
    (out, grads), (out_x, grads_x) = _both(q, k, v, mask)
    assert "shard_map" in str(jax.make_jaxpr(lambda q: attend(q, k, v, mask, "splash"))(q))
  _assert_close(out, out_x, 1e-5, "forward")
  for name, g, g_x in zip("qkv", grads, grads_x):
    _assert_close(g, g_x, 1e-5, f"d{name}")
