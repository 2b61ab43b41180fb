"""Issue 17's anti-drift switches: history degradation, context noise, composite rollout targets,
turn weights, identity mapping in stage 1, strided temporal RoPE and the copy gate."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax import degrade
from anchoredit_jax.checkpoint import load_params
from anchoredit_jax.models import dit
from anchoredit_jax.models.model import build, prev_cond
from anchoredit_jax.stages import causal, pretrain
from anchoredit_jax.growth import load_init
from configs import causal as causal_config
from tests.helpers import random_model, smoke_config, tiny_model
from tests.test_causal import _setup

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "toy")


def _latents(seed=0, b=4, res=16):
  return jax.random.uniform(jax.random.key(seed), (b, res, res, 3), minval=-1.0, maxval=1.0)


def _only(kind, **over):
  """A degradation config with only `kind` switched on (probability 1), strength in [lo, hi]."""
  cfg = degrade.default_config(enabled=True)
  for k in degrade.KINDS:
    cfg[f"p_{k}"] = 1.0 if k == kind else 0.0
  cfg.update(over)
  return cfg


def test_degradation_off_is_the_identity_and_on_is_bounded_per_kind():
  x = _latents()
  ae = build(tiny_model(), nnx.Rngs(0)).autoencoder
  rng = jax.random.key(1)
  assert degrade.degrade(rng, x, degrade.default_config(enabled=False)) is x
  none = _only("none")  # enabled, every probability 0: nothing happens
  np.testing.assert_array_equal(degrade.degrade(rng, x, none, autoencoder=ae), x)
  changed = {}
  for kind in degrade.KINDS:
    y = degrade.degrade(rng, x, _only(kind), autoencoder=ae)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    changed[kind] = float(jnp.abs(y - x).max())
    np.testing.assert_array_equal(y, degrade.degrade(rng, x, _only(kind), autoencoder=ae))  # rng-determined
  assert all(v > 1e-4 for v in changed.values()), changed
  # per-channel colour: |x' - x| <= 0.05 |x| + 0.03 at full strength
  y = degrade.degrade(rng, x, _only("color", s_min=1.0, s_max=1.0))
  assert bool(jnp.all(jnp.abs(y - x) <= 0.05 * jnp.abs(x) + 0.03 + 1e-6))
  # the round trip never touches the source (the user's image is exact)
  src = degrade.degrade(rng, x, _only("roundtrip"), autoencoder=ae, source=True)
  np.testing.assert_array_equal(src, x)
  # strength scales the effect: s = 0.15 changes less than s = 1
  weak = degrade.degrade(rng, x, _only("field", s_min=0.15, s_max=0.15))
  strong = degrade.degrade(rng, x, _only("field", s_min=1.0, s_max=1.0))
  assert float(jnp.abs(weak - x).mean()) < 0.3 * float(jnp.abs(strong - x).mean())


def test_blur_and_pool_keep_constant_images():
  x = jnp.full((2, 8, 8, 3), 0.3)
  np.testing.assert_allclose(degrade.gaussian_blur3(x, jnp.array([0.2, 0.45])), x, atol=1e-6)
  np.testing.assert_allclose(degrade.avg_pool(x, 4), x, atol=1e-6)
  ramp = jnp.broadcast_to(jnp.arange(8.0)[None, :, None, None], (1, 8, 8, 1))
  assert float(jnp.abs(degrade.avg_pool(ramp, 2) - ramp).max()) == pytest.approx(0.5)


def test_context_noise():
  x = _latents()
  clean, t0 = degrade.noise_context(jax.random.key(0), x, 0.0)
  assert clean is x and float(jnp.abs(t0).max()) == 0.0
  noisy, t = degrade.noise_context(jax.random.key(0), x, 0.2)
  assert t.shape == (4,) and bool(jnp.all((t >= 0) & (t <= 0.2)))
  assert float(jnp.abs(noisy - x).max()) > 0


def test_composite_target_and_turn_weights():
  c = causal_config.get_config("smoke").causal
  gt, prev = jnp.ones((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3))
  mask = jnp.zeros((1, 4, 4), bool).at[0, 1, 2].set(True)
  np.testing.assert_array_equal(causal.turn_target(c, gt, prev, mask), gt)
  c.rollout_target = "composite"
  out = causal.turn_target(c, gt, prev, mask)
  assert float(out[0, 1, 2].min()) == 1.0 and float(out.sum()) == 3.0  # only the edited pixel
  c.rollout_target = "ground_truth"
  with pytest.raises(ValueError, match="rollout_target"):
    causal.turn_target(c, gt, prev, mask)
  losses = jnp.array([1.0, 2.0, 4.0])
  assert float(causal.turn_weighted(losses, 0.0)) == pytest.approx(7 / 3)
  assert float(causal.turn_weighted(losses, 1.0)) == pytest.approx((1 + 3 + 8) / 4.5)


def test_stage_2_switches_change_training_and_stay_finite():
  cfg, graphdef, params, batch = _setup(p_teacher=0.0)
  f = lambda c: np.asarray(jax.jit(lambda p: causal.rollout_losses(p, graphdef, batch, jax.random.key(3), c))(params))
  base = f(cfg)
  for over in (dict(context_noise=0.2), dict(rollout_target="composite")):
    cfg2, *_ = _setup(p_teacher=0.0, **over)
    out = f(cfg2)
    assert np.all(np.isfinite(out)) and not np.allclose(out, base), over
  cfg2, *_ = _setup(p_teacher=0.0)
  cfg2.causal.degrade = _only("blur")
  out = f(cfg2)
  assert np.all(np.isfinite(out)) and not np.allclose(out, base)
  cfg2.causal.turn_weight = 1.0
  loss, aux = causal.loss_fn(params, graphdef, batch, jax.random.key(3), cfg2)
  np.testing.assert_allclose(loss, causal.turn_weighted(jnp.asarray(out), 1.0), rtol=1e-5)


def test_identity_mapping_is_a_no_change_edit_apart_from_cfg_dropout():
  """p_identity = 1 trains exactly what a batch of (source, identity_text, source) pairs with no
  edited pixels trains; the empty instruction of CFG dropout is not used for it."""
  cfg = smoke_config()
  cfg.model = tiny_model()
  graphdef, params = nnx.split(build(cfg.model, nnx.Rngs(0)))
  params, _ = random_model(cfg.model)
  imgs = jax.random.randint(jax.random.key(0), (2, 2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  batch = {"images": imgs, "tokens": jnp.ones((2, 1, cfg.model.text_len), jnp.int32),
           "edit_masks": jnp.ones((2, 1, 32, 32), bool)}
  cfg.flow.update(p_identity=1.0, p_uncond=1.0)  # every row identity: CFG dropout cannot apply
  loss_id, _ = pretrain.loss_fn(params, graphdef, batch, jax.random.key(1), cfg)
  same = {"images": jnp.stack([imgs[:, 0], imgs[:, 0]], 1),
          "tokens": jnp.broadcast_to(pretrain.instruction_tokens(cfg.model, cfg.flow.identity_text),
                                     batch["tokens"].shape),
          "edit_masks": jnp.zeros_like(batch["edit_masks"])}
  cfg.flow.update(p_identity=0.0, p_uncond=0.0)
  loss_ref, _ = pretrain.loss_fn(params, graphdef, same, jax.random.key(1), cfg)
  np.testing.assert_allclose(loss_id, loss_ref, rtol=1e-6)
  loss_edit, _ = pretrain.loss_fn(params, graphdef, batch, jax.random.key(1), cfg)
  assert not np.allclose(loss_edit, loss_ref)
  assert not np.array_equal(pretrain.instruction_tokens(cfg.model, cfg.flow.identity_text),
                            pretrain.empty_tokens(cfg.model))


def test_rope_stride_spaces_turn_positions():
  """A model with stride s at turn positions p computes what stride 1 computes at s p."""
  k = jax.random.key(0)
  x = jax.random.uniform(k, (1, 3, 16, 16, 3))
  t = jnp.array([[0.0, 0.0, 0.6]])
  toks = jnp.zeros((1, 3, 32), jnp.int32)
  cond = prev_cond(jax.random.uniform(jax.random.fold_in(k, 1), (1, 3, 16, 16, 3)))
  pos = jnp.arange(3)[None]
  params, apply1 = random_model(tiny_model())
  _, apply4 = random_model(tiny_model(rope_stride=4))
  strided = apply4(params, x, t, toks, pos, cond=cond)[0]
  np.testing.assert_allclose(strided, apply1(params, x, t, toks, pos * 4, cond=cond)[0], atol=1e-5)
  assert not np.allclose(strided, apply1(params, x, t, toks, pos, cond=cond)[0], atol=1e-4)


def test_copy_gate_blends_towards_the_previous_turn():
  """An open gate returns the previous turn as the clean prediction; a zero-initialised gate
  changes the velocity by exactly sigmoid(GATE_OFFSET) of the way."""
  m = tiny_model(copy_gate=True)
  params, apply = random_model(m)
  b, C = 2, 3
  x = jax.random.uniform(jax.random.key(0), (b, 1, 16, 16, C), minval=-1, maxval=1)
  prev = jax.random.uniform(jax.random.key(1), (b, 1, 16, 16, C), minval=-1, maxval=1)
  cond = jnp.concatenate([prev, jnp.ones(prev.shape[:-1] + (1,))], -1)
  t = jnp.full((b, 1), 0.5)
  toks = jnp.zeros((b, 1, 32), jnp.int32)
  pos = jnp.ones((b, 1), jnp.int32)
  head = params["dit"]["head"]
  p = m.patch
  gate_cols = np.arange(p * p) * (C + 1) + C  # the gate's column at each patch offset
  bias = head["bias"].get_value()
  head["bias"].set_value(bias.at[gate_cols].set(40.0))
  kern = head["kernel"].get_value()
  head["kernel"].set_value(kern.at[:, gate_cols].set(0.0))
  v = apply(params, x, t, toks, pos, cond=cond)[0]
  np.testing.assert_allclose(x - 0.5 * v, prev, atol=1e-5)  # x0 = x_t - t v = the previous turn
  # closed gate (zero logits): v' = v + sigmoid(-8) (x0 - prev) / t against a model without the gate
  head["bias"].set_value(bias.at[gate_cols].set(0.0))
  no_gate = tiny_model()
  keep_cols = np.setdiff1d(np.arange(kern.shape[1]), gate_cols)
  plain = jax.tree.map(lambda a: a, params)
  plain["dit"]["head"]["kernel"].set_value(kern[:, keep_cols])
  plain["dit"]["head"]["bias"].set_value(bias[keep_cols])
  g = nnx.graphdef(build(no_gate, nnx.Rngs(0)))
  v0 = nnx.merge(g, plain)(x, t, toks, pos, cond=cond)[0]
  head["kernel"].set_value(kern.at[:, gate_cols].set(0.0))
  v1 = apply(params, x, t, toks, pos, cond=cond)[0]
  keep = jax.nn.sigmoid(dit.GATE_OFFSET)
  np.testing.assert_allclose(v1, v0 + keep * ((x - 0.5 * v0) - prev) / 0.5, atol=1e-5)
  assert float(jnp.abs(v0).max()) > 1e-2


def test_a_hard_gate_gives_each_pixel_the_reference_or_the_prediction_exactly():
  """keep rounded at 0.5: where sigmoid(logit + offset) > 0.5 the clean prediction is the previous
  turn itself, elsewhere the ungated one (what a soft gate only approaches)."""
  b, H, C = 1, 4, 3
  v, x_t, prev = (jax.random.normal(jax.random.key(i), (b, H, H, C)) for i in range(3))
  logit = jnp.where(jnp.arange(H)[None, :, None] < 2, 20.0, -20.0) * jnp.ones((b, H, H)) - dit.GATE_OFFSET
  logit = logit.at[0, 0, 0].set(-dit.GATE_OFFSET + 0.1)  # keep just over 0.5
  t = 0.5
  out = dit.copy_gated(v, x_t, t, prev, logit, hard=True)
  x0 = x_t - t * out
  np.testing.assert_allclose(x0[:, :2], prev[:, :2], atol=1e-5)
  np.testing.assert_allclose(out[:, 2:], v[:, 2:], atol=1e-6)
  soft = dit.copy_gated(v, x_t, t, prev, logit)
  assert float(jnp.abs((x_t - t * soft)[0, 0, 0] - prev[0, 0, 0]).max()) > 1e-3  # soft: only half way


def test_gated_stage_2_grows_from_the_shipped_stage_1_and_learns_its_gate():
  src = os.path.join(REF, "pretrain")
  old_cfg, old_graph, old_params, _ = load_params(src)
  cfg = causal_config.get_config("toy")
  cfg.init_from = src
  cfg.model.update(copy_gate=True, rope_stride=4)  # the stride needs no parameters: it may change
  params = load_init(cfg)
  assert params["dit"]["head"]["kernel"].shape[-1] == 4 * 4 * 4
  np.testing.assert_array_equal(dit.pad_head(np.asarray(old_params["dit"]["head"]["bias"].get_value()), 4, 4),
                                params["dit"]["head"]["bias"].get_value())
  # the gate's loss is part of a stage-2 step of a gated smoke model
  cfg, graphdef, params, batch = _setup()
  cfg.model.copy_gate = True
  graphdef, params = nnx.split(build(cfg.model, nnx.Rngs(0)))
  g = jax.grad(lambda p: causal.loss_fn(p, graphdef, batch, jax.random.key(3), cfg)[0])(params)
  gate_grad = np.asarray(g["dit"]["head"]["bias"].get_value())[np.arange(16) * 4 + 3]
  assert np.abs(gate_grad).max() > 0


def test_anchor_gate_copies_the_source_and_learns_against_the_identity_mask():
  """gate_from="anchor": an open gate returns the source's latent (the anchor part of the concat
  condition), not the previous turn; its target is "changed since the source", not "changed this
  turn"; it needs the anchor condition; grown over a stage 1 without a gate, it is chosen freely."""
  m = tiny_model(copy_gate=True, gate_from="anchor", concat_anchor=True)
  params, apply = random_model(m)
  b, C, p = 2, 3, m.patch
  x, prev, src = (jax.random.uniform(jax.random.key(i), (b, 1, 16, 16, C), minval=-1, maxval=1)
                  for i in range(3))
  cond = jnp.concatenate([prev, jnp.ones(prev.shape[:-1] + (1,)), src], -1)
  head = params["dit"]["head"]
  gate_cols = np.arange(p * p) * (C + 1) + C
  head["bias"].set_value(head["bias"].get_value().at[gate_cols].set(40.0))
  head["kernel"].set_value(head["kernel"].get_value().at[:, gate_cols].set(0.0))
  t = jnp.full((b, 1), 0.5)
  v = apply(params, x, t, jnp.zeros((b, 1, 32), jnp.int32), jnp.ones((b, 1), jnp.int32), cond=cond)[0]
  np.testing.assert_allclose(x - 0.5 * v, src, atol=1e-5)
  with pytest.raises(ValueError, match="gate_from='anchor' needs model.concat_anchor=True"):
    build(tiny_model(copy_gate=True, gate_from="anchor"), nnx.Rngs(0))

  cfg, graphdef, params, batch = _setup()
  cfg.model.update(copy_gate=True, gate_from="anchor", concat_anchor=True)
  edit, ident = np.asarray(batch["edit_masks"]), np.asarray(batch["identity_masks"])
  np.testing.assert_array_equal(causal.gate_changed(cfg.model, batch), ~ident)
  assert (~ident & ~edit).any()  # pixels edited at an earlier turn: kept by "prev", not by "anchor"
  graphdef, params = nnx.split(build(cfg.model, nnx.Rngs(0)))
  g = jax.grad(lambda q: causal.loss_fn(q, graphdef, batch, jax.random.key(3), cfg)[0])(params)
  assert np.abs(np.asarray(g["dit"]["head"]["bias"].get_value())[np.arange(16) * 4 + 3]).max() > 0

  # grown over the shipped stage 1 (no gate), the gate may copy from the anchor
  stage2 = causal_config.get_config("toy")
  stage2.init_from = os.path.join(REF, "pretrain")
  stage2.model.update(copy_gate=True, gate_from="anchor")
  assert load_init(stage2)["dit"]["head"]["kernel"].shape[-1] == 4 * 4 * 4
