"""AnchorMemory: what a causal editor remembers of earlier turns, as an explicit pytree.

Per layer it holds the keys/values of the *anchor* turn (the user's source image) and a ring
buffer of the last W turns. Keys are stored before RoPE, and positions are assigned when the memory
is read: anchor -> turn 0, window turns -> 1..count (oldest first), the new turn -> count + 1.
However long the session, turn positions stay within 0..W+1, the range seen in training, and the
memory's size and the work per turn stay constant.

The memory also keeps the last clean latent and the source's latent, which models with
`concat_prev` (and `concat_anchor`) take as the channel-concatenated condition of the next turn.

Letters: L layers, b batch, W window, n tokens per turn, h heads, k head_dim.
"""
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AnchorMemory:
  anchor_k: jax.Array      # [L, b, n, h, k]
  anchor_v: jax.Array      # [L, b, n, h, k]
  window_k: jax.Array      # [L, b, W, n, h, k]
  window_v: jax.Array      # [L, b, W, n, h, k]
  last_latent: jax.Array   # [b, H, W_img, C] the latest clean turn
  anchor_latent: jax.Array  # [b, H, W_img, C] the first clean turn written (the source)
  anchor_set: jax.Array    # [] bool
  writes: jax.Array        # [] int32, turns written into the window so far
  grid: tuple = struct.field(pytree_node=False, default=(1, 1))   # (rows, cols) of the token grid
  use_anchor: bool = struct.field(pytree_node=False, default=True)

  @classmethod
  def init(cls, *, layers, batch, window, grid, heads, head_dim, latent_shape,
           use_anchor=True, dtype=jnp.float32):
    if window < 1:
      raise ValueError(f"memory window must be >= 1, got {window}")
    n = grid[0] * grid[1]
    # separate buffers for k and v, so that the memory can be donated to a jitted function
    kv = lambda: jnp.zeros((layers, batch, n, heads, head_dim), dtype)
    win = lambda: jnp.zeros((layers, batch, window, n, heads, head_dim), dtype)
    latent = lambda: jnp.zeros((batch,) + tuple(latent_shape), jnp.float32)
    return cls(kv(), kv(), win(), win(), latent(), latent(), jnp.array(False),
               jnp.array(0, jnp.int32), tuple(grid), use_anchor)

  @property
  def window(self) -> int:
    return self.window_k.shape[2]

  @property
  def count(self):
    """Valid window entries."""
    return jnp.minimum(self.writes, self.window)

  @property
  def empty(self):
    return ~self.anchor_set & (self.writes == 0)

  def next_turn_pos(self):
    """RoPE turn index of the turn about to be generated: 0 for the source, then count + 1."""
    return jnp.where(self.empty, 0, self.count + 1).astype(jnp.int32)

  def slot_positions(self):
    """[W] turn index of each ring slot (oldest valid -> 1) and [W] validity."""
    s, w, W = jnp.arange(self.window), self.writes, self.window
    j = w - 1 - jnp.mod(w - 1 - s, W)          # write index held by slot s
    valid = (j >= 0) & (j >= w - self.count)
    return (1 + j - (w - self.count)).astype(jnp.int32), valid

  def context(self):
    """Keys/values every new token may attend to: (k, v [L,b,m,h,k], positions [b,m,3], valid [b,m])."""
    L, b, W, n = self.window_k.shape[:4]
    k = jnp.concatenate([self.anchor_k[:, :, None], self.window_k], axis=2).reshape(L, b, (W + 1) * n, *self.window_k.shape[4:])
    v = jnp.concatenate([self.anchor_v[:, :, None], self.window_v], axis=2).reshape(k.shape)
    slot_pos, slot_valid = self.slot_positions()
    turn = jnp.concatenate([jnp.zeros((1,), jnp.int32), slot_pos])               # [W+1]
    valid = jnp.concatenate([(self.anchor_set & self.use_anchor)[None], slot_valid])
    rows, cols = jnp.meshgrid(jnp.arange(self.grid[0]), jnp.arange(self.grid[1]), indexing="ij")
    pos = jnp.stack([jnp.broadcast_to(turn[:, None], (W + 1, n)),
                     jnp.broadcast_to(rows.ravel(), (W + 1, n)),
                     jnp.broadcast_to(cols.ravel(), (W + 1, n))], -1).reshape(-1, 3)
    return (k, v, jnp.broadcast_to(pos, (b,) + pos.shape),
            jnp.broadcast_to(jnp.repeat(valid, n), (b, (W + 1) * n)))

  def append(self, kv, latent):
    """Write one clean turn: kv = (k, v) [L,b,n,h,k] before RoPE, latent [b,H,W,C]."""
    k, v = kv
    to_anchor = self.use_anchor & ~self.anchor_set
    slot = jnp.mod(self.writes, self.window)
    put = lambda buf, new: jnp.where(to_anchor, buf, buf.at[:, :, slot].set(new.astype(buf.dtype)))
    keep = lambda buf, new: jnp.where(to_anchor, new.astype(buf.dtype), buf)
    return self.replace(
        anchor_k=keep(self.anchor_k, k), anchor_v=keep(self.anchor_v, v),
        window_k=put(self.window_k, k), window_v=put(self.window_v, v),
        last_latent=latent.astype(jnp.float32),
        anchor_latent=jnp.where(self.empty, latent.astype(jnp.float32), self.anchor_latent),
        anchor_set=self.anchor_set | to_anchor,
        writes=self.writes + jnp.where(to_anchor, 0, 1).astype(jnp.int32))

  def cond(self, anchor: bool = False):
    """Channel-concat condition for the next turn: [b,H,W,C+1] (last latent, flag 1 if any), with
    `anchor` [b,H,W,2C+1]: the source's latent after them. A memory made without an anchor
    (`use_anchor=False`, the window-only ablation) gives the last latent there instead, the only
    latent it keeps."""
    flag = jnp.broadcast_to(jnp.where(self.empty, 0.0, 1.0), self.last_latent.shape[:-1] + (1,))
    keep = 1.0 - self.empty
    parts = [self.last_latent * keep, flag]
    if anchor:
      parts.append((self.anchor_latent if self.use_anchor else self.last_latent) * keep)
    return jnp.concatenate(parts, axis=-1)
