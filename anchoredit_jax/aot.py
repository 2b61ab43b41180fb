"""Compile each stage's train step for a target topology on this host, before renting it.

  python -m anchoredit_jax.aot --config=configs/causal.py:wan1.3b --topology=v5p-128 --step-time=4
  python -m anchoredit_jax.aot --config=configs/pretrain.py:wan1.3b --topology=v5litepod-16 \
      --stages=all --mesh=data=1,fsdp=16,tensor=1 --out=aot.json
  python -m anchoredit_jax.aot --config=configs/pretrain.py:smoke --topology=cpu:8 --hbm-gib=1

Topologies: a TPU slice by accelerator type (v4-32, v5p-128, v5litepod-16 = v5e-16, v6e-64) or by
shape (v5p:4x4x4); GPUs as h100:N / h200:N; cpu:N. A TPU slice is described by libtpu's
compile-only devices (`pip install libtpu==0.0.42.1`, the version jax[tpu]==0.10.2 pins; or
TPU_LIBRARY_PATH=/path/to/libtpu.so) and compiled by the TPU compiler on this CPU host. Without
libtpu, and always for GPUs (a deviceless GPU compile needs the CUDA plugin), the step is compiled
for as many fake CPU devices with the same mesh: the shardings are the real ones, the memory is the
CPU compiler's (its fusion and rematerialisation differ from the target's). The report says which.

Prints per stage the per-device memory of the compiled step (memory_analysis), FLOPs per step
(flops.py's model count and XLA's cost_analysis) and the MFU implied by --step-time, then a
verdict. Exit status: 0 fits, 1 some stage DOES NOT FIT, 2 bad input (one `error:` line).
Other stages (--stages) are read from the config file's folder with the same preset and overrides.
On this 2-core host wan1.3b's stage-1 step took 8.5 minutes and 6.4 GB of RAM to compile for v5p-128.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from importlib import metadata

import jax
import numpy as np
from jax.experimental import topologies

from anchoredit_jax import cli, flops, sharding as sh
from anchoredit_jax.data import tokenize
from anchoredit_jax.train import Trainer
from configs.common import load_configs

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm: float | None    # bytes of HBM per device
  peak: float | None   # dense bf16 FLOP/s per device
  cores: int = 1       # TensorCores per chip counted in the accelerator-type name (v4-32: 16 chips)
  dims: int = 0        # torus dimensions of a TPU slice; 0 = not a TPU


CHIPS = {
    # HBM: what the TPU compiler of libtpu 0.0.42.1 reports available per device (its
    # RESOURCE_EXHAUSTED message: v4 30.75G, v5e 15.75G, v5p 95.74G, v6e 31.25G; the spec sheets
    # say 32 GiB, 16 GB, 95 GB, 32 GB). Peak: "peak compute per chip (bf16)" on the Cloud TPU
    # system-architecture pages (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}). v4 and v5p run one
    # device per chip (megacore), their names count 2 TensorCores per chip.
    "v4": Chip(30.75 * GIB, 275e12, cores=2, dims=3),
    "v5e": Chip(15.75 * GIB, 197e12, dims=2),
    "v5p": Chip(95.74 * GIB, 459e12, cores=2, dims=3),
    "v6e": Chip(31.25 * GIB, 918e12, dims=2),
    # NVIDIA H100 SXM5 80GB / H200 SXM 141GB: memory.total as nvidia-smi reports it (81559 and
    # 143771 MiB); 989 TFLOP/s dense BF16 from the datasheets (1979 assumes 2:4 sparsity). JAX
    # preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
    "h100": Chip(81559 * 2 ** 20, 989e12),
    "h200": Chip(143771 * 2 ** 20, 989e12),
    "cpu": Chip(None, None),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str         # as given
  chip: str         # key of CHIPS
  devices: int      # JAX devices (chips; a v4/v5p chip is one megacore device)
  shape: tuple = ()  # TPU torus shape, e.g. (4, 4, 4)


def torus_shape(chips: int, dims: int) -> tuple:
  """Slice shape of a power-of-two chip count, grown the way Cloud TPU names them:
  v5p 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4; v5e 8 -> 2x4, 16 -> 4x4."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    i = max(j for j, s in enumerate(shape) if s == min(shape))  # the last of the smallest
    shape[i] *= 2
  return tuple(shape)


