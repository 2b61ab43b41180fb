"""Image <-> latent maps. Every autoencoder has `encode`, `decode`, `latent_shape(res)`.

`PixelAutoencoder` is the first implementation: pixels scaled to [-1, 1] and folded
space-to-depth by `factor` (no parameters). `WanVAE` (Wan2.1's causal 3D VAE, in `wan_vae.py`,
loaded with `load_wan_vae`) has the same interface plus `encode_video`/`decode_video` for clips.
"""
import jax.numpy as jnp
from einops import rearrange

from anchoredit_jax.models.layers import downsampled
from anchoredit_jax.models.wan_vae import WanVAE, WanVAEConfig, load_wan_vae  # noqa: F401  (re-export)


class PixelAutoencoder:
  """uint8/float images [..., H, W, 3] <-> latents [..., H/f, W/f, 3 f^2] in [-1, 1]."""

  def __init__(self, factor: int = 1):
    self.factor = factor
    self.channels = 3 * factor * factor

  def latent_shape(self, res) -> tuple[int, int, int]:
    """(h, w, channels) of the latent of a res x res or (H, W) image."""
    return downsampled(res, self.factor, "the autoencoder") + (self.channels,)

  def encode(self, images):
    x = images.astype(jnp.float32)
    x = x / 127.5 - 1.0 if images.dtype == jnp.uint8 else x * 2.0 - 1.0
    return rearrange(x, "... (h p) (w q) c -> ... h w (p q c)", p=self.factor, q=self.factor)

  def decode(self, latents):
    """latents -> float images in [0, 1]."""
    x = rearrange(latents, "... h w (p q c) -> ... (h p) (w q) c", p=self.factor, q=self.factor)
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
