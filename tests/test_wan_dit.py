"""Wan2.1 transformer weights in CausalDiT: parity with diffusers' WanTransformer3DModel, both key
layouts, sharded loading, and the loader's refusals."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.convert import wan
from anchoredit_jax.convert.tensors import open_checkpoint
from anchoredit_jax.models.dit import CausalDiT
from anchoredit_jax.models.model import build
from configs import common
from tests.helpers import rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import save_file  # noqa: E402

TEXT_LEN, C = 7, 4


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
  """A tiny random diffusers Wan transformer, every weight moved off its initial value."""
  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=C,
      out_channels=C, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("wan") / "transformer"
  model.save_pretrained(path)
  return path, model.eval()


def our_config(path, **overrides):
  fields = wan.model_fields(json.loads((path / "config.json").read_text()))
  latent_channels = fields.pop("latent_channels")
  cfg = common.model_config("smoke")
  cfg.update(fields)
  cfg.update(dict(concat_prev=False, abs_pos=False, prediction="velocity", text_len=TEXT_LEN) | overrides)
  return cfg, latent_channels


def run_ours(cfg, latent_channels, state, x, t, text, causal):
  """x [b,T,H,W,C], t [b,T], text [b,l,text_dim] shared by every turn -> velocity [b,T,H,W,C]."""
  graphdef = nnx.split(nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=latent_channels,
                                                        rngs=nnx.Rngs(0))))[0]
  b, T = t.shape
  text = jnp.broadcast_to(text[:, None], (b, T) + text.shape[1:])
  out, _ = nnx.merge(graphdef, state)(x, t, text, jnp.ones(text.shape[:3], bool),
                                      jnp.broadcast_to(jnp.arange(T), (b, T)), causal=causal)
  return np.asarray(out)


def run_theirs(model, x, timestep, text):
  """The same inputs through diffusers: [b,T,H,W,C] <-> [b,C,F,H,W]; timestep in [0, 1000]."""
  with torch.no_grad():
    out = model(torch.from_numpy(np.transpose(x, (0, 4, 1, 2, 3))).float(),
                torch.from_numpy(np.asarray(timestep)).float(),
                torch.from_numpy(np.asarray(text)).float(), return_dict=False)[0]
  return np.transpose(out.numpy(), (0, 2, 3, 4, 1))


def inputs(frames=3, seed=0):
  r = np.random.default_rng(seed)
  x = r.standard_normal((2, frames, 8, 8, C)).astype(np.float32)
  return x, r.standard_normal((2, TEXT_LEN, 24)).astype(np.float32)


def test_bidirectional_forward_matches_diffusers(wan_dir):
  path, model = wan_dir
  cfg, lc = our_config(path)
  state = wan.load_wan_dit(path, cfg, lc)
  x, text = inputs()
  t = np.array([0.5, 0.25], np.float32)  # exact in float32 after * 1000
  ours = run_ours(cfg, lc, state, x, np.repeat(t[:, None], 3, 1), text, causal=False)
  assert rel_err(ours, run_theirs(model, x, t * 1000, text)) <= 1e-5


def test_per_frame_timesteps_match_diffusers(wan_dir):
  """A different noise level per frame (diffusers takes one per token) still matches."""
  path, model = wan_dir
  cfg, lc = our_config(path)
  state = wan.load_wan_dit(path, cfg, lc)
  x, text = inputs()
  t = np.array([[0.125, 0.5, 0.875], [1.0, 0.25, 0.0]], np.float32)
  per_token = np.repeat(t * 1000, 16, axis=1)  # 16 tokens a frame at 8x8, patch 2
  ours = run_ours(cfg, lc, state, x, t, text, causal=False)
  assert rel_err(ours, run_theirs(model, x, per_token, text)) <= 1e-5


def test_causal_attention_changes_only_what_it_must(wan_dir):
  """Block-causal: frame 0 equals the video model on frame 0 alone, and later frames cannot
  reach it; the frames after it do change when an earlier one does."""
  path, model = wan_dir
  cfg, lc = our_config(path)
  state = wan.load_wan_dit(path, cfg, lc)
  x, text = inputs()
  t = np.full((2, 3), 0.5, np.float32)
  ours = run_ours(cfg, lc, state, x, t, text, causal=True)
  alone = run_theirs(model, x[:, :1], np.full((2,), 500.0), text)
  assert rel_err(ours[:, 0], alone[:, 0]) <= 1e-5
  x2 = x.copy()
  x2[:, 2] += 1.0
  again = run_ours(cfg, lc, state, x2, t, text, causal=True)
  np.testing.assert_array_equal(again[:, :2], ours[:, :2])
  assert rel_err(again[:, 2], ours[:, 2]) > 1e-3
  x3 = x.copy()
  x3[:, 0] += 1.0
  assert rel_err(run_ours(cfg, lc, state, x3, t, text, causal=True)[:, 1:], ours[:, 1:]) > 1e-3


def wan_layout(path, tmp_path, prefix="model.diffusion_model."):
  """The checkpoint rewritten in Wan's own key layout (as causal-video repos ship it)."""
  tensors = open_checkpoint(path)
  rename = {}
  for d_key, w_key, _ in wan.TABLE.values():
    for i in range(2):
      rename[d_key.format(i=i)] = w_key.format(i=i)
  sd = {prefix + rename[k]: np.array(tensors[k]) for k in tensors.keys()}
  save_file(sd, str(tmp_path / "wan.safetensors"))
  return tmp_path / "wan.safetensors", {rename[k]: np.array(tensors[k]) for k in tensors.keys()}


