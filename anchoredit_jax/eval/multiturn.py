"""Long-horizon multi-turn evaluation: every system edits the same held-out ShapesEdit sequences
for T turns from its own earlier outputs, scored turn by turn against the exact ground truth.

Systems (the issue-4 list; `weights` names the stage directory under a checkpoint root):
  i    AnchorEdit: the 4-step student with anchor + window memory           (distill)
  ii   its N-step CFG teacher, same memory                                    (causal)
  iii  no self-rollout: stage 2 teacher-forced, then stage 3 from it          (distill_tf)
  iv   window only, no anchor: inference-time change of i's weights          (distill)
  v    full cache of every turn: inference-time change of i's weights        (distill)
  vi   iterative single-turn editing: stage 1 on its own previous output     (pretrain)
  vii  bidirectional: full attention over the whole history, re-run every
       turn: inference-time change of i's weights (trained causal)          (distill)

Tables and pictures of the results: anchoredit_jax/eval/report.py.

Letters: N sequences, T turns, b batch, R resolution.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from anchoredit_jax import inference
from anchoredit_jax.data import pipeline
from anchoredit_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class System:
  name: str
  label: str
  weights: str            # stage directory under the checkpoint root
  kind: str = "memory"    # memory | single | bidir
  teacher: bool = False   # N-step Euler + CFG instead of the run's own sampler
  anchor: bool = True
  full_cache: bool = False
  note: str = ""


SYSTEMS = {s.name: s for s in [
    System("i", "AnchorEdit 4-step student", "distill"),
    System("ii", "N-step CFG teacher", "causal", teacher=True),
    System("iii", "no self-rollout", "distill_tf",
           note="stages 2 and 3 with causal.self_rollout=False, same step budgets"),
    System("iv", "window only (no anchor)", "distill", anchor=False,
           note="inference-time change of i's weights"),
    System("v", "full cache", "distill", full_cache=True, note="inference-time change of i's weights"),
    System("vi", "iterative single-turn", "pretrain", kind="single",
           note="stage-1 model fed its own previous output (uint8), 20-step CFG"),
    System("vii", "bidirectional re-run", "distill", kind="bidir",
           note="inference-time change of i's weights: full attention over all turns, re-run each turn"),
]}

# Training runs behind each stage directory, as `anchoredit_jax.train` flags ({root}: the runs
# directory, {preset}: the config preset). The main pipeline's three are also `make reproduce`.
TRAIN_RUNS = {
    "pretrain": ["--config=configs/pretrain.py:{preset}"],
    "causal": ["--config=configs/causal.py:{preset}", "--config.init_from={root}/pretrain"],
    "distill": ["--config=configs/distill.py:{preset}", "--config.init_from={root}/causal"],
    "causal_tf": ["--config=configs/causal.py:{preset}", "--config.init_from={root}/pretrain",
                  "--config.causal.self_rollout=False"],
    "distill_tf": ["--config=configs/distill.py:{preset}", "--config.init_from={root}/causal_tf",
                   "--config.causal.self_rollout=False"],
}
NEEDS = {"distill_tf": ["pretrain", "causal_tf"], "causal_tf": ["pretrain"],
         "distill": ["pretrain", "causal"], "causal": ["pretrain"], "pretrain": []}


def heldout(n: int, turns: int, res: int, text_len: int) -> dict:
  """N held-out sequences of T edits, stacked: images [N,T+1,R,R,3], tokens [N,T,l], masks."""
  rows = [pipeline.example_from_seed(i, split="heldout", res=res, num_turns=turns, text_len=text_len)
          for i in range(n)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _Memory:
  """Systems i-v: AnchorMemory sessions through the jitted edit_turn."""

  def __init__(self, system, cfg, graphdef, params, teacher_steps, turns):
    self.args = (params, graphdef)
    self.cfg, self.system = cfg, system
    if system.teacher:
      self.sampler = inference.Sampler("teacher", teacher_steps, cfg.eval.guidance, cfg.flow.shift)
    else:
      self.sampler = inference.default_sampler(cfg)
    self.window = turns + 1 if system.full_cache else cfg.causal.window

  def start(self, source):
    from anchoredit_jax.models.model import init_memory
    mem = init_memory(self.cfg.model, source.shape[0], source.shape[1], self.window,
                      use_anchor=self.system.anchor)
    return inference.start_memory(*self.args, mem, jnp.asarray(source))

  def turn(self, mem, tokens, rng):
    return inference.edit_turn(*self.args, mem, jnp.asarray(tokens), rng, sampler=self.sampler)


class _Single:
  """System vi: the stage-1 single-turn editor, its own previous output as the next input."""

  def __init__(self, cfg, graphdef, params):
    self.args, self.e = (params, graphdef), cfg.eval

  def start(self, source):
    return jnp.asarray(source)

  def turn(self, prev, tokens, rng):
    from anchoredit_jax.stages.pretrain import sample
    out = jnp.clip(sample(*self.args, prev, jnp.asarray(tokens), rng, steps=self.e.steps,
                          guidance=self.e.guidance, shift=self.e.shift), 0.0, 1.0)
    return out, jnp.round(out * 255.0).astype(jnp.uint8)  # saved and reloaded, as users do


class _Bidir:
  """System vii: no memory; the whole history (clean latents, instructions) re-run each turn."""

  def __init__(self, cfg, graphdef, params):
    from anchoredit_jax.models.model import make_autoencoder
    self.args, self.cfg, self.compiled = (params, graphdef), cfg, {}
    self.ae = make_autoencoder(cfg.model)

  def start(self, source):
    from anchoredit_jax.stages.pretrain import empty_tokens
    b = source.shape[0]
    empty = jnp.broadcast_to(empty_tokens(self.cfg.model), (b, 1, self.cfg.model.text_len))
    return self.ae.encode(jnp.asarray(source))[:, None], empty

  def prepare(self, state, tokens, rng):
    """Compile for this history length ahead of the timed call (the shapes grow every turn)."""
    hist, htok = state
    key = (hist.shape, str(rng.dtype))
    if key not in self.compiled:
      self.compiled[key] = inference.bidirectional_turn.lower(
          *self.args, hist, htok, jnp.asarray(tokens), rng, steps=self.cfg.distill.student_steps,
          shift=self.cfg.flow.shift).compile()
    return self.compiled[key]

  def turn(self, state, tokens, rng):
    hist, htok = state
    tokens = jnp.asarray(tokens)
    x0 = self.prepare(state, tokens, rng)(self.args[0], hist, htok, tokens, rng)
    state = (jnp.concatenate([hist, x0[:, None]], 1), jnp.concatenate([htok, tokens[:, None]], 1))
    return jnp.clip(self.ae.decode(x0), 0.0, 1.0), state


def make_runner(system, weights_dir, *, teacher_steps=50, turns=16):
  from anchoredit_jax.checkpoint import load_params
  cfg, graphdef, params, _ = load_params(weights_dir)
  if system.kind == "single":
    return _Single(cfg, graphdef, params)
  if system.kind == "bidir":
    return _Bidir(cfg, graphdef, params)
  return _Memory(system, cfg, graphdef, params, teacher_steps, turns)


def run_system(runner, seqs, *, batch_size=32, seed=0, keep=2, bar=None):
  """Per-turn metrics {name: [N,T]}, the first `keep` trajectories uint8 [keep,T,R,R,3], the
  state carried between turns at turn T (bytes per sequence) and the median seconds per turn
  (per batch of sequences, turn 1 excluded: it compiles)."""
  N, T = seqs["tokens"].shape[:2]
  per_batch, traj, seconds, state_bytes = [], [], [], 0
  for i in range(0, N, batch_size):
    sl = slice(i, i + batch_size)
    imgs = seqs["images"][sl]
    source = jnp.asarray(imgs[:, 0], jnp.float32) / 255.0
    state = runner.start(imgs[:, 0])
    rows, outs = [], []
    for k in range(T):
      rng = jax.random.fold_in(jax.random.key(seed), k)
      if hasattr(runner, "prepare"):
        runner.prepare(state, seqs["tokens"][sl, k], rng)
      t0 = time.perf_counter()
      pred, state = runner.turn(state, seqs["tokens"][sl, k], rng)
      pred = jax.block_until_ready(pred)
      if k:
        seconds.append(time.perf_counter() - t0)
      rows.append(jax.device_get(metrics.turn_metrics(
          pred, jnp.asarray(imgs[:, k + 1], jnp.float32) / 255.0, source,
          jnp.asarray(seqs["edit_masks"][sl, k]), jnp.asarray(seqs["identity_masks"][sl, k]))))
      if i == 0:
        outs.append(np.asarray(np.round(np.asarray(pred[:keep]) * 255.0), np.uint8))
      if bar is not None:
        bar.update(1)
    state_bytes = inference.tree_bytes(state) // imgs.shape[0]
    per_batch.append({key: np.stack([r[key] for r in rows], 1) for key in rows[0]})
    if i == 0:
      traj = np.stack(outs, 1)
  m = {key: np.concatenate([r[key] for r in per_batch]) for key in per_batch[0]}
  return m, traj, state_bytes, float(np.median(seconds)) if seconds else float("nan")


def summarize(m) -> dict:
  """Means over sequences per turn (lists of T) for every metric."""
  return {key: [float(x) for x in np.nanmean(v, axis=0)] for key, v in m.items()}


def evaluate(systems, roots, *, sequences=32, turns=16, teacher_steps=50, batch_size=32, seed=0,
             keep=2, res=None, log=print):
  """Run `systems` (names) on the same held-out sequences. Weights of a system are looked up in
  each of `roots` in order (reference checkpoints first, then runs). Returns (results, seqs,
  trajectories, skipped {name: why})."""
  from tqdm import tqdm

  from anchoredit_jax.checkpoint import has_model, load_config
  found, skipped = {}, {}
  for name in systems:
    sys_ = SYSTEMS[name]
    dirs = [os.path.join(r, sys_.weights) for r in roots if has_model(os.path.join(r, sys_.weights))]
    if dirs:
      found[name] = dirs[0]
    else:
      skipped[name] = (f"no weights in {' or '.join(os.path.join(r, sys_.weights) for r in roots)}; "
                       "train them with python -m benchmark.multiturn --all")
  if not found:
    raise FileNotFoundError("no system has weights: " + "; ".join(skipped.values()))
  cfg0 = load_config(next(iter(found.values())))
  res = res or cfg0.data.res
  seqs = heldout(sequences, turns, res, cfg0.model.text_len)
  results, trajectories = {}, {}
  bar = tqdm(total=len(found) * turns * -(-sequences // batch_size), desc="systems x turns", unit="turn")
  for name, wdir in found.items():
    sys_ = SYSTEMS[name]
    bar.set_postfix(system=name)
    runner = make_runner(sys_, wdir, teacher_steps=teacher_steps, turns=turns)
    m, traj, state_bytes, sec = run_system(runner, seqs, batch_size=batch_size, seed=seed, keep=keep, bar=bar)
    results[name] = {"label": sys_.label, "weights": wdir, "note": sys_.note, "kind": sys_.kind,
                     "teacher_steps": teacher_steps if sys_.teacher else None,
                     "state_bytes": int(state_bytes), "seconds_per_turn": sec, "per_turn": summarize(m)}
    trajectories[name] = traj
  bar.close()
  return results, seqs, trajectories, skipped
