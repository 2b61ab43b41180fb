"""Per-turn primitives shared by causal training, distillation and inference.

A turn is denoised attending to the AnchorMemory of the turns before it; once it is clean it is
run once more at t = 0 and its keys/values are written into the memory (as Self Forcing does), so
what later turns see is exactly what inference will give them.

Instructions enter as `Text`: the text encoder's (embeddings [b,1,l,e], mask [b,1,l]) of one
turn, made once per turn by `encode` and reused by every sampler step and the memory write.

Letters: b batch, H/W latent grid, C latent channels, l instruction length, e text width.
"""
import jax
import jax.numpy as jnp

from anchoredit_jax import flow
from anchoredit_jax.data.tokenize import tokenize_for


def empty_tokens(model_cfg):
  """The empty instruction [text_len] (the unconditional input of classifier-free guidance)."""
  return instruction_tokens(model_cfg, "")


def instruction_tokens(model_cfg, text: str):
  """One instruction's tokens [text_len]."""
  return jnp.asarray(tokenize_for(model_cfg, [text])[0])


def encode(model, tokens, store=None):
  """Instruction tokens int32 [b,l] -> Text (embeddings [b,1,l,e], mask [b,1,l]); with `store`
  (a frozen encoder's precomputed embeddings) looked up instead of encoded."""
  return model.encode_text(tokens[:, None], store)


def choose_text(pick, a, b):
  """Per row, Text a where pick [b] is true, else Text b (e.g. dropping the condition for CFG)."""
  return jax.tree.map(lambda u, w: jnp.where(pick.reshape((-1,) + (1,) * (u.ndim - 1)), u, w), a, b)


def turn_velocity(model, mem, x, t, text, *, copies: int = 1, with_gate: bool = False):
  """Velocity of one new turn: x [b,H,W,C] at time t [b], Text -> (v, kv [L,b,n,h,k]), and with
  `with_gate` the copy gate's keep logits [b,H,W] last. With copies = c, x/t/text hold c stacked
  groups of the memory's batch (e.g. conditional and unconditional inputs for CFG), all read
  against the same memory in one forward pass."""
  b = x.shape[0]
  pos = jnp.broadcast_to(mem.next_turn_pos(), (b, 1))
  tile = lambda a, axis: jnp.concatenate([a] * copies, axis=axis) if copies > 1 else a
  cond = tile(mem.cond(model.cfg.concat_anchor), 0)[:, None] if model.cfg.concat_prev else None
  k, v, p, valid = mem.context()
  ctx = (tile(k, 1), tile(v, 1), tile(p, 0), tile(valid, 0))
  out = model(x[:, None], t[:, None], text, pos, cond=cond, context=ctx, with_gate=with_gate)
  return (out[0][:, 0], out[1]) + ((out[2][:, 0],) if with_gate else ())


def concat_text(*texts):
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *texts)


def guided_velocity(model, mem, x, t, text, uncond):
  """(conditional, unconditional) velocities [b,H,W,C] in one batched forward pass (Texts)."""
  two = lambda a: jnp.concatenate([a, a], axis=0)
  v = turn_velocity(model, mem, two(x), two(t), concat_text(text, uncond), copies=2)[0]
  return v[:x.shape[0]], v[x.shape[0]:]


def write_turn(model, mem, x0, text, t=None):
  """Append a clean turn x0 [b,H,W,C] (its K/V at t = 0 under Text, no gradient) to the memory.
  Training may write a lightly noised turn instead, at its time t [b] (context noise)."""
  t = jnp.zeros((x0.shape[0],)) if t is None else t
  _, kv = turn_velocity(model, mem, x0, t, text)
  return mem.append(jax.lax.stop_gradient(kv), jax.lax.stop_gradient(x0))


def generate_turn(model, mem, text, uncond, rng, *, steps, guidance, shift, sign=1.0):
  """Sample a turn from noise with Euler + CFG, conditioned on the memory -> x0 [b,H,W,C].
  `sign` -1 negates the noise (antithetic draws)."""
  shape = mem.last_latent.shape

  def velocity_fn(x, t, guided):
    tb = jnp.full((x.shape[0],), t)
    if not guided:
      return turn_velocity(model, mem, x, tb, text)[0]
    return guided_velocity(model, mem, x, tb, text, uncond)

  return flow.euler_sample(velocity_fn, sign * jax.random.normal(rng, shape), steps=steps, shift=shift,
                           guidance=guidance)


def generate_turn_fast(model, mem, text, rng, *, steps, shift, sign=1.0):
  """Sample a turn with the distilled consistency student (no CFG: guidance is distilled in);
  `sign` -1 negates every noise draw (antithetic draws)."""
  shape = mem.last_latent.shape
  r_init, r_steps = jax.random.split(rng)

  def x0_fn(x, t):
    tb = jnp.full((x.shape[0],), t)
    return flow.x0_from_velocity(x, turn_velocity(model, mem, x, tb, text)[0], tb)

  return flow.consistency_sample(x0_fn, sign * jax.random.normal(r_init, shape), r_steps, steps=steps,
                                 shift=shift, sign=sign)
