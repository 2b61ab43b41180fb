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
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

from anchoredit_jax import cli, errors
from anchoredit_jax.checkpoint import load_config
from anchoredit_jax.data.shapes import referent_notice
from anchoredit_jax.data.tokenize import tokenize_for
from anchoredit_jax.inference import EDIT_STAGES, EditSession, Sampler, default_sampler

STRIP_CELL = 128  # pixels per turn in strip.png


def load_image(path, res):
  """-> (uint8 [res,res,3], notices). 16-bit images are scaled to 8 bits, grayscale/RGBA
  converted, a non-square image centre-cropped to a square and other sizes resized."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image {path} not found")
  try:
    img = Image.open(path)
    img.load()
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"image {path} could not be read ({type(e).__name__}); give a PNG or JPEG") from e
  notices = []
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (PIL reads some as 32-bit "I")
    wide = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
    notices.append(f"scaled {img.mode} image from {int(top) + 1} levels to 256")
    img = Image.fromarray(np.round(np.clip(wide / top, 0, 1) * 255).astype(np.uint8), "L")
  if img.mode != "RGB":
    notices.append(f"converted {img.mode} image to RGB")
    img = img.convert("RGB")
  w, h = img.size
  if w != h:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    notices.append(f"centre-cropped {w}x{h} image to {side}x{side} (the model edits square images)")
    img = img.crop((left, top, left + side, top + side))
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
  return cli.parse_args(ap, argv)


def check_args(args):
  """Mistakes in the flags alone, before anything is read."""
  if not args.out.strip():
    raise ValueError("--out is empty; name the directory to write the turns to")
  if args.steps < 1:
    raise ValueError(f"--steps {args.steps}: the teacher needs at least 1 Euler step (default 50)")
  if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
    raise ValueError(f"--guidance {args.guidance}: give a finite scale >= 0 (1 = no guidance)")


def output_dir(out):
  """A fresh temporary directory beside `out`, made now so an unwritable place fails before any
  turn is computed; it becomes `out` when every file is in it."""
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--out {out} exists and is not an empty directory; choose another")
  parent = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".edit-", dir=parent)
  except OSError as e:
    raise ValueError(f"--out {out} cannot be written ({e.strerror}); choose another directory") from e
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
  return tmp


def run(args):
  check_args(args)
  cfg = load_config(args.checkpoint)
  if cfg.get("stage") not in EDIT_STAGES:
    raise ValueError(f"{args.checkpoint} is a {cfg.get('stage')} run; edit needs a causal (stage 2) "
                     "or a distill or dmd (stage 3) run")
  for i, text in enumerate(args.instruction, 1):
    if not text.strip():
      raise ValueError(f"instruction {i} is empty; say what to change, e.g. 'make the red circle blue'")
    tokenize_for(cfg.model, [text])  # raises if too long for a byte-level encoder
  source, notices = load_image(args.image, cfg.data.res)
  for n in notices:
    print(f"notice: {n}", file=sys.stderr)
  tmp = output_dir(args.out)
  try:
    sampler = default_sampler(cfg, args.steps)
    if args.teacher:
      guidance = cfg.eval.guidance if args.guidance is None else args.guidance
      sampler = Sampler("teacher", args.steps, guidance, cfg.flow.shift)
    session = EditSession.from_run(args.checkpoint, source, sampler=sampler, seed=args.seed)
    seconds = []
    bar = tqdm(args.instruction, desc="turns", unit="turn")
    for i, text in enumerate(bar, 1):
      notice = referent_notice(text, session.history[-1][1])
      if notice:
        bar.write(f"warning: turn {i}: {notice}", file=sys.stderr)
      t0 = time.perf_counter()
      jax.block_until_ready(session.edit(text))
      seconds.append(time.perf_counter() - t0)
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
    errors.fail(errors.message(e))


if __name__ == "__main__":
  main()
