"""What the two Hugging Face image encoders (clip.py, dinov2.py) share: patch embedding,
self-attention with biases, the activations their configs name, bicubic resampling of a position
table as PyTorch does it, and the strict checkpoint -> parameters assignment of their loaders.

Letters: b batch, s tokens, h heads, k head dim, d width, c channels, i/j patch rows/cols,
p/q pixel rows/cols within a patch, n/m output/input length of a resampling.
"""
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.convert.tensors import Tensors, check_keys, checkpoint_files, refuse_pickle
from anchoredit_jax.models.attention import attend
from anchoredit_jax.models.layers import Dense, param

# transformers' ACT2FN for the names these configs use; "gelu" is the exact (erf) one
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def check_activation(name, source):
  if name not in ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act {name!r} is not ported (one of {sorted(ACTIVATIONS)})")
  return name


class Patches(nnx.Module):
  """Conv2d with stride = kernel = patch: images [b,H,W,c] -> (tokens [b,i*j,d], (i, j)).
  Rows and columns past the last whole patch are dropped, as the strided convolution does."""

  def __init__(self, patch, channels, dim, *, rngs, use_bias=True):
    self.patch = patch
    self.kernel = param(rngs, nnx.initializers.normal(0.02), (patch, patch, channels, dim),
                        (None, None, None, sh.EMBED))  # [p,q,c,d]
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), (sh.EMBED,)) if use_bias else None

  def __call__(self, x):
    b, H, W, c = x.shape
    p, (i, j) = self.patch, (H // self.patch, W // self.patch)
    x = x[:, :i * p, :j * p].reshape(b, i, p, j, p, c)
    y = jnp.einsum("bipjqc,pqcd->bijd", x, self.kernel.astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias.astype(x.dtype)
    return y.reshape(b, i * j, -1), (i, j)


class Attention(nnx.Module):
  """Multi-head self-attention, q/k/v/o projections with biases (CLIP, ViT, DINOv2)."""

  def __init__(self, dim, heads, *, rngs, qkv_bias=True, kernel="xla"):
    self.heads, self.kernel = heads, kernel
    self.q = Dense(dim, dim, (sh.EMBED, sh.HEADS), rngs=rngs, use_bias=qkv_bias)
    self.k = Dense(dim, dim, (sh.EMBED, sh.HEADS), rngs=rngs, use_bias=qkv_bias)
    self.v = Dense(dim, dim, (sh.EMBED, sh.HEADS), rngs=rngs, use_bias=qkv_bias)
    self.o = Dense(dim, dim, (sh.HEADS, sh.EMBED), rngs=rngs)

  def __call__(self, x, mask=None):
    """x [b,s,d]; mask [b,s,s] bool (True = may attend), None = every key -> [b,s,d]."""
    b, s, d = x.shape
    split = lambda y: y.reshape(b, s, self.heads, d // self.heads)  # [b,s,h,k]
    if mask is None:
      mask = jnp.ones((b, s, s), bool)
    out = attend(split(self.q(x)), split(self.k(x)), split(self.v(x)), mask, self.kernel)
    return self.o(out.reshape(b, s, d))


# ---------------------------------------------------------------------------- resampling


def _cubic(x, a):
  """Keys' cubic convolution kernel at distances x (a = -0.75 in PyTorch, -0.5 in PIL)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(m, n, antialias=False) -> np.ndarray:
  """[n, m] float32 matrix W with out = W @ in: PyTorch's 1-D bicubic resampling of m samples to n
  (F.interpolate(mode="bicubic", align_corners=False), with or without antialias=True).

  Plain: a = -0.75, four taps around the source point (dst + 0.5) * m/n - 0.5, indices past the
  edges clamped to it. Antialiased (PIL's filter): a = -0.5, the kernel stretched by m/n when
  shrinking, taps outside the input dropped and the rest renormalised to sum to 1.
  """
  scale = m / n
  w = np.zeros((n, m))
  for o in range(n):
    if not antialias:
      src = (o + 0.5) * scale - 0.5
      base = int(np.floor(src))
      taps = base + np.arange(-1, 3)
      for t, wt in zip(np.clip(taps, 0, m - 1), _cubic(src - taps, -0.75)):
        w[o, t] += wt
    else:
      support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
      center = scale * (o + 0.5)
      lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C++ casts do
      hi = min(int(center + support + 0.5), m)
      taps = np.arange(lo, hi)
      wt = _cubic((taps - center + 0.5) * inv, -0.5)
      w[o, lo:hi] = wt / wt.sum() if wt.sum() != 0 else wt
  return w.astype(np.float32)


def resample_grid(table, size, antialias=False):
  """table [g,g,d] -> [i,j,d] by separable bicubic resampling to size (i, j); the identity when
  the size is unchanged."""
  g = table.shape[0]
  if tuple(size) == (g, g):
    return table
  rows, cols = bicubic_weights(g, size[0], antialias), bicubic_weights(g, size[1], antialias)
  return jnp.einsum("im,jn,mnd->ijd", rows, cols, table, preferred_element_type=jnp.float32
                    ).astype(table.dtype)


# ---------------------------------------------------------------------------- loading


def read_json(file) -> dict:
  """A JSON object from `file`; a one-line ValueError naming it if it is not one."""
  try:
    out = json.loads(Path(file).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON ({e}); re-download the folder") from None
  if not isinstance(out, dict):
    raise ValueError(f"{file} holds no JSON object; re-download the folder")
  return out


def read_folder(path, kinds, what, example):
  """(config dict, Tensors) of a Hugging Face model folder whose config.json has a model_type in
  `kinds`; pickles are refused, a missing folder or config.json named."""
  path = Path(path)
  refuse_pickle(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{what} folder {path} not found; download one (e.g. {example}) with "
                            "huggingface-cli download and pass its folder")
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path} has no config.json; pass the folder a {what} model was saved "
                            "to (save_pretrained or huggingface-cli download)")
  config = read_json(path / "config.json")
  if config.get("model_type") not in kinds:
    raise ValueError(f"{path}: config.json has model_type {config.get('model_type')!r}, not "
                     f"{' or '.join(kinds)}; pass a {what} folder (e.g. {example})")
  return config, Tensors(checkpoint_files(path))


def linear(dense, prefix) -> dict:
  """Checkpoint entries of an nn.Linear (weight [out, in], bias) for our Dense."""
  out = {f"{prefix}.weight": (dense.kernel, "linear")}
  if dense.bias is not None:
    out[f"{prefix}.bias"] = (dense.bias, None)
  return out


def norm(layer, prefix) -> dict:
  """Checkpoint entries of an nn.LayerNorm (weight, bias) for our LayerNorm."""
  return {f"{prefix}.weight": (layer.scale, None), f"{prefix}.bias": (layer.bias, None)}


def _stored_shape(shape, layout):
  """The shape a checkpoint stores for a parameter of `shape`. layout: None (the same), "linear"
  (nn.Linear [out, in]), "conv" (nn.Conv2d [d, c, p, q]) or the stored shape itself (reshaped)."""
  if layout is None:
    return shape
  if layout == "linear":
    return shape[::-1]
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(layout)


def _to_ours(a, shape, layout):
  if layout == "linear":
    return a.T
  if layout == "conv":
    return a.transpose(2, 3, 1, 0)  # [d,c,p,q] -> [p,q,c,d]
  return a.reshape(shape)


def assign(expected, tensors, source, what, dtype=jnp.float32, checked=()):
  """Set every parameter of `expected` {checkpoint key: (Param, layout)} from `tensors`.

  Every key of the checkpoint is used exactly once: a missing, unexpected or mis-shaped key is a
  one-line ValueError naming it (the count, then the first three names). `checked`: keys the
  caller has already read and verified (buffers such as CLIP's position_ids), not parameters.
  """
  want = {k: _stored_shape(tuple(var.get_value().shape), layout)
          for k, (var, layout) in expected.items()}
  shapes = {k: tuple(tensors.shape(k)) for k in tensors.keys() if k not in checked}
  check_keys(want, shapes, source, f"{what} model")
  for k, (var, layout) in expected.items():
    a = np.asarray(tensors[k]).astype(np.float32)
    var.set_value(jnp.asarray(_to_ours(a, tuple(var.get_value().shape), layout), dtype))
