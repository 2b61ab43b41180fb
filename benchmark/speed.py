"""Speed against this machine's own limit: measured matmul peak, train-step MFU per stage, and
per-turn editing latency and memory against the turn number.

  python -m benchmark.speed [--presets toy] [--stages pretrain,causal,distill] [--turns 32]

One run measures everything side by side: every MFU is against the peak measured in the same run
(median of repeated large matmuls in each preset's compute dtype, model.dtype). Training FLOPs
are counted from the architecture and the stage's schedule of model calls
(anchoredit_jax/flops.py); XLA's cost_analysis of the compiled step is printed beside them, but it
counts the body of each lax.scan (layers, turns) once, so it undercounts. Editing variants at turn t:
  anchor  AnchorEdit memory (anchor + window W): one compiled function for every turn;
  full    a cache of every earlier turn (window = t, so it grows; recompiled per size);
  bidir   full attention over the whole history, re-run at every denoising step of every turn.
All use the 4-step student sampler with random weights of the first preset (timing does not
depend on the values). `benchmark/gpu.sh` runs this at the small preset and at a Wan2.1-1.3B-sized
model on an NVIDIA GPU.
Writes JSON and a latency/memory plot under --out; prints a table last.
"""
import argparse
import importlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchoredit_jax import cli  # noqa: E402
from anchoredit_jax import aot, flops, sharding as sh  # noqa: E402
from anchoredit_jax.data.tokenize import tokenize  # noqa: E402
from anchoredit_jax.inference import EditSession, Sampler, bidirectional_turn, tree_bytes  # noqa: E402
from anchoredit_jax.models.model import build  # noqa: E402
from anchoredit_jax.train import Trainer, make_data  # noqa: E402
from benchmark import opprofile  # noqa: E402

INSTRUCTION = "make the red circle blue"


def print_header(module: str, argv) -> str:
  """Print the machine (devices, jax, XLA_FLAGS) and the command, as every benchmark does first;
  returns the command."""
  dev = jax.devices()[0]
  command = f"python -m benchmark.{module} " + " ".join(sys.argv[1:] if argv is None else argv)
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {len(jax.devices())} x {dev.device_kind} "
        f"({dev.platform}), jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print("command: " + command)
  return command


def median_time(fn, reps):
  fn()  # warm-up / compile
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(n, reps=10, dtype=jnp.float32):
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  return 2.0 * n ** 3 / median_time(lambda: f(a, b), reps)


# Wan2.1-1.3B's DiT at 1521 tokens a turn with random weights, for timing only: the byte-level text
# encoder (1 layer) stands in for umT5 and a space-to-depth pixel autoencoder at stride 8 for
# the Wan VAE, whose own costs are not timed; 624x624 is the square nearest 480x832's 1560 tokens.
WAN_PROXY = dict(text_encoder="bytes", text_layers=1, text_heads=32, autoencoder="pixel")


