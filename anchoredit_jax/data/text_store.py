"""Instruction embeddings computed once and stored beside the data, so training never runs a
frozen text encoder (umT5-XXL is 5.7B parameters; Wan's own training precomputes them too).

  python -m anchoredit_jax.data.text_store --config=configs/wan/pretrain.py:wan1.3b,dir=WAN --out=DIR
  python -m anchoredit_jax.train --config=configs/wan/pretrain.py:wan1.3b,dir=WAN --config.data.text_store=DIR

ShapesEdit's instructions come from a finite set of templates, so the store holds every one of
them (`all_instructions`) plus the empty instruction of classifier-free guidance. With your own
data (`--data` the shards of data.shards), one pass over the shards' JSON members collects every
instruction in them instead (in data.language, both languages for "random"):
  python -m anchoredit_jax.data.text_store --config=... --data='/data/edits/*.tar' --out=DIR A training step
finds each token row's embedding by a hash of the row (`lookup`, inside jit); the trainer checks
on the host that every row of every batch is in the store, and at start that the store agrees
with the model's own encoder. Files: embeddings.safetensors (tokens [n,l] int32, emb [n,L,d]
float16, mask [n,L] bool, tail_emb [l-L,d], tail_mask [l-L]: positions past L are the same for
every row -- zeros for umT5 -- and kept once) and meta.json.
Letters: n stored instructions, l text_len, L stored positions, d text_dim.
"""
import argparse
import itertools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from anchoredit_jax import cli, growth
from anchoredit_jax.data import shapes, wds
from anchoredit_jax.data.tokenize import tokenize_for, tokenizer_of
from anchoredit_jax.models.model import abstract_split, frozen_parts
from anchoredit_jax.models.umt5 import precompute_text_embeddings
from configs.common import load_configs
from anchoredit_jax.models.text import lookup, row_hash  # noqa: F401  (the store's own lookup)

FILE, META = "embeddings.safetensors", "meta.json"


class _Pick:
  """Stands in for describe()'s random generator: always picks template `i`."""

  def __init__(self, i):
    self.i = i

  def integers(self, n):
    return min(self.i, n - 1)


def all_instructions() -> list:
  """Every instruction ShapesEdit can generate (a superset: some edits are never valid), sorted,
  with the empty instruction first."""
  targets = list(itertools.product(shapes.COLOURS, shapes.SHAPES))
  edits = [shapes.Edit("recolour", target=t, colour=c) for t in targets for c in shapes.COLOURS]
  edits += [shapes.Edit("move", target=t, direction=d) for t in targets for d in shapes.DIRECTIONS]
  edits += [shapes.Edit("resize", target=t, direction=d) for t in targets
            for d in shapes.RESIZE_DIRECTIONS]
  edits += [shapes.Edit("remove", target=t) for t in targets]
  edits += [shapes.Edit("add", colour=c, shape=s, size=z, place=p) for c in shapes.COLOURS
            for s in shapes.SHAPES for z in shapes.SIZES for p in shapes.PLACES]
  most = max(len(v) for v in shapes.TEMPLATES.values())
  return [""] + sorted({shapes.describe(e, _Pick(i)) for e in edits for i in range(most)})


def _weights(seed, l):
  return np.random.default_rng(seed).integers(1, 2 ** 32, l, dtype=np.uint64).astype(np.uint32) | 1


def build(model, model_cfg, instructions=None, *, chunk=256, progress=None):
  """Arrays of a store for `model` (an EditModel with a frozen umT5): its encoder run over every
  instruction once, in chunks, kept in float16 and trimmed to the positions that differ."""
  instructions = all_instructions() if instructions is None else list(instructions)
  tokens = tokenize_for(model_cfg, instructions)
  if len({r.tobytes() for r in tokens}) != len(tokens):
    raise ValueError("two instructions tokenize to the same row (text_len too short?)")
  embs, masks = [], []
  for i in range(0, len(tokens), chunk):
    e, m = precompute_text_embeddings(model.text, tokens[i:i + chunk])
    embs.append(e)
    masks.append(m)
    if progress:
      progress(len(e))
  ref_e, ref_m = embs[0][0], masks[0][0]  # row 0 (""): its padding positions are the tail
  differs = lambda e, m: np.any(e != ref_e, -1) | (m != ref_m)  # [rows, l]
  last = max(int(np.max(np.nonzero(np.any(differs(e, m), 0))[0], initial=-1)) for e, m in zip(embs, masks))
  L = max(last + 1, 1)
  for seed in range(100):  # a hash seed without collisions among the stored rows
    w = _weights(seed, tokens.shape[1])
    keys = row_hash(tokens, w, np)
    if len(np.unique(keys)) == len(keys):
      break
  else:
    raise ValueError(f"no collision-free row hash for {len(keys)} instructions in 100 seeds")
  order = np.argsort(keys, kind="stable")
  emb = np.concatenate([e[:, :L] for e in embs])[order]
  return {"keys": keys[order], "weights": w, "tokens": tokens[order], "emb": emb,
          "mask": np.concatenate([m[:, :L] for m in masks])[order],
          "tail_emb": ref_e[L:], "tail_mask": ref_m[L:]}, [instructions[i] for i in order]


