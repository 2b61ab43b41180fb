"""The CLIP and DINOv2 ports equal transformers on tiny random checkpoints saved as safetensors;
preprocessing equals transformers' PIL image processors; every metric equals a direct numpy /
torch computation; bad folders and inputs give one-line errors; the multi-turn benchmark scores
your own shards with them."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.numpy import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402

from anchoredit_jax.data import export_wds  # noqa: E402
from anchoredit_jax.eval import multiturn as mt, similarity  # noqa: E402
from benchmark import multiturn as bench  # noqa: E402
from anchoredit_jax.eval.similarity import Scorer, l1, l2, read_preprocessing  # noqa: E402
from anchoredit_jax.models import vit  # noqa: E402
from anchoredit_jax.models.clip import load_clip  # noqa: E402
from anchoredit_jax.models.dinov2 import load_dinov2  # noqa: E402
from tests.helpers import ROOT, rel_err  # noqa: E402

TEXTS = ["make the sky red", "add a small cat on the left",
         "turn the car blue and make it shiny and then remove the tree and the dog"]
SPECIALS = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]  # ids 0..3
PAD, BOS, EOS = 1, 2, 3
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _perturbed(model, seed):
  """A transformers model in eval mode with every weight moved off its init."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _tokenizer(path):
  """A CLIP-like word tokenizer (bos text eos, padded with pad) learnt from TEXTS."""
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>",
      special_tokens=[("<|startoftext|>", BOS), ("<|endoftext|>", EOS)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|startoftext|>",
      eos_token="<|endoftext|>")
  fast.save_pretrained(path)
  return len(fast)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip")
  vocab = _tokenizer(path)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=12, hidden_act="gelu",
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=24)
  model = _perturbed(transformers.CLIPModel(config), 0)
  model.save_pretrained(path, safe_serialization=True)
  transformers.CLIPImageProcessorPil(size={"shortest_edge": 36},
                                     crop_size={"height": 32, "width": 32}).save_pretrained(path)
  return model, str(path)


def _dino_folder(path, registers):
  if registers:
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        num_register_tokens=2, use_swiglu_ffn=True)
    model, crop = transformers.Dinov2WithRegistersModel(config), {"height": 24, "width": 40}
  else:  # stored grid 6x6 used at 4x4, as facebook's 37x37 is at 224 pixels
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=48, patch_size=8)
    model, crop = transformers.Dinov2Model(config), {"height": 32, "width": 32}
  model = _perturbed(model, 1 + registers)
  model.save_pretrained(path, safe_serialization=True)
  transformers.BitImageProcessorPil(size={"shortest_edge": 40}, crop_size=crop,
                                    **IMAGENET).save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
  return _dino_folder(tmp_path_factory.mktemp("dino"), registers=False)


@pytest.fixture(scope="module")
def dino_registers(tmp_path_factory):
  return _dino_folder(tmp_path_factory.mktemp("dino_registers"), registers=True)


@pytest.fixture(scope="module")
def scorer(clip, dino):
  return Scorer(clip=clip[1], dino=dino[1], batch_size=2)  # 3 images: the last batch padded


def _images(seed, n=3, shape=(37, 51)):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape, 3), dtype=np.uint8)


def _nchw(x):
  return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)


def _hf_pixels(path, images, cls):
  """transformers' pixel_values [n,3,h,w] of uint8 images by the folder's processor (`cls`, its
  PIL backend)."""
  return cls.from_pretrained(path)(list(images), return_tensors="pt")["pixel_values"]


