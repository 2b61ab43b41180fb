"""Stage 3b: distribution-matching distillation (DMD) into a 4-step causal student.

  python -m anchoredit_jax.train --config=configs/dmd.py --workdir=runs/toy/dmd

The generator starts from the run named by `init_from` (default runs/<preset>/distill, the
consistency student, as the authors' pipeline does; a stage-2 run or a DMD run work too); the
frozen real score and the critic (fake score) start from the stage-2 run `dmd.real_from`. The
generator's own self-rollout gives the history (`causal.p_teacher` 0: no ground truth is written).
`--config.dmd.objective=regression` trains the authors' regression warm-up instead: the
generator's one step from the noised ground truth at a step of its sampler, regressed onto it.
"""
import ml_collections

from configs import common, distill


def get_config(arg=None):
  c = distill.get_config(arg)
  p = c.preset
  c.stage = "dmd"
  c.workdir = f"runs/{p}/dmd"
  c.init_from = f"runs/{p}/distill"
  steps = c.distill.student_steps
  del c["distill"]
  c.causal.p_teacher = 0.0  # the history is the generator's own, as at inference
  c.dmd = ml_collections.ConfigDict(dict(
      objective="dmd",       # or "regression" (the generator's warm-up; no critic, no real score)
      real_from=f"runs/{p}/causal",  # the frozen real score; the critic starts from it too
      student_steps=steps,   # the generator's few-step sampler (self-rollout and inference)
      # the real score's CFG scale: the authors' 6.0 for Wan; none (1.0) on the small presets,
      # where stage 3's 2.0 made DMD far worse on the toy (RESULTS 2026-12-02); the critic has none
      guidance=6.0 if p in common.WAN_PRESETS else 1.0,
      generator_every=5,     # the critic learns every step, the generator every 5th (the authors')
      # an EMA of the generator, moved after each of its updates: 0 keeps none (the authors'
      # default); above 0 it is kept in the train state and is what the run gives for editing
      ema_decay=0.0,
      t_min=0.02, t_max=0.98,  # where the scores are read (before the flow shift)
      critic_optim=dict(lr=1e-4, warmup_steps=20, end_lr=1e-4, weight_decay=0.0, b1=0.0, b2=0.999,
                        clip=10.0)))
  # the authors' AdamW with beta1 = 0 for both players; on the toy about 20 minutes
  c.optim.update(lr=2e-5, warmup_steps=20, end_lr=2e-5, b1=0.0, b2=0.999, clip=10.0)
  c.train.update(steps=500, eval_every=250)
  if p == "smoke":
    c.dmd.update(generator_every=2)
    c.train.update(steps=4)
  return c
