"""Long-horizon multi-turn benchmark: systems i-vii on the same held-out ShapesEdit sequences.

  python -m benchmark.multiturn                          # every system whose weights exist
  python -m benchmark.multiturn --systems i --context both   # own beside ground-truth context
  python -m benchmark.multiturn --systems i,ii --sequences 8 --turns 32
  python -m benchmark.multiturn --all                    # first train the missing variants
  python -m benchmark.multiturn --systems i --checkpoint runs/mine/distill --data '/val/*.tar' \
      --metrics l1,clip,dino --clip /models/clip --dino /models/dinov2   # your own shards

256 held-out sequences x 16 turns by default (--baseline-sequences: fewer for the systems other
than i), 95% intervals on every number (anchoredit_jax/eval/stats.py). --context oracle makes the
ground-truth turn, not the model's output, the context of the next turn; both runs own and oracle.

Weights are looked up under --weights (reference checkpoints, default checkpoints/toy) and then
--runs (training runs, default runs/toy). --all trains, under --runs, every run a requested system
lacks (e.g. the teacher-forced variant iii: stage 2 and stage 3 with causal.self_rollout=False, the
same step budgets as the main system), then benchmarks. See anchoredit_jax/eval/multiturn.py for
the systems. Writes results.json, table.md, drift.png and contact.png to --out.
"""
import argparse
import os
import platform
import subprocess
import sys
import time

import jax

from anchoredit_jax import cli
from anchoredit_jax.checkpoint import has_model, is_reference
from anchoredit_jax.eval import multiturn as mt, report, similarity


