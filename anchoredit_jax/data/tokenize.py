"""Byte-level instruction tokens: the vocabulary every TextEncoder in this project can read.

Token ids: 0 = pad, 1 = begin, 2 = end, 3 + byte for each UTF-8 byte. An empty instruction is
[begin, end] (the unconditional input used for classifier-free guidance), so no row is all padding.
"""
import numpy as np

PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3
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


def tokenize_batch(texts, max_len: int) -> np.ndarray:
  """Sequence of instructions -> int32 [len(texts), max_len]."""
  return np.stack([tokenize(t, max_len) for t in texts]) if texts else np.zeros((0, max_len), np.int32)


def detokenize(ids) -> str:
  ids = [int(i) for i in np.asarray(ids)]
  return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")
