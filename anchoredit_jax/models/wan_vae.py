"""Wan2.1's causal 3D VAE (diffusers `AutoencoderKLWan`, is_residual=False) in Flax NNX.

Channels-last throughout. Shape letters: b batch, F video frames (F = 1 + 4k for the published
model), T latent frames (1 + k), H W pixels, h w the latent grid (H/8, W/8), C channels, z latent
channels (16). Pixels enter in [-1, 1] inside the network; the public methods take images as uint8
or float in [0, 1] (like `PixelAutoencoder`) and return floats in [0, 1].

Time is causal: frame t only sees frames <= t. diffusers runs the clip in chunks (frame 0, then 4
frames at a time; the decoder one latent frame at a time) and carries the last two frames of every
time convolution between chunks. Here the whole clip goes through in one call, which gives the same
numbers because:
  * a causal conv with the carried frames equals one conv over the clip with 2 zero frames in front;
  * a temporal downsample passes frame 0 through untouched and then takes a stride-2 window of 3
    over the whole clip starting at frame 0 (each chunk is prefixed with the previous chunk's last
    frame, so the windows tile the clip with stride 2);
  * a temporal upsample passes latent frame 0 through untouched (one output frame) and runs its
    causal time conv over frames 1.. only, zero-padded in front: the first chunk leaves the cache
    empty, so frame 1 sees zeros, not frame 0. Each of those frames then becomes two.
Image models use it with F = 1, where every time conv reduces to its last tap. The price of one
call is memory that grows with F (diffusers' chunk loop is not ported): fine for images and short
clips, not for 81 frames at 480p.

`load_wan_vae(path)` builds the module from a diffusers directory (config.json + safetensors) and
fills every parameter. Layout of kernels: 3-D convs [t,h,w,in,out], 2-D convs [h,w,in,out],
the 1x1 attention projections [in,out].
"""
import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax.convert.tensors import PICKLE_SUFFIXES, open_checkpoint, refuse_pickle
from anchoredit_jax.models.layers import Dense, downsampled, param

# Per-channel statistics of Wan2.1 posterior means (diffusers' AutoencoderKLWan config defaults);
# latents are normalised as (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """The architecture fields of a diffusers AutoencoderKLWan config (defaults: Wan2.1)."""
  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple = (False, True, True)
  latents_mean: tuple = WAN21_LATENTS_MEAN
  latents_std: tuple = WAN21_LATENTS_STD
  in_channels: int = 3
  out_channels: int = 3

  @classmethod
  def from_diffusers(cls, cfg: dict, where="config") -> "WanVAEConfig":
    if cfg.get("is_residual"):
      raise ValueError(f"{where}: is_residual=True is the Wan2.2 VAE; only the Wan2.1 VAE is ported")
    if cfg.get("patch_size") not in (None, 1):
      raise ValueError(f"{where}: patch_size={cfg['patch_size']} (Wan2.2) is not supported; use a Wan2.1 VAE")
    if cfg.get("attn_scales"):
      # Wan2.1 has none; diffusers' own encoder cannot run with them either.
      raise ValueError(f"{where}: attn_scales={cfg['attn_scales']} is not supported (Wan2.1 uses []); "
                       "set it to []")
    out = cls(
        base_dim=cfg.get("base_dim", 96), decoder_base_dim=cfg.get("decoder_base_dim"),
        z_dim=cfg.get("z_dim", 16), dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=cfg.get("num_res_blocks", 2),
        temporal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))),
        latents_mean=tuple(cfg.get("latents_mean", WAN21_LATENTS_MEAN)),
        latents_std=tuple(cfg.get("latents_std", WAN21_LATENTS_STD)),
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3))
    if not len(out.latents_mean) == len(out.latents_std) == out.z_dim:
      raise ValueError(f"{where}: latents_mean/latents_std have {len(out.latents_mean)}/"
                       f"{len(out.latents_std)} values but z_dim is {out.z_dim}; fix the config")
    if len(out.temporal_downsample) < len(out.dim_mult) - 1:
      raise ValueError(f"{where}: temperal_downsample needs {len(out.dim_mult) - 1} entries "
                       f"(one per downsample), got {len(out.temporal_downsample)}")
    return out


