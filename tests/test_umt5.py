"""The umT5 port equals transformers' UMT5EncoderModel on a tiny random checkpoint saved as
safetensors; tokenizer, loaders and the embedding precompute work offline; bad checkpoints give
one-line errors."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from anchoredit_jax.models.text import TextEncoder  # noqa: E402
from tests.helpers import word_tokenizer  # noqa: E402
from anchoredit_jax.models.umt5 import (  # noqa: E402
    load_umt5, precompute_text_embeddings, relative_position_buckets)
from anchoredit_jax.data.tokenize import load_tokenizer, tokenize_hf as tokenize  # noqa: E402

TINY = dict(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
MAX_LEN = 24  # longer than the max distance, so the saturated buckets are used too
INSTRUCTIONS = ["make the sky red", "add a small cat on the left",
                "turn the car blue and make it shiny and then remove the tree " * 3]


def _random(cls, config, seed=0):
  """A transformers model in eval mode with every weight moved off its init (norm scales off 1)."""
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _save(model, path):
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


def _reference(model, ids):
  """Last hidden state [b,l,d] of the torch encoder with padding masked, padding zeroed."""
  encoder = model.encoder if isinstance(model, transformers.UMT5Model) else model
  mask = torch.tensor(ids != 0)
  with torch.no_grad():
    out = encoder(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask)
  return (out.last_hidden_state * mask[..., None]).numpy()


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return word_tokenizer(INSTRUCTIONS, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokens(tokenizer_dir):
  return tokenize(load_tokenizer(tokenizer_dir), INSTRUCTIONS, MAX_LEN)


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
  model = _random(transformers.UMT5EncoderModel, transformers.UMT5Config(**TINY))
  return model, _save(model, tmp_path_factory.mktemp("umt5"))


def test_tokenize_pads_truncates_and_ends_with_eos(tokens):
  assert tokens.dtype == np.int32 and tokens.shape == (3, MAX_LEN)
  lengths = (tokens != 0).sum(-1)
  assert lengths[0] == 5 and lengths[1] == 8 and lengths[2] == MAX_LEN  # 4 and 7 words + eos
  assert all(t[n - 1] == 1 for t, n in zip(tokens, lengths))  # eos kept when truncating
  assert (tokens[:2, 8:] == 0).all() and (tokens != 2).all()  # padded; every word known


def test_matches_transformers_on_a_padded_batch(umt5, tokens):
  model, path = umt5
  encoder = load_umt5(path, max_len=MAX_LEN)
  assert set(TextEncoder.__annotations__) == {"max_len", "dim"}  # the protocol's attributes
  assert encoder.dim == 32 and encoder.max_len == MAX_LEN
  emb, mask = encoder(jnp.asarray(tokens))
  ref = _reference(model, tokens)
  assert emb.shape == (3, MAX_LEN, 32) and emb.dtype == jnp.float32
  np.testing.assert_array_equal(mask, tokens != 0)
  assert (np.asarray(emb)[~np.asarray(mask)] == 0).all()
  assert _rel_err(emb, ref) <= 1e-5, _rel_err(emb, ref)
  # the per-layer tables matter: dropping layer 1's position bias must change the output
  encoder.blocks[1].attn.relative_bias.set_value(jnp.zeros((8, 4)))
  assert _rel_err(encoder(jnp.asarray(tokens))[0], ref) > 1e-3


@pytest.mark.parametrize("kind", ["UMT5Model", "T5EncoderModel"])
def test_full_model_keys_and_t5_shared_bias(kind, tmp_path, tokens):
  """UMT5Model files carry a decoder (ignored); T5 keeps one position-bias table in layer 0."""
  if kind == "UMT5Model":
    model = _random(transformers.UMT5Model, transformers.UMT5Config(**TINY), seed=1)
  else:
    model = _random(transformers.T5EncoderModel,
                    transformers.T5Config(**TINY, feed_forward_proj="gated-gelu"), seed=2)
  encoder = load_umt5(_save(model, tmp_path), max_len=MAX_LEN)
  assert _rel_err(encoder(jnp.asarray(tokens))[0], _reference(model, tokens)) <= 1e-5


def test_sharded_single_file_bare_and_bfloat16_load(umt5, tmp_path, tokens):
  model, path = umt5
  run = lambda source, dtype=jnp.float32: load_umt5(source, dtype=dtype, max_len=MAX_LEN)(
      jnp.asarray(tokens))[0]
  expect = run(path)
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  single = tmp_path / "single"  # a file of another name, its config.json beside it
  single.mkdir()
  shutil.copy(os.path.join(path, "model.safetensors"), single / "encoder.safetensors")
  shutil.copy(os.path.join(path, "config.json"), single)
  for source in (sharded, str(single / "encoder.safetensors")):
    np.testing.assert_array_equal(run(source), expect)
  # bfloat16 weights (as Wan2.1 ships them) with the T5-family max distance of 128, which a
  # bare file without config.json is assumed to have
  config = transformers.UMT5Config(**{**TINY, "relative_attention_max_distance": 128})
  half = _random(transformers.UMT5EncoderModel, config, seed=3).to(torch.bfloat16)
  bf16 = _save(half, tmp_path / "bf16")
  bare = tmp_path / "bare.safetensors"
  shutil.copy(os.path.join(bf16, "model.safetensors"), bare)
  np.testing.assert_array_equal(run(str(bare), jnp.bfloat16), run(bf16, jnp.bfloat16))
  assert run(bf16, jnp.bfloat16).dtype == jnp.bfloat16
  # read exactly: in float32 it equals the torch model on the same bfloat16-rounded weights
  assert _rel_err(run(str(bare)), _reference(half.float(), tokens)) <= 1e-5


def test_bucket_table_matches_transformers():
  from transformers.models.umt5.modeling_umt5 import UMT5Attention
  for buckets, distance, length in ((32, 128, 512), (8, 16, MAX_LEN)):  # Wan2.1's and the tiny one
    config = transformers.UMT5Config(**{**TINY, "relative_attention_num_buckets": buckets,
                                        "relative_attention_max_distance": distance})
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = UMT5Attention(config, has_relative_attention_bias=True)._relative_position_bucket(rel)
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance), ref.numpy())


def test_precompute_matches_the_encoder_and_leading_axes(umt5, tokens):
  encoder = load_umt5(umt5[1], max_len=MAX_LEN)
  emb, mask = precompute_text_embeddings(encoder, tokens, batch_size=2)  # last batch padded
  direct, direct_mask = encoder(jnp.asarray(tokens))
  assert emb.dtype == np.float16 and emb.shape == (3, MAX_LEN, 32) and mask.dtype == bool
  np.testing.assert_array_equal(mask, direct_mask)
  np.testing.assert_allclose(emb.astype(np.float32), direct, rtol=2e-3, atol=2e-3)
  nested, nested_mask = encoder(jnp.asarray(tokens)[:, None])  # [b, 1, l]
  assert nested.shape == (3, 1, MAX_LEN, 32) and nested_mask.shape == (3, 1, MAX_LEN)
  np.testing.assert_allclose(nested[:, 0], direct, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="built for 24"):
    encoder(jnp.asarray(tokens)[:, :12])


def _edited(path, out, edit_tensors=None, edit_config=None):
  """A copy of checkpoint `path` in `out` with its tensors dict / config dict edited in place."""
  from safetensors.numpy import load_file, save_file
  out.mkdir()
  tensors = load_file(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  (edit_tensors or (lambda t: None))(tensors)
  (edit_config or (lambda c: None))(config)
  save_file(tensors, str(out / "model.safetensors"))
  (out / "config.json").write_text(json.dumps(config))
  return str(out)


def test_loader_errors(umt5, tmp_path):
  path = umt5[1]
  drop_block_1 = lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.block.1.")]
  q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"
  wrong = lambda t: t.update({q0: np.zeros((16, 32), np.float32),
                              "encoder.block.0.layer.0.SelfAttention.extra.weight": np.zeros(1)})
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(open(os.path.join(path, "model.safetensors"), "rb").read()[:1000])
  pickles = tmp_path / "pickles"
  pickles.mkdir()
  (pickles / "pytorch_model.bin").write_bytes(b"never read")
  cases = {
      "pickle checkpoint, which is never unpickled here; convert it to safetensors":
          str(tmp_path / "pytorch_model.bin"),
      "pytorch_model.bin is a pickle checkpoint, which is never unpickled": str(pickles),
      # all 10 tensors of layer 1 gone: the count, the first three names, then an ellipsis
      "does not match its config: 10 missing \\(encoder.block.1.layer.0.SelfAttention.k.weight, "
      "encoder.block.1.layer.0.SelfAttention.o.weight, "
      "encoder.block.1.layer.0.SelfAttention.q.weight, ...\\); check that config.json":
          _edited(path, tmp_path / "missing", drop_block_1),
      "1 unexpected \\(encoder.block.0.layer.0.SelfAttention.extra.weight\\); 1 with the wrong "
      f"shape \\({q0} \\[16, 32\\] \\(config: \\[32, 32\\]\\)\\)":
          _edited(path, tmp_path / "wrong", wrong),
      "model_type 'bert', not umt5 or t5": _edited(
          path, tmp_path / "bert", edit_config=lambda c: c.update(model_type="bert")),
      "feed_forward_proj 'relu' is not ported": _edited(
          path, tmp_path / "relu", edit_config=lambda c: c.update(feed_forward_proj="relu")),
      "could not be read as safetensors": str(truncated),
  }
  for pattern, source in cases.items():
    with pytest.raises(ValueError, match=pattern) as e:
      load_umt5(source)
    assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="not found"):
    load_umt5(str(tmp_path / "nowhere"))


def test_tokenizer_errors(tokenizer_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer directory .* not found"):
    load_tokenizer(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="holds no loadable tokenizer"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="pads with id 0, the encoder masks id 5"):
    tokenize(load_tokenizer(tokenizer_dir), ["a"], 8, pad_id=5)