def test_wan_key_layout_loads_the_same_parameters(wan_dir, tmp_path):
  path, _ = wan_dir
  cfg, lc = our_config(path)
  file, wan_sd = wan_layout(path, tmp_path)
  # our Wan column agrees with diffusers' own converter from Wan's layout to its own
  from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
  assert set(convert_wan_transformer_to_diffusers(dict(wan_sd))) == set(open_checkpoint(path).keys())
  a, b = wan.load_wan_dit(path, cfg, lc), wan.load_wan_dit(file, cfg, lc)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_sharded_load_reads_only_each_devices_block(wan_dir, monkeypatch):
  path, _ = wan_dir
  cfg, lc = our_config(path)
  mesh = sh.make_mesh(dict(data=1, fsdp=4, tensor=2))
  sizes = []
  real = wan.read_block
  monkeypatch.setattr(wan, "read_block", lambda *a: sizes.append(real(*a).size) or real(*a))
  state = wan.load_wan_dit(path, cfg, lc, mesh=mesh)
  full = wan.load_wan_dit(path, cfg, lc)
  q = state["blocks"]["self_attn"]["q"]["kernel"][...]  # [L, d, d] over (fsdp, tensor)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert {s.data.shape for s in q.addressable_shards} == {(2, 8, 16)}
  assert min(sizes) < 32 * 32  # whole layers were never read for the sharded kernels
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(full)):
    np.testing.assert_array_equal(x, y)


def test_editing_model_starts_as_the_video_model(wan_dir):
  """concat_prev adds input channels; their kernels load as zeros, so the output is unchanged."""
  path, model = wan_dir
  cfg, lc = our_config(path, concat_prev=True)
  state = wan.load_wan_dit(path, cfg, lc)
  x, text = inputs(frames=2)
  t = np.full((2, 2), 0.5, np.float32)
  graphdef = nnx.split(nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=lc, rngs=nnx.Rngs(0))))[0]
  cond = np.random.default_rng(3).standard_normal(x.shape[:-1] + (C + 1,)).astype(np.float32)
  text4 = jnp.broadcast_to(text[:, None], (2, 2) + text.shape[1:])
  out, _ = nnx.merge(graphdef, state)(x, t, text4, jnp.ones((2, 2, TEXT_LEN), bool),
                                      jnp.broadcast_to(jnp.arange(2), (2, 2)), cond=cond, causal=False)
  assert rel_err(out, run_theirs(model, x, np.full((2,), 500.0), text)) <= 1e-5


