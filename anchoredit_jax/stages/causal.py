"""Stage 2: causal AR-forcing fine-tuning with self-rollout.

A training sequence is the source and K edits. The source is written into the AnchorMemory
first; then one `lax.scan` runs over the edit turns with the memory as its carry. At each turn
the model
  1. generates the turn from noise with a few-step sampler, without gradient (with probability
     `p_teacher` per sequence the ground-truth turn is used instead: teacher forcing);
  2. takes the flow-matching loss on the *ground-truth* turn at a sampled noise level,
     conditioned on the memory built from its own earlier outputs;
  3. writes the turn it generated into the memory (no gradient).
So training sees the imperfect context inference will see (exposure bias), and gradients never
flow into earlier turns. Rollouts are longer than the memory window, so the position
re-indexing of AnchorMemory is trained exactly as it is used.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.editing import generate_turn, turn_velocity, write_turn
from anchoredit_jax.models.model import init_memory
from anchoredit_jax.stages.pretrain import edit_weighted_loss, empty_tokens


def memory_window(cfg, turns: int) -> int:
  """`full_cache` keeps every turn; otherwise the configured window."""
  return turns + 1 if cfg.causal.full_cache else cfg.causal.window


def rollout_losses(params, graphdef, batch, rng, cfg, *, use_scan=True):
  """Per-turn flow losses [K] of one self-rollout. batch: images uint8 [b,K+1,R,R,3],
  tokens [b,K,l], edit_masks [b,K,R,R]. use_scan=False runs the same body as a Python loop."""
  model = nnx.merge(graphdef, params)
  c, mcfg = cfg.causal, model.cfg
  lat = model.autoencoder.encode(batch["images"])  # [b,K+1,H,W,C]
  b, K = lat.shape[0], lat.shape[1] - 1
  empty = jnp.broadcast_to(empty_tokens(mcfg.text_len), (b, mcfg.text_len))
  mem = init_memory(mcfg, b, batch["images"].shape[2], memory_window(cfg, K), use_anchor=c.anchor)
  mem = write_turn(model, mem, lat[:, 0], empty)

  def body(mem, xs):
    k, x_gt, tokens, mask = xs
    r = jax.random.fold_in(rng, k)
    r_gen, r_teach, r_t, r_noise, r_drop = (jax.random.fold_in(r, i) for i in range(5))
    if c.self_rollout:
      x_gen = jax.lax.stop_gradient(generate_turn(
          model, mem, tokens, empty, r_gen, steps=c.rollout_steps, guidance=c.rollout_guidance,
          shift=cfg.flow.shift))
      teacher = jax.random.bernoulli(r_teach, c.p_teacher, (b, 1, 1, 1))
      x_ctx = jnp.where(teacher, x_gt, x_gen)
    else:
      x_ctx = x_gt
    t = flow.sample_time(r_t, (b,), mean=cfg.flow.t_mean, std=cfg.flow.t_std, shift=cfg.flow.shift)
    noise = jax.random.normal(r_noise, x_gt.shape)
    drop = jax.random.bernoulli(r_drop, cfg.flow.p_uncond, (b, 1))
    v, _ = turn_velocity(model, mem, flow.add_noise(x_gt, noise, t), t, jnp.where(drop, empty, tokens))
    loss, _ = edit_weighted_loss(v, x_gt, noise, mask, cfg.flow.edit_weight)
    return write_turn(model, mem, x_ctx, tokens), loss

  swap = lambda a: jnp.swapaxes(a, 0, 1)
  xs = (jnp.arange(1, K + 1), swap(lat[:, 1:]), swap(batch["tokens"]), swap(batch["edit_masks"]))
  if use_scan:
    return jax.lax.scan(body, mem, xs)[1]
  losses = []
  for k in range(K):
    mem, loss = body(mem, jax.tree.map(lambda a: a[k], xs))
    losses.append(loss)
  return jnp.stack(losses)


def loss_fn(params, graphdef, batch, rng, cfg):
  losses = rollout_losses(params, graphdef, batch, rng, cfg)
  loss = jnp.mean(losses)
  return loss, {"loss": loss, "loss_first_turn": losses[0], "loss_last_turn": losses[-1]}
