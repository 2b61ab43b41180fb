"""Serving many editing sessions: N simulated clients, each a 16-turn session with no think time.

  python -m benchmark.serve                                   # toy student, 1/4/16/64 clients
  python -m benchmark.serve --clients 1,16 --turns 8 --out /tmp/serve
  python -m benchmark.serve --preset small --out $OUT/serve_small   # random weights (gpu.sh)

Side by side in one run, on the same sessions (held-out ShapesEdit scenes and their instructions):
"one at a time" serves every turn alone (serve.Engine with the single bucket 1, no gather wait);
"batched" gathers the turns waiting within --wait-ms into one vmapped call (buckets 1..32). Per
mode and client count: turns/s, latency p50/p95/p99 (request to result, as a client sees it), mean
batch size, compilations after warm-up and the process's peak memory. The FLOP floor is the
student turn's model FLOPs (flops.edit_turn) over this machine's matmul peak, measured in the
same run. Prints the table and the issue's targets, and writes results.json, table.md and
scaling.png to --out (default benchmark/results/serve/latest).
"""
import argparse
import json
import os
import resource
import threading
import time

import jax
import matplotlib
import numpy as np

from anchoredit_jax import cli, flops
from anchoredit_jax.data.shapes import make_sequence
from anchoredit_jax.inference import load_edit_run, student_steps, tree_bytes
from anchoredit_jax.serve import BUCKETS, Engine
from anchoredit_jax.session import EditTree
from benchmark.speed import matmul_peak, print_header, random_editor

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

MODES = {"one at a time": dict(buckets=(1,), max_wait_s=0.0), "batched": dict(buckets=BUCKETS)}


def sessions(cfg, n, turns, seed=0):
  """n held-out ShapesEdit sequences: (source uint8 [R,R,3], instructions) each."""
  seqs = [make_sequence(seed + i, turns, cfg.data.res, split="heldout") for i in range(n)]
  return [(s["images"][0], s["instructions"]) for s in seqs]


def serve(engine, run, work, seed=0) -> dict:
  """Every client edits its session through `engine` at once; the latencies and the wall time."""
  trees = [EditTree(*run, src, sampler=engine.sampler, seed=seed + i) for i, (src, _) in enumerate(work)]
  lat, errors = [[] for _ in work], []

  def client(i):
    try:
      for text in work[i][1]:
        t0 = time.perf_counter()
        engine.edit(trees[i], text)
        lat[i].append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001  (reported below; a benchmark must not hang)
      errors.append(f"client {i}: {e}")

  before = dict(engine.stats)
  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(work))]
  t0 = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  if errors:
    raise RuntimeError("; ".join(errors[:3]))
  flat = np.concatenate([np.asarray(x) for x in lat])
  batches = engine.stats["batches"] - before["batches"]
  return {"clients": len(work), "turns": int(flat.size), "wall_s": wall, "turns_per_s": flat.size / wall,
          "p50_ms": 1e3 * float(np.percentile(flat, 50)), "p95_ms": 1e3 * float(np.percentile(flat, 95)),
          "p99_ms": 1e3 * float(np.percentile(flat, 99)), "mean_batch": flat.size / max(batches, 1),
          "compilations_after_warmup": engine.compilations_after_warmup,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "session_memory_mib": sum(tree_bytes(n.memory) for t in trees for n in t.nodes.values()) / 2 ** 20}


