"""Turn a training run into a reference checkpoint: a small directory that can live in git.

  python -m anchoredit_jax.export --run runs/toy/distill --out checkpoints/toy/distill

Writes params.safetensors (the parameters as float16, or --dtype float32), the run's config.json,
meta.json (stage, step, the SHA-256 of params.safetensors, training minutes, final evaluation, the commands and git commits that
trained it, read from the run's provenance.jsonl), train.log (the run's log with progress-bar
redraws collapsed) and metrics.jsonl. `checkpoint.load_params` reads it back as float32. The
directory appears only when every file is written.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors.numpy import save_file

from anchoredit_jax import cli, errors, integrity
from anchoredit_jax.checkpoint import REFERENCE_PARAMS, config_fields, flat_params, load_params

DTYPES = {"float16": np.float16, "float32": np.float32}


def clean_log(text: str) -> str:
  """Keep the last redraw of each progress-bar line (tqdm rewrites a line with carriage returns)."""
  return "\n".join(line.split("\r")[-1] for line in text.split("\n"))


def read_provenance(run) -> list:
  path = os.path.join(run, "provenance.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def export(run, out, *, dtype="float16", log=None, provenance=None):
  """Write the reference checkpoint of `run` (newest step) to `out`; returns its meta dict."""
  cfg, _, params, step = load_params(run)
  arrays = {k: np.asarray(a) for k, a in flat_params(params).items()}
  cast = {k: a.astype(DTYPES[dtype]) for k, a in arrays.items()}
  worst = max(float(np.max(np.abs(cast[k].astype(np.float32) - a))) for k, a in arrays.items())
  if not all(np.isfinite(c).all() for c in cast.values()):
    raise ValueError(f"{run}: a parameter overflows {dtype}; export with --dtype float32")
  summary = {}
  if os.path.exists(os.path.join(run, "summary.json")):
    with open(os.path.join(run, "summary.json")) as f:
      summary = json.load(f)
  provenance = provenance if provenance is not None else read_provenance(run)
  if not provenance:
    raise ValueError(f"{run} has no provenance.jsonl (runs made before it was recorded); say how "
                     "it was made with --command and --commit")
  meta = {"stage": cfg.get("stage"), "preset": cfg.get("preset"), "step": step, "dtype": dtype,
          "config_fields": config_fields(cfg), "max_abs_rounding": worst, "source_run": os.path.abspath(run),
          "train_minutes": summary.get("train_minutes"), "final_eval": summary,
          "provenance": provenance}
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    save_file(cast, os.path.join(tmp, REFERENCE_PARAMS))
    meta["params_sha256"] = integrity.file_sha256(os.path.join(tmp, REFERENCE_PARAMS))
    shutil.copy(os.path.join(run, "config.json"), tmp)
    if os.path.exists(os.path.join(run, "metrics.jsonl")):
      shutil.copy(os.path.join(run, "metrics.jsonl"), tmp)
    if log:
      with open(log, errors="replace", newline="") as f:  # keep the \r of progress bars
        text = clean_log(f.read())
      with open(os.path.join(tmp, "train.log"), "w") as f:
        f.write(text)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--run", required=True, help="training run directory")
  ap.add_argument("--out", required=True, help="reference checkpoint directory (replaced)")
  ap.add_argument("--log", default=None, help="the run's console log (default: <run>.log if present)")
  ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
  ap.add_argument("--command", default=None, help="for runs without provenance.jsonl: how it was made")
  ap.add_argument("--commit", default=None, help="for runs without provenance.jsonl: git commit it ran at")
  args = cli.parse_args(ap, argv)
  log = args.log or (args.run.rstrip("/") + ".log" if os.path.exists(args.run.rstrip("/") + ".log") else None)
  prov = None
  if args.command or args.commit:
    prov = [{"command": args.command, "commit": args.commit, "recorded": "given at export"}]
  try:
    meta = export(args.run, args.out, dtype=args.dtype, log=log, provenance=prov)
  except (ValueError, FileNotFoundError) as e:
    errors.fail(errors.message(e))
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  print(f"{args.run} step {meta['step']} -> {args.out} ({size / 2 ** 20:.1f} MiB, {args.dtype}, "
        f"largest rounding {meta['max_abs_rounding']:.2e})")


if __name__ == "__main__":
  main()
