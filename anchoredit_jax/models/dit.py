"""CausalDiT: a Wan2.1-shaped diffusion transformer over a sequence of editing turns.

Block structure follows Wan2.1 so its weights can be loaded without changing the model:
patch embedding; sinusoidal time embedding -> MLP -> shared 6-way adaLN projection plus a learned
per-block table; self-attention (RMSNorm q/k, 3D RoPE over (turn, row, col)); cross-attention of
each turn to its own instruction; GELU(tanh) FFN; modulated output head.

Two ways to condition a turn on the image before it, both kept:
  * attention: earlier clean turns are keys/values (in the same call, block-causally, or from the
    AnchorMemory passed as `context`);
  * channel concat (`concat_prev`): the previous clean turn's latent and a flag channel are
    concatenated to the noisy input; with `concat_anchor` the anchor (the source image) is too,
    as Wan2.1-I2V does with its first frame.

An optional copy path (`copy_gate`, beyond the paper): the head predicts one more channel, a
per-pixel logit of "keep the previous turn here", and the clean turn it implies is blended with
the previous turn by it. Where an edit leaves pixels alone they are then copied exactly instead of
being regenerated, so they cannot drift. Zero-initialised, it starts almost closed. With
`gate_from="anchor"` it copies from the source image instead (the anchor's latent of the
`concat_anchor` condition): "this pixel is still as it was in the source", so what no edit has
touched is restored exactly at every turn, whatever the earlier turns did to it.

Letters: b batch, T turns in this call, n tokens per turn, d dim, L layers, h heads, k head_dim.
"""
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.models import rope
from anchoredit_jax.models.attention import CrossAttention, SelfAttention
from anchoredit_jax.models.layers import MLP, Dense, LayerNorm, gated, modulate, param, sinusoidal

