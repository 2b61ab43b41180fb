"""Stage 2: causal AR-forcing fine-tuning with self-rollout, from the stage-1 checkpoint.

  python -m anchoredit_jax.train --config=configs/causal.py --workdir=runs/toy/causal

Reads the stage-1 run named by `init_from` (default runs/<preset>/pretrain). Ablation switches:
--config.causal.self_rollout=False (pure teacher forcing), --config.causal.window=W,
--config.causal.anchor=False (window only), --config.causal.full_cache=True (keep every turn);
anti-drift: --config.causal.degrade.enabled=True, --config.causal.context_noise=0.2,
--config.causal.rollout_target=composite, --config.causal.turn_weight=1.0,
--config.model.rope_stride=4, --config.model.copy_gate=True (grown over a run without one),
--config.model.gate_from=anchor (that gate copies the source instead of the previous turn).
"""
import ml_collections

from anchoredit_jax import degrade
from configs import common, pretrain


def get_config(arg=None):
  c = pretrain.get_config(arg)
  p = c.preset
  c.stage = "causal"
  c.workdir = f"runs/{p}/causal"
  c.init_from = f"runs/{p}/pretrain"
  c.data.num_turns = 5  # the source + 5 edits, longer than the window below
  # Every turn also gets the source's latent channel-concatenated (as Wan2.1-I2V conditions on its
  # first frame). Stage 1 has no use for it (its source is its previous turn), so it is grown here
  # with zero weights over the stage-1 run; +1 dB identity at turn 16 (benchmark/RESULTS.md).
  c.model.concat_anchor = True
  # Anti-drift switches (issue 17): degrade (history degradation of every context turn written to
  # the memory, anchoredit_jax/degrade.py), context_noise (written at t ~ U[0, this]),
  # rollout_target ("gt": the ground-truth turn; "composite": this turn's ground-truth edit region
  # pasted onto the model's own previous turn, so a failed earlier edit is not "fixed" unasked),
  # turn_weight (alpha of the per-turn loss weight 1 + alpha (k-1)/(K-1)).
  c.causal = ml_collections.ConfigDict(dict(
      self_rollout=True, p_teacher=0.2, window=2, anchor=True, full_cache=False,
      rollout_steps=4, rollout_guidance=1.0,
      degrade=degrade.default_config(enabled=False), context_noise=0.0, rollout_target="gt",
      turn_weight=0.0))
  # ~1.5 s/step on the 2-core CPU: 800 steps is about 20 minutes (benchmark/RESULTS.md)
  c.train.update(batch_size=8, steps=800, minutes=0.0, eval_every=400)
  c.optim.update(lr=2e-4, warmup_steps=100, end_lr=2e-5)
  c.eval.update(evaluator="multi_turn", pairs=64)  # held-out sessions of num_turns edits, each
  # turn from the model's own context
  if p == "smoke":
    c.data.num_turns = 3
    c.causal.update(window=1, rollout_steps=2)
    c.train.update(batch_size=4, steps=4)
    c.eval.update(pairs=4, batch_size=4)
  elif p in common.WAN_PRESETS:
    c.train.update(batch_size=64)  # a multiple of the devices (fsdp=-1 spans them all)
  return c
