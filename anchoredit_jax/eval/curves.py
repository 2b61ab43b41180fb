"""Training curves from a run's metrics.jsonl: held-out edit success and PSNR against training
minutes (evaluation time excluded), as a PNG.

  python -m anchoredit_jax.eval.curves checkpoints/toy/pretrain --out benchmark/results/train/latest/curves.png
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchoredit_jax import cli  # noqa: E402


def read_evals(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; train first (python -m anchoredit_jax.train ...)")
  rows = [json.loads(l) for l in open(path) if l.strip()]
  evals = {r["step"]: r for r in rows if r["kind"] == "eval"}  # a resumed run may repeat a step
  return [evals[s] for s in sorted(evals)]


def plot(evals, out, title):
  if not evals:
    raise ValueError("no eval rows in metrics.jsonl yet (they come every train.eval_every steps)")
  mins = [r["train_minutes"] for r in evals]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  a.plot(mins, [100 * r["success"] for r in evals], "o-", label="model")
  a.axhline(100 * evals[-1]["copy_success"], color="gray", ls="--", label="copy the source")
  for name in ("recolour", "move", "resize", "add", "remove"):
    if f"success_{name}" in evals[-1]:
      a.plot(mins, [100 * r.get(f"success_{name}", float("nan")) for r in evals], lw=0.8, alpha=0.6, label=name)
  a.axhline(90, color="k", lw=0.5)
  a.set(xlabel="training minutes", ylabel="held-out edit success (%)", ylim=(0, 100))
  a.legend(fontsize=7)
  b.plot(mins, [r["preserved_psnr"] for r in evals], "o-", label="preserved region")
  b.plot(mins, [r["edit_psnr"] for r in evals], "s-", label="edited region")
  b.axhline(evals[-1]["copy_edit_psnr"], color="gray", ls="--", label="copy: edited region")
  b.axhline(30, color="k", lw=0.5)
  b.set(xlabel="training minutes", ylabel="PSNR (dB)")
  b.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("workdir")
  ap.add_argument("--out", default=None, help="PNG path (default: <workdir>/curves.png)")
  args = cli.parse_args(ap, argv)
  try:
    out = args.out or os.path.join(args.workdir, "curves.png")
    plot(read_evals(args.workdir), out, args.workdir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
