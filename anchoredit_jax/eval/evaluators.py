"""What the training loop measures on held-out data at each evaluation, one evaluator per kind
of model, chosen by the stage config (`cfg.eval.evaluator`; runs made before that field existed
get their stage's):

  single_turn  stage 1: one edit of each held-out pair, sampled with Euler + CFG (cfg.eval)
  multi_turn   stages 2-3: held-out sessions, each turn from the model's own earlier turns

An evaluator is `(params, graphdef, cfg, data, rng) -> {name: float}`, where data is what
`train.eval_pairs` builds for the config.
"""
import jax
import jax.numpy as jnp
import numpy as np

from anchoredit_jax import inference
from anchoredit_jax.data.shapes import OPS
from anchoredit_jax.eval import metrics, stats
from anchoredit_jax.models.model import init_memory
from anchoredit_jax.stages.causal import memory_window


def single_turn(params, graphdef, cfg, pairs, rng):
  """Held-out single-turn edits. pairs: dict of numpy images [N,2,R,R,3], tokens [N,1,l],
  edit_masks [N,1,R,R], ops [N,1]. Returns mean metrics, the copy-the-source baseline and per-op
  success."""
  ecfg, out, copy = cfg.eval, [], []
  for i in range(0, len(pairs["images"]), ecfg.batch_size):
    sl = slice(i, i + ecfg.batch_size)
    imgs = pairs["images"][sl]
    pred = inference.sample_single(params, graphdef, imgs[:, 0], pairs["tokens"][sl, 0],
                                   jax.random.fold_in(rng, i), steps=ecfg.steps,
                                   guidance=ecfg.guidance, shift=ecfg.shift)
    target = jnp.asarray(imgs[:, 1], jnp.float32) / 255.0
    mask = jnp.asarray(pairs["edit_masks"][sl, 0])
    out.append(jax.device_get(metrics.edit_metrics(pred, target, mask)))
    copy.append(jax.device_get(metrics.edit_metrics(jnp.asarray(imgs[:, 0], jnp.float32) / 255.0,
                                                    target, mask)))
  cat = lambda rows: {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  m, c = cat(out), cat(copy)
  result = {k: float(v.mean()) for k, v in m.items()}
  result.update({f"copy_{k}": float(v.mean()) for k, v in c.items()})
  ops = pairs["ops"][:, 0]
  for j, name in enumerate(OPS):
    if (ops == j).any():
      result[f"success_{name}"] = float(m["success"][ops == j].mean())
  return result


def multi_turn(params, graphdef, cfg, seqs, rng):
  """Held-out multi-turn sessions, each turn generated from the model's own earlier turns (the
  stage-3 student with its few-step sampler, a stage-2 model with the Euler-CFG sampler of
  cfg.eval). seqs: images uint8 [N,K+1,R,R,3], tokens [N,K,l], edit_masks and identity_masks
  [N,K,R,R]. Returns means over sequences and turns, and per-turn success / identity PSNR (pixels
  never edited since the source, against the source)."""
  sampler = inference.default_sampler(cfg, teacher_steps=cfg.eval.steps)
  K, rows = seqs["tokens"].shape[1], []
  for i in range(0, len(seqs["images"]), cfg.eval.batch_size):
    sl = slice(i, i + cfg.eval.batch_size)
    imgs = seqs["images"][sl]
    mem = init_memory(cfg.model, len(imgs), imgs.shape[2:4], memory_window(cfg, K), use_anchor=cfg.causal.anchor)
    mem = inference.start_memory(params, graphdef, mem, jnp.asarray(imgs[:, 0]))
    src = jnp.asarray(imgs[:, 0], jnp.float32) / 255.0
    per_turn = []
    for k in range(K):
      pred, mem = inference.edit_turn(params, graphdef, mem, jnp.asarray(seqs["tokens"][sl, k]),
                                      jax.random.fold_in(rng, i * K + k), sampler=sampler)
      target = jnp.asarray(imgs[:, k + 1], jnp.float32) / 255.0
      m = metrics.turn_metrics(pred, target, src, jnp.asarray(seqs["edit_masks"][sl, k]),
                               jnp.asarray(seqs["identity_masks"][sl, k]))
      per_turn.append(jax.device_get(m))
    rows.append({key: np.stack([t[key] for t in per_turn], 1) for key in per_turn[0]})  # [b,K]
  m = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
  result = {key: float(v.mean()) for key, v in m.items()}
  # per turn: success_turn{k} with its Wilson interval, conditional success and all-correct share,
  # identity/preserved PSNR with bootstrap intervals (eval/stats.py)
  result.update(stats.turn_scalars(stats.summarize_turns(m["success"], m["identity_psnr"],
                                                         m["preserved_psnr"])))
  return result


EVALUATORS = {"single_turn": single_turn, "multi_turn": multi_turn}
BY_STAGE = {"pretrain": "single_turn", "causal": "multi_turn", "distill": "multi_turn", "dmd": "multi_turn"}


def for_config(cfg):
  """The evaluator a stage config names (cfg.eval.evaluator), else its stage's."""
  name = cfg.eval.get("evaluator") or BY_STAGE[cfg.stage]
  if name not in EVALUATORS:
    raise ValueError(f"eval.evaluator={name!r} unknown; choose one of {sorted(EVALUATORS)}")
  return EVALUATORS[name]
