"""Fault injection: kill runs at random moments and check that rerunning them ends bit-exact.

  python -m benchmark.faults                                  # 10 trials per stage and kind
  python -m benchmark.faults --trials 2 --stages pretrain --kinds kill

For each stage (smoke preset, 40 steps, a checkpoint every 5) an uninterrupted reference run is made
once. A trial starts the same run afresh, waits until its first checkpoint exists, then after a
random further delay sends SIGKILL ("kill": a crash, a lost VM) or SIGTERM ("term": a preemption),
and reruns the same command until it finishes. It survives if the final parameters and every
logged loss equal the reference's bit for bit. Lost steps: steps the killed process had logged
beyond the step the rerun resumed from (SIGTERM saves its step, so it should lose none).
Prints one table (trials, survived, median/max lost steps) and writes results.json and table.md
to --out. `tests/test_fault_suite.py` runs one trial per kind in `make test`.
"""
import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from anchoredit_jax import cli
from anchoredit_jax.checkpoint import flat_params, load_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
COMMON = [f"--config.train.steps={STEPS}", "--config.train.ckpt_every=5", "--config.train.log_every=1",
          "--config.eval.pairs=0", "--config.train.keep_checkpoints=2"]
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def command(stage, workdir, init_from=None):
  cmd = [sys.executable, "-m", "anchoredit_jax.train", f"--config=configs/{stage}.py:smoke",
         f"--workdir={workdir}", *COMMON]
  return cmd + ([f"--config.init_from={init_from}"] if init_from else [])


# Every trial compiles the same programs: a persistent compilation cache makes the reruns start
# in seconds (the same compiled program, so it cannot change a result).
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "anchoredit-faults-jax-cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def finish(cmd, tries=3):
  """Run `cmd` to the end (rerunning after an exit 75); its combined output."""
  out = ""
  for _ in range(tries):
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out += p.stdout + p.stderr
    if p.returncode == 0:
      return out
    if p.returncode != 75:
      raise RuntimeError(f"{' '.join(cmd[2:4])} exited {p.returncode}: {out[-1500:]}")
  raise RuntimeError(f"{' '.join(cmd[2:4])} did not finish in {tries} tries")


def losses(workdir) -> dict:
  """{step: loss} of the run's train rows (a row cut off by a kill is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def final_params(workdir) -> dict:
  return {k: np.asarray(v) for k, v in flat_params(load_params(workdir)[2]).items()}


def _saved(workdir) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def trial(stage, kind, rng, workdir, reference, init_from=None) -> dict:
  """One killed-and-resumed run, compared with `reference` (losses, final params)."""
  cmd = command(stage, workdir, init_from)
  p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not _saved(workdir) and p.poll() is None:
    if time.time() > deadline:
      p.kill()
      raise RuntimeError(f"{stage}: no checkpoint after 300 s")
    time.sleep(0.05)
  time.sleep(rng.uniform(0.0, 3.0))  # a smoke step takes about 0.1-0.5 s here
  finished_first = p.poll() is not None
  if not finished_first:
    p.send_signal(SIGNALS[kind])
  p.wait(timeout=120)
  logged = max(losses(workdir), default=0)
  out = finish(cmd)
  m = re.search(r"resuming .* at step (\d+)", out)
  resumed = int(m.group(1)) if m else STEPS if "already finished" in out else 0
  got, want = losses(workdir), reference["losses"]
  same_losses = got == want
  params = final_params(workdir)
  same_params = params.keys() == reference["params"].keys() and all(
      np.array_equal(params[k], reference["params"][k]) for k in params)
  return {"stage": stage, "kind": kind, "killed_at_logged_step": logged, "resumed_from": resumed,
          "lost_steps": max(logged - resumed, 0), "exit_before_signal": finished_first,
          "same_losses": same_losses, "same_params": same_params,
          "survived": same_losses and same_params}


def make_reference(stage, root, init_from=None) -> dict:
  workdir = os.path.join(root, f"{stage}_reference")
  finish(command(stage, workdir, init_from))
  return {"workdir": workdir, "losses": losses(workdir), "params": final_params(workdir)}


PREVIOUS = {"causal": "pretrain", "distill": "causal"}


def run_suite(stages, kinds, trials, seed=0, root=None, say=print) -> list:
  root = root or tempfile.mkdtemp(prefix="faults-")
  rng, rows, refs = random.Random(seed), [], {}

  def ref(stage):  # a stage's reference run, after the one it starts from
    if stage not in refs:
      init = ref(PREVIOUS[stage])["workdir"] if stage in PREVIOUS else None
      refs[stage] = {**make_reference(stage, root, init), "init": init}
    return refs[stage]

  for stage in stages:
    for kind in kinds:
      for i in range(trials):
        wd = os.path.join(root, f"{stage}_{kind}_{i}")
        row = trial(stage, kind, rng, wd, ref(stage), ref(stage)["init"])
        say(f"  {stage} {kind} #{i}: logged step {row['killed_at_logged_step']}, resumed from "
            f"{row['resumed_from']}, {'bit-exact' if row['survived'] else 'DIFFERENT'}")
        rows.append(row)
        shutil.rmtree(wd, ignore_errors=True)
  return rows


def table(rows) -> str:
  lines = ["| stage | signal | trials | survived (bit-exact) | lost steps: median / max |",
           "|---|---|---|---|---|"]
  for stage in dict.fromkeys(r["stage"] for r in rows):
    for kind in dict.fromkeys(r["kind"] for r in rows):
      rs = [r for r in rows if r["stage"] == stage and r["kind"] == kind]
      if rs:
        lost = [r["lost_steps"] for r in rs]
        lines.append(f"| {stage} | {SIGNALS[kind].name} | {len(rs)} | {sum(r['survived'] for r in rs)} "
                     f"| {np.median(lost):g} / {max(lost)} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--trials", type=int, default=10)
  ap.add_argument("--stages", default="pretrain,causal,distill")
  ap.add_argument("--kinds", default="kill,term")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmark/results/faults/latest")
  args = cli.parse_args(ap, argv)
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; command: python -m benchmark.faults "
        + " ".join(argv if argv is not None else sys.argv[1:]), flush=True)
  start = time.time()
  rows = run_suite(args.stages.split(","), args.kinds.split(","), args.trials, args.seed,
                   say=lambda s: print(s, flush=True))
  text = table(rows)
  print(text)
  print(f"{time.time() - start:.0f} s")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"rows": rows, "seed": args.seed, "seconds": time.time() - start}, f, indent=2)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text + "\n")
  sys.exit(0 if all(r["survived"] for r in rows) else 1)


if __name__ == "__main__":
  main()
