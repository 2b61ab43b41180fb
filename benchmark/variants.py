"""Train-step time of config variants side by side: one process, their steps interleaved, ratios.

  python -m benchmark.variants --stages pretrain,causal model.remat=dots model.remat=full
  python -m benchmark.variants --preset toy "model.dtype=bfloat16,model.remat=dots"

Each variant is a comma-separated list of config overrides (`section.field=value`; the value is
read as a Python literal, else kept as a string); the preset as it is comes first. Every variant
is compiled first, then timed in rounds of one step each, so the load of a shared machine falls
on all of them alike. Prints the machine and the command, then per stage and variant the median
step time and its ratio to the preset's. XLA flags are per process: compare them with separate
runs under different XLA_FLAGS, each printing its own baseline.
"""
import argparse
import ast
import sys
import time

import jax
import numpy as np

from benchmark.speed import compiled_step, print_header, stage_config

from anchoredit_jax import cli


def apply(cfg, variant: str):
  """cfg with the overrides of `variant` ('model.remat=dots,train.batch_size=8') applied."""
  for item in filter(None, (v.strip() for v in variant.split(","))):
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"variant item {item!r} is not section.field=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node, *path, field = key.split(".")
    holder = cfg[node]
    for p in path:
      holder = holder[p]
    if field not in holder:
      raise ValueError(f"unknown config field {key!r}")
    holder[field] = value
  return cfg


def time_variants(stage, preset, variants, rounds):
  """{variant: [seconds per step, one per round]} with the steps of all variants interleaved."""
  steps = {v: compiled_step(apply(stage_config(stage, preset), v))[0] for v in variants}
  for one in steps.values():
    jax.block_until_ready(one())  # warm
  times = {v: [] for v in variants}
  for _ in range(rounds):
    for v, one in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(one())
      times[v].append(time.perf_counter() - t0)
  return times


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("variants", nargs="*", help="override lists, e.g. model.remat=dots")
  ap.add_argument("--preset", default="toy")
  ap.add_argument("--stages", default="pretrain")
  ap.add_argument("--rounds", type=int, default=8)
  args = cli.parse_args(ap, argv)
  variants = [""] + args.variants
  try:  # refuse a typo before compiling anything
    for stage in args.stages.split(","):
      for v in variants:
        apply(stage_config(stage, args.preset), v)
  except (ValueError, ModuleNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_header("variants", argv)
  print("\n| stage | variant | median ms / step | ratio to the preset |\n|---|---|---|---|")
  for stage in args.stages.split(","):
    times = time_variants(stage, args.preset, variants, args.rounds)
    base = np.median(times[""])
    for v in variants:
      t = np.median(times[v])
      print(f"| {stage} | {v or args.preset + ' as it is'} | {t * 1e3:.1f} | {t / base:.3f} |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
