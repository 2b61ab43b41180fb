"""Stage 3b: distribution-matching distillation (DMD) of the stage-2 model into a 4-step student.

Three networks take part, all reading their own AnchorMemory of the same turns: the *generator*
(the student being trained, `params`), the frozen *real score* (stage 2, read with CFG) and the
trainable *critic* or fake score (starting from stage 2 too), which tracks the distribution of
the generator's own outputs. Per step, with one target turn k for the whole batch:

  1. history: turns 1..k-1 are the generator's own no-gradient 4-step samples, each written into
     all three memories (one `lax.scan` over the turns; turns after k are skipped);
  2. the generator's input at k: backward simulation from pure noise through s steps of its own
     sampler (s uniform over the steps, no gradient), at time t_s; then one step with gradient
     gives x̂ = f(x_s, t_s);
  3. critic: the flow-matching loss on x̂ (no gradient to the generator), noised at t ~ U[t_min,
     t_max] (flow-shifted);
  4. generator (the last of every `generator_every` steps): x̂ noised at such a t, read by both scores as
     clean-image predictions; g = (fake - real) / mean|x̂ - real| per sample; the loss
     0.5 ||x̂ - stop_grad(x̂ - g)||² has gradient g at x̂, moving the generator's outputs from
     where the critic says they are to where the real score says the data is.
With dmd.ema_decay > 0 an EMA of the generator, moved after each of its updates, is kept beside
them and is what the run gives for editing (checkpoint.load_params).
Both players' gradients come from one backward pass (their losses only meet through stop
gradients); on the other steps only the critic's is taken. Each has its own AdamW; the
critic's state lives in the train state's `aux` beside the real score's parameters.

The scores read turn k through their memories, exactly as a full causal forward over the
sequence would (tests/test_dmd.py checks the two agree); the memory costs one pass per turn.

dmd.objective="regression" is the authors' warm-up for the generator instead: its one step from
the ground truth noised at t_s, regressed onto the ground truth (no critic, no real score).
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.editing import encode, generate_turn_fast, guided_velocity, turn_velocity, write_turn
from anchoredit_jax.models.model import gives_ema
from anchoredit_jax.optim import apply_gradients, make_optimizer
from anchoredit_jax.stages.causal import rollout_context, rollout_inputs, training_context
from anchoredit_jax.stages.distill import _with_frozen, consistency_x0, trainable

OBJECTIVES = ("dmd", "regression")


def generator_step(step, cfg):
  """Whether the step numbered `step` (from 0) moves the generator: the last of every
  generator_every, so a run logged every multiple of it logs generator steps."""
  return (step + 1) % cfg.dmd.generator_every == 0


def critic_optimizer(cfg):
  return make_optimizer(cfg.dmd.critic_optim, cfg.train.steps)


def optimizer_steps(cfg) -> int:
  """Updates the generator gets over the run (its learning-rate schedule counts those)."""
  if cfg.dmd.objective == "regression":
    return cfg.train.steps
  return -(-cfg.train.steps // cfg.dmd.generator_every)


def init_aux(params, cfg, teacher):
  """The frozen real score and the critic, both starting as `teacher` (stage 2), the critic's
  optimizer state and, with dmd.ema_decay > 0, the generator's EMA (starting as `params`)."""
  if cfg.dmd.objective not in OBJECTIVES:
    raise ValueError(f"dmd.objective={cfg.dmd.objective!r}; choose from {OBJECTIVES}")
  if not 0.0 <= cfg.dmd.get("ema_decay", 0.0) < 1.0:
    raise ValueError(f"dmd.ema_decay={cfg.dmd.ema_decay}; choose 0 (no EMA) or a decay in (0, 1)")
  real = trainable(teacher, cfg)
  critic = jax.tree.map(jnp.copy, real)
  aux = {"real": real, "critic": critic, "critic_opt": critic_optimizer(cfg).init(critic)}
  if gives_ema(cfg):
    aux["ema"] = jax.tree.map(jnp.copy, trainable(params, cfg))
  return aux


def _moved_ema(aux, params, moved, cfg):
  """aux with the generator's EMA moved toward `params` where `moved` (a generator update)."""
  if not gives_ema(cfg):
    return aux
  new = optax.incremental_update(trainable(params, cfg), aux["ema"], 1.0 - cfg.dmd.ema_decay)
  return {**aux, "ema": jax.tree.map(lambda n, o: jnp.where(moved, n, o), new, aux["ema"])}


def _models(params, critic, graphdef, aux, cfg):
  """The networks this objective reads (regression: the generator alone)."""
  models = {"generator": nnx.merge(graphdef, params)}
  if cfg.dmd.objective == "dmd":
    models["real"] = nnx.merge(graphdef, _with_frozen(aux["real"], params))
    models["critic"] = nnx.merge(graphdef, _with_frozen(critic, params))
  return models


