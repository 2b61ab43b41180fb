"""WanVAE vs a tiny random diffusers AutoencoderKLWan (float32), and the loader's errors.

The reference runs its chunked cache loop (frame 0, then 4 frames at a time; the decoder one latent
frame at a time); ours runs the whole clip at once, so the clip tests check the first-frame rules of
the temporal down/upsampling. 9 frames = frame 0 + two chunks, through both time downsamples.
"""
import inspect
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from anchoredit_jax.models.autoencoder import WanVAE, load_wan_vae  # noqa: E402
from anchoredit_jax.models import wan_vae  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny random AutoencoderKLWan saved with save_pretrained; returns (directory, module)."""
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True, True]).eval()
  with torch.no_grad():  # norms start at 1: move them (and the biases) off their init
    for name, p in ref.named_parameters():
      if name.endswith(("gamma", "bias")):
        p.add_(0.3 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("wan_vae")
  ref.save_pretrained(path)
  return path, ref


@pytest.fixture(scope="module")
def ours(reference):
  vae = load_wan_vae(reference[0])
  graphdef, params = nnx.split(vae)
  methods = {name: jax.jit(lambda p, x, name=name: getattr(nnx.merge(graphdef, p), name)(x))
             for name in ("encode", "decode", "encode_video", "decode_video")}
  return vae, params, methods


def _ref_encode(ref, frames):
  """[b,F,H,W,3] in [0,1] -> normalised posterior mean [b,T,h,w,z]."""
  x = torch.from_numpy(2.0 * frames - 1.0).permute(0, 4, 1, 2, 3)
  mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
  std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
  with torch.no_grad():
    mu = ref.encode(x).latent_dist.mean
  return ((mu - mean) / std).permute(0, 2, 3, 4, 1).numpy()


def _ref_decode(ref, latents):
  """Normalised [b,T,h,w,z] -> frames [b,F,H,W,3] in [0,1], and the fraction the clamp hit."""
  mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
  std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
  with torch.no_grad():
    out = ref.decode(torch.from_numpy(latents).permute(0, 4, 1, 2, 3) * std + mean).sample
  return ((out + 1) / 2).permute(0, 2, 3, 4, 1).numpy(), float((out.abs() >= 1).float().mean())


def test_images_match_reference(reference, ours):
  ref, (_, params, fn) = reference[1], ours
  rng = np.random.default_rng(0)
  images = rng.random((2, 32, 32, 3), dtype=np.float32)
  want = _ref_encode(ref, images[:, None])[:, 0]
  got = fn["encode"](params, images)
  assert got.shape == want.shape == (2, 4, 4, 16)
  assert np.std(want) > 0.1
  assert rel_err(got, want) <= 1e-4, rel_err(got, want)

  latents = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
  want, clamped = _ref_decode(ref, latents[:, None])
  got = fn["decode"](params, latents)
  assert clamped < 0.01 and np.std(want) > 0.05  # the clamp does not hide the comparison
  assert got.shape == want[:, 0].shape == (2, 32, 32, 3)
  assert rel_err(got, want[:, 0]) <= 1e-4, rel_err(got, want[:, 0])


@pytest.mark.parametrize("F", [5, 9])  # the 5-frame clip; 9 = frame 0 + two chunks
def test_clip_matches_reference(reference, ours, F):
  ref, (_, params, fn) = reference[1], ours
  rng = np.random.default_rng(1)
  T = 1 + (F - 1) // 4
  frames = rng.random((1, F, 16, 16, 3), dtype=np.float32)
  want = _ref_encode(ref, frames)
  got = fn["encode_video"](params, frames)
  assert got.shape == want.shape == (1, T, 2, 2, 16)
  assert rel_err(got, want) <= 1e-4, rel_err(got, want)
  # Frames after the first must matter (a clip encoded frame by frame would fail this).
  per_frame = np.concatenate([fn["encode"](params, frames[:, t])[:, None] for t in range(0, F, 4)], 1)
  assert rel_err(per_frame, want) > 1e-2

  latents = rng.standard_normal((1, T, 2, 2, 16)).astype(np.float32)
  want, clamped = _ref_decode(ref, latents)
  got = fn["decode_video"](params, latents)
  assert clamped < 0.01 and np.std(want) > 0.05
  assert got.shape == want.shape == (1, F, 16, 16, 3)
  assert rel_err(got, want) <= 1e-4, rel_err(got, want)


def test_shapes_and_inputs(ours):
  vae, params, fn = ours
  assert vae.latent_shape(32) == (4, 4, 16) and vae.channels == 16
  images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  lat = fn["encode"](params, images)
  assert lat.shape == (3, *vae.latent_shape(32))
  # uint8 is read as value/255, exactly like a float image in [0, 1].
  assert rel_err(lat, fn["encode"](params, images.astype(np.float32) / 255.0)) <= 1e-5
  with pytest.raises(ValueError, match="multiple of"):
    vae.latent_shape(36)
  with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
    vae.encode_video(np.zeros((1, 6, 16, 16, 3), np.float32))


def test_published_latent_statistics():
  defaults = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
  assert wan_vae.WAN21_LATENTS_MEAN == tuple(defaults["latents_mean"].default)
  assert wan_vae.WAN21_LATENTS_STD == tuple(defaults["latents_std"].default)
  cfg = wan_vae.WanVAEConfig()
  assert cfg.latents_mean == wan_vae.WAN21_LATENTS_MEAN and cfg.z_dim == 16


def test_full_size_layout_matches_diffusers():
  # Wan2.1's real size, built on torch's meta device and with jax.eval_shape: no weights in memory.
  with torch.device("meta"):
    ref = diffusers.AutoencoderKLWan()
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert wan_vae.diffusers_shapes() == want


def test_loader_refuses_pickle(tmp_path):
  (tmp_path / "vae.pt").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match=r"pickle.*safetensors"):
    load_wan_vae(tmp_path / "vae.pt")


def _variant(reference, tmp_path, edit):
  """A copy of the reference checkpoint with `edit(tensors)` applied."""
  tensors = load_file(reference[0] / WEIGHTS)
  edit(tensors)
  shutil.copy(reference[0] / "config.json", tmp_path / "config.json")
  save_file(tensors, tmp_path / WEIGHTS)
  return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("decoder.conv_out.bias"), r"1 missing keys \(decoder\.conv_out\.bias\)"),
    (lambda t: t.update(extra=np.zeros(2, np.float32)), r"1 unexpected keys \(extra\)"),
    (lambda t: t.update({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3, 1), np.float32)}),
     r"1 shape mismatches \(encoder\.conv_in\.weight \(8, 3, 3, 3, 1\), expected \(8, 3, 3, 3, 3\)\)"),
])
def test_loader_reports_mismatches(reference, tmp_path, edit, message):
  path = _variant(reference, tmp_path, edit)
  with pytest.raises(ValueError, match=message) as err:
    load_wan_vae(path)
  assert "\n" not in str(err.value)


def test_loader_single_file_and_wan22_config(reference, tmp_path):
  # A bare .safetensors without a config.json beside it is read as the full Wan2.1 architecture,
  # which the tiny checkpoint does not fit, and the error says which architecture it expected.
  shutil.copy(reference[0] / WEIGHTS, tmp_path / "vae.safetensors")
  with pytest.raises(ValueError, match=r"base_dim=96.*missing keys"):
    load_wan_vae(tmp_path / "vae.safetensors")
  cfg = json.loads((reference[0] / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  assert isinstance(load_wan_vae(tmp_path / "vae.safetensors"), WanVAE)
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "is_residual": True}))
  with pytest.raises(ValueError, match="Wan2.2"):
    load_wan_vae(tmp_path / "vae.safetensors")
