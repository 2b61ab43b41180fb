"""Edit an image turn by turn with a stage-2 or stage-3 model: a training run, or one of the
reference checkpoints shipped in checkpoints/ (checkpoints/toy/distill works in a fresh clone).

  python -m anchoredit_jax.edit --checkpoint checkpoints/toy/distill --image in.png \
      --instruction "make the red circle blue" --instruction "move the blue circle up" --out out/

Writes to --out: turn_00.png (the source as the model sees it) and one PNG per turn, strip.png
(all turns side by side), session.json (instructions, per-turn seconds, sampler, checkpoint) and
session.npz (the memory, so `EditSession.load` can go on where this stopped). Everything is
checked before the model is loaded, and the output directory only appears once every file is
written.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

from anchoredit_jax import cli
from anchoredit_jax.checkpoint import load_config
from anchoredit_jax.data.tokenize import tokenize_for
from anchoredit_jax.inference import EDIT_STAGES, EditSession, Sampler, default_sampler

STRIP_CELL = 128  # pixels per turn in strip.png


def load_image(path, res):
  """-> (uint8 [res,res,3], notices). Grayscale/RGBA are converted and other sizes resized."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image {path} not found")
  try:
    img = Image.open(path)
    img.load()
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"image {path} could not be read ({type(e).__name__}); give a PNG or JPEG") from e
  notices = []
  if img.mode != "RGB":
    notices.append(f"converted {img.mode} image to RGB")
    img = img.convert("RGB")
  if img.size != (res, res):
    notices.append(f"resized {img.size[0]}x{img.size[1]} image to {res}x{res}, the model's resolution")
    img = img.resize((res, res), Image.BICUBIC)
  return np.asarray(img, np.uint8), notices


def strip(images, captions):
  """One row of turns, each upscaled to STRIP_CELL with its caption underneath."""
  cell, text_h = STRIP_CELL, 14
  out = Image.new("RGB", (cell * len(images), cell + text_h), "white")
  draw = ImageDraw.Draw(out)
  for i, (im, cap) in enumerate(zip(images, captions)):
    out.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (i * cell, 0))
    draw.text((i * cell + 2, cell + 1), cap[:22], fill="black")
  return out


def parse(argv):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--checkpoint", required=True, help="a causal or distill run directory, or a reference checkpoint (e.g. checkpoints/toy/distill)")
  ap.add_argument("--image", required=True, help="source image (PNG/JPEG)")
  ap.add_argument("--instruction", action="append", required=True, help="one per turn, in order")
  ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  ap.add_argument("--teacher", action="store_true",
                  help="sample with the N-step CFG teacher path instead of a distill run's student")
  ap.add_argument("--steps", type=int, default=50, help="teacher Euler steps")
  ap.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the run's)")
  ap.add_argument("--seed", type=int, default=0)
  return ap.parse_args(argv)


def run(args):
  cfg = load_config(args.checkpoint)
  if cfg.get("stage") not in EDIT_STAGES:
    raise ValueError(f"{args.checkpoint} is a {cfg.get('stage')} run; edit needs a causal (stage 2) "
                     "or distill (stage 3) run")
  for i, text in enumerate(args.instruction, 1):
    if not text.strip():
      raise ValueError(f"instruction {i} is empty; say what to change, e.g. 'make the red circle blue'")
    tokenize_for(cfg.model, [text])  # raises if too long for a byte-level encoder
  source, notices = load_image(args.image, cfg.data.res)
  for n in notices:
    print(f"notice: {n}", file=sys.stderr)
  if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
    raise ValueError(f"--out {args.out} exists and is not an empty directory; choose another")

  sampler = default_sampler(cfg, args.steps)
  if args.teacher:
    sampler = Sampler("teacher", args.steps, args.guidance or cfg.eval.guidance, cfg.flow.shift)
  session = EditSession.from_run(args.checkpoint, source, sampler=sampler, seed=args.seed)
  seconds = []
  for text in tqdm(args.instruction, desc="turns", unit="turn"):
    t0 = time.perf_counter()
    jax.block_until_ready(session.edit(text))
    seconds.append(time.perf_counter() - t0)

  parent = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".edit-", dir=parent)
  try:
    for i, (_, im) in enumerate(session.history):
      Image.fromarray(im).save(os.path.join(tmp, f"turn_{i:02d}.png"))
    strip([h[1] for h in session.history],
          ["source"] + [f"{i}: {t}" for i, t in enumerate(args.instruction, 1)]).save(
              os.path.join(tmp, "strip.png"))
    session.save(os.path.join(tmp, "session.npz"))
    with open(os.path.join(tmp, "session.json"), "w") as f:
      json.dump({"checkpoint": os.path.abspath(args.checkpoint), "image": args.image,
                 "sampler": dataclasses.asdict(sampler),
                 "seed": args.seed, "instructions": args.instruction, "turn_seconds": seconds,
                 "note": "turn 1 includes compilation"}, f, indent=2)
    if os.path.isdir(args.out):
      os.rmdir(args.out)  # empty, checked above
    os.replace(tmp, args.out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  later = seconds[1:] or seconds
  print(f"{len(seconds)} turns -> {args.out} (median turn {np.median(later) * 1000:.1f} ms after the first)")


def main(argv=None):
  args = parse(argv)
  try:
    run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # os._exit, not sys.exit: after a failed restore, orbax's background threads print tracebacks
    # at interpreter shutdown, burying the one-line error. Nothing is left to clean up here.
    os._exit(2)


if __name__ == "__main__":
  main()
