"""Where a compiled step spends its time: a jax.profiler trace of a few calls, summed per XLA op.

  rows = opprofile.profile(lambda: step(), compiled.as_text(), calls=3, out="/tmp/trace")
  print(opprofile.table(rows))

Only events that name an instruction of the compiled program count (on a CPU the thunks' own
names; on a GPU a kernel's `hlo_op`), so Python and executor wrappers around them drop out, as do
loops and calls (their time is their body's). Ops are grouped by kind, the instruction name
without its number (`ynn_fusion.64` -> `ynn_fusion`, `copy_bitcast_fusion.8` ->
`copy_bitcast_fusion`), a library call also by the op at its root (`ynn_fusion (dot_general)`):
a `(reduce_sum)` fusion may also hold the matmul that feeds the sum. On a CPU, ops on the two
threads of a step overlap, so the shares are of op time, not of wall time.
"""
import collections
import glob
import gzip
import json
import os
import re

import jax

# ops whose time is that of the ops inside them
CONTAINERS = ("while", "conditional", "call")
# fusions handed to a library (XLA:CPU's YNNPACK/XNNPACK/oneDNN), told apart by what they compute
LIBRARY_FUSIONS = ("ynn_fusion", "xnn_fusion", "onednn_fusion")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) ")


def kind_of(name: str) -> str:
  """An instruction's kind: its name without the number (`ynn_fusion.64` -> `ynn_fusion`)."""
  return re.sub(r"\.\d+$", "", name)


def instructions(hlo_text: str) -> dict:
  """name -> (result shape, op_name metadata) of every instruction in an HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = INSTRUCTION.match(line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return out


def profile(fn, hlo_text: str, *, calls: int, out: str):
  """Run fn() `calls` times under the profiler (trace kept in `out`) -> rows (kind, ms per call,
  share of op time, the kind's costliest op, its shape and op_name), costliest kind first."""
  jax.block_until_ready(fn())  # compiled and warm before the trace
  with jax.profiler.trace(out):
    for _ in range(calls):
      jax.block_until_ready(fn())
  files = sorted(glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {out}")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  known = instructions(hlo_text)
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("args", {}).get("hlo_op") or e.get("name", "")
    if name in known and kind_of(name) not in CONTAINERS:
      per_op[name] += e.get("dur", 0.0)
  total = sum(per_op.values()) or 1.0
  kinds = collections.defaultdict(list)
  for name, us in per_op.items():
    kind = kind_of(name)
    if kind in LIBRARY_FUSIONS:  # a library call may be a matmul or a reduction: say which
      kind += f" ({known[name][1].rsplit('/', 1)[-1] or '?'})"
    kinds[kind].append((us, name))
  rows = []
  for kind, ops in kinds.items():
    us = sum(u for u, _ in ops)
    top = max(ops)[1]
    rows.append({"kind": kind, "ms_per_call": us / 1e3 / calls, "share": us / total, "ops": len(ops),
                 "top_op": top, "top_shape": known[top][0], "top_op_name": known[top][1]})
  return sorted(rows, key=lambda r: -r["ms_per_call"])


def table(rows, n: int = 12) -> str:
  lines = ["| op kind | ms per call | share of op time | ops | costliest: shape, from |", "|---|---|---|---|---|"]
  for r in rows[:n]:
    lines.append(f"| {r['kind']} | {r['ms_per_call']:.2f} | {r['share']:.1%} | {r['ops']} | "
                 f"{r['top_shape']}, {r['top_op_name'][-70:]} |")
  return "\n".join(lines)
