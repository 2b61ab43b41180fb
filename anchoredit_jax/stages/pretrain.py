"""Stage 1: identity-preserving single-turn pretraining.

Given (source, instruction, target), the target is learned with rectified flow while the source
is held clean: it enters as a clean context turn (t = 0) the target attends to
(`source_context`), channel-concatenated to the noisy target (`concat_prev`), or both. The loss
is on the target turn only, with the pixels the edit changes weighted up by `edit_weight`
(most of an image is copied, and an unweighted loss learns to copy long before it learns to
edit; the mask is ground truth available at training time only). Instructions are dropped with
probability `p_uncond`, so the same model also predicts the unconditional velocity that
classifier-free guidance needs. With probability `p_identity` an example becomes an identity
mapping instead: the instruction `identity_text` and the source itself as the target, so the
model learns that saying "no change" changes nothing (kept apart from the empty instruction CFG
drops to, whose target stays the edit).
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from anchoredit_jax import flow
from anchoredit_jax.editing import empty_tokens, encode, instruction_tokens
from anchoredit_jax.models.model import prev_cond


def velocity(model, src, x_t, t, text, empty=None, with_gate=False):
  """Velocity of the target turn. src/x_t [b,H,W,C] latents, t [b], Texts of the instruction
  and (needed with model.source_context, which writes the source under it) of the empty one
  (editing.encode) -> [b,H,W,C] (and the copy gate's keep logits [b,H,W] with `with_gate`)."""
  mcfg, b = model.cfg, x_t.shape[0]
  pick = lambda out, i: (out[0][:, i], out[2][:, i]) if with_gate else out[0][:, i]
  if mcfg.source_context:
    x = jnp.stack([src, x_t], axis=1)
    ts = jnp.stack([jnp.zeros_like(t), t], axis=1)
    texts = jax.tree.map(lambda e, a: jnp.concatenate([e, a], axis=1), empty, text)
    pos = jnp.broadcast_to(jnp.arange(2), (b, 2))
    cond = prev_cond(jnp.stack([src, src], axis=1), mcfg.concat_anchor) if mcfg.concat_prev else None
    return pick(model(x, ts, texts, pos, cond=cond, with_gate=with_gate), 1)
  cond = prev_cond(jnp.stack([src, src], axis=1), mcfg.concat_anchor)[:, 1:] if mcfg.concat_prev else None
  return pick(model(x_t[:, None], t[:, None], text, jnp.ones((b, 1), jnp.int32), cond=cond,
                    with_gate=with_gate), 0)


def turn_texts(model, tokens, store=None):
  """Texts of instruction tokens [b,l] and, where model.source_context needs it, of the empty
  instruction (else None)."""
  empty = jnp.broadcast_to(empty_tokens(model.cfg), tokens.shape)
  return encode(model, tokens, store), encode(model, empty, store) if model.cfg.source_context else None


def loss_fn(params, graphdef, batch, rng, cfg, *, store=None):
  """Flow-matching loss on the target turn. batch: images uint8 [b,2,R,R,3], tokens [b,1,l].
  `store`: a frozen text encoder's precomputed embeddings, or None (the encoder runs)."""
  model = nnx.merge(graphdef, params)
  f, gate = cfg.flow, bool(cfg.model.get("copy_gate"))
  lat = model.autoencoder.encode(batch["images"])  # [b,2,H,W,C]
  src, x0 = lat[:, 0], lat[:, 1]
  b = x0.shape[0]
  r_t, r_noise, r_drop, r_id = (jax.random.fold_in(rng, i) for i in range(4))
  ident = jax.random.bernoulli(r_id, f.get("p_identity", 0.0), (b,))
  x0 = jnp.where(ident[:, None, None, None], src, x0)
  mask = batch["edit_masks"][:, 0] & ~ident[:, None, None]
  t = flow.sample_time(r_t, (b,), mean=f.t_mean, std=f.t_std, shift=f.shift)
  noise = jax.random.normal(r_noise, x0.shape)
  drop = jax.random.bernoulli(r_drop, f.p_uncond, (b,)) & ~ident
  tokens = jnp.where(drop[:, None], empty_tokens(cfg.model), batch["tokens"][:, 0])
  if f.get("p_identity", 0.0) > 0:
    tokens = jnp.where(ident[:, None], instruction_tokens(cfg.model, f.identity_text), tokens)
  text, empty = turn_texts(model, tokens, store)
  out = velocity(model, src, flow.add_noise(x0, noise, t), t, text, empty, with_gate=gate)
  loss, mse = edit_weighted_loss(out[0] if gate else out, x0, noise, mask, f.edit_weight)
  aux = {"mse": mse}
  if gate:
    aux["gate_loss"] = gate_loss(out[1], mask)
    loss = loss + f.gate_weight * aux["gate_loss"]
  return loss, {"loss": loss, **aux}


def gate_loss(keep_logit, changed):
  """Cross-entropy of the copy gate's keep logits [b,H,W] against "this latent pixel is as in
  what the gate copies" (an exact mask [b,R,R] of the changed pixels, on the latent grid)."""
  keep = 1.0 - edit_region(changed, keep_logit.shape[1:3])
  return jnp.mean(optax.sigmoid_binary_cross_entropy(keep_logit, keep))


def edit_weighted_loss(v, x0, noise, edit_mask, edit_weight):
  """Velocity MSE with the edited pixels weighted (1 + edit_weight). v/x0/noise [b,H,W,C],
  edit_mask [b,R,R] -> (weighted loss, plain mse)."""
  return weighted_mse(v, flow.velocity_target(x0, noise), edit_mask, edit_weight)


def weighted_mse(pred, target, edit_mask, edit_weight):
  """MSE over [b,H,W,C] latents with the edited region weighted (1 + edit_weight)."""
  err = jnp.square(pred - target)
  weight = 1.0 + edit_weight * edit_region(edit_mask, target.shape[1:3])
  return jnp.mean(err * weight[..., None]) / jnp.mean(weight), jnp.mean(err)


def edit_region(mask, latent_hw):
  """Pixel edit mask [b,H,W] -> float [b,h,w] on the latent grid of size latent_hw = (h, w)
  (1 where any pixel changed)."""
  (b, H, W), (h, w) = mask.shape, latent_hw
  return mask.reshape(b, h, H // h, w, W // w).any(axis=(2, 4)).astype(jnp.float32)
