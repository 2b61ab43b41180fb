"""Instruction tokens. Byte-level by default; a model with a pretrained text encoder (umT5) uses
the Hugging Face tokenizer saved with its weights (`model.tokenizer`, a local folder).

Byte token ids: 0 = pad, 1 = begin, 2 = end, 3 + byte for each UTF-8 byte. An empty instruction is
[begin, end] (the unconditional input used for classifier-free guidance), so no row is all padding.
"""
import functools
import os

import numpy as np

PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3
PAD_ID = 0  # T5 tokenizers (umT5) pad with id 0
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(text: str, max_len: int) -> np.ndarray:
  """One instruction -> int32 [max_len]. Raises ValueError if it does not fit."""
  data = text.encode("utf-8")
  if len(data) + 2 > max_len:
    raise ValueError(
        f"instruction is {len(data)} bytes; the text encoder takes at most {max_len - 2} "
        f"(shorten it or raise text_len in the config): {text[:40]!r}...")
  ids = np.full((max_len,), PAD, np.int32)
  ids[0] = BOS
  ids[1:1 + len(data)] = np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET
  ids[1 + len(data)] = EOS
  return ids


def tokenize_batch(texts, max_len: int, tokenizer: str = "bytes") -> np.ndarray:
  """Sequence of instructions -> int32 [len(texts), max_len]; `tokenizer` is "bytes" or the
  folder of a Hugging Face tokenizer (which pads with 0 and truncates, as Wan does)."""
  if not texts:
    return np.zeros((0, max_len), np.int32)
  if tokenizer == "bytes":
    return np.stack([tokenize(t, max_len) for t in texts])
  return tokenize_hf(_hf_tokenizer(tokenizer), list(texts), max_len)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: str):
  if not path:
    raise ValueError("model.tokenizer is empty: a umT5 model needs its tokenizer folder; use "
                     "configs/wan/<stage>.py with dir=<Wan2.1 diffusers folder>")
  return load_tokenizer(path)


def tokenizer_of(model_cfg) -> str:
  """The tokenizer a model config reads instructions with ("bytes" for configs from before umT5)."""
  return model_cfg.get("tokenizer", "bytes") if model_cfg.text_encoder == "umt5" else "bytes"


def tokenize_for(model_cfg, texts) -> np.ndarray:
  """Instructions -> int32 [len(texts), text_len] the way this model reads them."""
  return tokenize_batch(list(texts), model_cfg.text_len, tokenizer_of(model_cfg))


def detokenize(ids) -> str:
  ids = [int(i) for i in np.asarray(ids)]
  return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


def load_tokenizer(path):
  """The Hugging Face tokenizer saved in directory `path` (never fetched from the hub)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path} not found; pass the local folder holding "
                            "tokenizer.json / spiece.model (a checkpoint's tokenizer/)")
  from transformers import AutoTokenizer  # heavy, and only umT5 models need it
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"{path} holds no loadable tokenizer ({str(e).splitlines()[0][:120]}); save "
                     "one there with tokenizer.save_pretrained") from e


def tokenize_hf(tokenizer, texts, max_len, pad_id=PAD_ID) -> np.ndarray:
  """int32 [n, max_len] ids (eos appended, truncated, padded with `pad_id`) of `texts`."""
  if tokenizer.pad_token_id != pad_id:
    # the encoder's mask is tokens != pad_id: another pad id would make padding attendable
    raise ValueError(f"tokenizer pads with id {tokenizer.pad_token_id}, the encoder masks id "
                     f"{pad_id}; use the tokenizer that belongs to the checkpoint")
  ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="np")["input_ids"]
  return ids.astype(np.int32)
