"""Stage 3b, DMD: the gradient on a Gaussian case, scores through the memory, the two-player step
sharded and on one device, and its state through a checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from anchoredit_jax import flow, sharding as sh
from anchoredit_jax.checkpoint import load_params, restore_step, save_step
from anchoredit_jax.data import pipeline
from anchoredit_jax.editing import turn_velocity, write_turn
from anchoredit_jax.models.model import init_memory, prev_cond
from anchoredit_jax.stages import dmd
from anchoredit_jax.train import Trainer
from configs import dmd as dmd_config
from tests.helpers import one_device_mesh, random_model, rel_err, tiny_model


def _gaussian_x0(mean, std):
  """E[x0 | x_t] for x0 ~ N(mean, std²) and x_t = (1 - t) x0 + t eps: the ideal score model."""
  def x0(x_t, t):
    a = 1.0 - t
    return mean + a * std**2 / (a**2 * std**2 + t**2) * (x_t - a * mean)
  return x0


def test_dmd_gradient_moves_a_gaussian_generator_to_the_real_distribution():
  """Generator x̂ = m + s z; the real data N(2, 0.5²); the critic is the ideal score of the
  generator's current distribution. Gradient steps on dmd_loss bring (m, s) to (2, 0.5)."""
  real = _gaussian_x0(2.0, 0.5)

  def loss(theta, rng):
    m, log_s = theta
    # 64 "images" of 16 x 16 independent pixels: the normaliser is a mean over an image
    z, eps = jax.random.normal(rng, (2, 64, 16, 16, 1))
    t = jax.random.uniform(jax.random.fold_in(rng, 1), (64, 1, 1, 1), minval=0.02, maxval=0.98)
    x_hat = m + jnp.exp(log_s) * z
    x_t = flow.add_noise(jax.lax.stop_gradient(x_hat), eps, t[:, 0, 0, 0])
    fake = _gaussian_x0(jax.lax.stop_gradient(m), jax.lax.stop_gradient(jnp.exp(log_s)))
    grad = dmd.dmd_gradient(jax.lax.stop_gradient(x_hat), real(x_t, t), fake(x_t, t))
    return dmd.dmd_loss(x_hat, grad)

  theta = jnp.array([-1.0, jnp.log(2.0)])
  step = jax.jit(lambda th, r: th - 1.0 * jax.grad(loss)(th, r))
  first = jax.grad(loss)(theta, jax.random.key(0))
  assert first[0] < 0 and first[1] > 0  # the mean must rise, the spread shrink
  for i in range(150):
    theta = step(theta, jax.random.key(i))
  np.testing.assert_allclose([theta[0], jnp.exp(theta[1])], [2.0, 0.5], atol=0.01)


def test_dmd_gradient_is_normalised_per_sample_and_finite():
  x_hat = jnp.stack([jnp.zeros((2, 2, 1)), jnp.ones((2, 2, 1))])
  real = jnp.stack([jnp.full((2, 2, 1), 2.0), jnp.ones((2, 2, 1))])  # sample 2: x̂ == real
  fake = jnp.stack([jnp.full((2, 2, 1), 3.0), jnp.full((2, 2, 1), 1.5)])
  g = dmd.dmd_gradient(x_hat, real, fake)
  np.testing.assert_allclose(g[0], 0.5)  # (3 - 2) / mean|0 - 2|
  assert np.all(np.isfinite(g[1]))  # a zero normaliser is clamped, not divided by