def _replicated(ndim):
  return (None,) * ndim  # the VAE is small; every parameter is replicated


class Conv(nnx.Module):
  """Convolution of a clip [b,T,H,W,C]. A 3-D kernel [t,h,w,i,o] mixes frames; a 2-D kernel
  [h,w,i,o] acts on every frame alone. `padding` gives (before, after) per kernel axis: causal
  time padding is (2, 0), never symmetric."""

  def __init__(self, c_in, c_out, size, *, rngs, stride=None, padding=None):
    self.kernel = param(rngs, nnx.initializers.lecun_normal(), (*size, c_in, c_out),
                        _replicated(len(size) + 2))
    self.bias = param(rngs, nnx.initializers.zeros, (c_out,), (None,))
    self.stride = tuple(stride or (1,) * len(size))
    self.padding = tuple(padding or ((0, 0),) * len(size))

  def __call__(self, x):  # [b,T,H,W,i] -> [b,T',H',W',o]
    kernel, stride, padding = self.kernel[...], self.stride, self.padding
    if kernel.ndim == 4:  # per-frame conv as a 3-D conv with a one-frame window
      kernel, stride, padding = kernel[None], (1, *stride), ((0, 0), *padding)
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), stride, padding,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(x.dtype)


def causal_conv(c_in, c_out, *, rngs, k=3):
  """k x k x k conv, 'same' in space, seeing only the current and earlier frames."""
  return Conv(c_in, c_out, (k, k, k), rngs=rngs, padding=((k - 1, 0), (k // 2, k // 2), (k // 2, k // 2)))


class ChannelRMSNorm(nnx.Module):
  """x / max(|x|_2, 1e-12) * sqrt(C) * scale over channels (diffusers' WanRMS_norm, bias-free)."""

  def __init__(self, dim, *, rngs):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (None,))

  def __call__(self, x):
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12) * (x.shape[-1] ** 0.5) * self.scale[...].astype(x.dtype)


class ResBlock(nnx.Module):

  def __init__(self, c_in, c_out, *, rngs):
    self.norm1 = ChannelRMSNorm(c_in, rngs=rngs)
    self.conv1 = causal_conv(c_in, c_out, rngs=rngs)
    self.norm2 = ChannelRMSNorm(c_out, rngs=rngs)
    self.conv2 = causal_conv(c_out, c_out, rngs=rngs)
    self.conv_shortcut = causal_conv(c_in, c_out, rngs=rngs, k=1) if c_in != c_out else None

  def __call__(self, x):  # [b,T,H,W,i] -> [b,T,H,W,o]
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)))
    x = self.conv2(jax.nn.silu(self.norm2(x)))
    return x + skip


class AttnBlock(nnx.Module):
  """Single-head self-attention over the H*W positions of each frame separately."""

  def __init__(self, dim, *, rngs):
    self.norm = ChannelRMSNorm(dim, rngs=rngs)
    self.to_qkv = Dense(dim, 3 * dim, (None, None), rngs=rngs)
    self.proj = Dense(dim, dim, (None, None), rngs=rngs)

  def __call__(self, x):  # [b,T,H,W,C]
    b, T, H, W, C = x.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b, T, H * W, 3 * C), 3, axis=-1)
    logits = jnp.einsum("btqc,btkc->btqk", q, k) * C ** -0.5
    y = jnp.einsum("btqk,btkc->btqc", jax.nn.softmax(logits, axis=-1), v)
    return x + self.proj(y).reshape(b, T, H, W, C)


