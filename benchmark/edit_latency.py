"""Per-turn latency and memory of editing sessions: 4-step student vs N-step CFG teacher, and
turn 2 vs turn T of the same session.

  python -m benchmark.edit_latency [--checkpoint checkpoints/toy/distill] [--turns 20] [--sessions 5]

Timing does not depend on the weights' values, so without --checkpoint the toy preset's model is
built with random weights (said in the output). Each turn is timed to completion
(block_until_ready); per turn index the median over --sessions sessions is reported. Memory: the
compiled `edit_turn`'s own accounting (arguments, outputs, temporaries) and the AnchorMemory's bytes
at each turn. Prints the machine and command first and a table last; writes JSON to --json.
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import cli
from anchoredit_jax import inference
from anchoredit_jax.checkpoint import load_params
from anchoredit_jax.editing import encode, guided_velocity, turn_velocity
from anchoredit_jax.data.tokenize import tokenize
from anchoredit_jax.inference import EditSession, Sampler, student_steps, tree_bytes
from anchoredit_jax.models.model import build
from configs import distill

INSTRUCTIONS = ["make the red circle blue", "move the blue circle up", "remove the green square",
                "add a small red square at the top left", "make the blue circle smaller"]


def compiled_memory(session, sampler):
  """(argument, output, temp) bytes of the compiled edit_turn for this session's shapes."""
  tokens = session.tokens(INSTRUCTIONS[0])
  lowered = inference.edit_turn.lower(session.params, session.graphdef, session.memory, tokens,
                                      jax.random.key(0), sampler=sampler)
  m = lowered.compile().memory_analysis()
  if m is None:
    return None
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "temp": m.temp_size_in_bytes}


def pass_times(session, reps=30):
  """Median seconds of one model pass on a new turn against this session's memory: (batch 1,
  the student's pass; batch 2, the teacher's CFG pass with both halves in one call)."""
  model = lambda p: nnx.merge(session.graphdef, p)
  mem, tokens = session.memory, session.tokens(INSTRUCTIONS[0])
  x, t = jnp.zeros_like(mem.last_latent), jnp.full((1,), 0.5)
  one = jax.jit(lambda p: turn_velocity(model(p), mem, x, t, encode(model(p), tokens))[0])
  two = jax.jit(lambda p: guided_velocity(model(p), mem, x, t, *(2 * [encode(model(p), tokens)])))
  out = []
  for f in (one, two):
    jax.block_until_ready(f(session.params))
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(session.params))
      ts.append(time.perf_counter() - t0)
    out.append(float(np.median(ts)))
  return out