def test_scores_read_through_the_memory_equal_the_full_causal_forward():
  """The authors run the real and fake scores over the whole sequence without a cache: earlier
  turns clean at t = 0, turn k noised, later turns zeros. Through the AnchorMemory (as here,
  window holding every turn) the score of turn k is the same."""
  cfg = tiny_model(layers=3)
  params, apply = random_model(cfg, seed=2)
  from flax import nnx
  from anchoredit_jax.models.model import build
  graphdef = nnx.split(build(cfg, nnx.Rngs(0)))[0]
  B, T, k, res = 2, 5, 3, 16
  r = jax.random.key(4)
  clean = jax.random.normal(jax.random.fold_in(r, 0), (B, T, res, res, 3))
  toks = jax.random.randint(jax.random.fold_in(r, 1), (B, T, cfg.text_len), 1, 200)
  t = jnp.full((B,), 0.6)
  x_k = flow.add_noise(clean[:, k], jax.random.normal(jax.random.fold_in(r, 2), clean[:, k].shape), t)

  @jax.jit
  def through_memory(clean, x_k):
    model = nnx.merge(graphdef, params)
    mem = init_memory(cfg, B, res, T)
    for i in range(k):
      mem = write_turn(model, mem, clean[:, i], model.encode_text(toks[:, i:i + 1]))
    return turn_velocity(model, mem, x_k, t, model.encode_text(toks[:, k:k + 1]))[0]

  v_mem = through_memory(clean, x_k)
  seq = clean.at[:, k].set(x_k).at[:, k + 1:].set(0.0)
  times = jnp.zeros((B, T)).at[:, k].set(t)
  v_full = apply(params, seq, times, toks, jnp.broadcast_to(jnp.arange(T), (B, T)), cond=prev_cond(seq))[0]
  assert rel_err(v_mem, v_full[:, k]) <= 1e-5
  # the history matters: another earlier turn changes turn k's score
  other = apply(params, seq.at[:, 1].add(1.0), times, toks, jnp.broadcast_to(jnp.arange(T), (B, T)),
                cond=prev_cond(seq.at[:, 1].add(1.0)))[0]
  assert rel_err(other[:, k], v_full[:, k]) > 1e-3


def _config(objective="dmd"):
  cfg = dmd_config.get_config("smoke")
  cfg.model = tiny_model(text_len=64)
  cfg.dmd.objective = objective
  return cfg


def _batch(cfg):
  rows = [pipeline.example_from_seed(i, split="train", res=32, num_turns=cfg.data.num_turns,
                                     text_len=cfg.model.text_len) for i in range(cfg.train.batch_size)]
  return {k: np.stack([r[k] for r in rows]) for k in ("images", "tokens", "edit_masks", "identity_masks")}


def _steps(cfg, mesh, params, teacher, n=4):
  tr = Trainer(cfg, mesh)
  state = tr.with_params(params, teacher)
  batch, out = _batch(cfg), []
  for _ in range(n):  # steps 1 and 3 move both players, 0 and 2 (generator_every=2) the critic only
    state, metrics = tr.step(state, batch, jax.random.key(1))
    out.append(jax.device_get(metrics))
  return tr, state, out


def test_one_step_on_a_2x2x2_mesh_equals_one_device_and_the_players_take_turns():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  cfg = _config()
  cfg.dmd.guidance = 2.0  # unguided, critic = real score at the start: the gradient would be ~0
  params, teacher = random_model(cfg.model, seed=0)[0], random_model(cfg.model, seed=5)[0]
  _, s1, m1 = _steps(cfg, one_device_mesh(), params, teacher)
  _, s8, m8 = _steps(cfg, sh.make_mesh(dict(data=2, fsdp=2, tensor=2)), params, teacher)
  for a, b in zip(m1, m8):
    for key in ("loss", "critic_loss", "generator_loss", "target_turn"):
      assert abs(float(a[key]) - float(b[key])) <= 1e-5 * max(1.0, abs(float(a[key]))), key
  one, eight = jax.device_get(s1), jax.device_get(s8)
  for part in (("params",), ("aux", "critic"), ("aux", "critic_opt"), ("opt_state",)):
    pick = lambda s: jax.tree.leaves(s[part[0]] if len(part) == 1 else s[part[0]][part[1]])
    for a, b in zip(pick(one), pick(eight)):
      assert rel_err(b, a) <= 1e-4, part
  assert [float(m["generator_step"]) for m in m1] == [0.0, 1.0, 0.0, 1.0]
  assert float(m1[1]["generator_loss"]) > 0 and float(m1[0]["generator_loss"]) == 0
  # (the first update of each has learning rate 0: the warm-up starts there)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(params)))
  # the real score never moves; the critic does, on both steps; the generator on the first only
  for a, b in zip(jax.tree.leaves(one["aux"]["real"]), jax.tree.leaves(dmd.trainable(teacher, cfg))):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(one["aux"]["critic"]), jax.tree.leaves(one["aux"]["real"])))
  assert int(one["opt_state"][1][0].count) == 2 and int(one["aux"]["critic_opt"][1][0].count) == 4
  fc1 = s8["aux"]["critic"]["dit"]["blocks"]["ffn"]["fc1"]["kernel"]  # the critic is sharded too
  assert fc1.sharding.shard_shape(fc1.shape)[1:] == (fc1.shape[1] // 2, fc1.shape[2] // 2)


def test_a_checkpoint_restores_generator_critic_and_both_optimisers(tmp_path):
  cfg = _config()
  tr, state, _ = _steps(cfg, one_device_mesh(), random_model(cfg.model)[0], None, n=2)
  saved = jax.device_get(state)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={
      "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})
  save_step(mngr, 2, state, {})
  mngr.wait_until_finished()
  back, _ = restore_step(mngr, 2, sh.placed(tr.abstract_state, tr.state_sh))
  assert sorted(back["aux"]) == ["critic", "critic_opt", "real"]
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(back))):
    np.testing.assert_array_equal(a, b)
  batch = _batch(cfg)
  _, m_saved = tr.step(state, batch, jax.random.key(1))
  _, m_back = tr.step(back, batch, jax.random.key(1))
  assert float(m_saved["loss"]) == float(m_back["loss"])


