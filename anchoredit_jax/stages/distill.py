"""Stage 3: consistency distillation of the stage-2 model into a 4-step causal student.

Three copies of the model take part: the frozen *teacher* (stage 2, sampled with classifier-free
guidance), the *student* being trained (initialised from the teacher) and its *EMA*, which gives
the targets. On a discretised schedule 0 = t_0 < ... < t_N = 1 (warped by the training shift):

  x_{n+1} = noised ground truth at t_{n+1}
  x_n     = one guided Euler step of the teacher from t_{n+1} to t_n
  loss    = || f_student(x_{n+1}, t_{n+1}) - stop_grad(f_ema(x_n, t_n)) ||^2   (edit-weighted)

with the consistency function f(x, t) = x - t v(x, t), which meets f(x, 0) = x by construction.
No JVP is needed. Like stage 2, training runs over multi-turn sequences with one `lax.scan` whose
carry holds each model's AnchorMemory; the turn written into all three memories is the
*student's own* 4-step sample (self-rollout; ground truth with probability p_teacher), so the
student learns on the context it will see at inference. Each model keeps its own memory because
the keys and values of a turn depend on the weights that computed them. Stage 2's anti-drift
switches (`causal.degrade`, `context_noise`, `rollout_target`, `turn_weight`) act here the same way,
and a copy-gated student also learns its gate against the exact edit mask.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.editing import encode, generate_turn_fast, guided_velocity, turn_velocity, write_turn
from anchoredit_jax.models.model import frozen_parts
from anchoredit_jax.stages.causal import (rollout_context, rollout_inputs, run_turns, training_context,
                                          turn_target, turn_weighted)
from anchoredit_jax.stages.pretrain import gate_loss, weighted_mse

ROLES = ("student", "ema", "teacher")


def trainable(params, cfg) -> nnx.State:
  """The parts of `params` that training changes: the teacher and the EMA keep a copy of these
  only and share the student's frozen encoders (umT5-XXL and the Wan VAE are 22 GiB in float32;
  three copies of them would not fit one H200 beside the DiT)."""
  frozen = frozen_parts(cfg.model)
  return nnx.State({k: v for k, v in params.items() if k not in frozen})


def init_aux(params, cfg, teacher):
  """Extra training state: the frozen teacher and the EMA student (both start as the stage-2
  run the student starts from: `teacher` is `params`)."""
  return {"teacher": trainable(teacher, cfg), "ema": trainable(params, cfg)}


def update_aux(aux, params, cfg):
  """EMA of the student after each optimizer step; the teacher never changes."""
  d = cfg.distill.ema_decay
  return {**aux, "ema": optax.incremental_update(trainable(params, cfg), aux["ema"], 1.0 - d)}


def _with_frozen(part, params):
  """A role's own parameters completed by the student's frozen parts."""
  return nnx.State({**params, **part})


def schedule(cfg):
  """[N+1] times t_0 = 0 < ... < t_N = 1 of the discretised consistency schedule."""
  return flow.shift_time(jnp.linspace(0.0, 1.0, cfg.distill.intervals + 1), cfg.flow.shift)


def consistency_x0(model, mem, x, t, text, with_gate=False):
  """f(x, t) = x - t v(x, t) [b,H,W,C] (and the copy gate's keep logits with `with_gate`)."""
  out = turn_velocity(model, mem, x, t, text, with_gate=with_gate)
  x0 = flow.x0_from_velocity(x, out[0], t)
  return (x0, out[2]) if with_gate else x0


def rollout_losses(params, graphdef, batch, rng, cfg, aux, *, store=None, use_scan=True):
  """Per-turn consistency losses [K] over one self-rollout (see the module docstring)."""
  models = {"student": nnx.merge(graphdef, params),
            "ema": nnx.merge(graphdef, _with_frozen(aux["ema"], params)),
            "teacher": nnx.merge(graphdef, _with_frozen(aux["teacher"], params))}
  c, d, gate = cfg.causal, cfg.distill, bool(cfg.model.get("copy_gate"))
  src, empty, mem0, xs = rollout_inputs(models["student"], cfg, batch)
  ae = models["student"].autoencoder
  empty = {r: encode(m, empty, store) for r, m in models.items()}
  x_src, t_src = training_context(jax.random.fold_in(rng, 0), src, c, ae, source=True)
  mems = {r: write_turn(m, mem0, x_src, empty[r], t_src) for r, m in models.items()}
  grid = schedule(cfg)

  def body(carry, xs):
    mems, prev = carry  # prev: the clean turn last written (before degradation)
    k, x_gt, tokens, mask, changed = xs
    r = jax.random.fold_in(rng, k)
    r_gen, r_teach, r_n, r_noise, r_ctx = (jax.random.fold_in(r, i) for i in range(5))
    b = x_gt.shape[0]
    text = {r: encode(m, tokens, store) for r, m in models.items()}
    x_ctx = rollout_context(c, x_gt, lambda: generate_turn_fast(
        models["student"], mems["student"], text["student"], r_gen, steps=d.student_steps,
        shift=cfg.flow.shift), r_teach)
    n = jax.random.randint(r_n, (b,), 0, d.intervals)
    t_hi, t_lo = grid[n + 1], grid[n]
    x_hi = flow.add_noise(turn_target(c, x_gt, prev, mask), jax.random.normal(r_noise, x_gt.shape), t_hi)
    v_c, v_u = guided_velocity(models["teacher"], mems["teacher"], x_hi, t_hi, text["teacher"],
                               empty["teacher"])
    v = v_u + d.guidance * (v_c - v_u)
    x_lo = x_hi + (t_lo - t_hi)[:, None, None, None] * v
    target = jax.lax.stop_gradient(consistency_x0(models["ema"], mems["ema"], x_lo, t_lo, text["ema"]))
    pred = consistency_x0(models["student"], mems["student"], x_hi, t_hi, text["student"], gate)
    loss, _ = weighted_mse(pred[0] if gate else pred, target, mask, cfg.flow.edit_weight)
    if gate:
      loss = loss + cfg.flow.gate_weight * gate_loss(pred[1], changed)
    x_mem, t_mem = training_context(r_ctx, x_ctx, c, ae)
    mems = {r: write_turn(models[r], mems[r], x_mem, text[r], t_mem) for r in ROLES}
    return (mems, x_ctx), loss

  return run_turns(body, (mems, src), xs, use_scan)


def loss_fn(params, graphdef, batch, rng, cfg, aux, *, store=None):
  losses = rollout_losses(params, graphdef, batch, rng, cfg, aux, store=store)
  loss = turn_weighted(losses, cfg.causal.turn_weight)
  return loss, {"loss": loss, "loss_first_turn": losses[0], "loss_last_turn": losses[-1]}
