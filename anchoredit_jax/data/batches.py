"""Batches of multi-turn samples per (turns, height, width) bucket, with a checkpointable position.

Samples are read in a seeded order (a new permutation each epoch) by grain's prefetching threads
(and with `read_workers` by that many processes, the order unchanged), each parsed
(`wds.parse`), given its aspect-ratio bucket, cropped and resized (`buckets.py`) and tokenized. A sample waits in its bucket until the bucket holds a batch. Bad samples are skipped,
counted per defect kind (`counts`, cumulative over resumes) and warned about once per kind.

The state (`get_state`) is grain's read position plus the indices of the samples waiting in
buckets and the defect counts: a small JSON-able dict, so a resumed run continues with exactly
the batches an uninterrupted one would have had.

Several processes: each reads its own shards, but a train step needs one shape on all of them.
After each read the processes `agree` (an all-gather of every process's bucket fill, e.g.
`multihost_utils.process_allgather`) and all emit the bucket that is full everywhere, or read
again; they stop together when one runs out. The step then has at most
`len(buckets) x max_turns` shapes, reported by `variants`.
"""
import functools
import sys

import grain
import numpy as np

from anchoredit_jax.data import buckets as bk, pipeline, wds
from anchoredit_jax.data.tokenize import tokenize_batch


@functools.lru_cache(maxsize=4)
def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def alone(counts):
  """`agree` of a single process: its own counts as a [1, K] array."""
  return np.asarray(counts)[None]


class Reader:
  """The p-th read of the samples as prepared items: a plain object (no threads or open files),
  so grain can pickle it into worker processes."""

  def __init__(self, source, seed, shuffle, buckets, parse, language, text_len, tokenizer, pairs):
    self.source, self.seed, self.shuffle, self.buckets, self.parse = source, seed, shuffle, buckets, parse
    self.language, self.text_len, self.tokenizer = language, text_len, tokenizer
    self.pairs = pairs  # stage 1: every turn of a sample becomes its own (previous, next) pair

  def __call__(self, p: int):
    return self.load(self.index(p))

  def index(self, p: int) -> int:
    """Source index of the p-th read: a fresh permutation of the samples each epoch."""
    n = len(self.source)
    epoch, j = divmod(int(p), n)
    return int(permutation(self.seed, epoch, n)[j]) if self.shuffle else j

  def load(self, i: int):
    """(source index, [(item id, prepared item)], defects) of sample i: one item, or one per
    turn with `pairs`; an item id is [i, turn] (turn -1: the whole sample)."""
    language = self.language
    if language == "random":  # per sample, the same on every read of it
      language = wds.LANGUAGES[np.random.default_rng([self.seed, i, 7]).integers(len(wds.LANGUAGES))]
    sample, defects = self.source.sample(i, language=language, **self.parse)
    if sample is None:
      return i, [], defects
    h, w = bk.pick(*sample["images"][0].shape[:2], self.buckets)
    images = np.stack([bk.crop_resize(im, h, w) for im in sample["images"]])
    tokens = tokenize_batch(sample["instructions"], self.text_len, self.tokenizer)
    if self.pairs:
      return i, [([i, k], {"key": (1, h, w), "images": images[k:k + 2], "tokens": tokens[k:k + 1]})
                 for k in range(len(tokens))], defects
    return i, [([i, -1], {"key": (len(tokens), h, w), "images": images, "tokens": tokens})], defects


