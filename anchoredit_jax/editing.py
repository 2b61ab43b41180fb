"""Per-turn primitives shared by causal training, distillation and inference.

A turn is denoised attending to the AnchorMemory of the turns before it; once it is clean it is
run once more at t = 0 and its keys/values are written into the memory (as Self Forcing does), so
what later turns see is exactly what inference will give them.

Letters: b batch, H/W latent grid, C latent channels, l instruction length.
"""
import jax
import jax.numpy as jnp

from anchoredit_jax import flow


def turn_velocity(model, mem, x, t, tokens, *, copies: int = 1):
  """Velocity of one new turn: x [b,H,W,C] at time t [b], tokens [b,l] -> (v, kv [L,b,n,h,k]).
  With copies = c, x/t/tokens hold c stacked groups of the memory's batch (e.g. conditional and
  unconditional inputs for CFG), all read against the same memory in one forward pass."""
  b = x.shape[0]
  pos = jnp.broadcast_to(mem.next_turn_pos(), (b, 1))
  tile = lambda a, axis: jnp.concatenate([a] * copies, axis=axis) if copies > 1 else a
  cond = tile(mem.cond(), 0)[:, None] if model.cfg.concat_prev else None
  k, v, p, valid = mem.context()
  ctx = (tile(k, 1), tile(v, 1), tile(p, 0), tile(valid, 0))
  v, kv = model(x[:, None], t[:, None], tokens[:, None], pos, cond=cond, context=ctx)
  return v[:, 0], kv


def guided_velocity(model, mem, x, t, tokens, uncond):
  """(conditional, unconditional) velocities [b,H,W,C] in one batched forward pass."""
  two = lambda a: jnp.concatenate([a, a], axis=0)
  v = turn_velocity(model, mem, two(x), two(t), jnp.concatenate([tokens, uncond], 0), copies=2)[0]
  return v[:x.shape[0]], v[x.shape[0]:]


def write_turn(model, mem, x0, tokens):
  """Append a clean turn x0 [b,H,W,C] (its K/V at t = 0, no gradient) to the memory."""
  _, kv = turn_velocity(model, mem, x0, jnp.zeros((x0.shape[0],)), tokens)
  return mem.append(jax.lax.stop_gradient(kv), jax.lax.stop_gradient(x0))


def generate_turn(model, mem, tokens, uncond, rng, *, steps, guidance, shift):
  """Sample a turn from noise with Euler + CFG, conditioned on the memory -> x0 [b,H,W,C]."""
  shape = (tokens.shape[0],) + mem.last_latent.shape[1:]

  def velocity_fn(x, t, guided):
    tb = jnp.full((x.shape[0],), t)
    if not guided:
      return turn_velocity(model, mem, x, tb, tokens)[0]
    return guided_velocity(model, mem, x, tb, tokens, uncond)

  return flow.euler_sample(velocity_fn, jax.random.normal(rng, shape), steps=steps, shift=shift,
                           guidance=guidance)


def generate_turn_fast(model, mem, tokens, rng, *, steps, shift):
  """Sample a turn with the distilled consistency student (no CFG: guidance is distilled in)."""
  shape = (tokens.shape[0],) + mem.last_latent.shape[1:]
  r_init, r_steps = jax.random.split(rng)

  def x0_fn(x, t):
    tb = jnp.full((x.shape[0],), t)
    return flow.x0_from_velocity(x, turn_velocity(model, mem, x, tb, tokens)[0], tb)

  return flow.consistency_sample(x0_fn, jax.random.normal(r_init, shape), r_steps, steps=steps,
                                 shift=shift)
