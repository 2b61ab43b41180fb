"""Stage 2: the self-rollout scan equals a Python loop, and no gradient reaches earlier turns."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax.data import pipeline
from anchoredit_jax.models.model import build
from anchoredit_jax.stages import causal
from configs import causal as causal_config


def _setup(**over):
  cfg = causal_config.get_config("smoke")
  cfg.model.update(dim=32, heads=2, ffn_dim=64, freq_dim=32, text_dim=32, text_heads=2)
  cfg.causal.update(over)
  graphdef, params = nnx.split(build(cfg.model, nnx.Rngs(0)))
  # perturb every parameter: the zero-initialised head would make outputs trivially equal
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  rows = [pipeline.example_from_seed(i, split="train", res=32, num_turns=cfg.data.num_turns,
                                     text_len=cfg.model.text_len) for i in range(2)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in ("images", "tokens", "edit_masks")}
  return cfg, graphdef, params, batch


def test_scan_rollout_equals_python_loop():
  cfg, graphdef, params, batch = _setup(p_teacher=0.5)
  assert cfg.data.num_turns > cfg.causal.window  # positions get re-indexed inside the rollout
  f = jax.jit(lambda p, b, r, s: causal.rollout_losses(p, graphdef, b, r, cfg, use_scan=s),
              static_argnums=3)
  scan = f(params, batch, jax.random.key(3), True)
  loop = f(params, batch, jax.random.key(3), False)
  assert scan.shape == (cfg.data.num_turns,)
  np.testing.assert_allclose(scan, loop, rtol=1e-5)
  other = f(params, batch, jax.random.key(4), True)
  assert not np.allclose(scan, other)  # the rng is really used


def test_no_gradient_reaches_earlier_turns():
  cfg, graphdef, params, batch = _setup(p_teacher=0.5)
  images = batch["images"].astype(jnp.float32) / 255.0  # the autoencoder takes floats in [0,1] too

  def last_turn_loss(images):
    return causal.rollout_losses(params, graphdef, {**batch, "images": images}, jax.random.key(3), cfg)[-1]

  g = jax.jit(jax.grad(last_turn_loss))(images)
  per_turn = np.abs(np.asarray(g)).sum(axis=(0, 2, 3, 4))  # [K+1]
  assert np.all(per_turn[:-1] == 0.0), per_turn  # source and earlier turns: exactly no gradient
  assert per_turn[-1] > 0.0                      # the turn's own target does get one


def test_teacher_forcing_ablation_changes_the_context():
  cfg, graphdef, params, batch = _setup(p_teacher=0.0)
  f = lambda c: jax.jit(lambda p: causal.rollout_losses(p, graphdef, batch, jax.random.key(3), c))(params)
  rolled = f(cfg)
  cfg.causal.self_rollout = False
  forced = f(cfg)
  np.testing.assert_allclose(rolled[0], forced[0], rtol=1e-5)  # turn 1 sees only the source
  assert not np.allclose(rolled[1:], forced[1:])                # later turns see generated turns
