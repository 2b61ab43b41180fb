"""umT5 encoder (Wan2.1's instruction encoder) in Flax NNX, loaded from Hugging Face safetensors.

Letters: b batch, l query tokens, m key tokens, d d_model, h heads, k d_kv, f d_ff, v vocab,
r relative-position buckets.

A pre-norm transformer without absolute positions: every layer adds its own learned bias,
indexed by a bucketed (key - query) distance, to the attention logits (T5 keeps one table in
layer 0 for all layers; `shared_bias=True` reproduces that). Norms are RMS without mean
subtraction, the FFN is gated GELU (tanh approximation), and logits are not divided by
sqrt(k): T5 folds that factor into the initialisation of q.

`UMT5Encoder` is a `TextEncoder`: int32 tokens [..., l] -> (embeddings [..., l, d] with padded
positions zeroed, mask [..., l]), the last hidden state Wan2.1's pipeline feeds to the DiT.
"""
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import sharding as sh
from anchoredit_jax.convert.tensors import Tensors, check_keys, checkpoint_files
from anchoredit_jax.data.tokenize import PAD_ID
from anchoredit_jax.models.layers import Dense, RMSNorm, param



def relative_position_buckets(length, num_buckets, max_distance) -> np.ndarray:
  """[l, m] int32 bucket of each (query, key) pair for bidirectional attention."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [l,m] key minus query
  half = num_buckets // 2  # upper half of the buckets for keys after the query, lower for before
  exact = half // 2  # distances below this get a bucket each; beyond, log-spaced to max_distance
  dist = np.abs(rel)
  # float32 arithmetic like the PyTorch and Mesh-TF references, so the log-spaced bucket edges
  # fall on the same distances; maximum() keeps log() finite where the exact branch is used
  ratio = np.maximum(dist, exact).astype(np.float32) / np.float32(exact)
  scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
  far = np.minimum(exact + scaled.astype(np.int64), half - 1)
  return (np.where(rel > 0, half, 0) + np.where(dist < exact, dist, far)).astype(np.int32)


class _SelfAttention(nnx.Module):

  def __init__(self, d_model, d_kv, heads, num_buckets, *, rngs, has_bias=True):
    self.heads, self.d_kv = heads, d_kv
    inner = heads * d_kv
    self.q = Dense(d_model, inner, (sh.EMBED, sh.HEADS), rngs=rngs, use_bias=False)
    self.k = Dense(d_model, inner, (sh.EMBED, sh.HEADS), rngs=rngs, use_bias=False)
    self.v = Dense(d_model, inner, (sh.EMBED, sh.HEADS), rngs=rngs, use_bias=False)
    self.o = Dense(inner, d_model, (sh.HEADS, sh.EMBED), rngs=rngs, use_bias=False)
    self.relative_bias = (param(rngs, nnx.initializers.normal(0.02), (num_buckets, heads),
                                (None, sh.HEADS)) if has_bias else None)  # [r,h]

  def __call__(self, x, bias, mask):
    """x [b,l,d]; bias [h,l,m] float32; mask [b,m] bool (True = real token) -> [b,l,d]."""
    b, l, _ = x.shape
    split = lambda y: sh.constrain(y.reshape(b, l, self.heads, self.d_kv),
                                   (sh.BATCH, sh.LENGTH, sh.HEADS, sh.KV))
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # [b,l,h,k]
    # no 1/sqrt(k) here: T5-family weights were trained with it folded into q
    logits = jnp.einsum("blhk,bmhk->bhlm", q, k, preferred_element_type=jnp.float32) + bias
    # only keys are masked, as in the references: padded queries still get finite rows (their
    # outputs are zeroed at the end) and an all-padding row softmaxes to uniform, not NaN
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [b,h,l,m]
    return self.o(jnp.einsum("bhlm,bmhk->blhk", probs, v).reshape(b, l, -1))


class _Block(nnx.Module):

  def __init__(self, d_model, d_kv, heads, d_ff, num_buckets, eps, *, rngs, has_bias):
    self.attn_norm = RMSNorm(d_model, rngs=rngs, eps=eps)
    self.attn = _SelfAttention(d_model, d_kv, heads, num_buckets, rngs=rngs, has_bias=has_bias)
    self.ffn_norm = RMSNorm(d_model, rngs=rngs, eps=eps)
    self.wi_0 = Dense(d_model, d_ff, (sh.EMBED, sh.MLP_), rngs=rngs, use_bias=False)  # gate
    self.wi_1 = Dense(d_model, d_ff, (sh.EMBED, sh.MLP_), rngs=rngs, use_bias=False)
    self.wo = Dense(d_ff, d_model, (sh.MLP_, sh.EMBED), rngs=rngs, use_bias=False)

  def __call__(self, x, bias, mask):
    """x [b,l,d]; bias [h,l,m]; mask [b,m] -> [b,l,d]."""
    x = x + self.attn(self.attn_norm(x), bias, mask)
    h = self.ffn_norm(x)
    return x + self.wo(jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h))


class UMT5Encoder(nnx.Module):
  """tokens [..., l] -> (embeddings [..., l, d_model] zero at padding, mask [..., l])."""

  def __init__(self, *, vocab, d_model, d_kv, num_heads, d_ff, num_layers, num_buckets=32,
               max_distance=128, eps=1e-6, max_len=512, pad_id=PAD_ID, shared_bias=False, rngs):
    self.dim, self.max_len, self.pad_id = d_model, max_len, pad_id
    self.num_buckets, self.max_distance = num_buckets, max_distance
    self.embed = param(rngs, nnx.initializers.normal(1.0), (vocab, d_model), (sh.VOCAB, sh.EMBED))
    self.blocks = nnx.List([
        _Block(d_model, d_kv, num_heads, d_ff, num_buckets, eps, rngs=rngs,
               has_bias=not shared_bias or i == 0) for i in range(num_layers)])
    self.final_norm = RMSNorm(d_model, rngs=rngs, eps=eps)

  def __call__(self, tokens):
    lead, l = tokens.shape[:-1], tokens.shape[-1]
    if l != self.max_len:
      raise ValueError(f"tokens have length {l}, the text encoder was built for {self.max_len}")
    tokens = tokens.reshape(-1, l)  # [b,l]
    mask = tokens != self.pad_id  # [b,l]
    x = jnp.take(self.embed[...], tokens, axis=0)  # [b,l,d]
    buckets = relative_position_buckets(l, self.num_buckets, self.max_distance)  # [l,m], static
    table = None
    for block in self.blocks:
      # umT5: each layer its own table; T5: the table of layer 0 serves every layer
      table = block.attn.relative_bias if block.attn.relative_bias is not None else table
      bias = jnp.take(table[...].astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)  # [h,l,m]
      x = block(x, bias, mask)
    x = self.final_norm(x) * mask[..., None]
    return x.reshape(*lead, l, self.dim), mask.reshape(*lead, l)


# ---------------------------------------------------------------------------- loading


def _hf_names(model: UMT5Encoder) -> dict:
  """{Hugging Face key: (our Param, stored as an nn.Linear weight [out, in])}."""
  names = {"shared.weight": (model.embed, False),
           "encoder.final_layer_norm.weight": (model.final_norm.scale, False)}
  for i, block in enumerate(model.blocks):
    attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
    names[attn + "layer_norm.weight"] = (block.attn_norm.scale, False)
    for n in "qkvo":
      names[f"{attn}SelfAttention.{n}.weight"] = (getattr(block.attn, n).kernel, True)
    if block.attn.relative_bias is not None:
      names[f"{attn}SelfAttention.relative_attention_bias.weight"] = (block.attn.relative_bias,
                                                                      False)
    names[ffn + "layer_norm.weight"] = (block.ffn_norm.scale, False)
    for n in ("wi_0", "wi_1", "wo"):
      names[f"{ffn}DenseReluDense.{n}.weight"] = (getattr(block, n).kernel, True)
  return names


def _checkpoint(path):
  """(config dict or None, Tensors) of a directory, a sharded index or one .safetensors file."""
  files = checkpoint_files(path)  # refuses pickles, names a missing path
  folder = Path(path) if Path(path).is_dir() else Path(path).parent
  config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
  return config, Tensors(files)


def _config_kwargs(config, shapes, source) -> dict:
  """UMT5Encoder arguments from config.json, or read off the weight shapes without one."""
  if config is None:  # a bare .safetensors: sizes are in the shapes; distance and eps are the
    # T5-family values (every umT5 and T5 v1.1 release uses 128 and 1e-6)
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    table = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    wi = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    if not all(k in shapes for k in ("shared.weight", table.format(0), q, wi)):
      raise ValueError(f"{source} does not hold umT5/T5 encoder weights (no shared.weight or "
                       "encoder.block.0...); pass a umT5 checkpoint, with its config.json")
    (vocab, d_model), (buckets, heads) = shapes["shared.weight"], shapes[table.format(0)]
    return dict(vocab=vocab, d_model=d_model, num_heads=heads, num_layers=max(blocks) + 1,
                d_kv=shapes[q][0] // heads, d_ff=shapes[wi][0], num_buckets=buckets,
                shared_bias=len(blocks) > 1 and table.format(1) not in shapes)
  kind = config.get("model_type")
  if kind not in ("umt5", "t5"):
    raise ValueError(f"{source}: config.json has model_type {kind!r}, not umt5 or t5; pass a umT5 "
                     "text encoder checkpoint")
  ffn = config.get("feed_forward_proj", "gated-gelu" if kind == "umt5" else "relu")
  if ffn != "gated-gelu":
    raise ValueError(f"{source}: feed_forward_proj {ffn!r} is not ported (only gated-gelu: umT5, "
                     "T5 v1.1); use a umT5 checkpoint")
  sizes = ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers")
  if missing := [k for k in sizes if k not in config]:
    raise ValueError(f"{source}: config.json lacks {missing}; it is not a T5-family config")
  return dict(vocab=config["vocab_size"], d_model=config["d_model"], d_kv=config["d_kv"],
              num_heads=config["num_heads"], d_ff=config["d_ff"], num_layers=config["num_layers"],
              num_buckets=config.get("relative_attention_num_buckets", 32),
              max_distance=config.get("relative_attention_max_distance", 128),
              eps=config.get("layer_norm_epsilon", 1e-6),
              pad_id=PAD_ID if config.get("pad_token_id") is None else config["pad_token_id"],
              shared_bias=kind == "t5")  # T5 keeps one position-bias table, in layer 0


def load_umt5(path, *, dtype=jnp.float32, max_len=512) -> UMT5Encoder:
  """A UMT5Encoder with the weights of a Hugging Face checkpoint, cast to `dtype`.

  path: a directory (config.json + model.safetensors, several *.safetensors, or a sharded
  model.safetensors.index.json) or one .safetensors file (config.json beside it is used if
  present, else the sizes are read off the shapes). max_len: the token length the encoder takes
  (Wan2.1 pads instructions to 512).
  """
  config, tensors = _checkpoint(path)
  # UMT5Model / T5Model / *ForConditionalGeneration files also hold the decoder (and lm_head),
  # which an instruction encoder never runs: those keys are dropped, not reported as unexpected
  source = {k: k for k in tensors.keys() if not k.startswith(("decoder.", "lm_head."))}
  # encoder.embed_tokens is tied to shared: older files store both, transformers 5 only shared
  if "encoder.embed_tokens.weight" in source:
    tied = source.pop("encoder.embed_tokens.weight")
    source.setdefault("shared.weight", tied)
  shapes = {k: tensors.shape(name) for k, name in source.items()}
  kwargs = _config_kwargs(config, shapes, path)
  model = nnx.eval_shape(lambda: UMT5Encoder(**kwargs, max_len=max_len, rngs=nnx.Rngs(0)))
  expect = _hf_names(model)
  want = {k: tuple(v.get_value().shape[::-1] if linear else v.get_value().shape)
          for k, (v, linear) in expect.items()}
  check_keys(want, shapes, path, "umT5 encoder")
  for k, name in source.items():
    var, linear = expect[k]
    a = np.asarray(tensors[name]).astype(np.float32)
    var.set_value(jnp.asarray(a.T if linear else a, dtype))  # nn.Linear [out, in] -> kernel [in, out]
  return model


# ---------------------------------------------------------------------------- tokens


def precompute_text_embeddings(encoder, tokens, *, batch_size=8, dtype=np.float16):
  """(embeddings [n, l, d] `dtype`, mask [n, l] bool) of int32 tokens [n, l], as numpy.

  For datasets that store the instruction embeddings so training never runs the encoder.
  float16 is safe for storage: the outputs come after the final RMSNorm, so their size is set
  by its scale, far below float16's range.
  """
  graphdef, state = nnx.split(encoder)
  run = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
  tokens = np.asarray(tokens, np.int32)
  n = len(tokens)
  # pad the last batch with all-padding rows so every call has one shape (one compile)
  padded = np.full((-(-n // batch_size) * batch_size, tokens.shape[1]), encoder.pad_id, np.int32)
  padded[:n] = tokens
  embs, masks = [], []
  for i in range(0, len(padded), batch_size):
    emb, mask = run(state, padded[i:i + batch_size])
    embs.append(np.asarray(emb).astype(dtype))
    masks.append(np.asarray(mask))
  return np.concatenate(embs)[:n], np.concatenate(masks)[:n]
