"""Our jitted CausalDiT against diffusers' WanTransformer3DModel: same config, same weights.

  python -m benchmark.vs_pytorch [--layers 4 --dim 512 --frames 2 --tokens 256 --reps 10]

A random diffusers Wan transformer is saved as safetensors and loaded into CausalDiT with
`convert/wan.py` (so the benchmark also checks the loader at this size). Both run the same
bidirectional forward in float32 on this machine's CPU threads. The three contenders -- ours
(jax.jit), diffusers eager and diffusers under torch.compile (if it compiles here) -- are timed
round-robin, one call each per round, so a load change on a shared machine hits all of them alike.
Prints the machine, the command, median ms per forward, ratios and the largest output difference.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anchoredit_jax import cli
from anchoredit_jax.convert.wan import load_wan_dit, model_fields
from anchoredit_jax.models.dit import CausalDiT
from configs import common


def build_torch(args, path):
  import diffusers
  import torch
  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=args.dim // 128, attention_head_dim=128,
      in_channels=16, out_channels=16, text_dim=args.text_dim, freq_dim=256,
      ffn_dim=4 * args.dim, num_layers=args.layers).eval()
  model.save_pretrained(path)
  return model, json.loads(open(os.path.join(path, "config.json")).read())


def build_ours(path, config):
  fields = model_fields(config)
  lc = fields.pop("latent_channels")
  cfg = common.model_config("smoke")
  cfg.update(fields)
  cfg.update(concat_prev=False, abs_pos=False, prediction="velocity", dtype="float32")
  state = load_wan_dit(path, cfg, lc)
  graphdef = nnx.split(nnx.eval_shape(lambda: CausalDiT(cfg, latent_channels=lc, rngs=nnx.Rngs(0))))[0]

  @jax.jit
  def forward(state, x, t, text):  # x [b,T,H,W,C], t [b] in [0,1], text [b,l,text_dim]
    b, T = x.shape[:2]
    text = text[:, None]  # one prompt shared by every frame: projected once, as diffusers does
    out, _ = nnx.merge(graphdef, state)(x, jnp.broadcast_to(t[:, None], (b, T)), text,
                                        jnp.ones(text.shape[:3], bool),
                                        jnp.broadcast_to(jnp.arange(T), (b, T)), causal=False)
    return out

  return lambda x, t, text: forward(state, x, t, text)


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--dim", type=int, default=512, help="a multiple of 128 (Wan's head size)")
  ap.add_argument("--frames", type=int, default=2)
  ap.add_argument("--tokens", type=int, default=256, help="tokens per frame (a square number)")
  ap.add_argument("--text-len", type=int, default=512)
  ap.add_argument("--text-dim", type=int, default=4096)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  ap.add_argument("--out", default="benchmark/results/parity/latest")
  args = cli.parse_args(ap, argv)
  import torch
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print("command: python -m benchmark.vs_pytorch " + " ".join(sys.argv[1:] if argv is None else argv))

  side = int(round(args.tokens ** 0.5)) * 2  # latent side at patch 2
  r = np.random.default_rng(0)
  x = r.standard_normal((1, args.frames, side, side, 16)).astype(np.float32)
  text = r.standard_normal((1, args.text_len, args.text_dim)).astype(np.float32)
  t = np.array([0.5], np.float32)
  with tempfile.TemporaryDirectory() as path:
    model, config = build_torch(args, path)
    ours = build_ours(path, config)
  x_t = torch.from_numpy(np.transpose(x, (0, 4, 1, 2, 3)).copy())
  t_t, text_t = torch.from_numpy(t * 1000), torch.from_numpy(text)

  def eager():
    with torch.no_grad():
      return model(x_t, t_t, text_t, return_dict=False)[0]

  runs = {"ours (jax.jit)": lambda: jax.block_until_ready(ours(x, t, text)), "diffusers eager": eager}
  notes = {}
  if not args.no_compile:
    try:
      compiled = torch.compile(model)
      def comp():
        with torch.no_grad():
          return compiled(x_t, t_t, text_t, return_dict=False)[0]
      comp()
      runs["diffusers torch.compile"] = comp
    except Exception as e:  # report, do not hide: the row is simply absent
      notes["torch.compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(f"torch.compile: {notes['torch.compile']}")
  outputs = {k: np.asarray(f()) for k, f in runs.items()}  # warm-up, compile, outputs
  ref = np.transpose(outputs["diffusers eager"], (0, 2, 3, 4, 1))
  diff = float(np.max(np.abs(outputs["ours (jax.jit)"] - ref)))
  times = {k: [] for k in runs}
  for _ in range(args.reps):
    for k, f in runs.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  best_torch = min(v for k, v in med.items() if k != "ours (jax.jit)")
  ratio = med["ours (jax.jit)"] / best_torch
  print(f"\nconfig: {args.layers} layers x {args.dim} dim, {args.frames} frames x {args.tokens} tokens, "
        f"text {args.text_len} x {args.text_dim}, float32, batch 1, {args.reps} rounds")
  print("| implementation | median ms / forward | vs ours |")
  print("|---|---|---|")
  for k, v in med.items():
    print(f"| {k} | {v * 1e3:.1f} | {v / med['ours (jax.jit)']:.2f}x |")
  print(f"\nours / best PyTorch = {ratio:.2f} (target <= 0.70); max |ours - diffusers| = {diff:.2e} "
        f"(output scale {np.abs(ref).mean():.2f})")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "vs_pytorch.json"), "w") as f:
    json.dump(dict(vars(args), median_s=med, ratio_vs_best_torch=ratio, max_abs_diff=diff,
                   notes=notes, torch=torch.__version__, jax=jax.__version__), f, indent=2)


if __name__ == "__main__":
  main()
