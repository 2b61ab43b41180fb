"""The architecture's FLOP count agrees with XLA's cost analysis where XLA counts every op."""
import jax
import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import flops
from anchoredit_jax.models.model import build
from configs import common


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