def _fingerprint(model_cfg) -> dict:
  return {"text_encoder": model_cfg.text_encoder, "text_len": model_cfg.text_len,
          "text_dim": model_cfg.text_dim, "tokenizer": tokenizer_of(model_cfg),
          "umt5": json.loads(model_cfg.umt5.to_json()) if "umt5" in model_cfg else None}


def save(out, arrays, instructions, model_cfg, **meta):
  """Writes the store into `out` + ".partial", then puts it in place of `out`: an interrupted
  build leaves no half-written store."""

  out = os.fspath(out).rstrip("/")
  check_out(out)
  tmp = out + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, os.path.join(tmp, FILE))
  with open(os.path.join(tmp, META), "w") as f:
    json.dump({**_fingerprint(model_cfg), "instructions": instructions,
               "stored_len": int(arrays["emb"].shape[1]), **meta}, f, indent=1)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)


def check_frozen(model_cfg):
  """Only a frozen encoder's output can be stored: a trainable one changes every step."""
  if "text" not in frozen_parts(model_cfg):
    raise ValueError(f"model.text_encoder={model_cfg.text_encoder!r} trains with the DiT; only a "
                     "frozen encoder (umt5) can have its embeddings stored")


def check_out(out):
  """A store replaces only an earlier store or an empty folder, never other files."""
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, META)):
    raise ValueError(f"--out={out} exists and is not a text store; give a new or empty folder")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file; give a folder")


def load(path, model_cfg) -> dict:
  """The store's arrays, after checking it was made for this model's text encoder."""
  if not os.path.exists(os.path.join(path, FILE)):
    raise FileNotFoundError(f"data.text_store={path} holds no {FILE}; make it with: python -m "
                            f"anchoredit_jax.data.text_store --config=<the same config> --out={path}")
  with open(os.path.join(path, META)) as f:
    meta = json.load(f)
  want = _fingerprint(model_cfg)
  diff = [k for k in want if meta.get(k) != want[k]]
  if diff:
    raise ValueError(f"data.text_store={path} was made for another text encoder ({diff[0]}: "
                     f"{meta.get(diff[0])!r}, this model: {want[diff[0]]!r}); rebuild it")
  return load_file(os.path.join(path, FILE))


def missing(store, tokens) -> np.ndarray:
  """Host check: bool [...] of the token rows [..., l] that the store does not hold."""
  tokens = np.asarray(tokens)
  i = np.clip(np.searchsorted(store["keys"], row_hash(tokens, store["weights"], np)), 0,
              len(store["keys"]) - 1)
  return np.any(store["tokens"][i] != tokens, axis=-1)


def check_against(graphdef, params, store, rows=4, atol=None):
  """Runs the model's own encoder on a few stored instructions and compares: a store built from
  other encoder weights stops training here, in one line."""
  idx = np.linspace(0, len(store["keys"]) - 1, rows).astype(int)
  tokens = jnp.asarray(store["tokens"][idx])
  emb, mask = jax.jit(lambda p: nnx.merge(graphdef, p).encode_text(tokens))(params)
  ref_e, ref_m = lookup(store, tokens)
  err = float(jnp.max(jnp.abs(emb - ref_e)))
  scale = float(jnp.max(jnp.abs(emb)))
  if not bool(jnp.all(mask == ref_m)) or err > (atol if atol is not None else 2e-3 * max(scale, 1.0)):
    raise ValueError(f"the text store disagrees with this model's text encoder (max difference "
                     f"{err:.3g}); it was built from other weights: rebuild it from this model")
  return err


def main(argv=None):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--config", required=True, help="the training config, e.g. "
                  "configs/wan/pretrain.py:wan1.3b,dir=WAN; its init_from gives the encoder weights")
  ap.add_argument("--out", required=True)
  ap.add_argument("--data", default="", help="WebDataset shards (a glob or a JSON list) whose "
                  "instructions to store (default: every ShapesEdit instruction)")
  args, overrides = ap.parse_known_args(argv)
  try:
    cfg = load_configs(args.config, overrides, "")[0][1]
    check_frozen(cfg.model)
    cli.stop_if_args_only()
    check_out(args.out)  # before the encoder runs
    texts = all_instructions()
    if args.data:
      language = cfg.data.get("language", "en")
      texts = [""] + [t for t in wds.instructions(args.data, wds.LANGUAGES if language == "random"
                                                   else (language,)) if t]
    # identity mapping (flow.p_identity) trains on one more instruction of its own
    extra = cfg.flow.get("identity_text", "") if cfg.flow.get("p_identity", 0.0) else ""
    texts += [extra] if extra and extra not in texts else []
    model = nnx.merge(abstract_split(cfg.model)[0], growth.load_init(cfg))
    with tqdm(total=len(texts), desc="text store", unit="instr") as bar:
      arrays, instructions = build(model, cfg.model, texts, progress=bar.update)
    save(args.out, arrays, instructions, cfg.model, source=str(cfg.init_from),
         command="python -m anchoredit_jax.data.text_store " + " ".join(sys.argv[1:] if argv is None else argv))
  except (ValueError, OSError) as e:
    print(f"text_store: error: {e}", file=sys.stderr)
    return 2
  mib = os.path.getsize(os.path.join(args.out, FILE)) / 2 ** 20
  print(f"text store: {len(instructions)} instructions, {arrays['emb'].shape[1]} of "
        f"{cfg.model.text_len} positions kept, {mib:.1f} MiB in {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