def projection_ceiling(cfg, batch, reps):
  """The stage-1 step's projection and FFN matmuls timed alone at their own shapes (forward, input
  gradient and weight gradient of each), and their MFU against the same peak: what the step would
  reach if attention, norms, layout copies and the optimizer cost nothing. The gap between this
  and the step's MFU is the time spent outside these matmuls."""
  m, d, f = cfg.model, cfg.model.dim, cfg.model.ffn_dim
  n = (cfg.data.res // m.ae_factor // m.patch) ** 2
  dt = jnp.dtype(m.dtype)
  tok, txt = batch * n, batch * m.text_len
  # per block: self-attention q/k/v/o and cross-attention q/o on the image tokens, cross k/v on
  # the instruction's, the FFN's two layers
  shapes = [((tok, d, d), 6), ((txt, d, d), 2), ((tok, d, f), 1), ((tok, f, d), 1)]
  total_s = total_flops = 0.0
  fwd = jax.jit(lambda x, w: x @ w)
  dx = jax.jit(lambda g, w: g @ w.T)
  dw = jax.jit(lambda x, g: x.T @ g)
  for (rows, i, o), count in shapes:
    x, w, g = (jax.random.normal(jax.random.key(k), s, dt) for k, s in
               enumerate([(rows, i), (i, o), (rows, o)]))
    t = sum(median_time(lambda: fn(a, b), reps) for fn, a, b in ((fwd, x, w), (dx, g, w), (dw, x, g)))
    total_s += count * m.layers * t
    total_flops += count * m.layers * 3 * 2 * rows * i * o
  return total_flops, total_s


def stage_config(stage, preset, attention=""):
  cfg = importlib.import_module(f"configs.{stage}").get_config(preset)
  if attention:
    cfg.model.attention_kernel = attention
  if preset == "wan1.3b":
    cfg.model.update(WAN_PROXY)
    cfg.data.res = 624
    cfg.train.batch_size = 4 if stage == "pretrain" else 1
    cfg.eval.pairs = 0
  return cfg


def random_editor(preset, attention=""):
  """(cfg, graphdef, params) of a stage-3 student of `preset` with random weights: editing's
  timing does not depend on the weights' values."""
  cfg = stage_config("distill", preset, attention)
  return (cfg, *nnx.split(build(cfg.model, nnx.Rngs(0))))


def compiled_step(cfg):
  """A stage's train step on one fixed batch over all local devices (data-parallel): (one() that
  runs a step and returns its metrics, the compiled program)."""
  cfg.mesh = dict(data=len(jax.devices()), fsdp=1, tensor=1)
  tr = Trainer(cfg)
  holder = [tr.init_state(jax.random.key(0))]
  batch = next(iter(make_data(cfg)))
  with sh.use_mesh(tr.mesh, tr.rules):
    compiled = tr.step_fn.lower(holder[0], tr.put_batch(batch), jax.random.key(1), tr.text_store).compile()

  def one():
    holder[0], m = tr.step(holder[0], batch, jax.random.key(1))
    return m

  return one, compiled


def train_step(stage, preset, peak, reps, dtype=None, attention="", profile=""):
  cfg = stage_config(stage, preset, attention)
  if dtype:
    cfg.model.dtype = dtype
  one, compiled = compiled_step(cfg)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  t = median_time(one, reps)
  xla = float(cost.get("flops", float("nan")))
  row = {"stage": stage, "preset": preset, "batch": cfg.train.batch_size, "step_s": t,
         "flops_xla": xla,
         "memory_bytes": None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)}
  b = cfg.train.batch_size
  row["flops_model"] = aot.model_flops(cfg)
  row["mfu"] = row["flops_model"] / t / peak
  if stage == "pretrain":
    f, s = projection_ceiling(cfg, b, reps)
    row.update(matmul_flops=f, matmul_s=s, matmul_mfu=f / s / peak)
  if profile:
    row["profile"] = opprofile.profile(one, compiled.as_text(), calls=3,
                                       out=os.path.join(profile, f"{stage}_{preset}"))
  return row


