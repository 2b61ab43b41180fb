"""History degradation: context turns made imperfect on purpose while training, so that the model
learns to edit on top of a history that carries its own errors instead of copying them forward.

Each context latent (the source too) gets a strength s ~ U[s_min, s_max] and, each with its own
probability, these corruptions in this order (defaults from the authors' stage-2 trainer; their
latents are the Wan VAE's, ours the pixel autoencoder's, both of order 1):
  roundtrip  the autoencoder's decode -> 8-bit quantisation -> half-resolution resample ->
             encode, mixed in with weight roundtrip_mix * s (never on the source)
  color      per-channel scale 1 +- color_scale * s and bias +- color_bias * s
  field      a smooth additive field: Gaussian noise on a (H/field_cells)^2 grid, bilinearly
             upsampled, amplitude field_amp * s
  pool       average pooling by 2 or 4 (nearest upsampled), mixed in with weight pool_mix * s
  laplace    multiplicative Laplace noise x * (1 + laplace * s * n)
  blur       a 3x3 Gaussian blur, sigma up to blur_sigma, mixed in with weight s
The loss target is never degraded: the model is asked for the clean turn from a dirty history.

Letters: b batch, H/W latent grid, C latent channels.
"""
import jax
import jax.numpy as jnp
import ml_collections

from anchoredit_jax import flow

KINDS = ("roundtrip", "color", "field", "pool", "laplace", "blur")


def default_config(enabled: bool = False) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=enabled, s_min=0.15, s_max=1.0,
      p_roundtrip=0.1, roundtrip_mix=0.4, p_color=0.2, color_scale=0.05, color_bias=0.03,
      p_field=0.2, field_amp=0.06, field_cells=16, p_pool=0.1, pool_mix=0.5,
      p_laplace=0.1, laplace=0.035, p_blur=0.1, blur_sigma=0.45))


def _rows(a, x):
  """A per-row value [b] broadcast against x [b,H,W,C]."""
  return a.reshape((-1,) + (1,) * (x.ndim - 1))


def _mix(x, y, w):
  return x + _rows(w, x) * (y - x)


def roundtrip(autoencoder, x):
  """decode -> uint8 -> half-resolution resample (linear down, linear up) -> encode."""
  img = jnp.round(autoencoder.decode(x) * 255.0) / 255.0   # [b,R,R,3] in [0,1]
  b, r, c = img.shape[0], img.shape[1], img.shape[-1]
  small = jax.image.resize(img, (b, r // 2, img.shape[2] // 2, c), "linear")
  return autoencoder.encode(jax.image.resize(small, img.shape, "linear"))


def smooth_field(rng, x, cells: int):
  """Gaussian noise on a coarse grid, upsampled to x's grid -> [b,H,W,C] of unit scale."""
  b, H, W, C = x.shape
  gh, gw = max(1, H // cells) + 1, max(1, W // cells) + 1
  return jax.image.resize(jax.random.normal(rng, (b, gh, gw, C)), x.shape, "linear")


def avg_pool(x, f: int):
  """Average over f x f blocks, upsampled back by repetition (H, W divisible by f)."""
  b, H, W, C = x.shape
  p = x.reshape(b, H // f, f, W // f, f, C).mean(axis=(2, 4), keepdims=True)
  return jnp.broadcast_to(p, (b, H // f, f, W // f, f, C)).reshape(x.shape)


def gaussian_blur3(x, sigma):
  """3x3 separable Gaussian blur with a per-row sigma [b], edges replicated."""
  w1 = jnp.exp(-0.5 / jnp.square(jnp.maximum(sigma, 1e-3)))      # weight of each neighbour
  w = jnp.stack([w1, jnp.ones_like(w1), w1], -1) / (1.0 + 2.0 * w1)[:, None]  # [b,3]
  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  H, W = x.shape[1:3]
  rows = sum(_rows(w[:, i], x) * pad[:, i:i + H] for i in range(3))               # [b,H,W+2,C]
  return sum(_rows(w[:, i], x) * rows[:, :, i:i + W] for i in range(3))


def degrade(rng, x, cfg, *, autoencoder=None, source=False):
  """A degraded copy of clean context latents x [b,H,W,C] (see the module docstring). With
  cfg.enabled false, x itself. `source` turns the round trip off (the user's image is exact)."""
  if not cfg.enabled:
    return x
  b, H, W, _ = x.shape
  r = {k: jax.random.fold_in(rng, i) for i, k in enumerate(("s",) + KINDS)}
  s = jax.random.uniform(r["s"], (b,), minval=cfg.s_min, maxval=cfg.s_max)
  draw = lambda kind, n: jax.random.split(r[kind], n)
  on = lambda key, p: jax.random.bernoulli(key, p, (b,)).astype(x.dtype)

  if autoencoder is not None and not source and cfg.p_roundtrip > 0:
    k_on, = draw("roundtrip", 1)
    x = _mix(x, roundtrip(autoencoder, x), on(k_on, cfg.p_roundtrip) * cfg.roundtrip_mix * s)
  k_on, k_scale, k_bias = draw("color", 3)
  sign = lambda k: jax.random.uniform(k, (b, 1, 1, x.shape[-1]), minval=-1.0, maxval=1.0)
  amount = _rows(on(k_on, cfg.p_color) * s, x)
  x = x * (1.0 + amount * cfg.color_scale * sign(k_scale)) + amount * cfg.color_bias * sign(k_bias)
  k_on, k_field = draw("field", 2)
  x = x + _rows(on(k_on, cfg.p_field) * cfg.field_amp * s, x) * smooth_field(k_field, x, cfg.field_cells)
  k_on, k_f = draw("pool", 2)
  if H % 4 == 0 and W % 4 == 0:
    by4 = jax.random.bernoulli(k_f, 0.5, (b,))
    pooled = jnp.where(_rows(by4, x), avg_pool(x, 4), avg_pool(x, 2))
  else:
    pooled = avg_pool(x, 2) if H % 2 == 0 and W % 2 == 0 else x
  x = _mix(x, pooled, on(k_on, cfg.p_pool) * cfg.pool_mix * s)
  k_on, k_n = draw("laplace", 2)
  x = x * (1.0 + _rows(on(k_on, cfg.p_laplace) * cfg.laplace * s, x) * jax.random.laplace(k_n, x.shape))
  k_on, k_sigma = draw("blur", 2)
  sigma = jax.random.uniform(k_sigma, (b,), minval=0.1, maxval=1.0) * cfg.blur_sigma
  return _mix(x, gaussian_blur3(x, sigma), on(k_on, cfg.p_blur) * s)


def noise_context(rng, x, max_t: float):
  """Context noise: x [b,H,W,C] noised to a per-row time t ~ U[0, max_t] -> (x_t, t [b]). The
  turn is then written into the memory at that time. max_t = 0 returns x clean at t = 0."""
  b = x.shape[0]
  if max_t <= 0:
    return x, jnp.zeros((b,), x.dtype)
  r_t, r_n = jax.random.split(rng)
  t = jax.random.uniform(r_t, (b,), minval=0.0, maxval=max_t)
  return flow.add_noise(x, jax.random.normal(r_n, x.shape), t), t
