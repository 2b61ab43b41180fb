"""Contact sheet of ShapesEdit sequences: one row per sequence, one column per turn, the
instruction above each turn and the edit mask outlined in red.

  python -m anchoredit_jax.data.preview --out docs/shapesedit.png --turns 6 --res 128
"""
import argparse
import textwrap

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchoredit_jax.data import shapes  # noqa: E402


def contact_sheet(out, seeds=(0, 1, 2), turns=6, res=128, split="train", background="procedural"):
  fig, axes = plt.subplots(len(seeds), turns + 1, figsize=(1.9 * (turns + 1), 2.1 * len(seeds)))
  axes = np.atleast_2d(axes)
  for row, seed in enumerate(seeds):
    seq = shapes.make_sequence(seed, turns, res, split, background=background)
    for col in range(turns + 1):
      ax = axes[row, col]
      ax.imshow(seq["images"][col], interpolation="nearest")
      if col:
        ax.contour(seq["edit_masks"][col - 1], levels=[0.5], colors="red", linewidths=0.6)
      title = "source" if col == 0 else textwrap.fill(seq["instructions"][col - 1], 26)
      ax.set_title(title, fontsize=6.5)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--turns", type=int, default=6)
  ap.add_argument("--res", type=int, default=128)
  ap.add_argument("--background", default="procedural", choices=shapes.BACKGROUNDS)
  args = ap.parse_args(argv)
  print(contact_sheet(args.out, turns=args.turns, res=args.res, background=args.background))


if __name__ == "__main__":
  main()
