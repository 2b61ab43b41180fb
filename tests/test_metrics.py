"""Metrics on hand-made cases with known answers."""
import jax.numpy as jnp
import numpy as np

from anchoredit_jax.eval import metrics


def _canvas():
  img = jnp.full((1, 8, 8, 3), 0.5)
  mask = jnp.zeros((1, 8, 8), bool).at[:, 2:4, 2:4].set(True)
  return img, mask


def test_identical_images_succeed_with_capped_psnr():
  img, mask = _canvas()
  m = metrics.edit_metrics(img, img, mask)
  assert float(m["success"][0]) == 1.0 and float(m["edit_mae"][0]) == 0.0
  assert float(m["preserved_psnr"][0]) == 60.0


def test_known_recolour_error():
  img, mask = _canvas()
  target = img.at[:, 2:4, 2:4].set(jnp.array([1.0, 0.0, 0.0]))
  m = metrics.edit_metrics(img, target, mask)  # copying the source misses the recolour
  np.testing.assert_allclose(m["edit_mae"], [(0.5 + 0.5 + 0.5) / 3], rtol=1e-6)
  assert float(m["success"][0]) == 0.0 and float(m["preserved_psnr"][0]) == 60.0
  near = target.at[:, 2:4, 2:4].add(-0.05)  # within tolerance
  assert float(metrics.edit_metrics(near, target, mask)["success"][0]) == 1.0


def test_known_shift_hurts_preserved_region():
  img, mask = _canvas()
  noisy = img.at[:, 6:, :].add(0.1)  # error outside the edit region only
  m = metrics.edit_metrics(noisy, img, mask)
  mse = (0.1 ** 2) * (2 * 8) / (64 - 4)
  np.testing.assert_allclose(m["preserved_psnr"], [-10 * np.log10(mse)], rtol=1e-5)
  assert float(m["success"][0]) == 1.0


def test_dilate():
  mask = jnp.zeros((1, 5, 5), bool).at[:, 2, 2].set(True)
  assert int(metrics.dilate(mask).sum()) == 9


def test_ssim_matches_scikit_image_and_orders_distortions():
  from skimage.metrics import structural_similarity
  rng = np.random.default_rng(0)
  a = rng.random((2, 32, 32, 3)).astype(np.float32)
  noisy = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  ours = np.asarray(metrics.ssim(jnp.asarray(a), jnp.asarray(noisy)))
  ref = [structural_similarity(a[i], noisy[i], channel_axis=-1, data_range=1.0,
                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
         for i in range(2)]
  np.testing.assert_allclose(ours, ref, rtol=1e-4)
  np.testing.assert_allclose(metrics.ssim(jnp.asarray(a), jnp.asarray(a)), 1.0, rtol=1e-5)
  worse = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  assert np.all(np.asarray(metrics.ssim(jnp.asarray(a), jnp.asarray(worse))) < ours)


def test_identity_psnr_counts_only_never_edited_pixels_against_the_source():
  src, edit = _canvas()
  identity = ~edit  # one turn in: everything but the edited square is still the source's
  pred = src.at[:, 2:4, 2:4].set(1.0)  # the edit itself does not count against identity
  m = metrics.turn_metrics(pred, pred, src, edit, identity)
  assert float(m["identity_psnr"][0]) == 60.0 and float(m["success"][0]) == 1.0
  drift = pred.at[:, 6:, :].add(0.1)  # 16 never-edited pixels drift by 0.1
  m = metrics.turn_metrics(drift, pred, src, edit, identity)
  np.testing.assert_allclose(m["identity_psnr"], [-10 * np.log10(0.01 * 16 / 60)], rtol=1e-5)