class BucketBatches(grain.DatasetIterator):
  """Batches {"images": uint8 [B, T+1, h, w, 3], "tokens": int32 [B, T, text_len], "edit_masks"
  and "identity_masks": bool [B, T, h, w], all False (real data has no exact masks)} of one bucket
  each; with `pairs` (stage 1) T = 1 and each turn of a sample is a pair of its own. `counts`:
  the defects so far; `variants`: the bucket shapes a step can see."""

  def __init__(self, source, *, batch_size, base, text_len, seed, step=64, max_ratio=4.0,
               max_turns=None, exact_turns=False, language="en", tokenizer="bytes",
               num_epochs=None, shuffle=True, read_threads=1, prefetch=16, agree=alone,
               pairs=False, max_pending=4096, read_workers=0):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if language not in wds.LANGUAGES + ("random",):
      raise ValueError(f"language {language!r}: give one of {wds.LANGUAGES + ('random',)}")
    if max_turns is not None and max_turns < 1:
      raise ValueError(f"data.num_turns={max_turns}: a multi-turn batch needs at least one edit a "
                       "sequence; give 1 or more")
    if agree is not alone and max_turns is None and not pairs:
      raise ValueError("several processes need data.max_turns (the turn counts must be known)")
    if not len(source):
      raise ValueError("no samples in this process's shards")
    if read_workers < 0:
      raise ValueError(f"data.workers={read_workers}: give 0 (read threads only) or more processes")
    self.source, self.B, self.agree = source, batch_size, agree
    self.max_pending = max_pending  # samples waiting in buckets before the data is called unusable
    self.buckets = bk.hw_buckets(base, step, max_ratio)
    self.max_turns = 1 if pairs else max_turns  # of a batch (None: unbounded)
    self.reader = Reader(source, seed, shuffle, self.buckets, dict(max_turns=max_turns, exact_turns=exact_turns),
                         language, text_len, tokenizer, pairs)
    self.reads = grain.MapDataset.range(len(source) * num_epochs if num_epochs else sys.maxsize).map(self.reader)
    self.options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    self.workers = read_workers
    self._start({"read": None, "pending": {}, "counts": {}, "shapes": []})

  # --- state -----------------------------------------------------------------------------

  def _start(self, state):
    if state["read"] is not None and state.get("workers", 0) != self.workers:
      raise ValueError(f"the data position was saved with data.workers={state.get('workers', 0)}; "
                       f"resume with that many reader processes (this run has {self.workers})")
    self.close()
    self.it = iter(pipeline.in_processes(self.reads.to_iter_dataset(self.options), self.workers))
    if state["read"] is not None:
      self.it.set_state(state["read"])
    self.counts = dict.fromkeys(wds.DEFECTS, 0) | dict(state["counts"])
    self.shapes = set(state.get("shapes", []))  # "TxHxW" of every batch so far
    self.counts["corrupt_shard"] = getattr(self.source, "corrupt_shards", 0)
    if self.counts["corrupt_shard"] and not state["counts"]:
      print(f"data: {self.counts['corrupt_shard']} shard(s) end early (cut short or damaged); "
            "their samples before the damage are used", file=sys.stderr)
    self.warned = {k for k, v in self.counts.items() if v}
    self.pending = {}  # (T, h, w) -> [prepared items]
    self.waiting = {}  # the same as item ids, for the state
    for _, ids in sorted(state["pending"].items()):
      for i, k in ids:
        item = next(s for j, s in self.reader.load(i)[1] if j == [i, k])
        self._add([i, k], item)
    self.done, self.dry = False, 0  # reads since a sample was last kept

  def get_state(self):
    return {"read": self.it.get_state(), "counts": dict(self.counts), "shapes": sorted(self.shapes),
            "workers": self.workers,
            "pending": {"x".join(map(str, k)): list(v) for k, v in self.waiting.items()}}

  def set_state(self, state):
    self._start(state)

  # --- batching --------------------------------------------------------------------------

  @property
  def variants(self):
    """How many batch shapes (compiled step variants) this data can produce at most; None when
    the turn counts are unbounded (no max_turns)."""
    if self.max_turns is None:
      return None
    return len(self.buckets) * (1 if self.reader.parse["exact_turns"] else self.max_turns)

  def _add(self, item_id, item):
    self.pending.setdefault(item["key"], []).append(item)
    self.waiting.setdefault(item["key"], []).append(item_id)

  def _slot(self, key) -> int:
    T, h, w = key
    return (T - 1) * len(self.buckets) + self.buckets.index((h, w))

  def _fill(self) -> np.ndarray:
    K = len(self.buckets) * self.max_turns  # only asked when max_turns bounds the slots
    fill = np.zeros(K + 1, np.int64)  # the last entry: this process has run out
    for key, samples in self.pending.items():
      fill[self._slot(key)] = len(samples)
    fill[K] = self.done
    return fill

  def _ready(self):
    """The bucket to emit now (agreed by every process), None to read on, or StopIteration."""
    if self.max_turns is None:  # alone, and the turn counts unbounded: no slots to agree on
      full = [k for k, s in self.pending.items() if len(s) >= self.B]
      if full:
        return max(full, key=lambda k: (len(self.pending[k]), k))  # ties: by key, as after a resume
      if self.done:
        raise StopIteration
      return None
    every = self.agree(self._fill())  # [P, K + 1]
    least = every[:, :-1].min(axis=0)
    if least.max() >= self.B:
      slot = int(np.argmax(least))
      T, b = divmod(slot, len(self.buckets))
      return (T + 1,) + self.buckets[b]
    if every[:, -1].any():
      raise StopIteration
    return None

  def _read_one(self):
    try:
      i, items, defects = next(self.it)
    except StopIteration:
      self.done = True
      return
    for d in defects:
      self.counts[d] += 1
      if d not in self.warned:
        self.warned.add(d)
        print(f"data: {d} in {self.source.describe(i)} ({'kept' if items else 'skipped'}); "
              "further ones are only counted (metrics: data_<kind>)", file=sys.stderr)
    self.dry = 0 if items else self.dry + 1
    if self.dry > len(self.source):
      raise ValueError(f"no usable sample in {len(self.source)} reads of this process's data "
                       f"(skipped so far: { {k: v for k, v in self.counts.items() if v} }); check "
                       "the shards and data.num_turns / data.exact_turns")
    for item_id, item in items:
      self._add(item_id, item)
    waiting = sum(len(v) for v in self.pending.values())
    if waiting > self.max_pending:
      raise ValueError(f"{waiting} samples wait in buckets that no batch fills (on every process): "
                       "shards grouped by shape or turn count starve the others; shuffle samples "
                       "across shards, or use fewer buckets (data.bucket_step, data.max_ratio)")

  def __next__(self):
    while (key := self._ready()) is None:
      if not self.done:
        self._read_one()
    samples = self.pending[key][:self.B]
    self.pending[key] = self.pending[key][self.B:]
    self.waiting[key] = self.waiting[key][self.B:]
    T, h, w = key
    self.shapes.add(f"{T}x{h}x{w}")
    no_masks = np.zeros((len(samples), T, h, w), bool)  # real data has no exact edit masks
    return {"images": np.stack([s["images"] for s in samples]),
            "tokens": np.stack([s["tokens"] for s in samples]),
            "edit_masks": no_masks, "identity_masks": no_masks}

  def close(self):
    it = getattr(self, "it", None)  # absent when __init__ refused its arguments
    if hasattr(it, "close"):
      it.close()
