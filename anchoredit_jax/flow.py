"""Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0, t = 1 is pure noise.

Timesteps are drawn logit-normal and warped by a shift (SD3 / Wan2.1 style) that spends more
training and sampling effort at high noise, where layout and edits are decided.
"""
import jax
import jax.numpy as jnp


def shift_time(t, shift: float):
  """Warp t in [0,1] towards 1 for shift > 1: t' = s t / (1 + (s - 1) t)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng, shape, *, mean=0.0, std=1.0, shift=1.0):
  """Shifted logit-normal timesteps in (0, 1)."""
  return shift_time(jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape)), shift)


def add_noise(x0, noise, t):
  """x0, noise [b, ...]; t [b] -> x_t."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim))
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
  return noise - x0


def x0_from_velocity(x_t, v, t):
  t = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
  return x_t - t * v


def euler_times(steps: int, shift: float):
  """[steps + 1] times from 1 to 0, warped by `shift`."""
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def euler_sample(velocity_fn, noise, *, steps: int, shift: float, guidance: float = 1.0):
  """Integrate dx/dt = v from t=1 (noise) to t=0 in `steps` Euler steps with CFG.

  velocity_fn(x, t_scalar, guided) -> v; with guidance != 1 it is called with guided=True and
  must return (v_cond, v_uncond). Runs as one lax.fori_loop, so it compiles once for any step count.
  """
  times = euler_times(steps, shift)

  def step(i, x):
    t, t_next = times[i], times[i + 1]
    if guidance == 1.0:
      v = velocity_fn(x, t, False)
    else:
      v_c, v_u = velocity_fn(x, t, True)
      v = v_u + guidance * (v_c - v_u)
    return x + (t_next - t) * v

  return jax.lax.fori_loop(0, steps, step, noise)


def consistency_times(steps: int, shift: float):
  """[steps] start times of the few-step consistency sampler: 1, (steps-1)/steps, ..., 1/steps,
  warped by `shift` (4 steps: {1, .75, .5, .25} before the warp)."""
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1)[:-1], shift)


def consistency_sample(x0_fn, noise, rng, *, steps: int, shift: float, sign: float = 1.0):
  """Few-step sampling with a consistency model: predict x0 from the current noisy x, re-noise it
  to the next time with fresh noise (times `sign`), repeat; the last prediction is the result.
  x0_fn(x, t_scalar) -> x0. One lax.fori_loop."""
  times = jnp.append(consistency_times(steps, shift), 0.0)

  def step(i, carry):
    x, _ = carry
    x0 = x0_fn(x, times[i])
    eps = sign * jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    return add_noise(x0, eps, jnp.full(x.shape[:1], times[i + 1])), x0

  return jax.lax.fori_loop(0, steps, step, (noise, noise))[1]
