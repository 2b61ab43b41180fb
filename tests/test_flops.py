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