def _rewrite(path, tmp_path, edit):
  sd = {k: np.array(v) for k, v in ((k, open_checkpoint(path)[k]) for k in open_checkpoint(path).keys())}
  edit(sd)
  save_file(sd, str(tmp_path / "bad.safetensors"))
  return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.attn2.to_k.weight"), "1 keys missing from the checkpoint: blocks.1.attn2.to_k.weight"),
    (lambda sd: sd.update({"blocks.0.attn2.add_k_proj.weight": np.zeros((32, 8), np.float32)}),
     "not used by CausalDiT: blocks.0.attn2.add_k_proj.weight"),
    (lambda sd: sd.update({"proj_out.weight": np.zeros((8, 32), np.float32)}), "wrong shape: proj_out.weight"),
])
def test_bad_checkpoints_are_refused_in_one_line(wan_dir, tmp_path, edit, message):
  path, _ = wan_dir
  cfg, lc = our_config(path)
  with pytest.raises(ValueError, match=message.replace(".", r"\.")) as e:
    wan.load_wan_dit(_rewrite(path, tmp_path, edit), cfg, lc)
  assert "\n" not in str(e.value)


def test_other_sizes_families_and_pickles_are_refused(wan_dir, tmp_path):
  path, _ = wan_dir
  cfg, lc = our_config(path)
  with pytest.raises(ValueError, match="another model size than this config.*layers: checkpoint 2 vs config 3"):
    wan.load_wan_dit(path, our_config(path, layers=3)[0], lc)
  save_file({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(tmp_path / "vae.safetensors"))
  with pytest.raises(ValueError, match="not a Wan2.1 transformer checkpoint"):
    wan.load_wan_dit(tmp_path / "vae.safetensors", cfg, lc)
  (tmp_path / "model.pt").write_bytes(b"\x80\x04not to be unpickled")
  with pytest.raises(ValueError, match="pickle checkpoint, which is never unpickled.*save_file"):
    wan.load_wan_dit(tmp_path / "model.pt", cfg, lc)
  with pytest.raises(FileNotFoundError, match="not found"):
    wan.load_wan_dit(tmp_path / "nowhere", cfg, lc)
  pipeline = tmp_path / "pipeline"
  shutil.copytree(path, pipeline / "transformer")  # a whole diffusers pipeline directory works too
  assert jax.tree.leaves(wan.load_wan_dit(pipeline, cfg, lc))


@pytest.mark.parametrize("preset, approx", [("wan1.3b", 1.42e9), ("wan14b", 14.29e9)])
def test_full_size_presets_have_diffusers_parameter_count(preset, approx):
  """eval_shape only: no weights are allocated on either side (torch builds on the meta device)."""
  m = common.model_config(preset)
  model = nnx.eval_shape(lambda: CausalDiT(m, latent_channels=m.latent_channels, rngs=nnx.Rngs(0)))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  in_ch = model.patch_embed.kernel.shape[0] // m.patch ** 2  # 33 with concat_prev: 16 + 16 + flag
  with torch.device("meta"):
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, m.patch, m.patch), num_attention_heads=m.heads,
        attention_head_dim=m.dim // m.heads, in_channels=in_ch, out_channels=m.latent_channels,
        text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim, num_layers=m.layers)
  assert ours == sum(p.numel() for p in ref.parameters())
  assert abs(ours - approx) / approx < 0.01, ours


def test_one_shared_instruction_equals_it_repeated_per_turn(wan_dir):
  """text [b,1,...] (projected once, as a video prompt) gives what text repeated per turn gives."""
  path, model = wan_dir
  cfg, lc = our_config(path)
  state = wan.load_wan_dit(path, cfg, lc)
  x, text = inputs()
  t = np.full((2, 3), 0.5, np.float32)
  graphdef = nnx.split(nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=lc, rngs=nnx.Rngs(0))))[0]
  shared, _ = nnx.merge(graphdef, state)(x, t, text[:, None], jnp.ones((2, 1, TEXT_LEN), bool),
                                         jnp.broadcast_to(jnp.arange(3), (2, 3)), causal=False)
  assert rel_err(shared, run_ours(cfg, lc, state, x, t, text, causal=False)) <= 1e-6
  assert rel_err(shared, run_theirs(model, x, np.full((2,), 500.0), text)) <= 1e-5


def test_vs_pytorch_benchmark_runs_and_agrees(tmp_path, capsys):
  from benchmark import vs_pytorch
  vs_pytorch.main(["--layers", "1", "--dim", "128", "--tokens", "16", "--text-len", "8",
                   "--text-dim", "16", "--reps", "1", "--no-compile", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "vs_pytorch.json").read_text())
  assert result["max_abs_diff"] < 1e-4 and set(result["median_s"]) == {"ours (jax.jit)", "diffusers eager"}
  assert "ours / best PyTorch" in capsys.readouterr().out