def editing(turn_list, reps, teacher_steps, preset="toy", attention=""):
  cfg, graphdef, params = random_editor(preset, attention)
  res = cfg.data.res
  src = np.asarray(jax.random.randint(jax.random.key(1), (res, res, 3), 0, 256), np.uint8)
  student = Sampler("student", cfg.distill.student_steps, 1.0, cfg.flow.shift)
  T = max(turn_list)
  rows = {"anchor": [], "full": [], "bidir": []}

  def add(name, row):  # printed at once, so a run stopped by a time limit still shows its rows
    rows[name].append(row)
    print(f"editing {name} turn {row['turn']}: {row['s'] * 1e3:.1f} ms, state "
          f"{row['state_bytes'] / 2 ** 20:.2f} MiB", flush=True)

  def session_turn_times(window, upto):
    s = EditSession(cfg, graphdef, params, src, sampler=student, window=window)
    out = []
    for _ in range(upto):
      t0 = time.perf_counter()
      jax.block_until_ready(s.edit(INSTRUCTION))
      out.append(time.perf_counter() - t0)
    return out, tree_bytes(s.memory)

  session_turn_times(cfg.causal.window, 2)  # compile
  runs = [session_turn_times(cfg.causal.window, T) for _ in range(reps)]
  per_turn = np.median(np.array([r[0] for r in runs]), axis=0)
  for t in turn_list:
    add("anchor", {"turn": t, "s": float(per_turn[t - 1]), "state_bytes": runs[0][1]})
  for t in turn_list:  # full cache: a memory with exactly t - 1 earlier edits + the anchor
    session_turn_times(t, t)  # compile for this size
    times = [session_turn_times(t, t) for _ in range(reps)]
    add("full", {"turn": t, "s": float(np.median([x[0][-1] for x in times])),
                 "state_bytes": times[0][1]})
  model = nnx.merge(graphdef, params)
  lat = model.autoencoder.encode(jnp.asarray(src[None]))
  tok = jnp.asarray(tokenize(INSTRUCTION, cfg.model.text_len)[None])
  for t in turn_list:  # bidirectional: the source and t - 1 earlier turns, all re-run
    hist = jnp.broadcast_to(lat[:, None], (1, t) + lat.shape[1:])
    htok = jnp.broadcast_to(tok[:, None], (1, t, tok.shape[-1]))
    f = lambda: bidirectional_turn(params, graphdef, hist, htok, tok, jax.random.key(t),
                                   steps=student.steps, shift=student.shift)
    add("bidir", {"turn": t, "s": median_time(f, reps), "state_bytes": tree_bytes(hist)})
  s = EditSession(cfg, graphdef, params, src, sampler=Sampler("teacher", teacher_steps,
                                                              cfg.eval.guidance, cfg.flow.shift))
  teacher = median_time(lambda: s.edit(INSTRUCTION), max(2, reps // 2))
  print(f"editing teacher ({teacher_steps} steps, CFG): {teacher * 1e3:.1f} ms a turn", flush=True)
  # FLOP floor of one 4-step AnchorEdit turn: 4 sampler passes + 1 memory write, each a forward of
  # one turn attending to (W + 1) memory turns, plus the text encoder once
  turn_flops = flops.edit_turn(cfg.model, res, cfg.causal.window, student.steps)
  return rows, {"teacher_turn_s": teacher, "teacher_steps": teacher_steps,
                "student_turn_s": float(np.median(per_turn)), "turn_flops": turn_flops,
                "student_steps": student.steps}


def plot(rows, path):
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, rs in rows.items():
    t = [r["turn"] for r in rs]
    ax[0].plot(t, [r["s"] * 1e3 for r in rs], "o-", label=name)
    ax[1].plot(t, [r["state_bytes"] / 2 ** 20 for r in rs], "o-", label=name)
  ax[0].set(xlabel="turn", ylabel="ms per turn (4-step)", title="latency")
  ax[1].set(xlabel="turn", ylabel="MiB", title="state carried between turns")
  for a in ax:
    a.legend()
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--presets", default="toy")
  ap.add_argument("--stages", default="pretrain,causal,distill")
  ap.add_argument("--turns", default="1,2,4,8,16,24,32", help="turns to time in the editing part")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--teacher-steps", type=int, default=50)
  ap.add_argument("--matmul", type=int, default=0, help="peak matmul size (default 2048 CPU, 8192 GPU)")
  ap.add_argument("--out", default="benchmark/results/speed/latest")
  ap.add_argument("--skip-editing", action="store_true")
  ap.add_argument("--attention", default="", choices=("", "xla", "cudnn", "splash"),
                  help="attention kernel (default: the preset's model.attention_kernel)")
  ap.add_argument("--profile", action="store_true", help="also trace each train step and print "
                  "its time per XLA op kind (traces under --out/profile, for TensorBoard/Perfetto)")
  ap.add_argument("--dtypes", default="", help="compute dtypes to time each preset at, e.g. "
                  "float32,bfloat16 (default: the preset's model.dtype)")
  args = cli.parse_args(ap, argv)
  dev = jax.devices()[0]
  command = print_header("speed", argv)
  n = args.matmul or (2048 if dev.platform == "cpu" else 8192)
  presets = args.presets.split(",")
  dtype_of = {p: stage_config("pretrain", p).model.dtype for p in presets}
  runs = [(p, dt) for p in presets for dt in (args.dtypes.split(",") if args.dtypes else [dtype_of[p]])]
  peaks = {}
  for dt in sorted({dt for _, dt in runs}):  # each row's MFU is against its compute dtype's peak
    peaks[dt] = matmul_peak(n, dtype=jnp.dtype(dt))
    print(f"peak: {peaks[dt] / 1e9:.1f} GFLOP/s {dt} ({n}x{n} matmul, median)", flush=True)
  result = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "command": command,
            "attention": args.attention or "preset", "peak_flops": peaks, "train": [], "editing": None}
  os.makedirs(args.out, exist_ok=True)

  def save():  # after every part, so a run stopped by a time limit keeps what it measured
    with open(os.path.join(args.out, "speed.json"), "w") as f:
      json.dump(result, f, indent=2)

  for preset, dt in runs:
    for stage in args.stages.split(","):
      row = train_step(stage, preset, peaks[dt], args.reps, dt, args.attention,
                       os.path.join(args.out, "profile") if args.profile else "")
      row["dtype"] = dt
      result["train"].append(row)
      save()
      print(f"train {stage}/{preset}/{dt}: {row['step_s'] * 1e3:.1f} ms/step, MFU {row['mfu']:.1%}", flush=True)
      if "matmul_s" in row:
        print(f"  its projection/FFN matmuls alone: {row['matmul_s'] * 1e3:.1f} ms, "
              f"{row['matmul_flops'] / row['flops_model']:.0%} of its FLOPs, at {row['matmul_mfu']:.1%} "
              f"of peak; {1 - row['matmul_s'] / row['step_s']:.0%} of the step is spent elsewhere", flush=True)
      if "profile" in row:
        print(opprofile.table(row["profile"]), flush=True)
  if not args.skip_editing:
    rows, extra = editing([int(t) for t in args.turns.split(",")], args.reps, args.teacher_steps,
                          presets[0], args.attention)
    result["editing"] = {"rows": rows, **extra, "preset": presets[0],
                         "turn_floor_s": extra["turn_flops"] / peaks[dtype_of[presets[0]]]}
  save()

  print("\n| stage / preset | dtype | batch | ms / step | XLA GFLOP / step | model GFLOP / step | MFU | memory MiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in result["train"]:
    model = f"{r['flops_model'] / 1e9:.2f}"
    mem = f"{r['memory_bytes'] / 2 ** 20:.0f}" if r["memory_bytes"] else "-"
    print(f"| {r['stage']} / {r['preset']} | {r['dtype']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | "
          f"{r['flops_xla'] / 1e9:.2f} | {model} | {r['mfu']:.1%} | {mem} |")
  if result["editing"]:
    e = result["editing"]
    plot(e["rows"], os.path.join(args.out, "editing.png"))
    turns = [r["turn"] for r in e["rows"]["anchor"]]
    print("\n| variant | " + " | ".join(f"turn {t}" for t in turns) + " |")
    print("|---|" + "---|" * len(turns))
    for name, rs in e["rows"].items():
      print(f"| {name} ms | " + " | ".join(f"{r['s'] * 1e3:.1f}" for r in rs) + " |")
      print(f"| {name} state KiB | " + " | ".join(f"{r['state_bytes'] / 1024:.0f}" for r in rs) + " |")
    print(f"\n{e['student_steps']}-step turn: {e['student_turn_s'] * 1e3:.1f} ms measured, FLOP floor "
          f"{e['turn_floor_s'] * 1e3:.2f} ms ({e['student_turn_s'] / e['turn_floor_s']:.1f}x the floor); "
          f"{e['teacher_steps']}-step CFG teacher {e['teacher_turn_s'] * 1e3:.1f} ms "
          f"({e['teacher_turn_s'] / e['student_turn_s']:.1f}x the student)")
  print(f"json: {os.path.join(args.out, 'speed.json')}")


if __name__ == "__main__":
  main()
