"""The architecture's FLOP count agrees with XLA's cost analysis where XLA counts every op."""
import jax
import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import flops
from anchoredit_jax.data import pipeline
from anchoredit_jax.editing import encode, write_turn
from anchoredit_jax.models.model import build, init_memory
from anchoredit_jax.stages import dmd
from configs import common, dmd as dmd_config


def test_forward_flops_match_xla_for_one_layer():
  # one layer: XLA's cost analysis counts a lax.scan body once, so deeper models are undercounted
  # by XLA (the reason benchmark/speed.py uses the architecture's count)
  m = common.model_config("toy")
  m.update(layers=1, text_layers=1)
  graphdef, params = nnx.split(build(m, nnx.Rngs(0)))
  x, t = jnp.zeros((1, 1, 32, 32, 3)), jnp.zeros((1, 1))
  toks, pos = jnp.ones((1, 1, m.text_len), jnp.int32), jnp.ones((1, 1), jnp.int32)
  cond = jnp.zeros((1, 1, 32, 32, 4))
  f = jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, toks, pos, cond=cond)[0])
  cost = f.lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  ours = flops.dit_forward(m, n=64) + flops.text_forward(m, 1)
  assert abs(ours - xla) / xla < 0.05, (ours, xla)


def test_umt5_flops_match_xla():
  """The umT5 count (used for the wan presets' MFU) against XLA on a small encoder."""
  from anchoredit_jax.models.umt5 import UMT5Encoder
  m = common.model_config("wan1.3b")
  m.update(text_dim=256, text_len=64, umt5=dict(vocab=300, d_kv=32, num_heads=4, d_ff=512,
                                                num_layers=2, num_buckets=32, max_distance=128))
  enc = UMT5Encoder(**m.umt5, d_model=m.text_dim, max_len=m.text_len, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(enc)
  toks = jnp.ones((1, m.text_len), jnp.int32)
  cost = jax.jit(lambda p: nnx.merge(graphdef, p)(toks)[0]).lower(params).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  ours = flops.text_forward(m, 1)
  assert abs(ours - xla) / xla < 0.05, (ours, xla)


def _xla_flops(f, *args):
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_dmd_step_parts_match_xla_on_one_layer():
  """flops.dmd_parts against XLA, part by part, where XLA counts what the formula does: one
  layer (the layer scan's body is counted once), remat off (model FLOPs only), two turns. XLA
  counts a scan or fori body once and a cond as its larger branch, so its history holds one
  rollout turn of one sampler pass, and its backward simulation one pass."""
  cfg = dmd_config.get_config("toy")
  cfg.model.update(layers=1, text_layers=1, remat="none")
  cfg.data.update(num_turns=2, res=32)
  m, S, res = cfg.model, cfg.dmd.student_steps, cfg.data.res
  graphdef, params = nnx.split(build(m, nnx.Rngs(0)))
  aux = dmd.init_aux(params, cfg, params)
  row = pipeline.example_from_seed(0, split="train", res=res, num_turns=2, text_len=m.text_len)
  batch = {k: row[k][None] for k in ("images", "tokens", "edit_masks", "identity_masks")}
  rng = jax.random.key(0)
  f = flops.turn_forward(m, res, cfg.causal.window)
  text = lambda n: flops.text_forward(m, n)

  # history. XLA keeps, of a 1-layer write, only what the layer's keys and values need (not
  # even the instruction), so a write is counted in XLA's own measure of it; the turn's sampler
  # is a fori loop, counted as one pass with the generator's instruction encoded once
  mem = init_memory(m, 1, res, cfg.causal.window)
  write = _xla_flops(lambda p: write_turn(nnx.merge(graphdef, p), mem, jnp.zeros((1, res, res, 3)),
                                          encode(nnx.merge(graphdef, p), batch["tokens"][:, 0])), params)
  assert write < 0.3 * f
  parts = flops.dmd_parts(cfg, generator=True)
  (_, w_src, _), (_, u_turn, _) = parts["source"], parts["rollout_turn"]
  ours = w_src * write + (f + (u_turn - S) * write + text(1))
  xla = _xla_flops(lambda p, a, b: dmd.history(p, graphdef, b, rng, cfg, a), params, aux, batch)
  assert abs(ours - xla) / xla < 0.05, ("history", ours, xla)

  ctx = dmd.history(params, graphdef, batch, rng, cfg, aux)
  for generator in (True, False):
    parts = flops.dmd_parts(cfg, generator)
    ours = sum(u * f + text(l) for name, (_, u, l) in parts.items() if name in ("simulation", "target"))
    grad = jax.value_and_grad(dmd.losses, argnums=(0, 1) if generator else 1, has_aux=True)
    xla = _xla_flops(lambda p, c, a, x: grad(p, c, graphdef, x, rng, cfg, a, generator=generator),
                     params, aux["critic"], aux, ctx)
    assert abs(ours - xla) / xla < 0.05, (generator, ours, xla)
  # the expectation over k and s: (K-1)/2 rollout turns and (S-1)/2 simulation passes
  assert parts["rollout_turn"][0] == 0.5 and parts["simulation"][0] == (S - 1) / 2