class Resample(nnx.Module):
  """2x spatial down/up-sampling, optionally with 2x in time ('down3d' / 'up3d')."""

  def __init__(self, dim, mode, *, rngs, out_dim=None):
    self.mode = mode
    if mode.startswith("down"):
      # Wan2.1 pads one row/column at the end only (not both sides), then a stride-2 3x3: H -> H/2.
      self.conv = Conv(dim, dim, (3, 3), rngs=rngs, stride=(2, 2), padding=((0, 1), (0, 1)))
      time_conv = Conv(dim, dim, (3, 1, 1), rngs=rngs, stride=(2, 1, 1)) if mode == "down3d" else None
    else:
      self.conv = Conv(dim, out_dim or dim // 2, (3, 3), rngs=rngs, padding=((1, 1), (1, 1)))
      # Produces both output frames of a latent frame at once, as 2 x dim channels.
      time_conv = (Conv(dim, 2 * dim, (3, 1, 1), rngs=rngs, padding=((2, 0), (0, 0), (0, 0)))
                   if mode == "up3d" else None)
    self.time_conv = time_conv

  def __call__(self, x):  # [b,T,H,W,C]
    if self.mode == "up3d" and x.shape[1] > 1:
      b, T, H, W, C = x.shape
      pairs = self.time_conv(x[:, 1:]).reshape(b, T - 1, H, W, 2, C)  # frame 0 is left out
      pairs = pairs.transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * (T - 1), H, W, C)
      x = jnp.concatenate([x[:, :1], pairs], axis=1)  # [b,1+2(T-1),H,W,C]
    if self.mode.startswith("up"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact 2x is plain repetition
    x = self.conv(x)
    if self.mode == "down3d" and x.shape[1] > 1:
      x = jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)  # [b,1+(T-1)/2,H,W,C]
    return x


