"""Held-out stage-1 numbers of one saved run under several sampler settings, side by side.

  python -m benchmark.eval_sweep checkpoints/toy/pretrain --steps=10,20,50 --guidance=1,1.5,2,3

Every setting samples the same held-out pairs from the same noise seed; only the sampler changes.
Prints a table and writes `<workdir>/eval_sweep.json`.
"""
import argparse
import itertools
import json
import os
import sys

import jax

from anchoredit_jax import cli
from anchoredit_jax.checkpoint import load_params
from anchoredit_jax.eval import evaluators
from anchoredit_jax.train import eval_pairs


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("workdir")
  ap.add_argument("--steps", default="20", help="comma-separated Euler step counts")
  ap.add_argument("--guidance", default="2.0", help="comma-separated CFG scales")
  ap.add_argument("--pairs", type=int, default=None, help="held-out pairs (default: the run's)")
  args = cli.parse_args(ap, argv)

  try:
    cfg, graphdef, params, step = load_params(args.workdir)
    grid = [(int(s), float(g)) for s, g in itertools.product(args.steps.split(","),
                                                             args.guidance.split(","))]
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {str(e).splitlines()[0]}")
  if cfg.stage != "pretrain":
    sys.exit(f"error: {args.workdir} is a {cfg.stage} run; this sweep evaluates stage-1 runs")
  if args.pairs:
    cfg.eval.pairs = args.pairs
  pairs = eval_pairs(cfg)
  rows = []
  print(f"{args.workdir} step {step}, {cfg.eval.pairs} held-out pairs, device {jax.devices()[0].device_kind}")
  print(f"{'steps':>5} {'cfg':>4} {'success':>8} {'preserved dB':>12} {'edit dB':>8}  per op")
  for n, g in grid:
    cfg.eval.steps, cfg.eval.guidance = n, g
    r = evaluators.single_turn(params, graphdef, cfg, pairs, jax.random.key(cfg.eval.seed))
    rows.append({"steps": n, "guidance": g, **r})
    ops = " ".join(f"{k[8:]}={v:.2f}" for k, v in r.items() if k.startswith("success_"))
    print(f"{n:>5} {g:>4} {r['success']:>8.3f} {r['preserved_psnr']:>12.2f} {r['edit_psnr']:>8.2f}  {ops}",
          flush=True)
  with open(os.path.join(args.workdir, "eval_sweep.json"), "w") as f:
    json.dump({"step": step, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
