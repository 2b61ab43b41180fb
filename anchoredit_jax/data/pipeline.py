"""Grain input pipeline over procedurally generated ShapesEdit sequences.

Element index -> sequence seed, so the stream is fully deterministic, needs no files, and the
iterator state is a single integer (cheap to checkpoint with the model). Rendering runs in grain's
read threads so it overlaps with XLA compute on the accelerator.
"""
import json
import time

import grain
from absl import flags
import numpy as np

from anchoredit_jax.data import shapes
from anchoredit_jax.data.tokenize import tokenize_batch

DEFAULT_NUM_SEQUENCES = 10_000_000  # distinct seeds per epoch; repeats are effectively never seen


def shard_indices(ds, process_index: int, process_count: int):
  """Strided slice of the index space: process p sees indices p, p + n, p + 2n, ... (disjoint)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  return ds[process_index::process_count]


def shard_batches(ds, batch_size: int, process_index: int, process_count: int):
  """Process p's rows of every global batch: in each run of process_count * batch_size elements
  it takes rows [p * batch_size, (p + 1) * batch_size). The global batch at every step is then
  the same whatever the number of processes, so a run can resume on another process count and
  a multi-process run computes what one process would."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  B = batch_size * process_count
  n = len(ds) // B * batch_size
  return grain.MapDataset.range(n).map(
      lambda j: ds[(j // batch_size) * B + process_index * batch_size + j % batch_size])


def example_from_seed(seed: int, *, split, res, num_turns, text_len, ops=None,
                      background="procedural", tokenizer="bytes") -> dict:
  """One sequence as a dict of numpy arrays only (no strings or scene objects)."""
  seq = shapes.make_sequence(int(seed), num_turns, res, split, ops=ops, background=background)
  return {
      "images": seq["images"],                                     # uint8 [T+1, res, res, 3]
      "tokens": tokenize_batch(seq["instructions"], text_len, tokenizer),  # int32 [T, text_len]
      "ops": seq["ops"],                                           # int32 [T]
      "edit_masks": seq["edit_masks"],                             # bool [T, res, res]
      "identity_masks": seq["identity_masks"],                     # bool [T, res, res]
  }


def make_map_dataset(*, split, res, num_turns, text_len, seed, ops=None, background="procedural",
                     num_sequences=DEFAULT_NUM_SEQUENCES, shuffle=True, process_index=None,
                     process_count=None, tokenizer="bytes") -> grain.MapDataset:
  """Unbatched random-access dataset of this process's shard (for tests and eval loops)."""
  if process_index is None or process_count is None:
    import jax  # deferred: only the default sharding needs it
    process_index, process_count = jax.process_index(), jax.process_count()
  ds = shard_indices(grain.MapDataset.range(num_sequences), process_index, process_count)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.map(lambda i: example_from_seed(
      i, split=split, res=res, num_turns=num_turns, text_len=text_len, ops=ops,
      background=background, tokenizer=tokenizer))


def make_dataset(*, split, res, num_turns, batch_size, text_len, seed, ops=None,
                 background="procedural", num_epochs=None, worker_threads=1,
                 worker_processes=0, prefetch_batches=8, num_sequences=DEFAULT_NUM_SEQUENCES,
                 shuffle=True, process_index=None, process_count=None,
                 tokenizer="bytes") -> grain.IterDataset:
  """Batched, prefetched IterDataset of ShapesEdit sequences.

  Batches: images uint8 [B, T+1, res, res, 3], tokens int32 [B, T, text_len], ops int32 [B, T],
  edit_masks / identity_masks bool [B, T, res, res]. `num_epochs=None` repeats forever
  (reshuffling each epoch). `batch_size` is per process: each jax process renders only its
  rows of every global batch (`shard_batches`).
  Batching happens before `to_iter_dataset`, so each read thread renders whole batches and the
  iterator state is just the next batch index.

  Rendering is numpy-on-small-arrays, so it holds the GIL: threads overlap it with XLA (which
  releases the GIL) but do not add throughput; one thread measured fastest on 2 cores. For more
  batches/s on a many-core host set `worker_processes` (grain mp_prefetch, also checkpointable).
  """
  # Validate eagerly so config mistakes surface here, not inside a reader thread.
  shapes.check_sequence_args(num_turns, res, split, ops, background)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if process_index is None or process_count is None:
    import jax  # deferred: only the default sharding needs it
    process_index, process_count = jax.process_index(), jax.process_count()
  ds = grain.MapDataset.range(num_sequences)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = shard_batches(ds, batch_size, process_index, process_count).map(lambda i: example_from_seed(
      i, split=split, res=res, num_turns=num_turns, text_len=text_len, ops=ops,
      background=background, tokenizer=tokenizer))
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
  return in_processes(ds.to_iter_dataset(grain.ReadOptions(num_threads=worker_threads,
                                                          prefetch_buffer_size=prefetch_batches)),
                      worker_processes)


def in_processes(it_ds: grain.IterDataset, workers: int, buffer: int = 2) -> grain.IterDataset:
  """`it_ds` read by `workers` processes (grain mp_prefetch: worker w takes the reads w, w + n,
  ...; the order and the checkpointable state stay as with one process); itself for 0."""
  if workers <= 0:
    return it_ds
  if not flags.FLAGS.is_parsed():  # grain workers read absl flags; scripts without absl.app never parse
    flags.FLAGS.mark_as_parsed()
  return it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))


def save_iterator_state(it) -> str:
  """Iterator state as a JSON string (grain's state is a small dict, e.g. {"next_index": k})."""
  return json.dumps(it.get_state())


def restore_iterator_state(it, state) -> None:
  """Inverse of save_iterator_state; also accepts the raw dict from `it.get_state()`. A state of
  another pipeline layout (grain's keys differ with the number of reader processes) is refused
  with a ValueError."""
  try:
    it.set_state(json.loads(state) if isinstance(state, (str, bytes)) else state)
  except (KeyError, IndexError, TypeError) as e:
    raise ValueError(f"the saved data position does not fit this data pipeline (grain: {e!r}); "
                     "resume with the data settings it was saved with (data.workers among them)") from e


def benchmark(num_batches=50, **kw) -> float:
  """Batches per second of `make_dataset(**kw)` after one warm-up batch."""
  it = iter(make_dataset(**kw))
  next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  rate = num_batches / (time.perf_counter() - start)
  it.close()  # stops prefetch threads / worker processes
  return rate


if __name__ == "__main__":
  for procs in (0, 2):
    rate = benchmark(num_batches=100, split="train", res=32, num_turns=1, batch_size=32,
                     text_len=64, seed=0, worker_processes=procs)
    print(f"res 32, T=1, batch 32, worker_processes={procs}: {rate:.1f} batches/s")
