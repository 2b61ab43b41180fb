"""AnchorMemory: cached turn-by-turn generation equals the block-causal full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anchoredit_jax.data.tokenize import tokenize_batch
from anchoredit_jax.models.model import init_memory, prev_cond
from tests.helpers import random_model, rel_err, tiny_model

RES, B = 16, 2


def _inputs(cfg, turns, seed=0):
  k = jax.random.key(seed)
  x = jax.random.normal(jax.random.fold_in(k, 0), (B, turns, RES, RES, 3))
  t = jax.random.uniform(jax.random.fold_in(k, 1), (B, turns))
  words = ["", "make the red circle blue", "move it left", "remove the square", "add a dot", "x"]
  toks = np.stack([tokenize_batch([words[(i + j) % 6] for i in range(turns)], cfg.text_len)
                   for j in range(B)])
  return x, t, jnp.asarray(toks)


def _incremental(apply, params, cfg, x, t, toks, window, dtype=None):
  """Generate turn by turn through the memory; returns outputs [B,T,...] and the final memory."""
  mem, outs = init_memory(cfg, B, RES, window, dtype=dtype), []
  for i in range(x.shape[1]):
    pos = jnp.broadcast_to(mem.next_turn_pos(), (B, 1))
    out, kv = apply(params, x[:, i:i + 1], t[:, i:i + 1], toks[:, i:i + 1], pos,
                    cond=mem.cond(cfg.concat_anchor)[:, None], context=mem.context())
    mem = mem.append((kv[0], kv[1]), x[:, i])
    outs.append(out[:, 0])
  return jnp.stack(outs, 1), mem


@pytest.mark.parametrize("anchor", [False, True])
def test_memory_equals_block_causal_forward_when_window_holds_all(anchor):
  cfg = tiny_model(layers=3, abs_pos=True, concat_anchor=anchor)  # (b) below covers abs_pos=False
  params, apply = random_model(cfg)
  x, t, toks = _inputs(cfg, 5)
  cond = prev_cond(x, anchor)
  full, _ = apply(params, x, t, toks, jnp.broadcast_to(jnp.arange(5), (B, 5)), cond=cond)
  inc, _ = _incremental(apply, params, cfg, x, t, toks, window=5)
  assert rel_err(inc, full) <= 1e-5
  # and the causal mask matters: a bidirectional forward gives different early turns
  bi, _ = apply(params, x, t, toks, jnp.broadcast_to(jnp.arange(5), (B, 5)), cond=cond, causal=False)
  assert rel_err(bi[:, 0], full[:, 0]) > 1e-3
  if anchor:  # every turn after the source is given the source itself, whatever the window
    assert cond.shape[-1] == 7 and np.array_equal(cond[:, 3, ..., 4:], x[:, 0])
    assert not np.any(cond[:, 0])


def test_small_window_equals_forward_over_anchor_window_and_new_turn():
  """With W < turns, turn i sees [anchor, last W turns, itself] at positions 0..W+1.

  Exact for a 1-layer model, whose cached keys depend only on their own turn; in deeper models a
  window turn's cached keys were computed when it was written and saw turns since evicted.
  """
  cfg, W, T = tiny_model(layers=1), 2, 7
  params, apply = random_model(cfg, seed=1)
  x, t, toks = _inputs(cfg, T, seed=1)
  cond = prev_cond(x)
  inc, _ = _incremental(apply, params, cfg, x, t, toks, window=W)
  for i in range(W + 1, T):
    idx = jnp.array([0] + list(range(i - W, i + 1)))
    ref, _ = apply(params, x[:, idx], t[:, idx], toks[:, idx], jnp.broadcast_to(jnp.arange(W + 2), (B, W + 2)),
                   cond=cond[:, idx])
    assert rel_err(inc[:, i], ref[:, -1]) <= 1e-5, i
  # positions really are re-indexed: absolute turn indices would give another answer
  i = T - 1
  idx = jnp.array([0] + list(range(i - W, i + 1)))
  absolute, _ = apply(params, x[:, idx], t[:, idx], toks[:, idx], jnp.broadcast_to(idx, (B, W + 2)), cond=cond[:, idx])
  assert rel_err(inc[:, i], absolute[:, -1]) > 1e-4


def test_memory_size_constant_and_positions_in_range():
  cfg = tiny_model()
  mem = init_memory(cfg, B, RES, window=3)
  kv = jnp.ones((cfg.layers, B, 16, cfg.heads, cfg.dim // cfg.heads))
  lat = jnp.zeros((B, RES, RES, 3))
  sizes = {}
  for n in range(1, 31):
    mem = mem.append((kv * n, kv), lat)
    if n in (3, 30):
      sizes[n] = [(l.shape, l.dtype) for l in jax.tree.leaves(mem)]
    pos, valid = mem.slot_positions()
    count = min(n - 1, 3)
    assert sorted(np.asarray(pos)[np.asarray(valid)].tolist()) == list(range(1, count + 1))
    assert int(mem.next_turn_pos()) == count + 1 <= 4
  assert sizes[3] == sizes[30]
  # the anchor keeps the first turn's keys; the newest window slot holds the latest
  assert float(mem.anchor_k[0, 0, 0, 0, 0]) == 1.0
  pos, _ = mem.slot_positions()
  newest = int(jnp.argmax(pos))
  assert float(mem.window_k[0, 0, newest, 0, 0, 0]) == 30.0


def test_remat_does_not_change_outputs():
  x, t, toks = _inputs(tiny_model(), 2)
  outs = []
  for remat in ("none", "full", "dots"):
    params, apply = random_model(tiny_model(remat=remat))
    outs.append(apply(params, x, t, toks, jnp.broadcast_to(jnp.arange(2), (B, 2)), cond=prev_cond(x))[0])
  assert rel_err(outs[1], outs[0]) <= 1e-6 and rel_err(outs[2], outs[0]) <= 1e-6


def test_x0_residual_model_starts_as_an_exact_copy_of_the_previous_turn():
  """Zero-initialised head + x0_residual: the implied clean turn is the previous turn, at any t."""
  from flax import nnx
  from anchoredit_jax import flow
  from anchoredit_jax.models.model import build
  cfg = tiny_model(prediction="x0_residual")
  model = build(cfg, nnx.Rngs(0))
  x, t, toks = _inputs(cfg, 2)
  t = t.at[:, 1].set(jnp.array([0.3, 0.9]))
  v, _ = model(x, t, toks, jnp.broadcast_to(jnp.arange(2), (B, 2)), cond=prev_cond(x))
  np.testing.assert_allclose(flow.x0_from_velocity(x[:, 1], v[:, 1], t[:, 1]), x[:, 0], atol=1e-5)


def test_abs_pos_embedding_tells_tokens_apart():
  from anchoredit_jax.models.dit import abs_pos_embedding
  e = np.asarray(abs_pos_embedding(4, 4, 32))
  assert e.shape == (16, 32)
  assert len({tuple(np.round(r, 5)) for r in e}) == 16


def test_a_bfloat16_model_keeps_a_bfloat16_cache_that_loses_nothing():
  cfg = tiny_model(layers=2, dtype="bfloat16")
  params, apply = random_model(cfg)
  x, t, toks = _inputs(cfg, 4)
  out16, mem16 = _incremental(apply, params, cfg, x, t, toks, window=2)
  out32, mem32 = _incremental(apply, params, cfg, x, t, toks, window=2, dtype="float32")
  assert mem16.anchor_k.dtype == jnp.bfloat16 and mem32.anchor_k.dtype == jnp.float32
  assert mem16.anchor_k.nbytes * 2 == mem32.anchor_k.nbytes
  np.testing.assert_array_equal(out16, out32)  # the keys and values were bfloat16 to begin with
