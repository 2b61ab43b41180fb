"""Stage 3: consistency function, few-step sampler, the distillation rollout and its state."""
import jax
import jax.numpy as jnp
import numpy as np

from anchoredit_jax import flow
from anchoredit_jax.stages import distill
from anchoredit_jax.train import Trainer
from configs import distill as distill_config
from tests.helpers import one_device_mesh, random_model, tiny_model
from tests.test_causal import _setup


def test_consistency_times_are_the_shifted_quarter_grid():
  np.testing.assert_allclose(flow.consistency_times(4, 1.0), [1.0, 0.75, 0.5, 0.25], atol=1e-6)
  shifted = flow.consistency_times(4, 3.0)
  np.testing.assert_allclose(shifted, flow.shift_time(jnp.array([1.0, 0.75, 0.5, 0.25]), 3.0))
  assert np.all(np.diff(shifted) < 0) and shifted[0] == 1.0


def test_consistency_sample_returns_the_last_prediction():
  # an x0_fn that ignores x returns its constant whatever the noise; one that returns x at each
  # call shows the re-noising: the last x0 is the input of the last step, not the first noise
  noise = jnp.ones((2, 4, 4, 3))
  const = flow.consistency_sample(lambda x, t: jnp.full_like(x, 0.3), noise, jax.random.key(0),
                                  steps=4, shift=3.0)
  np.testing.assert_allclose(const, 0.3)
  ident = flow.consistency_sample(lambda x, t: x, noise, jax.random.key(0), steps=4, shift=3.0)
  assert not np.allclose(ident, noise)


def test_consistency_function_meets_the_boundary_condition():
  cfg, graphdef, params, batch = _setup()
  from flax import nnx
  from anchoredit_jax.models.model import init_memory
  model = nnx.merge(graphdef, params)
  mem = init_memory(model.cfg, 2, 32, 1)
  x = jax.random.normal(jax.random.key(0), (2,) + mem.last_latent.shape[1:])
  toks = batch["tokens"][:, 0]
  np.testing.assert_array_equal(distill.consistency_x0(model, mem, x, jnp.zeros((2,)), toks), x)
  assert not np.allclose(distill.consistency_x0(model, mem, x, jnp.full((2,), 0.5), toks), x)


def _distill_setup():
  cfg, graphdef, params, batch = _setup(p_teacher=0.5)
  d = distill_config.get_config("smoke")
  cfg.stage, cfg.distill = "distill", d.distill
  return cfg, graphdef, params, batch


def test_distill_scan_equals_python_loop_and_uses_all_three_models():
  cfg, graphdef, params, batch = _distill_setup()
  aux = distill.init_aux(params, cfg, params)
  f = jax.jit(lambda p, a, s: distill.rollout_losses(p, graphdef, batch, jax.random.key(3), cfg, a,
                                                      use_scan=s), static_argnums=2)
  scan, loop = f(params, aux, True), f(params, aux, False)
  assert scan.shape == (cfg.data.num_turns,) and np.all(np.isfinite(scan))
  np.testing.assert_allclose(scan, loop, rtol=1e-5)
  shifted = jax.tree.map(lambda a: a * 1.01, params)
  for role in ("teacher", "ema"):  # both frozen copies really enter the loss
    assert not np.allclose(f(params, {**aux, role: shifted}, True), scan)


def test_distill_step_trains_the_student_moves_the_ema_and_freezes_the_teacher():
  from anchoredit_jax.train import Trainer
  from anchoredit_jax.data import pipeline
  cfg = distill_config.get_config("smoke")
  cfg.model = tiny_model(text_len=64)
  tr = Trainer(cfg, one_device_mesh())
  state = tr.with_params(random_model(cfg.model)[0])  # a zero head would give zero loss and grads
  before = jax.device_get(state)
  rows = [pipeline.example_from_seed(i, split="train", res=32, num_turns=cfg.data.num_turns,
                                     text_len=cfg.model.text_len) for i in range(cfg.train.batch_size)]
  batch = {k: np.stack([r[k] for r in rows]) for k in ("images", "tokens", "edit_masks")}
  state, metrics = tr.step(state, batch, jax.random.key(1))
  after = jax.device_get(state)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  leaves = lambda t: jax.tree.leaves(t)
  for a, b in zip(leaves(before["aux"]["teacher"]), leaves(after["aux"]["teacher"])):
    np.testing.assert_array_equal(a, b)
  d = cfg.distill.ema_decay
  moved = 0
  for e0, p1, e1 in zip(leaves(before["aux"]["ema"]), leaves(after["params"]), leaves(after["aux"]["ema"])):
    np.testing.assert_allclose(e1, d * e0 + (1 - d) * p1, rtol=1e-5, atol=1e-7)
    moved += int(not np.array_equal(e0, e1))
  assert moved > 0


def test_guided_velocity_equals_two_separate_passes():
  from flax import nnx
  from anchoredit_jax.editing import encode, guided_velocity, turn_velocity, write_turn
  from anchoredit_jax.models.model import init_memory
  cfg, graphdef, params, batch = _setup()
  model = nnx.merge(graphdef, params)
  lat = model.autoencoder.encode(batch["images"])
  toks, empty = encode(model, batch["tokens"][:, 0]), encode(model, batch["tokens"][:, 1])
  mem = init_memory(model.cfg, 2, 32, 2)
  for k in range(2):  # anchor + one window turn, so the context is not empty
    mem = write_turn(model, mem, lat[:, k], toks)
  x, t = lat[:, 2], jnp.array([0.3, 0.8])
  v_c, v_u = guided_velocity(model, mem, x, t, toks, empty)
  np.testing.assert_allclose(v_c, turn_velocity(model, mem, x, t, toks)[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(v_u, turn_velocity(model, mem, x, t, empty)[0], rtol=1e-4, atol=1e-5)
  assert not np.allclose(v_c, v_u)


def test_teacher_and_ema_share_the_frozen_encoders():
  """At Wan scale the teacher and the EMA copy only the DiT: umT5-XXL and the VAE are frozen and
  shared with the student (three float32 copies of umT5 alone would be 65 GiB)."""
  cfg = distill_config.get_config("wan1.3b")
  state = Trainer(cfg).abstract_state
  assert set(state["params"]) == {"dit", "text", "vae"}
  assert set(state["aux"]["ema"]) == set(state["aux"]["teacher"]) == {"dit"}
  dit = jax.tree.leaves(state["params"]["dit"])
  assert [x.shape for x in jax.tree.leaves(state["aux"]["ema"])] == [x.shape for x in dit]
