"""Stage 2: the self-rollout scan equals a Python loop, and no gradient reaches earlier turns."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax.checkpoint import load_params
from anchoredit_jax.data import pipeline
from anchoredit_jax.models.model import build, init_memory, prev_cond
from anchoredit_jax.growth import load_init
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
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in ("images", "tokens", "edit_masks", "identity_masks")}
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


def test_stage_2_can_add_the_anchor_latent_to_a_stage_1_run_without_it():
  """init_from a run without concat_anchor grows the patch embedding with zero weights: the grown
  model computes what the stage-1 model did, whatever the anchor channels hold. The other way
  round (dropping channels) is refused."""
  src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "toy", "pretrain")
  old_cfg, old_graph, old_params, _ = load_params(src)
  assert not old_cfg.model.concat_anchor
  cfg = causal_config.get_config("toy")
  cfg.init_from = src
  cfg.model.concat_anchor = True
  params = load_init(cfg)
  graphdef = nnx.graphdef(build(cfg.model, nnx.Rngs(0)))
  k = jax.random.key(0)
  x = jax.random.uniform(jax.random.fold_in(k, 0), (2, 3, 32, 32, 3))
  t = jnp.array([[0.0, 0.0, 0.7]] * 2)
  toks = jnp.zeros((2, 3, cfg.model.text_len), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(3), (2, 3))
  clean = jax.random.uniform(jax.random.fold_in(k, 1), (2, 3, 32, 32, 3))
  old = nnx.merge(old_graph, old_params)(x, t, toks, pos, cond=prev_cond(clean))[0]
  new = nnx.merge(graphdef, params)(x, t, toks, pos, cond=prev_cond(clean, anchor=True))[0]
  assert float(jnp.abs(old).max()) > 1e-2
  np.testing.assert_allclose(new, old, rtol=0, atol=1e-5)
  assert nnx.state(build(cfg.model, nnx.Rngs(0))).dit.patch_embed.kernel.shape == params.dit.patch_embed.kernel.shape
  cfg.model.concat_anchor, cfg.model.concat_prev = False, False
  with pytest.raises(ValueError, match="another model config"):
    load_init(cfg)
  cfg.model.concat_anchor = True  # the anchor's channels extend the previous turn's condition
  with pytest.raises(ValueError, match="needs model.concat_prev=True"):
    build(cfg.model, nnx.Rngs(0))
  # how the stage computes may differ from its init_from run's: the parameters are the same
  cfg.model.update(concat_prev=True, remat="dots", attention_kernel="splash", dtype="bfloat16")
  grown = load_init(cfg)
  assert jax.tree.structure(grown) == jax.tree.structure(params)


def test_a_non_square_batch_trains_as_one_of_its_own_shape():
  """Aspect-ratio buckets give H != W: the rollout runs on a 32x16 crop, its memory's token grid
  follows the crop, and the loss is finite and depends on the crop's content."""
  cfg, graphdef, params, batch = _setup(p_teacher=0.5)
  left = {k: v[:, :, :, :16] if k != "tokens" else v for k, v in batch.items()}  # masks too
  right = {**left, "images": batch["images"][:, :, :, 16:]}
  f = jax.jit(lambda p, b: causal.rollout_losses(p, graphdef, b, jax.random.key(3), cfg))
  a, b = f(params, left), f(params, right)
  assert a.shape == (cfg.data.num_turns,) and np.isfinite(a).all() and not np.allclose(a, b)
  mem = init_memory(cfg.model, 2, (32, 16), 1)
  p, f_ = cfg.model.patch, cfg.model.ae_factor
  assert mem.anchor_k.shape[-3] == (32 // f_ // p) * (16 // f_ // p)
