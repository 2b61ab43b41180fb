"""Long-horizon multi-turn evaluation: every system edits the same held-out ShapesEdit sequences
for T turns, scored turn by turn against the exact ground truth. The context of the next turn is
the system's own output (context "own", what a user gets) or the ground-truth turn (context
"oracle": written into the memory, fed as the next input, or appended to the history), which
separates what one turn loses from what feeding a model its own outputs piles up.

Systems (the issue-4 list; `weights` names the stage directory under a checkpoint root):
  i    AnchorEdit: the 4-step student with anchor + window memory           (distill)
  ii   its N-step CFG teacher, same memory                                    (causal)
  ii4  the stage-2 weights with i's 4-step sampler, no CFG: no distillation   (causal)
  iii  no self-rollout: stage 2 teacher-forced, then stage 3 from it          (distill_tf)
  iv   window only, no anchor: inference-time change of i's weights          (distill)
  v    full cache of every turn: inference-time change of i's weights        (distill)
  vi   iterative single-turn editing: stage 1 on its own previous output     (pretrain)
  vii  bidirectional: full attention over the whole history, re-run every
       turn: inference-time change of i's weights (trained causal)          (distill)
  i-dmd  the 4-step student made by DMD (stage 3b) from the stage-2 weights,
       with the consistency student's training FLOPs                        (dmd)

Tables and pictures of the results: anchoredit_jax/eval/report.py.

Letters: N sequences, T turns, b batch, R resolution.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from anchoredit_jax import inference
from anchoredit_jax.checkpoint import has_model, load_config, load_params
from anchoredit_jax.data import pipeline
from anchoredit_jax.data.tokenize import tokenizer_of
from anchoredit_jax.editing import empty_tokens
from anchoredit_jax.eval import metrics, own_data, stats
from anchoredit_jax.models.model import init_memory, make_autoencoder

CONTEXTS = ("own", "oracle", "both")
# the sampler noise of turn k: "fresh" draws anew (fold_in of k), "same" reuses turn 1's draw for
# every turn of a session, so what a turn's sampling error does to unedited pixels it does alike
# at every turn instead of adding a new error each time; "antithetic" reuses it negated at every
# other turn (memory systems), so that errors odd in the noise cancel between turns
TURN_NOISE = ("fresh", "same", "antithetic")


@dataclasses.dataclass(frozen=True)
class System:
  name: str
  label: str
  weights: str            # stage directory under the checkpoint root
  kind: str = "memory"    # memory | single | bidir
  teacher: bool = False   # N-step Euler + CFG instead of the run's own sampler
  few_step: bool = False  # the 4-step consistency sampler without CFG on stage-2 weights
  anchor: bool = True
  full_cache: bool = False
  note: str = ""


SYSTEMS = {s.name: s for s in [
    System("i", "AnchorEdit 4-step student", "distill"),
    System("ii", "N-step CFG teacher", "causal", teacher=True),
    System("ii4", "stage 2, 4-step sampler, no CFG", "causal", few_step=True,
           note="stage-2 weights, no distillation: what stage 3 starts from"),
    System("iii", "no self-rollout", "distill_tf",
           note="stages 2 and 3 with causal.self_rollout=False, same step budgets"),
    System("iv", "window only (no anchor)", "distill", anchor=False,
           note="inference-time change of i's weights"),
    System("v", "full cache", "distill", full_cache=True, note="inference-time change of i's weights"),
    System("vi", "iterative single-turn", "pretrain", kind="single",
           note="stage-1 model fed its own previous output (uint8), 20-step CFG"),
    System("vii", "bidirectional re-run", "distill", kind="bidir",
           note="inference-time change of i's weights: full attention over all turns, re-run each turn"),
    System("i-dmd", "DMD 4-step student", "dmd",
           note="stage 3b from the stage-2 weights, as many training FLOPs as i's stage 3"),
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
    # 1400 mean DMD steps cost what stage 3's 500 do (flops.dmd_step, flops.distill_step)
    "dmd": ["--config=configs/dmd.py:{preset}", "--config.init_from={root}/causal",
            "--config.dmd.real_from={root}/causal", "--config.train.steps=1400"],
}
NEEDS = {"distill_tf": ["pretrain", "causal_tf"], "causal_tf": ["pretrain"], "dmd": ["pretrain", "causal"],
         "distill": ["pretrain", "causal"], "causal": ["pretrain"], "pretrain": []}


def heldout(n: int, turns: int, res: int, text_len: int, tokenizer: str = "bytes") -> dict:
  """N held-out sequences of T edits, stacked: images [N,T+1,R,R,3], tokens [N,T,l] (by the
  model's tokenizer: bytes, or a Hugging Face tokenizer folder), masks."""
  rows = [pipeline.example_from_seed(i, split="heldout", res=res, num_turns=turns, text_len=text_len,
                                     tokenizer=tokenizer) for i in range(n)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _Memory:
  """Systems i-v: AnchorMemory sessions through the jitted edit_turn."""

  def __init__(self, system, cfg, graphdef, params, teacher_steps, turns):
    self.args = (params, graphdef)
    self.cfg, self.system = cfg, system
    if system.teacher:
      self.sampler = inference.Sampler("teacher", teacher_steps, cfg.eval.guidance, cfg.flow.shift)
    elif system.few_step:
      self.sampler = inference.Sampler("student", 4, 1.0, cfg.flow.shift)
    else:
      self.sampler = inference.default_sampler(cfg)
    self.window = turns + 1 if system.full_cache else cfg.causal.window

  def start(self, source):
    mem = init_memory(self.cfg.model, source.shape[0], source.shape[1], self.window,
                      use_anchor=self.system.anchor)
    return inference.start_memory(*self.args, mem, jnp.asarray(source))

  def flip(self, negate: bool):
    """Negate (or not) every noise draw of the turns that follow."""
    self.sampler = dataclasses.replace(self.sampler, noise_sign=-1.0 if negate else 1.0)

  def turn(self, mem, tokens, rng):
    return inference.edit_turn(*self.args, mem, jnp.asarray(tokens), rng, sampler=self.sampler)

  def oracle_turn(self, mem, tokens, rng, image):
    """The same sample as `turn`; the ground-truth image uint8 [b,R,R,3] is written instead."""
    tokens = jnp.asarray(tokens)
    pred = inference.sample_turn(*self.args, mem, tokens, rng, sampler=self.sampler)
    return pred, inference.write_image(*self.args, mem, jnp.asarray(image), tokens)


class _Single:
  """System vi: the stage-1 single-turn editor, its own previous output as the next input."""

  def __init__(self, cfg, graphdef, params):
    self.args, self.e = (params, graphdef), cfg.eval

  def start(self, source):
    return jnp.asarray(source)

  def turn(self, prev, tokens, rng):
    out = inference.sample_single(*self.args, prev, jnp.asarray(tokens), rng, steps=self.e.steps,
                                  guidance=self.e.guidance, shift=self.e.shift)
    out = jnp.clip(out, 0.0, 1.0)
    return out, jnp.round(out * 255.0).astype(jnp.uint8)  # saved and reloaded, as users do

  def oracle_turn(self, prev, tokens, rng, image):
    return self.turn(prev, tokens, rng)[0], jnp.asarray(image)


class _Bidir:
  """System vii: no memory; the whole history (clean latents, instructions) re-run each turn."""

  def __init__(self, cfg, graphdef, params):
    self.args, self.cfg, self.compiled = (params, graphdef), cfg, {}
    self.ae = make_autoencoder(cfg.model)

  def start(self, source):
    b = source.shape[0]
    empty = jnp.broadcast_to(empty_tokens(self.cfg.model), (b, 1, self.cfg.model.text_len))
    return self.ae.encode(jnp.asarray(source))[:, None], empty

  def prepare(self, state, tokens, rng):
    """Compile for this history length ahead of the timed call (the shapes grow every turn)."""
    hist, htok = state
    key = (hist.shape, str(rng.dtype))
    if key not in self.compiled:
      self.compiled[key] = inference.bidirectional_turn.lower(
          *self.args, hist, htok, jnp.asarray(tokens), rng, steps=inference.student_steps(self.cfg),
          shift=self.cfg.flow.shift).compile()
    return self.compiled[key]

  def sample(self, state, tokens, rng):
    x0 = self.prepare(state, tokens, rng)(self.args[0], *state, jnp.asarray(tokens), rng)
    return x0, jnp.clip(self.ae.decode(x0), 0.0, 1.0)

  @staticmethod
  def append(state, x0, tokens):
    hist, htok = state
    return jnp.concatenate([hist, x0[:, None]], 1), jnp.concatenate([htok, jnp.asarray(tokens)[:, None]], 1)

  def turn(self, state, tokens, rng):
    x0, pred = self.sample(state, tokens, rng)
    return pred, self.append(state, x0, tokens)

  def oracle_turn(self, state, tokens, rng, image):
    """The ground-truth turn's latent joins the history in place of the sample."""
    pred = self.sample(state, tokens, rng)[1]
    return pred, self.append(state, self.ae.encode(jnp.asarray(image)), tokens)


def make_runner(system, weights_dir, *, teacher_steps=50, turns=16):
  cfg, graphdef, params, _ = load_params(weights_dir)
  if system.kind == "single":
    return _Single(cfg, graphdef, params)
  if system.kind == "bidir":
    return _Bidir(cfg, graphdef, params)
  return _Memory(system, cfg, graphdef, params, teacher_steps, turns)


def run_system(runner, seqs, *, context="own", batch_size=32, seed=0, keep=2, bar=None,
               turn_noise="fresh", scorer=None):
  """Per-turn metrics {name: [N,T]}, the first `keep` trajectories uint8 [keep,T,R,R,3], the
  state carried between turns at turn T (bytes per sequence) and the median seconds per turn
  (per batch of sequences, turn 1 excluded: it compiles). context "oracle": after each turn the
  ground-truth turn, not the prediction, becomes the context; the prediction is still scored.
  Sequences without edit masks (your own data) are scored by own_data.score_turn with `scorer`."""
  N, T = seqs["tokens"].shape[:2]
  per_batch, traj, seconds, state_bytes = [], [], [], 0
  for i in range(0, N, batch_size):
    sl = slice(i, i + batch_size)
    imgs = seqs["images"][sl]
    source = jnp.asarray(imgs[:, 0], jnp.float32) / 255.0
    state = runner.start(imgs[:, 0])
    rows, outs = [], []
    for k in range(T):
      rng = jax.random.fold_in(jax.random.key(seed), k if turn_noise == "fresh" else 0)
      if turn_noise == "antithetic":
        if not hasattr(runner, "flip"):
          raise ValueError("turn_noise=antithetic needs a memory system (i-v)")
        runner.flip(k % 2 == 1)
      tokens = seqs["tokens"][sl, k]
      if hasattr(runner, "prepare"):
        runner.prepare(state, tokens, rng)
      t0 = time.perf_counter()
      if context == "oracle":
        pred, state = runner.oracle_turn(state, tokens, rng, imgs[:, k + 1])
      else:
        pred, state = runner.turn(state, tokens, rng)
      pred = jax.block_until_ready(pred)
      if k:
        seconds.append(time.perf_counter() - t0)
      if "edit_masks" in seqs:  # ShapesEdit: exact masks
        rows.append(jax.device_get(metrics.turn_metrics(
            pred, jnp.asarray(imgs[:, k + 1], jnp.float32) / 255.0, source,
            jnp.asarray(seqs["edit_masks"][sl, k]), jnp.asarray(seqs["identity_masks"][sl, k]))))
      else:  # your own data: the papers' metrics
        rows.append(own_data.score_turn(pred, imgs[:, k + 1], imgs[:, 0],
                                        [t[k] for t in seqs["instructions"][sl]], scorer))
      if i == 0:
        outs.append(np.asarray(np.round(np.asarray(pred[:keep]) * 255.0), np.uint8))
      if bar is not None:
        bar.update(1)
    if turn_noise == "antithetic":
      runner.flip(False)
    state_bytes = inference.tree_bytes(state) // imgs.shape[0]
    per_batch.append({key: np.stack([r[key] for r in rows], 1) for key in rows[0]})
    if i == 0:
      traj = np.stack(outs, 1)
  m = {key: np.concatenate([r[key] for r in per_batch]) for key in per_batch[0]}
  return m, traj, state_bytes, float(np.median(seconds)) if seconds else float("nan")


def summarize(m) -> dict:
  """Means over sequences per turn (lists of T) for every metric."""
  return {key: [float(x) for x in np.nanmean(v, axis=0)] for key, v in m.items()}


def describe(m, seed=0) -> dict:
  """Means of every metric ("per_turn") and the intervals, conditional success and all-correct
  share of stats.summarize_turns ("stats") of one system in one context (own data: the means and
  bootstrap intervals of its metrics)."""
  if "success" not in m:
    return {"per_turn": summarize(m), "stats": own_data.turn_stats(m, seed)}
  return {"per_turn": summarize(m), "stats": stats.summarize_turns(
      m["success"], m["identity_psnr"], m["preserved_psnr"], seed=seed)}


def find_weights(systems, roots):
  """({name: weights dir}, {name: why skipped}): each system's stage directory, first root first."""
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
  return found, skipped


def evaluate(systems, roots, *, sequences=256, baseline_sequences=None, context="own", turns=16,
             teacher_steps=50, batch_size=32, seed=0, keep=2, res=None, log=print,
             turn_noise="fresh", data=None, scorer=None, language="en", checkpoint=None):
  """Run `systems` (names) on the same held-out sequences: system i on the first `sequences`,
  the others on the first `baseline_sequences` (default: as many). Weights of a system are looked
  up in each of `roots` in order (reference checkpoints first, then runs). context: own | oracle |
  both (own first; the oracle run's results go under "oracle", with the per-sequence identity gap
  own - oracle). `data`: your own shards instead of ShapesEdit (own_data.py; `scorer` adds CLIP /
  DINO). `checkpoint`: one run or reference checkpoint to run as the (single) system instead of
  looking it up. Returns (results, seqs, trajectories of the first context, skipped {name: why})."""
  if context not in CONTEXTS:
    raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
  if turn_noise not in TURN_NOISE:
    raise ValueError(f"turn_noise must be one of {', '.join(TURN_NOISE)}, got {turn_noise!r}")
  if checkpoint is not None:
    if len(systems) != 1 or not has_model(checkpoint):
      raise ValueError(f"--checkpoint {checkpoint}: give one system and a run or reference "
                       "checkpoint directory")
    found, skipped = {systems[0]: checkpoint}, {}
  else:
    found, skipped = find_weights(systems, roots)
  cfg0 = load_config(next(iter(found.values())))
  res = res or cfg0.data.res
  count = {name: sequences if name == "i" else (baseline_sequences or sequences) for name in found}
  if data:
    seqs = own_data.sequences(data, max(count.values()), turns, res, cfg0.model.text_len,
                              tokenizer_of(cfg0.model), language)
    count = {name: min(n, len(seqs["keys"])) for name, n in count.items()}
  else:
    seqs = heldout(max(count.values()), turns, res, cfg0.model.text_len, tokenizer_of(cfg0.model))
  modes = ["own", "oracle"] if context == "both" else [context]
  results, trajectories = {}, {}
  bar = tqdm(total=len(modes) * turns * sum(-(-n // batch_size) for n in count.values()),
             desc="systems x turns", unit="turn")
  for name, wdir in found.items():
    sys_ = SYSTEMS[name]
    runner = make_runner(sys_, wdir, teacher_steps=teacher_steps, turns=turns)
    mine = {k: v[:count[name]] for k, v in seqs.items()}  # arrays and lists alike
    runs = {}
    for mode in modes:
      bar.set_postfix(system=name, context=mode)
      t0 = time.perf_counter()
      m, traj, state_bytes, sec = run_system(runner, mine, context=mode, batch_size=batch_size,
                                             seed=seed, keep=keep, bar=bar, turn_noise=turn_noise,
                                             scorer=scorer)
      wall = time.perf_counter() - t0
      log(f"{name}: {count[name]} sequences x {turns} turns, {mode} context: {wall:.1f} s")
      runs[mode] = (m, traj, dict(describe(m, seed), wall_seconds=wall, context=mode))
      if mode == modes[0]:
        results[name] = {"label": sys_.label, "weights": wdir, "note": sys_.note, "kind": sys_.kind,
                         "teacher_steps": teacher_steps if sys_.teacher else None,
                         "state_bytes": int(state_bytes), "seconds_per_turn": sec, **runs[mode][2]}
        trajectories[name] = traj
    if context == "both":
      results[name]["oracle"] = dict(runs["oracle"][2])
      if "identity_psnr" in runs["own"][0]:
        results[name]["oracle"]["identity_gap"] = stats.paired_gap(
            runs["own"][0]["identity_psnr"], runs["oracle"][0]["identity_psnr"], seed=seed)
  bar.close()
  return results, seqs, trajectories, skipped
