"""3D rotary position embedding over (turn, row, col), laid out as in Wan2.1.

head_dim is split into three parts (turn, row, col) of sizes (hd - 4*(hd//6), 2*(hd//6),
2*(hd//6)) -- 44/42/42 for hd=128. Pairs of adjacent channels are rotated, as Wan2.1 does by
viewing them as complex numbers. Because the rotation depends only on position differences inside
a dot product, a move by whole tokens is a fixed relative offset the model can learn once.
"""
import jax.numpy as jnp


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  d6 = head_dim // 6
  dims = (head_dim - 4 * d6, 2 * d6, 2 * d6)
  if head_dim % 2 or min(dims) <= 0 or any(d % 2 for d in dims):
    raise ValueError(f"head_dim={head_dim} cannot be split into even 3D RoPE parts")
  return dims


def angles(positions, head_dim: int, theta: float = 10000.0):
  """positions [..., 3] (turn, row, col) -> rotation angles [..., head_dim // 2]."""
  parts = []
  for axis, dim in enumerate(axis_dims(head_dim)):
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    parts.append(positions[..., axis, None].astype(jnp.float32) * inv_freq)
  return jnp.concatenate(parts, axis=-1)


def rotation(positions, head_dim: int, theta: float = 10000.0):
  """positions [..., s, 3] -> (cos, sin) of their angles [..., s, head_dim // 2], made once per
  model call and shared by every layer (inside each layer's rotation, XLA:CPU recomputed them in
  every layer: 3% of a toy stage-3 step's op time)."""
  ang = angles(positions, head_dim, theta)
  return jnp.cos(ang), jnp.sin(ang)


def apply(x, rot):
  """Rotate x [..., s, heads, head_dim] by rot = rotation(positions, head_dim) (broadcast over heads)."""
  cos, sin = rot[0][..., None, :], rot[1][..., None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., 0::2], x32[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def token_positions(turn_pos, grid_h: int, grid_w: int):
  """turn_pos [b, t] -> positions [b, t * grid_h * grid_w, 3] in (turn, row, col) order."""
  b, t = turn_pos.shape
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  grid = jnp.stack([rows.ravel(), cols.ravel()], -1)  # [n, 2]
  grid = jnp.broadcast_to(grid, (b, t) + grid.shape)
  turn = jnp.broadcast_to(turn_pos[:, :, None, None], (b, t, grid.shape[2], 1))
  return jnp.concatenate([turn, grid], -1).reshape(b, -1, 3)