X0_MIN_T = 0.05  # velocity = (x_t - x0) / max(t, X0_MIN_T) under x0-prediction
# copy gate: keep = sigmoid(logit + GATE_OFFSET); a zero-initialised head gives keep = 3.4e-4, so
# a model grown with the gate (or a Wan model) starts computing almost exactly what it did
GATE_OFFSET = -8.0

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def abs_pos_embedding(grid_h, grid_w, dim):
  """Fixed 2D sin-cos position of each token [grid_h*grid_w, dim]: half the channels for the
  row, half for the column. RoPE only sees offsets between tokens; an instruction such as
  "add ... at the top left" needs to know where a token is in the image."""
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  return jnp.concatenate([sinusoidal(rows.ravel(), dim // 2, 100.0),
                          sinusoidal(cols.ravel(), dim - dim // 2, 100.0)], axis=-1)


def input_channels(cfg, latent_channels: int) -> int:
  """Channels of the patch embedding's input: the noisy turn, then the `cond` channels (previous
  clean turn + flag, then the anchor's latent)."""
  anchor = bool(cfg.get("concat_anchor"))
  if anchor and not cfg.concat_prev:
    raise ValueError("model.concat_anchor=True needs model.concat_prev=True (it extends that condition)")
  prev = latent_channels + 1 if cfg.concat_prev else 0
  return latent_channels + prev + (latent_channels if anchor else 0)


GATE_FROM = ("prev", "anchor")


def output_channels(cfg, latent_channels: int) -> int:
  """Channels the head predicts per latent pixel: the turn, then the copy gate's logit if any."""
  if cfg.get("copy_gate"):
    if not cfg.concat_prev:
      raise ValueError("model.copy_gate=True needs model.concat_prev=True (the turn it copies from)")
    src = cfg.get("gate_from", "prev")
    if src not in GATE_FROM:
      raise ValueError(f"model.gate_from={src!r}; choose from {GATE_FROM}")
    if src == "anchor" and not cfg.get("concat_anchor"):
      raise ValueError("model.gate_from='anchor' needs model.concat_anchor=True (the source it copies)")
  return latent_channels + (1 if cfg.get("copy_gate") else 0)


def gate_reference(cfg, cond, C: int):
  """The clean latent [..., H, W, C] the copy gate blends towards, from the concat condition:
  the previous turn, or (gate_from="anchor") the source."""
  return cond[..., C + 1:2 * C + 1] if cfg.get("gate_from", "prev") == "anchor" else cond[..., :C]


def pad_head(kernel, patch: int, out_ch: int):
  """A head kernel [d, (p q c)] (or bias [(p q c)]) over c output channels -> over out_ch, the
  added channels zero (the copy gate's logit: keep = sigmoid(GATE_OFFSET) at first)."""
  return _pad_folded(kernel, -1, patch, out_ch)


def _pad_folded(a, axis: int, patch: int, channels: int):
  """Zero-pad the channels of a patch-folded axis (p q c) of `a` to `channels`; numpy stays numpy."""
  xp = np if isinstance(a, np.ndarray) else jnp
  axis %= a.ndim
  c = a.shape[axis] // (patch * patch)
  k = a.reshape(a.shape[:axis] + (patch, patch, c) + a.shape[axis + 1:])
  pad = [(0, 0)] * (axis + 2) + [(0, channels - c)] + [(0, 0)] * (a.ndim - axis - 1)
  return xp.pad(k, pad).reshape(a.shape[:axis] + (patch * patch * channels,) + a.shape[axis + 1:])


def copy_gated(v, x_t, t, prev, logit, hard=False):
  """Blend the predicted clean turn with the previous turn where the gate says keep:
  x0' = (1 - keep) x0 + keep prev, returned as the velocity it implies, v + keep (x0 - prev) / t.
  v/x_t/prev [..., H, W, C], t broadcastable to them, logit [..., H, W] -> [..., H, W, C].
  `hard` (inference only: it has no gradient) rounds keep to 0 or 1, so a pixel is either the
  reference's exactly or the new prediction's."""
  keep = jax.nn.sigmoid(logit + GATE_OFFSET)[..., None]
  if hard:
    keep = (keep > 0.5).astype(keep.dtype)
  x0 = x_t - t * v
  return v + keep * (x0 - prev) / jnp.maximum(t, X0_MIN_T)


def pad_patch_kernel(kernel, patch: int, in_ch: int):
  """A patch-embedding kernel [(p q c), d] over c input channels -> [(p q in_ch), d] with zero
  rows for the added channels, so the model computes exactly what it computed before. A numpy
  kernel (a checkpoint read on the host) stays numpy."""
  return _pad_folded(kernel, 0, patch, in_ch)


class Block(nnx.Module):

  def __init__(self, cfg, *, rngs):
    d = cfg.dim
    self.norm1 = LayerNorm(d, rngs=rngs, affine=False)
    self.self_attn = SelfAttention(d, cfg.heads, rngs=rngs, kernel=cfg.attention_kernel)
    self.norm3 = LayerNorm(d, rngs=rngs, affine=True)
    self.cross_attn = CrossAttention(d, cfg.heads, rngs=rngs, kernel=cfg.attention_kernel)
    self.norm2 = LayerNorm(d, rngs=rngs, affine=False)
    self.ffn = MLP(d, cfg.ffn_dim, rngs=rngs)
    # Wan2.1's `modulation` / diffusers' `scale_shift_table`: [1, 6, d], added to the shared e0.
    self.modulation = param(rngs, nnx.initializers.normal(d ** -0.5), (1, 6, d), (None, None, sh.EMBED))

  def __call__(self, x, e0, text, text_mask, rot, mask, context=None):
    """x [b,T,n,d]; e0 [b,T,6,d]; text [b,T|1,l,d]; text_mask [b,T|1,l]; rot: RoPE (cos, sin)
    [b,T*n,k/2] each."""
    b, T, n, d = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        (self.modulation[None] + e0).astype(x.dtype)[:, :, :, None, :], 6, axis=2)  # each [b,T,1,1,d]
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        m[:, :, 0] for m in (shift1, scale1, gate1, shift2, scale2, gate2))  # [b,T,1,d]
    y = modulate(self.norm1(x), scale1, shift1)
    y, kv = self.self_attn(y.reshape(b, T * n, d), rot, mask, context)
    x = gated(x, y.reshape(b, T, n, d), gate1)
    Tt = text.shape[1]  # T (an instruction per turn) or 1 (one shared by every turn, as a video prompt)
    y = self.cross_attn(self.norm3(x).reshape(b * Tt, (T // Tt) * n, d), text.reshape(b * Tt, -1, d),
                        text_mask.reshape(b * Tt, -1))
    x = x + y.reshape(b, T, n, d)
    x = gated(x, self.ffn(modulate(self.norm2(x), scale2, shift2)), gate2)
    return sh.constrain(x, (sh.BATCH, None, sh.LENGTH, sh.EMBED)), kv


class CausalDiT(nnx.Module):

  def __init__(self, cfg, *, latent_channels: int, rngs):
    self.cfg = cfg
    d, p = cfg.dim, cfg.patch
    self.patch_embed = Dense(p * p * input_channels(cfg, latent_channels), d, (None, sh.EMBED), rngs=rngs)
    self.text_embed = MLP(cfg.text_dim, d, d_out=d, rngs=rngs)
    self.time_in = Dense(cfg.freq_dim, d, (None, sh.EMBED), rngs=rngs)
    self.time_out = Dense(d, d, (sh.EMBED, None), rngs=rngs)
    # Zero-initialised (adaLN-Zero, as in DiT): every block starts as the identity plus its
    # small learned table, which trains much faster from scratch; Wan weights overwrite it.
    self.time_proj = Dense(d, 6 * d, (sh.EMBED, sh.MLP_), rngs=rngs, zero_init=True)

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: sh.LAYERS})
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.head_norm = LayerNorm(d, rngs=rngs, affine=False)
    self.head_modulation = param(rngs, nnx.initializers.normal(d ** -0.5), (1, 2, d), (None, None, sh.EMBED))
    self.head = Dense(d, p * p * output_channels(cfg, latent_channels), (sh.EMBED, None), rngs=rngs,
                      zero_init=True)

  def __call__(self, x, t, text, text_mask, turn_pos, *, cond=None, context=None, causal=True,
               with_gate=False):
    """Denoise T turns at once.

    x [b,T,H,W,C] noisy latents; t [b,T] in [0,1] (0 = clean); text [b,T,l,text_dim] with
    text_mask [b,T,l], or [b,1,...] for one instruction shared by all T turns (then projected
    once, as a video model's prompt); turn_pos [b,T] RoPE turn index of each turn;
    cond [b,T,H,W,C+1] previous clean turn + flag (needed iff cfg.concat_prev), [b,T,H,W,2C+1] with
    the anchor's latent after them (cfg.concat_anchor; `models.model.prev_cond`); context: memory keys
    (k [L,b,m,h,k], v [L,b,m,h,k], positions [b,m,3], valid [b,m]) or None.
    Returns (velocity [b,T,H,W,C], (k, v) [L,b,T*n,h,k] of these turns, before RoPE); with
    `with_gate` (a cfg.copy_gate model) also the copy gate's keep logits [b,T,H,W] (offset included).
    Turn positions are spaced by cfg.rope_stride (the authors' temporal RoPE stride).
    """
    cfg, p = self.cfg, self.cfg.patch
    b, T, H, W, C = x.shape
    if cfg.concat_prev:
      if cond is None:
        raise ValueError("this model concatenates the previous turn (concat_prev); pass cond")
      x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    gh, gw = H // p, W // p
    dt = jnp.dtype(cfg.dtype)  # compute dtype; parameters, norms and the output stay float32
    tokens = rearrange(x, "b T (h p) (w q) c -> b T (h w) (p q c)", p=p, q=p)
    h = self.patch_embed(tokens)  # [b,T,n,d]
    if cfg.abs_pos:
      h = h + abs_pos_embedding(gh, gw, cfg.dim)
    h = h.astype(dt)
    h = sh.constrain(h, (sh.BATCH, None, sh.LENGTH, sh.EMBED))
    n = gh * gw

    e = self.time_out(jax.nn.silu(self.time_in(sinusoidal(t * 1000.0, cfg.freq_dim))))  # [b,T,d]
    e0 = self.time_proj(jax.nn.silu(e)).reshape(b, T, 6, cfg.dim).astype(dt)
    if text.ndim == 3:  # [b,l,text_dim]: one instruction for every turn
      text, text_mask = text[:, None], text_mask[:, None]
    ctx = self.text_embed(text.astype(dt))  # [b,T|1,l,d]

    stride = cfg.get("rope_stride", 1)
    rot = rope.rotation(rope.token_positions(turn_pos * stride, gh, gw), cfg.dim // cfg.heads,
                        cfg.rope_theta)
    tok_turn = jnp.repeat(jnp.arange(T), n)
    mask = (tok_turn[None, :] <= tok_turn[:, None]) if causal else jnp.ones((T * n, T * n), bool)
    mask = jnp.broadcast_to(mask, (b, T * n, T * n))

    graphdef, block_state = nnx.split(self.blocks)
    if context is not None:
      k_m, v_m, pos_m, valid_m = context
      rot_m = rope.rotation(pos_m * jnp.array([stride, 1, 1], pos_m.dtype), cfg.dim // cfg.heads,
                            cfg.rope_theta)

    def body(h, xs):
      layer_state, kv_m = xs
      block = nnx.merge(graphdef, layer_state)
      layer_ctx = None if kv_m is None else (kv_m[0], kv_m[1], rot_m, valid_m)
      return block(h, e0, ctx, text_mask, rot, mask, layer_ctx)

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
    xs = (block_state, None if context is None else (k_m, v_m))
    h, kv = jax.lax.scan(body, h, xs)

    shift, scale = jnp.split((self.head_modulation[None] + e[:, :, None, :])[:, :, :, None], 2, axis=2)
    h = h.astype(jnp.float32)
    out = self.head(modulate(self.head_norm(h), scale[:, :, 0], shift[:, :, 0]))
    out = rearrange(out, "b T (h w) (p q c) -> b T (h p) (w q) c", h=gh, p=p, q=p)
    out, logit = out[..., :C], (out[..., C] if out.shape[-1] > C else None)
    if cfg.prediction in ("x0", "x0_residual"):
      # The network predicts the clean turn and we return the implied velocity. Clean pixels lie
      # on a low-dimensional set while noise does not, so x-prediction learns faster in pixel
      # space (Li & He, "Back to Basics", 2025). "x0_residual" predicts the change from the
      # previous clean turn (the concat condition): an untouched pixel is an output of zero, so
      # the model preserves what it is not told to edit from the first step of training.
      if cfg.prediction == "x0_residual":
        if not cfg.concat_prev:
          raise ValueError("prediction='x0_residual' needs concat_prev=True (the turn it edits)")
        out = out + cond[..., :C].astype(out.dtype)
      out = (x[..., :C] - out) / jnp.maximum(t, X0_MIN_T)[:, :, None, None, None]
    elif cfg.prediction != "velocity":
      raise ValueError(f"model.prediction={cfg.prediction!r}; use velocity, x0 or x0_residual")
    if logit is not None:
      out = copy_gated(out, x[..., :C], t[:, :, None, None, None],
                       gate_reference(cfg, cond, C).astype(out.dtype), logit,
                       hard=bool(cfg.get("gate_hard", False)))
      if with_gate:
        return out, kv, logit + GATE_OFFSET
    elif with_gate:
      raise ValueError("with_gate=True needs a model made with model.copy_gate=True")
    return out, kv