def parse_topology(text: str) -> Target:
  """'v5p-128' (TensorCores for v4/v5p, chips for v5e/v6e), 'v5p:4x4x4', 'h100:8', 'cpu:8'."""
  m = re.fullmatch(r"([a-z0-9]+)[-:](\d+(?:x\d+)*)", text.strip().lower())
  chip = m and ALIASES.get(m[1], m[1])
  if not m or chip not in CHIPS:
    raise ValueError(f"unknown topology {text!r}; use e.g. v5p-128, v5litepod-16, v4-32, v6e-64, "
                     f"v5p:4x4x4, h100:8, h200:8 or cpu:8 (chips: {', '.join(CHIPS)})")
  spec, kind = CHIPS[chip], m[2]
  if "x" in kind:
    if not spec.dims or kind.count("x") != spec.dims - 1:
      raise ValueError(f"topology {text!r}: a {chip} shape has {spec.dims or 'no'} dimensions")
    shape = tuple(int(s) for s in kind.split("x"))
    return Target(text, chip, math.prod(shape), shape)
  count = int(kind)
  if count < 1:
    raise ValueError(f"topology {text!r}: needs at least one device")
  if count % spec.cores:
    raise ValueError(f"topology {text!r}: {chip} names count {spec.cores} TensorCores per chip")
  n = count // spec.cores
  if not spec.dims:
    return Target(text, chip, n)
  if n & (n - 1) or n < (4 if spec.dims == 3 else 1):
    raise ValueError(f"topology {text!r}: no standard {chip} slice of {n} chips; give its shape, "
                     f"e.g. {chip}:{'x'.join(['2'] * spec.dims)}")
  return Target(text, chip, n, torus_shape(n, spec.dims))


def tpu_devices(target: Target):
  """Compile-only devices of a TPU slice from libtpu, or (None, why not)."""
  for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("TPU_ACCELERATOR_TYPE", target.name)):
    os.environ.setdefault(k, v)  # no metadata server here; unset, libtpu logs an error per key
  name = f"{target.chip}:{'x'.join(map(str, target.shape))}"
  extra = {"chip_config_name": "megacore"} if CHIPS[target.chip].cores == 2 else {}
  if target.devices < 4:  # libtpu's default host is 2x2x1 chips; a smaller slice is its own host
    extra["chips_per_host_bounds"] = target.shape + (1,) * (3 - len(target.shape))
  try:
    devices = topologies.get_topology_desc(name, "tpu", **extra).devices
  except Exception as e:  # no libtpu, or one that cannot describe this slice
    return None, str(e).strip().splitlines()[0]
  try:
    how = f"libtpu {metadata.version('libtpu')}"
  except metadata.PackageNotFoundError:
    how = f"libtpu at {os.environ.get('TPU_LIBRARY_PATH')}"
  return list(devices), how


def cpu_devices(n: int):
  """n CPU devices; their number is fixed when JAX first starts a backend."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # backend already started (e.g. under pytest): use what it has, if enough
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(f"this process already started JAX with {len(devices)} CPU devices, "
                     f"{n} are needed; run the command in a fresh process")
  return devices[:n]


def abstract_batch(cfg, sharding):
  """Shapes of the global batch make_data yields for cfg (data/pipeline.py, make_dataset)."""
  b, t, r, l = cfg.train.batch_size, cfg.data.num_turns, cfg.data.res, cfg.model.text_len
  spec = {"images": ((b, t + 1, r, r, 3), np.uint8), "tokens": ((b, t, l), np.int32),
          "ops": ((b, t), np.int32), "edit_masks": ((b, t, r, r), np.bool_),
          "identity_masks": ((b, t, r, r), np.bool_)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in spec.items()}


def model_flops(cfg) -> float:
  b = cfg.train.batch_size
  return {"pretrain": lambda: flops.pretrain_step(cfg.model, b, cfg.data.res),
          "causal": lambda: flops.causal_step(cfg, b),
          "distill": lambda: flops.distill_step(cfg, b),
          "dmd": lambda: flops.dmd_step(cfg, b)}[cfg.stage]()  # dmd: the mean step


@contextlib.contextmanager
def tokenizer_stand_in():
  """The train step bakes in the empty instruction's tokens (editing.empty_tokens), which
  for umT5 loads the checkpoint's tokenizer. Compiling needs only their shape and dtype, so any
  Hugging Face tokenizer is replaced here by [eos=1, pad=0, ...], what T5 tokenizers give for ""."""
  real = tokenize.tokenize_batch

  def stand_in(texts, max_len, tokenizer="bytes"):
    if tokenizer == "bytes":
      return real(texts, max_len, tokenizer)
    ids = np.zeros((len(texts), max_len), np.int32)
    ids[:, 0] = 1
    return ids

  tokenize.tokenize_batch = stand_in
  try:
    yield
  finally:
    tokenize.tokenize_batch = real


def compile_stage(cfg, devices, mesh_override: dict) -> dict:
  """Lower and compile the stage's jitted train step for `devices`; memory and FLOPs."""
  for k, v in mesh_override.items():
    cfg.mesh[k] = v
  mesh = sh.make_mesh(dict(cfg.mesh), devices)
  tr = Trainer(cfg, mesh)
  tr.check_batch()
  state = sh.placed(tr.abstract_state, tr.state_sh)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=tr.replicated)
  out = {"stage": cfg.stage, "mesh": dict(mesh.shape), "model_flops": model_flops(cfg)}
  t0 = time.perf_counter()
  try:
    with sh.use_mesh(mesh, tr.rules), tokenizer_stand_in():
      compiled = tr.step_fn.lower(state, abstract_batch(cfg, tr.batch_sh), key, tr.text_store).compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program over its HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    line = str(e).strip().splitlines()[0]
    sizes = [float(x) for x in re.findall(r"([0-9.]+)G\b", line)]  # XLA's G = GiB
    return {**out, "compile_s": time.perf_counter() - t0, "oom": line,
            "total": sizes[0] * GIB if sizes else None}
  m = compiled.memory_analysis()
  mem = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": -m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "generated code": m.generated_code_size_in_bytes}
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return {**out, "compile_s": time.perf_counter() - t0, "memory": mem, "total": sum(mem.values()),
          "xla_flops_per_device": cost.get("flops")}


