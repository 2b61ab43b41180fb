"""One train step on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices equals one device."""
import jax
import numpy as np

from anchoredit_jax import sharding as sh
from anchoredit_jax.train import Trainer, make_data
from tests.helpers import one_device_mesh, rel_err, smoke_config


def test_sharded_step_matches_single_device_and_kernels_are_split():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  cfg = smoke_config()
  batch = next(iter(make_data(cfg)))
  results = {}
  for name, mesh in (("one", one_device_mesh()),
                     ("mesh", sh.make_mesh(dict(data=2, fsdp=2, tensor=2)))):
    tr = Trainer(cfg, mesh)
    state = tr.init_state(jax.random.key(0))
    before = jax.device_get(state["params"])
    state, metrics = tr.step(state, batch, jax.random.key(1))
    results[name] = (before, jax.device_get(state["params"]), float(metrics["loss"]), state)

  b1, p1, l1, _ = results["one"]
  b8, p8, l8, state8 = results["mesh"]
  assert abs(l1 - l8) <= 1e-5 * max(1.0, abs(l1))
  for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b8)):
    np.testing.assert_array_equal(a, b)  # born identical whatever the sharding
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    assert rel_err(b, a) <= 1e-5
  # big kernels are really split: FFN in [layers, embed->fsdp, mlp->tensor]
  fc1 = state8["params"]["dit"]["blocks"]["ffn"]["fc1"]["kernel"]
  L, d, f = fc1.shape
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert fc1.sharding.shard_shape(fc1.shape) == (L, d // 2, f // 2)
  q = state8["params"]["dit"]["blocks"]["self_attn"]["q"]["kernel"]
  assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
  # Adam moments follow their parameter's sharding
  mu = state8["opt_state"][1][0].mu["dit"]["blocks"]["ffn"]["fc1"]["kernel"]
  assert mu.sharding.shard_shape(mu.shape) == (L, d // 2, f // 2)


def test_logical_rules_map_to_mesh_axes():
  assert sh.logical_to_spec(("batch", "length", "embed")) == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  assert sh.logical_to_spec(("embed", "mlp")) == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sh.logical_to_spec(("layers", "heads", "kv")) == jax.sharding.PartitionSpec(None, "tensor", None)