def train_missing(systems, runs, preset):
  """Run the training commands behind `systems` whose runs are missing or unfinished."""
  todo = []
  for name in systems:
    w = mt.SYSTEMS[name].weights
    for stage in mt.NEEDS[w] + [w]:
      if stage not in todo:
        todo.append(stage)
  for stage in todo:
    wdir = os.path.join(runs, stage)
    if os.path.exists(os.path.join(wdir, "summary.json")) or is_reference(wdir):
      continue  # finished, or a reference checkpoint standing in for it (unfinished runs resume)
    cmd = [sys.executable, "-m", "anchoredit_jax.train", f"--workdir={wdir}"] + [
        a.format(root=runs, preset=preset) for a in mt.TRAIN_RUNS[stage]]
    print("training:", " ".join(cmd[1:]), flush=True)
    with open(wdir + ".log", "a") as log:
      rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc or not has_model(wdir):
      raise RuntimeError(f"training {stage} failed (exit {rc}); see {wdir}.log")


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--systems", default=",".join(mt.SYSTEMS), help="comma-separated: i,ii,...,vii")
  ap.add_argument("--sequences", type=int, default=256, help="held-out sequences (system i)")
  ap.add_argument("--baseline-sequences", type=int, default=None,
                  help="held-out sequences of the other systems (default: --sequences)")
  ap.add_argument("--context", default="own", help="own | oracle | both: what the next turn sees")
  ap.add_argument("--turns", type=int, default=16)
  ap.add_argument("--teacher-steps", type=int, default=50)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--turn-noise", default="fresh", choices=mt.TURN_NOISE,
                  help="fresh: new sampler noise every turn; same: one draw reused by every turn "
                       "of a session; antithetic: that draw negated at every other turn")
  ap.add_argument("--data", default="", help="your own multi-turn validation shards (a glob or a "
                  "JSON list, data/wds.py's layout) instead of ShapesEdit's held-out split")
  ap.add_argument("--checkpoint", default=None, help="one run or reference checkpoint to run as "
                  "the single system of --systems, instead of looking it up in --weights/--runs")
  ap.add_argument("--metrics", default="l1,l2,psnr", help="with --data: l1,l2,psnr (always) and "
                  "clip (CLIP-I, CLIP-T; needs --clip) and/or dino (needs --dino)")
  ap.add_argument("--clip", default=None, help="a local CLIP folder (e.g. openai/clip-vit-large-patch14)")
  ap.add_argument("--dino", default=None, help="a local DINOv2 folder (e.g. facebook/dinov2-base)")
  ap.add_argument("--language", default="en", choices=("en", "zh"),
                  help="with --data: the instructions' language")
  ap.add_argument("--res", type=int, default=None, help="image size (default: the model's data.res)")
  ap.add_argument("--weights", default="checkpoints/toy", help="reference checkpoints root")
  ap.add_argument("--runs", default="runs/toy", help="training runs root")
  ap.add_argument("--all", action="store_true", help="train the runs the systems lack first")
  ap.add_argument("--preset", default="toy", help="config preset of runs trained by --all")
  ap.add_argument("--out", default="benchmark/results/multiturn/latest")
  args = ap.parse_args(argv)
  systems = [s.strip() for s in args.systems.split(",") if s.strip()]
  bad = [s for s in systems if s not in mt.SYSTEMS]
  if bad or args.turns < 1 or args.sequences < 1 or (args.baseline_sequences or 1) < 1:
    print(f"error: unknown systems {bad} (choose from {list(mt.SYSTEMS)}) or turns/sequences < 1",
          file=sys.stderr)
    sys.exit(2)
  if args.context not in mt.CONTEXTS:
    print(f"error: --context must be one of {', '.join(mt.CONTEXTS)}, got {args.context!r}",
          file=sys.stderr)
    sys.exit(2)
  wanted = {m.strip() for m in args.metrics.split(",") if m.strip()}
  unknown = wanted - {"l1", "l2", "psnr", "clip", "dino"}
  missing = [m for m in ("clip", "dino") if m in wanted and not getattr(args, m)]
  if unknown or missing or (wanted - {"l1", "l2", "psnr"} and not args.data):
    print(f"error: --metrics {args.metrics}: " + (f"unknown {sorted(unknown)}" if unknown else
          f"{missing[0]} needs --{missing[0]} FOLDER" if missing else "clip and dino need --data"),
          file=sys.stderr)
    sys.exit(2)
  cli.stop_if_args_only()  # the README test: flags and their checks above, nothing run
  command = "python -m benchmark.multiturn " + " ".join(argv if argv is not None else sys.argv[1:])
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, devices "
        f"{[d.device_kind for d in jax.devices()]}, jax {jax.__version__}\ncommand: {command}")
  try:
    if args.all:
      train_missing(systems, args.runs, args.preset)
    t0 = time.perf_counter()
    scorer = None
    if {"clip", "dino"} & wanted:
      scorer = similarity.Scorer(clip=args.clip if "clip" in wanted else None,
                                 dino=args.dino if "dino" in wanted else None)
    results, seqs, traj, skipped = mt.evaluate(
        systems, [args.weights, args.runs], sequences=args.sequences,
        baseline_sequences=args.baseline_sequences, context=args.context, turns=args.turns,
        teacher_steps=args.teacher_steps, batch_size=args.batch_size, seed=args.seed,
        turn_noise=args.turn_noise, data=args.data or None, scorer=scorer, language=args.language,
        checkpoint=args.checkpoint, res=args.res)
    wall = time.perf_counter() - t0
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    os._exit(2)
  for name, why in skipped.items():
    print(f"skipped {name}: {why}")
  meta = {"command": command, "sequences": args.sequences, "turns": args.turns, "seed": args.seed,
          "data": args.data or "ShapesEdit heldout",
          "turn_noise": args.turn_noise,
          "baseline_sequences": args.baseline_sequences or args.sequences, "context": args.context,
          "wall_seconds": wall, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
  tab = report.write_outputs(results, seqs, traj, skipped, args.out, meta)
  print(report.headline(results) + "\n\n" + tab)
  print(f"benchmark took {wall:.0f} s (wall seconds: "
        + ", ".join(f"{n} {report.wall(r)}" for n, r in results.items()) + ")")
  print(f"-> {args.out}/results.json, table.md, drift.png, contact.png")


if __name__ == "__main__":
  main()