class MidBlock(nnx.Module):

  def __init__(self, dim, *, rngs):
    self.resnets = nnx.List([ResBlock(dim, dim, rngs=rngs), ResBlock(dim, dim, rngs=rngs)])
    self.attentions = nnx.List([AttnBlock(dim, rngs=rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nnx.Module):

  def __init__(self, cfg: WanVAEConfig, *, rngs):
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = causal_conv(cfg.in_channels, dims[0], rngs=rngs)
    blocks = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResBlock(c_in, c_out, rngs=rngs))
        c_in = c_out
      if i < len(cfg.dim_mult) - 1:
        blocks.append(Resample(c_out, "down3d" if cfg.temporal_downsample[i] else "down2d", rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], rngs=rngs)
    self.norm_out = ChannelRMSNorm(dims[-1], rngs=rngs)
    self.conv_out = causal_conv(dims[-1], 2 * cfg.z_dim, rngs=rngs)

  def __call__(self, x):  # [b,F,H,W,3] in [-1,1] -> [b,T,h,w,2z]
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class UpBlock(nnx.Module):

  def __init__(self, c_in, c_out, n_res, mode, *, rngs):
    self.resnets = nnx.List([ResBlock(c_in if j == 0 else c_out, c_out, rngs=rngs) for j in range(n_res)])
    self.upsampler = Resample(c_out, mode, rngs=rngs) if mode else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsampler is None else self.upsampler(x)


class Decoder(nnx.Module):

  def __init__(self, cfg: WanVAEConfig, *, rngs):
    base = cfg.decoder_base_dim or cfg.base_dim
    dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    up_time = cfg.temporal_downsample[:len(cfg.dim_mult) - 1][::-1]
    self.conv_in = causal_conv(cfg.z_dim, dims[0], rngs=rngs)
    self.mid_block = MidBlock(dims[0], rngs=rngs)
    blocks = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
      # Every upsampler halves the channels, so blocks after the first start at half width.
      c_in = c_in // 2 if i > 0 else c_in
      mode = None if i == len(cfg.dim_mult) - 1 else ("up3d" if up_time[i] else "up2d")
      blocks.append(UpBlock(c_in, c_out, cfg.num_res_blocks + 1, mode, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = ChannelRMSNorm(dims[-1], rngs=rngs)
    self.conv_out = causal_conv(dims[-1], cfg.out_channels, rngs=rngs)

  def __call__(self, z):  # [b,T,h,w,z] -> [b,F,H,W,3], unclamped
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class WanVAE(nnx.Module):
  """Autoencoder interface (`encode`, `decode`, `latent_shape`, `channels`) over Wan2.1's VAE.

  Latents are the posterior mean normalised per channel, (mu - mean) / std. Methods are plain jnp
  code: jit them functionally (nnx.split once, nnx.merge inside the jitted function)."""

  def __init__(self, cfg: WanVAEConfig = WanVAEConfig(), *, rngs):
    self.cfg = cfg
    self.channels = cfg.z_dim
    self.factor = 2 ** (len(cfg.dim_mult) - 1)
    self.time_factor = 2 ** sum(bool(t) for t in cfg.temporal_downsample[:len(cfg.dim_mult) - 1])
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = causal_conv(2 * cfg.z_dim, 2 * cfg.z_dim, rngs=rngs, k=1)
    self.post_quant_conv = causal_conv(cfg.z_dim, cfg.z_dim, rngs=rngs, k=1)
    self.decoder = Decoder(cfg, rngs=rngs)

  def latent_shape(self, res) -> tuple[int, int, int]:
    """(h, w, channels) of the latent of a res x res or (H, W) image."""
    return downsampled(res, self.factor, "the Wan VAE") + (self.channels,)

  def num_latent_frames(self, frames: int) -> int:
    if (frames - 1) % self.time_factor:
      raise ValueError(f"a clip of {frames} frames cannot be encoded: the Wan VAE needs "
                       f"1 + {self.time_factor}k frames; trim or pad the clip")
    return 1 + (frames - 1) // self.time_factor

  def moments(self, x):
    """[b,F,H,W,3] pixels in [-1,1] -> posterior (mu, logvar), each [b,T,h,w,z], unnormalised."""
    _, F, H, W, _ = x.shape
    self.num_latent_frames(F)
    if H % self.factor or W % self.factor:
      raise ValueError(f"frames of {H}x{W} cannot be encoded: height and width must be multiples "
                       f"of {self.factor}; resize or crop them")
    h = self.quant_conv(self.encoder(x))
    return h[..., :self.channels], h[..., self.channels:]

  def encode_video(self, frames):
    """[b,F,H,W,3] uint8 or float in [0,1] -> normalised latents [b,1+(F-1)//4,h,w,z]."""
    x = frames.astype(jnp.float32)
    x = x / 127.5 - 1.0 if frames.dtype == jnp.uint8 else x * 2.0 - 1.0
    mu, _ = self.moments(x)
    mean, std = jnp.asarray(self.cfg.latents_mean), jnp.asarray(self.cfg.latents_std)
    return (mu - mean) / std

  def decode_video(self, latents):
    """Normalised latents [b,T,h,w,z] -> float frames [b,1+4(T-1),H,W,3] in [0,1]."""
    mean, std = jnp.asarray(self.cfg.latents_mean), jnp.asarray(self.cfg.latents_std)
    z = latents.astype(jnp.float32) * std + mean
    x = self.decoder(self.post_quant_conv(z))
    return (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0

  def encode(self, images):
    """Images [..., H, W, 3] (each a one-frame clip) -> latents [..., H/8, W/8, z]."""
    lead, (H, W, C) = images.shape[:-3], images.shape[-3:]
    lat = self.encode_video(images.reshape(-1, 1, H, W, C))  # [n,1,h,w,z]
    return lat.reshape(*lead, *lat.shape[2:])

  def decode(self, latents):
    """Latents [..., h, w, z] -> float images [..., 8h, 8w, 3] in [0,1]."""
    lead, (h, w, c) = latents.shape[:-3], latents.shape[-3:]
    img = self.decode_video(latents.reshape(-1, 1, h, w, c))  # [n,1,H,W,3]
    return img.reshape(*lead, *img.shape[2:])


def _torch_key(path: str) -> str:
  """Our parameter path -> the diffusers state-dict key."""
  path = path.replace(".upsampler.", ".upsamplers.0.")
  path = re.sub(r"\.conv\.(kernel|bias)$", r".resample.1.\1", path)  # Resample's spatial conv
  return re.sub(r"\.kernel$", ".weight", re.sub(r"\.scale$", ".gamma", path))


def _torch_shape(key: str, shape: tuple) -> tuple:
  """The diffusers shape of a parameter whose shape here is `shape`."""
  if key.endswith(".gamma"):  # per-frame (attention) norms broadcast over [C,H,W], others [C,T,H,W]
    return (shape[0], 1, 1) if re.search(r"\.norm\.gamma$", key) else (shape[0], 1, 1, 1)
  if len(shape) == 2:  # 1x1 Conv2d as a Dense kernel [in,out]
    return (shape[1], shape[0], 1, 1)
  if len(shape) >= 4:  # [..., in, out] -> [out, in, ...]
    return (shape[-1], shape[-2], *shape[:-2])
  return tuple(shape)


def _from_torch(value: np.ndarray, shape: tuple) -> np.ndarray:
  if len(shape) == 1:
    return value.reshape(shape)
  if len(shape) == 2:
    return value[:, :, 0, 0].T
  return np.transpose(value, (*range(2, value.ndim), 1, 0))


def _short(names, n=4):
  names = sorted(names)
  return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def read_config(path) -> WanVAEConfig:
  """The config of a checkpoint: its directory's config.json, the config.json beside a single
  file when that belongs to an AutoencoderKLWan, else Wan2.1's defaults."""
  path = Path(path)
  cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
  if not cfg_file.is_file():
    return WanVAEConfig()
  cfg = json.loads(cfg_file.read_text())
  if path.is_file() and cfg.get("_class_name") != "AutoencoderKLWan":
    return WanVAEConfig()
  return WanVAEConfig.from_diffusers(cfg, where=str(cfg_file))


def _abstract(cfg: WanVAEConfig):
  """(graphdef, leaves with paths, treedef, {diffusers key: (leaf index, our shape)}), no memory."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = {}
  for i, (kpath, _) in enumerate(leaves):
    name = ".".join(str(k.key) for k in kpath if isinstance(k, jax.tree_util.DictKey))
    keys[_torch_key(name)] = (i, tuple(leaves[i][1].shape))
  return graphdef, leaves, treedef, keys


def diffusers_shapes(cfg: WanVAEConfig = WanVAEConfig()) -> dict:
  """{diffusers state-dict key: shape} that `load_wan_vae` expects for `cfg`."""
  return {k: _torch_shape(k, s) for k, (_, s) in _abstract(cfg)[3].items()}


def load_wan_vae(path, config: WanVAEConfig | None = None) -> WanVAE:
  """A diffusers AutoencoderKLWan directory (config.json + safetensors), or a single .safetensors
  file with its key layout, -> WanVAE with every parameter filled. Nothing is unpickled.

  The config comes from `config`, else `read_config(path)`. Missing, unexpected or mis-shaped
  tensors raise one ValueError that names them."""
  path = Path(path)
  if path.suffix in PICKLE_SUFFIXES:
    refuse_pickle(path)
  cfg = config or read_config(path)
  tensors = open_checkpoint(path)
  graphdef, leaves, treedef, wanted = _abstract(cfg)
  missing = [k for k in wanted if k not in tensors]
  unexpected = [k for k in tensors.keys() if k not in wanted]
  wrong = [f"{k} {tuple(tensors.shape(k))}, expected {_torch_shape(k, s)}"
           for k, (_, s) in wanted.items() if k in tensors and tuple(tensors.shape(k)) != _torch_shape(k, s)]
  if missing or unexpected or wrong:
    parts = [f"{len(v)} {what} ({_short(v)})" for what, v in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if v]
    arch = f"base_dim={cfg.base_dim}, z_dim={cfg.z_dim}, dim_mult={cfg.dim_mult}"
    raise ValueError(f"{path} does not match a Wan2.1 VAE with {arch}: {'; '.join(parts)}; "
                     "load a diffusers AutoencoderKLWan (Wan2.1) checkpoint with its config.json")
  values = [None] * len(leaves)
  for key, (i, shape) in wanted.items():
    value = _from_torch(np.asarray(tensors[key], dtype=np.float32), shape)
    values[i] = jnp.asarray(value, dtype=leaves[i][1].dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
