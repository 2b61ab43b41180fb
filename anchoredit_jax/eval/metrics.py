"""Editing metrics against exact ShapesEdit ground truth. Images are float in [0, 1], [b,H,W,3].

Definitions (documented in the README):
  * edit region: the turn's edit mask, every pixel whose ground truth changed (by >= 1/255);
  * edit success: mean absolute error over the edit region, averaged over channels, < SUCCESS_MAE;
  * preserved PSNR: PSNR over the pixels outside the edit region;
  * edit PSNR: PSNR over the edit region;
  * SSIM: Gaussian-window SSIM (11 taps, sigma 1.5, K1 0.01, K2 0.03) averaged over the valid
    interior and the channels; equals scikit-image's structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1).
The edit region is deliberately not dilated: on 32x32 held-out pairs a one-pixel dilation let
"return the source unchanged" pass 22% of edits (60% of resizes, whose changed ring is thin),
against 0.2% on the exact mask.
"""
import jax
import jax.numpy as jnp

SUCCESS_MAE = 0.1


def dilate(mask, radius: int = 1):
  """Binary dilation of [b,H,W] masks by a (2r+1)^2 square."""
  m = mask.astype(jnp.float32)[..., None]
  size = 2 * radius + 1
  out = jax.lax.reduce_window(m, 0.0, jax.lax.max, (1, size, size, 1), (1, 1, 1, 1), "SAME")
  return out[..., 0] > 0


def masked_mse(a, b, mask):
  w = mask.astype(jnp.float32)[..., None]
  return jnp.sum(jnp.square(a - b) * w, axis=(1, 2, 3)) / jnp.maximum(3.0 * jnp.sum(w, axis=(1, 2, 3)), 1.0)


def masked_mae(a, b, mask):
  w = mask.astype(jnp.float32)[..., None]
  return jnp.sum(jnp.abs(a - b) * w, axis=(1, 2, 3)) / jnp.maximum(3.0 * jnp.sum(w, axis=(1, 2, 3)), 1.0)


def psnr_from_mse(mse, cap: float = 60.0):
  """PSNR in dB for images in [0,1], capped (a perfect region would be +inf)."""
  return jnp.minimum(-10.0 * jnp.log10(jnp.maximum(mse, 1e-12)), cap)


def _gaussian_taps(sigma: float = 1.5, radius: int = 5):
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / w.sum()


def _blur(x):
  """Separable Gaussian over H and W of [b,H,W,C], valid region only -> [b,H-10,W-10,C]."""
  w = _gaussian_taps()
  n = w.shape[0]
  rows = sum(w[i] * x[:, i:x.shape[1] - n + 1 + i] for i in range(n))
  return sum(w[i] * rows[:, :, i:x.shape[2] - n + 1 + i] for i in range(n))


def ssim(a, b):
  """[b,H,W,C] images in [0,1] (H, W >= 11) -> [b] mean SSIM."""
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = _blur(a), _blur(b)
  var_a = _blur(a * a) - mu_a ** 2
  var_b = _blur(b * b) - mu_b ** 2
  cov = _blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))


@jax.jit
def edit_metrics(pred, target, edit_mask):
  """pred/target [b,H,W,3] in [0,1]; edit_mask [b,H,W] -> dict of per-example [b] metrics."""
  region = edit_mask
  mae = masked_mae(pred, target, region)
  return dict(
      success=(mae < SUCCESS_MAE).astype(jnp.float32),
      edit_mae=mae,
      edit_psnr=psnr_from_mse(masked_mse(pred, target, region)),
      preserved_psnr=psnr_from_mse(masked_mse(pred, target, ~region)),
      psnr=psnr_from_mse(jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))),
      # SSIM's 11x11 window needs at least 11x11 pixels (NaN below: hand-made 8x8 test images)
      ssim=ssim(pred, target) if min(pred.shape[1:3]) >= 11 else jnp.full(pred.shape[:1], jnp.nan))


@jax.jit
def turn_metrics(pred, target, source, edit_mask, identity_mask):
  """One turn of a multi-turn session: edit_metrics plus identity PSNR, the PSNR against the
  source image over identity_mask [b,H,W] (pixels no turn has edited so far): the drift measure."""
  return dict(edit_metrics(pred, target, edit_mask),
              identity_psnr=psnr_from_mse(masked_mse(pred, source, identity_mask)))

