"""One process serving many editing sessions: the pending turns of different trees run as one batch.

  engine = Engine(cfg, graphdef, params)          # one model, one compiled function per batch size
  engine.warmup()                                 # compile every batch bucket once
  node = engine.edit(tree, "make the red circle blue")   # from any thread; blocks until done

Each request is one turn of one `session.EditTree` (any branch). A worker thread takes the first
waiting request, gathers more for at most `max_wait_s` (or until the largest bucket is full), pads
the batch to the next bucket size (1, 2, 4, ... 32) and runs `edit_turns`: `edit_turn` vmapped over
sessions, so each session keeps its own memory and turn counter and the result equals a lone
`EditTree.edit` bit for bit. Shapes are static per bucket: no compilation after warm-up. The queue
is bounded (`Busy` when it is full, never unbounded memory); a request whose client gave up is
dropped before it runs. `Sessions` keeps trees by id and moves the memories of idle ones to host.
"""
import concurrent.futures as cf
import dataclasses
import queue
import threading
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from anchoredit_jax.inference import one_turn, default_sampler
from anchoredit_jax.session import EditTree

BUCKETS = (1, 2, 4, 8, 16, 32)


def _edit_turns(params, graphdef, mems, tokens, rngs, *, sampler):
  """B sessions' turns: mems (batch-1 AnchorMemories stacked on a new axis [B,...]), tokens int32
  [B,1,l], rngs keys [B] -> (images [B,1,R,R,3] in [0,1], memories [B,...])."""
  one = lambda mem, tok, rng: one_turn(params, graphdef, mem, tok, rng, sampler=sampler)
  return jax.vmap(one)(mems, tokens, rngs)


edit_turns = jax.jit(_edit_turns, static_argnames=("graphdef", "sampler"))


class Busy(RuntimeError):
  """The queue is full: the client should retry in a moment."""


