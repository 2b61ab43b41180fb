"""Training entry point: config -> mesh -> state -> data -> loop -> checkpoints -> metrics.

  python -m anchoredit_jax.train --config=configs/pretrain.py --workdir=runs/toy/pretrain

Rerunning the same command resumes from the newest checkpoint in the workdir (parameters,
optimizer state, step, data-iterator position and training time so far). Writes to the workdir:
checkpoints/, metrics.jsonl (one JSON object per log/eval event), TensorBoard event files in tb/,
config.json, and summary.json at the end.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

from anchoredit_jax import cli, distributed, errors, growth, sharding as sh
from anchoredit_jax.checkpoint import (check_config_fields, config_fields, is_reference, load_config,
                                       parameter_fields, restore_newest, save_step)
from anchoredit_jax.data import batches, pipeline, text_store, tfds_builder, wds
from anchoredit_jax.data.tokenize import tokenizer_of
from anchoredit_jax.distributed import say
from anchoredit_jax.eval import evaluators
from anchoredit_jax.models.model import abstract_split, build, frozen_parts
from anchoredit_jax.optim import apply_gradients, make_optimizer
from anchoredit_jax.stages import causal, distill, dmd, pretrain

# A stage module gives loss_fn(params, graphdef, batch, rng, cfg[, aux], *, store) -> (loss,
# metrics); one with extra state (distill: frozen teacher, EMA) adds init_aux(params, cfg,
# teacher) and update_aux. A stage with two players (dmd: generator and critic) gives its whole
# update instead: update(state, batch, rng, cfg, graphdef, tx, *, store) -> (new parts of the
# state, metrics), and optimizer_steps(cfg), the number of updates its generator gets.
# What the loop evaluates is chosen by the config (eval/evaluators.py).
STAGES = {"pretrain": pretrain, "causal": causal, "distill": distill, "dmd": dmd}


def _path_key(path):
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def state_shardings(abs_state, param_sh, mesh):
  """Shardings for {params, opt_state, step}: optimizer leaves that mirror a parameter (Adam's mu
  and nu) take that parameter's sharding, everything else is replicated."""
  by_path = {_path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = _path_key(path)
    for i in range(len(key)):
      if key[i:] in by_path and by_path[key[i:]].shard_shape(leaf.shape) is not None:
        return by_path[key[i:]]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abs_state)


def check_config(cfg):
  """Config mistakes that would otherwise surface as shape errors deep inside jit."""
  if cfg.stage not in STAGES:
    raise ValueError(f"stage={cfg.stage!r} unknown; choose one of {sorted(STAGES)}")
  m, res = cfg.model, cfg.data.res
  step = m.ae_factor * m.patch
  if res % step:
    raise ValueError(f"data.res={res} is not a multiple of the patch size in pixels "
                     f"(model.ae_factor * model.patch = {step})")
  if m.dim % m.heads:
    raise ValueError(f"model.dim={m.dim} is not divisible by model.heads={m.heads}")
  if cfg.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")


