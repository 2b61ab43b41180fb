"""Why layers.dot_sum exists: a sum of products over one axis, written as autodiff writes it
(multiply, then reduce) and as a contraction (`layers.dot_sum`), timed side by side.

  python -m benchmark.reductions [--reps 200]

Shapes are those of the toy stage-1 step's backward pass (batch 32, one turn of 64 tokens, width
192): the adaLN scale/gate gradient sums over the tokens, the LayerNorm/RMSNorm gradient over the
width, the softmax gradient over the keys.
"""
import argparse
import sys

import jax
import jax.numpy as jnp

from anchoredit_jax import cli
from anchoredit_jax.models.layers import dot_sum
from benchmark.speed import median_time, print_header

CASES = {"adaLN gradient (tokens)": ((32, 1, 64, 192), (2,)),
         "norm gradient (width)": ((32, 1, 64, 192), (3,)),
         "softmax gradient (keys)": ((32, 6, 64, 64), (3,))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--reps", type=int, default=200)
  args = cli.parse_args(ap, argv)
  print_header("reductions", argv)
  print("\n| sum of products | shape, axis | multiply + reduce (us) | dot_sum (us) | ratio |\n|---|---|---|---|---|")
  for name, (shape, axes) in CASES.items():
    a, b = (jax.random.normal(jax.random.key(i), shape) for i in (0, 1))
    plain = jax.jit(lambda a, b: jnp.sum(a * b, axes, keepdims=True))
    mine = jax.jit(lambda a, b: dot_sum(a, b, axes))
    t_plain, t_mine = (median_time(lambda: f(a, b), args.reps) for f in (plain, mine))
    print(f"| {name} | {list(shape)}, {axes[0]} | {t_plain * 1e6:.0f} | {t_mine * 1e6:.0f} | "
          f"{t_plain / t_mine:.1f}x |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