@dataclasses.dataclass
class _Job:
  pending: object            # session.Pending
  memory: object             # the parent's memory
  future: cf.Future
  asked: float               # time.perf_counter() when submitted


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class Engine:
  """A batching editor for one model; thread-safe. `stats` counts batches, turns and their sizes."""

  def __init__(self, cfg, graphdef, params, *, sampler=None, buckets=BUCKETS, max_wait_s=0.015,
               max_queue=256, start=True):
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.sampler = sampler or default_sampler(cfg)
    self.buckets, self.max_wait_s = tuple(sorted(buckets)), max_wait_s
    self.queue = queue.Queue(maxsize=max_queue)
    self.stats = {"batches": 0, "turns": 0, "padded": 0, "dropped": 0, "sizes": {}}
    self._warm_cache = None
    self._closed, self._worker = threading.Event(), None
    if start:
      self.start()

  def start(self):
    """Start the worker thread (requests submitted before wait in the queue)."""
    self._worker = threading.Thread(target=self._loop, name="edit-engine", daemon=True)
    self._worker.start()

  # -- clients ----------------------------------------------------------------------------------
  def submit(self, pending, memory) -> cf.Future:
    """Queue one turn (a session.Pending and its parent's memory); a Future of (image float
    [R,R,3], memory, seconds in the batch). Raises Busy when the queue is full."""
    if self._closed.is_set():
      raise RuntimeError("the edit engine was closed")
    job = _Job(pending, memory, cf.Future(), time.perf_counter())
    try:
      self.queue.put_nowait(job)
    except queue.Full:
      raise Busy(f"busy: {self.queue.maxsize} edits are waiting already; retry in a moment") from None
    return job.future

  def edit(self, tree, instruction, node=None, *, timeout=120.0) -> int:
    """One turn of `tree` from `node` (default: its current node) through the batch; the new node's
    id. Several threads may edit one tree: its structure changes under the tree's lock."""
    if tree.sampler != self.sampler:
      raise ValueError(f"this engine samples with {self.sampler}; the tree was made with {tree.sampler}")
    with tree.lock:
      pending = tree.request(instruction, node)
      memory = tree.nodes[pending.parent].memory
    future = self.submit(pending, memory)
    try:
      image, mem, seconds = future.result(timeout=timeout)
    except cf.TimeoutError:
      future.cancel()  # dropped if it has not started; a running batch's result is thrown away
      raise TimeoutError(f"the edit did not finish within {timeout:g} s (the server is overloaded); "
                         "retry") from None
    with tree.lock:
      return tree.complete(pending, image, mem, seconds)

  def warmup(self):
    """Compile every bucket (with the first request's shapes made up from an empty memory)."""
    res = self.cfg.data.res
    tree = EditTree(self.cfg, self.graphdef, self.params, np.zeros((res, res, 3), np.uint8),
                    sampler=self.sampler)
    p = tree.request("warm up")
    for b in self.buckets:
      self._run([_Job(p, tree.nodes[0].memory, cf.Future(), 0.0)] * b, count=False)
    self._warm_cache = edit_turns._cache_size()

  @property
  def compilations_after_warmup(self) -> int:
    """New compiled variants since warmup() (0 is the goal: every shape was seen there)."""
    return edit_turns._cache_size() - self._warm_cache if self._warm_cache is not None else -1

  def close(self):
    self._closed.set()
    if self._worker is not None:
      self._worker.join(timeout=10)

  # -- the worker -------------------------------------------------------------------------------
  def _gather(self):
    try:
      first = self.queue.get(timeout=0.1)
    except queue.Empty:
      return []
    jobs, deadline = [first], time.perf_counter() + self.max_wait_s
    while len(jobs) < self.buckets[-1]:
      left = deadline - time.perf_counter()
      try:
        jobs.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
      except queue.Empty:
        break
    live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
    self.stats["dropped"] += len(jobs) - len(live)
    return live

  def _loop(self):
    while not self._closed.is_set():
      jobs = self._gather()
      if not jobs:
        continue
      try:
        results = self._run(jobs)
      except Exception as e:  # noqa: BLE001  (a failed batch fails its requests, not the server)
        for j in jobs:
          j.future.set_exception(e)
        continue
      for j, r in zip(jobs, results):
        j.future.set_result(r)

  def _run(self, jobs, count=True):
    n = len(jobs)
    b = next(s for s in self.buckets if s >= n)
    padded = jobs + [jobs[0]] * (b - n)  # padding repeats the first request; its outputs are dropped
    t0 = time.perf_counter()
    images, mems = edit_turns(self.params, self.graphdef,
                              _stack([jax.device_put(j.memory) for j in padded]),
                              jnp.stack([j.pending.tokens for j in padded]),
                              jnp.stack([j.pending.rng for j in padded]), sampler=self.sampler)
    images = np.asarray(images[:n, 0])
    seconds = time.perf_counter() - t0
    if count:
      self.stats["batches"] += 1
      self.stats["turns"] += n
      self.stats["padded"] += b - n
      self.stats["sizes"][b] = self.stats["sizes"].get(b, 0) + 1
    return [(images[i], jax.tree.map(lambda x, i=i: x[i], mems), seconds) for i in range(n)]


class Sessions:
  """Edit trees by id, for a server. Trees idle for `idle_s` have their memories moved to host
  memory by `sweep()` (called on every `get`); their next edit brings back the one it needs."""

  def __init__(self, idle_s=300.0):
    self.idle_s, self._trees, self._used, self._lock = idle_s, {}, {}, threading.Lock()

  def add(self, tree) -> str:
    sid = uuid.uuid4().hex[:12]
    with self._lock:
      self._trees[sid], self._used[sid] = tree, time.monotonic()
    return sid

  def get(self, sid):
    self.sweep()
    with self._lock:
      if sid not in self._trees:
        raise KeyError(f"no session {sid!r} (it ended or the server restarted); start a new one")
      self._used[sid] = time.monotonic()
      return self._trees[sid]

  def drop(self, sid):
    with self._lock:
      self._trees.pop(sid, None)
      self._used.pop(sid, None)

  def sweep(self, now=None) -> list:
    """Offload trees idle longer than idle_s; the ids offloaded."""
    now = time.monotonic() if now is None else now
    with self._lock:
      idle = [s for s, t in self._used.items() if now - t > self.idle_s and not self._trees[s].offloaded]
      trees = [self._trees[s] for s in idle]
    for t in trees:
      with t.lock:
        t.offload()
    return idle

  def __len__(self):
    return len(self._trees)