def test_clip_matches_transformers(clip, tmp_path):
  model, path = clip
  graphdef, params, config = load_clip(path)
  acts = config["text_config"]["hidden_act"], config["vision_config"]["hidden_act"]
  assert acts == ("gelu", "quick_gelu")  # the config's, and the default the file omits
  image = jax.jit(lambda p, x: nnx.merge(graphdef, p).image_features(x))
  text = jax.jit(lambda p, t, m: nnx.merge(graphdef, p).text_features(t, m))
  pixels = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=_nchw(pixels)).pooler_output.numpy()
  assert rel_err(image(params, pixels), ref) <= 1e-5
  tok = transformers.AutoTokenizer.from_pretrained(path)
  batch = tok(TEXTS, padding="max_length", truncation=True, max_length=12, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert (ids[:, 0] == BOS).all() and ids[2, -1] == EOS and (ids[:2, -1] == PAD).all()  # truncated
  with torch.no_grad():
    ref = model.get_text_features(input_ids=torch.tensor(ids),
                                  attention_mask=torch.tensor(mask)).pooler_output.numpy()
  assert rel_err(text(params, ids, mask), ref) <= 1e-5
  assert rel_err(text(params, ids, np.ones_like(mask)), ref) <= 1e-5  # right padding: no effect
  # a config with eos_token_id 2 (from before transformers' fix) pools at the largest token id
  legacy = tmp_path / "legacy"
  shutil.copytree(path, legacy)
  raw = json.loads((legacy / "config.json").read_text())
  raw["text_config"]["eos_token_id"] = 2
  (legacy / "config.json").write_text(json.dumps(raw))
  graphdef, params, _ = load_clip(legacy)
  text = jax.jit(lambda p, t: nnx.merge(graphdef, p).text_features(t))
  model.text_model.eos_token_id = 2
  try:
    with torch.no_grad():
      ref = model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
  finally:
    model.text_model.eos_token_id = EOS
  assert rel_err(text(params, ids), ref) <= 1e-5


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_matches_transformers(registers, dino, dino_registers):
  model, path = dino_registers if registers else dino
  graphdef, params, config = load_dinov2(path)
  assert config["num_register_tokens"] == (2 if registers else 0)
  run = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  rng = np.random.default_rng(1)
  # the stored grid as is, and resampled: smaller (plain) / taller and narrower (registers)
  for hw in ((32, 32), (24, 40)) if registers else ((48, 48), (32, 32)):
    pixels = rng.normal(size=(2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
      ref = model(pixel_values=_nchw(pixels)).pooler_output.numpy()
    assert rel_err(run(params, pixels), ref) <= 1e-5, hw


def test_bicubic_weights_match_torch():
  table = torch.randn(1, 3, 6, 6)
  for antialias in (False, True):
    for size in ((4, 9), (3, 3), (13, 5)):
      ref = torch.nn.functional.interpolate(table, size=size, mode="bicubic", align_corners=False,
                                            antialias=antialias)[0].permute(1, 2, 0).numpy()
      ours = vit.resample_grid(jnp.asarray(table[0].permute(1, 2, 0).numpy()), size, antialias)
      np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_preprocessing_matches_transformers(clip, dino, dino_registers, tmp_path):
  odd = [_images(s, 1, shape) for s, shape in enumerate(((37, 51), (50, 29), (31, 31), (23, 64)))]
  # openai's old file (int sizes, a feature extractor) and one smaller than its crop (zero-padded)
  legacy, small = tmp_path / "legacy", tmp_path / "small"
  legacy.mkdir()
  (legacy / "preprocessor_config.json").write_text(json.dumps(dict(
      feature_extractor_type="CLIPFeatureExtractor", size=36, crop_size=32, do_resize=True,
      do_center_crop=True, do_normalize=True, resample=3,
      image_mean=list(similarity.OPENAI_CLIP_MEAN), image_std=list(similarity.OPENAI_CLIP_STD))))
  transformers.CLIPImageProcessorPil(do_resize=False, crop_size={"height": 40, "width": 34}
                                     ).save_pretrained(small)
  clip_pil, bit_pil = transformers.CLIPImageProcessorPil, transformers.BitImageProcessorPil
  for folder, cls in ((clip[1], clip_pil), (dino[1], bit_pil), (dino_registers[1], bit_pil),
                      (legacy, clip_pil), (small, clip_pil)):
    prep = read_preprocessing(folder)
    for image in odd:
      ref = cls.from_pretrained(folder)(list(image), return_tensors="np")["pixel_values"]
      ours = prep(image)
      assert ours.dtype == np.float32 and ours.shape == ref.transpose(0, 2, 3, 1).shape
      np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


def test_metrics_equal_direct_computation(scorer, clip, dino):
  out, ref = _images(10), _images(11)
  a, b = out / 255.0, ref / 255.0
  by_hand = lambda f: [f(a[i] - b[i]).mean() for i in range(3)]
  np.testing.assert_allclose(l1(out, ref), by_hand(np.abs), rtol=1e-12)
  np.testing.assert_allclose(l2(out, ref), by_hand(np.square), rtol=1e-12)
  assert l1(out, out).tolist() == [0, 0, 0] and l1(out, ref).shape == (3,)
  cos = torch.nn.functional.cosine_similarity
  with torch.no_grad():
    clip_model, dino_model = clip[0], dino[0]
    image = lambda x: clip_model.get_image_features(pixel_values=_hf_pixels(
        clip[1], x, transformers.CLIPImageProcessorPil)).pooler_output
    tok = transformers.AutoTokenizer.from_pretrained(clip[1])
    ids = tok(TEXTS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    text = clip_model.get_text_features(**ids).pooler_output
    feat = lambda x: dino_model(pixel_values=_hf_pixels(
        dino[1], x, transformers.BitImageProcessorPil)).pooler_output
    want_i, want_t = cos(image(out), image(ref)).numpy(), cos(image(out), text).numpy()
    want_dino = cos(feat(out), feat(ref)).numpy()
  np.testing.assert_allclose(scorer.clip_i(out, ref), want_i, rtol=0, atol=1e-5)
  np.testing.assert_allclose(scorer.clip_t(out, TEXTS), want_t, rtol=0, atol=1e-5)
  np.testing.assert_allclose(scorer.dino(out, ref), want_dino, rtol=0, atol=1e-5)
  np.testing.assert_allclose(scorer.clip_i(out, out), 1, atol=1e-6)


def _one_line(kind, pattern, call):
  with pytest.raises(kind, match=pattern) as e:
    call()
  assert "\n" not in str(e.value)


def test_bad_inputs_give_one_line_errors(scorer, dino):
  good = _images(0, 2)
  _one_line(ValueError, "must be uint8", lambda: scorer.clip_i(good / 255.0, good))
  _one_line(ValueError, r"uint8 \[n,H,W,3\].*got shape \[2, 37, 51\]",
            lambda: scorer.dino(good[..., 0], good))
  _one_line(ValueError, "got shape \\[2, 37, 51, 4\\]",
            lambda: l1(np.zeros((2, 37, 51, 4), np.uint8), good))
  _one_line(ValueError, "do not pair up", lambda: l2(good, good[:, :20]))
  _one_line(ValueError, "do not pair up", lambda: scorer.clip_i(good, good[:1]))
  _one_line(ValueError, "non-empty text; empty at \\[1\\]",
            lambda: scorer.clip_t(good, ["a cat", " "]))
  _one_line(ValueError, "2 images need 2 instructions, got 1",
            lambda: scorer.clip_t(good, ["a cat"]))
  _one_line(ValueError, "no CLIP model; pass clip=FOLDER",
            lambda: Scorer(dino=dino[1]).clip_t(good, ["a", "b"]))
  _one_line(ValueError, "needs a CLIP folder, a DINOv2 folder or both", Scorer)


def _edited(path, out, edit_tensors):
  shutil.copytree(path, out)
  tensors = load_file(f"{path}/model.safetensors")
  edit_tensors(tensors)
  save_file(tensors, str(out / "model.safetensors"))
  return str(out)


def test_bad_folders_give_one_line_errors(clip, dino, tmp_path):
  _one_line(FileNotFoundError, "CLIP folder .*nowhere not found; download one",
            lambda: load_clip(tmp_path / "nowhere"))
  _one_line(FileNotFoundError, "has no config.json", lambda: load_dinov2(tmp_path))
  _one_line(ValueError, "model_type 'dinov2', not clip; pass a CLIP folder",
            lambda: load_clip(dino[1]))
  _one_line(ValueError, "model_type 'clip', not dinov2 or dinov2_with_registers",
            lambda: load_dinov2(clip[1]))
  pickles = tmp_path / "pickles"
  pickles.mkdir()
  shutil.copy(f"{clip[1]}/config.json", pickles)
  (pickles / "pytorch_model.bin").write_bytes(b"never read")
  _one_line(ValueError, "pytorch_model.bin is a pickle checkpoint, which is never unpickled",
            lambda: load_clip(pickles))
  _one_line(ValueError, "is a pickle checkpoint",
            lambda: load_dinov2(pickles / "pytorch_model.bin"))
  _one_line(FileNotFoundError, "preprocessor_config.json not found",
            lambda: read_preprocessing(pickles))
  (pickles / "config.json").write_text("{")
  _one_line(ValueError, "config.json is not valid JSON", lambda: load_clip(pickles))

  def damage(t):
    t.pop("visual_projection.weight")
    t["text_model.extra"] = np.zeros(1, np.float32)
    t["logit_scale"] = np.zeros((1,), np.float32)
  _one_line(ValueError, "does not match its config: 1 missing \\(visual_projection.weight\\); 1 "
            "unexpected \\(text_model.extra\\); 1 with the wrong shape \\(logit_scale \\[1\\] "
            "\\(config: \\[\\]\\)\\); check that config.json and the weights come from the "
            "same CLIP",
            lambda: load_clip(_edited(clip[1], tmp_path / "damaged", damage)))
  # transformers < 4.31 stored the position_ids buffers: accepted when they are 0, 1, 2, ...
  ids = lambda n: np.arange(n, dtype=np.int64)[None]
  old = _edited(clip[1], tmp_path / "old", lambda t: t.update({
      "text_model.embeddings.position_ids": ids(12),
      "vision_model.embeddings.position_ids": ids(17)}))
  load_clip(old)
  _one_line(ValueError, "position_ids is not 0, 1, 2",
            lambda: load_clip(_edited(old, tmp_path / "shuffled", lambda t: t.update({
                "text_model.embeddings.position_ids": ids(12)[:, ::-1].copy()}))))


def test_the_benchmark_scores_your_own_shards(clip, dino, tmp_path, monkeypatch):
  """benchmark.multiturn --data: the shipped student on validation shards of your own (here
  ShapesEdit written as shards), scored with the papers' metrics, each equal to the metric
  computed directly on the saved outputs; tables and plots written."""
  export_wds.export(str(tmp_path / "val"), sequences=3, turns=2, res=32, split="heldout")
  shards, ckpt = str(tmp_path / "val" / "*.tar"), os.path.join(ROOT, "checkpoints/toy/distill")
  s = Scorer(clip=clip[1], dino=dino[1], batch_size=4)
  results, seqs, traj, _ = mt.evaluate(["i"], [], sequences=3, turns=2, batch_size=3, keep=3,
                                       data=shards, scorer=s, checkpoint=ckpt, log=lambda *_: None)
  r = results["i"]
  assert set(r["per_turn"]) == {"l1", "l2", "psnr", "clip_i", "clip_t", "clip_i_source", "dino",
                                "dino_source"}
  out, gt = traj["i"], seqs["images"]
  for k in range(2):
    np.testing.assert_allclose(r["per_turn"]["l1"][k], l1(out[:, k], gt[:, k + 1]).mean(), rtol=1e-6)
    np.testing.assert_allclose(r["per_turn"]["dino_source"][k], s.dino(out[:, k], gt[:, 0]).mean(), rtol=1e-5)
    texts = [seqs["instructions"][j][k] for j in range(3)]
    np.testing.assert_allclose(r["per_turn"]["clip_t"][k], s.clip_t(out[:, k], texts).mean(), rtol=1e-5)
  lo, hi = r["stats"]["l1"]["ci"][1]
  assert lo <= r["stats"]["l1"]["value"][1] <= hi
  # the command: the same run written out, and a missing folder is one error line
  monkeypatch.chdir(ROOT)
  bench.main(["--systems", "i", "--checkpoint", ckpt, "--data", shards, "--sequences", "3",
              "--turns", "2", "--batch-size", "3", "--metrics", "l1,clip", "--clip", clip[1],
              "--context", "both", "--out", str(tmp_path / "bench")])
  table = (tmp_path / "bench" / "table.md").read_text()
  assert "CLIP-T to the instruction" in table and "ground-truth turns as context" in table
  assert "sequences of your data" in table and (tmp_path / "bench" / "drift.png").exists()
  sheet = np.asarray(Image.open(tmp_path / "bench" / "contact.png").convert("RGB"))
  assert sheet.shape[1] == 150 + 48 * 3  # labels, then the source and 2 turns
  for t in range(3):  # sequence 0's ground-truth row is your data's images
    want = np.asarray(Image.fromarray(gt[0, t]).resize((48, 48), Image.NEAREST))
    np.testing.assert_array_equal(sheet[:48, 150 + 48 * t:198 + 48 * t], want)
  with pytest.raises(SystemExit) as e:
    bench.main(["--data", shards, "--metrics", "dino"])
  assert e.value.code == 2