class Trainer:
  """Holds the compiled step, shardings and graphdef for one config (also used by tests)."""

  def __init__(self, cfg, mesh=None):
    check_config(cfg)
    self.cfg, self.stage = cfg, STAGES[cfg.stage]
    self.mesh = mesh or sh.make_mesh(dict(cfg.mesh))
    self.rules = sh.config_rules(cfg)
    updates = getattr(self.stage, "optimizer_steps", lambda c: c.train.steps)(cfg)
    self.tx = make_optimizer(cfg.optim, updates, frozen_parts(cfg.model))
    self.graphdef, abs_params = abstract_split(cfg.model)
    param_sh = sh.param_shardings(abs_params, self.mesh, self.rules)

    def init(rng):
      return self._fresh(nnx.split(build(cfg.model, nnx.Rngs(rng)))[1])

    self._init = init
    abs_state = jax.eval_shape(init, jax.random.key(0))
    self.abstract_state = abs_state
    self.state_sh = state_shardings(abs_state, param_sh, self.mesh)
    self.batch_sh = sh.named(self.mesh, (sh.BATCH,), self.rules)
    self.replicated = NamedSharding(self.mesh, P())
    self.text_store_host = self._load_text_store()  # numpy arrays, or None
    self.text_store = None if self.text_store_host is None else {  # the same on every device
        k: jax.device_put(v, self.replicated) for k, v in self.text_store_host.items()}
    # (state, batch, key, text store or None) -> (state, metrics)
    self.step_fn = jax.jit(self._step, in_shardings=(self.state_sh, self.batch_sh, self.replicated,
                                                     self.replicated),
                           out_shardings=(self.state_sh, self.replicated), donate_argnums=0)

  def _load_text_store(self):
    """The stored instruction embeddings named by data.text_store, or None."""
    path = self.cfg.data.get("text_store", "")
    if not path:
      return None
    text_store.check_frozen(self.cfg.model)
    return text_store.load(path, self.cfg.model)

  def _fresh(self, params, teacher=None):
    """{params, opt_state, step, nonfinite[, aux]}: a new state around `params` (and, for a stage
    with a frozen teacher, `teacher`'s parameters; default: `params`). nonfinite counts the steps
    whose update was skipped: {total, streak (consecutive, up to now)}."""
    zero = jnp.zeros((), jnp.int32)
    state = {"params": params, "opt_state": self.tx.init(params), "step": zero,
             "nonfinite": {"total": zero, "streak": zero}}
    if hasattr(self.stage, "init_aux"):
      state["aux"] = self.stage.init_aux(params, self.cfg, params if teacher is None else teacher)
    return state

  def _update(self, state, batch, rng, store):
    """One gradient step of stage.loss_fn -> (params, opt_state[, aux]), metrics."""
    aux = (state["aux"],) if "aux" in state else ()
    grad_fn = jax.value_and_grad(self.stage.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], self.graphdef, batch, rng, self.cfg, *aux, store=store)
    params, opt_state = apply_gradients(self.tx, grads, state["opt_state"], state["params"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    new = {"params": params, "opt_state": opt_state}
    if aux:
      new["aux"] = self.stage.update_aux(state["aux"], new["params"], self.cfg)
    return new, metrics

  def init_state(self, rng):
    with sh.use_mesh(self.mesh, self.rules):
      return jax.jit(self._init, out_shardings=self.state_sh)(rng)

  def _step(self, state, batch, key, store):
    batch = dict(batch)
    halt = batch.pop("halt", None)  # each process's reason to stop after this step (see step)
    rng = jax.random.fold_in(key, state["step"])
    # store: the stored text embeddings, or None (the text encoder runs as usual)
    if hasattr(self.stage, "update"):
      new, metrics = self.stage.update(state, batch, rng, self.cfg, self.graphdef, self.tx, store=store)
    else:
      new, metrics = self._update(state, batch, rng, store)
    # A NaN/Inf loss or gradient skips the update (parameters, optimizer, EMA stay as they were)
    # and is counted; the loop stops the run after train.max_nonfinite such steps in a row.
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, {k: state[k] for k in new})
    bad = state["nonfinite"]
    new["nonfinite"] = {"total": bad["total"] + (~ok), "streak": jnp.where(ok, 0, bad["streak"] + 1)}
    new["step"] = state["step"] + 1
    metrics["nonfinite_steps"] = new["nonfinite"]["total"]
    metrics["nonfinite_streak"] = new["nonfinite"]["streak"]
    metrics["halt"] = jnp.zeros((), jnp.int32) if halt is None else jnp.max(halt)
    return new, metrics

  def check_batch(self):
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if self.cfg.train.batch_size % shards:
      raise ValueError(f"train.batch_size={self.cfg.train.batch_size} does not split over the "
                       f"{shards} data x fsdp devices of the mesh; change one of them "
                       f"(--config.train.batch_size or --config.mesh.*)")

  def with_params(self, params, teacher=None):
    """The state with `params` (e.g. from an earlier stage) and a fresh optimizer state; a stage
    with a frozen teacher takes it from `teacher` (default: `params`). Parameters may live
    anywhere (host arrays of a reference checkpoint, one device, another mesh): they are placed
    onto this trainer's mesh."""
    def place(x, sharding):
      if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
      host = np.asarray(x)  # the same full value on every process: each takes its own shards
      return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    on_mesh = lambda p: jax.tree.map(place, p, self.state_sh["params"])
    params, teacher = on_mesh(params), None if teacher is None else on_mesh(teacher)
    with sh.use_mesh(self.mesh, self.rules):
      return jax.jit(self._fresh, out_shardings=self.state_sh)(params, teacher)

  def put_batch(self, batch):
    return {k: jax.make_array_from_process_local_data(self.batch_sh, np.asarray(v))
            for k, v in batch.items()}

  def step(self, state, batch, key, halt=0):
    """One training step. `halt` is this process's reason to stop after it (HALT_*); the step
    returns the largest of every process's as metrics["halt"], so all processes of a run agree
    on where to stop without a collective of their own (a signal reaches each at another time)."""
    batch = {**batch, "halt": np.full(len(batch["tokens"]), halt, np.int32)}
    if self.text_store is not None:
      miss = text_store.missing(self.text_store_host, batch["tokens"])
      if miss.any():
        raise ValueError(f"{int(miss.sum())} instruction(s) of this batch are not in data.text_store="
                         f"{self.cfg.data.text_store}; rebuild it with python -m "
                         "anchoredit_jax.data.text_store")
    with sh.use_mesh(self.mesh, self.rules):
      return self.step_fn(state, self.put_batch(batch), key, self.text_store)


def make_data(cfg, split="train", seed=None):
  d = cfg.data
  if d.get("source", "shapes") in ("wds", "tfds"):
    return own_data(cfg, seed)
  if d.get("source", "shapes") != "shapes":
    raise ValueError(f"data.source={d.source!r}: give shapes (ShapesEdit), wds (your shards) or "
                     "tfds (your shards converted by data/tfds_builder.py)")
  return pipeline.make_dataset(
      split=split, res=d.res, num_turns=d.num_turns, batch_size=cfg.train.batch_size // jax.process_count(),
      text_len=cfg.model.text_len, tokenizer=tokenizer_of(cfg.model),
      seed=cfg.seed if seed is None else seed, ops=tuple(d.ops) or None,
      background=d.background, worker_threads=d.threads, worker_processes=d.get("workers", 0),
      prefetch_batches=d.prefetch)


def own_data(cfg, seed=None):
  """BucketBatches over data.shards (WebDataset shards, or a TFDS folder they were converted
  into): this process's part of them, its rows of each global batch."""
  d, m = cfg.data, cfg.model
  stride = m.ae_factor * m.patch
  if d.bucket_step % stride:
    raise ValueError(f"data.bucket_step={d.bucket_step} must be a multiple of the model's pixel "
                     f"stride {stride} (autoencoder factor x patch)")
  if m.get("copy_gate") or cfg.get("causal", {}).get("rollout_target") == "composite":
    raise ValueError("model.copy_gate or causal.rollout_target=composite needs exact edit masks, "
                     f"which data.source={d.source} lacks")
  procs = jax.process_count()
  agree = batches.alone if procs == 1 else (
      lambda fill: np.asarray(multihost_utils.process_allgather(fill)))
  if d.source == "wds":
    source = wds.Source(wds.shard_list(d.shards), jax.process_index(), procs)
  else:
    source = tfds_builder.Frozen(d.shards, jax.process_index(), procs)
  it = batches.BucketBatches(
      source, batch_size=cfg.train.batch_size // procs, base=d.bucket_base or d.res, step=d.bucket_step,
      max_ratio=d.max_ratio, exact_turns=d.exact_turns,
      max_turns=None if cfg.stage == "pretrain" else d.num_turns,  # stage 1: every turn a pair
      language=d.language, text_len=m.text_len, tokenizer=tokenizer_of(m),
      seed=cfg.seed if seed is None else seed, read_threads=d.threads, prefetch=d.prefetch,
      read_workers=d.get("workers", 0), agree=agree, pairs=cfg.stage == "pretrain")
  say(f"data: {len(source)} samples in this process's part of {d.shards}, {len(it.buckets)} "
      f"aspect-ratio buckets, at most {it.variants} batch shapes (compiled step variants)")
  return it


def gather_strings(text: str, allgather=None) -> list:
  """Every process's `text`, in process order (a collective: every process calls it)."""
  allgather = allgather or (lambda x: np.asarray(multihost_utils.process_allgather(x)))
  b = np.frombuffer(text.encode(), np.uint8)
  n = allgather(np.array([len(b)], np.int64)).reshape(-1)
  padded = np.zeros(int(n.max()), np.uint8)
  padded[:len(b)] = b
  rows = allgather(padded).reshape(len(n), -1)
  return [bytes(rows[p, :n[p]]).decode() for p in range(len(n))]


def save_data_state(data_it, allgather=None) -> str:
  """The data position for a checkpoint. Own data (BucketBatches) has one state per process,
  and only process 0 writes the checkpoint's JSON: with several processes it holds a list of
  every process's state. ShapesEdit's position is the same on every process."""
  state = pipeline.save_iterator_state(data_it)
  if not isinstance(data_it, batches.BucketBatches) or (allgather is None and jax.process_count() == 1):
    return state
  return json.dumps({"per_process": gather_strings(state, allgather)})


def restore_data_state(data_it, saved, process_index=None, process_count=None):
  """Inverse of save_data_state, refusing a state saved by another number of processes."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  state = json.loads(saved) if isinstance(saved, (str, bytes)) else saved
  per = state.get("per_process") if isinstance(state, dict) else None
  if isinstance(data_it, batches.BucketBatches) and (per is not None or n > 1):
    if per is None or len(per) != n:
      raise ValueError(f"this run's data position was saved by {len(per) if per else 1} "
                       f"process(es); resume it with that many, not {n} (own data is split by shard)")
    state = per[p]
  pipeline.restore_iterator_state(data_it, state)


def data_metrics(data_it) -> dict:
  """What the data iterator counted (own data: skipped samples per defect, shapes seen)."""
  counts = getattr(data_it, "counts", None)
  if counts is None:
    return {}
  return {**{f"data_{k}": v for k, v in counts.items()}, "data_shapes": len(data_it.shapes)}


def eval_pairs(cfg):
  """Fixed held-out set: sequences 0..N-1 of the held-out split (never used for training)."""
  d = cfg.data
  rows = [pipeline.example_from_seed(i, split="heldout", res=d.res, num_turns=d.num_turns,
                                     text_len=cfg.model.text_len, background=d.background,
                                     tokenizer=tokenizer_of(cfg.model))
          for i in range(cfg.eval.pairs)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _drop_rows_after(path, step):
  """Rewrite the JSON-lines file `path` without its rows of steps > `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if line.strip() and _row_step(line) <= step]
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)


def _row_step(line) -> float:
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):  # a row cut off by a crash mid-write
    return float("inf")


def summary_writer(logdir, purge_step=None):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch where it is
  installed only to accept torch tensors, which costs every training process 1.5-2 s and a few
  hundred MB (None in sys.modules makes `import torch` raise ImportError, which it handles)."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # deferred: only process 0 writes, and only here
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter(logdir, purge_step=purge_step)


class MetricLog:
  """metrics.jsonl + TensorBoard; only process 0 writes."""

  def __init__(self, workdir, start=0):
    """Rows after `start` (the step resumed from) left by an earlier, interrupted attempt are
    dropped, so metrics.jsonl has one row per step and kind."""
    self.on = jax.process_index() == 0
    if self.on:
      self.tb = summary_writer(os.path.join(workdir, "tb"), purge_step=start or None)
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_rows_after(path, start)
      self.f = open(path, "a")

  def write(self, step, kind, values):
    if not self.on:
      return
    row = {"step": int(step), "kind": kind, "time": time.time(), **{k: float(v) for k, v in values.items()}}
    self.f.write(json.dumps(row) + "\n")
    self.f.flush()
    for k, v in values.items():
      self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))
    self.tb.flush()

  def close(self):
    if self.on:
      self.f.close()
      self.tb.close()


def _check_config(workdir, cfg):
  """Refuse to resume a workdir made by a model config with other parameters, or another stage."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    old = load_config(workdir)
    was, now = parameter_fields(old.model), parameter_fields(cfg.model)
    differ = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if differ:
      k = differ[0]
      raise ValueError(f"{workdir} holds a run made with model.{k}={was.get(k)!r} (this config: "
                       f"{now.get(k)!r}{f', and {len(differ) - 1} more fields' if len(differ) > 1 else ''}); "
                       f"resume it with --config.model.{k}={was.get(k)} or use a new --workdir")
    if old.get("stage") != cfg.stage:
      raise ValueError(f"{workdir} holds a {old.get('stage')} run, not {cfg.stage}; use a new "
                       "--workdir or that stage's config")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      f.write(cfg.to_json(indent=2))


def git_state() -> dict:
  """{'commit': HEAD, 'dirty': uncommitted changes to tracked files} of the code being run."""
  here = os.path.dirname(os.path.abspath(__file__))
  git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10)
  try:
    head = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  if head.returncode:
    return {"commit": None, "dirty": None}
  return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def record_provenance(workdir, start_step):
  """Append who ran this run (command, git commit) from which step to <workdir>/provenance.jsonl."""
  if jax.process_index() != 0:
    return
  row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": start_step,
         "command": "python -m anchoredit_jax.train " + " ".join(sys.argv[1:]), **git_state()}
  with open(os.path.join(workdir, "provenance.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")


def _finished_summary(workdir, cfg, step):
  """The summary of a run that already ended at `step` (its steps or minutes spent), else None."""
  path = os.path.join(workdir, "summary.json")
  if step is None or not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  spent = cfg.train.minutes and summary.get("train_minutes", 0.0) >= cfg.train.minutes
  return summary if summary.get("step") == step and (step >= cfg.train.steps or spent) else None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED_EXIT = 75  # stopped by a signal after saving its step: rerun the same command to resume


HALT_BUDGET, HALT_SIGNAL = 1, 2  # reasons to stop after a step, the larger winning across processes


class Grace:
  """After a stop signal, the time the run has to finish its step and save it (a TPU preemption
  notice is about 30 s). If it runs out first the process says so and exits INTERRUPTED_EXIT at
  once: better than being killed mid-save, and orbax never takes an unfinished save for a step."""

  def __init__(self, seconds, mngr):
    self.seconds, self.mngr, self.timer = seconds, mngr, None

  def start(self, step):
    if self.seconds and self.timer is None:
      self.timer = threading.Timer(self.seconds, self._expire, args=(step,))
      self.timer.daemon = True
      self.timer.start()

  def _expire(self, step):
    print(f"interrupted: the {self.seconds:g} s grace period (train.preempt_grace) ran out before "
          f"step {step} was saved; rerun the same command to resume from step "
          f"{self.mngr.latest_step() or 0}, the newest complete checkpoint", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT)

  def cancel(self):
    if self.timer is not None:
      self.timer.cancel()


class Interrupted(Exception):
  """A run stopped by SIGINT/SIGTERM after saving the step it was on."""

  def __init__(self, step, signal_name):
    super().__init__(f"{signal_name} at step {step}: saved a checkpoint of that step; rerun the "
                     "same command to resume")
    self.step = step


class Diverged(ValueError):
  """train.max_nonfinite steps in a row had a NaN/Inf loss or gradient norm."""


def train(cfg, workdir):
  workdir = os.path.abspath(workdir)
  if is_reference(workdir):
    raise ValueError(f"--workdir={workdir} is a reference checkpoint, not a run; train into a new "
                     "directory (--config.init_from may name this one)")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    growth.check_init(cfg)  # before anything is written: a refused run leaves no workdir behind
  _check_config(workdir, cfg)
  trainer = Trainer(cfg)
  trainer.check_batch()
  key = jax.random.key(cfg.seed)
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints,
                                                                    cleanup_tmp_directories=True),
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "extra": ocp.JsonCheckpointHandler()})
  data_it = iter(make_data(cfg))
  train_seconds = 0.0
  done = _finished_summary(workdir, cfg, mngr.latest_step())
  if done is not None:
    mngr.close()
    say(f"{workdir} already finished at step {done['step']}; delete its summary.json to re-evaluate")
    return done
  target = sh.placed(trainer.abstract_state, trainer.state_sh)
  try:
    found = restore_newest(mngr, workdir, target, optional=("nonfinite",))
  except ValueError:
    mngr.close()
    raise
  if found is None:
    if cfg.get("init_from"):
      state = trainer.with_params(growth.load_init(cfg, trainer.mesh, trainer.rules),
                                  growth.load_teacher(cfg, trainer.mesh, trainer.rules))
    else:
      state = trainer.init_state(jax.random.fold_in(key, 0))
    start = 0
  else:
    start, state, extra = found
    check_config_fields(f"{workdir} step {start}", cfg, extra.get("config_fields"), only="model.")
    if "nonfinite" not in state:  # saved before the count existed
      state["nonfinite"] = jax.device_put(jax.tree.map(jnp.zeros_like, trainer.abstract_state["nonfinite"]),
                                          trainer.replicated)
    restore_data_state(data_it, extra["data"])
    train_seconds = extra["train_seconds"]
    say(f"resuming {workdir} at step {start} ({train_seconds / 60:.1f} training minutes so far)")
  record_provenance(workdir, start)
  if trainer.text_store is not None:
    err = text_store.check_against(trainer.graphdef, state["params"], trainer.text_store_host)
    say(f"text embeddings from {cfg.data.text_store} (the encoder is not run; it agrees with the "
        f"stored values to {err:.1e})")

  def save(step):
    save_step(mngr, step, state, {"data": save_data_state(data_it),
                                  "train_seconds": train_seconds,
                                  "config_fields": config_fields(cfg)})

  log = MetricLog(workdir, start)
  pairs = eval_pairs(cfg) if cfg.eval.pairs else None
  if pairs is not None and cfg.data.get("source", "shapes") != "shapes":
    say("note: the held-out evaluation is ShapesEdit's; with your own data it is skipped (run "
        "python -m benchmark.multiturn on the checkpoint)")
    pairs = None
  if pairs is not None and jax.process_count() > 1:
    # the evaluators read results back as host arrays, which a multi-process run does not hold
    say(f"note: held-out evaluation is skipped with {jax.process_count()} processes; run the "
        "same command on one process to evaluate the checkpoint")
    pairs = None
  eval_key, evaluate = jax.random.key(cfg.eval.seed), evaluators.for_config(cfg)

  def run_eval(step):
    res = evaluate(state["params"], trainer.graphdef, cfg, pairs, eval_key)
    log.write(step, "eval", {**res, "train_minutes": train_seconds / 60})
    return res

  budget = cfg.train.minutes * 60
  bar = tqdm(total=cfg.train.steps, initial=start, desc=f"{cfg.stage}", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  step, result, t_log, n_log = start, {}, time.perf_counter(), 0
  metrics, diverged = None, None
  # Ctrl-C or SIGTERM (a preemption, scancel) finishes the step in flight, then saves a
  # checkpoint (the state is donated to each step, so interrupting one midway would lose it).
  stop, grace = [], Grace(cfg.train.get("preempt_grace", 0.0), mngr)
  def on_signal(num, _):
    stop.append(num)
    grace.start(step)
  old_handlers = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
  several = jax.process_count() > 1
  try:
    while step < cfg.train.steps:
      halt = HALT_SIGNAL if stop else HALT_BUDGET if budget and train_seconds >= budget else 0
      if halt and not several:  # one process needs no agreement: stop before another step
        break
      t0 = time.perf_counter()
      state, metrics = trainer.step(state, next(data_it), key, halt=halt)
      step += 1
      n_log += 1
      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        m = {k: v for k, v in jax.device_get(metrics).items() if k != "halt"}
        rate = n_log / (time.perf_counter() - t_log)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}", steps_s=f"{rate:.2f}")
        log.write(step, "train", {**m, **data_metrics(data_it), "steps_per_s": rate,
                                  "train_minutes": train_seconds / 60})
        t_log, n_log = time.perf_counter(), 0
      streak = int(metrics["nonfinite_streak"])  # waits for the step, as the loop always has
      train_seconds += time.perf_counter() - t0
      bar.update(1)
      if streak >= cfg.train.max_nonfinite:
        diverged = (streak, int(metrics["nonfinite_steps"]))
        break
      agreed = int(metrics["halt"]) if several else 0  # every process stops after the same step
      if agreed == HALT_SIGNAL and not stop:
        stop.append("a signal to another process")
      if agreed:
        break
      if step % cfg.train.ckpt_every == 0:
        save(step)
      if pairs is not None and step % cfg.train.eval_every == 0:
        result = run_eval(step)
        bar.write(f"step {step} ({train_seconds / 60:.1f} min): " +
                  ", ".join(f"{k}={v:.3f}" for k, v in result.items() if not k.startswith("copy_")))
  finally:  # also on an error, so its line starts on a line of its own
    bar.close()
  if mngr.latest_step() != step and not diverged:
    save(step)
  mngr.wait_until_finished()
  # Only now: a signal during the final save is noted (the run then stops as interrupted) rather
  # than killing the process before the step it ended on is on disk.
  for s, h in old_handlers.items():
    signal.signal(s, h)
  kept = mngr.latest_step()
  mngr.close()
  if diverged:
    log.close()
    streak, total = diverged
    raise Diverged(f"the loss or gradient norm was NaN/Inf at steps {step - streak + 1}-{step} "
                   f"({total} such steps in all; their updates were skipped, so the newest "
                   f"checkpoint, step {kept}, holds finite parameters): lower --config.optim.lr "
                   f"(now {cfg.optim.lr:g}) or check the data, then rerun")
  grace.cancel()
  if stop:  # no final evaluation and no summary: whoever interrupts wants the run to stop now
    log.close()
    raise Interrupted(step, stop[0] if isinstance(stop[0], str) else signal.Signals(stop[0]).name)
  if pairs is not None and (not result or step % cfg.train.eval_every):
    result = run_eval(step)
  log.close()
  summary = {"step": step, "train_minutes": train_seconds / 60, **result}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def main():
  # Flags are defined here, not at import: other commands and benchmarks import this module, and
  # absl refuses a flag defined twice.
  config = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Stage config file[:preset].")
  workdir = flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir).")
  coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                    "several processes outside a TPU slice or SLURM job.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")
  heartbeat = flags.DEFINE_integer("heartbeat_timeout", 60, "Seconds after which the other "
                                   "processes give up on a silent (dead) one.")

  def fail(message):  # an error every process may meet: the others get to say it too
    errors.fail(message, before_exit=distributed.leave_together)

  def run(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    logging.get_absl_handler().addFilter(errors.OneLineLibraryErrors("orbax"))
    try:
      distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                             heartbeat_timeout=heartbeat.value)
      cfg = config.value
      summary = train(cfg, workdir.value or cfg.workdir)
    except Interrupted as e:
      print(f"interrupted: {e}", file=sys.stderr)
      sys.exit(INTERRUPTED_EXIT)
    except jax.errors.JaxRuntimeError as e:  # e.g. a peer process died or never came up
      errors.fail(f"(process {jax.process_index()}) {errors.short(e, 300)}", code=3)
    except OSError as e:  # FileNotFoundError included: ours name the file and what to do
      fail(errors.short(e, 300) if not e.strerror else
           f"{e.strerror}: {e.filename or ''}; choose a --workdir that can be written to")
    except (ValueError, NotImplementedError) as e:
      if "No space left on device" in str(e):  # orbax/tensorstore's wording of ENOSPC
        fail(f"no space left on the device of {workdir.value or cfg.workdir} while saving a "
             "checkpoint; free space and rerun the same command (it resumes from the last "
             "complete checkpoint)")
      fail(errors.message(e))
    if jax.process_index() == 0:
      print(json.dumps(summary))

  app.run(run, flags_parser=cli.absl_flags_parser(__doc__))


if __name__ == "__main__":
  main()
