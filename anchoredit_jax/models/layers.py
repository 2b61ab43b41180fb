"""Small building blocks with logical sharding names on every parameter.

Each parameter carries `out_sharding` (logical axes such as 'embed', 'mlp', 'heads'); the
mesh mapping lives in `anchoredit_jax.sharding`, so models never mention mesh axes.
"""
import jax
import jax.numpy as jnp
from flax import nnx


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


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis with a learned scale (Wan2.1 uses it on q and k)."""

  def __init__(self, dim, *, rngs, eps=1e-6, names=("embed",)):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), names)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; `affine=False` matches Wan2.1's norms before modulation."""

  def __init__(self, dim, *, rngs, eps=1e-6, affine=True):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",)) if affine else None
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("embed",)) if affine else None

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
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