def score_time(rng, b, cfg):
  """[b] times where the scores are read: U[t_min, t_max], warped by the flow shift."""
  u = jax.random.uniform(rng, (b,), minval=cfg.dmd.t_min, maxval=cfg.dmd.t_max)
  return flow.shift_time(u, cfg.flow.shift)


def history(params, graphdef, batch, rng, cfg, aux, *, store=None):
  """No gradient: the target turn's index k (0-based over the edits), every role's memory after
  the generator's own rollout of the turns before it, and turn k's scan inputs."""
  models = _models(params, aux["critic"], graphdef, aux, cfg)
  c, steps = cfg.causal, cfg.dmd.student_steps
  src, empty, mem0, xs = rollout_inputs(models["generator"], cfg, batch)
  k = jax.random.randint(jax.random.fold_in(rng, 1), (), 0, xs[0].shape[0])
  ae = models["generator"].autoencoder
  x_src, t_src = training_context(jax.random.fold_in(rng, 0), src, c, ae, source=True)
  mems = {r: write_turn(m, mem0, x_src, encode(m, empty, store), t_src) for r, m in models.items()}

  def turn(mems, xs):
    j, x_gt, tokens = xs[:3]
    r = jax.random.fold_in(jax.random.fold_in(rng, 2), j)
    text = {r_: encode(m, tokens, store) for r_, m in models.items()}
    x_ctx = rollout_context(c, x_gt, lambda: generate_turn_fast(
        models["generator"], mems["generator"], text["generator"], jax.random.fold_in(r, 0),
        steps=steps, shift=cfg.flow.shift), jax.random.fold_in(r, 1))
    x_mem, t_mem = training_context(jax.random.fold_in(r, 2), x_ctx, c, ae)
    return {r_: write_turn(m, mems[r_], x_mem, text[r_], t_mem) for r_, m in models.items()}

  def body(mems, xs):  # xs[0] is the turn's number 1..K: turns before k are rolled out
    return jax.lax.cond(xs[0] - 1 < k, turn, lambda m, _: m, mems, xs), None

  mems = jax.lax.scan(body, mems, xs)[0]
  at_k = jax.tree.map(lambda a: a[k], xs)
  return jax.lax.stop_gradient((k, mems, at_k, empty))


def backward_simulation(model, mem, text, rng, s, cfg):
  """The generator's own sampler run from pure noise for s of its steps (no gradient) ->
  (x_s [b,H,W,C], t_s [b]): the input it meets at its step s at inference."""
  steps = cfg.dmd.student_steps
  times = jnp.append(flow.consistency_times(steps, cfg.flow.shift), 0.0)
  r_init, r_steps = jax.random.split(rng)
  x = jax.random.normal(r_init, mem.last_latent.shape)
  b = x.shape[0]

  def step(i, x):
    def one(x):
      t = jnp.full((b,), times[i])
      x0 = consistency_x0(model, mem, x, t, text)
      return flow.add_noise(x0, jax.random.normal(jax.random.fold_in(r_steps, i), x.shape),
                            jnp.full((b,), times[i + 1]))
    return jax.lax.cond(i < s, one, lambda x: x, x)

  x = jax.lax.stop_gradient(jax.lax.fori_loop(0, steps - 1, step, x))
  return x, jnp.full((b,), times[s])


def dmd_gradient(x_hat, real_x0, fake_x0):
  """(fake - real) / mean |x̂ - real| per sample, the DMD paper's normalised gradient."""
  norm = jnp.mean(jnp.abs(x_hat - real_x0), axis=tuple(range(1, x_hat.ndim)), keepdims=True)
  return jnp.nan_to_num((fake_x0 - real_x0) / jnp.maximum(norm, 1e-6))


def dmd_loss(x_hat, grad):
  """0.5 ||x̂ - stop_grad(x̂ - g)||² (mean): its gradient at x̂ is g / numel."""
  return 0.5 * jnp.mean((x_hat - jax.lax.stop_gradient(x_hat - grad)) ** 2)