def report(r: dict, target: Target, hbm, peak, step_time) -> bool:
  """Print one stage's table and verdict; True when it fits (or there is no limit to check)."""
  n, gib = target.devices, lambda b: f"{b / GIB:10.3f}"
  print(f"\n== {r['stage']} ({r['config']}) on {r['how']}\n  mesh "
        + " ".join(f"{k}={v}" for k, v in r["mesh"].items()) + f"; compiled in {r['compile_s']:.1f} s")
  if "oom" in r:
    print(f"  compiler: {r['oom']}")
  else:
    print("  per-device memory        GiB")
    for k, v in r["memory"].items():
      print(f"  {k:<18}{gib(v)}")
    print(f"  {'total':<18}{gib(r['total'])}" + (f"   of {hbm / GIB:.2f} GiB HBM per {target.chip} device" if hbm else ""))
    xla = r["xla_flops_per_device"]
    print(f"  FLOPs per step: model (flops.py) {r['model_flops']:.3e}; XLA cost_analysis "
          + (f"{xla:.3e} per device x {n} = {xla * n:.3e} (loop bodies counted once)" if xla else "n/a"))
  if peak:
    ideal = r["model_flops"] / (n * peak)
    print(f"  step time at 100% MFU on {n} x {target.chip} ({peak / 1e12:.0f} TFLOP/s bf16): {ideal:.3g} s"
          + (f"; MFU at {step_time:g} s/step: {100 * ideal / step_time:.3g}%" if step_time else ""))
  if not hbm and "oom" not in r:
    print("  verdict: unchecked: cpu devices have no HBM size; pass --hbm-gib", flush=True)
    return True
  if "oom" in r or r["total"] > hbm:
    need = f"{r['total'] / GIB:.2f} GiB" if r["total"] else "more"
    print(f"  verdict: DOES NOT FIT: needs {need} per device, the chip has {hbm / GIB:.2f}", flush=True)
    return False
  print(f"  verdict: fits ({r['total'] / GIB:.2f} of {hbm / GIB:.2f} GiB per device)", flush=True)
  return True


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m anchoredit_jax.aot", description=cli.description(__doc__))
  p.add_argument("--config", required=True, help="configs/<stage>.py[:preset,...]; --config.x=v overrides")
  p.add_argument("--topology", required=True)
  p.add_argument("--stages", default="", help="pretrain,causal,distill,dmd or all "
                 "(pretrain,causal,distill; default: the config's)")
  p.add_argument("--mesh", default="", help="data=..,fsdp=..,tensor=.. (default: the config's mesh)")
  p.add_argument("--step-time", type=float, default=None, help="seconds per step, for the MFU")
  p.add_argument("--hbm-gib", type=float, default=None, help="override the chip's HBM per device")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  args, rest = p.parse_known_args(argv)
  try:
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
      raise ValueError(f"unrecognised arguments: {' '.join(bad)}")
    target = parse_topology(args.topology)
    mesh = {}
    for kv in filter(None, args.mesh.split(",")):
      k, eq, v = kv.partition("=")
      if k not in ("data", "fsdp", "tensor") or not eq or not v.lstrip("-").isdigit():
        raise ValueError(f"--mesh {args.mesh!r}: give data=N,fsdp=N,tensor=N (one may be -1)")
      mesh[k] = int(v)
    configs = load_configs(args.config, rest, args.stages)
    cli.stop_if_args_only()
    try:
      jax.config.update("jax_platforms", "cpu")  # the target is described, never run, here
    except RuntimeError:
      pass
    devices, how = tpu_devices(target) if CHIPS[target.chip].dims else (
        None, "a deviceless GPU compile needs JAX's CUDA plugin and a GPU target config")
    if devices is not None:
      how = f"TPU topology {target.name} ({'x'.join(map(str, target.shape))}) via {how}"
    else:
      devices = cpu_devices(target.devices)
      how = (f"fallback: {target.devices} fake CPU devices, memory from the CPU compiler"
             + ("" if target.chip == "cpu" else f" ({how})"))
    chip = CHIPS[target.chip]
    hbm = args.hbm_gib * GIB if args.hbm_gib is not None else chip.hbm
    results, fits = [], True
    for label, cfg in configs:
      r = {**compile_stage(cfg, devices, mesh), "how": how, "config": label}
      fits &= report(r, target, hbm, chip.peak, args.step_time)
      results.append(r)
  except (ValueError, NotImplementedError, FileNotFoundError) as e:  # bad input
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 2
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"topology": target.name, "devices": target.devices, "hbm_bytes": hbm,
                 "peak_flops": chip.peak, "step_time": args.step_time, "stages": results}, f, indent=2)
  return 0 if fits else 1


if __name__ == "__main__":
  sys.exit(main())
