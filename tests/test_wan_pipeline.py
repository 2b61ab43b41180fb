"""Training from a Wan2.1 diffusers folder: configs/wan/*.py read the model from the folder, stage 1
starts from its weights, umT5 and the VAE stay frozen, stage 2 follows. The folder is a tiny
random one written by diffusers / transformers themselves (transformer, vae, text_encoder,
tokenizer), so the same code path as for Wan2.1-T2V-1.3B-Diffusers is exercised."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from anchoredit_jax.checkpoint import flat_params, load_params  # noqa: E402
from anchoredit_jax.convert import wan  # noqa: E402
from anchoredit_jax.data import export_wds, shapes, wds  # noqa: E402
from anchoredit_jax.eval import multiturn as mt, report  # noqa: E402
from configs import common  # noqa: E402
from configs.wan import pretrain as wan_pretrain  # noqa: E402
from tests.helpers import tiny_wan_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, TEXT_DIM = 4, 32


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
  return tiny_wan_folder(tmp_path_factory.mktemp("Wan-tiny-Diffusers"), C, TEXT_DIM)


def test_config_follows_the_folder(wan_folder):
  cfg = wan_pretrain.get_config(f"smoke,dir={wan_folder}")
  m = cfg.model
  assert (m.dim, m.layers, m.heads, m.text_dim, m.latent_channels, m.ae_factor) == (32, 2, 2, 32, C, 8)
  assert m.text_encoder == "umt5" and m.autoencoder == "wan_vae" and m.umt5.num_layers == 2
  assert cfg.init_from == str(wan_folder) and m.tokenizer.endswith("tokenizer")
  with pytest.raises(ValueError, match="give the Wan2.1 diffusers folder"):
    wan_pretrain.get_config("smoke")
  with pytest.raises(FileNotFoundError, match=r"not a Wan2.1 diffusers folder \(no transformer/config.json"):
    wan_pretrain.get_config(f"smoke,dir={wan_folder / 'vae'}")
  # the full-size presets carry the umT5-XXL / Wan VAE architecture without a folder
  assert common.model_config("wan1.3b").umt5.num_layers == 24


def _train(config, workdir, *extra):
  cmd = [sys.executable, "-m", "anchoredit_jax.train", f"--config={config}", f"--workdir={workdir}",
         *extra]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")  # a real mesh
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_stages_1_and_2_train_from_the_folder_with_frozen_encoders(wan_folder, tmp_path):
  out = _train(f"configs/wan/pretrain.py:smoke,dir={wan_folder}", tmp_path / "pretrain",
               "--config.train.steps=2", "--config.eval.pairs=2", "--config.eval.batch_size=2")
  assert "initialised from the Wan2.1 weights" in out.stdout
  _, _, trained, step = load_params(tmp_path / "pretrain")
  assert step == 2
  cfg = wan_pretrain.get_config(f"smoke,dir={wan_folder}")
  loaded = flat_params(wan.load_wan_pipeline(wan_folder, cfg.model))
  trained = flat_params(trained)
  assert set(trained) == set(loaded)
  for k in trained:
    if k.startswith(("text/", "vae/")):  # frozen: exactly as loaded
      np.testing.assert_array_equal(trained[k], loaded[k], err_msg=k)
  moved = [k for k in trained if k.startswith("dit/") and not np.array_equal(trained[k], loaded[k])]
  assert len(moved) > 0.9 * sum(k.startswith("dit/") for k in trained)
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert np.isfinite(summary["loss"] if "loss" in summary else summary["step"])

  _train(f"configs/wan/causal.py:smoke,dir={wan_folder}", tmp_path / "causal",
         f"--config.init_from={tmp_path / 'pretrain'}", "--config.train.steps=1",
         "--config.eval.pairs=0")
  assert load_params(tmp_path / "causal")[3] == 1

  # your own shards of two shapes through the Wan VAE: aspect-ratio buckets of area <= 48^2
  # (sides in steps of the model's 16-pixel stride), one step per bucket shape
  wds.write_shard(str(tmp_path / "own.tar"), [
      {"key": f"s{i}", "instructions": ["make it red", "move it up"],
       "images": [np.full((h, w, 3), 40 * t + i, np.uint8) for t in range(3)]}
      for i, (h, w) in enumerate([(30, 60), (60, 30), (30, 62), (62, 30)] * 2)])
  out = _train(f"configs/wan/causal.py:smoke,dir={wan_folder}", tmp_path / "causal_own",
               f"--config.init_from={tmp_path / 'pretrain'}", "--config.train.steps=2",
               "--config.train.batch_size=4", "--config.eval.pairs=0", "--config.data.num_turns=2",
               "--config.data.source=wds", f"--config.data.shards={tmp_path / 'own.tar'}",
               "--config.data.bucket_base=48", "--config.data.bucket_step=16")
  rows = [json.loads(l) for l in (tmp_path / "causal_own" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["data_shapes"] == 2 and np.isfinite(rows[-1]["loss"])  # 32x64 and 64x32

  # the multi-turn benchmark at 256 x 256 through the Wan VAE (32 x 32 latents, 256 tokens a
  # turn), the instructions tokenized by the folder's tokenizer
  results, seqs, traj, _ = mt.evaluate(["ii4"], [str(tmp_path)], sequences=2, turns=2, res=256,
                                       batch_size=2, log=lambda *_: None)
  r = results["ii4"]
  assert seqs["images"].shape == (2, 3, 256, 256, 3) and traj["ii4"].shape == (2, 2, 256, 256, 3)
  assert seqs["tokens"].max() < 128  # the tiny word tokenizer's ids, not bytes
  assert len(r["per_turn"]["identity_psnr"]) == 2 and np.isfinite(r["per_turn"]["identity_psnr"]).all()
  assert 0.0 <= r["per_turn"]["success"][1] <= 1.0 and r["state_bytes"] > 0
  # ... and written out as the benchmark command writes it
  report.write_outputs(results, seqs, traj, {}, str(tmp_path / "bench"), {"command": "test"})
  written = json.loads((tmp_path / "bench" / "results.json").read_text())
  assert written["image_size"] == [256, 256]
  np.testing.assert_allclose(written["systems"]["ii4"]["per_turn"]["identity_psnr"], r["per_turn"]["identity_psnr"])
  assert "ii4" in (tmp_path / "bench" / "table.md").read_text()
  sheet = Image.open(tmp_path / "bench" / "contact.png")
  assert sheet.size == (150 + 48 * 3, 48 * 2 * 2 + 4 * 2)  # 2 sequences x (truth + ii4) rows


def test_loader_shards_the_dit_on_a_mesh(wan_folder):
  from anchoredit_jax import sharding as sh
  cfg = wan_pretrain.get_config(f"smoke,dir={wan_folder}")
  mesh = sh.make_mesh(dict(data=1, fsdp=4, tensor=2))
  params = wan.load_wan_pipeline(wan_folder, cfg.model, mesh=mesh)
  kernel = params["dit"]["blocks"]["ffn"]["fc1"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_stored_text_embeddings_stand_in_for_the_encoder(wan_folder, tmp_path):
  from flax import nnx

  from anchoredit_jax.data import text_store
  from anchoredit_jax.data.tokenize import tokenize_for
  from anchoredit_jax.models.model import abstract_split
  from anchoredit_jax.train import Trainer, make_data
  store = tmp_path / "store"
  p = subprocess.run([sys.executable, "-m", "anchoredit_jax.data.text_store",
                      f"--config=configs/wan/pretrain.py:smoke,dir={wan_folder}", f"--out={store}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert f"text store: {len(text_store.all_instructions())} instructions" in p.stdout
  cfg = wan_pretrain.get_config(f"smoke,dir={wan_folder}")
  arrays = text_store.load(store, cfg.model)
  assert arrays["emb"].shape[1] < cfg.model.text_len  # umT5's zero padding is kept once

  # every instruction of some held-out sequences is stored and looks up to the encoder's output
  texts = [""] + [t for s in range(6) for t in shapes.make_sequence(s, 4, 32, "heldout")["instructions"]]
  tokens = tokenize_for(cfg.model, texts)
  assert not text_store.missing(arrays, tokens).any()
  assert text_store.missing(arrays, tokenize_for(cfg.model, ["paint the sky green"])).all()
  graphdef, params = abstract_split(cfg.model)[0], wan.load_wan_pipeline(wan_folder, cfg.model)
  encode = lambda p, store=None: nnx.merge(graphdef, p).encode_text(jax.numpy.asarray(tokens), store)
  (emb, mask), (emb_s, mask_s) = encode(params), text_store.lookup(arrays, tokens)
  np.testing.assert_array_equal(mask_s, mask)
  np.testing.assert_allclose(emb_s, emb, atol=2e-3 * float(np.abs(emb).max()))
  assert text_store.check_against(graphdef, params, arrays) < 1e-2
  # with the store, the encoder is not run: no matrix product is left in encode_text
  assert "dot_general" in str(jax.make_jaxpr(encode)(params))
  assert "dot_general" not in str(jax.make_jaxpr(encode)(params, arrays))

  # one training step from the same weights and batch: the same loss with or without the store
  cfg.train.batch_size = 8
  batch = next(iter(make_data(cfg)))
  losses = []
  for path in ("", str(store)):
    cfg.data.text_store = path
    tr = Trainer(cfg)
    losses.append(float(tr.step(tr.with_params(params), batch, jax.random.key(0))[1]["loss"]))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
  bad = dict(batch, tokens=np.asarray(batch["tokens"]).copy())
  bad["tokens"][0, 0] = tokenize_for(cfg.model, ["paint the sky green"])[0]
  with pytest.raises(ValueError, match="1 instruction.s. of this batch are not in data.text_store"):
    tr.step(tr.with_params(params), bad, jax.random.key(0))

  # a store of your own data's instructions: one pass over the shards' JSON
  export_wds.export(str(tmp_path / "wds"), sequences=3, turns=2, res=32, split="heldout")
  texts = wds.instructions(str(tmp_path / "wds" / "*.tar"), ("en",))
  p = subprocess.run([sys.executable, "-m", "anchoredit_jax.data.text_store",
                      f"--config=configs/wan/pretrain.py:smoke,dir={wan_folder}",
                      f"--data={tmp_path / 'wds' / '*.tar'}", f"--out={tmp_path / 'own'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert f"text store: {len(texts) + 1} instructions" in p.stdout and len(texts) >= 4
  own = text_store.load(tmp_path / "own", cfg.model)
  assert not text_store.missing(own, tokenize_for(cfg.model, [""] + texts)).any()

  # a store for another encoder, a missing store, a trainable encoder: one-line errors
  meta = json.loads((store / "meta.json").read_text())
  (store / "meta.json").write_text(json.dumps(dict(meta, text_dim=64)))
  with pytest.raises(ValueError, match="made for another text encoder .text_dim: 64"):
    text_store.load(store, cfg.model)
  with pytest.raises(FileNotFoundError, match="holds no embeddings.safetensors; make it with"):
    text_store.load(tmp_path / "nothing", cfg.model)
  toy = common.model_config("smoke")
  p = subprocess.run([sys.executable, "-m", "anchoredit_jax.data.text_store",
                      "--config=configs/pretrain.py:smoke", f"--out={tmp_path / 'x'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and p.stderr.strip().splitlines() == [
      f"text_store: error: model.text_encoder={toy.text_encoder!r} trains with the DiT; only a "
      "frozen encoder (umt5) can have its embeddings stored"]
  assert not (tmp_path / "x").exists()
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "keep.txt").write_text("not a store")
  with pytest.raises(ValueError, match="exists and is not a text store"):
    text_store.save(tmp_path / "data", {}, [], cfg.model)
  assert (tmp_path / "data" / "keep.txt").read_text() == "not a store"


def test_every_generated_instruction_is_enumerated():
  from anchoredit_jax.data import text_store
  every = set(text_store.all_instructions())
  for s in range(300):
    for split in ("train", "heldout"):
      assert set(shapes.make_sequence(s, 6, 32, split)["instructions"]) <= every