def losses(params, critic, graphdef, ctx, rng, cfg, aux, *, store=None, generator=True):
  """(critic loss + generator loss, metrics) at the target turn of `ctx` (from `history`).
  With generator=False the real score is not read and the generator loss is 0."""
  models = _models(params, critic, graphdef, aux, cfg)
  k, mems, (_, x_gt, tokens, _, _), _ = ctx
  text = {r: encode(m, tokens, store) for r, m in models.items()}
  r_s, r_sim, r_noise, r_tc, r_c, r_t, r_z = (jax.random.fold_in(rng, 10 + i) for i in range(7))
  s = jax.random.randint(r_s, (), 0, cfg.dmd.student_steps)
  if cfg.dmd.objective == "regression":
    t_s = jnp.full((x_gt.shape[0],), flow.consistency_times(cfg.dmd.student_steps, cfg.flow.shift)[s])
    x_s = flow.add_noise(x_gt, jax.random.normal(r_noise, x_gt.shape), t_s)
  else:
    x_s, t_s = backward_simulation(models["generator"], mems["generator"], text["generator"], r_sim, s, cfg)
  gen = models["generator"]
  x_hat = consistency_x0(gen, mems["generator"], x_s, t_s, text["generator"])
  metrics = {"target_turn": k + 1.0, "generator_step_index": s.astype(jnp.float32)}
  if cfg.dmd.objective == "regression":
    loss = jnp.mean((x_hat - x_gt) ** 2)
    return loss, {**metrics, "loss": loss, "generator_loss": loss}
  b, x_fixed = x_hat.shape[0], jax.lax.stop_gradient(x_hat)
  t_c, eps = score_time(r_tc, b, cfg), jax.random.normal(r_c, x_hat.shape)
  v = turn_velocity(models["critic"], mems["critic"], flow.add_noise(x_fixed, eps, t_c), t_c, text["critic"])[0]
  critic_loss = jnp.mean((v - flow.velocity_target(x_fixed, eps)) ** 2)
  metrics.update(critic_loss=critic_loss, generator_loss=jnp.zeros(()), dmd_gradient=jnp.zeros(()))
  if generator:
    t = score_time(r_t, b, cfg)
    x_t = flow.add_noise(x_fixed, jax.random.normal(r_z, x_hat.shape), t)
    empty = encode(models["real"], ctx[3], store)
    v_c, v_u = guided_velocity(models["real"], mems["real"], x_t, t, text["real"], empty)
    real_x0 = flow.x0_from_velocity(x_t, v_u + cfg.dmd.guidance * (v_c - v_u), t)
    fake_x0 = consistency_x0(models["critic"], mems["critic"], x_t, t, text["critic"])
    grad = jax.lax.stop_gradient(dmd_gradient(x_fixed, real_x0, fake_x0))
    metrics.update(generator_loss=dmd_loss(x_hat, grad), dmd_gradient=jnp.mean(jnp.abs(grad)))
  loss = critic_loss + metrics["generator_loss"]
  return loss, {**metrics, "loss": loss}


def update(state, batch, rng, cfg, graphdef, tx, *, store=None):
  """One step of both players -> (params, opt_state, aux), metrics (see the module docstring)."""
  params, aux = state["params"], state["aux"]
  ctx = history(params, graphdef, batch, rng, cfg, aux, store=store)
  step_gen = lambda g: apply_gradients(tx, g, state["opt_state"], params)
  if cfg.dmd.objective == "regression":
    (_, metrics), g_p = jax.value_and_grad(losses, has_aux=True)(
        params, aux["critic"], graphdef, ctx, rng, cfg, aux, store=store)
    new_params, opt_state = step_gen(g_p)
    metrics["grad_norm"] = optax.tree.norm(g_p)
    return {"params": new_params, "opt_state": opt_state,
            "aux": _moved_ema(aux, new_params, True, cfg)}, metrics

  def both(_):
    (_, m), (g_p, g_c) = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)(
        params, aux["critic"], graphdef, ctx, rng, cfg, aux, store=store)
    return (*step_gen(g_p), g_c, {**m, "generator_grad_norm": optax.tree.norm(g_p)})

  def critic_only(_):
    (_, m), g_c = jax.value_and_grad(losses, argnums=1, has_aux=True)(
        params, aux["critic"], graphdef, ctx, rng, cfg, aux, store=store, generator=False)
    return params, state["opt_state"], g_c, {**m, "generator_grad_norm": jnp.zeros(())}

  is_gen = generator_step(state["step"], cfg)
  new_params, opt_state, g_c, metrics = jax.lax.cond(is_gen, both, critic_only, None)
  critic, critic_opt = apply_gradients(critic_optimizer(cfg), g_c, aux["critic_opt"], aux["critic"])
  metrics["critic_grad_norm"] = optax.tree.norm(g_c)
  metrics["grad_norm"] = jnp.sqrt(metrics["critic_grad_norm"] ** 2 + metrics["generator_grad_norm"] ** 2)
  metrics["generator_step"] = is_gen.astype(jnp.float32)
  aux = _moved_ema({**aux, "critic": critic, "critic_opt": critic_opt}, new_params, is_gen, cfg)
  return {"params": new_params, "opt_state": opt_state, "aux": aux}, metrics

