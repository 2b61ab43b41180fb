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
import numpy as np
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.editing import choose_text, encode, generate_turn, turn_velocity, write_turn
from anchoredit_jax.eval import metrics
from anchoredit_jax.models.model import init_memory
from anchoredit_jax.stages.pretrain import edit_weighted_loss, empty_tokens


def memory_window(cfg, turns: int) -> int:
  """`full_cache` keeps every turn; otherwise the configured window."""
  return turns + 1 if cfg.causal.full_cache else cfg.causal.window


def rollout_inputs(model, cfg, batch):
  """Encode a sequence -> (source latent [b,H,W,C], empty tokens [b,l], empty memory, per-turn
  scan inputs (turn index, ground truth, tokens, edit mask), each with turns first)."""
  mcfg = model.cfg
  lat = model.autoencoder.encode(batch["images"])  # [b,K+1,H,W,C]
  b, K = lat.shape[0], lat.shape[1] - 1
  empty = jnp.broadcast_to(empty_tokens(mcfg), (b, mcfg.text_len))
  mem = init_memory(mcfg, b, batch["images"].shape[2], memory_window(cfg, K), use_anchor=cfg.causal.anchor)
  swap = lambda a: jnp.swapaxes(a, 0, 1)
  xs = (jnp.arange(1, K + 1), swap(lat[:, 1:]), swap(batch["tokens"]), swap(batch["edit_masks"]))
  return lat[:, 0], empty, mem, xs


def rollout_context(c, x_gt, generate, rng):
  """The turn written into the memory: the model's own sample (`generate()`, no gradient), or,
  with probability c.p_teacher per sequence or always without self-rollout, the ground truth."""
  if not c.self_rollout:
    return x_gt
  x_gen = jax.lax.stop_gradient(generate())
  teacher = jax.random.bernoulli(rng, c.p_teacher, (x_gt.shape[0], 1, 1, 1))
  return jnp.where(teacher, x_gt, x_gen)


def run_turns(body, carry, xs, use_scan=True):
  """lax.scan(body, carry, xs)'s per-turn outputs, or the same as a Python loop."""
  if use_scan:
    return jax.lax.scan(body, carry, xs)[1]
  outs = []
  for k in range(xs[0].shape[0]):
    carry, out = body(carry, jax.tree.map(lambda a: a[k], xs))
    outs.append(out)
  return jax.tree.map(lambda *o: jnp.stack(o), *outs)


def rollout_losses(params, graphdef, batch, rng, cfg, *, use_scan=True):
  """Per-turn flow losses [K] of one self-rollout. batch: images uint8 [b,K+1,R,R,3],
  tokens [b,K,l], edit_masks [b,K,R,R]. use_scan=False runs the same body as a Python loop."""
  model = nnx.merge(graphdef, params)
  c = cfg.causal
  src, empty, mem, xs = rollout_inputs(model, cfg, batch)
  empty = encode(model, empty)
  mem = write_turn(model, mem, src, empty)

  def body(mem, xs):
    k, x_gt, tokens, mask = xs
    r = jax.random.fold_in(rng, k)
    r_gen, r_teach, r_t, r_noise, r_drop = (jax.random.fold_in(r, i) for i in range(5))
    text = encode(model, tokens)
    x_ctx = rollout_context(c, x_gt, lambda: generate_turn(
        model, mem, text, empty, r_gen, steps=c.rollout_steps, guidance=c.rollout_guidance,
        shift=cfg.flow.shift), r_teach)
    b = x_gt.shape[0]
    t = flow.sample_time(r_t, (b,), mean=cfg.flow.t_mean, std=cfg.flow.t_std, shift=cfg.flow.shift)
    noise = jax.random.normal(r_noise, x_gt.shape)
    drop = jax.random.bernoulli(r_drop, cfg.flow.p_uncond, (b,))
    v, _ = turn_velocity(model, mem, flow.add_noise(x_gt, noise, t), t, choose_text(drop, empty, text))
    loss, _ = edit_weighted_loss(v, x_gt, noise, mask, cfg.flow.edit_weight)
    return write_turn(model, mem, x_ctx, text), loss

  return run_turns(body, mem, xs, use_scan)


def loss_fn(params, graphdef, batch, rng, cfg):
  losses = rollout_losses(params, graphdef, batch, rng, cfg)
  loss = jnp.mean(losses)
  return loss, {"loss": loss, "loss_first_turn": losses[0], "loss_last_turn": losses[-1]}


def evaluate(params, graphdef, cfg, seqs, rng):
  """Held-out multi-turn sessions, each turn generated from the model's own earlier turns (the
  stage-3 student with its few-step sampler, a stage-2 model with the Euler-CFG sampler of
  cfg.eval). seqs: images uint8 [N,K+1,R,R,3], tokens [N,K,l], edit_masks and identity_masks
  [N,K,R,R]. Returns means over sequences and turns, and per-turn success / identity PSNR (pixels
  never edited since the source, against the source)."""
  from anchoredit_jax import inference  # deferred: inference imports this package's stages
  sampler = inference.default_sampler(cfg, teacher_steps=cfg.eval.steps)
  K, rows = seqs["tokens"].shape[1], []
  for i in range(0, len(seqs["images"]), cfg.eval.batch_size):
    sl = slice(i, i + cfg.eval.batch_size)
    imgs = seqs["images"][sl]
    mem = init_memory(cfg.model, len(imgs), imgs.shape[2], memory_window(cfg, K), use_anchor=cfg.causal.anchor)
    mem = inference.start_memory(params, graphdef, mem, jnp.asarray(imgs[:, 0]))
    src = jnp.asarray(imgs[:, 0], jnp.float32) / 255.0
    per_turn = []
    for k in range(K):
      pred, mem = inference.edit_turn(params, graphdef, mem, jnp.asarray(seqs["tokens"][sl, k]),
                                      jax.random.fold_in(rng, i * K + k), sampler=sampler)
      target = jnp.asarray(imgs[:, k + 1], jnp.float32) / 255.0
      m = metrics.turn_metrics(pred, target, src, jnp.asarray(seqs["edit_masks"][sl, k]),
                               jnp.asarray(seqs["identity_masks"][sl, k]))
      per_turn.append(jax.device_get(m))
    rows.append({key: np.stack([t[key] for t in per_turn], 1) for key in per_turn[0]})  # [b,K]
  m = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
  result = {key: float(v.mean()) for key, v in m.items()}
  for k in range(K):
    result[f"success_turn{k + 1}"] = float(m["success"][:, k].mean())
    result[f"identity_psnr_turn{k + 1}"] = float(m["identity_psnr"][:, k].mean())
  return result