def test_a_checkpoint_with_another_norm_eps_is_refused(wan_dir):
  """Our norms are built with Wan2.1's eps (1e-6); a checkpoint made with another would load and
  compute something else (1e-4 relative error at eps 1e-4), so it is refused by name."""
  path, _ = wan_dir
  config = json.loads((path / "config.json").read_text())
  assert config["eps"] == 1e-6 and wan.model_fields(config)["dim"] == 32
  with pytest.raises(ValueError, match="norms use eps 0.0001; this implementation uses Wan2.1's 1e-6"):
    wan.model_fields(dict(config, eps=1e-4))


def test_padded_text_follows_wans_convention(wan_dir):
  """Wan2.1 (and the authors) cross-attend to every text position, the zero-padded ones too, with
  no mask: `model.text_padding="attend"` (the wan presets' default) gives exactly what diffusers
  computes from zero-padded embeddings; masking the padding out ("masked") is another function."""
  path, model = wan_dir
  cfg, lc = our_config(path)
  state = wan.load_wan_dit(path, cfg, lc)
  x, text = inputs(frames=2)
  text[:, 3:] = 0.0  # 3 real tokens, then umT5's zero padding
  t = np.array([0.5, 0.25], np.float32)
  theirs = run_theirs(model, x, t * 1000, text)
  graphdef = nnx.split(nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=lc, rngs=nnx.Rngs(0))))[0]
  tt, tx = np.repeat(t[:, None], 2, 1), jnp.broadcast_to(jnp.asarray(text)[:, None], (2, 2) + text.shape[1:])
  real = jnp.arange(TEXT_LEN) < 3
  # what EditModel.encode_text hands the DiT under each convention
  for padding, mask in (("attend", jnp.ones(tx.shape[:3], bool)),
                        ("masked", jnp.broadcast_to(real, tx.shape[:3]))):
    small = common.model_config("smoke")
    small.text_padding = padding
    m = build(small, nnx.Rngs(0))
    emb, got = m.encode_text(jnp.asarray([[65, 66, 67] + [0] * 61]))
    assert bool(got.all()) == (padding == "attend")
    if padding == "attend":
      assert float(jnp.abs(emb[0, 3:]).max()) == 0.0  # padding reaches the DiT as zeros
    out, _ = nnx.merge(graphdef, state)(x, tt, tx, mask, jnp.broadcast_to(jnp.arange(2), (2, 2)), causal=False)
    err = rel_err(np.asarray(out), theirs)
    assert (err <= 1e-5) if padding == "attend" else (err > 1e-3), (padding, err)
  wan13 = common.model_config("wan1.3b")
  assert (wan13.text_padding, wan13.rope_stride) == ("attend", 4)
  assert common.model_config("toy").text_padding == "masked"


def test_wans_own_config_layout_reads_as_the_diffusers_one():
  """Wan2.1's release ships WanModel's config.json (dim, num_heads, in_dim, qk_norm true), not
  diffusers' names: both give the same model fields (the 1.3B's values), and its eps is checked."""
  own = {"_class_name": "WanModel", "model_type": "t2v", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
         "freq_dim": 256, "in_dim": 16, "num_heads": 12, "num_layers": 30, "out_dim": 16,
         "text_len": 512, "qk_norm": True, "cross_attn_norm": True}
  diffusers = {"num_attention_heads": 12, "attention_head_dim": 128, "num_layers": 30, "ffn_dim": 8960,
               "freq_dim": 256, "text_dim": 4096, "in_channels": 16, "out_channels": 16,
               "patch_size": [1, 2, 2], "eps": 1e-6, "qk_norm": "rms_norm_across_heads", "cross_attn_norm": True}
  assert wan.model_fields(own) == wan.model_fields(diffusers)
  assert wan.model_fields(own)["dim"] == 1536 and wan.model_fields(own)["heads"] == 12
  with pytest.raises(ValueError, match="norms use eps"):
    wan.model_fields(dict(own, eps=1e-5))
  with pytest.raises(ValueError, match="Wan i2v model"):
    wan.model_fields(dict(own, model_type="i2v"))
  with pytest.raises(ValueError, match="another q/k"):
    wan.model_fields(dict(own, qk_norm=False))
