"""Contact sheet of ShapesEdit sequences: one row per sequence, one column per turn, the
instruction above each turn and the edit mask outlined in red. With --degradation, what history
degradation (anchoredit_jax/degrade.py) does to context turns instead; with --source, one
held-out source image as a PNG to edit, its instructions printed.

  python -m anchoredit_jax.data.preview --out docs/shapesedit.png --turns 6 --res 128
  python -m anchoredit_jax.data.preview --degradation --out docs/degradation.png --res 32
  python -m anchoredit_jax.data.preview --source --seed 3 --res 32 --out in.png

With --source, one held-out sequence's source image is written as a PNG (an input for
`anchoredit_jax.edit`) and its instructions are printed as --instruction arguments.
"""
import argparse
import textwrap

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchoredit_jax import cli, degrade  # noqa: E402
from anchoredit_jax.data import shapes  # noqa: E402
from anchoredit_jax.models.autoencoder import PixelAutoencoder  # noqa: E402


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


def degradation_sheet(out, seeds=(0, 1, 2), res=32, draws=3):
  """Per sequence two rows: a context turn clean, with each kind alone at full strength, and
  `draws` samples of the default mix (what training writes); below each, |change| x 5."""
  ae = PixelAutoencoder(1)
  cols = [("clean", None)] + [(k, k) for k in degrade.KINDS] + [(f"mix {i + 1}", "mix") for i in range(draws)]
  fig, axes = plt.subplots(2 * len(seeds), len(cols), figsize=(1.45 * len(cols), 1.6 * 2 * len(seeds)))
  for row, seed in enumerate(seeds):
    x = ae.encode(jnp.asarray(shapes.make_sequence(seed, 1, res, "train")["images"][1:2]))
    for col, (title, kind) in enumerate(cols):
      cfg = degrade.default_config(enabled=kind is not None)
      if kind not in (None, "mix"):
        cfg.update({f"p_{k}": float(k == kind) for k in degrade.KINDS}, s_min=1.0, s_max=1.0)
      y = degrade.degrade(jax.random.key(1000 * seed + col), x, cfg, autoencoder=ae)
      img, diff = np.asarray(ae.decode(y)[0]), np.asarray(jnp.abs(ae.decode(y) - ae.decode(x))[0])
      for r, pic in ((2 * row, img), (2 * row + 1, np.clip(5 * diff, 0, 1))):
        axes[r, col].imshow(pic, interpolation="nearest")
        axes[r, col].axis("off")
      axes[2 * row, col].set_title(title, fontsize=7)
  fig.suptitle("history degradation of a context turn (top) and |change| x 5 (below); "
               "single kinds at strength 1, mixes as training draws them", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  return out


def source_png(out, seed=0, turns=6, res=32, background="procedural"):
  """Held-out sequence `seed`'s source image -> PNG at `out`; returns the edit command for it."""
  seq = shapes.make_sequence(seed, turns, res, split="heldout", background=background)
  Image.fromarray(seq["images"][0]).save(out)
  flags = " ".join(f'--instruction "{t}"' for t in seq["instructions"])
  return f"python -m anchoredit_jax.edit --checkpoint checkpoints/toy/distill --image {out} {flags} --out edits/"


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--out", required=True)
  ap.add_argument("--turns", type=int, default=6)
  ap.add_argument("--res", type=int, default=128)
  ap.add_argument("--background", default="procedural", choices=shapes.BACKGROUNDS)
  ap.add_argument("--degradation", action="store_true", help="history degradation, not sequences")
  ap.add_argument("--source", action="store_true",
                  help="write one held-out source image (--seed) as a PNG and print its instructions")
  ap.add_argument("--seed", type=int, default=0, help="held-out sequence for --source")
  args = cli.parse_args(ap, argv)
  if args.source:
    print(source_png(args.out, args.seed, args.turns, args.res, args.background))
  elif args.degradation:
    print(degradation_sheet(args.out, res=args.res))
  else:
    print(contact_sheet(args.out, turns=args.turns, res=args.res, background=args.background))


if __name__ == "__main__":
  main()
