"""Small building blocks with logical sharding names on every parameter.

Each parameter carries `out_sharding` (logical axes such as 'embed', 'mlp', 'heads'); the
mesh mapping lives in `anchoredit_jax.sharding`, so models never mention mesh axes.

Hand-written backward passes (normalize, rms_normalize, modulate, gated, softmax): autodiff turns
a product with a broadcast operand (LayerNorm's statistics, adaLN's scale and gate, softmax's
normaliser) into "multiply, then sum over the broadcast axes". XLA:CPU hands that fused pattern
to YNNPACK, which runs it 8-20x slower than the same sum written as a contraction; here the sums
go through `dot_sum`, which writes them as one on a CPU (benchmark/RESULTS.md, 2026-11-27,
c9407d3). The forward passes are the plain formulas, and other backends get the plain sums.
"""
import functools
import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import sharding as sh


def param(rngs, init, shape, names, dtype=jnp.float32):
  """An nnx.Param annotated with logical axis names (placed later, never eagerly)."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out]; `names` are the logical axes of the kernel."""

  def __init__(self, d_in, d_out, names, *, rngs, use_bias=True, zero_init=False):
    init = nnx.initializers.zeros if zero_init else nnx.initializers.xavier_uniform()
    self.kernel = param(rngs, init, (d_in, d_out), names)
    self.bias = param(rngs, nnx.initializers.zeros, (d_out,), names[1:]) if use_bias else None

  def __call__(self, x):
    y = jnp.einsum("...i,io->...o", x, self.kernel.astype(x.dtype))
    return y if self.bias is None else y + self.bias.astype(x.dtype)


def dot_sum(a, b, axes):
  """sum(a * b) over `axes` (kept as size-1 axes), accumulated in float32. Written as a
  contraction (einsum) when compiling for a CPU (see the module docstring), else as the plain sum."""
  axes = tuple(ax % a.ndim for ax in axes)
  if sh.platform() != "cpu":
    return jnp.sum(a * b, axes, keepdims=True, dtype=jnp.float32).astype(a.dtype)
  idx = string.ascii_letters[:a.ndim]
  kept = "".join(c for i, c in enumerate(idx) if i not in axes)
  out = jnp.einsum(f"{idx},{idx}->{kept}", a, b, preferred_element_type=jnp.float32)
  return jnp.expand_dims(out, axes).astype(a.dtype)


def _broadcast_axes(small, big):
  """Axes along which `small` was broadcast to `big`'s shape (same rank)."""
  return tuple(i for i, (s, l) in enumerate(zip(small.shape, big.shape)) if s == 1 and l != 1)


def _scale_to_unit(x, eps, center):
  xc = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
  r = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  return xc * r, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _unit(x, eps, center):
  return _scale_to_unit(x, eps, center)[0]


def _unit_fwd(x, eps, center):
  y, r = _scale_to_unit(x, eps, center)
  return y, (y, r)


def _unit_bwd(eps, center, res, g):
  y, r = res  # dx = r * (g - [mean(g) if centred] - y * mean(g * y))
  gc = g - jnp.mean(g, axis=-1, keepdims=True) if center else g
  return (r * (gc - y * dot_sum(g, y, (-1,)) / y.shape[-1]),)


_unit.defvjp(_unit_fwd, _unit_bwd)


def normalize(x, eps):
  """(x - mean) / sqrt(var + eps) over the last axis (LayerNorm without its affine part)."""
  return _unit(x, eps, True)


def rms_normalize(x, eps):
  """x / sqrt(mean(x^2) + eps) over the last axis (RMSNorm without its scale)."""
  return _unit(x, eps, False)


@jax.custom_vjp
def modulate(x, scale, shift):
  """adaLN modulation x * (1 + scale) + shift; scale and shift [.., 1, d] broadcast over tokens."""
  return x * (1 + scale) + shift


def _modulate_bwd(res, g):
  x, scale, shift = res
  return ((g * (1 + scale)).astype(x.dtype),
          dot_sum(g, x, _broadcast_axes(scale, g)).astype(scale.dtype),
          jnp.sum(g, _broadcast_axes(shift, g), keepdims=True).astype(shift.dtype))


modulate.defvjp(lambda x, scale, shift: (modulate(x, scale, shift), (x, scale, shift)), _modulate_bwd)


@jax.custom_vjp
def gated(x, y, gate):
  """The gated residual x + y * gate; gate [.., 1, d] broadcast over tokens."""
  return x + y * gate


def _gated_bwd(res, g):
  x, y, gate = res
  return (g.astype(x.dtype), (g * gate).astype(y.dtype),
          dot_sum(g, y, _broadcast_axes(gate, g)).astype(gate.dtype))


gated.defvjp(lambda x, y, gate: (gated(x, y, gate), (x, y, gate)), _gated_bwd)


@jax.custom_vjp
def softmax(x):
  """Softmax over the last axis."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  p = softmax(x)
  return p, p


def _softmax_bwd(p, g):  # dx = p * (g - sum(g * p))
  return (p * (g - dot_sum(g, p, (-1,))),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis with a learned scale (Wan2.1 uses it on q and k)."""

  def __init__(self, dim, *, rngs, eps=1e-6, names=("embed",)):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), names)
    self.eps = eps

  def __call__(self, x):
    return (rms_normalize(x.astype(jnp.float32), self.eps) * self.scale).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; `affine=False` matches Wan2.1's norms before modulation."""

  def __init__(self, dim, *, rngs, eps=1e-6, affine=True):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",)) if affine else None
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",)) if affine else None

  def __call__(self, x):
    y = normalize(x.astype(jnp.float32), self.eps)
    if self.scale is not None:
      y = y * self.scale + self.bias
    return y.astype(x.dtype)


class MLP(nnx.Module):
  """Linear -> GELU(tanh) -> Linear, the FFN of Wan2.1 blocks."""

  def __init__(self, dim, hidden, *, rngs, d_out=None):
    self.fc1 = Dense(dim, hidden, ("embed", "mlp"), rngs=rngs)
    self.fc2 = Dense(hidden, d_out or dim, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def sinusoidal(positions, dim, max_period=10000.0):
  """[...] float positions -> [..., dim] cos|sin features (Wan2.1 / DiT timestep embedding)."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = positions.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def downsampled(size, factor: int, what: str = "the autoencoder") -> tuple:
  """(h, w) // factor of an image size given as one side (square) or (height, width); refuses a
  side that is not a multiple of `factor`."""
  hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
  if len(hw) != 2 or any(s % factor or s <= 0 for s in hw):
    raise ValueError(f"image size {size} is not a positive multiple of {what} factor {factor}")
  return hw[0] // factor, hw[1] // factor
