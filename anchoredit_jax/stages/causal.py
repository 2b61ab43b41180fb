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

Against drift (issue 17), each a switch in `cfg.causal`: every turn written into the memory, the
source included, may be degraded (`degrade`, the authors' history degradation) and lightly
noised (`context_noise`: written at a small sampled time; inference writes clean turns at 0); the
target may be this turn's ground-truth edit pasted onto the model's own previous turn
(`rollout_target="composite"`), so that after a failed rollout edit the loss does not ask for a
repair nobody instructed; later turns may weigh more (`turn_weight`).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from anchoredit_jax import degrade, flow
from anchoredit_jax.editing import choose_text, empty_tokens, encode, generate_turn, turn_velocity, write_turn
from anchoredit_jax.models.model import init_memory
from anchoredit_jax.stages.pretrain import edit_region, edit_weighted_loss, gate_loss

ROLLOUT_TARGETS = ("gt", "composite")


def memory_window(cfg, turns: int) -> int:
  """`full_cache` keeps every turn; otherwise the configured window."""
  return turns + 1 if cfg.causal.full_cache else cfg.causal.window


def rollout_inputs(model, cfg, batch):
  """Encode a sequence -> (source latent [b,H,W,C], empty tokens [b,l], empty memory, per-turn
  scan inputs (turn index, ground truth, tokens, edit mask, the copy gate's "changed" mask),
  each with turns first)."""
  mcfg = model.cfg
  lat = model.autoencoder.encode(batch["images"])  # [b,K+1,H,W,C]
  b, K = lat.shape[0], lat.shape[1] - 1
  empty = jnp.broadcast_to(empty_tokens(mcfg), (b, mcfg.text_len))
  mem = init_memory(mcfg, b, batch["images"].shape[2:4], memory_window(cfg, K), use_anchor=cfg.causal.anchor)
  swap = lambda a: jnp.swapaxes(a, 0, 1)
  xs = (jnp.arange(1, K + 1), swap(lat[:, 1:]), swap(batch["tokens"]), swap(batch["edit_masks"]),
        swap(gate_changed(mcfg, batch)))
  return lat[:, 0], empty, mem, xs


def gate_changed(model_cfg, batch):
  """Pixels [b,K,R,R] the copy gate must not keep: those this turn edits when it copies the
  previous turn, those any turn so far has edited when it copies the source (gate_from)."""
  if model_cfg.get("gate_from", "prev") == "anchor":
    return ~batch["identity_masks"]
  return batch["edit_masks"]


def rollout_context(c, x_gt, generate, rng):
  """The turn written into the memory: the model's own sample (`generate()`, no gradient), or,
  with probability c.p_teacher per sequence or always without self-rollout, the ground truth."""
  if not c.self_rollout:
    return x_gt
  x_gen = jax.lax.stop_gradient(generate())
  teacher = jax.random.bernoulli(rng, c.p_teacher, (x_gt.shape[0], 1, 1, 1))
  return jnp.where(teacher, x_gt, x_gen)


def training_context(rng, x, c, autoencoder, *, source=False):
  """What training writes into the memory for a clean turn x [b,H,W,C]: degraded and noised by
  the config (c = cfg.causal) -> (latent, its time t [b]); x and t = 0 with both switched off."""
  r_deg, r_noise = jax.random.split(rng)
  x = degrade.degrade(r_deg, x, c.degrade, autoencoder=autoencoder, source=source)
  return degrade.noise_context(r_noise, x, c.context_noise)


def turn_target(c, x_gt, prev, mask):
  """The clean turn the loss asks for: the ground truth, or ("composite") its edit region over
  the model's own previous turn prev [b,H,W,C] (equal to the ground truth after a correct turn)."""
  if c.rollout_target == "gt":
    return x_gt
  if c.rollout_target != "composite":
    raise ValueError(f"causal.rollout_target={c.rollout_target!r}; choose from {ROLLOUT_TARGETS}")
  return jnp.where(edit_region(mask, x_gt.shape[1:3])[..., None] > 0, x_gt, prev)


def turn_weighted(losses, alpha: float):
  """Mean of per-turn losses [K] with weights 1 + alpha (k-1)/(K-1) for turns k = 1..K."""
  K = losses.shape[0]
  w = 1.0 + alpha * jnp.arange(K) / max(K - 1, 1)
  return jnp.sum(w * losses) / jnp.sum(w)


def run_turns(body, carry, xs, use_scan=True):
  """lax.scan(body, carry, xs)'s per-turn outputs, or the same as a Python loop."""
  if use_scan:
    return jax.lax.scan(body, carry, xs)[1]
  outs = []
  for k in range(xs[0].shape[0]):
    carry, out = body(carry, jax.tree.map(lambda a: a[k], xs))
    outs.append(out)
  return jax.tree.map(lambda *o: jnp.stack(o), *outs)


def rollout_losses(params, graphdef, batch, rng, cfg, *, store=None, use_scan=True):
  """Per-turn flow losses [K] of one self-rollout. batch: images uint8 [b,K+1,R,R,3],
  tokens [b,K,l], edit_masks [b,K,R,R]; store: precomputed text embeddings or None.
  use_scan=False runs the same body as a Python loop."""
  model = nnx.merge(graphdef, params)
  c, gate = cfg.causal, bool(cfg.model.get("copy_gate"))
  src, empty, mem, xs = rollout_inputs(model, cfg, batch)
  empty = encode(model, empty, store)
  x_src, t_src = training_context(jax.random.fold_in(rng, 0), src, c, model.autoencoder, source=True)
  mem = write_turn(model, mem, x_src, empty, t_src)

  def body(carry, xs):
    mem, prev = carry  # prev: the clean turn last written (before degradation)
    k, x_gt, tokens, mask, changed = xs
    r = jax.random.fold_in(rng, k)
    r_gen, r_teach, r_t, r_noise, r_drop, r_ctx = (jax.random.fold_in(r, i) for i in range(6))
    text = encode(model, tokens, store)
    x_ctx = rollout_context(c, x_gt, lambda: generate_turn(
        model, mem, text, empty, r_gen, steps=c.rollout_steps, guidance=c.rollout_guidance,
        shift=cfg.flow.shift), r_teach)
    target = turn_target(c, x_gt, prev, mask)
    b = x_gt.shape[0]
    t = flow.sample_time(r_t, (b,), mean=cfg.flow.t_mean, std=cfg.flow.t_std, shift=cfg.flow.shift)
    noise = jax.random.normal(r_noise, x_gt.shape)
    drop = jax.random.bernoulli(r_drop, cfg.flow.p_uncond, (b,))
    out = turn_velocity(model, mem, flow.add_noise(target, noise, t), t, choose_text(drop, empty, text),
                        with_gate=gate)
    loss, _ = edit_weighted_loss(out[0], target, noise, mask, cfg.flow.edit_weight)
    if gate:
      loss = loss + cfg.flow.gate_weight * gate_loss(out[2], changed)
    x_mem, t_mem = training_context(r_ctx, x_ctx, c, model.autoencoder)
    return (write_turn(model, mem, x_mem, text, t_mem), x_ctx), loss

  return run_turns(body, (mem, src), xs, use_scan)


def loss_fn(params, graphdef, batch, rng, cfg, *, store=None):
  losses = rollout_losses(params, graphdef, batch, rng, cfg, store=store)
  loss = turn_weighted(losses, cfg.causal.turn_weight)
  return loss, {"loss": loss, "loss_first_turn": losses[0], "loss_last_turn": losses[-1]}