def time_session(make, turns):
  """Seconds per turn [turns] of one new session, and the memory bytes after each turn."""
  s = make()
  out, mem = [], []
  for i in range(turns):
    t0 = time.perf_counter()
    jax.block_until_ready(s.edit(INSTRUCTIONS[i % len(INSTRUCTIONS)]))
    out.append(time.perf_counter() - t0)
    mem.append(tree_bytes(s.memory))
  return out, mem


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--checkpoint", default=None, help="a causal or distill run or reference checkpoint (default: random toy weights)")
  ap.add_argument("--turns", type=int, default=20)
  ap.add_argument("--sessions", type=int, default=5)
  ap.add_argument("--teacher-steps", type=int, default=50)
  ap.add_argument("--teacher-turns", type=int, default=3)
  ap.add_argument("--json", default="benchmark/results/speed/latest/edit_latency.json")
  args = cli.parse_args(ap, argv)

  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"devices {[d.device_kind for d in jax.devices()]}, jax {jax.__version__}")
  print("command: python -m benchmark.edit_latency " + " ".join(argv if argv is not None else sys.argv[1:]))
  if args.checkpoint:
    cfg, graphdef, params, _ = load_params(args.checkpoint)
    weights = args.checkpoint
  else:
    cfg = distill.get_config("toy")
    graphdef, params = nnx.split(build(cfg.model, nnx.Rngs(0)))
    weights = "random toy weights (timing does not depend on their values)"
  print(f"weights: {weights}")
  res = cfg.data.res
  src = np.asarray(jax.random.randint(jax.random.key(1), (res, res, 3), 0, 256), np.uint8)
  student = Sampler("student", student_steps(cfg), 1.0, cfg.flow.shift)
  teacher = Sampler("teacher", args.teacher_steps, cfg.eval.guidance, cfg.flow.shift)
  make = lambda sampler: lambda: EditSession(cfg, graphdef, params, src, sampler=sampler)
  tokenize(INSTRUCTIONS[0], cfg.model.text_len)

  warm = make(student)()
  mem_compiled = compiled_memory(warm, student)
  time_session(make(student), 2)  # compile
  runs = [time_session(make(student), args.turns) for _ in range(args.sessions)]
  per_turn = np.median(np.array([r[0] for r in runs]), axis=0)
  mem_bytes = runs[0][1]
  time_session(make(teacher), 1)  # compile
  t_runs = [time_session(make(teacher), args.teacher_turns)[0] for _ in range(max(1, args.sessions // 2))]
  teacher_turn = float(np.median(np.array(t_runs)))
  student_turn = float(np.median(per_turn))

  t2, tT = float(per_turn[1]), float(per_turn[-1])
  one_pass, cfg_pass = pass_times(warm)
  # were a turn nothing but its passes (the write counted as one pass), the ratio would be:
  pass_bound = (teacher.steps * cfg_pass + one_pass) / ((student.steps + 1) * one_pass)
  result = {
      "weights": weights, "turns": args.turns, "sessions": args.sessions,
      "student_steps": student.steps, "teacher_steps": teacher.steps, "teacher_guidance": teacher.guidance,
      "student_turn_s_median_by_turn": per_turn.tolist(),
      "student_turn_s_median": student_turn, "teacher_turn_s_median": teacher_turn,
      "teacher_over_student": teacher_turn / student_turn,
      "pass_s": one_pass, "cfg_pass_s": cfg_pass, "teacher_over_student_pass_bound": pass_bound,
      "turn2_s": t2, f"turn{args.turns}_s": tT, "turnT_over_turn2": tT / t2,
      "memory_bytes_turn2": mem_bytes[1], f"memory_bytes_turn{args.turns}": mem_bytes[-1],
      "compiled_edit_turn_bytes": mem_compiled,
  }
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\n| measure | value |\n|---|---|")
  print(f"| student ({student.steps}-step) turn 2 / turn {args.turns} (median of {args.sessions} sessions) "
        f"| {t2 * 1e3:.2f} ms / {tT * 1e3:.2f} ms (ratio {tT / t2:.3f}) |")
  print(f"| AnchorMemory bytes turn 2 / turn {args.turns} | {mem_bytes[1]} / {mem_bytes[-1]} |")
  if mem_compiled:
    print(f"| compiled edit_turn memory (args / outputs / temp) | {mem_compiled['argument']} / "
          f"{mem_compiled['output']} / {mem_compiled['temp']} bytes, one executable for every turn |")
  print(f"| teacher ({teacher.steps}-step, CFG {teacher.guidance}) turn | {teacher_turn * 1e3:.1f} ms |")
  print(f"| student turn (median over all turns) | {student_turn * 1e3:.2f} ms |")
  print(f"| teacher / student | {teacher_turn / student_turn:.1f}x |")
  print(f"| one pass at batch 1 / CFG pass at batch 2 | {one_pass * 1e3:.2f} ms / {cfg_pass * 1e3:.2f} ms "
        f"({cfg_pass / one_pass:.2f}x) |")
  print(f"| teacher / student if a turn were only its passes | ({teacher.steps} x CFG pass + 1 pass) / "
        f"({student.steps} + 1 passes) = {pass_bound:.1f}x |")
  print(f"json: {args.json}")


if __name__ == "__main__":
  main()
