"""A picture of what a stage-1 model does on held-out pairs: source | model | ground truth.

  python -m anchoredit_jax.eval.samples checkpoints/toy/pretrain --out /tmp/samples.png
"""
import argparse
import sys

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchoredit_jax import cli  # noqa: E402
from anchoredit_jax.checkpoint import load_params  # noqa: E402
from anchoredit_jax.data import pipeline  # noqa: E402
from anchoredit_jax.data.tokenize import detokenize  # noqa: E402
from anchoredit_jax.eval import metrics  # noqa: E402
from anchoredit_jax.inference import sample_single  # noqa: E402


def sample_grid(workdir, out, n=12, seed=0):
  cfg, graphdef, params, step = load_params(workdir)
  d = cfg.data
  rows = [pipeline.example_from_seed(i, split="heldout", res=d.res, num_turns=1,
                                     text_len=cfg.model.text_len, background=d.background)
          for i in range(n)]
  imgs = np.stack([r["images"] for r in rows])
  toks = np.stack([r["tokens"][0] for r in rows])
  pred = sample_single(params, graphdef, imgs[:, 0], toks, jax.random.key(seed),
                       steps=cfg.eval.steps, guidance=cfg.eval.guidance, shift=cfg.eval.shift)
  target = imgs[:, 1].astype(np.float32) / 255.0
  ok = np.asarray(metrics.edit_metrics(pred, target, np.stack([r["edit_masks"][0] for r in rows]))["success"])
  cols = 4
  fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 1.45 * ((n + cols - 1) // cols)))
  for i, ax in enumerate(np.ravel(axes)):
    ax.axis("off")
    if i >= n:
      continue
    strip = np.concatenate([imgs[i, 0] / 255.0, np.ones((d.res, 2, 3)), np.asarray(pred[i]),
                            np.ones((d.res, 2, 3)), target[i]], axis=1)
    ax.imshow(strip, interpolation="nearest")
    ax.set_title(("ok  " if ok[i] else "miss  ") + detokenize(toks[i]), fontsize=6.5,
                 color="green" if ok[i] else "red")
  fig.suptitle(f"{workdir} step {step}: source | model | ground truth "
               f"({cfg.eval.steps}-step Euler, CFG {cfg.eval.guidance})", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=130)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("workdir")
  ap.add_argument("--out", required=True)
  ap.add_argument("-n", type=int, default=12)
  args = cli.parse_args(ap, argv)
  try:
    print(sample_grid(args.workdir, args.out, args.n))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
