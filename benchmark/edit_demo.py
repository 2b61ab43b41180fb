"""A long editing session on one held-out ShapesEdit scene, run through the `edit` command, scored
turn by turn against the exact ground truth.

  python -m benchmark.edit_demo --checkpoint checkpoints/toy/distill --turns 16 --out benchmark/results/edit/latest

Writes the `edit` command's outputs (one PNG per turn, strip.png, session.json/npz) plus
compare.png (model row over ground-truth row) and scores.json (per turn: edit success, edit MAE,
preserved PSNR, identity PSNR against the source).
"""
import argparse
import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np
from PIL import Image

from anchoredit_jax import cli
from anchoredit_jax import edit
from anchoredit_jax.data import shapes
from anchoredit_jax.eval import metrics


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--checkpoint", default="checkpoints/toy/distill")
  ap.add_argument("--turns", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0, help="held-out sequence seed")
  ap.add_argument("--res", type=int, default=32)
  ap.add_argument("--out", default="benchmark/results/edit/latest")
  args = cli.parse_args(ap, argv)

  seq = shapes.make_sequence(args.seed, args.turns, args.res, split="heldout")
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "source.png")
    Image.fromarray(seq["images"][0]).save(src)
    edit.main([f"--checkpoint={args.checkpoint}", f"--image={src}", f"--out={args.out}"]
              + [f"--instruction={t}" for t in seq["instructions"]])
  pred = np.stack([np.asarray(Image.open(os.path.join(args.out, f"turn_{i:02d}.png")))
                   for i in range(args.turns + 1)])
  f = lambda a: jnp.asarray(a, jnp.float32) / 255.0
  m = metrics.turn_metrics(f(pred[1:]), f(seq["images"][1:]),
                           jnp.broadcast_to(f(seq["images"][:1]), pred[1:].shape),
                           jnp.asarray(seq["edit_masks"]), jnp.asarray(seq["identity_masks"]))
  ident = m["identity_psnr"]
  rows = [{"turn": t + 1, "instruction": seq["instructions"][t], "success": float(m["success"][t]),
           "edit_mae": float(m["edit_mae"][t]), "preserved_psnr": float(m["preserved_psnr"][t]),
           "identity_psnr": float(ident[t])} for t in range(args.turns)]
  with open(os.path.join(args.out, "scores.json"), "w") as fh:
    json.dump({"checkpoint": args.checkpoint, "seed": args.seed, "turns": rows}, fh, indent=2)
  cell = 96
  grid = Image.new("RGB", (cell * (args.turns + 1), 2 * cell), "white")
  for i in range(args.turns + 1):
    for row, img in enumerate((pred[i], seq["images"][i])):
      grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (i * cell, row * cell))
  grid.save(os.path.join(args.out, "compare.png"))
  print("| turn | instruction | success | preserved dB | identity dB |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['turn']} | {r['instruction']} | {'yes' if r['success'] else 'no'} | "
          f"{r['preserved_psnr']:.1f} | {r['identity_psnr']:.1f} |")
  print(f"success {np.mean([r['success'] for r in rows]):.0%} over {args.turns} turns; "
        f"{args.out}/compare.png: model (top) over ground truth (bottom)")


if __name__ == "__main__":
  main()