def table(rows, floor) -> str:
  lines = ["| mode | clients | turns/s | vs one at a time | vs FLOP floor | p50 / p95 / p99 ms | mean batch "
           "| compilations after warm-up | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
  alone = {r["clients"]: r["turns_per_s"] for r in rows if r["mode"] == "one at a time"}
  for r in rows:
    lines.append(f"| {r['mode']} | {r['clients']} | {r['turns_per_s']:.1f} | "
                 f"{r['turns_per_s'] / alone[r['clients']]:.2f}x | {floor / r['turns_per_s']:.1f}x below | "
                 f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | "
                 f"{r['compilations_after_warmup']} | {r['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


def plot(rows, floor, path):
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  for mode in MODES:
    rs = [r for r in rows if r["mode"] == mode]
    a.plot([r["clients"] for r in rs], [r["turns_per_s"] for r in rs], "o-", label=mode)
    b.plot([r["clients"] for r in rs], [r["p95_ms"] for r in rs], "o-", label=mode)
  a.axhline(floor, color="gray", ls="--", label="FLOP floor")
  a.axhline(floor / 3, color="gray", ls=":", label="1/3 of the floor")
  for ax, y in ((a, "turns / s"), (b, "p95 latency, ms")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients (16-turn sessions, no think time)")
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
  a.set_yscale("log")
  a.legend(fontsize=8)
  b.set_yscale("log")
  fig.suptitle("Serving the toy student: one engine, many sessions")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", default="checkpoints/toy/distill", help="a stage-2 or 3 run or reference")
  ap.add_argument("--clients", default="1,4,16,64", help="client counts, comma-separated")
  ap.add_argument("--turns", type=int, default=16, help="turns per session")
  ap.add_argument("--wait-ms", type=float, default=15.0, help="the batched mode's gather wait")
  ap.add_argument("--preset", default="", help="random weights of this preset's student instead of "
                  "--checkpoint (timing does not depend on the weights' values; gpu.sh: small)")
  ap.add_argument("--out", default="benchmark/results/serve/latest")
  args = ap.parse_args(argv)
  command = print_header("serve", argv)
  clients = [int(c) for c in args.clients.split(",")]
  run = random_editor(args.preset) if args.preset else load_edit_run(args.checkpoint)
  print(f"weights: {'random ' + args.preset if args.preset else args.checkpoint}", flush=True)
  cfg = run[0]
  peak = matmul_peak(2048)
  turn_flops = flops.edit_turn(cfg.model, cfg.data.res, cfg.causal.window, student_steps(cfg))
  floor = peak / turn_flops
  print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; a turn is {turn_flops / 1e6:.1f} MFLOP, so the FLOP "
        f"floor is {floor:.0f} turns/s", flush=True)
  work = sessions(cfg, max(clients), args.turns)
  rows = []
  for mode, kw in MODES.items():
    kw = dict(kw, max_wait_s=kw.get("max_wait_s", args.wait_ms / 1e3))
    engine = Engine(*run, **kw)
    engine.warmup()
    for n in clients:
      r = {"mode": mode, **serve(engine, run, work[:n])}
      rows.append(r)
      print(f"{mode:>13}, {n:>3} clients: {r['turns_per_s']:7.1f} turns/s, p95 {r['p95_ms']:6.0f} ms, "
            f"mean batch {r['mean_batch']:.1f}", flush=True)
    engine.close()
  text = table(rows, floor)
  print("\n" + text)
  by = {(r["mode"], r["clients"]): r for r in rows}
  lone = by[("one at a time", clients[0])]["p50_ms"]
  checks = []
  if 16 in clients:
    bat, one = by[("batched", 16)], by[("one at a time", 16)]
    checks = [("throughput at 16 clients >= 1.5x one at a time", bat["turns_per_s"] / one["turns_per_s"], 1.5),
              ("throughput at 16 clients within 3x of the FLOP floor (floor / measured <= 3)",
               floor / bat["turns_per_s"], 3.0),
              (f"p95 at 16 clients <= 3 x a lone turn ({lone:.0f} ms) + the wait ({args.wait_ms:g} ms)",
               bat["p95_ms"], 3 * lone + args.wait_ms)]
  print()
  for name, got, want in checks:
    ok = got >= want if "1.5x" in name else got <= want
    print(f"{'met' if ok else 'NOT met'}: {name}: {got:.2f} (target {want:.2f})")
  recompiled = [r for r in rows if r["compilations_after_warmup"]]
  print(f"{'NOT met' if recompiled else 'met'}: no compilation after warm-up")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"command": command, "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].device_kind,
               "cpus": os.cpu_count(), "matmul_peak_flops": peak, "turn_flops": turn_flops,
               "floor_turns_per_s": floor, "wait_ms": args.wait_ms, "rows": rows}, f, indent=1)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(f"command: {command}\n\n{text}\n")
  plot(rows, floor, os.path.join(args.out, "scaling.png"))
  print(f"-> {args.out}/results.json, table.md, scaling.png")


if __name__ == "__main__":
  main()
