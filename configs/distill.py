"""Stage 3: consistency distillation of the stage-2 model into a 4-step causal student.

  python -m anchoredit_jax.train --config=configs/distill.py --workdir=runs/toy/distill

Reads the stage-2 run named by `init_from` (default runs/<preset>/causal): it is the frozen,
CFG-guided teacher, and the student and its EMA start from it. Same sequences, memory and
self-rollout switches as stage 2 (`causal.*`); the distillation itself is set by `distill.*`.
"""
import ml_collections

from configs import causal


def get_config(arg=None):
  c = causal.get_config(arg)
  p = c.preset
  c.stage = "distill"
  c.workdir = f"runs/{p}/distill"
  c.init_from = f"runs/{p}/causal"
  c.distill = ml_collections.ConfigDict(dict(
      intervals=16,      # discretisation N of [0, 1]; a multiple of student_steps
      guidance=2.0,      # teacher CFG scale, distilled into the student
      ema_decay=0.95,    # EMA student that gives the targets
      student_steps=4))  # the few-step sampler (self-rollout and inference)
  c.train.update(steps=500, eval_every=250)  # ~2.5 s/step on the 2-core CPU: about 20 minutes
  c.optim.update(lr=1e-4, warmup_steps=100, end_lr=1e-5)
  if p == "smoke":
    c.distill.update(intervals=4, student_steps=2)
    c.train.update(steps=4)
  return c
