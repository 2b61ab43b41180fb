"""Quickstart: what the project's reference checkpoints do, in a few CPU minutes.

  python -m anchoredit_jax.quickstart --workdir runs/quickstart      (or: make quickstart)

With the toy reference checkpoints in checkpoints/toy (made by `make reproduce`), it
  1. edits one held-out ShapesEdit scene for 16 turns with the 4-step student (session.png: the
     model's turns over the ground truth, scored turn by turn);
  2. runs the multi-turn benchmark (anchoredit_jax/eval/multiturn.py): the main system (i) on
     --sequences held-out sequences with its own outputs and with the ground-truth turns as
     context, and the baselines that need no extra training on the first --baseline-sequences of
     them, every number with its 95% interval;
  3. writes report.md: a headline computed from the numbers, the tables and the pictures.
"""
import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from anchoredit_jax import cli
from anchoredit_jax.checkpoint import load_config
from anchoredit_jax.data import shapes
from anchoredit_jax.edit import strip
from anchoredit_jax.eval import metrics, multiturn as mt, report
from anchoredit_jax.inference import EditSession

STAGES = ("pretrain", "causal", "distill")
MAIN, BASELINES = "i", ("ii", "iv", "v", "vi", "vii")


def session(weights, turns, seed, out):
  """A `turns`-turn session on held-out scene `seed`; writes session.png, returns per-turn rows."""
  seq = shapes.make_sequence(seed, turns, load_config(weights).data.res, split="heldout")
  s = EditSession.from_run(weights, seq["images"][0])
  for text in seq["instructions"]:
    s.edit(text)
  pred = np.stack([h[1] for h in s.history])
  f = lambda a: jnp.asarray(a, jnp.float32) / 255.0
  m = metrics.turn_metrics(f(pred[1:]), f(seq["images"][1:]), jnp.broadcast_to(f(seq["images"][:1]), pred[1:].shape),
                           jnp.asarray(seq["edit_masks"]), jnp.asarray(seq["identity_masks"]))
  caps = ["source"] + [f"{i}: {t}" for i, t in enumerate(seq["instructions"], 1)]
  top, bottom = strip(list(pred), caps), strip(list(seq["images"]), ["ground truth"] + [""] * turns)
  sheet = Image.new("RGB", (top.width, top.height + bottom.height), "white")
  sheet.paste(top, (0, 0))
  sheet.paste(bottom, (0, top.height))
  sheet.save(os.path.join(out, "session.png"))
  return [{"turn": t + 1, "instruction": seq["instructions"][t], "success": float(m["success"][t]),
           "identity_psnr": float(m["identity_psnr"][t]), "preserved_psnr": float(m["preserved_psnr"][t])}
          for t in range(turns)]


def provenance_lines(weights_root):
  lines = []
  for stage in STAGES:
    with open(os.path.join(weights_root, stage, "meta.json")) as f:
      meta = json.load(f)
    p = meta["provenance"][-1] if meta.get("provenance") else {}
    lines.append(f"| {stage} | {meta['step']} | {meta.get('train_minutes') or float('nan'):.1f} | "
                 f"`{p.get('command')}` | {p.get('commit')} |")
  return lines


def write_report(out, rows, table, results, skipped, args, seconds, weights_root):
  ok = sum(r["success"] for r in rows)
  lines = [
      "# anchoredit_jax quickstart", "",
      report.headline(results), "",
      f"Made by `python -m anchoredit_jax.quickstart {' '.join(args)}` in {seconds / 60:.1f} minutes "
      f"on {os.cpu_count()} CPUs (load average {os.getloadavg()[1]:.1f} over the last 5 minutes), "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
      "## Weights (reference checkpoints)", "",
      "| stage | step | training minutes | command | git commit |", "|---|---|---|---|---|",
      *provenance_lines(weights_root), "",
      f"## A {len(rows)}-turn session on a held-out scene", "",
      "The 4-step student's turns (top) over the ground truth (bottom): "
      f"{ok:.0f} of {len(rows)} edits succeed; identity PSNR {rows[0]['identity_psnr']:.1f} dB at turn 1, "
      f"{rows[-1]['identity_psnr']:.1f} dB at turn {len(rows)}.", "",
      "![session](session.png)", "",
      "## Multi-turn benchmark", "",
      "Per turn, over the held-out sequences (the baselines on the first of them): edit success, "
      "success given that every earlier turn succeeded, the share of sequences with every edit so "
      "far correct, identity PSNR (never-edited pixels against the source) and preserved PSNR, "
      "each with its 95% interval; for the main system also with the ground-truth turns as context "
      "(oracle). State bytes: what one sequence carries from turn to turn; ms per turn: one batch "
      "of sequences, compilation excluded; wall s: the whole run of a system, compilation included.", "",
      table, "",
      *[f"- {n}: {r['label']}: weights `{r['weights']}`" + (f"; {r['note']}" if r["note"] else "")
        for n, r in results.items()],
      *[f"- {n}: not run ({why})" for n, why in skipped.items()], "",
      "![drift](drift.png)", "", "![trajectories](contact.png)", "",
      "Full numbers: `results.json`. The full benchmark and every ablation: "
      "`python -m benchmark.multiturn --all`.", ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--workdir", default="runs/quickstart")
  ap.add_argument("--weights", default="checkpoints/toy", help="reference checkpoints root")
  ap.add_argument("--turns", type=int, default=16)
  ap.add_argument("--sequences", type=int, default=128, help="held-out sequences of system i")
  ap.add_argument("--baseline-sequences", type=int, default=16, help="of the other systems")
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--teacher-steps", type=int, default=50)
  ap.add_argument("--seed", type=int, default=0, help="held-out scene of the session")
  args = cli.parse_args(ap, argv)
  missing = [s for s in STAGES if not os.path.exists(os.path.join(args.weights, s, "params.safetensors"))]
  if missing:
    print(f"error: no reference checkpoint for {missing} in {args.weights}; make them with "
          "`make reproduce` (trains the toy pipeline)", file=sys.stderr)
    sys.exit(2)
  t0 = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  tqdm.write(f"1/3 a {args.turns}-turn editing session")
  rows = session(os.path.join(args.weights, "distill"), args.turns, args.seed, args.workdir)
  tqdm.write("2/3 multi-turn benchmark")
  common = dict(turns=args.turns, teacher_steps=args.teacher_steps, batch_size=args.batch_size,
                log=tqdm.write)
  results, seqs, traj, skipped = mt.evaluate([MAIN], [args.weights], sequences=args.sequences,
                                             context="both", **common)
  baseline_sequences = min(args.baseline_sequences, args.sequences)
  more, _, more_traj, more_skipped = mt.evaluate(  # the first of the same held-out sequences
      list(BASELINES), [args.weights], sequences=baseline_sequences, **common)
  results, traj, skipped = {**results, **more}, {**traj, **more_traj}, {**skipped, **more_skipped}
  meta = {"command": "python -m anchoredit_jax.quickstart " + " ".join(argv),
          "sequences": args.sequences, "baseline_sequences": baseline_sequences,
          "turns": args.turns, "session": rows}
  table = report.write_outputs(results, seqs, traj, skipped, args.workdir, meta)
  tqdm.write("3/3 report")
  write_report(args.workdir, rows, table, results, skipped, argv, time.time() - t0, args.weights)
  print(report.headline(results))
  print(f"quickstart done in {(time.time() - t0) / 60:.1f} min -> {args.workdir}/report.md")


if __name__ == "__main__":
  main()