def test_the_generator_ema_moves_on_generator_steps_and_is_what_the_run_gives(tmp_path):
  cfg = _config()
  cfg.dmd.ema_decay = 0.5
  start = random_model(cfg.model)[0]
  # critic, both, critic, both; the generator's first update has learning rate 0 (warm-up), so
  # its parameters move on the second only: ema = (start + start) / 2, then (start + new) / 2
  tr, state, metrics = _steps(cfg, one_device_mesh(), start, None, n=4)
  assert [float(m["generator_step"]) for m in metrics] == [0.0, 1.0, 0.0, 1.0]
  one = jax.device_get(state)
  trained = dmd.trainable(one["params"], cfg)
  moved = False
  for e, s0, p in zip(jax.tree.leaves(one["aux"]["ema"]), jax.tree.leaves(dmd.trainable(start, cfg)),
                      jax.tree.leaves(trained)):
    np.testing.assert_allclose(e, 0.5 * s0 + 0.5 * p, rtol=1e-6, atol=1e-7)
    moved |= not np.array_equal(p, s0)
  assert moved
  (tmp_path / "config.json").write_text(cfg.to_json())
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers={
      "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})
  save_step(mngr, 4, state, {})
  mngr.wait_until_finished()
  mngr.close()
  _, _, given, step = load_params(str(tmp_path))
  assert step == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(given)), jax.tree.leaves(dmd._with_frozen(one["aux"]["ema"], one["params"]))):
    np.testing.assert_array_equal(a, b)
  cfg.dmd.ema_decay = 1.0
  with pytest.raises(ValueError, match="dmd.ema_decay=1.0"):
    dmd.init_aux(start, cfg, start)


def test_regression_warm_up_trains_the_generator_on_the_ground_truth_alone():
  cfg = _config("regression")
  tr = Trainer(cfg, one_device_mesh())
  state = tr.with_params(random_model(cfg.model)[0])
  before = jax.device_get(state)
  for _ in range(2):  # every step is the generator's; the first has learning rate 0 (warm-up)
    state, metrics = tr.step(state, _batch(cfg), jax.random.key(1))
  after = jax.device_get(state)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]),
                                                      jax.tree.leaves(after["params"])))
  for a, b in zip(jax.tree.leaves(before["aux"]), jax.tree.leaves(after["aux"])):
    np.testing.assert_array_equal(a, b)  # no critic, no real score in this objective


def test_an_unknown_objective_is_refused():
  cfg = _config("gan")
  with pytest.raises(ValueError, match="dmd.objective='gan'"):
    Trainer(cfg, one_device_mesh())


def test_the_dmd_gradient_is_zero_while_the_critic_is_the_unguided_real_score():
  """Critic and real score are the same weights at the start; without guidance the two scores
  agree exactly, so the generator gets no push (a check of the plumbing, not of the Gaussian
  algebra above)."""
  cfg = _config()
  cfg.dmd.update(guidance=1.0, generator_every=1)
  tr = Trainer(cfg, one_device_mesh())
  state = tr.with_params(random_model(cfg.model)[0], random_model(cfg.model, seed=3)[0])
  _, metrics = tr.step(state, _batch(cfg), jax.random.key(1))
  assert float(metrics["generator_step"]) == 1.0 and float(metrics["dmd_gradient"]) < 1e-6
  cfg.dmd.guidance = 2.0  # with guidance they differ, and the generator is pushed
  tr = Trainer(cfg, one_device_mesh())
  state = tr.with_params(random_model(cfg.model)[0], random_model(cfg.model, seed=3)[0])
  _, metrics = tr.step(state, _batch(cfg), jax.random.key(1))
  assert float(metrics["dmd_gradient"]) > 1e-2
