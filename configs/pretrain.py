"""Stage 1: identity-preserving single-turn pretraining on ShapesEdit pairs.

  python -m anchoredit_jax.train --config=configs/pretrain.py --workdir=runs/toy/pretrain
  python -m anchoredit_jax.train --config=configs/pretrain.py:smoke --workdir=/tmp/smoke

Presets: smoke (tests, seconds), toy (default: this 2-core CPU, 32x32, about an hour), small
(one GPU: ~110M parameters at 64x64, bfloat16 compute), wan1.3b and wan14b (full size;
declared for shape checks with jax.eval_shape and for pods).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, preset="toy")
  p = arg.preset
  c = ml_collections.ConfigDict()
  c.preset = p
  c.stage = "pretrain"
  c.workdir = f"runs/{p}/pretrain"
  c.seed = 0
  c.model = common.model_config(p)

  c.data = ml_collections.ConfigDict(dict(
      res={"wan1.3b": 480, "wan14b": 480, "small": 64}.get(p, 32), num_turns=1, background="procedural", ops=(),
      threads=1, prefetch=4,
      workers=0,  # reader processes (grain mp_prefetch) beside the read threads; 0: threads only
      text_store="",  # a folder of stored instruction embeddings (data/text_store.py; frozen umT5)
      # source="wds": your own multi-turn data in WebDataset shards (`shards`: a glob or a
      # {"resolved_files": [...]} JSON; README, "Training on your own multi-turn data"), cropped
      # and resized to aspect-ratio buckets of area <= bucket_base**2 (0: res), sides in steps of
      # bucket_step; num_turns is then the most turns a sample keeps (stage 1: every turn is a pair)
      source="shapes", shards="", bucket_base=0, bucket_step=64, max_ratio=4.0, exact_turns=False,
      language="en"))
  # p_identity: share of examples whose instruction is identity_text and whose target is the
  # source ("no instruction means no change"), never the empty instruction CFG drops to.
  # gate_weight: the copy gate's cross-entropy against the exact "unchanged" mask (copy_gate models)
  c.flow = ml_collections.ConfigDict(dict(t_mean=0.0, t_std=1.0, shift=3.0, p_uncond=0.1,
                                         edit_weight=4.0, p_identity=0.0, identity_text="no change",
                                         gate_weight=1.0))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=200, end_lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.99, clip=1.0))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, steps=9000, minutes=60.0, log_every=50, ckpt_every=500, eval_every=750,
      keep_checkpoints=2,
      max_nonfinite=10,  # stop after this many steps in a row with a NaN/Inf loss (each skipped)
      preempt_grace=30.0))  # seconds from SIGTERM/SIGINT to a saved step, else exit at once (0: no limit)
  # evaluator: what the loop measures (anchoredit_jax/eval/evaluators.py)
  c.eval = ml_collections.ConfigDict(dict(
      evaluator="single_turn", pairs=256, batch_size=64, steps=20, guidance=2.0, shift=3.0, seed=0))
  c.mesh = common.mesh_config(p)
  c.sharding = ml_collections.ConfigDict(dict(rules=common.sharding_rules()))

  if p in ("smoke", "toy"):
    c.data.bucket_step = 8  # 32 px images
  if p == "smoke":
    c.train.update(batch_size=8, steps=20, minutes=0.0, log_every=5, ckpt_every=10, eval_every=10)
    c.optim.update(warmup_steps=5)
    c.eval.update(pairs=8, batch_size=8, steps=4)
  elif p == "small":
    c.train.update(batch_size=32, steps=50000, minutes=0.0, eval_every=2500, ckpt_every=1000)
    c.optim.update(lr=3e-4, warmup_steps=1000, end_lr=3e-5)
  elif p in common.WAN_PRESETS:
    c.train.update(batch_size=64, minutes=0.0)
    c.optim.update(lr=1e-4, warmup_steps=1000, end_lr=1e-5)
    c.flow.update(shift=5.0)
    c.eval.update(shift=5.0, steps=50, guidance=5.0)
  for k, v in arg.items():
    if k != "preset":
      if k not in c:
        raise ValueError(f"unknown option {k}={v} after the preset; options set top-level fields "
                         f"({', '.join(sorted(c))}); set others with --config.<section>.<field>=")
      c[k] = v
  return c
